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

**Large problems**: :func:`stochastic_log_marginal_likelihood` (in
:mod:`.stochastic_evidence`, and importable from here) estimates log|K| by stochastic
Lanczos quadrature (Ubaru, Chen, Saad 2017; Gardner et al. 2018) and rᵀK⁻¹r by
conjugate gradient, with products by K only.
"""

import math
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import minimize

from .._linalg.memory import check_fits, largest
from .operators import FunctionOperator, ParameterOperator
from .stochastic_evidence import StochasticEvidence, stochastic_log_marginal_likelihood
from .system import eigen_parts

__all__ = [
    "EvidenceOptimum",
    "SpectralEvidence",
    "StochasticEvidence",
    "spectral_evidence",
    "stochastic_log_marginal_likelihood",
]

# Pairs of (noise, prior) evaluated at once are blocked to about this many entries
# of the (pairs x eigenvalues) array D.
_BLOCK_ENTRIES = 1 << 22


def _float64(array):
    return torch.as_tensor(array).detach().to(torch.float64)


def _rounding_level(eigenvalues, dim):
    """Eigenvalues of a PSD Gram matrix of size ``dim`` at or below this are 0.

    Forming the Gram matrix and its eigendecomposition perturb eigenvalues by about
    dim·ε·λ_max (ε the float64 machine epsilon).
    """
    return dim * torch.finfo(torch.float64).eps * eigenvalues.max().clamp_min(0.0)


class EvidenceOptimum(NamedTuple):
    """Result of :meth:`SpectralEvidence.maximize`.

    Attributes
    ----------
    noise, prior : float
        The maximiser (σ², s).
    log_marginal_likelihood : float
        log p(y) there.
    converged : bool
        Whether L-BFGS-B reported success for the best start.
    """

    noise: float
    prior: float
    log_marginal_likelihood: float
    converged: bool


class SpectralEvidence:
    """Exact log evidence for any (noise, prior) from one eigendecomposition.

    Built from the spectrum of G = J Jᵀ as seen by the residuals; usually through
    :meth:`from_kernel` (function space, G dense) or :meth:`from_fisher` (parameter
    space, F = JᵀJ dense). All arithmetic is in float64.

    Parameters
    ----------
    eigenvalues : array-like of shape (m,)
        Eigenvalues λ of G kept (negative rounding values are set to 0); the other
        d - m eigenvalues of G are 0.
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
        Which eigenvectors ``vectors`` holds.

    Attributes
    ----------
    eigenvalues, coefficients : torch.Tensor of shape (m,)
    size, n_null : int
        d, and d - m, the zero eigenvalues of G.
    space : str
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
        # eq. (1) for small noise, so they are set to exactly 0
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
        fisher = _float64(fisher)
        Jt_r = _float64(jacobian_t_residuals).reshape(-1)
        p = fisher.shape[0]
        if fisher.shape != (p, p) or Jt_r.numel() != p:
            raise ValueError(
                f"fisher has shape {tuple(fisher.shape)} and Jᵀr {Jt_r.numel()} "
                "entries; expected (p, p) and p."
            )
        f, V = torch.linalg.eigh(fisher)  # ascending
        # eigenvalues at rounding level are null directions; rank(J) <= d, so at most
        # the d largest are kept
        keep = f > _rounding_level(f, max(p, size))
        keep[: max(p - size, 0)] = False
        f, V = f[keep], V[:, keep]
        # z = c / √f with c = Vᵀ Jᵀ r
        z = (V.T @ Jt_r) / f.sqrt()
        return cls(f, z, residual_sq_norm, size, vectors=V, space="parameter")

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

    def _terms(self, noise, prior):
        """q = rᵀK⁻¹r, log|K| and the gradient pieces h, Σσ²/D + (d - m), Σsλ/D of eq. (4).

        noise, prior : torch.Tensor of shape (b,). Returns five tensors of shape (b,).
        """
        lam, z2 = self.eigenvalues, self.coefficients**2
        sigma2, s = noise[:, None], prior[:, None]
        D = s * lam + sigma2  # (b, m)
        if self.n_null == 0:
            quadratic = (z2 / D).sum(1)  # eq. (1)
        else:
            quadratic = (self.residual_sq_norm - (s * self._weighted / D).sum(1)) / noise
        log_det = torch.log(D).sum(1) + self.n_null * torch.log(noise)  # eq. (3)
        h = (s * self._weighted / D**2).sum(1)
        noise_share = (sigma2 / D).sum(1) + self.n_null
        prior_share = (s * lam / D).sum(1)
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

    def maximize(
        self,
        noise0=1.0,
        prior0=1.0,
        *,
        bounds=((1e-8, 1e5), (1e-8, 1e5)),
        n_restarts=2,
        random_state=None,
    ):
        """Maximise log p(y) over (σ², s) by L-BFGS-B on (log σ², log s).

        Parameters
        ----------
        noise0, prior0 : float, default=1.0
            First start (clipped into the bounds).
        bounds : pair of (low, high) pairs, default=((1e-8, 1e5), (1e-8, 1e5))
            Bounds on noise, then prior.
        n_restarts : int, default=2
            Further starts drawn log-uniformly within the bounds.
        random_state : int, numpy.random.Generator or None, default=None
            Seeds the restarts' starts.

        Returns
        -------
        EvidenceOptimum
            The best of all starts.
        """
        log_bounds = np.log(np.asarray(bounds, dtype=np.float64))
        low, high = log_bounds[:, 0], log_bounds[:, 1]

        def objective(x):
            value, gradient = self.log_marginal_likelihood(
                math.exp(x[0]), math.exp(x[1]), eval_gradient=True
            )
            return -value, -gradient

        rng = np.random.default_rng(random_state)
        starts = [np.clip(np.log([noise0, prior0]), low, high)]
        starts += list(rng.uniform(low, high, size=(n_restarts, 2)))
        best = None
        for x0 in starts:
            result = minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=log_bounds)
            if best is None or result.fun < best.fun:
                best = result
        noise, prior = np.exp(best.x)
        return EvidenceOptimum(
            float(noise), float(prior), float(-best.fun), bool(best.success)
        )


