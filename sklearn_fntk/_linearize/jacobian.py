"""Matrix-free products with the network Jacobian J = ∂f(w, X)/∂w at w = θ.

J is (n·k) x p for n samples and k outputs; it is never formed whole. Products stream
the data in chunks of ``batch_size`` samples:

- ``J V``  (p -> n·k): forward mode, ``torch.func.jvp`` (Pearlmutter's R-operator);
- ``Jᵀ U`` (n·k -> p): reverse mode, ``torch.func.vjp``, summed over chunks;
- explicit per-sample Jacobian blocks (b, k, p) for dense paths, diagonals and tests.

Several columns are handled at once with ``torch.vmap``. Where a layer has no
forward-mode rule, J V is taken as the VJP of the (linear) VJP map ``u -> Jᵀ u``
("double VJP"), which needs reverse mode only.

Rows may be weighted: with ``row_scale`` = √w (one factor per sample, applied to all
its outputs) every product is with diag(√w) J instead of J. Weighted Gaussian
regression is ordinary regression on these scaled rows and residuals (see
``FiniteNTKRegressor.fit``); the outputs f(θ, X) are never scaled.

Iterative solvers apply J and Jᵀ many times to the same data. When the saved
activations fit ``cache_bytes``, the forward pass of every chunk is done once: the VJP
closure and the double-VJP closure built on it are kept, and each later product only
runs the backward graphs.

In a data-parallel fit X is one process's shard of the rows, and ``reduction`` (see
:mod:`sklearn_fntk._linalg.reduction`) sums the p-vector products Jᵀ U and Jᵀ J V
over the shards; J V stays per shard, as are the outputs and the explicit blocks.

Forward mode keeps its dual levels in global state: every forward-mode section (a
``jvp``, a ``vmap`` over ``jvp``) holds ``NETWORK_LOCK`` (see :mod:`.network`), so
that products from several threads do not interleave.
"""

import torch
from torch.func import jacrev, jvp, vjp, vmap

from .._linalg.memory import check_fits
from .._linalg.reduction import LOCAL
from .network import NETWORK_LOCK

__all__ = [
    "JacobianProducts",
    "block_rows",
    "explicit_jacobian",
    "outputs_and_jvp",
    "scale_rows",
]

# Largest explicit Jacobian block (b x k x p): chunks are split into blocks of at most
# this many bytes (for products with many columns, diagonals, test Jacobians).
EXPLICIT_BLOCK_BYTES = 1 << 28
# Fewest samples per explicit block for many-column products to use blocks.
MIN_BLOCK_ROWS = 64
# Fewest product columns per output for which explicit blocks are cheaper.
EXPLICIT_MIN_COLUMNS = 32
# Leaf-module activation bytes times this factor estimates what a chunk's cached VJP
# and double-VJP graphs hold (the forward activations plus the backward graph).
_GRAPH_BYTES_PER_ACTIVATION_BYTE = 4


def scale_rows(array, scale, rows=slice(None)):
    """Multiply sample i's entries of ``array`` (b, ...) by ``scale[rows][i]``.

    ``scale`` is a tensor of per-sample factors, or None for no scaling.
    """
    if scale is None:
        return array
    return array * scale[rows].reshape(-1, *[1] * (array.ndim - 1))


def _forward_mode_available(network, w, X):
    """Whether ``torch.func.jvp`` runs through the network on a sample of X."""
    try:
        with NETWORK_LOCK:
            jvp(lambda w_: network(w_, X[:1]), (w,), (torch.zeros_like(w),))
    except NotImplementedError:
        return False
    return True


