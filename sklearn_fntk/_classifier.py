"""FiniteNTKClassifier: Laplace GP classification with the finite NTK of a trained network.

Notation as in DESIGN.md §1 and ``_posterior``: n training points, C classes, k logits
per point (k = C, or k = 1 for a binary network with one logit), J the (n·k) x p
Jacobian at θ, s the prior variance, δ = w - θ, m(X) = f_θ(X) or 0 the prior mean.
A single logit f is the two-class softmax over (0, f), since σ(f) = softmax(0, f)₂; so
both likelihoods use the class logits F̃ = F (k = C) or F̃ = (0, F) (k = 1).

MAP. The logits F = m(X) + J δ are linear in δ, so the negative log posterior

    L(δ) = Σ_i v_i [logsumexp(F̃_i) - F̃_(i, y_i)] + ‖δ‖²/(2s)                  (1)

(v_i the sample weights, 1 by default) is convex, with gradient and Hessian

    g = Jᵀ (v ⊙ (π - Y)) + δ/s,   H = Jᵀ Λ J + I/s,   Λ_i = v_i (diag(π_i) - π_i π_iᵀ)  (2)

where π_i = softmax(F̃_i) and Y is one-hot, both restricted to the network's k logits
(k = 1: Λ_i = v_i π_i(1 - π_i)). H is the Fisher (generalized Gauss-Newton) matrix of
the linearized model, exactly. Newton's method solves H d = -g (Cholesky, or CG:
inexactly in parameter space, see ``LaplacePosterior._forcing``), then backtracks on
L(δ + t·d) (Armijo): along the line the logits are F + t·J d, one JVP. It stops once
‖g‖ ≤ tol·‖g₀‖.

Solve spaces for H⁻¹. Parameter space (size p): products H V = Jᵀ(Λ(J V)) + V/s, one
JVP and one VJP, or H assembled from Jacobian blocks. Function space (size n·k), with
Λ^½ the blockwise symmetric square root of Λ and K = s·J Jᵀ the prior kernel:

    H⁻¹ = s I - s² Jᵀ Λ^½ B⁻¹ Λ^½ J,     B = I + Λ^½ K Λ^½                    (3)

(Woodbury; B is the matrix of Rasmussen & Williams 2006, Alg. 3.2, its eigenvalues
≥ 1, and Λ may be singular as it is for softmax). Products with B are one VJP and
one JVP; dense B comes from K, assembled once.

Prediction. The Laplace posterior N(δ̂, H⁻¹) at the MAP gives, per test point, the
logit mean μ* = m(x*) + J* δ̂ and covariance Σ* = J* H⁻¹ J*ᵀ (k x k), computed as
J* (H⁻¹ J*ᵀ) with (3) in function space. Links turn them into class scores whose
softmax is the predictive distribution:

    probit: μ* / √(1 + π/8 · diag Σ*)     (MacKay 1992, per logit)
    mc:     log (1/S) Σ_s softmax(μ* + Σ*^½ z_s),   z_s ~ N(0, I_k)
    map:    μ*
"""

import math
import warnings
from numbers import Integral

import numpy as np
import torch
from sklearn.base import ClassifierMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted

from ._base import FiniteNTKBase
from ._cg import conjugate_gradient
from ._operators import KernelOperator
from ._posterior import cholesky
from ._preconditioners import (
    NYSTROM_MAX_RANK,
    JacobiPreconditioner,
    NystromPreconditioner,
    sketch_samples,
)

__all__ = ["FiniteNTKClassifier", "LaplacePosterior"]

# The base's constraints that apply here (the others are the regressor's).
_SHARED_PARAMETERS = (
    "network",
    "prior",
    "prior_mean",
    "parameters",
    "solver",
    "space",
    "tol",
    "batch_size",
    "dtype",
    "device",
    "random_state",
    "verbose",
)
# Armijo's sufficient-decrease constant and the backtracking limit of the line search.
_ARMIJO = 1e-4
_MAX_HALVINGS = 40


def _class_logits(logits, n_classes):
    """Network logits (..., k) -> class logits (..., C): one logit f means (0, f)."""
    if logits.shape[-1] == n_classes:
        return logits
    return torch.cat([torch.zeros_like(logits), logits], dim=-1)


