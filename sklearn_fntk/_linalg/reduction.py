"""Sums over the shards of the training data: the one hook of a data-parallel fit.

Every quantity a fit takes from its data is a sum over samples: Jᵀu = Σ_s J_sᵀu_s,
JᵀΛJ V, the Gram matrix JᵀΛJ, its diagonal, ‖r‖², n, the log-likelihood. In a
data-parallel fit each process holds one shard of the rows and these sums are
all-reduced over the processes; everything in parameter space (p-vectors, p x p
matrices, scalars) is then the same on every process, so solvers, line searches and
stopping rules take the same steps everywhere. The numerical layers call
:meth:`Reduction.sum` at each such sum; in one process it returns its argument.

A failing process must not leave the others waiting in a collective. Every reduction
of :class:`ProcessGroupReduction` is preceded by a one-element status all-reduce, and
a process whose fit raises sends a non-zero status instead (:meth:`guard`): the
others, waiting in the status exchange of their next reduction, then raise
:class:`ShardFailure` naming it. A process that dies (its sockets close) or hangs is
reported by the backend, within the process group's ``timeout``, and raised as
:class:`ShardFailure` too.
"""

from contextlib import contextmanager

import torch
import torch.distributed as dist

__all__ = [
    "LOCAL",
    "DetachedReduction",
    "ProcessGroupReduction",
    "Reduction",
    "ShardFailure",
]


class ShardFailure(RuntimeError):
    """Another process of a data-parallel fit failed, ended or timed out."""


class Reduction:
    """The reduction of a fit in one process: the data are all here."""

    distributed = False
    rank, world_size = 0, 1

    def sum(self, tensor):
        """Σ over the shards of ``tensor`` (any shape); here ``tensor`` itself."""
        return tensor

    def minimum(self, tensor):
        """Elementwise minimum over the shards; here ``tensor`` itself."""
        return tensor

    def maximum(self, tensor):
        """Elementwise maximum over the shards; here ``tensor`` itself."""
        return tensor

    def sum_float(self, value):
        """Σ over the shards of a number (a Python or 0-d tensor value), a float."""
        return float(value)

    def minimum_float(self, value):
        """The least over the shards of a number, a float."""
        return float(value)

    def gather(self, obj):
        """Every shard's ``obj`` (picklable), in rank order."""
        return [obj]

    def local_generator(self, generator):
        """A generator for draws that differ between shards (rows to subsample),
        leaving ``generator`` (shared draws: probes, sketches) in step on all."""
        return generator

    @contextmanager
    def guard(self):
        """The fit's body: a failure here ends the other shards' fits (see module)."""
        yield


LOCAL = Reduction()


class ProcessGroupReduction(Reduction):
    """All-reduces over the default torch.distributed process group.

    Parameters
    ----------
    device : torch.device
        Where the tensors of the fit live (CPU for gloo, CUDA for NCCL).

    Raises
    ------
    RuntimeError
        When no default process group is initialised.
    """

    distributed = True

    def __init__(self, device):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "distributed=True needs an initialised torch.distributed default "
                "process group (torch.distributed.init_process_group, for example "
                "under torchrun), with every process calling fit on its own shard of "
                "the data; none is initialised in this process."
            )
        self.device = torch.device(device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._failed = False

    def _all_reduce(self, tensor, op):
        try:
            dist.all_reduce(tensor, op=op)
        except RuntimeError as error:  # DistBackendError is one
            self._failed = True
            raise ShardFailure(
                f"The data-parallel fit's all-reduce failed on rank {self.rank} of "
                f"{self.world_size}: another process ended, failed or timed out "
                f"({type(error).__name__}: {error})."
            ) from error

    def _check_peers(self):
        """The status exchange before each collective (see the module docstring)."""
        status = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._all_reduce(status, dist.ReduceOp.SUM)
        if int(status.item()):
            self._failed = True
            raise ShardFailure(
                f"The data-parallel fit stopped on rank {self.rank} of "
                f"{self.world_size}: {int(status.item())} other process(es) raised an "
                "error in their fit (see their output)."
            )

    def _reduce(self, tensor, op):
        self._check_peers()
        result = tensor.detach().clone(memory_format=torch.contiguous_format)
        self._all_reduce(result, op)
        return result

    def sum(self, tensor):
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def minimum(self, tensor):
        return self._reduce(tensor, dist.ReduceOp.MIN)

    def maximum(self, tensor):
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def sum_float(self, value):
        value = torch.as_tensor(value, dtype=torch.float64, device=self.device)
        return float(self.sum(value.reshape(1))[0])

    def minimum_float(self, value):
        value = torch.as_tensor(value, dtype=torch.float64, device=self.device)
        return float(self.minimum(value.reshape(1))[0])

    def gather(self, obj):
        self._check_peers()
        objects = [None] * self.world_size
        dist.all_gather_object(objects, obj)
        return objects

    def local_generator(self, generator):
        if generator is None:
            return None
        # one draw on every shard keeps ``generator`` in step; the rank makes the
        # shards' own draws differ
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        local = torch.Generator(device=generator.device)
        local.manual_seed(seed + self.rank)
        return local

    @contextmanager
    def guard(self):
        try:
            yield
        except BaseException:
            if not self._failed:  # tell the others, waiting in a status exchange
                self._failed = True
                status = torch.ones(1, dtype=torch.int32, device=self.device)
                try:
                    dist.all_reduce(status)
                except RuntimeError:
                    pass  # they ended already: the backend tells them
            raise


class DetachedReduction(Reduction):
    """The reduction of a data-parallel fit once it has ended: the other shards'
    data are out of reach (a collective after the fit could not know that every
    process makes it), so anything that needs the training data raises."""

    distributed = True

    def __init__(self, world_size):
        self.world_size = world_size

    def _refuse(self, *args):
        raise RuntimeError(
            f"This estimator was fitted data-parallel over {self.world_size} "
            "processes, and this computation needs the training data of every "
            "process, which only a fit can reach. Predictions (the mean, variances "
            "from the fit's factor or low-rank variance) work in any process; for "
            "this one, fit on one process, or with solver='dense'."
        )

    sum = minimum = maximum = sum_float = minimum_float = gather = _refuse
    local_generator = _refuse
