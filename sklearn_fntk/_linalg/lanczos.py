"""Lanczos tridiagonalisation and stochastic Lanczos quadrature for log-determinants.

log|A| = tr log A of a symmetric positive definite A, from products with A only
(Ubaru, Chen & Saad 2017; Gardner et al. 2018): for each Rademacher probe z
(‖z‖² = d), Lanczos from z/√d gives T = S diag(θ) Sᵀ, and Gauss quadrature gives
zᵀ log(A) z ≈ d·Σ_j τ_j² log θ_j with τ_j = S[0, j]; log|A| is the mean over probes.
"""

import math
from typing import NamedTuple

import torch

__all__ = [
    "Lanczos",
    "LogDetEstimate",
    "growth_limit",
    "lanczos",
    "largest_eigenvalue",
    "quadrature",
    "rademacher",
    "stochastic_log_det",
]


class LogDetEstimate(NamedTuple):
    """Result of :func:`stochastic_log_det`.

    Attributes
    ----------
    log_det : float
        The mean of the per-probe quadratures.
    std_error : float
        Their standard error.
    quadrature_gap : float
        The mean over probes of their Gauss rules' difference from their
        Gauss-Radau rules', a bound of the quadrature's error (the probes'
        sampling error aside).
    steps : int
        Lanczos steps run per probe.
    """

    log_det: float
    std_error: float
    quadrature_gap: float
    steps: int


class Lanczos:
    """Lanczos tridiagonalisation of K from each column of Q, all columns at once,
    resumable: :meth:`extend` runs more steps from where the last call stopped, so
    a quadrature that has not converged grows without repeating a product.

    Full reorthogonalisation (classical Gram-Schmidt, twice) keeps every column's basis
    orthonormal, so T's eigenpairs are reliable Gauss quadrature nodes and weights.
    The bases are kept between calls: b·L·d entries after L steps.

    Parameters
    ----------
    matmat : callable
        ``matmat(V) -> K V`` for V of shape (d, j).
    Q : torch.Tensor of shape (d, b)
        Unit start vectors.

    Attributes
    ----------
    alpha : torch.Tensor of shape (L, b)
        Diagonals of the tridiagonal T of each column, after L steps.
    beta : torch.Tensor of shape (L, b)
        Off-diagonals: beta[j] couples steps j and j + 1; the last one a column ran,
        beta[length - 1], is the norm of its final residual (0 after a breakdown),
        which the Gauss-Radau rule needs.
    lengths : torch.Tensor of shape (b,)
        Steps each column ran: fewer than L when its Krylov space became invariant
        (β = 0 up to rounding). A stopped column's vectors are 0 from then on, and
        stay 0 under K.
    """

    def __init__(self, matmat, Q):
        d, b = Q.shape
        self._matmat = matmat
        self._basis = Q.T[:, None].clone()  # basis[c, j] is q_j of column c
        self.alpha, self.beta = Q.new_zeros(0, b), Q.new_zeros(0, b)
        self.lengths = torch.zeros(b, dtype=torch.long, device=Q.device)
        self._running = torch.ones(b, dtype=torch.bool, device=Q.device)
        self._scale = Q.new_zeros(b)

    @property
    def steps(self):
        """L, the steps run so far."""
        return self.alpha.shape[0]

    @property
    def exhausted(self):
        """Whether no column can take another step (each became invariant, or L = d)."""
        return not bool(self._running.any()) or self.steps >= self._basis.shape[2]

    def extend(self, steps):
        """Run until ``steps`` steps in all (at most d); return self."""
        b, _, d = self._basis.shape
        steps = min(steps, d)
        first = self.steps
        if steps <= first or not bool(self._running.any()):
            return self
        # room for the new steps' vectors and the next start, q_steps (q_first, the
        # last call's next start, is already there)
        basis = self._basis.new_zeros(b, min(steps + 1, d), d)
        basis[:, : first + 1] = self._basis[:, : first + 1]
        self._basis = basis
        self.alpha = torch.cat([self.alpha, basis.new_zeros(steps - first, b)])
        self.beta = torch.cat([self.beta, basis.new_zeros(steps - first, b)])
        running, eps = self._running, torch.finfo(basis.dtype).eps
        self.lengths[running] = steps
        for j in range(first, steps):
            q = basis[:, j]
            w = self._matmat(q.T).T
            # α_j = q_jᵀ K q_j
            self.alpha[j] = (q * w).sum(1)
            # w ← K q_j - Σ_{i<=j} q_i (q_iᵀ w): the three-term recurrence, made exact
            previous = basis[:, : j + 1]
            for _ in range(2):
                w = w - (previous.transpose(1, 2) @ (previous @ w[..., None]))[..., 0]
            norm = torch.linalg.vector_norm(w, dim=1)
            self._scale = torch.maximum(self._scale, self.alpha[j].abs() + norm)
            # β_j = ‖w‖; breakdown when it is at rounding level of ‖K‖
            stopped = running & (norm <= eps * self._scale)
            self.lengths[stopped] = j + 1
            running &= ~stopped
            if not bool(running.any()):
                break
            self.beta[j] = torch.where(running, norm, 0.0)
            if j + 1 == d:
                break
            divisor = torch.where(running, norm, 1.0)[:, None]
            basis[:, j + 1] = torch.where(running[:, None], w / divisor, 0.0)
        return self

    def rules(self, radau=False, node=0.0):
        """Each column's Gauss quadrature (and with ``radau`` its Gauss-Radau rule
        with a node fixed at ``node``, at most K's smallest eigenvalue): see
        :func:`quadrature`."""
        rules = []
        for i in range(self.lengths.numel()):
            T = _tridiagonal(self.alpha, self.beta, self.lengths, i).to(torch.float64)
            theta, S = torch.linalg.eigh(T)
            gauss = (theta, S[0] ** 2)
            if radau:
                residual = self.beta[int(self.lengths[i]) - 1, i]
                gauss = (gauss, _radau_rule(T, theta, S, residual, node))
            rules.append(gauss)
        return rules