def _psd_sqrt(matrices):
    """Symmetric square roots of positive semi-definite matrices (..., k, k)."""
    values, vectors = torch.linalg.eigh(matrices)
    return (vectors * values.clamp_min(0.0).sqrt().unsqueeze(-2)) @ vectors.mT


def _blockwise(blocks, U):
    """Apply per-sample (k, k) blocks to U of shape (n, k, m)."""
    return torch.einsum("iab,ibm->iam", blocks, U)


class _PrecisionOperator:
    """H = Jᵀ Λ J + I/s on p-vectors (parameter space), eq. (2): P + shift·I."""

    def __init__(self, jacobian, curvature, *, prior):
        self.jacobian, self.curvature = jacobian, curvature
        self.size, self.shift = jacobian.n_params, 1.0 / prior

    def psd_matmat(self, V):
        """Jᵀ Λ J V for V of shape (p, m): one JVP, the curvature blocks, one VJP."""
        JV = self.jacobian.jvp(V)
        return self.jacobian.vjp(_blockwise(self.curvature, JV))

    def matmat(self, V):
        return self.psd_matmat(V) + self.shift * V

    def subsampled(self, n_samples, generator=None):
        """H over ``n_samples`` random training samples, their J_iᵀ Λ_i J_i scaled
        by n/m (an unbiased estimate; see :meth:`JacobianProducts.subsample`);
        ``self`` when that is all of them."""
        if n_samples >= self.jacobian.n_samples:
            return self
        rows, products = self.jacobian.subsample(n_samples, generator)
        return _PrecisionOperator(products, self.curvature[rows], prior=1.0 / self.shift)

    def diagonal(self):
        """diag H = Σ_i diag(J_iᵀ Λ_i J_i) + 1/s, shape (p,)."""
        total = sum(
            torch.einsum("iap,iab,ibp->p", J, self.curvature[c], J)
            for c, J in self.jacobian.jacobian_blocks()
        )
        return total + self.shift

    def dense(self):
        """H = Σ_chunks J_cᵀ Λ_c J_c + I/s from explicit Jacobian blocks."""
        H = 0
        for c, J in self.jacobian.jacobian_blocks():
            curved = torch.einsum("iab,ibp->iap", self.curvature[c], J)
            H = H + J.flatten(0, 1).T @ curved.flatten(0, 1)
        H.diagonal().add_(self.shift)
        return H


class _WoodburyOperator:
    """B = I + Λ^½ K Λ^½ on vectors of length n·k (function space), eq. (3).

    Parameters
    ----------
    jacobian : JacobianProducts
    root : torch.Tensor of shape (n, k, k)
        Λ^½, blockwise.
    prior : float
        s, in K = s·J Jᵀ.
    gram : torch.Tensor of shape (n·k, n·k) or None
        K assembled, for :meth:`dense`.
    """

    shift = 1.0

    def __init__(self, jacobian, root, *, prior, gram=None):
        self.jacobian, self.root, self.prior, self.gram = jacobian, root, prior, gram
        self.size = root.shape[0] * root.shape[1]

    def psd_matmat(self, U):
        """Λ^½ K Λ^½ U for U of shape (n·k, m): one VJP and one JVP inside."""
        RU = _blockwise(self.root, U.reshape(*self.root.shape[:2], -1))
        KRU = self.prior * self.jacobian.jvp(self.jacobian.vjp(RU))
        return _blockwise(self.root, KRU).reshape(U.shape)

    def matmat(self, U):
        return self.psd_matmat(U) + U

    def diagonal(self):
        """diag B = 1 + diag(Λ_i^½ K_ii Λ_i^½), shape (n·k,), from Jacobian blocks."""
        parts = []
        for c, J in self.jacobian.jacobian_blocks():
            K_ii = self.prior * torch.einsum("iap,ibp->iab", J, J)
            root = self.root[c]
            parts.append(torch.einsum("iab,ibc,ica->ia", root, K_ii, root).reshape(-1))
        return 1.0 + torch.cat(parts)

    def dense(self):
        """B assembled from K: block (i, j) is δ_ij I + Λ_i^½ K_ij Λ_j^½."""
        n, k = self.root.shape[:2]
        K = self.gram.reshape(n, k, n, k)
        B = torch.einsum("iab,ibjc,jcd->iajd", self.root, K, self.root)
        B = B.reshape(self.size, self.size)
        B.diagonal().add_(1.0)
        return B


