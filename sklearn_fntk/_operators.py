"""The two symmetric positive definite systems of the linearized-network GP.

With J the (n·k) x p Jacobian of the training outputs, s the prior variance and σ² the
noise variance, the posterior can be computed in either of two spaces:

- function space: K = s·J Jᵀ + σ² I, of size n·k (the finite-NTK Gram matrix plus
  noise, joint over the k outputs; vectors are (n, k) arrays flattened row-major);
- parameter space: A = Jᵀ J + (σ²/s) I, of size p (the Gauss-Newton / Fisher matrix of
  the Gaussian likelihood plus the prior, scaled by σ²).

Both are P + μ I with P positive semidefinite and μ > 0 the ``shift``. Each operator
implements products with P (``psd_matmat``), its diagonal, and, for small problems,
its dense assembly; ``matmat`` adds the shift. As in curvlinops, nothing else.
"""

import torch

from ._jacobian import block_rows, explicit_jacobian

__all__ = ["KernelOperator", "ParameterOperator"]


class _Operator:
    """A = P + shift·I: shapes, the shifted product and diagonal."""

    def __init__(self, jacobian, *, prior, noise):
        self.jacobian, self.prior, self.noise = jacobian, prior, noise
        self.n_samples, self.n_outputs = jacobian.n_samples, jacobian.n_outputs
        self.n_params = jacobian.n_params

    def matmat(self, V):
        """A V for V of shape (d, m)."""
        return self.psd_matmat(V) + self.shift * V

    def diagonal(self):
        """diag A, shape (d,)."""
        return self.psd_diagonal() + self.shift

    def dense(self, gram=None):
        """A assembled, shape (d, d), from ``gram`` (J Jᵀ or JᵀJ) if given."""
        A = self.psd_dense() if gram is None else self.gram_scale * gram
        A.diagonal().add_(self.shift)
        return A

    def psd_dense(self):
        """P assembled, shape (d, d)."""
        return self.gram_scale * self.gram_dense()

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


class KernelOperator(_Operator):
    """K = s·J Jᵀ + σ² I on vectors of length n·k (function space).

    Parameters
    ----------
    jacobian : JacobianProducts
    prior, noise : float
    structured : LayerwiseKernel or None
        Exact per-layer kernel of a Linear/elementwise network; when given, every
        product with J Jᵀ, its diagonal, columns and test kernels come from it.
    """

    def __init__(self, jacobian, *, prior, noise, structured=None):
        super().__init__(jacobian, prior=prior, noise=noise)
        self.structured = structured
        self.shift = noise
        self.gram_scale = prior  # P = s·G with G = J Jᵀ

    @property
    def size(self):
        return self.n_samples * self.n_outputs

    def psd_matmat(self, U):
        """s·J Jᵀ U for U of shape (n·k, m): a VJP then a JVP, or per-layer matmuls."""
        if self.structured is not None:
            return self.prior * self.structured.matmat(U)
        shape = (self.n_samples, self.n_outputs, U.shape[1])
        JtU = self.jacobian.vjp(U.reshape(shape))
        return self.prior * self.jacobian.jvp(JtU).reshape(U.shape)

    def psd_diagonal(self):
        """s·Σ_p J[i, p]², shape (n·k,)."""
        if self.structured is not None:
            return self.prior * self.structured.diagonal()
        blocks = self.jacobian.jacobian_blocks()
        return self.prior * torch.cat([(J**2).sum(-1).reshape(-1) for _, J in blocks])

    def column(self, index):
        """Column ``index`` of s·J Jᵀ, shape (n·k,)."""
        if self.structured is not None:
            return self.prior * self.structured.column(index)
        unit = self.jacobian.w.new_zeros(self.size, 1)
        unit[index] = 1.0
        return self.psd_matmat(unit)[:, 0]

    def gram_dense(self):
        """G = J Jᵀ from explicit Jacobian blocks: block (i, j) is J_i J_jᵀ."""
        if self.structured is not None:
            return self.structured.dense()
        chunks, k = self.jacobian.chunks, self.n_outputs
        rows = [slice(c.start * k, c.stop * k) for c in chunks]
        K = self.jacobian.w.new_empty(self.size, self.size)
        for i, chunk_i in enumerate(chunks):
            J_i = self.jacobian.jacobian(chunk_i).flatten(0, 1)
            for j in range(i + 1):
                J_j = J_i if j == i else self.jacobian.jacobian(chunks[j]).flatten(0, 1)
                block = J_i @ J_j.T
                K[rows[i], rows[j]] = block
                K[rows[j], rows[i]] = block.T
        return K

    def test_kernels(self, X, diagonal):
        """Prior kernel at test inputs X and its cross kernel with the training set.

        Returns
        -------
        prior : torch.Tensor of shape (m·k,) if ``diagonal`` else (m·k, m·k)
            s·J* J*ᵀ (or its diagonal).
        cross : torch.Tensor of shape (n·k, m·k)
            s·J J*ᵀ.
        """
        if self.structured is not None:
            features = self.structured.features(X)
            cross = self.structured.cross(features)
            if diagonal:
                prior = self.structured.diagonal(features)
            else:
                prior = self.structured.gram(features, features)
            return self.prior * prior, self.prior * cross
        Jt = self.test_jacobian(X)
        prior = (Jt**2).sum(1) if diagonal else Jt @ Jt.T
        # J J*ᵀ from explicit training blocks: one matmul each, far faster than
        # m·k columns of Jacobian-vector products.
        blocks = self.jacobian.jacobian_blocks()
        cross = torch.cat([J.flatten(0, 1) @ Jt.T for _, J in blocks])
        return self.prior * prior, self.prior * cross