def _activation_bytes(module, call):
    """Bytes of every leaf module's output during ``call()``."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    leaves = [m for m in module.modules() if next(m.children(), None) is None]
    with NETWORK_LOCK:  # hooks on a module another thread may be calling
        handles = [leaf.register_forward_hook(count) for leaf in leaves]
    try:
        with torch.no_grad():
            call()
    finally:
        with NETWORK_LOCK:
            for handle in handles:
                handle.remove()
    return total


class _LinearizedChunk:
    """The VJP closure of one chunk and the double-VJP closure built on it.

    ``vjp(U)`` gives Jᵀ U and ``jvp(V)`` gives J V for this chunk without another
    forward pass; both accept a trailing column axis. The double-VJP closure is
    built on the first ``jvp``, so a chunk used for ``vjp`` only never pays for it.
    """

    def __init__(self, network, w, X):
        self.outputs, vjp_fn = vjp(lambda w_: network(w_, X), w)
        self._vjp = lambda u: vjp_fn(u)[0]
        self._transpose_fn = None

    def _jvp(self, v):
        return self._transpose_fn(v)[0]

    def vjp(self, U):
        if U.ndim == 2:
            return self._vjp(U)
        return vmap(self._vjp, in_dims=2, out_dims=1)(U)

    def jvp(self, V):
        if self._transpose_fn is None:  # built outside any vmap, once
            # u -> Jᵀ u is linear, so its VJP with cotangent v is J v, for any u.
            _, self._transpose_fn = vjp(self._vjp, torch.zeros_like(self.outputs))
        if V.ndim == 1:
            return self._jvp(V)
        return vmap(self._jvp, in_dims=1, out_dims=2)(V)


class JacobianProducts:
    """Chunked products with the Jacobian of ``network`` at ``w`` over the rows of X.

    Parameters
    ----------
    network : FunctionalNetwork
    w : torch.Tensor of shape (p,)
        The linearization point.
    X : torch.Tensor of shape (n, ...)
    batch_size : int
        Samples per chunk.
    cache_bytes : int, default=0
        Keep each chunk's linearization (see module docstring) when the estimated
        memory of all chunks is at most this; 0 never caches.
    row_scale : torch.Tensor of shape (n,) or None, default=None
        Per-sample factors of the rows of J (√w for sample weights w): every product,
        block and Fisher product is then with diag(row_scale) J. None: J itself.
    reduction : Reduction, default=LOCAL
        Sums Jᵀ U and Jᵀ J V over the shards of a data-parallel fit (X one shard).
    structured : LayerwiseKernel or None, default=None
        The layerwise kernel of the same network over the same X and ``row_scale``,
        at ``w`` = the network's θ: J V, Jᵀ U and explicit blocks then come from its
        per-layer features (a few matrix products per layer, no autograd and no
        forward pass per product), which it holds (``cached_bytes``) instead of a
        cached linearization; ``cache_bytes`` is then ignored.

    Attributes
    ----------
    n_samples, n_outputs, n_params : int
    forward_mode : bool
        False when J V falls back to the double VJP.
    cached : bool
    cached_bytes : int
        The estimated memory of the cached linearization (0 when not cached).
    """

    def __init__(
        self,
        network,
        w,
        X,
        *,
        batch_size,
        cache_bytes=0,
        row_scale=None,
        reduction=LOCAL,
        structured=None,
    ):
        self.network, self.w, self.X = network, w, X
        self.batch_size, self.row_scale = batch_size, row_scale
        self.reduction, self.structured = reduction, structured
        self.n_samples = X.shape[0]
        self.n_params = w.numel()
        self.chunks = [
            slice(start, min(start + batch_size, self.n_samples))
            for start in range(0, self.n_samples, batch_size)
        ]
        self.forward_mode = _forward_mode_available(network, w, X)
        if structured is not None:
            self.cached, self.cached_bytes = True, structured.feature_bytes
        else:
            first = X[self.chunks[0]]
            estimate = _activation_bytes(network.module, lambda: network(w, first))
            estimate *= _GRAPH_BYTES_PER_ACTIVATION_BYTE * self.n_samples / first.shape[0]
            self.cached = 0 < estimate <= cache_bytes
            self.cached_bytes = int(estimate) if self.cached else 0
        self._linearized = None
        self._linearize()
        self.n_outputs = self._outputs.shape[1]

    def _linearize(self):
        """Cache every chunk's linearization (or only the outputs when not cached)."""
        network, w, X = self.network, self.w, self.X
        self._linearized = None
        if self.structured is not None:
            self._outputs = self.structured.outputs
        elif self.cached:
            self._linearized = [_LinearizedChunk(network, w, X[c]) for c in self.chunks]
            self._outputs = torch.cat([lin.outputs.detach() for lin in self._linearized])
        else:
            with torch.no_grad():
                self._outputs = torch.cat([network(w, X[c]) for c in self.chunks])

    def __getstate__(self):
        # Autograd closures do not pickle; they are rebuilt on unpickling.
        state = self.__dict__.copy()
        state["_linearized"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._linearize()

    @property
    def outputs(self):
        """The network's outputs f(θ, X), shape (n, k)."""
        return self._outputs

    def _explicit_is_cheaper(self, n_columns):
        """Whether explicit Jacobian blocks beat ``n_columns`` product columns.

        Writing a block of per-sample Jacobians costs about as much as
        ``EXPLICIT_MIN_COLUMNS`` product columns per output (measured: see
        docs/benchmarks.rst, "Measurements behind the defaults"), as long as blocks
        of ``EXPLICIT_BLOCK_BYTES`` still hold ``MIN_BLOCK_ROWS`` samples (below
        that, per-block overhead takes over). The same holds for products from
        per-layer features (``structured``), whose blocks are outer products
        written in place: measured 0.4 times their per-column cost at 256 columns,
        2.6 times at 16 (benchmarks/million_points.py).
        """
        many = n_columns >= EXPLICIT_MIN_COLUMNS * self.n_outputs
        return many and self._block_rows() >= MIN_BLOCK_ROWS

    def _block_rows(self):
        return block_rows(self.n_outputs, self.w)

    @property
    def block_samples(self):
        """Samples in the largest chunk or explicit Jacobian block (for memory
        estimates): a block is (block_samples, k, p), a chunk's kernel rows
        (block_samples·k, n·k)."""
        return min(self.batch_size, self.n_samples, self._block_rows())

    def jvp(self, V):
        """J V for V of shape (p,) or (p, m); returns (n, k) or (n, k, m)."""
        if V.ndim == 2 and self._explicit_is_cheaper(V.shape[1]):
            # the blocks' rows are scaled already; each block's rows written in place
            JV = V.new_empty(self.n_samples, self.n_outputs, V.shape[1])
            for rows, J in self.jacobian_blocks():
                torch.mm(J.flatten(0, 1), V, out=JV[rows].flatten(0, 1))
            return JV
        if self.structured is not None:  # its rows are scaled already
            return self.structured.jvp(V)
        if self.cached:
            JV = torch.cat([lin.jvp(V) for lin in self._linearized])
        else:
            JV = torch.cat([self._chunk_jvp(self.X[c], V) for c in self.chunks])
        return scale_rows(JV, self.row_scale)

    def vjp(self, U):
        """Jᵀ U for U of shape (n, k) or (n, k, m); returns (p,) or (p, m)."""
        if U.ndim == 3 and self._explicit_is_cheaper(U.shape[2]):
            # the blocks' rows are scaled already; summed in place
            total = U.new_zeros(self.n_params, U.shape[2])
            for rows, J in self.jacobian_blocks():
                total.addmm_(J.flatten(0, 1).T, U[rows].flatten(0, 1))
        elif self.structured is not None:  # its rows are scaled already
            total = self.structured.vjp(U)
        else:
            U = scale_rows(U, self.row_scale)
            if self.cached:
                lins = zip(self._linearized, self.chunks, strict=True)
                total = sum(lin.vjp(U[c]) for lin, c in lins)
            else:
                total = sum(self._chunk_vjp(self.X[c], U[c]) for c in self.chunks)
        return self.reduction.sum(total)

    def _chunk_jvp(self, X, V):
        return outputs_and_jvp(self.network, self.w, X, V, self.forward_mode)[1]

    def _chunk_vjp(self, X, U):
        return _LinearizedChunk(self.network, self.w, X).vjp(U)

    def fisher_product(self, V, finite_difference=False):
        """Jᵀ J V for V of shape (p,) or (p, m); returns the shape of V.

        Many columns (a sketch): one pass over explicit Jacobian blocks, Σ_c J_cᵀ(J_c V),
        exact either way, since building each block once beats a pass per column.
        Otherwise a JVP then a VJP, or the finite-difference product
        (:meth:`fisher_product_fd`) when ``finite_difference``.
        """
        if V.ndim == 2 and self._explicit_is_cheaper(V.shape[1]):
            total = torch.zeros_like(V)
            for _, J in self.jacobian_blocks():  # rows scaled already
                rows_J = J.flatten(0, 1)
                total.addmm_(rows_J.T, rows_J @ V)  # summed in place
            return self.reduction.sum(total)
        if finite_difference:
            return self.fisher_product_fd(V)
        return self.vjp(self.jvp(V))

    def fisher_product_fd(self, V):
        """Jᵀ J V by the finite-difference Gauss-Newton product of Maddox et al. (2021).

        ∇_w' ½‖f(θ, X) - f(w', X)‖² at w' = θ + εv equals ε·JᵀJ v + O(ε²) (with each
        sample's misfit scaled by its ``row_scale``, for the scaled J), so each
        column costs one forward and one backward pass at θ + εv, with f(θ, X)
        cached. The step ε = √(machine ε)·(1 + ‖θ‖)/‖v‖ balances the O(ε) truncation
        error against rounding. The network's parameters are never modified.

        Parameters
        ----------
        V : torch.Tensor of shape (p,) or (p, m)

        Returns
        -------
        torch.Tensor of the shape of V
        """
        columns = V.reshape(self.n_params, -1)
        scale = torch.finfo(V.dtype).eps ** 0.5 * (1 + torch.linalg.vector_norm(self.w))
        products = [self._fd_column(v, scale) for v in columns.T]
        return torch.stack(products, dim=1).reshape(V.shape)

    def _fd_column(self, v, scale):
        """One finite-difference column, by plain reverse-mode autograd at θ + εv.

        Plain autograd, not ``torch.func``'s ``vmap(grad(...))``, which was measured
        slower (docs/benchmarks.rst, "Measurements behind the defaults").
        """
        norm = torch.linalg.vector_norm(v)
        step = torch.where(norm > 0, scale / norm, torch.ones_like(norm))
        w = (self.w + step * v).detach().requires_grad_(True)
        total = torch.zeros_like(v)
        with torch.enable_grad():
            for rows in self.chunks:
                change = self.network(w, self.X[rows]) - self.outputs[rows]
                misfit = 0.5 * (scale_rows(change, self.row_scale, rows) ** 2).sum()
                total += torch.autograd.grad(misfit, w)[0]
        return self.reduction.sum(total) / step

    def subsample(self, n_samples, generator=None):
        """Products over ``n_samples`` of the samples, drawn uniformly at random
        without replacement, with their rows scaled by √(n / n_samples).

        The Fisher of the result, (n/m)·Σ_(i∈S) J_iᵀJ_i, is an unbiased estimate of
        this one's, JᵀJ = Σ_i J_iᵀJ_i, at m/n of the cost per product.

        Parameters
        ----------
        n_samples : int
            m, at most n.
        generator : torch.Generator or None
            Source of the draw (on the device of ``w``).

        Returns
        -------
        rows : torch.Tensor of shape (m,)
            The samples drawn, ascending.
        products : JacobianProducts
            Over ``X[rows]``; not cached (layerwise where this one is).
        """
        device = self.w.device
        order = torch.randperm(self.n_samples, generator=generator, device=device)
        rows = order[:n_samples].sort().values  # sorted: a contiguous-ish gather
        scale = self.w.new_full((n_samples,), (self.n_samples / n_samples) ** 0.5)
        if self.row_scale is not None:
            scale = scale * self.row_scale[rows]
        X = self.X[rows]
        structured = None if self.structured is None else self.structured.of(X, scale)
        return rows, JacobianProducts(
            self.network,
            self.w,
            X,
            batch_size=self.batch_size,
            row_scale=scale,
            reduction=self.reduction,
            structured=structured,
        )

    def jacobian(self, chunk):
        """Explicit (scaled) Jacobian of the rows ``chunk`` of X, shape (b, k, p)."""
        J = explicit_jacobian(self.network, self.w, self.X[chunk])
        return scale_rows(J, self.row_scale, chunk)

    def jacobian_blocks(self):
        """Yield ``(rows, J_rows)`` with J_rows of shape (b, k, p), a slice of X's
        rows each: every chunk, split where a block would pass ``EXPLICIT_BLOCK_BYTES``.
        """
        step = self._block_rows()
        if self.structured is not None:  # its rows are scaled already
            yield from self.structured.jacobian_blocks(step)
            return
        for chunk in self.chunks:
            for start in range(chunk.start, chunk.stop, step):
                rows = slice(start, min(start + step, chunk.stop))
                yield rows, self.jacobian(rows)


def block_rows(n_outputs, w):
    """Samples per explicit Jacobian block of k outputs over the parameters ``w``:
    at most ``EXPLICIT_BLOCK_BYTES``."""
    return max(1, EXPLICIT_BLOCK_BYTES // (n_outputs * w.numel() * w.element_size()))


def outputs_and_jvp(network, w, X, V, forward_mode=True):
    """``(f(w, X), J(X) V)`` for V of shape (p,) or (p, m), caching nothing.

    Forward mode computes both in one pass; without it, the double VJP.
    """
    if not forward_mode:
        linearized = _LinearizedChunk(network, w, X)
        return linearized.outputs.detach(), linearized.jvp(V)

    def product(v):
        return jvp(lambda w_: network(w_, X), (w,), (v,))

    with NETWORK_LOCK:
        if V.ndim == 1:
            return product(V)
        return vmap(product, in_dims=1, out_dims=(None, 2))(V)


def explicit_jacobian(network, w, X):
    """Per-sample Jacobians J(x_i), shape (n, k, p), by reverse mode under vmap."""
    with torch.no_grad():
        n_outputs = network(w, X[:1]).shape[1]
    check_fits(
        [("the block", (X.shape[0], n_outputs, w.numel()))],
        w.dtype,
        w.device,
        "An explicit Jacobian block",
        "lower batch_size (for return_cov and sample_y: pass fewer test points)",
    )
    return vmap(jacrev(network.single), in_dims=(None, 0))(w, X)