class _Hessian:
    """Products with H⁻¹ at one curvature Λ (eq. 2), in parameter or function space.

    Parameters
    ----------
    jacobian : JacobianProducts
    curvature : torch.Tensor of shape (n, k, k)
        Λ.
    prior : float
    space : {"parameter", "function"}
    solver : {"dense", "cg"}
    preconditioner : {None, "jacobi", "nystrom"}
        For CG: the exact diagonal from explicit Jacobian blocks, or an adaptive
        randomized Nyström approximation of the PSD part (Jᵀ Λ J, or Λ^½ K Λ^½).
    gram : torch.Tensor or None
        K = s·J Jᵀ assembled, needed for dense solves in function space.
    generator : torch.Generator or None
        For the Nyström sketch.
    """

    def __init__(
        self,
        jacobian,
        curvature,
        *,
        prior,
        space,
        solver,
        preconditioner,
        gram=None,
        generator=None,
    ):
        self.jacobian, self.prior, self.space = jacobian, prior, space
        if space == "parameter":
            self.operator = _PrecisionOperator(jacobian, curvature, prior=prior)
        else:
            self.root = _psd_sqrt(curvature)
            self.operator = _WoodburyOperator(jacobian, self.root, prior=prior, gram=gram)
        self._factor = self._preconditioner = None
        if solver == "dense":
            what = "Laplace precision H" if space == "parameter" else "Laplace system B"
            self._factor = cholesky(self.operator.dense(), what)
        elif preconditioner == "jacobi":
            self._preconditioner = JacobiPreconditioner(self.operator.diagonal())
        elif preconditioner == "nystrom":
            sketched = self.operator
            if space == "parameter":  # the Fisher of a subsample, as in regression
                samples = sketch_samples(
                    jacobian.n_samples, NYSTROM_MAX_RANK, jacobian.n_outputs
                )
                sketched = sketched.subsampled(samples, generator)
            self._preconditioner = NystromPreconditioner.adaptive(
                sketched.psd_matmat,
                sketched.size,
                sketched.shift,
                dtype=curvature.dtype,
                device=curvature.device,
                generator=generator,
            )

    def solve(self, B, tol, callback=None):
        """(operator)⁻¹ B for B of shape (d, m), and the CG iterations (0 if dense).

        The operator is H in parameter space and B of eq. (3) in function space.
        """
        if self._factor is not None:
            return torch.cholesky_solve(B, self._factor), 0
        result = conjugate_gradient(
            self.operator.matmat,
            B,
            preconditioner=self._preconditioner,
            tol=tol,
            callback=callback,
        )
        return result.solution, int(result.n_iter.max())

    def inverse(self, G, tol, callback=None):
        """H⁻¹ G for G of shape (p, m), and the CG iterations it took.

        Parameters
        ----------
        G : torch.Tensor of shape (p, m)
        tol : float
            CG relative residual.
        callback : callable or None
            CG progress callback.
        """
        if self.space == "parameter":
            return self.solve(G, tol, callback)
        # eq. (3): H⁻¹ G = s G - s Jᵀ Λ^½ B⁻¹ Λ^½ J (s G)
        sG = self.prior * G
        rhs = _blockwise(self.root, self.jacobian.jvp(sG))
        solution, n_iter = self.solve(rhs.reshape(self.operator.size, -1), tol, callback)
        back = _blockwise(self.root, solution.reshape(rhs.shape))
        return sG - self.prior * self.jacobian.vjp(back), n_iter


