"""The two symmetric positive definite systems of a linearized network's posterior.

J is the (n·k) x p Jacobian of the training outputs at θ, s the prior variance and Λ
an optional curvature of the likelihood, one (k, k) block Λ_i per sample (Gaussian
regression: Λ = I; the Laplace approximation of softmax classification:
Λ_i = diag(π_i) - π_i π_iᵀ). The posterior can be computed in either of two spaces:

- parameter space, size p:  A = Jᵀ Λ J + c·I
  (regression: A = JᵀJ + (σ²/s) I, the Fisher plus the prior, scaled by σ²;
  classification: the Laplace precision H = JᵀΛJ + I/s);
- function space, size n·k:  B = s·Λ^½ J Jᵀ Λ^½ + c·I
  (regression: K = s·J Jᵀ + σ² I, the finite-NTK Gram matrix plus noise;
  classification: B = I + Λ^½ K Λ^½ of Rasmussen & Williams 2006, Alg. 3.2),

with Λ^½ the blockwise symmetric square root; function-space vectors are (n, k)
arrays flattened row-major. Both are P + c·I with P positive semidefinite and c > 0
the ``shift``. Each operator implements products with P (``psd_matmat``), its
diagonal and its dense assembly; ``matmat`` adds the shift. As in curvlinops, nothing
else: solves live in :mod:`.system`.
"""

import torch

from .._linalg.dense import add_symmetric_product, symmetrize_from_lower
from .._linearize.jacobian import block_rows, explicit_jacobian

__all__ = ["FunctionOperator", "ParameterOperator", "blockwise", "psd_sqrt"]


def psd_sqrt(matrices):
    """Symmetric square roots of positive semi-definite matrices (..., k, k)."""
    values, vectors = torch.linalg.eigh(matrices)
    return (vectors * values.clamp_min(0.0).sqrt().unsqueeze(-2)) @ vectors.mT


def blockwise(blocks, U):
    """Apply per-sample (k, k) blocks to U of shape (n, k, m)."""
    return torch.einsum("iab,ibm->iam", blocks, U)


class _Operator:
    """P + shift·I: shapes, the shifted product and diagonal, test Jacobians."""

    def __init__(self, jacobian, shift):
        self.jacobian, self.shift = jacobian, shift
        self.n_samples, self.n_outputs = jacobian.n_samples, jacobian.n_outputs
        self.n_params = jacobian.n_params

    def matmat(self, V):
        """(P + shift·I) V for V of shape (d, m)."""
        return self.psd_matmat(V) + self.shift * V

    def diagonal(self):
        """diag(P) + shift, shape (d,)."""
        return self.psd_diagonal() + self.shift

    def dense(self, gram=None):
        """P + shift·I assembled, shape (d, d); from ``gram`` (J Jᵀ or JᵀJ) if given."""
        A = self.psd_dense(gram)
        A.diagonal().add_(self.shift)
        return A

    def cache_parts(self):
        """The cached linearization of the training data (see JacobianProducts), as
        parts for :func:`check_fits`: held through the fit."""
        if not self.jacobian.cached:
            return []
        return [("the cached linearization", (self.jacobian.cached_bytes,), torch.uint8)]

    def assembly_parts(self):
        """The blocks that assembling the Gram matrix holds besides it (and that
        the allocator was measured to keep a while after): parts."""
        # the current explicit Jacobian block, the next one and J Λ
        blocks = (3, self.jacobian.block_samples, self.n_outputs, self.n_params)
        return [("Jacobian blocks", blocks)]

    def dense_parts(self, gram_held):
        """What assembling the dense system and its Cholesky factor holds at its
        peak: (label, shape) pairs for :func:`check_fits`.

        Parameters
        ----------
        gram_held : bool
            Whether the caller holds the Gram matrix (J Jᵀ or JᵀΛJ) meanwhile.
        """
        d = (self.size, self.size)
        # Parameter space: the Gram matrix becomes the system, and the system its
        # Cholesky factor, in place; while it is assembled it is one matrix.
        parts = [("the system (then its Cholesky factor, in place)", d)]
        return parts + self.assembly_parts() + self.cache_parts()

    def test_jacobian(self, X):
        """Jacobian rows of test inputs X at θ, shape (m·k, p)."""
        return explicit_jacobian(self.jacobian.network, self.jacobian.w, X).flatten(0, 1)

    def test_projections(self, X, V):
        """‖J*‖² per test row, shape (m·k,), and J* V, shape (m·k, r), at inputs X.

        From explicit test Jacobian blocks of at most ``EXPLICIT_BLOCK_BYTES``: one
        batched backward pass per block instead of r forward-mode products.
        """
        rows = block_rows(self.n_outputs, self.jacobian.w)
        squared_norms, JV = [], []
        for start in range(0, X.shape[0], rows):
            Jt = self.test_jacobian(X[start : start + rows])
            squared_norms.append((Jt**2).sum(1))
            JV.append(Jt @ V)
        return torch.cat(squared_norms), torch.cat(JV)