def spectral_evidence(jacobian, residuals, space, structured=None):
    """The Gram matrix of ``space`` and the :class:`SpectralEvidence` it gives.

    Parameters
    ----------
    jacobian : JacobianProducts
    residuals : torch.Tensor of shape (n, k)
    space : {"function", "parameter"}
        J Jᵀ (n·k x n·k) or JᵀJ (p x p).
    structured : LayerwiseKernel or None
        The layerwise kernel, for J Jᵀ.

    Returns
    -------
    gram : torch.Tensor
    evidence : SpectralEvidence

    Raises
    ------
    MemoryError
        Before anything is assembled, unless the Gram matrix, its float64
        eigendecomposition and then the dense solve that reuses the Gram matrix fit.
    """
    r = residuals.reshape(-1)
    if space == "function":
        operator = FunctionOperator(jacobian, prior=1.0, shift=1.0, structured=structured)
    else:
        operator = ParameterOperator(jacobian, shift=1.0)
    _check_spectral(operator)
    if space == "function":
        gram = operator.gram_dense()
        return gram, SpectralEvidence.from_kernel(gram, r)
    gram = operator.gram_dense()
    Jt_r = jacobian.vjp(residuals)
    return gram, SpectralEvidence.from_fisher(gram, Jt_r, float(r @ r), r.numel())


def _check_spectral(operator):
    """The memory guard of :func:`spectral_evidence` (a float64 eigendecomposition)
    and of the dense solve after it."""
    w = operator.jacobian.w
    eigen = eigen_parts(operator, torch.float64)
    parts = largest([eigen, operator.dense_parts(gram_held=True)], w.dtype)
    what = "Maximising the evidence (optimize=True) by one eigendecomposition"
    advice = "choose noise and prior by GridSearchCV with optimize=False instead"
    check_fits(parts, w.dtype, w.device, what, advice)
