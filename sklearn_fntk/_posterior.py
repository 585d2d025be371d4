"""Exact Gaussian posterior of the linearized network, in function or parameter space.

Notation as in DESIGN.md §1: r = y - m(X) the training residuals (n, k) flattened to
n·k, s the prior variance, σ² the noise variance, K = s·J Jᵀ + σ² I and
A = Jᵀ J + (σ²/s) I.

    δ = s·Jᵀ K⁻¹ r = A⁻¹ Jᵀ r                              (push-through identity)
    cov(x*) = s·J* J*ᵀ - s²·(J Jᵀ*)ᵀ K⁻¹ (J J*ᵀ) = σ²·J* A⁻¹ J*ᵀ   (Woodbury)
    log p(y) = -½ rᵀK⁻¹r - ½ log|K| - (n·k/2) log 2π, where in parameter space
        rᵀK⁻¹r = (rᵀr - (Jᵀr)ᵀ δ) / σ²,
        log|K| = n·k·log σ² + p·log(s/σ²) + log|A|     (matrix determinant lemma)

Solves go through a Cholesky factor (``solver="dense"``) or batched preconditioned CG.
"""

import math

import torch

from ._cg import conjugate_gradient
from ._memory import check_fits
from ._operators import KernelOperator, ParameterOperator
from ._preconditioners import JacobiPreconditioner

__all__ = ["GaussianPosterior"]


def cholesky(matrix, what):
    """Lower Cholesky factor, with an actionable error when it breaks down."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise ValueError(
            f"The {what} is not numerically positive definite in {matrix.dtype}; "
            "increase noise, lower prior, or use dtype='float64'."
        )
    return factor


class GaussianPosterior:
    """Posterior over δ = w - θ given Gaussian observations of the linearized network.

    Parameters
    ----------
    jacobian : JacobianProducts
        Products with J over the training inputs.
    residuals : torch.Tensor of shape (n, k)
    prior, noise : float
    space : {"function", "parameter"}
    solver : {"dense", "cg"}
    preconditioner : {None, "jacobi"}
    fisher_product : {"exact", "finite_difference"}
        How the parameter-space operator multiplies by JᵀJ.
    tol : float
    max_iter : int or None
    callback : CGProgress or None
        Passed to CG during the fit solve, then closed.

    Attributes
    ----------
    delta : torch.Tensor of shape (p,)
        Posterior mean of w - θ.
    n_iter : int
        CG iterations of the fit solve (1 for the dense solver: one direct solve).
    residual_norm : float
        Final relative CG residual (0 for the dense solver).
    """

    def __init__(
        self,
        jacobian,
        residuals,
        *,
        prior,
        noise,
        space,
        solver,
        preconditioner=None,
        fisher_product="exact",
        tol=1e-6,
        max_iter=None,
        callback=None,
    ):
        self.prior, self.noise, self.space, self.solver = prior, noise, space, solver
        self.tol, self.max_iter, self.callback = tol, max_iter, callback
        if space == "function":
            self.operator = KernelOperator(jacobian, prior=prior, noise=noise)
        else:
            self.operator = ParameterOperator(
                jacobian, prior=prior, noise=noise, fisher_product=fisher_product
            )
        self.residuals = residuals.reshape(-1)
        self._factor = None
        self._preconditioner = None
        if solver == "dense":
            self._factor = self._dense_factor()
        elif preconditioner == "jacobi":
            self._preconditioner = JacobiPreconditioner(self.operator.diagonal())

        if space == "function":
            # α = K⁻¹ r ; δ = s·Jᵀ α
            self._rhs = self.residuals
            self._solution, self.n_iter, self.residual_norm = self._solve_fit(self._rhs)
            shape = residuals.shape
            self.delta = prior * jacobian.vjp(self._solution.reshape(shape))
        else:
            # δ = A⁻¹ Jᵀ r
            self._rhs = jacobian.vjp(residuals)
            self._solution, self.n_iter, self.residual_norm = self._solve_fit(self._rhs)
            self.delta = self._solution
        if self.callback is not None:  # progress reporting is for the fit solve only
            self.callback.close()
            self.callback = None

    def _dense_factor(self):
        """Cholesky factor of the assembled operator, after checking it fits."""
        size, jacobian = self.operator.size, self.operator.jacobian
        check_fits(
            (size, size),
            jacobian.w.dtype,
            jacobian.w.device,
            f"The dense {self.space}-space system",
            "use solver='cg', or the smaller space (space='auto')",
        )
        return cholesky(self.operator.dense(), f"{self.space}-space system")

    def _solve_fit(self, rhs):
        if self._factor is not None:
            return self.solve(rhs), 1, 0.0
        result = self._cg(rhs)
        return result.solution, int(result.n_iter.max()), float(result.residual_norms.max())

    def _cg(self, B):
        return conjugate_gradient(
            self.operator.matmat,
            B,
            preconditioner=self._preconditioner,
            tol=self.tol,
            max_iter=self.max_iter,
            callback=self.callback,
        )

    def solve(self, B):
        """(operator)⁻¹ B for B of shape (d,) or (d, m)."""
        if self._factor is None:
            return self._cg(B).solution
        column = B.reshape(B.shape[0], -1)
        return torch.cholesky_solve(column, self._factor).reshape(B.shape)

    def covariance(self, Jt, diagonal):
        """Posterior covariance of the latent outputs J* δ.

        Parameters
        ----------
        Jt : torch.Tensor of shape (m, p)
            Rows of the test Jacobian (test points times outputs, flattened).
        diagonal : bool
            Return only the variances, shape (m,); otherwise the (m, m) matrix.
        """

        def combine(a, b):
            return (a * b).sum(0) if diagonal else a.T @ b

        if self.space == "parameter":
            # σ²·J* A⁻¹ J*ᵀ
            return self.noise * combine(Jt.T, self.solve(Jt.T))
        # s·J* J*ᵀ - (s·J J*ᵀ)ᵀ K⁻¹ (s·J J*ᵀ)
        cross = self.operator.cross(Jt)
        return self.prior * combine(Jt.T, Jt.T) - combine(cross, self.solve(cross))

    def log_marginal_likelihood(self):
        """log p(y) at this prior and noise; exact (uses a Cholesky factor).

        After a CG fit the factor of the same space is assembled here, once.
        """
        if self._factor is None:
            self._factor = self._dense_factor()
        r, d = self.residuals, self.residuals.numel()
        log_det_factor = 2.0 * torch.log(self._factor.diagonal()).sum()
        if self.space == "function":
            quadratic = r @ self._solution
            log_det = log_det_factor
        else:
            quadratic = (r @ r - self._rhs @ self._solution) / self.noise
            p = self.operator.size
            log_det = (
                d * math.log(self.noise)
                + p * math.log(self.prior / self.noise)
                + log_det_factor
            )
        return float(-0.5 * quadratic - 0.5 * log_det - 0.5 * d * math.log(2 * math.pi))
