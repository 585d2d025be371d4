"""Memory guard: refuse an allocation that cannot fit, before making it.

Nothing of size n·p is ever held, nor n² unless a dense path was asked for; what
remains (a dense system and its factor, a dense evidence, a joint covariance, explicit
Jacobian blocks) is checked here first, against the peak that path really holds (every
matrix alive at once, not only the largest), so that a problem too large gets a clear
MemoryError naming the knob that helps instead of an allocator error or an
out-of-memory kill.

The memory available to this process on the CPU is the smallest of

- ``MemAvailable`` in /proc/meminfo (free memory plus what the kernel can reclaim:
  not ``MemFree``, which ignores the page cache);
- the cgroup limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) of this
  process's cgroup and of each cgroup above it, less its usage, plus the inactive
  page cache the kernel reclaims before it kills;
- ``RLIMIT_AS`` less the address space already mapped (``VmSize``) and
  ``RLIMIT_DATA`` less the data already mapped (``VmData``).
"""

import math
import os

import torch

from .reduction import LOCAL

__all__ = [
    "available_bytes",
    "check_fits",
    "largest",
    "memory_limits",
    "peak_bytes",
    "usable_bytes",
]

# Leave room for everything else the process holds (the data, the network, the
# Jacobian blocks and temporaries that are not counted).
_USABLE_FRACTION = 0.8
_CGROUP_ROOT = "/sys/fs/cgroup"


def _read(path):
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return None


def _fields(text, unit=1):
    """``{name: int}`` from "name value [kB]" lines (meminfo, status, memory.stat)."""
    fields = {}
    for line in (text or "").splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            fields[parts[0]] = int(parts[1]) * unit
    return fields


def _meminfo_available():
    """MemAvailable in bytes; MemFree where the kernel does not report it."""
    fields = _fields(_read("/proc/meminfo"), unit=1024)
    if "MemAvailable" in fields:
        return fields["MemAvailable"]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return math.inf


def _cgroup_headroom(directory, limit_name, usage_name, inactive_name):
    """limit - usage + inactive page cache of one cgroup directory, or inf."""
    limit = (_read(os.path.join(directory, limit_name)) or "").strip()
    usage = (_read(os.path.join(directory, usage_name)) or "").strip()
    if not limit.isdigit() or not usage.isdigit():  # "max", or not there
        return math.inf
    if int(limit) >= 1 << 60:  # cgroup v1's "no limit"
        return math.inf
    stat = _fields(_read(os.path.join(directory, "memory.stat")))
    return max(0, int(limit) - int(usage) + stat.get(inactive_name, 0))


def _cgroup_available():
    """The smallest headroom of this process's cgroup and its ancestors (v2 or v1)."""
    best = math.inf
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2
            base, names = _CGROUP_ROOT, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # cgroup v1
            base = os.path.join(_CGROUP_ROOT, "memory")
            names = (
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
            )
        else:
            continue
        # Ancestors' limits apply too; inside a container the path may not be
        # mounted, and the container's own cgroup is the root of the mount.
        parts = [part for part in path.split("/") if part]
        for depth in range(len(parts), -1, -1):
            directory = os.path.join(base, *parts[:depth])
            best = min(best, _cgroup_headroom(directory, *names))
    return best


def _rlimit_available():
    """RLIMIT_AS less VmSize and RLIMIT_DATA less VmData, whichever is smaller."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return math.inf
    status = _fields(_read("/proc/self/status"), unit=1024)
    best = math.inf
    for name, used in (("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")):
        if not hasattr(resource, name):
            continue
        soft, _ = resource.getrlimit(getattr(resource, name))
        if soft != resource.RLIM_INFINITY:
            best = min(best, max(0, soft - status.get(used, 0)))
    return best


def memory_limits(device):
    """What bounds the memory this process can still allocate on ``device``.

    Parameters
    ----------
    device : torch.device or str

    Returns
    -------
    dict
        ``{source: bytes}``; inf where a source sets no limit. For a CUDA device
        its free memory; for other accelerators nothing is known (inf).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return {"free GPU memory": torch.cuda.mem_get_info(device)[0]}
    if device.type != "cpu":
        return {"unknown": math.inf}
    return {
        "MemAvailable": _meminfo_available(),
        "the cgroup limit": _cgroup_available(),
        "the address-space limit (RLIMIT_AS/RLIMIT_DATA)": _rlimit_available(),
    }


def available_bytes(device):
    """Memory this process can still allocate on ``device`` in bytes (see
    :func:`memory_limits`; the smallest of its sources)."""
    return min(memory_limits(device).values())


def usable_bytes(device, reduction=LOCAL):
    """Bytes a new allocation on ``device`` may take, as :func:`check_fits` allows
    it: a share of :func:`available_bytes`; over the processes of a data-parallel
    fit (``reduction``), the least, so that all make the same choice."""
    return reduction.minimum_float(_USABLE_FRACTION * available_bytes(device))


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def _describe(parts, dtype):
    """ "the Gram matrix 300 x 300, its factor 300 x 300 (float64)"."""
    names = []
    for label, shape, *other in parts:
        own = f" {_dtype_name(other[0])}" if other and other[0] != dtype else ""
        names.append(f"{label} {' x '.join(map(str, shape))}{own}")
    return ", ".join(names) + f" ({_dtype_name(dtype)})"


def peak_bytes(parts, dtype):
    """Bytes of ``parts`` (see :func:`check_fits`) alive at once."""
    total = 0
    for _, shape, *other in parts:
        item = torch.empty((), dtype=other[0] if other else dtype).element_size()
        total += math.prod(shape) * item
    return total


def largest(phases, dtype):
    """The phase (a list of parts, see :func:`check_fits`) that holds the most."""
    return max(phases, key=lambda parts: peak_bytes(parts, dtype))


def check_fits(parts, dtype, device, what, advice):
    """Raise MemoryError unless tensors ``parts``, alive at once, fit.

    Parameters
    ----------
    parts : list of (str, tuple of int) or (str, tuple of int, torch.dtype)
        The tensors the path holds at its peak, each a label and a shape (a leading
        count for several of one shape: ``("CG vectors", (6, d, m))``), and its
        dtype where it is not ``dtype``.
    dtype : torch.dtype
    device : torch.device or str
    what : str
        The path, for the message ("The dense function-space system").
    advice : str
        Which parameter to change, for the message.

    Returns
    -------
    int
        The predicted peak in bytes.
    """
    n_bytes = peak_bytes(parts, dtype)
    limits = memory_limits(device)
    source = min(limits, key=limits.get)
    free = limits[source]
    if n_bytes > _USABLE_FRACTION * free:
        raise MemoryError(
            f"{what} needs {n_bytes / 2**30:.2f} GiB at its peak "
            f"({_describe(parts, dtype)}) but only {free / 2**30:.2f} GiB is available "
            f"to this process on {device} (bounded by {source}); {advice}."
        )
    return n_bytes