def growth_limit(steps, columns, order, itemsize, *, max_growth, basis_bytes):
    """The most steps a growing :class:`Lanczos` run may reach: ``max_growth`` times
    its first ``steps``, while its bases (``columns`` x steps x ``order`` entries of
    ``itemsize`` bytes) take at most ``basis_bytes``; never fewer than ``steps``."""
    held = basis_bytes // (columns * order * itemsize)
    return max(steps, min(max_growth * steps, held))


def lanczos(matmat, Q, steps):
    """Lanczos tridiagonalisation of K from each column of Q, all columns at once:
    ``steps`` steps (at most d) of :class:`Lanczos` (``matmat``, ``Q``).

    Returns
    -------
    alpha, beta : torch.Tensor of shape (steps, b)
    lengths : torch.Tensor of shape (b,)
        As the attributes of :class:`Lanczos`.
    """
    run = Lanczos(matmat, Q).extend(steps)
    return run.alpha, run.beta, run.lengths


def _tridiagonal(alpha, beta, lengths, column):
    """The Lanczos tridiagonal T of column ``column`` (its ``lengths`` steps)."""
    L = int(lengths[column])
    off_diagonal = beta[: L - 1, column]
    return torch.diag(alpha[:L, column]) + off_diagonal.diag(1) + off_diagonal.diag(-1)


def largest_eigenvalue(matmat, size, *, dtype, device, steps=20, generator=None):
    """The largest eigenvalue of a symmetric A, from ``steps`` Lanczos steps.

    The largest Ritz value, a lower bound that converges fast (the extreme
    eigenvalues first): after 20 steps from a random start it is typically within a
    few percent, with ``steps`` products with A.

    Parameters
    ----------
    matmat : callable
        ``matmat(V) -> A V`` for V of shape (d, m).
    size : int
        d.
    dtype : torch.dtype
    device : torch.device or str
    steps : int, default=20
    generator : torch.Generator or None
        Draws the start.

    Returns
    -------
    float
    """
    start = torch.randn(size, 1, dtype=dtype, device=device, generator=generator)
    alpha, beta, lengths = lanczos(matmat, start / torch.linalg.vector_norm(start), steps)
    return float(torch.linalg.eigvalsh(_tridiagonal(alpha, beta, lengths, 0)).max())


def quadrature(matmat, Q, steps, radau=False):
    """Gauss quadrature nodes and weights of the spectral measure of each column of Q.

    Lanczos from q = Q[:, c]/‖Q[:, c]‖ gives T = S diag(θ) Sᵀ; then
    qᵀ f(A) q ≈ Σ_j τ_j² f(θ_j) with τ_j = S[0, j], exact for polynomials f of degree
    below 2·steps. The Krylov space, and so the nodes of A + μI, are those of A
    shifted by μ: one run serves every shift and scale.

    For a positive semi-definite A and f with derivatives of alternating sign, such
    as 1/(s·λ + σ²), the Gauss rule is a lower bound of qᵀ f(A) q and the
    Gauss-Radau rule with a node fixed at 0 ≤ λ_min an upper bound (Golub & Meurant,
    "Matrices, Moments and Quadrature with Applications", 2010, ch. 6): where the two
    differ, the quadrature has not converged.

    Parameters
    ----------
    matmat : callable
        ``matmat(V) -> A V`` for V of shape (d, m), A symmetric.
    Q : torch.Tensor of shape (d, b)
        Start vectors (any nonzero norm).
    steps : int
        Lanczos steps per column, at least 1.
    radau : bool, default=False
        Also return each column's Gauss-Radau rule with a node at 0 (A positive
        semi-definite).

    Returns
    -------
    list of (nodes, weights)
        Per column, float64 tensors of shape (L,) (L ≤ steps): θ and τ², the weights
        summing to 1. With ``radau``, a list of ((nodes, weights), (radau nodes,
        radau weights)), the Radau rule of L + 1 nodes.
    """
    if steps < 1:
        raise ValueError(f"lanczos_steps must be at least 1, got {steps}.")
    norms = torch.linalg.vector_norm(Q, dim=0)
    return Lanczos(matmat, Q / norms).extend(steps).rules(radau)


