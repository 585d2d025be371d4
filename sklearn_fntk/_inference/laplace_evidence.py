"""Laplace approximation of the log marginal likelihood of the linearized softmax model.

Notation as in :mod:`.laplace`: δ = w - θ with prior N(0, s·I), logits F = m(X) + J δ,
L(δ) the negative log posterior of eq. (1) there (the weighted negative log
likelihood plus ‖δ‖²/(2s)), δ̂ its minimum, Λ = Λ(δ̂) the likelihood's curvature in
the logits (``Λ_i = v_i (diag(π_i) - π_i π_iᵀ)``) and H = JᵀΛJ + I/s. Laplace's
method around δ̂ (MacKay 1992; Rasmussen & Williams 2006, eq. 3.32) gives

    log p(y) ≈ log p(y | δ̂) + log N(δ̂; 0, s·I) + (p/2) log 2π - ½ log|H|
             = -L(δ̂) - ½ log|I_p + s·JᵀΛJ|                                          (1)
             = -L(δ̂) - ½ log|B|,       B = I_(nk) + s·Λ^½ J Jᵀ Λ^½                  (2)

((2) by the determinant lemma |I + UV| = |I + VU|). Parameter space factors H, so
log|I + s·JᵀΛJ| = p·log s + log|H|; function space factors B.

**Gradient** in t = log s, exact. δ̂ depends on s through ∇L(δ̂) = 0; by the implicit
function theorem dδ̂/dt = H⁻¹δ̂/s. Since ∇L(δ̂) = 0, only the explicit s in L counts,
∂L/∂t = -‖δ̂‖²/(2s). The log-determinant moves with s and, through δ̂, with Λ:

    dψ/dt = ‖δ̂‖²/(2s) - ½ τ - ½ Σ_i u_iᵀ c_i                                         (3)

with τ = tr(s·JᵀΛJ (I + s·JᵀΛJ)⁻¹) = p - tr(H⁻¹)/s = n·k - tr(B⁻¹), u = J H⁻¹δ̂/s the
logits' velocity, and, from dΛ_i = v_i (diag(q) - q π_iᵀ - π_i qᵀ) with q = Λ⁰_i u_i
(Λ⁰_i = diag(π_i) - π_i π_iᵀ, dπ_i = Λ⁰_i dF_i),

    tr(dΛ_i Σ_i) = u_iᵀ c_i,    c_i = v_i Λ⁰_i (diag(Σ_i) - 2 Σ_i π_i),              (4)

where Σ_i = J_i H⁻¹ J_iᵀ is the posterior covariance of training point i's logits
(the third derivative of the softmax likelihood, as in Rasmussen & Williams 2006,
eq. 5.23, for one logit). The same formulas hold for one logit (k = 1, a sigmoid).
With a dense solver every term is exact. With CG the log-determinant is estimated by
stochastic Lanczos quadrature (:func:`stochastic_log_det`) and the search over s uses
values only, with the same probes at every s (common random numbers).
"""

import math
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import brentq, minimize_scalar

from .._linalg.lanczos import growth_limit, stochastic_log_det
from .._linalg.memory import check_fits, usable_bytes
from .._linearize.jacobian import EXPLICIT_BLOCK_BYTES
from .operators import blockwise

__all__ = [
    "EvidenceSearch",
    "LaplaceEvidence",
    "laplace_evidence",
    "maximize_laplace_evidence",
    "training_covariances",
]

# Steps of the bracketing search, in log s; a factor of 10 per step.
_BRACKET_STEP = math.log(10.0)


class LaplaceEvidence(NamedTuple):
    """Result of :func:`laplace_evidence`.

    Attributes
    ----------
    log_marginal_likelihood : float
        Eq. (1).
    gradient : float or None
        d log p(y) / d log s, eq. (3); None where not computed.
    log_det : float
        log|I + s·JᵀΛJ| = log|B|.
    std_error : float
        Standard error of the log-determinant estimate (0 when exact); that of the
        log evidence is half of it.
    quadrature_gap : float
        Half the log-determinant's Gauss-Radau gap (``LogDetEstimate``): in nats, a
        bound of the log evidence's quadrature error (0 when exact).
    """

    log_marginal_likelihood: float
    gradient: float | None
    log_det: float
    std_error: float
    quadrature_gap: float = 0.0


def _log_det_dense(posterior):
    """log|I + s·JᵀΛJ| from the Cholesky factor of H (parameter) or B (function)."""
    factor = posterior.system.factor
    log_det = 2.0 * float(torch.log(factor.diagonal()).sum())
    if posterior.choices.space == "parameter":
        log_det += factor.shape[0] * math.log(posterior.prior)  # |I + sJᵀΛJ| = s^p |H|
    return log_det