class ParameterOperator(_Operator):
    """A = Jᵀ Λ J + c·I on p-vectors (parameter space).

    Parameters
    ----------
    jacobian : JacobianProducts
    shift : float
        c: σ²/s for regression, 1/s for the Laplace precision.
    curvature : torch.Tensor of shape (n, k, k) or None, default=None
        Λ, blockwise; None for the identity.
    fisher_product : {"exact", "finite_difference"}, default="exact"
        With Λ = I, "finite_difference" replaces the exact JᵀJ v (JVP then VJP) by
        the finite-difference form (:meth:`JacobianProducts.fisher_product_fd`): an
        O(√ε) relative error traded for one plain forward and backward pass. It
        applies to products with few columns (the CG iterations).
    """

    def __init__(self, jacobian, *, shift, curvature=None, fisher_product="exact"):
        super().__init__(jacobian, shift)
        self.curvature, self.fisher_product = curvature, fisher_product

    @property
    def size(self):
        return self.n_params

    def subsampled(self, n_samples, generator=None):
        """The operator of the Fisher over ``n_samples`` random training samples,
        scaled to be an unbiased estimate of this one's (see
        :meth:`JacobianProducts.subsample`); ``self`` when that is all of them."""
        if n_samples >= self.n_samples:
            return self
        rows, products = self.jacobian.subsample(n_samples, generator)
        curvature = None if self.curvature is None else self.curvature[rows]
        return ParameterOperator(
            products,
            shift=self.shift,
            curvature=curvature,
            fisher_product=self.fisher_product,
        )

    def psd_matmat(self, V):
        """Jᵀ Λ J V for V of shape (p, m).

        With Λ = I, Fisher-vector products (see :meth:`JacobianProducts.
        fisher_product`; blocks of many columns, such as sketches, are exact even
        with ``fisher_product="finite_difference"``); otherwise one JVP, the
        curvature blocks, one VJP.
        """
        if self.curvature is None:
            finite_difference = self.fisher_product == "finite_difference"
            return self.jacobian.fisher_product(V, finite_difference=finite_difference)
        return self.jacobian.vjp(blockwise(self.curvature, self.jacobian.jvp(V)))

    def psd_diagonal(self):
        """diag(Jᵀ Λ J) = Σ_i diag(J_iᵀ Λ_i J_i), shape (p,), summed over the shards."""
        blocks = self.jacobian.jacobian_blocks()
        if self.curvature is None:
            diagonal = sum((J**2).sum((0, 1)) for _, J in blocks)
        else:
            diagonal = sum(
                torch.einsum("iap,iab,ibp->p", J, self.curvature[c], J) for c, J in blocks
            )
        return self.jacobian.reduction.sum(diagonal)

    def gram_dense(self):
        """Jᵀ Λ J = Σ_chunks J_cᵀ Λ_c J_c from explicit Jacobian blocks, added in
        place (one p x p matrix), its lower block triangle only and then mirrored
        (n·k·p²/2 multiply-adds, not n·k·p²), then summed over the shards of a
        data-parallel fit."""
        p = self.n_params
        w = self.jacobian.w
        total = w.new_zeros(p, p)
        for c, J in self.jacobian.jacobian_blocks():
            curved = J if self.curvature is None else self._curved(c, J)
            add_symmetric_product(total, J.flatten(0, 1), curved.flatten(0, 1))
        return self.jacobian.reduction.sum(symmetrize_from_lower(total))

    def _curved(self, rows, J):
        """Λ_i J_i for the rows ``rows``: shape (b, k, p)."""
        return torch.einsum("iab,ibp->iap", self.curvature[rows], J)

    def psd_dense(self, gram=None):
        """P = Jᵀ Λ J assembled, shape (p, p) (``gram`` if given)."""
        return self.gram_dense() if gram is None else gram


