"""Memory checks: refuse allocations that cannot fit, naming the knob that helps.

Nothing of size n·p is ever held, nor n² unless the dense solver was chosen; what
remains (a dense system, explicit Jacobian blocks) is checked here before it is
allocated, so that a problem too large gets a clear error instead of a crash.
"""

import os

import torch

__all__ = ["available_bytes", "check_fits"]

# Leave room for everything else the process holds.
_USABLE_FRACTION = 0.8


def available_bytes(device):
    """Free memory on ``device`` in bytes (system RAM for the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return float("inf")


def check_fits(shape, dtype, device, what, advice):
    """Raise MemoryError unless a tensor of ``shape`` fits in free memory.

    Parameters
    ----------
    shape : tuple of int
    dtype : torch.dtype
    device : torch.device or str
    what : str
        What the tensor is, for the message.
    advice : str
        Which parameter to change, for the message.
    """
    n_bytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    free = available_bytes(device)
    if n_bytes > _USABLE_FRACTION * free:
        raise MemoryError(
            f"{what} needs {n_bytes / 2**30:.2f} GiB ({' x '.join(map(str, shape))} "
            f"{dtype}) but only {free / 2**30:.2f} GiB is free on {device}; {advice}."
        )
