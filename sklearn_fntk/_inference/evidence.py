"""Log evidence of the linearized-network GP for many (noise, prior) pairs at once.

Notation as in the user guide ("The method"): r = y - m(X) the training residuals
flattened to d = n·k, σ² the noise variance, s the prior variance and

    K(σ², s) = s·G + σ² I,        G = J Jᵀ  (d x d; the finite NTK Gram matrix).

G does not depend on σ² or s, so one symmetric eigendecomposition G = U diag(g) Uᵀ
serves every pair. With z = Uᵀ r and D_i = s·g_i + σ²,

    log p(y) = -½ Σ_i z_i² / D_i - ½ Σ_i log D_i - (d/2) log 2π                    (1)

costs O(d) per pair, and K⁻¹ r = U diag(1/D) z needs no refactorisation either.

**Parameter space** (p < d). With F = JᵀJ = V diag(f) Vᵀ (p x p) and the thin SVD
J = U_r diag(√f) Vᵀ, the nonzero eigenvalues of G are those of F, their eigenvectors
U_r = J V diag(f)^-½, and c = Vᵀ Jᵀ r = diag(√f) U_rᵀ r, so z_i = c_i / √f_i. The other
d - rank eigenvalues of G are 0, and r enters them only through the squared norm of its
part outside range(J), ‖r‖² - Σ_i z_i². Summing (1) over both parts,

    rᵀK⁻¹r = Σ_i z_i²/D_i + (‖r‖² - Σ_i z_i²)/σ² = (‖r‖² - Σ_i s·f_i z_i² / D_i) / σ²  (2)
    log|K| = Σ_i log D_i + (d - rank)·log σ²                                         (3)

where f_i z_i² = c_i²: (2) never divides by f_i, and a direction with f_i at rounding
level (c_i ≈ 0) changes it by s·c_i²/(σ² D_i) ≈ 0, so such directions are dropped and
counted among the d - rank null ones.

**Gradients** in a = log σ² and b = log s, with q = rᵀK⁻¹r from (1) or (2) and
h = Σ_i z_i² s·λ_i / D_i² (λ the kept eigenvalues, m of them):

    ∂q/∂a = -q + h,   ∂q/∂b = -h,
    ∂log|K|/∂a = Σ_i σ²/D_i + (d - m),   ∂log|K|/∂b = Σ_i s·λ_i / D_i.               (4)

**Large problems**: :class:`LanczosSpectrum` replaces the
eigendecomposition by a Lanczos quadrature of the same spectrum, and
``stochastic_evidence.stochastic_log_marginal_likelihood`` estimates log p(y) at one
pair by stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017; Gardner et al. 2018)
and CG, with products by K only.
"""

import math

import numpy as np
import torch

from .._linalg.lanczos import Lanczos, growth_limit, rademacher
from .._linalg.memory import check_fits, largest, usable_bytes
from .._stages import NO_STAGES
from .operators import FunctionOperator, ParameterOperator
from .system import eigen_parts

__all__ = [
    "LanczosSpectrum",
    "SpectralEvidence",
    "spectral_evidence",
]

# Pairs of (noise, prior) evaluated at once are blocked to about this many entries
# of the (pairs x eigenvalues) array D.
_BLOCK_ENTRIES = 1 << 22


def _float64(array):
    """``array`` as a float64 CPU tensor: the evidence is evaluated on the CPU, for
    numpy's optimisers, from spectra of at most p or n·k values."""
    return torch.as_tensor(array).detach().to(device="cpu", dtype=torch.float64)


def _rounding_level(eigenvalues, dim, dtype=torch.float64):
    """Eigenvalues of a PSD Gram matrix of size ``dim`` formed in ``dtype`` at or
    below this are 0.

    A float64 eigendecomposition perturbs them by about dim·ε₆₄·λ_max, and forming
    the Gram matrix in ``dtype`` by about ε·λ_max (ε of ``dtype``): in float32 the
    eigenvalues below that are rounding, whatever their true value (the CNN of
    tests/test_evidence.py, p = 793: the float32 Gram matrix was 3.9e-8·λ_max from
    float64's, with 82 negative eigenvalues). The larger of the two.
    """
    eps = max(dim * torch.finfo(torch.float64).eps, torch.finfo(dtype).eps)
    return eps * eigenvalues.max().clamp_min(0.0)