class FunctionOperator(_Operator):
    """B = s·Λ^½ J Jᵀ Λ^½ + c·I on vectors of length n·k (function space).

    Parameters
    ----------
    jacobian : JacobianProducts
    prior : float
        s.
    shift : float
        c: σ² for regression, 1 for the Laplace approximation.
    root : torch.Tensor of shape (n, k, k) or None, default=None
        Λ^½, blockwise; None for the identity.
    structured : LayerwiseKernel or None, default=None
        Exact per-layer kernel of a Linear/elementwise network; when given, products
        with J Jᵀ, its diagonal, columns and test kernels come from it.
    """

    def __init__(self, jacobian, *, prior, shift, root=None, structured=None):
        super().__init__(jacobian, shift)
        self.prior, self.root, self.structured = prior, root, structured

    @property
    def size(self):
        return self.n_samples * self.n_outputs

    def curve(self, U):
        """Λ^½ U for U of shape (n·k, m) (U itself for Λ = I)."""
        if self.root is None:
            return U
        return blockwise(self.root, U.reshape(*self.root.shape[:2], -1)).reshape(U.shape)

    def _kernel_matmat(self, U):
        """s·J Jᵀ U for U of shape (n·k, m): a VJP then a JVP, or per-layer matmuls."""
        if self.structured is not None:
            return self.prior * self.structured.matmat(U)
        shape = (self.n_samples, self.n_outputs, U.shape[1])
        JtU = self.jacobian.vjp(U.reshape(shape))
        return self.prior * self.jacobian.jvp(JtU).reshape(U.shape)

    def psd_matmat(self, U):
        """s·Λ^½ J Jᵀ Λ^½ U for U of shape (n·k, m)."""
        return self.curve(self._kernel_matmat(self.curve(U)))

    def psd_diagonal(self):
        """diag(s·Λ^½ J Jᵀ Λ^½), shape (n·k,): from the per-sample (k, k) blocks
        K_ii = s·J_i J_iᵀ, or the layerwise kernel's diagonal for Λ = I."""
        if self.root is None and self.structured is not None:
            return self.prior * self.structured.diagonal()
        parts = []
        for c, J in self.jacobian.jacobian_blocks():
            if self.root is None:
                parts.append(self.prior * (J**2).sum(-1).reshape(-1))
                continue
            K_ii = self.prior * torch.einsum("iap,ibp->iab", J, J)
            root = self.root[c]
            parts.append(torch.einsum("iab,ibc,ica->ia", root, K_ii, root).reshape(-1))
        return torch.cat(parts)

    def column(self, index):
        """Column ``index`` of P, shape (n·k,)."""
        if self.root is None and self.structured is not None:
            return self.prior * self.structured.column(index)
        unit = self.jacobian.w.new_zeros(self.size, 1)
        unit[index] = 1.0
        return self.psd_matmat(unit)[:, 0]

    def gram_dense(self):
        """G = J Jᵀ, shape (n·k, n·k), from explicit Jacobian blocks: block (i, j) is
        J_i J_jᵀ; or from the layerwise kernel."""
        if self.structured is not None:
            return self.structured.dense()
        chunks, k = self.jacobian.chunks, self.n_outputs
        rows = [slice(c.start * k, c.stop * k) for c in chunks]
        G = self.jacobian.w.new_empty(self.size, self.size)
        for i, chunk_i in enumerate(chunks):
            J_i = self.jacobian.jacobian(chunk_i).flatten(0, 1)
            for j in range(i + 1):
                J_j = J_i if j == i else self.jacobian.jacobian(chunks[j]).flatten(0, 1)
                block = J_i @ J_j.T
                G[rows[i], rows[j]] = block
                G[rows[j], rows[i]] = block.T
        return G

    def assembly_parts(self):
        """As :meth:`_Operator.assembly_parts`: blocks J_i, J_j of the Gram matrix,
        or with the layerwise kernel a chunk's rows of it and their pieces."""
        rows = self.jacobian.block_samples * self.n_outputs
        if self.structured is None:
            return [("Jacobian blocks", (2, rows, self.n_params))]
        return [("kernel row blocks", (2, rows, self.size))]

    def dense_parts(self, gram_held):
        """As :meth:`_Operator.dense_parts`. Function space assembles s·G (a copy of
        G), then with a curvature Λ^½ (s·G) Λ^½ (an intermediate and the result), and
        factors it; the Gram matrix G is freed meanwhile unless the caller holds it."""
        d = (self.size, self.size)
        parts = [("the system (then its Cholesky factor, in place)", d)]
        if self.root is not None:  # s·G, then Λ^½ (s·G) and the system
            parts = [("s·J Jᵀ", d), ("the curvature products", (2, *d))]
        if gram_held:
            parts.insert(0, ("the Gram matrix J Jᵀ", d))
        return parts + self.assembly_parts() + self.cache_parts()

    def psd_dense(self, gram=None):
        """P = s·Λ^½ G Λ^½ assembled, shape (n·k, n·k), from ``gram`` = G if given:
        block (i, j) is Λ_i^½ K_ij Λ_j^½."""
        K = self.prior * (self.gram_dense() if gram is None else gram)
        if self.root is None:
            return K
        n, k = self.root.shape[:2]
        P = torch.einsum("iab,ibjc,jcd->iajd", self.root, K.reshape(n, k, n, k), self.root)
        return P.reshape(self.size, self.size)

    def test_kernels(self, X, mode):
        """Prior kernel at test inputs X and its cross kernel with the training set.

        Parameters
        ----------
        X : torch.Tensor of shape (m, ...)
        mode : {"diagonal", "blocks", "full"}
            Which part of the prior kernel to return.

        Returns
        -------
        prior : torch.Tensor of shape (m·k,), (m, k, k) or (m·k, m·k)
            s·J* J*ᵀ: its diagonal, its (k, k) block per test point, or all of it.
        cross : torch.Tensor of shape (n·k, m·k)
            s·Λ^½ J J*ᵀ.
        """
        m, k = X.shape[0], self.n_outputs
        if self.structured is not None:
            features = self.structured.features(X)
            cross = self.structured.cross(features)
            if mode == "diagonal":
                prior = self.structured.diagonal(features)
            else:
                prior = self.structured.gram(features, features)
                if mode == "blocks":
                    prior = torch.einsum("iaib->iab", prior.reshape(m, k, m, k))
            return self.prior * prior, self.curve(self.prior * cross)
        Jt = self.test_jacobian(X)
        if mode == "diagonal":
            prior = (Jt**2).sum(1)
        elif mode == "blocks":  # m·k²·p, not the (m·k)²·p of all of J* J*ᵀ
            rows = Jt.reshape(m, k, -1)
            prior = torch.einsum("iap,ibp->iab", rows, rows)
        else:
            prior = Jt @ Jt.T
        # J J*ᵀ from explicit training blocks: one matmul each, far faster than
        # m·k columns of Jacobian-vector products.
        blocks = self.jacobian.jacobian_blocks()
        cross = torch.cat([J.flatten(0, 1) @ Jt.T for _, J in blocks])
        return self.prior * prior, self.curve(self.prior * cross)