def _log_det_stochastic(posterior, n_probes, lanczos_steps, generator, growth):
    """Stochastic Lanczos quadrature of log|I + s·JᵀΛJ| (or log|B|): both are ⪰ I,
    so the Gauss-Radau rule fixes a node at 1. ``growth``: ``gap`` and ``max_steps``
    of :func:`stochastic_log_det`, or None."""
    system, s = posterior.system, posterior.prior
    operator = system.operator
    if posterior.choices.space == "parameter":

        def matmat(V):  # s·H V = V + s·JᵀΛJ V
            return s * operator.matmat(V)

    else:
        matmat = operator.matmat
    w = posterior.delta
    return stochastic_log_det(
        matmat,
        system.size,
        1.0,
        dtype=w.dtype,
        device=w.device,
        n_probes=n_probes,
        steps=lanczos_steps,
        generator=generator,
        **(growth or {}),
    )


def _chunk_bytes(factor):
    """Bytes of one block of right-hand sides of a triangular solve with ``factor``:
    at most ``EXPLICIT_BLOCK_BYTES`` and an eighth of the factor, so that the
    evidence's solves add little to what the fit held (the memory guard's peak)."""
    return min(EXPLICIT_BLOCK_BYTES, factor.numel() * factor.element_size() // 8)


def _chunks(total, width, factor):
    """Ranges over ``total`` right-hand sides, in multiples of ``width`` (one training
    point's k columns), of at most :func:`_chunk_bytes` each."""
    column_bytes = factor.shape[0] * factor.element_size()
    step = max(1, _chunk_bytes(factor) // (column_bytes * width)) * width
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def _solve(factor, rhs):
    """L⁻¹ rhs for the lower-triangular factor L."""
    return torch.linalg.solve_triangular(factor, rhs, upper=False)


def _inverse_trace(factor):
    """tr(A⁻¹) = ‖L⁻¹‖²_F for A = L Lᵀ, solving for identity columns a block at a
    time (never L⁻¹ whole)."""
    d, total = factor.shape[0], 0.0
    for start, stop in _chunks(d, 1, factor):
        columns = factor.new_zeros(d, stop - start)
        columns[start:stop].fill_diagonal_(1.0)
        total += float(_solve(factor, columns).square_().sum())
    return total


def training_covariances(posterior):
    """Σ_i = J_i H⁻¹ J_iᵀ for every training point, shape (n, k, k), and
    τ = s·tr(JᵀΛJ (I + s·JᵀΛJ)⁻¹) of eq. (3), from the dense factor.

    Triangular solves a block of right-hand sides at a time (:func:`_chunks`): the
    factor, the Gram matrix (function space) and the explicit Jacobian blocks
    (parameter space) are what the fit held; the solves add a fraction of the factor.
    """
    factor, s = posterior.system.factor, posterior.prior
    inverse_trace = _inverse_trace(factor)
    covariances = []
    if posterior.choices.space == "parameter":
        for _, J in posterior.jacobian.jacobian_blocks():  # J: (b, k, p)
            b, k = J.shape[:2]
            for start, stop in _chunks(b, 1, factor):
                half = _solve(factor, J[start:stop].flatten(0, 1).T)  # L⁻¹ J_rᵀ
                half = half.reshape(-1, stop - start, k)
                covariances.append(torch.einsum("pia,pib->iab", half, half))
        return torch.cat(covariances), factor.shape[0] - inverse_trace / s
    # function space: Σ = K - K Λ^½ B⁻¹ Λ^½ K with K = s·G; only its diagonal blocks,
    # from the columns of K of a block of training points at a time
    root, gram = posterior.system.operator.root, posterior.gram
    n, k = root.shape[:2]
    for start, stop in _chunks(n * k, k, factor):
        K = s * gram[:, start:stop]  # (n·k, b·k)
        half = _solve(factor, blockwise(root, K.reshape(n, k, -1)).reshape(n * k, -1))
        half = half.reshape(n * k, -1, k)
        points = slice(start // k, stop // k)
        prior_blocks = torch.einsum("iaib->iab", K.reshape(n, k, -1, k)[points])
        covariances.append(prior_blocks - torch.einsum("dia,dib->iab", half, half))
    return torch.cat(covariances), n * k - inverse_trace


def _gradient(posterior):
    """d log p(y) / d log s, eq. (3), with the dense solver."""
    s, delta = posterior.prior, posterior.delta
    covariances, trace_term = training_covariances(posterior)
    probs = posterior.probs  # π_i over the network's k logits
    curvature = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]  # Λ⁰_i
    inner = covariances.diagonal(dim1=1, dim2=2) - 2 * torch.einsum(
        "iab,ib->ia", covariances, probs
    )
    c = posterior.weights[:, None] * torch.einsum("iab,ib->ia", curvature, inner)  # (4)
    velocity, _ = posterior.inverse(delta[:, None] / s)  # dδ̂/dt = H⁻¹δ̂/s
    u = posterior.jacobian.jvp(velocity[:, 0])
    velocity_term = posterior.jacobian.reduction.sum_float((u * c).sum())  # over shards
    return float(delta @ delta) / (2 * s) - 0.5 * trace_term - 0.5 * velocity_term


def laplace_evidence(
    posterior,
    *,
    gradient=False,
    n_probes=32,
    lanczos_steps=50,
    generator=None,
    gap_nats=None,
    basis_bytes=None,
    max_growth=1,
):
    """The Laplace log evidence, eq. (1), of a fitted :class:`LaplacePosterior`.

    Parameters
    ----------
    posterior : LaplacePosterior
        Fitted.
    gradient : bool, default=False
        Also compute d log p(y) / d log s, eq. (3) (dense solver only).
    n_probes, lanczos_steps : int, default=32, 50
        Rademacher probes and Lanczos steps of the stochastic log-determinant, used
        with the CG solver.
    generator : torch.Generator or None
        Draws the probes.
    gap_nats : float or None, default=None
        With CG: double the Lanczos steps while the log evidence's Gauss-Radau gap
        (``LaplaceEvidence.quadrature_gap``) exceeds this, up to ``max_growth``
        times ``lanczos_steps`` and Lanczos bases of ``basis_bytes`` bytes
        (n_probes x steps x size entries) within the memory left (the memory
        guard's share). None: ``lanczos_steps`` only.
    basis_bytes : int or None, default=None
    max_growth : int, default=1

    Returns
    -------
    LaplaceEvidence
    """
    dense = posterior.system.factor is not None
    if gradient and not dense:
        raise ValueError("The evidence's gradient needs the dense solver.")
    if dense:
        log_det, std_error, gap = _log_det_dense(posterior), 0.0, 0.0
    else:
        growth, w, size = None, posterior.delta, posterior.system.size
        bases = ("the log-determinant's Lanczos bases", (n_probes, lanczos_steps + 1, size))
        what = "The stochastic Laplace evidence (prior 'auto' with CG)"
        check_fits([bases], w.dtype, w.device, what, "set prior to a number")
        if gap_nats is not None:
            # a doubling holds the last bases and the new ones, 1.5 times the new
            usable = usable_bytes(w.device, posterior.jacobian.reduction) / 1.5
            max_steps = growth_limit(
                lanczos_steps, n_probes, size, w.element_size(),
                max_growth=max_growth, basis_bytes=int(min(basis_bytes or 0, usable)),
            )  # fmt: skip
            # log p = ... - ½ log|B|: a log-determinant gap of 2·gap_nats
            growth = dict(gap=2.0 * gap_nats, max_steps=max_steps)
        estimate = _log_det_stochastic(
            posterior, n_probes, lanczos_steps, generator, growth
        )
        log_det, std_error = estimate.log_det, estimate.std_error
        gap = 0.5 * estimate.quadrature_gap
    value = -posterior.objective - 0.5 * log_det
    slope = _gradient(posterior) if gradient else None
    return LaplaceEvidence(value, slope, log_det, std_error, gap)


class EvidenceSearch(NamedTuple):
    """Result of :func:`maximize_laplace_evidence`.

    Attributes
    ----------
    prior : float
        The maximiser s.
    posterior : LaplacePosterior
        Fitted at ``prior``.
    evidence : LaplaceEvidence
        There.
    n_evaluations : int
        Posteriors fitted during the search.
    at_bound : {"lower", "upper"} or None
        Which bound the maximum lies on, if any.
    """

    prior: float
    posterior: object
    evidence: LaplaceEvidence
    n_evaluations: int
    at_bound: str | None


def maximize_laplace_evidence(
    fit_at, *, start, bounds, exact, xtol, evidence_options, criterion=None
):
    """Maximise the Laplace evidence, or another criterion, over the prior variance s.

    With the dense solver (``exact``) the exact gradient (3) is bracketed in
    t = log s, stepping by a factor of 10 from ``start`` until its sign changes,
    then its root is found by Brent's method (``brentq``). With CG, or for a
    ``criterion``, values only (for the evidence, the same probes at every s): the
    bracket is a triple of steps whose middle is highest, refined by bounded Brent
    minimisation.

    Parameters
    ----------
    fit_at : callable
        ``fit_at(prior, start)`` returns a :class:`LaplacePosterior` fitted at
        ``prior`` with Newton's method started from ``start`` (a δ or None).
    start : float
        First s tried (clipped into ``bounds``).
    bounds : (float, float)
        Bounds on s.
    exact : bool
        Whether the posteriors use the dense solver.
    xtol : float
        Tolerance on t = log s.
    evidence_options : dict
        Keyword arguments of :func:`laplace_evidence` (``n_probes``,
        ``lanczos_steps``, and ``generator_seed``: a new generator with this seed
        draws the probes at every s).
    criterion : callable or None, default=None
        ``criterion(posterior)``, a float to maximise instead of the evidence (such
        as :func:`.laplace_loo.laplace_loo`); ``evidence`` of the result is then
        the evidence at the maximiser.

    Returns
    -------
    EvidenceSearch
    """
    low, high = math.log(bounds[0]), math.log(bounds[1])
    options = dict(evidence_options)
    seed = options.pop("generator_seed")
    cache = {}  # t -> (δ̂, LaplaceEvidence) of every prior tried
    # The last posterior fitted, and only it: a dense posterior holds a d×d factor,
    # and it is released before the next is fitted, so that the search's peak is
    # one fit's (what the memory guard checks), whatever the number of priors.
    held = {}

    def evaluate(t):
        t = float(np.clip(t, low, high))
        if t not in cache:
            nearest = min(cache, key=lambda u: abs(u - t), default=None)
            warm = None if nearest is None else cache[nearest][0]
            held.clear()
            posterior = fit_at(math.exp(t), warm)
            if criterion is not None:
                cache[t] = (posterior.delta, criterion(posterior))
            else:
                cache[t] = (posterior.delta, _evidence(posterior, exact, seed, options))
            held[t] = posterior
        return cache[t]

    def value(t):
        result = evaluate(t)[1]
        return result if criterion is not None else result.log_marginal_likelihood

    t0 = float(np.clip(math.log(start), low, high))
    if exact and criterion is None:
        t, at_bound = _bracket_root(lambda t: evaluate(t)[1].gradient, t0, low, high, xtol)
    else:
        t, at_bound = _bracket_maximum(value, t0, low, high, xtol)
    delta, result = evaluate(t)
    posterior = held.pop(t, None)
    if posterior is None:  # the maximiser was not the last prior tried: refit there,
        held.clear()  # from its MAP (Newton stops at once)
        posterior = fit_at(math.exp(t), delta)
    evidence = result
    if criterion is not None:
        evidence = _evidence(posterior, False, seed, options)
    return EvidenceSearch(math.exp(t), posterior, evidence, len(cache), at_bound)


def _evidence(posterior, gradient, seed, options):
    """:func:`laplace_evidence` with a new generator of ``seed`` (CG) and the
    gradient where asked (dense)."""
    generator = None
    if posterior.system.factor is None:
        generator = torch.Generator(device=posterior.delta.device)
        generator.manual_seed(seed)
    return laplace_evidence(posterior, gradient=gradient, generator=generator, **options)


def _bracket_root(slope, t0, low, high, xtol):
    """The root of ``slope`` (the evidence's gradient) in [low, high], or the bound it
    rises to."""
    g0 = slope(t0)
    direction = 1.0 if g0 > 0 else -1.0
    a, b = t0, t0
    while True:
        if (direction > 0 and b >= high) or (direction < 0 and b <= low):
            return b, "upper" if direction > 0 else "lower"
        a, b = b, float(np.clip(b + direction * _BRACKET_STEP, low, high))
        if slope(b) * direction <= 0:
            break
    root = brentq(slope, min(a, b), max(a, b), xtol=xtol, rtol=4 * np.finfo(float).eps)
    return root, None


def _bracket_maximum(value, t0, low, high, xtol):
    """The maximum of ``value`` in [low, high] (derivative-free)."""
    up = float(min(t0 + _BRACKET_STEP, high))
    direction = 1.0 if value(up) > value(t0) else -1.0
    a, b = (t0, up) if direction > 0 else (up, t0)
    while True:  # b is the best so far, a the point behind it
        c = float(np.clip(b + direction * _BRACKET_STEP, low, high))
        if c == b:
            return b, "upper" if direction > 0 else "lower"
        if value(c) <= value(b):
            break
        a, b = b, c
    result = minimize_scalar(
        lambda t: -value(t),
        bounds=(min(a, c), max(a, c)),
        method="bounded",
        options={"xatol": xtol},
    )
    best = min((a, b, c, float(result.x)), key=lambda t: -value(t))
    return best, None
