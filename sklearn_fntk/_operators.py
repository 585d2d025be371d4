"""The two symmetric positive definite systems of the linearized-network GP.

With J the (n·k) x p Jacobian of the training outputs, s the prior variance and σ² the
noise variance, the posterior can be computed in either of two spaces:

- function space: K = s·J Jᵀ + σ² I, of size n·k (the finite-NTK Gram matrix plus
  noise, joint over the k outputs; vectors are (n, k) arrays flattened row-major);
- parameter space: A = Jᵀ J + (σ²/s) I, of size p (the Gauss-Newton / Fisher matrix of
  the Gaussian likelihood plus the prior, scaled by σ²).

Each operator only implements products (``matmat``), its diagonal (for Jacobi
preconditioning) and, for small problems, its dense assembly from explicit Jacobian
blocks, as curvlinops' operators do.
"""

import torch

__all__ = ["KernelOperator", "ParameterOperator"]


class _Operator:
    """Shared shape, dtype and diagonal bookkeeping; subclasses define the products."""

    def __init__(self, jacobian, *, prior, noise):
        self.jacobian, self.prior, self.noise = jacobian, prior, noise
        self.n_samples, self.n_outputs = jacobian.n_samples, jacobian.n_outputs
        self.n_params = jacobian.n_params

    @property
    def dtype(self):
        return self.jacobian.w.dtype

    def __matmul__(self, V):
        return self.matmat(V)


class KernelOperator(_Operator):
    """K = s·J Jᵀ + σ² I on vectors of length n·k (function space)."""

    @property
    def size(self):
        return self.n_samples * self.n_outputs

    def matmat(self, U):
        """K U for U of shape (n·k, m): one VJP then one JVP, plus the noise term."""
        shape = (self.n_samples, self.n_outputs, U.shape[1])
        JtU = self.jacobian.vjp(U.reshape(shape))
        return self.prior * self.jacobian.jvp(JtU).reshape(U.shape) + self.noise * U

    def diagonal(self):
        """diag K = s·Σ_p J[i, p]² + σ², shape (n·k,)."""
        parts = [(J**2).sum(-1).reshape(-1) for _, J in self.jacobian.jacobian_blocks()]
        return self.prior * torch.cat(parts) + self.noise

    def dense(self):
        """K assembled from explicit Jacobian blocks: block (i, j) is s·J_i J_jᵀ."""
        chunks = self.jacobian.chunks
        rows = [slice(c.start * self.n_outputs, c.stop * self.n_outputs) for c in chunks]
        K = self.jacobian.w.new_empty(self.size, self.size)
        for i, chunk_i in enumerate(chunks):
            J_i = self.jacobian.jacobian(chunk_i).flatten(0, 1)
            for j in range(i + 1):
                J_j = J_i if j == i else self.jacobian.jacobian(chunks[j]).flatten(0, 1)
                block = self.prior * (J_i @ J_j.T)
                K[rows[i], rows[j]] = block
                K[rows[j], rows[i]] = block.T
        K.diagonal().add_(self.noise)
        return K

    def cross(self, Jt):
        """s·J J*ᵀ against test Jacobian rows Jt (m, p): shape (n·k, m)."""
        return self.prior * self.jacobian.jvp(Jt.T).reshape(self.size, -1)


class ParameterOperator(_Operator):
    """A = Jᵀ J + (σ²/s) I on p-vectors (parameter space).

    ``fisher_product="finite_difference"`` replaces the exact JᵀJ v (JVP then VJP)
    by the finite-difference form (:meth:`JacobianProducts.fisher_product_fd`): an
    O(√ε) relative error traded for one plain forward and backward pass.
    """

    def __init__(self, jacobian, *, prior, noise, fisher_product="exact"):
        super().__init__(jacobian, prior=prior, noise=noise)
        self.fisher_product = fisher_product

    @property
    def size(self):
        return self.n_params

    @property
    def ridge(self):
        return self.noise / self.prior

    def matmat(self, V):
        """A V for V of shape (p, m): one JVP then one VJP (a Fisher-vector product)."""
        if self.fisher_product == "finite_difference":
            return self.jacobian.fisher_product_fd(V) + self.ridge * V
        return self.jacobian.vjp(self.jacobian.jvp(V)) + self.ridge * V

    def diagonal(self):
        """diag A = Σ_(i,k) J[i, k, p]² + σ²/s, shape (p,)."""
        total = sum((J**2).sum((0, 1)) for _, J in self.jacobian.jacobian_blocks())
        return total + self.ridge

    def dense(self):
        """A = Σ_chunks J_cᵀ J_c + (σ²/s) I from explicit Jacobian blocks."""
        A = sum(
            J.flatten(0, 1).T @ J.flatten(0, 1) for _, J in self.jacobian.jacobian_blocks()
        )
        A.diagonal().add_(self.ridge)
        return A