class SpectralEvidence:
    """Exact log evidence for any (noise, prior) from one eigendecomposition.

    Built from the spectrum of G = J Jᵀ as seen by the residuals; usually through
    :meth:`from_kernel` (function space, G dense) or :meth:`from_fisher` (parameter
    space, F = JᵀJ dense). All arithmetic is in float64.

    Parameters
    ----------
    eigenvalues : array-like of shape (m,)
        Eigenvalues λ of G kept (negative rounding values are set to 0); the other
        d - m eigenvalues of G are 0. In function space all d (eq. (1) sums over
        them), or the nodes of a quadrature (:class:`LanczosSpectrum`).
    coefficients : array-like of shape (m,)
        z_i = u_iᵀ r, the residuals projected on the matching unit eigenvectors of G.
    residual_sq_norm : float
        ‖r‖². Used only when m < d, for the part of r in the null space of G, eq. (2).
    size : int
        d = n·k, the number of observations; m <= d.
    vectors : array-like of shape (d, m) or (p, m), optional
        Eigenvectors U of G (``space="function"``, all d of them) or V of F
        (``space="parameter"``); only :meth:`posterior_mean_coefficients` needs them.
    space : {"function", "parameter"}, default="function"
        Which eigenvectors ``vectors`` holds, and the form of rᵀK⁻¹r: eq. (1) in
        function space, eq. (2) in parameter space, where the eigenvalues are F's.
    log_det : tuple (nodes, weights, n_null) or None, default=None
        A quadrature for log|K| in place of the eigenvalues': log|K| =
        Σ_i w_i log(s·μ_i + σ²) + n_null·log σ² (see :class:`LanczosSpectrum`). None:
        the eigenvalues with weight 1 and ``n_null`` = d - m.

    Attributes
    ----------
    eigenvalues, coefficients : torch.Tensor of shape (m,)
    size, n_null : int
        d, and d - m, the zero eigenvalues of G.
    space : str
    radau : SpectralEvidence or None
        For a Lanczos quadrature (:class:`LanczosSpectrum`), the same evidence with
        Gauss-Radau rules in place of the Gauss rules: each pair brackets its term
        (see :func:`quadrature`); :meth:`quadrature_gap`. None otherwise.
    """

    def __init__(
        self,
        eigenvalues,
        coefficients,
        residual_sq_norm,
        size,
        *,
        vectors=None,
        space="function",
        log_det=None,
    ):
        self.eigenvalues = _float64(eigenvalues).reshape(-1).clamp_min(0.0)
        self.coefficients = _float64(coefficients).reshape(-1)
        self.residual_sq_norm = float(residual_sq_norm)
        self.size = int(size)
        m = self.eigenvalues.numel()
        if self.coefficients.numel() != m:
            raise ValueError(
                f"Got {m} eigenvalues but {self.coefficients.numel()} coefficients."
            )
        if m > self.size:
            raise ValueError(f"Got {m} eigenvalues for a kernel of size {self.size}.")
        if space not in ("function", "parameter"):
            raise ValueError(f"space must be 'function' or 'parameter', got {space!r}.")
        if vectors is not None and space == "function" and m != self.size:
            raise ValueError("Function-space vectors must be all d eigenvectors of G.")
        self.n_null = self.size - m
        self.space = space
        self.exact = log_det is None  # not a Lanczos quadrature
        self.radau = None
        if log_det is None:
            log_det = (self.eigenvalues, torch.ones_like(self.eigenvalues), self.n_null)
        nodes, weights, n_null = log_det
        self._log_det_nodes = _float64(nodes).reshape(-1).clamp_min(0.0)
        self._log_det_weights = _float64(weights).reshape(-1)
        self._log_det_null = float(n_null)
        self.vectors = None if vectors is None else _float64(vectors)
        # λ_i z_i² (= c_i² in parameter space), the numerator of eq. (2)
        self._weighted = self.eigenvalues * self.coefficients**2

    @classmethod
    def from_kernel(cls, gram, residuals):
        """Function space: eigendecomposition of the dense G = J Jᵀ.

        Parameters
        ----------
        gram : array-like of shape (d, d)
            G = J Jᵀ, symmetric positive semi-definite, without prior or noise.
        residuals : array-like of shape (d,) or (n, k)
            r = y - m(X), flattened row-major to d = n·k.

        Returns
        -------
        SpectralEvidence
            With all d eigenpairs, ``vectors`` = U.
        """
        gram = _float64(gram)
        r = _float64(residuals).reshape(-1)
        if gram.shape != (r.numel(), r.numel()):
            raise ValueError(
                f"gram has shape {tuple(gram.shape)}, expected ({r.numel()}, "
                f"{r.numel()}) for {r.numel()} residuals."
            )
        g, U = torch.linalg.eigh(gram)
        # zero eigenvalues come out at ±rounding level; s·g_i/σ² would then bias
        # eq. (1) for small noise, so they are set to exactly 0. Those of a Gram
        # matrix formed in float32 stay: eq. (1) divides z_i² by s·g_i + σ² ≥ σ²,
        # which rounding cannot blow up, and they approximate the spectrum's tail
        # (the float32 CNN of tests/test_evidence.py fits noise and prior within 1% and 5%
        # of float64's with them, 25% and 45% off without)
        g = torch.where(g > _rounding_level(g, r.numel()), g, 0.0)
        # z = Uᵀ r
        return cls(g, U.T @ r, r @ r, r.numel(), vectors=U, space="function")

    @classmethod
    def from_fisher(cls, fisher, jacobian_t_residuals, residual_sq_norm, size):
        """Parameter space: eigendecomposition of the dense F = JᵀJ, eqs. (2)-(3).

        Parameters
        ----------
        fisher : array-like of shape (p, p)
            F = JᵀJ, without prior or noise.
        jacobian_t_residuals : array-like of shape (p,)
            Jᵀ r.
        residual_sq_norm : float
            ‖r‖².
        size : int
            d = n·k.

        Returns
        -------
        SpectralEvidence
            With the eigenpairs of F above rounding level (at most d of them; the
            others count as zero eigenvalues of G), ``vectors`` = V.
        """
        dtype, fisher = torch.as_tensor(fisher).dtype, _float64(fisher)
        Jt_r = _float64(jacobian_t_residuals).reshape(-1)
        p = fisher.shape[0]
        if fisher.shape != (p, p) or Jt_r.numel() != p:
            raise ValueError(
                f"fisher has shape {tuple(fisher.shape)} and Jᵀr {Jt_r.numel()} "
                "entries; expected (p, p) and p."
            )
        f, V = torch.linalg.eigh(fisher)  # ascending
        # eigenvalues at rounding level are null directions; rank(J) <= d, so at most
        # the d largest are kept. For a Gram matrix formed in float32 these are all
        # below ε₃₂·λ_max: eq. (2) takes c_i²/f_i from them, and rounding in both
        # sent rᵀK⁻¹r negative as σ² → 0 (the float32 CNN: the search ran to noise
        # 3e-11, and the factor failed)
        keep = f > _rounding_level(f, max(p, size), dtype)
        keep[: max(p - size, 0)] = False
        f, V = f[keep], V[:, keep]
        # z = c / √f with c = Vᵀ Jᵀ r
        z = (V.T @ Jt_r) / f.sqrt()
        return cls(f, z, residual_sq_norm, size, vectors=V, space="parameter")

    @classmethod
    def _of_rule(
        cls, nodes, weights, start_norm, residual_sq_norm, size, space, *, log_det
    ):
        """The evidence whose quadratic term is the quadrature (nodes, weights) of the
        spectral measure of the start r (function space) or Jᵀr (parameter space)."""
        nodes = nodes.clamp_min(0.0)
        if space == "function":
            # rᵀ f(G) r ≈ ‖r‖² Σ_j τ_j² f(θ_j): z_j = ‖r‖ τ_j
            return cls(
                nodes, start_norm * weights.sqrt(), residual_sq_norm, size,
                log_det=log_det,
            )  # fmt: skip
        # eq. (2) needs c_j² = λ_j z_j² = ‖Jᵀr‖² τ_j²
        z = (
            start_norm
            * weights.sqrt()
            / nodes.clamp_min(torch.finfo(nodes.dtype).tiny).sqrt()
        )
        evidence = cls(nodes, z, residual_sq_norm, size, space="parameter", log_det=log_det)
        evidence._weighted = start_norm**2 * _float64(weights)
        return evidence

    def mean_kernel_diagonal(self):
        """tr(G)/d, the mean prior variance per observation at s = 1 (from the
        log-determinant's nodes: exact, or the quadrature's estimate)."""
        return float((self._log_det_weights * self._log_det_nodes).sum()) / self.size

    # -- evaluation ---------------------------------------------------------------------

    @staticmethod
    def _pairs(noise, prior):
        """Broadcast noise and prior; return their shape and flat float64 tensors."""
        noise, prior = np.broadcast_arrays(
            np.asarray(noise, dtype=np.float64), np.asarray(prior, dtype=np.float64)
        )
        if not (np.all(noise > 0) and np.all(prior > 0)):
            raise ValueError("noise and prior must be positive.")
        return noise.shape, torch.from_numpy(noise.ravel()), torch.from_numpy(prior.ravel())

    def quadrature_gap(self, noise, prior):
        """½·(|Δq| + |Δlog|K||), the differences of the Gauss quadratures of this
        Lanczos evidence from their Gauss-Radau counterparts at one (noise, prior):
        in nats, a bound of the quadrature error of the log evidence there (the
        probes' sampling error aside). The sum of :meth:`quadrature_gaps`."""
        return sum(self.quadrature_gaps(noise, prior))

    def quadrature_gaps(self, noise, prior):
        """(½|Δq|, ½|Δlog|K||): :meth:`quadrature_gap`'s two terms, the data fit's
        and the log-determinant's."""
        _, noise, prior = self._pairs(noise, prior)
        (q, log_det, *_), (q_radau, log_det_radau, *_) = (
            evidence._terms(noise, prior) for evidence in (self, self.radau)
        )
        quadratic_gap, log_det_gap = (q - q_radau).abs(), (log_det - log_det_radau).abs()
        return 0.5 * float(quadratic_gap), 0.5 * float(log_det_gap)

    def _terms(self, noise, prior):
        """q = rᵀK⁻¹r, log|K| and the gradient pieces h, Σσ²/D + (d - m), Σsλ/D of eq. (4).

        noise, prior : torch.Tensor of shape (b,). Returns five tensors of shape (b,).
        """
        lam, z2 = self.eigenvalues, self.coefficients**2
        sigma2, s = noise[:, None], prior[:, None]
        D = s * lam + sigma2  # (b, m)
        if self.space == "function":
            quadratic = (z2 / D).sum(1)  # eq. (1)
        else:
            quadratic = (self.residual_sq_norm - (s * self._weighted / D).sum(1)) / noise
        h = (s * self._weighted / D**2).sum(1)
        mu, w, n_null = self._log_det_nodes, self._log_det_weights, self._log_det_null
        E = s * mu + sigma2
        log_det = (w * torch.log(E)).sum(1) + n_null * torch.log(noise)  # eq. (3)
        noise_share = (w * sigma2 / E).sum(1) + n_null
        prior_share = (w * s * mu / E).sum(1)
        return quadratic, log_det, h, noise_share, prior_share

    def log_marginal_likelihood(self, noise, prior, eval_gradient=False):
        """log p(y | σ², s), eqs. (1)-(3), for every broadcast pair.

        Parameters
        ----------
        noise, prior : float or array-like
            σ² and s, broadcast against each other to a shape S.
        eval_gradient : bool, default=False
            Also return the gradient with respect to (log σ², log s), eq. (4).

        Returns
        -------
        log_likelihood : float or ndarray of shape S
            A float when S is ().
        gradient : ndarray of shape S + (2,), optional
            [∂/∂log σ², ∂/∂log s].
        """
        shape, noise, prior = self._pairs(noise, prior)
        block = max(1, _BLOCK_ENTRIES // max(self.eigenvalues.numel(), 1))
        values, gradients = [], []
        constant = 0.5 * self.size * math.log(2 * math.pi)
        for start in range(0, noise.numel(), block):
            rows = slice(start, start + block)
            q, log_det, h, noise_share, prior_share = self._terms(noise[rows], prior[rows])
            values.append(-0.5 * q - 0.5 * log_det - constant)
            if eval_gradient:
                d_noise = 0.5 * (q - h) - 0.5 * noise_share
                d_prior = 0.5 * h - 0.5 * prior_share
                gradients.append(torch.stack([d_noise, d_prior], dim=-1))
        value = torch.cat(values).reshape(shape).numpy()
        value = float(value) if shape == () else value
        if not eval_gradient:
            return value
        return value, torch.cat(gradients).reshape(*shape, 2).numpy()

    def posterior_mean_coefficients(self, noise, prior):
        """What the posterior mean needs, for every broadcast pair, refactorising nothing.

        Function space (``from_kernel``): α = K⁻¹ r = U diag(1/D) z, so that the mean
        is m(x*) + s·J* Jᵀ α. Parameter space (``from_fisher``):
        δ = s·Jᵀ K⁻¹ r = (F + (σ²/s) I)⁻¹ Jᵀ r = V diag(s·√λ / D) z, so that the mean
        is m(x*) + J* δ.

        Parameters
        ----------
        noise, prior : float or array-like
            Broadcast to a shape S.

        Returns
        -------
        ndarray of shape (d,) + S (function space) or (p,) + S (parameter space)
        """
        if self.vectors is None:
            raise ValueError("posterior_mean_coefficients needs the eigenvectors.")
        shape, noise, prior = self._pairs(noise, prior)
        D = prior[:, None] * self.eigenvalues + noise[:, None]  # (b, m)
        if self.space == "function":
            weights = self.coefficients / D
        else:
            weights = prior[:, None] * self.eigenvalues.sqrt() * self.coefficients / D
        coefficients = self.vectors @ weights.T  # (d or p, b)
        return coefficients.reshape(-1, *shape).numpy()


class LanczosSpectrum:
    """The two Lanczos quadratures of a matrix-free :class:`SpectralEvidence`, kept so
    that they can grow where they have not converged.

    The Krylov spaces of G (or F) are those of s·G + σ² I for every s and σ²: one
    Lanczos run from r (function space; from Jᵀr in parameter space) gives the Gauss
    quadrature of rᵀ(sG + σ²I)⁻¹r, eq. (1) (or of eq. (2)), and runs from Rademacher
    probes the stochastic Lanczos quadrature of log|K| = tr log(sG + σ²I) (in
    parameter space, eq. (3) with the d - p null directions counted exactly). The
    quadratic term is exact once the steps reach the number of distinct eigenvalues;
    the log-determinant has the probes' sampling error besides. Each run's Gauss
    rule and its Gauss-Radau rule bracket its term (:func:`quadrature`); where they
    differ at the evidence's optimum, :meth:`converge` runs more steps from where the
    runs stopped (:class:`Lanczos` keeps their bases), so no product is repeated.

    Parameters
    ----------
    matmat : callable
        ``matmat(V) -> G V`` (or F V) for V of shape (d, m) (or (p, m)).
    start : torch.Tensor of shape (d,) or (p,)
        r, or Jᵀ r.
    space : {"function", "parameter"}
    size : int
        d = n·k.
    residual_sq_norm : float
        ‖r‖².
    options : dict
        ``quadratic_steps``, ``log_det_steps``, ``n_probes``, ``generator``: the runs'
        first steps, and the probes; for :meth:`converge` also ``gap_nats``,
        ``max_growth`` and ``basis_bytes`` (``Policy.lanczos_options``).
    stages : Stages
        Where the Lanczos runs are reported, a step per product.
    usable : callable or None, default=None
        ``usable() -> bytes`` a new allocation may take now (the memory guard's
        share, see :func:`usable_bytes`); it bounds the growth of the bases. None:
        ``basis_bytes`` alone does.
    """

    def __init__(
        self,
        matmat,
        start,
        *,
        space,
        size,
        residual_sq_norm,
        options,
        stages=NO_STAGES,
        usable=None,
    ):
        self._matmat, self._stages, self._stage = matmat, stages, None
        self._usable = usable
        self._space, self._size = space, size
        self._residual_sq_norm = residual_sq_norm
        self._order = start.numel()
        self._start_norm = float(torch.linalg.vector_norm(start))
        # r (or Jᵀr) = 0: the quadratic term needs no nodes
        self._quadratic = None
        if self._start_norm > 0.0:
            self._quadratic = Lanczos(self._product, start[:, None] / self._start_norm)
        self._n_probes = options["n_probes"]
        probes = rademacher(
            self._order, self._n_probes, dtype=start.dtype, device=start.device,
            generator=options["generator"],
        )  # fmt: skip
        self._log_det = Lanczos(self._product, probes / math.sqrt(self._order))
        self._itemsize = start.element_size()
        self._dtype = start.dtype
        self.extend(options["quadratic_steps"], options["log_det_steps"])

    def _product(self, V):
        """``matmat``, reporting a step of the current stage."""
        self._stage.step()
        return self._matmat(V)

    def extend(self, quadratic_steps, log_det_steps):
        """Run the quadratic term's Lanczos to ``quadratic_steps`` steps in all and
        the log-determinant's to ``log_det_steps`` (each at most the operator's
        order); return self."""
        runs = [
            (self._quadratic, quadratic_steps, "evidence: Lanczos, quadratic term", {}),
            (self._log_det, log_det_steps, "evidence: Lanczos, log-determinant",
             {"probes": self._n_probes}),
        ]  # fmt: skip
        for run, steps, name, details in runs:
            if run is None or run.exhausted or steps <= run.steps:
                continue
            total = min(steps, self._order) - run.steps
            with self._stages(name, total=total, steps=steps, **details) as stage:
                self._stage = stage
                run.extend(steps)
        self._stage = None
        return self

    @property
    def steps(self):
        """(quadratic term's, log-determinant's) steps run so far."""
        quadratic = 0 if self._quadratic is None else self._quadratic.steps
        return quadratic, self._log_det.steps

    def evidence(self):
        """The :class:`SpectralEvidence` of the runs so far: their Gauss rules, with
        their Gauss-Radau rules as its ``radau``."""
        if self._quadratic is None:
            nodes = torch.zeros(1, dtype=torch.float64)
            gauss = radau = (nodes, torch.zeros(1, dtype=torch.float64))
        else:
            ((gauss, radau),) = self._quadratic.rules(radau=True)
            if self._space == "parameter":
                gauss, rounding = self._resolved(*gauss)
                if rounding:  # the run reached F's numerical null space
                    radau = gauss
        gauss_rules, radau_rules = zip(*self._log_det.rules(radau=True), strict=True)
        evidence, bound = (
            SpectralEvidence._of_rule(
                *rule,
                self._start_norm,
                self._residual_sq_norm,
                self._size,
                self._space,
                log_det=(
                    torch.cat([nodes for nodes, _ in rules]),
                    torch.cat([w * self._order / self._n_probes for _, w in rules]),
                    self._size - self._order,
                ),
            )
            for rule, rules in ((gauss, gauss_rules), (radau, radau_rules))
        )
        evidence.radau = bound
        return evidence

    def _resolved(self, nodes, weights):
        """The quadratic term's Gauss rule in parameter space without its nodes at
        rounding level, ε·θ_max (ε of the products' dtype), and whether it had any.

        Those are Ritz values of F's null space seen through rounding, some of them
        negative (clamped to 0). Jᵀr has no component there in exact arithmetic, but
        they carry rounding-level weights, and eq. (2) divides by s·θ + σ²: in
        float32 (n = 40,000, p = 21,825, 1586 steps) rᵀK⁻¹r went negative as
        σ² → 0, and the search ran to the noise's lower bound with a log evidence of
        1e23. Their presence means the run has explored F's spectrum down to what
        the products resolve; its Gauss-Radau rule (whose construction needs T's
        Ritz values above 0) is then replaced by this rule, and the term counts as
        resolved: in float32 the gap stayed at 290 nats past 1600 steps otherwise,
        made of those weights alone."""
        resolved = nodes > _rounding_level(nodes, 1, self._dtype)
        rounding = not bool(resolved.all())
        return (nodes, torch.where(resolved, weights, 0.0)), rounding

    def converge(self, optimum, options):
        """Grow the runs until the evidence is resolved at its optimum; return the
        evidence.

        At the optimum (σ², s) = ``optimum(evidence)`` each term whose Gauss and
        Gauss-Radau rules differ by more than ``gap_nats``/2 nats
        (:meth:`SpectralEvidence.quadrature_gaps`) gets twice its steps, and the
        optimum is found again, until both are within it (the log evidence there is
        then known within ``gap_nats``) or a run can grow no further: at most
        ``max_growth`` times its first steps, its bases within ``basis_bytes``
        (b·L·order entries for b columns after L steps) and the memory left
        (``usable``), and the operator's order.
        The caller checks the final gap.

        Parameters
        ----------
        optimum : callable
            ``optimum(evidence) -> (noise, prior)``.
        options : dict
            As for the constructor.

        Returns
        -------
        SpectralEvidence
        """
        half = 0.5 * options["gap_nats"]
        evidence = self.evidence()
        while True:
            gaps = evidence.quadrature_gaps(*optimum(evidence))
            runs = (self._quadratic, self._log_det)
            caps, steps = self._caps(options), []
            for run, gap, cap in zip(runs, gaps, caps, strict=True):
                grows = run is not None and gap > half and not run.exhausted
                steps.append(min(2 * run.steps, cap) if grows else 0)
            if all(new <= old for new, old in zip(steps, self.steps, strict=True)):
                return evidence
            evidence = self.extend(*steps).evidence()

    def _caps(self, options):
        """The most steps each run (the quadratic term's, the log-determinant's)
        may reach: ``max_growth`` times its first steps, its bases within
        ``basis_bytes`` and, with ``usable``, within the memory left, the quadratic
        term's next basis (at most twice its steps) set aside first."""
        usable = math.inf if self._usable is None else self._usable()
        caps = []
        for run, first, columns in (
            (self._quadratic, "quadratic_steps", 1),
            (self._log_det, "log_det_steps", self._n_probes),
        ):
            cap = growth_limit(
                options[first],
                columns,
                self._order,
                self._itemsize,
                max_growth=options["max_growth"],
                basis_bytes=int(min(options["basis_bytes"], usable)),
            )
            caps.append(cap)
            steps = 0 if run is None else min(2 * run.steps, cap, self._order)
            usable -= columns * (steps + 1) * self._order * self._itemsize
        return caps


def spectral_evidence(
    jacobian,
    residuals,
    space,
    structured=None,
    lanczos=None,
    stages=NO_STAGES,
    assemble=False,
    optimum=None,
):
    """The :class:`SpectralEvidence` of the training data, and the Gram matrix if
    it was assembled.

    Parameters
    ----------
    jacobian : JacobianProducts
    residuals : torch.Tensor of shape (n, k)
    space : {"function", "parameter"}
        Of G = J Jᵀ (n·k x n·k) or F = JᵀJ (p x p).
    structured : LayerwiseKernel or None
        The layerwise kernel, for G.
    lanczos : dict or None
        None: exact, from the dense G or F (one eigendecomposition). Otherwise the
        ``options`` of :class:`LanczosSpectrum` (matrix-free).
    stages : Stages
        Where the stages (eigendecomposition, or Lanczos runs) are reported.
    assemble : bool, default=False
        With ``lanczos``: assemble the Gram matrix (for a caller that factors it
        next) and run the quadrature over it, a dense product per step instead of
        a pass over the data.
    optimum : callable or None, default=None
        With ``lanczos``: ``optimum(evidence) -> (noise, prior)``, the pair the
        caller will pick; the quadrature then grows until it is resolved there
        (:meth:`LanczosSpectrum.converge`).

    Returns
    -------
    gram : torch.Tensor or None
        G or F, when assembled (None for a matrix-free Lanczos).
    evidence : SpectralEvidence

    Raises
    ------
    MemoryError
        Before anything is assembled, unless the Gram matrix, its float64
        eigendecomposition and then the dense solve that reuses the Gram matrix fit.
    """
    r = residuals.reshape(-1)
    if space == "function":
        operator = FunctionOperator(jacobian, prior=1.0, shift=0.0, structured=structured)
    else:
        operator = ParameterOperator(jacobian, shift=0.0)
    start = r if space == "function" else jacobian.vjp(residuals)
    # over the shards of a data-parallel fit (parameter space only)
    size = int(jacobian.reduction.sum_float(r.numel()))
    residual_sq_norm = jacobian.reduction.sum_float(r @ r)
    gram = None
    if lanczos is None or assemble:
        _check_spectral(operator, eigendecomposition=lanczos is None)
        with stages("Gram matrix", size=operator.size):
            gram = operator.gram_dense()
    if lanczos is not None:  # over the assembled Gram matrix, or matrix-free
        _check_lanczos(start, lanczos)
        spectrum = LanczosSpectrum(
            operator.psd_matmat if gram is None else gram.__matmul__,
            start,
            space=space,
            size=size,
            residual_sq_norm=residual_sq_norm,
            options=lanczos,
            stages=stages,
            usable=lambda: usable_bytes(start.device, jacobian.reduction),
        )
        if optimum is None:
            return gram, spectrum.evidence()
        return gram, spectrum.converge(optimum, lanczos)
    with stages("evidence: eigendecomposition", size=operator.size):
        if space == "function":
            return gram, SpectralEvidence.from_kernel(gram, r)
        return gram, SpectralEvidence.from_fisher(gram, start, residual_sq_norm, size)


def _check_lanczos(start, options):
    """The memory guard of a :class:`LanczosSpectrum`: the bases of its first steps
    (its growth stays within what is left, see :meth:`LanczosSpectrum.converge`)."""
    order = start.numel()
    parts = [
        ("the quadratic term's Lanczos basis", (options["quadratic_steps"] + 1, order)),
        (
            "the log-determinant's Lanczos bases",
            (options["n_probes"], options["log_det_steps"] + 1, order),
        ),
    ]
    what = "The matrix-free evidence (noise or prior 'auto' with CG)"
    check_fits(parts, start.dtype, start.device, what, "set noise and prior")


def _check_spectral(operator, eigendecomposition):
    """The memory guard of :func:`spectral_evidence`: the Gram matrix and the dense
    solve that reuses it, after its float64 eigendecomposition (exact) or the
    Lanczos quadrature over it."""
    w = operator.jacobian.w
    if eigendecomposition:
        eigen = eigen_parts(operator, torch.float64)
        parts = largest([eigen, operator.dense_parts(gram_held=True)], w.dtype)
        what = "The exact evidence (noise or prior 'auto' with the dense solver)"
        advice = "use solver='cg' (a matrix-free evidence), or set noise and prior"
    else:
        parts = operator.dense_parts(gram_held=False)
        what = "The Gram matrix of the dense solve"
        advice = "use solver='cg', or set noise and prior"
    check_fits(parts, w.dtype, w.device, what, advice)