class LaplacePosterior:
    """Laplace approximation N(δ̂, H⁻¹) of the linearized network's softmax posterior.

    Finds the MAP δ̂ of eq. (1) by Newton's method with a backtracking line search,
    then keeps H at δ̂ for predictive covariances.

    Parameters
    ----------
    jacobian : JacobianProducts
        Products with J over the training inputs (k logits per sample).
    offsets : torch.Tensor of shape (n, k)
        Prior mean of the logits, m(X).
    labels : torch.Tensor of shape (n,), integer
        Class indices in 0 .. n_classes - 1.
    weights : torch.Tensor of shape (n,) or None, default=None
        Sample weights v_i multiplying each sample's log-likelihood in eq. (1);
        None for all 1.
    n_classes : int
        C; k must be C, or 1 when C = 2.
    prior : float
    space : {"parameter", "function"}
    solver : {"dense", "cg"}
    preconditioner : {None, "jacobi", "nystrom"}
        CG preconditioner, rebuilt at every Newton iteration (Λ changes).
    tol : float
        Newton stops at ‖g‖ ≤ tol·‖g₀‖; CG solves for covariances stop at relative
        residual tol.
    max_iter : int
        Newton iteration limit.
    generator : torch.Generator or None
        For the Nyström sketches.
    callback : CGProgress or None
        CG progress callback for the Newton steps, closed after them.
    report : callable or None
        Called as ``report(iteration, objective, gradient_norm, step_size,
        cg_iterations)`` after every Newton iteration.

    Attributes
    ----------
    delta : torch.Tensor of shape (p,)
        The MAP δ̂.
    n_iter : int
        Newton iterations (at least 1).
    gradient_norm : float
        ‖g‖ at δ̂.
    objective : float
        L(δ̂), eq. (1).
    """

    def __init__(
        self,
        jacobian,
        offsets,
        labels,
        *,
        weights=None,
        n_classes,
        prior,
        space,
        solver,
        preconditioner=None,
        tol=1e-6,
        max_iter=100,
        generator=None,
        callback=None,
        report=None,
    ):
        self.jacobian, self.prior, self.tol = jacobian, prior, tol
        self.n_classes, self.n_logits = n_classes, jacobian.n_outputs
        self.labels = labels
        self._weights = torch.ones_like(offsets[:, 0]) if weights is None else weights
        # Y restricted to the network's logits: the last k of the C one-hot columns.
        one_hot = torch.nn.functional.one_hot(labels, n_classes).to(offsets.dtype)
        self._targets = one_hot[:, n_classes - self.n_logits :]
        self._hessian_options = {
            "prior": prior,
            "space": space,
            "solver": solver,
            "preconditioner": preconditioner,
            "generator": generator,
        }
        if space == "function" and solver == "dense":
            # K = s·J Jᵀ, assembled once: only Λ changes between Newton iterations
            kernel = KernelOperator(jacobian, prior=prior, noise=0.0)
            self._hessian_options["gram"] = kernel.psd_dense()
        probs = self._newton(offsets, max_iter, callback, report)
        if callback is not None:  # progress reporting is for the Newton steps only
            callback.close()
        self.hessian = self._make_hessian(probs)

    # -- eqs. (1) and (2) ---------------------------------------------------------------

    def _objective(self, logits, delta):
        """L(δ) of eq. (1) and the network-logit probabilities π, shape (n, k)."""
        class_logits = _class_logits(logits, self.n_classes)
        log_probs = torch.log_softmax(class_logits, dim=-1)
        nll = -(self._weights * log_probs.gather(1, self.labels[:, None])[:, 0]).sum()
        probs = log_probs.exp()[:, self.n_classes - self.n_logits :]
        return float(nll + delta @ delta / (2 * self.prior)), probs

    def _misfit(self, probs):
        """v ⊙ (π - Y), shape (n, k): the likelihood's gradient in the logits."""
        return self._weights[:, None] * (probs - self._targets)

    def _gradient(self, probs, delta):
        """g = Jᵀ (v ⊙ (π - Y)) + δ/s, eq. (2)."""
        return self.jacobian.vjp(self._misfit(probs)) + delta / self.prior

    def _make_hessian(self, probs):
        """H at the probabilities π: Λ_i = v_i (diag(π_i) - π_i π_iᵀ), eq. (2)."""
        curvature = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        curvature = self._weights[:, None, None] * curvature
        return _Hessian(self.jacobian, curvature, **self._hessian_options)

    # -- Newton's method ------------------------------------------------------------------

    def _newton(self, offsets, max_iter, callback, report):
        """Minimize eq. (1); sets delta, n_iter, objective, gradient_norm.

        Returns the probabilities π at δ̂.
        """
        delta = offsets.new_zeros(self.jacobian.n_params)
        logits = offsets.clone()
        objective, probs = self._objective(logits, delta)
        gradient = self._gradient(probs, delta)
        initial_norm = gradient_norm = float(torch.linalg.vector_norm(gradient))
        stopping = self.tol * initial_norm
        for iteration in range(1, max_iter + 1):
            hessian = self._make_hessian(probs)
            step, cg_iterations = hessian.inverse(
                -gradient[:, None], self._forcing(gradient_norm, initial_norm), callback
            )
            step = step[:, 0]
            direction = self.jacobian.jvp(step)  # J d: the logits move by t·J d
            accepted = self._line_search(
                logits, delta, objective, gradient, step, direction
            )
            if accepted is None:
                warnings.warn(
                    f"Newton's method: the line search found no decrease at iteration "
                    f"{iteration} (gradient norm {gradient_norm:.3g}, initial "
                    f"{initial_norm:.3g}); the gradient is likely at its rounding "
                    f"floor. Loosen tol={self.tol:g} or use dtype='float64'.",
                    ConvergenceWarning,
                    stacklevel=3,
                )
                break
            step_size, objective, probs = accepted
            delta = delta + step_size * step
            logits = logits + step_size * direction
            gradient = self._gradient(probs, delta)
            gradient_norm = float(torch.linalg.vector_norm(gradient))
            if report is not None:
                report(iteration, objective, gradient_norm, step_size, cg_iterations)
            if gradient_norm <= stopping:
                break
        else:
            warnings.warn(
                f"Newton's method stopped after max_iter={max_iter} iterations with "
                f"gradient norm {gradient_norm:.3g} above tol={self.tol:g} times its "
                f"initial {initial_norm:.3g}. Increase max_iter or loosen tol.",
                ConvergenceWarning,
                stacklevel=3,
            )
        self.delta, self.n_iter = delta, iteration
        self.objective, self.gradient_norm = objective, gradient_norm
        return probs

    def _forcing(self, gradient_norm, initial_norm):
        """CG tolerance of a Newton step (inexact Newton).

        In parameter space the CG residual is the Newton residual H d + g, so it need
        only shrink with the gradient: η = min(½, √(‖g‖/‖g₀‖)) (Eisenstat & Walker
        1996). In function space a residual r of B maps to the Newton residual
        -Jᵀ Λ^½ r, up to ‖B - I‖ times larger, so CG runs to tol there.
        """
        if self._hessian_options["space"] == "function" or initial_norm == 0:
            return self.tol
        return min(0.5, math.sqrt(gradient_norm / initial_norm))

    def _line_search(self, logits, delta, objective, gradient, step, direction):
        """Backtracking on φ(t) = L(δ + t·d); returns (t, φ(t), π(t)) or None.

        t is accepted under Armijo's condition φ(t) ≤ φ(0) + c·t·φ'(0), or when
        φ'(t) ≤ 0: φ is convex, so then φ(t) ≤ φ(0) + t·φ'(t) ≤ φ(0). The second test
        still decides near the optimum, where rounding hides the decrease of φ.
        """
        slope = float(gradient @ step)
        step_size = 1.0
        for _ in range(_MAX_HALVINGS):
            trial = delta + step_size * step
            trial_objective, probs = self._objective(logits + step_size * direction, trial)
            # φ'(t) = (v ⊙ (π(t) - Y))·J d + (δ + t·d)·d / s
            derivative = float(
                (self._misfit(probs) * direction).sum() + trial @ step / self.prior
            )
            armijo = trial_objective <= objective + _ARMIJO * step_size * slope
            if armijo or derivative <= 0:
                return step_size, trial_objective, probs
            step_size /= 2
        return None

    # -- prediction -----------------------------------------------------------------------

    def covariance(self, Jt):
        """Predictive logit covariances Σ* = J* H⁻¹ J*ᵀ, one block per test point.

        Parameters
        ----------
        Jt : torch.Tensor of shape (m·k, p)
            Test Jacobian rows, k per test point.

        Returns
        -------
        torch.Tensor of shape (m, k, k)
        """
        k, p = self.n_logits, Jt.shape[1]
        m = Jt.shape[0] // k
        solved, _ = self.hessian.inverse(Jt.T, self.tol)
        return torch.einsum("iap,pib->iab", Jt.reshape(m, k, p), solved.reshape(p, m, k))


