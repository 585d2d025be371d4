"""Matrix-free log evidence of the linearized-network GP, for problems too large for
a dense factor: log|K| by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017;
Gardner et al. 2018), rᵀK⁻¹r by conjugate gradient, with products by K only.

Notation as in :mod:`.evidence`: r = y - m(X) flattened to d = n·k, σ² the noise
variance, K = s·J Jᵀ + σ² I.
"""

import math
from typing import NamedTuple

from .._linalg.cg import CGResult, conjugate_gradient
from .._linalg.lanczos import stochastic_log_det

__all__ = ["StochasticEvidence", "stochastic_log_marginal_likelihood"]


class StochasticEvidence(NamedTuple):
    """Result of :func:`stochastic_log_marginal_likelihood`.

    Attributes
    ----------
    log_marginal_likelihood : float
        The estimate of log p(y).
    log_det_std_error : float
        Standard error of the log|K| estimate over the probes (that of the log
        evidence is half of it).
    log_det : float
        The stochastic Lanczos quadrature estimate of log|K|.
    quadratic : float
        rᵀK⁻¹r by conjugate gradient.
    solve : CGResult
        That solve's report.
    quadrature_gap : float
        Half the log-determinant's Gauss-Radau gap (``LogDetEstimate``): in nats, a
        bound of the log evidence's quadrature error (the probes' aside).
    """

    log_marginal_likelihood: float
    log_det_std_error: float
    log_det: float
    quadratic: float
    solve: CGResult
    quadrature_gap: float


def stochastic_log_marginal_likelihood(
    matmat,
    residuals,
    size,
    noise,
    *,
    n_probes=32,
    lanczos_steps=50,
    tol=1e-6,
    generator=None,
):
    """Matrix-free estimate of log p(y) = -½ rᵀK⁻¹r - ½ log|K| - (d/2) log 2π.

    log|K| by stochastic Lanczos quadrature (:func:`stochastic_log_det`), rᵀK⁻¹r by
    conjugate gradient.

    Parameters
    ----------
    matmat : callable
        ``matmat(V) -> K V`` for V of shape (d, m), K = s·J Jᵀ + σ² I.
    residuals : torch.Tensor of shape (d,) or (n, k)
        r, flattened row-major to d.
    size : int
        d = n·k.
    noise : float
        σ², the smallest eigenvalue K can have: Ritz values are clamped to it.
    n_probes : int, default=32
        Rademacher probes (at least 2, for the standard error).
    lanczos_steps : int, default=50
        Lanczos steps per probe (quadrature nodes), at least 1.
    tol : float, default=1e-6
        Relative residual at which CG stops. The CG value of rᵀK⁻¹r converges
        faster than the residual: its relative error is at most about tol²·cond(K).
    generator : torch.Generator or None, default=None
        Draws the probes.

    Returns
    -------
    StochasticEvidence

    Notes
    -----
    Memory is O(d · lanczos_steps · n_probes) for the Lanczos bases; cost is
    lanczos_steps products with n_probes columns plus the CG iterations.
    """
    r = residuals.reshape(-1)
    if r.numel() != size:
        raise ValueError(f"residuals have {r.numel()} entries, expected size={size}.")
    estimate = stochastic_log_det(
        matmat,
        size,
        noise,
        dtype=r.dtype,
        device=r.device,
        n_probes=n_probes,
        steps=lanczos_steps,
        generator=generator,
    )
    solve = conjugate_gradient(matmat, r, tol=tol, verify=True)
    quadratic = float(r @ solve.solution)
    log_det = estimate.log_det
    value = -0.5 * quadratic - 0.5 * log_det - 0.5 * size * math.log(2 * math.pi)
    return StochasticEvidence(
        value, estimate.std_error, log_det, quadratic, solve, estimate.quadrature_gap / 2
    )
