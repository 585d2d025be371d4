"""Batched preconditioned conjugate gradient for symmetric positive definite operators.

Solves A X = B for several right-hand sides at once (the columns of B). Each column
runs its own CG recurrence (its own step sizes) and stops on its own once its relative
residual ‖b - A x‖ / ‖b‖ falls to ``tol``; only the columns still running are passed
to the operator, so finished columns cost nothing. Follows scipy.sparse.linalg.cg's
structure: setup apart from the loop, explicit stopping rules, and a result that says
what happened: the solver reports, and its caller decides what to warn about.
"""

from dataclasses import dataclass

import torch

__all__ = ["CGResult", "conjugate_gradient"]


@dataclass
class CGResult:
    """Outcome of :func:`conjugate_gradient`.

    Attributes
    ----------
    solution : torch.Tensor of shape (d, m)
    n_iter : torch.Tensor of shape (m,)
        Iterations each column ran.
    residual_norms : torch.Tensor of shape (m,)
        Final relative residuals ‖b - A x‖ / ‖b‖ (from the CG recurrence).
    converged : torch.Tensor of shape (m,), bool
    max_iter : int
        The iteration limit the solve ran under.
    """

    solution: torch.Tensor
    n_iter: torch.Tensor
    residual_norms: torch.Tensor
    converged: torch.Tensor
    max_iter: int

    @property
    def all_converged(self):
        """Whether every column met the stopping rule."""
        return bool(self.converged.all())


def conjugate_gradient(
    matmat, B, *, preconditioner=None, tol=1e-6, max_iter=None, callback=None, stop=None
):
    """Solve A X = B by preconditioned CG, column by column in one batch.

    Parameters
    ----------
    matmat : callable
        ``matmat(V) -> A V`` for V of shape (d, j), A symmetric positive definite.
    B : torch.Tensor of shape (d,) or (d, m)
    preconditioner : callable or None
        ``preconditioner(R) -> M R`` with M ≈ A⁻¹ symmetric positive definite.
    tol : float
        Relative residual at which a column stops.
    max_iter : int or None
        Iteration limit; None means 10·d, as scipy's cg (exact arithmetic converges
        in d iterations; rounding slows ill-conditioned systems down).
    callback : callable or None
        Called as ``callback(iteration, residual_norms)`` after every iteration with
        the relative residuals of the columns that were still running.
    stop : callable or None
        A stopping rule in place of the relative residual's: ``stop(X, R, columns)``
        gets the iterates and residuals of the columns ``columns`` (an index tensor)
        and returns a bool tensor, True where a column is done. None: ‖r‖/‖b‖ ≤ tol.

    Returns
    -------
    CGResult
        ``solution`` has the shape of B; ``converged`` says which columns met the
        stopping rule within ``max_iter`` iterations. Nothing is warned here.
    """
    vector = B.ndim == 1
    B = B.reshape(B.shape[0], -1)
    d, m = B.shape
    max_iter = 10 * d if max_iter is None else max_iter
    precondition = preconditioner if preconditioner is not None else (lambda R: R)

    # Setup: X₀ = 0, R₀ = B, Z₀ = M R₀, P₀ = Z₀.
    X = torch.zeros_like(B)
    R = B.clone()
    b_norm = torch.linalg.vector_norm(B, dim=0)
    b_norm = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
    residual = torch.linalg.vector_norm(R, dim=0) / b_norm
    Z = precondition(R)
    P = Z.clone()
    rz = (R * Z).sum(0)
    n_iter = torch.zeros(m, dtype=torch.long)

    def done(columns):
        """Which of ``columns`` meet the stopping rule (gathering X and R only for a
        custom rule: the default needs neither)."""
        if stop is None:
            return residual[columns] <= tol
        return stop(X[:, columns], R[:, columns], columns)

    columns = torch.arange(m, device=B.device)
    active = columns[~done(columns)]

    for iteration in range(1, max_iter + 1):
        if active.numel() == 0:
            break
        P_a, R_a = P[:, active], R[:, active]
        AP = matmat(P_a)
        # α = rᵀz / pᵀAp ; x ← x + αp ; r ← r - αAp
        alpha = rz[active] / (P_a * AP).sum(0)
        X[:, active] += alpha * P_a
        R_a = R_a - alpha * AP
        R[:, active] = R_a
        residual[active] = torch.linalg.vector_norm(R_a, dim=0) / b_norm[active]
        n_iter[active] = iteration
        if callback is not None:
            callback(iteration, residual[active])
        # β = r'ᵀz' / rᵀz ; p ← z' + βp
        Z_a = precondition(R_a)
        rz_new = (R_a * Z_a).sum(0)
        P[:, active] = Z_a + (rz_new / rz[active]) * P_a
        rz[active] = rz_new
        active = active[~done(active)]

    converged = done(columns)
    solution = X[:, 0] if vector else X
    return CGResult(solution, n_iter, residual, converged, max_iter)
