"""Batched preconditioned conjugate gradient for symmetric positive definite operators.

Solves A X = B for several right-hand sides at once (the columns of B). Each column
runs its own CG recurrence (its own step sizes) and stops on its own once its relative
residual ‖b - A x‖ / ‖b‖ falls to ``tol``; only the columns still running are passed
to the operator, so finished columns cost nothing. Follows scipy.sparse.linalg.cg's
structure: setup apart from the loop, explicit stopping rules, and a result that says
what happened: the solver reports, and its caller decides what to warn about.

The residual that CG updates by its recurrence, r ← r - αAp, drifts away from the
true residual b - A x in finite precision (Greenbaum 1997, ch. 4; most in float32 on
ill-conditioned systems), so a column can meet the stopping rule by its recurrence
while its iterate does not. With ``verify=True`` the true residuals are recomputed at
the end (one more product); a column whose true residual misses the rule by more than
``DRIFT_MARGIN`` restarts from it (at most ``MAX_RESTARTS`` times) and is reported
unconverged if it still misses.
"""

from dataclasses import dataclass

import torch

__all__ = ["CGResult", "conjugate_gradient", "iteration_limit"]

# A true residual up to this factor above the stopping rule's counts as converged.
DRIFT_MARGIN = 2.0
# Restarts from the true residual before a drifted column is reported unconverged.
MAX_RESTARTS = 2


@dataclass
class CGResult:
    """Outcome of :func:`conjugate_gradient`.

    Attributes
    ----------
    solution : torch.Tensor of shape (d, m)
    n_iter : torch.Tensor of shape (m,)
        Iterations each column ran (restarts included).
    residual_norms : torch.Tensor of shape (m,)
        Final relative residuals ‖b - A x‖ / ‖b‖ (from the CG recurrence).
    converged : torch.Tensor of shape (m,), bool
        Whether a column met the stopping rule (with ``verify``: its true residual,
        within ``DRIFT_MARGIN``).
    max_iter : int
        The iteration limit the solve ran under.
    true_residual_norms : torch.Tensor of shape (m,) or None
        ‖b - A x‖ / ‖b‖ recomputed from the returned iterate (``verify=True``), else
        None.
    drifted : torch.Tensor of shape (m,), bool, or None
        Columns whose recurrence met the stopping rule but whose true residual did
        not, even after ``MAX_RESTARTS`` restarts (``verify=True``), else None.
    restarts : int
        Restarts from the true residual.
    """

    solution: torch.Tensor
    n_iter: torch.Tensor
    residual_norms: torch.Tensor
    converged: torch.Tensor
    max_iter: int
    true_residual_norms: torch.Tensor | None = None
    drifted: torch.Tensor | None = None
    restarts: int = 0

    @property
    def all_converged(self):
        """Whether every column met the stopping rule."""
        return bool(self.converged.all())

    @property
    def any_drifted(self):
        """Whether a column's recurrence claimed a convergence its iterate lacks."""
        return self.drifted is not None and bool(self.drifted.any())


def iteration_limit(max_iter, size):
    """CG's iteration limit per column: ``max_iter``, or 10·``size`` for None."""
    return 10 * size if max_iter is None else max_iter


def conjugate_gradient(
    matmat,
    B,
    *,
    preconditioner=None,
    tol=1e-6,
    max_iter=None,
    callback=None,
    stop=None,
    verify=False,
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
        Iteration limit per column; None means 10·d, as scipy's cg (exact arithmetic
        converges in d iterations; rounding slows ill-conditioned systems down).
    callback : callable or None
        Called as ``callback(iteration, residual_norms)`` after every iteration with
        the relative residuals of the columns that were still running.
    stop : callable or None
        A stopping rule in place of the relative residual's: ``stop(X, R, columns)``
        gets the iterates and residuals of the columns ``columns`` (an index tensor)
        and returns a bool tensor, True where a column is done. None: ‖r‖/‖b‖ ≤ tol.
    verify : bool, default=False
        Recompute the true residuals B - A X at the end (one more product) and
        restart, then report unconverged, the columns whose recurrence drifted (see
        the module docstring). The estimators always verify.

    Returns
    -------
    CGResult
        ``solution`` has the shape of B; ``converged`` says which columns met the
        stopping rule within ``max_iter`` iterations. Nothing is warned here.
    """
    vector = B.ndim == 1
    B = B.reshape(B.shape[0], -1)
    d, m = B.shape
    max_iter = iteration_limit(max_iter, d)
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
    n_iter = torch.zeros(m, dtype=torch.long, device=B.device)
    iteration = 0

    def done(columns, R_columns=None):
        """Which of ``columns`` meet the stopping rule, with their residuals
        ``R_columns`` (default: the recurrence's; X and R are gathered for a custom
        rule only: the default needs neither)."""
        if stop is None:
            if R_columns is None:
                return residual[columns] <= tol
            return torch.linalg.vector_norm(R_columns, dim=0) <= tol * b_norm[columns]
        if R_columns is None:
            R_columns = R[:, columns]
        return stop(X[:, columns], R_columns, columns)

    columns = torch.arange(m, device=B.device)
    active = columns[~done(columns)]
    true_residual = drifted = None
    restarts = 0
    while True:
        while active.numel() > 0:
            iteration += 1
            P_a, R_a = P[:, active], R[:, active]
            AP = matmat(P_a)
            # α = rᵀz / pᵀAp ; x ← x + αp ; r ← r - αAp
            alpha = rz[active] / (P_a * AP).sum(0)
            X[:, active] += alpha * P_a
            R_a = R_a - alpha * AP
            R[:, active] = R_a
            residual[active] = torch.linalg.vector_norm(R_a, dim=0) / b_norm[active]
            n_iter[active] += 1
            if callback is not None:
                callback(iteration, residual[active])
            # β = r'ᵀz' / rᵀz ; p ← z' + βp
            Z_a = precondition(R_a)
            rz_new = (R_a * Z_a).sum(0)
            P[:, active] = Z_a + (rz_new / rz[active]) * P_a
            rz[active] = rz_new
            active = active[~done(active) & (n_iter[active] < max_iter)]
        claimed = done(columns)
        if not verify:
            converged = claimed
            break
        # The true residuals: a column that met the rule by its recurrence must meet
        # it (within the margin) by B - A X too; else restart it from there.
        true_R = B - matmat(X)
        true_residual = torch.linalg.vector_norm(true_R, dim=0) / b_norm
        drifted = claimed & ~done(columns, true_R / DRIFT_MARGIN)
        converged = claimed & ~drifted
        restart = columns[drifted & (n_iter < max_iter)]
        if restart.numel() == 0 or restarts == MAX_RESTARTS:
            break
        restarts += 1
        R[:, restart] = true_R[:, restart]
        residual[restart] = true_residual[restart]
        Z_r = precondition(R[:, restart])
        P[:, restart] = Z_r
        rz[restart] = (R[:, restart] * Z_r).sum(0)
        active = restart

    solution = X[:, 0] if vector else X
    return CGResult(
        solution, n_iter, residual, converged, max_iter, true_residual, drifted, restarts
    )
