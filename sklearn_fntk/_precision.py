"""Full float32 precision while the estimators compute, whatever PyTorch's global
TensorFloat-32 switches say.

PyTorch runs float32 convolutions on TF32 tensor cores by default on Ampere and later
GPUs (``torch.backends.cudnn.allow_tf32``), and users who train with
``torch.set_float32_matmul_precision("high")`` get TF32 matrix products too: a 10-bit
mantissa, about 1e-3 relative, where float32 has 1e-7. The estimators' float32
conditioning checks and stopping rules assume float32 (measured on an H200, a CNN on
load_digits: the CG fit's predictions 1.2e-3 from the CPU's with TF32 convolutions,
4.3e-5 without; the dense fit's system had NaN entries). So the public methods run
with IEEE float32 arithmetic and restore the user's settings on return.

The switches are process-wide: entries from several threads are counted, and the
settings are restored when the last one leaves. Another thread's own float32 work
that overlaps one of ours runs at full precision too (slower, never less accurate).
"""

import functools
import threading

import torch

__all__ = ["full_float32_precision"]


def _switches():
    """The PyTorch backends whose float32 precision is switchable: those with the
    ``fp32_precision`` API (torch >= 2.9), else the legacy ``allow_tf32`` flags."""
    backends = torch.backends
    if hasattr(backends.cuda.matmul, "fp32_precision"):
        owners = [backends.cuda.matmul, backends.cudnn.conv, backends.cudnn.rnn]
        owners += [backends.mkldnn.matmul, backends.mkldnn.conv, backends.mkldnn.rnn]
        return [(owner, "fp32_precision", "ieee") for owner in owners]
    return [
        (backends.cuda.matmul, "allow_tf32", False),
        (backends.cudnn, "allow_tf32", False),
    ]


class _Float32Precision:
    """The reentrant, thread-counted switch of :func:`full_float32_precision`."""

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = []

    def __enter__(self):
        with self._lock:
            if self._depth == 0:
                switches = _switches()
                self._saved = [
                    (owner, name, getattr(owner, name)) for owner, name, _ in switches
                ]
                for owner, name, value in switches:
                    setattr(owner, name, value)
            self._depth += 1

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for owner, name, value in self._saved:
                    setattr(owner, name, value)
                self._saved = []


_FLOAT32_PRECISION = _Float32Precision()


def full_float32_precision(method):
    """Decorate ``method`` to run with IEEE float32 matrix products and convolutions
    (no TF32), the user's settings restored on return."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with _FLOAT32_PRECISION:
            return method(*args, **kwargs)

    return wrapper