def _radau_rule(T, theta, S, residual, node=0.0):
    """The Gauss-Radau rule with a node at ``node`` (a ≤ λ_min) from the Lanczos
    tridiagonal T = S diag(θ) Sᵀ (L x L) and its final residual norm β_L: the
    eigenpairs of T extended by β_L and α̃ = a + β_L² [(T - aI)⁻¹]_LL, which puts an
    eigenvalue at a (Golub & Meurant, 2010)."""
    L = T.shape[0]
    residual = float(residual)
    if residual == 0.0:  # an invariant Krylov space: the Gauss rule is exact
        return theta, S[0] ** 2
    tiny = torch.finfo(torch.float64).tiny
    extended = T.new_zeros(L + 1, L + 1)
    extended[:L, :L] = T
    extended[L - 1, L] = extended[L, L - 1] = residual
    # [(T - aI)⁻¹]_LL = Σ_j S[L-1, j]² / (θ_j - a); θ > a for a start in the range
    # of A - aI
    shifted = (theta - node).clamp_min(tiny)
    extended[L, L] = node + residual**2 * float((S[L - 1] ** 2 / shifted).sum())
    nodes, vectors = torch.linalg.eigh(extended)
    return nodes.clamp_min(node), vectors[0] ** 2


def stochastic_log_det(
    matmat,
    size,
    floor,
    *,
    dtype,
    device,
    n_probes,
    steps,
    generator,
    gap=None,
    max_steps=None,
):
    """Estimate log|A| by stochastic Lanczos quadrature over Rademacher probes.

    For each probe the Gauss rule of log is an upper bound of its quadratic form,
    and the Gauss-Radau rule with a node at ``floor`` (≤ λ_min) a lower bound
    (:func:`quadrature`): with ``gap``, the runs double their steps (continuing,
    :class:`Lanczos`) while the two estimates of log|A| differ by more than
    ``gap``, up to ``max_steps``.

    Parameters
    ----------
    matmat : callable
        ``matmat(V) -> A V`` for V of shape (d, m).
    size : int
        d.
    floor : float
        A lower bound on A's eigenvalues (its shift): Ritz values are clamped to it,
        and the Gauss-Radau rule fixes a node there.
    dtype : torch.dtype
    device : torch.device or str
    n_probes : int
        At least 2, for the standard error.
    steps : int
        Lanczos steps per probe (quadrature nodes), at least 1: the first ones.
    generator : torch.Generator or None
        Draws the probes.
    gap : float or None, default=None
        Grow the steps until the Gauss and Gauss-Radau estimates are this close;
        None: ``steps`` only.
    max_steps : int or None, default=None
        At most this many steps (None: ``steps``).

    Returns
    -------
    LogDetEstimate
    """
    if n_probes < 2:
        raise ValueError(f"n_probes must be at least 2, got {n_probes}.")
    if steps < 1:
        raise ValueError(f"lanczos_steps must be at least 1, got {steps}.")
    probes = rademacher(size, n_probes, dtype=dtype, device=device, generator=generator)
    run = Lanczos(matmat, probes / math.sqrt(size)).extend(steps)
    max_steps = max(steps, max_steps or steps)
    while True:
        # zᵀ log(A) z ≈ ‖z‖² Σ_j τ_j² log θ_j, ‖z‖² = d; per probe, Gauss and Radau
        gauss, radau = (
            torch.stack(
                [
                    size * (weights * torch.log(nodes.clamp_min(floor))).sum()
                    for nodes, weights in rules
                ]
            )
            for rules in zip(*run.rules(radau=True, node=floor), strict=True)
        )
        difference = float((gauss - radau).mean().abs())
        if gap is None or difference <= gap or run.exhausted or run.steps >= max_steps:
            break
        run.extend(min(2 * run.steps, max_steps))
    return LogDetEstimate(
        float(gauss.mean()),
        float(gauss.std() / math.sqrt(n_probes)),
        difference,
        run.steps,
    )


def rademacher(size, n_probes, *, dtype, device, generator):
    """``n_probes`` Rademacher vectors (entries ±1), shape (size, n_probes)."""
    signs = torch.randint(0, 2, (size, n_probes), generator=generator, device=device)
    return (2 * signs - 1).to(dtype)
