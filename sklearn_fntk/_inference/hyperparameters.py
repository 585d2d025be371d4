"""Noise and prior variances by the evidence, with a weak hyperprior on the noise.

``noise="auto"`` and ``prior="auto"`` maximise

    log p(y | σ², s) + log p(σ²)

over the variances set to "auto" (the others stay fixed), by L-BFGS-B on their
logarithms from a start tied to the data's scale and the best points of a grid. The evidence
comes from :class:`SpectralEvidence`, exact (one eigendecomposition) or a Lanczos
quadrature (matrix-free), which give it and its gradient for any pair at O(m) cost.

The hyperprior. With more parameters than points the kernel s·J Jᵀ can interpolate
the residuals: as σ² → 0 both rᵀK⁻¹r and log|K| stay finite, so the evidence reaches
a plateau instead of a maximum, and on tiny data sets the plain maximum sits at the
lower bound of σ² (an interpolating GP with overconfident intervals). An
inverse-gamma density on σ² whose mode (in log σ²) is ``NOISE_MODE`` times the mean
squared residual v = ‖y - m(X)‖²/d,

    log p(a) = -α a - α·μ·e^(-a) + const,    a = log σ², μ the mode,

falls off like exp(-α·μ/σ²) below μ and only linearly (α per unit of log σ²) above
it: it picks a point on the plateau without overriding an evidence that has a
maximum. Its shape α = ``NOISE_SHAPE`` and mode were chosen by measurement
(``benchmarks/noise_hyperprior.py``; see docs/benchmarks.rst).

The predictive: a Student-t. With both variances fitted, write the prior as
s = λ·σ²: the model is then Bayesian linear regression with a normal-inverse-gamma
prior, w - θ | σ² ~ N(0, λσ² I), σ² ~ IG(α, β), β = α·μ, and K = σ²·C(λ) with
C(λ) = λ J Jᵀ + I. Given λ, σ² is conjugate: with d observations and
q(λ) = rᵀC(λ)⁻¹r, its posterior is IG(α + d/2, β + q/2), and the maximum of
log p(y | σ², λσ²) + log p(σ²) over a = log σ² is at σ² = (β + q/2)/(α + d/2),
where the objective is -(α + d/2)·log(β + q/2) - ½ log|C(λ)| + const: the
σ²-integrated evidence log p(y | λ) up to a constant. So the maximiser (σ̂², ŝ)
gives the type-II maximum-likelihood λ̂ = ŝ/σ̂² of the model with σ² integrated
out, and σ̂² the mode (in log σ²) of σ²'s posterior; the predictive of that model
(noise included or not) is a Student-t with ν = 2α + d degrees of freedom, centred
on the Gaussian plug-in's mean, with the plug-in's std as its scale, hence with
variance ν/(ν - 2) times the plug-in's (:attr:`EvidenceOptimum.degrees_of_freedom`).
The factor is 1.4 at d = 5 and 1.05 at d = 40: it widens the intervals where σ²
(and with it s) are fitted on few points, whose scale the plug-in underestimates
(``benchmarks/noise_hyperprior.py``). With one variance fixed the model is not
conjugate and the predictive stays the Gaussian plug-in (ν = ∞).
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.optimize import minimize

__all__ = [
    "EvidenceOptimum",
    "InverseGammaNoise",
    "default_noise_hyperprior",
    "fit_hyperparameters",
    "maximize_evidence",
    "student_t_variance_factor",
]

# The default hyperprior on σ² (see the module docstring): shape, and mode relative
# to the mean squared residual.
NOISE_SHAPE = 1.0
NOISE_MODE = 1e-2
# Search bounds relative to the data's scale: σ² in v·[1e-10, 1e3], s in
# v/κ·[1e-10, 1e5], with v the mean squared residual and κ the mean diagonal of J Jᵀ.
NOISE_BOUNDS = (1e-10, 1e3)
PRIOR_BOUNDS = (1e-10, 1e5)
# Points per fitted variance of the grid that picks the restarts.
GRID_POINTS = 9
# L-BFGS-B's gradient tolerance (in nats per unit of log variance), and the gradient
# below which a stalled line search still counts as converged.
GRADIENT_TOL = 1e-8
STATIONARY_GRADIENT = 1e-3


class EvidenceOptimum(NamedTuple):
    """Result of :func:`maximize_evidence`.

    Attributes
    ----------
    noise, prior : float
        The maximiser (σ², s).
    log_marginal_likelihood : float
        log p(y | σ², s) there.
    log_hyperprior : float
        log p(σ²) there (0 without a hyperprior).
    converged : bool
        Whether L-BFGS-B reported success for the best start.
    bounds_hit : tuple of str
        The search bounds where a fitted variance ended: "noise lower",
        "noise upper", "prior lower", "prior upper".
    degrees_of_freedom : float
        ν of the Student-t predictive (see the module docstring): 2α + d when both
        variances are fitted with an :class:`InverseGammaNoise` hyperprior, else
        ∞ (the Gaussian plug-in).
    """

    noise: float
    prior: float
    log_marginal_likelihood: float
    log_hyperprior: float
    converged: bool
    bounds_hit: tuple
    degrees_of_freedom: float = math.inf


@dataclass(frozen=True)
class InverseGammaNoise:
    """Inverse-gamma hyperprior on the noise variance σ².

    Parameters
    ----------
    shape : float
        α > 0.
    mode : float
        μ > 0, the mode of the density of log σ² (the scale is β = α·μ).
    """

    shape: float
    mode: float

    def degrees_of_freedom(self, n_observations):
        """ν = 2α + d of the Student-t predictive after d observations."""
        return 2.0 * self.shape + n_observations

    def __call__(self, log_noise):
        """log p(σ²) as a density of a = log σ², and its derivative in a."""
        alpha, beta = self.shape, self.shape * self.mode
        decay = beta * math.exp(-log_noise)
        constant = alpha * math.log(beta) - math.lgamma(alpha)
        return constant - alpha * log_noise - decay, -alpha + decay


def default_noise_hyperprior(mean_squared_residual):
    """The default hyperprior for residuals of mean square v: mode ``NOISE_MODE``·v."""
    return InverseGammaNoise(NOISE_SHAPE, NOISE_MODE * mean_squared_residual)


def student_t_variance_factor(degrees_of_freedom):
    """ν/(ν - 2): the Student-t predictive's variance over its squared scale (1 for
    ν = ∞, the Gaussian plug-in)."""
    if math.isinf(degrees_of_freedom):
        return 1.0
    if degrees_of_freedom <= 2.0:
        return math.inf
    return degrees_of_freedom / (degrees_of_freedom - 2.0)


def maximize_evidence(
    evidence,
    start,
    *,
    fit=(True, True),
    bounds,
    hyperprior=None,
    n_restarts=2,
):
    """Maximise log p(y | σ², s) (+ log p(σ²)) over the variances that are fitted.

    Deterministic: besides ``start``, L-BFGS-B starts from the ``n_restarts`` best
    points of a log-spaced grid over the bounds (evaluating the evidence is cheap),
    so that the same data always give the same variances.

    Parameters
    ----------
    evidence : SpectralEvidence
        Any object with ``log_marginal_likelihood(noise, prior, eval_gradient)``.
    start : pair of float
        (σ², s): the first start of the fitted ones, the value of the fixed ones.
    fit : pair of bool, default=(True, True)
        Which of (σ², s) to fit.
    bounds : pair of (low, high) pairs
        Bounds on σ², then s (used for the fitted ones).
    hyperprior : callable or None, default=None
        ``hyperprior(log σ²) -> (log density, derivative)`` added to the objective.
    n_restarts : int, default=2
        Further starts: the best points of a grid of ``GRID_POINTS`` per fitted
        variance.

    Returns
    -------
    EvidenceOptimum
        The best of all starts.
    """
    free = np.flatnonzero(fit)
    log_bounds = np.log(np.asarray(bounds, dtype=np.float64))
    full = np.log(np.asarray(start, dtype=np.float64))

    def unpack(x):
        point = full.copy()
        point[free] = x
        return point

    def terms(point):
        value, gradient = evidence.log_marginal_likelihood(
            math.exp(point[0]), math.exp(point[1]), eval_gradient=True
        )
        prior_value, prior_gradient = (
            (0.0, 0.0) if hyperprior is None else hyperprior(point[0])
        )
        gradient = gradient.copy()
        gradient[0] += prior_gradient
        return value, prior_value, gradient

    def objective(x):
        value, prior_value, gradient = terms(unpack(x))
        return -(value + prior_value), -gradient[free]

    best_point, converged = full, True
    if free.size:
        low, high = log_bounds[free, 0], log_bounds[free, 1]
        axes = [np.linspace(lo, hi, GRID_POINTS) for lo, hi in zip(low, high, strict=True)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, free.size)
        grid_values = [objective(x)[0] for x in grid]
        starts = [np.clip(full[free], low, high)]
        starts += [grid[i] for i in np.argsort(grid_values)[:n_restarts]]
        best = None
        for x0 in starts:
            result = minimize(
                objective, x0, jac=True, method="L-BFGS-B", bounds=log_bounds[free],
                options={"ftol": 1e-12, "gtol": GRADIENT_TOL},
            )  # fmt: skip
            if best is None or result.fun < best.fun:
                best = result
        # a line search that stalls at rounding level next to a stationary point
        # has converged as well as the evidence's rounding allows
        stationary = np.max(np.abs(best.jac)) <= STATIONARY_GRADIENT
        best_point, converged = unpack(best.x), bool(best.success or stationary)
    value, prior_value, _ = terms(best_point)
    margin = 1e-6 * (log_bounds[:, 1] - log_bounds[:, 0])
    bounds_hit = tuple(
        f"{name} {side}"
        for i, name in enumerate(("noise", "prior"))
        for side, hit in (
            ("lower", best_point[i] <= log_bounds[i, 0] + margin[i]),
            ("upper", best_point[i] >= log_bounds[i, 1] - margin[i]),
        )
        if fit[i] and hit
    )
    noise, prior = (float(np.exp(best_point[i])) if fit[i] else start[i] for i in range(2))
    return EvidenceOptimum(
        float(noise), float(prior), float(value), float(prior_value), converged, bounds_hit
    )


def fit_hyperparameters(evidence, *, noise, prior, mean_squared_residual, hyperprior):
    """Resolve ``noise="auto"`` and ``prior="auto"`` by the evidence.

    The search is scale-free: it starts at σ² = 0.1·v and s = 0.9·v/κ (a prior
    variance of the latent outputs of 0.9·v) and searches σ² within
    v·``NOISE_BOUNDS`` and s within v/κ·``PRIOR_BOUNDS``, with v the mean squared
    residual and κ = tr(J Jᵀ)/d the mean kernel diagonal at s = 1.

    Parameters
    ----------
    evidence : SpectralEvidence
    noise, prior : float or "auto"
        A number is kept fixed.
    mean_squared_residual : float
        v = ‖y - m(X)‖²/d.
    hyperprior : callable, "default" or None
        On log σ² (see :func:`maximize_evidence`); "default":
        :func:`default_noise_hyperprior` of v. Used only when the noise is fitted.

    Returns
    -------
    EvidenceOptimum
        With the Student-t's ``degrees_of_freedom`` where both are fitted with an
        inverse-gamma hyperprior (d = ``evidence.size``).
    """
    tiny = np.finfo(np.float64).tiny
    if not math.isfinite(mean_squared_residual):
        raise FloatingPointError(
            "The mean squared residual y - m(X) overflows float64, so the evidence "
            "cannot be searched for noise and prior: rescale y (for example with "
            "TransformedTargetRegressor), or set noise and prior to numbers."
        )
    v = max(mean_squared_residual, tiny)
    kappa = max(evidence.mean_kernel_diagonal(), tiny)
    fit = (isinstance(noise, str), isinstance(prior, str))
    start = (0.1 * v if fit[0] else noise, 0.9 * v / kappa if fit[1] else prior)
    bounds = (
        (v * NOISE_BOUNDS[0], v * NOISE_BOUNDS[1]),
        (v / kappa * PRIOR_BOUNDS[0], v / kappa * PRIOR_BOUNDS[1]),
    )
    if hyperprior == "default":
        hyperprior = default_noise_hyperprior(v)
    best = maximize_evidence(
        evidence,
        start,
        fit=fit,
        bounds=bounds,
        hyperprior=hyperprior if fit[0] else None,
    )
    if all(fit) and isinstance(hyperprior, InverseGammaNoise):
        best = best._replace(
            degrees_of_freedom=hyperprior.degrees_of_freedom(evidence.size)
        )
    return best