class FiniteNTKClassifier(ClassifierMixin, FiniteNTKBase):
    """Laplace GP classification with the finite-width NTK of a trained network.

    The network's logits are linearized around its trained weights θ,
    f(x; w) = f_θ(x) + J(x)(w - θ), with the prior w ~ N(θ, prior·I) and a softmax
    likelihood (sigmoid for a single logit). The negative log posterior is then
    convex in w; its minimum (MAP) is found by Newton's method with exact
    Fisher-vector products and a backtracking line search, and the Laplace
    approximation around it gives each test point a Gaussian over its logits, which
    ``link`` turns into class probabilities.

    Parameters
    ----------
    network : torch.nn.Module or None, default=None
        The trained network; it maps a batch (n, ...) to logits (n, C), one per class
        in ``classes_`` order, or, for two classes, to one logit (n,) or (n, 1) of
        ``classes_[1]``. It is deep-copied and used in eval mode; the module passed
        in is never changed. None builds a randomly initialised tanh MLP (64, 64) at
        fit time, with one logit for two classes and C logits otherwise.
    prior : float, default=1.0
        Prior variance s of the weights around θ: the kernel is s·J(x)J(x')ᵀ.
    prior_mean : {"network", "zero"}, default="network"
        Prior mean of the logits: the trained network's f_θ(x), or zero.
    parameters : list of str or None, default=None
        Names (as in ``network.named_parameters()``) of the parameters to linearize;
        the others stay fixed. None: every parameter with ``requires_grad=True``.
    link : {"probit", "mc", "map"}, default="probit"
        How the Gaussian over the logits μ*, Σ* becomes probabilities: the probit
        approximation softmax(μ*/√(1 + π/8·diag Σ*)); Monte Carlo, the mean softmax
        over ``n_samples`` draws from N(μ*, Σ*); or softmax(μ*), ignoring Σ*.
    n_samples : int, default=1000
        Draws per test point for ``link="mc"``. The same standard normal draws are
        used for every test point of a call, so each point's prediction depends only
        on that point.
    solver : {"auto", "dense", "cg"}, default="auto"
        Cholesky of the assembled system, or conjugate gradient with matrix-free
        Fisher-vector products. "auto" picks dense for systems up to 4096.
    space : {"auto", "function", "parameter"}, default="auto"
        Solve with H = JᵀΛJ + I/prior (size p) or, via Woodbury, with
        B = I + Λ^½ (prior·JJᵀ) Λ^½ (size n·k). "auto" picks the smaller.
    preconditioner : {"auto", "jacobi", "nystrom"} or None, default="auto"
        CG preconditioner, rebuilt at every Newton iteration: "jacobi" takes the exact
        diagonal from explicit Jacobian blocks; "nystrom" an adaptive randomized
        Nyström approximation (Frangella, Tropp & Udell 2021) of Jᵀ Λ J (sketched
        from max(4·512/k, 1024) random samples, rescaled, as in regression), or of
        Λ^½ K Λ^½ in function space. "auto" means "nystrom".
    tol : float, default=1e-6
        Newton stops when the gradient norm falls to tol times its initial value;
        CG solves for predictive covariances stop at relative residual tol.
    max_iter : int, default=100
        Newton iteration limit.
    batch_size : int, default=256
        Samples per chunk in every Jacobian product and explicit Jacobian block.
    dtype : {"float64", "float32"}, default="float64"
        Precision of all torch computation (the network copy is cast to it).
    device : str or torch.device, default="cpu"
        Where the network copy, the data and all computation live. A fitted
        estimator pickles with its tensors on the CPU and loads back on this device,
        or on the CPU with a ``DeviceFallbackWarning`` where the machine lacks it
        (see the user guide, "Saving and loading").
    random_state : int, RandomState instance or None, default=None
        Seeds the default network's initialisation and the draws of ``link="mc"``.
    verbose : int, default=0
        Print Newton and CG progress when positive.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Sorted class labels; logit j is ``classes_[j]`` (one logit: ``classes_[1]``).
    network_ : torch.nn.Module
        The private eval-mode copy of the network.
    delta_ : torch.Tensor of shape (``n_params_``,)
        MAP of w - θ; the predictive logit mean is f_θ(x) + J(x)·``delta_`` (without
        the f_θ term for ``prior_mean="zero"``).
    n_features_in_ : int
    input_shape_ : tuple
        Per-sample shape of X seen in fit.
    n_logits_ : int
        Logits per sample: n_classes, or 1 for a binary network with one logit.
    n_params_ : int
    space_, solver_ : str
        The resolved solve space and solver.
    preconditioner_ : str or None
        The resolved CG preconditioner (unused by the dense solver).
    n_iter_ : int
        Newton iterations of the fit.
    forward_mode_ : bool
        False when the network lacks forward-mode rules and J·v uses a double VJP.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from sklearn_fntk import FiniteNTKClassifier
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = FiniteNTKClassifier(random_state=0).fit(X, y)
    >>> proba = clf.predict_proba(X[:3])
    """

    _parameter_constraints = {
        **{name: FiniteNTKBase._parameter_constraints[name] for name in _SHARED_PARAMETERS},
        "preconditioner": [StrOptions({"auto", "jacobi", "nystrom"}), None],
        "link": [StrOptions({"probit", "mc", "map"})],
        "n_samples": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(
        self,
        network=None,
        *,
        prior=1.0,
        prior_mean="network",
        parameters=None,
        link="probit",
        n_samples=1000,
        solver="auto",
        space="auto",
        preconditioner="auto",
        tol=1e-6,
        max_iter=100,
        batch_size=256,
        dtype="float64",
        device="cpu",
        random_state=None,
        verbose=0,
    ):
        self.network = network
        self.prior = prior
        self.prior_mean = prior_mean
        self.parameters = parameters
        self.link = link
        self.n_samples = n_samples
        self.solver = solver
        self.space = space
        self.preconditioner = preconditioner
        self.tol = tol
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Find the MAP and Laplace posterior of the linearized network on (X, y).

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Inputs in the shape the network takes (2-D features or n-D images).
        y : array-like of shape (n_samples,)
            Class labels, any sortable values.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative per-sample weights multiplying each sample's log-likelihood
            (and so its gradient and Laplace curvature), as in LogisticRegression. An
            integer weight is the same as repeating the sample that many times and a
            zero weight as leaving it out (``classes_`` are those of the samples
            kept). None: all weights 1.

        Returns
        -------
        self : FiniteNTKClassifier
        """
        X, y, sample_weight = self._validate_fit_data(X, y, sample_weight)
        check_classification_targets(y)
        self.classes_, labels = np.unique(y, return_inverse=True)
        n_classes = len(self.classes_)
        if n_classes < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes in y; got "
                f"1 class: {self.classes_.tolist()}."
            )
        self._network = self._make_network(X, 1 if n_classes == 2 else n_classes)
        jacobian = self._training_jacobian(self._tensor(X), cache=True)
        self.forward_mode_ = jacobian.forward_mode
        self.n_logits_ = jacobian.n_outputs
        self.space_, self.solver_ = self._choose(
            X.shape[0] * self.n_logits_, self._network.n_params
        )
        self.preconditioner_ = (
            "nystrom" if self.preconditioner == "auto" else self.preconditioner
        )
        offsets = jacobian.outputs
        if self.prior_mean == "zero":
            offsets = torch.zeros_like(offsets)
        self._posterior = LaplacePosterior(
            jacobian,
            offsets,
            torch.as_tensor(labels, device=offsets.device),
            weights=None if sample_weight is None else self._tensor(sample_weight),
            n_classes=n_classes,
            prior=self.prior,
            space=self.space_,
            solver=self.solver_,
            preconditioner=self.preconditioner_,
            tol=self.tol,
            max_iter=self.max_iter,
            generator=self._generator(),
            callback=self._cg_progress(),
            report=self._newton_progress(),
        )
        self.delta_ = self._posterior.delta
        self.n_iter_ = self._posterior.n_iter
        return self

    def _check_output_count(self, n_network, n_expected):
        """k must be C, or 1 for two classes (``n_expected`` is the default's k)."""
        n_classes = len(self.classes_)
        if n_network == n_classes or (n_classes == 2 and n_network == 1):
            return
        expected = f"{n_classes} (one per class in classes_ order)"
        if n_classes == 2:
            expected += " or 1 (the logit of classes_[1])"
        raise ValueError(
            f"The network produces {n_network} logit(s) per sample, but y has "
            f"{n_classes} classes; expected {expected}."
        )

    def _newton_progress(self):
        """A Newton callback printing progress when ``verbose > 0``."""
        if not self.verbose:
            return None

        def report(iteration, objective, gradient_norm, step_size, cg_iterations):
            print(
                f"[{type(self).__name__}] Newton iteration {iteration}: objective "
                f"{objective:.6g}, gradient norm {gradient_norm:.3e}, step size "
                f"{step_size:g}, {cg_iterations} CG iteration(s)"
            )

        return report

    # -- prediction -----------------------------------------------------------------------

    def _scores(self, X):
        """The link's class scores, shape (m, C); their softmax is predict_proba."""
        check_is_fitted(self)
        X = self._tensor(self._validate_predict_X(X))
        n_classes = len(self.classes_)
        if self.link == "mc":
            rng = check_random_state(self.random_state)
            draws = self._tensor(rng.standard_normal((self.n_samples, self.n_logits_)))
        parts = []
        for start in range(0, X.shape[0], self.batch_size):
            chunk = X[start : start + self.batch_size]
            mean = self._latent_mean(chunk)
            if self.link == "map":
                parts.append(_class_logits(mean, n_classes))
                continue
            cov = self._posterior.covariance(self._test_jacobian(chunk))
            if self.link == "probit":
                variance = cov.diagonal(dim1=1, dim2=2).clamp_min(0.0)
                scaled = mean / torch.sqrt(1.0 + math.pi / 8.0 * variance)
                parts.append(_class_logits(scaled, n_classes))
                continue
            # mc: logits μ + Σ^½ z_s, shape (m, S, k); log of the mean softmax
            samples = mean[:, None, :] + torch.einsum("iab,sb->isa", _psd_sqrt(cov), draws)
            log_probs = torch.log_softmax(_class_logits(samples, n_classes), dim=-1)
            parts.append(torch.logsumexp(log_probs, dim=1) - math.log(self.n_samples))
        return torch.cat(parts)

    def decision_function(self, X):
        """The link's scores: they rank classes as :meth:`predict_proba` does.

        probit: moderated logits μ*/√(1 + π/8·diag Σ*); mc: log-probabilities;
        map: logits μ*. With one logit the first class scores 0.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)

        Returns
        -------
        scores : ndarray of shape (n_samples,) or (n_samples, n_classes)
            For two classes, the log-odds of ``classes_[1]`` under the link (the
            difference of the two scores).
        """
        scores = self._numpy(self._scores(X))
        return scores[:, 1] - scores[:, 0] if scores.shape[1] == 2 else scores

    def predict_proba(self, X):
        """Predictive class probabilities under ``link``.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
            Columns in ``classes_`` order.
        """
        return self._numpy(torch.softmax(self._scores(X), dim=-1))

    def predict_log_proba(self, X):
        """Logarithm of :meth:`predict_proba`, computed stably.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)

        Returns
        -------
        log_proba : ndarray of shape (n_samples, n_classes)
        """
        return self._numpy(torch.log_softmax(self._scores(X), dim=-1))

    def predict(self, X):
        """The most probable class under ``link``.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)

        Returns
        -------
        y_pred : ndarray of shape (n_samples,)
        """
        scores = self._numpy(self._scores(X))
        return self.classes_[scores.argmax(axis=1)]