class ParameterOperator(_Operator):
    """A = Jᵀ J + (σ²/s) I on p-vectors (parameter space).

    ``fisher_product="finite_difference"`` replaces the exact JᵀJ v (JVP then VJP)
    by the finite-difference form (:meth:`JacobianProducts.fisher_product_fd`): an
    O(√ε) relative error traded for one plain forward and backward pass. It applies
    to products with few columns (the CG iterations).
    """

    def __init__(self, jacobian, *, prior, noise, fisher_product="exact"):
        super().__init__(jacobian, prior=prior, noise=noise)
        self.fisher_product = fisher_product
        self.shift = noise / prior
        self.gram_scale = 1.0  # P = JᵀJ

    @property
    def size(self):
        return self.n_params

    def subsampled(self, n_samples, generator=None):
        """The operator of the Fisher over ``n_samples`` random training samples,
        scaled to be an unbiased estimate of this one's (see
        :meth:`JacobianProducts.subsample`); ``self`` when that is all of them."""
        if n_samples >= self.n_samples:
            return self
        _, products = self.jacobian.subsample(n_samples, generator)
        return ParameterOperator(
            products,
            prior=self.prior,
            noise=self.noise,
            fisher_product=self.fisher_product,
        )

    def psd_matmat(self, V):
        """Jᵀ J V for V of shape (p, m): Fisher-vector products (see
        :meth:`JacobianProducts.fisher_product`; blocks of many columns, such as
        sketches, are exact even with ``fisher_product="finite_difference"``)."""
        finite_difference = self.fisher_product == "finite_difference"
        return self.jacobian.fisher_product(V, finite_difference=finite_difference)

    def psd_diagonal(self):
        """Σ_(i,k) J[i, k, p]², shape (p,)."""
        return sum((J**2).sum((0, 1)) for _, J in self.jacobian.jacobian_blocks())

    def gram_dense(self):
        """JᵀJ = Σ_chunks J_cᵀ J_c from explicit Jacobian blocks."""
        blocks = (J.flatten(0, 1) for _, J in self.jacobian.jacobian_blocks())
        return sum(J.T @ J for J in blocks)
