"""Data-parallel fits (``distributed=True``): each process of the default
torch.distributed process group calls ``fit`` on its own shard of (X, y).

The numerical layers sum over the shards through one hook (a
:class:`~sklearn_fntk._linalg.reduction.Reduction` held by the training
JacobianProducts); this module does the estimator's part: the reduction of a fit,
the checks that the shards describe one problem (the same input shape, outputs,
network weights and random_state on every process), the classes seen by any shard,
and the end of the fit, after which the other shards are out of reach.
"""

import numpy as np
import torch

from ._linalg.reduction import LOCAL, DetachedReduction, ProcessGroupReduction

__all__ = ["check_same", "class_union", "detach", "fit_reduction"]


def fit_reduction(estimator):
    """The Reduction of ``estimator``'s fit: LOCAL, or over the process group.

    Raises
    ------
    RuntimeError
        For ``distributed=True`` without an initialised default process group.
    ValueError
        For ``distributed=True`` with a ``random_state`` other than an int: the
        default network, sketches and probes must draw the same on every process.
    """
    if not estimator.distributed:
        return LOCAL
    reduction = ProcessGroupReduction(estimator.device)
    state = estimator.random_state
    if not isinstance(state, (int, np.integer)) or isinstance(state, bool):
        raise ValueError(
            "distributed=True needs random_state to be an int, the same on every "
            "process (the default network, Nyström sketches and Lanczos probes must "
            f"draw the same numbers on all of them); got {state!r}."
        )
    return reduction


def check_same(reduction, value, what):
    """ValueError on every process unless ``value`` (picklable, comparable with
    ==) is the same on all of them."""
    values = reduction.gather(value)
    if any(v != values[0] for v in values[1:]):
        shown = ", ".join(f"rank {rank}: {v!r}" for rank, v in enumerate(values))
        raise ValueError(
            f"The processes of a data-parallel fit disagree on {what} ({shown}); "
            "every shard must describe the same problem."
        )


def check_same_parameters(reduction, theta):
    """ValueError on every process unless the linearization point θ (a tensor)
    is bitwise the same on all of them."""
    if not reduction.distributed:
        return
    if not bool(torch.equal(reduction.minimum(theta), reduction.maximum(theta))):
        raise ValueError(
            "The network's linearized parameters differ between the processes of "
            "the data-parallel fit: every process must pass the same network (the "
            "same weights), as torch.distributed's DistributedDataParallel keeps them."
        )


def class_union(reduction, classes):
    """The sorted union of every shard's classes (``classes`` sorted, unique)."""
    if not reduction.distributed:
        return classes
    return np.unique(np.concatenate(reduction.gather(classes)))


def detach(reduction, jacobian):
    """End a fit: a data-parallel one's training products no longer reach the other
    shards (see :class:`DetachedReduction`)."""
    if reduction.distributed:
        jacobian.reduction = DetachedReduction(reduction.world_size)
