"""Laplace approximation of the linearized network's softmax posterior.

Notation as in the user guide ("The method"): n training points, C classes, k logits
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
JVP and one VJP, or H assembled from Jacobian blocks (:class:`ParameterOperator` with
the curvature Λ). Function space (size n·k, :class:`FunctionOperator`), with
Λ^½ the blockwise symmetric square root of Λ and K = s·J Jᵀ the prior kernel:

    H⁻¹ = s I - s² Jᵀ Λ^½ B⁻¹ Λ^½ J,     B = I + Λ^½ K Λ^½                    (3)

(Woodbury; B is the matrix of Rasmussen & Williams 2006, Alg. 3.2, its eigenvalues
≥ 1, and Λ may be singular as it is for softmax). Products with B are one VJP and
one JVP; dense B comes from K, assembled once.

Prediction. The Laplace posterior N(δ̂, H⁻¹) at the MAP gives, per test point, the
logit mean μ* = m(x*) + J* δ̂ and covariance Σ* = J* H⁻¹ J*ᵀ (k x k), computed by
:meth:`LinearSystem.covariance` (with (3) in function space), as regression's.
"""

import math
import threading

import torch

from .._stages import NO_STAGES
from .low_rank import low_rank_from_eigenpairs
from .operators import FunctionOperator, ParameterOperator, blockwise, psd_sqrt
from .system import LinearSystem, build_preconditioner

__all__ = ["LaplacePosterior", "class_logits"]

# Armijo's sufficient-decrease constant and the backtracking limit of the line search.
_ARMIJO = 1e-4
_MAX_HALVINGS = 40
# Steps running that fail to halve ‖g‖ near the optimum before Newton's method stops
# at the rounding floor.
_STAGNANT_STEPS = 2
# Guards the low-rank covariance built at the first probit prediction (one per posterior).
_LOW_RANK_LOCK = threading.Lock()
_ADVICE = {
    "memory": "use solver='cg', or space='auto'",
    "definite": ("lower prior",),
}


def class_logits(logits, n_classes):
    """Network logits (..., k) -> class logits (..., C): one logit f means (0, f)."""
    if logits.shape[-1] == n_classes:
        return logits
    return torch.cat([torch.zeros_like(logits), logits], dim=-1)


class LaplacePosterior:
    """Laplace approximation N(δ̂, H⁻¹) of the linearized network's softmax posterior.

    The constructor stores; :meth:`fit` finds the MAP δ̂ of eq. (1) by Newton's
    method with a backtracking line search, then keeps H at δ̂ for predictive
    covariances. Nothing here warns: the results say what happened.

    Parameters
    ----------
    jacobian : JacobianProducts
        Products with J over the training inputs (k logits per sample).
    offsets : torch.Tensor of shape (n, k)
        Prior mean of the logits, m(X).
    labels : torch.Tensor of shape (n,), integer
        Class indices in 0 .. n_classes - 1.
    weights : torch.Tensor of shape (n,) or None
        Sample weights v_i multiplying each sample's log-likelihood in eq. (1);
        None for all 1.
    n_classes : int
        C; k must be C, or 1 when C = 2.
    prior : float
    choices : Choices
        Resolved space, solver and preconditioner (rebuilt at every Newton
        iteration: Λ changes).
    policy : Policy
    tol : float
        Newton stops at ‖g‖ ≤ tol·‖g₀‖; covariances are accurate to tol.
    max_iter : int or None
        CG iteration limit per solve.
    max_newton_iter : int
        Newton iteration limit.

    Attributes
    ----------
    delta : torch.Tensor of shape (p,)
        The MAP δ̂.
    n_iter : int
        Newton iterations (at least 1).
    cg_iterations : int
        CG iterations summed over the Newton steps (1 per dense solve).
    unconverged_solves : int
        Newton steps whose CG solve fell short of its stopping rule.
    drifted_solves : int
        Of those, the solves whose recurrence met the rule but whose true residual
        did not (rounding; see ``conjugate_gradient``).
    converged : bool
        Whether ‖g‖ ≤ tol·‖g₀‖ was reached.
    stalled : bool
        Whether Newton's method stopped at the gradient's rounding floor: the line
        search found no decrease, or, once ‖g‖ ≤ √ε·‖g₀‖ (ε of the dtype), two
        steps running failed to halve ‖g‖ (Newton's method converges superlinearly
        there, so only rounding keeps it from doing so).
    gradient_norm, initial_gradient_norm : float
        ‖g‖ at δ̂ and at δ = 0.
    objective : float
        L(δ̂), eq. (1).
    probs : torch.Tensor of shape (n, k)
        π at δ̂, over the network's k logits.
    weights : torch.Tensor of shape (n,)
        The sample weights v (ones when none were given).
    gram : torch.Tensor of shape (n·k, n·k) or None
        G = J Jᵀ, for the dense function-space solver (None otherwise).
    system : LinearSystem
        Solves with H (or B) at δ̂.
    """

    def __init__(
        self,
        jacobian,
        offsets,
        labels,
        *,
        weights,
        n_classes,
        prior,
        choices,
        policy,
        tol=1e-6,
        max_iter=None,
        max_newton_iter=100,
    ):
        self.jacobian, self.offsets, self.labels = jacobian, offsets, labels
        self.prior, self.choices, self.policy = prior, choices, policy
        self.tol, self.max_iter, self.max_newton_iter = tol, max_iter, max_newton_iter
        self.n_classes, self.n_logits = n_classes, jacobian.n_outputs
        self.weights = torch.ones_like(offsets[:, 0]) if weights is None else weights
        # Y restricted to the network's logits: the last k of the C one-hot columns.
        one_hot = torch.nn.functional.one_hot(labels, n_classes).to(offsets.dtype)
        self._targets = one_hot[:, n_classes - self.n_logits :]

    def at_prior(self, prior):
        """An unfitted posterior of the same data and settings at prior ``prior``."""
        return LaplacePosterior(
            self.jacobian,
            self.offsets,
            self.labels,
            weights=self.weights,
            n_classes=self.n_classes,
            prior=prior,
            choices=self.choices,
            policy=self.policy,
            tol=self.tol,
            max_iter=self.max_iter,
            max_newton_iter=self.max_newton_iter,
        )

    def fit(self, *, start=None, gram=None, generator=None, stages=NO_STAGES):
        """Find the MAP by Newton's method and build H there.

        Parameters
        ----------
        start : torch.Tensor of shape (p,) or None
            Where Newton's method starts (the MAP at another prior, when searching
            over priors); None for δ = 0. The stopping rule is relative to the
            gradient at δ = 0 either way.
        gram : torch.Tensor of shape (n·k, n·k) or None
            G = J Jᵀ already assembled (the ``gram`` of a fit on the same data), for
            the dense function-space solver; None assembles it there.
        generator : torch.Generator or None
            For the Nyström sketches.
        stages : Stages
            Where the Gram matrix and Newton's method (a step per iteration:
            objective, gradient norm, step size, CG iterations) are reported.

        Returns
        -------
        self
        """
        self.gram = None
        if self.choices.solver == "dense":
            self._check_dense()
        if self.choices.space == "function" and self.choices.solver == "dense":
            # G = J Jᵀ, assembled once: only Λ changes between Newton iterations
            if gram is None:
                operator = FunctionOperator(self.jacobian, prior=1.0, shift=1.0)
                with stages("Gram matrix", size=operator.size):
                    gram = operator.gram_dense()
            self.gram = gram
        with stages("Newton's method", total=self.max_newton_iter) as stage:
            self.probs = self._newton(start, generator, stage)
            stage.note(
                prior=self.prior,
                iterations=self.n_iter,
                cg_iterations=self.cg_iterations,
                gradient_norm=self.gradient_norm,
            )
        self.system = self._system(self.probs, generator)
        return self

    def _check_dense(self):
        """Raise MemoryError unless the dense Newton steps fit, before any is taken:
        the Gram matrix J Jᵀ kept through the fit (function space), and one system
        at a time with its factor."""
        delta = self.offsets.new_zeros(self.jacobian.n_params)
        operator, what = self._operator(self._objective(self.offsets, delta)[1])
        system = LinearSystem(operator, solver="dense", tol=self.tol)
        gram_held = self.choices.space == "function"
        system.check_dense(what, _ADVICE["memory"], gram_held=gram_held)

    def _operator(self, probs):
        """The operator of H at the probabilities π, Λ_i = v_i (diag(π_i) - π_i π_iᵀ),
        and what it is called in messages."""
        curvature = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        curvature = self.weights[:, None, None] * curvature
        if self.choices.space == "parameter":
            operator = ParameterOperator(
                self.jacobian, shift=1.0 / self.prior, curvature=curvature
            )
            what = "Laplace precision H"
        else:
            operator = FunctionOperator(
                self.jacobian, prior=self.prior, shift=1.0, root=psd_sqrt(curvature)
            )
            what = "Laplace system B"
        return operator, what

    def _system(self, probs, generator):
        """The solver of H at the probabilities π (see :meth:`_operator`), its
        Nyström sketch drawn from ``generator`` (not kept: a fitted posterior holds
        no random state, which would neither pickle across devices nor be safe to
        share between threads)."""
        operator, what = self._operator(probs)
        system = LinearSystem(
            operator, solver=self.choices.solver, tol=self.tol, max_iter=self.max_iter
        )
        preconditioner = build_preconditioner(
            operator,
            self.choices.preconditioner,
            rank=None,
            tol=self.tol,
            generator=generator,
            policy=self.policy,
        )
        return system.build(
            preconditioner=preconditioner, gram=self.gram, what=what, advice=_ADVICE
        )

    def _inverse(self, system, G, tol):
        """H⁻¹ G for G of shape (p, m), and the CG report.

        Function space, eq. (3): H⁻¹ G = s G - s Jᵀ Λ^½ B⁻¹ Λ^½ J (s G).
        """
        if self.choices.space == "parameter":
            result = system.solve(G, tol=tol)
            return result.solution, result
        root = system.operator.root
        sG = self.prior * G
        rhs = blockwise(root, self.jacobian.jvp(sG))
        result = system.solve(rhs.reshape(system.size, -1), tol=tol)
        back = blockwise(root, result.solution.reshape(rhs.shape))
        return sG - self.prior * self.jacobian.vjp(back), result

    def inverse(self, G):
        """H⁻¹ G at δ̂ for G of shape (p, m), to ``tol``, and the CG report."""
        return self._inverse(self.system, G, self.tol)

    # -- eqs. (1) and (2) ---------------------------------------------------------------

    def _objective(self, logits, delta):
        """L(δ) of eq. (1) and the network-logit probabilities π, shape (n, k)."""
        log_probs = torch.log_softmax(class_logits(logits, self.n_classes), dim=-1)
        nll = -(self.weights * log_probs.gather(1, self.labels[:, None])[:, 0]).sum()
        nll = self.jacobian.reduction.sum_float(nll)  # over the shards
        probs = log_probs.exp()[:, self.n_classes - self.n_logits :]
        return nll + float(delta @ delta) / (2 * self.prior), probs

    def _misfit(self, probs):
        """v ⊙ (π - Y), shape (n, k): the likelihood's gradient in the logits."""
        return self.weights[:, None] * (probs - self._targets)

    def _gradient(self, probs, delta):
        """g = Jᵀ (v ⊙ (π - Y)) + δ/s, eq. (2)."""
        return self.jacobian.vjp(self._misfit(probs)) + delta / self.prior

    # -- Newton's method ------------------------------------------------------------------

    def _newton(self, start, generator, stage):
        """Minimize eq. (1) from ``start`` (None: 0), its systems' sketches drawn
        from ``generator``, a step of ``stage`` per iteration; sets the Newton
        attributes (see the class docstring).

        Returns the probabilities π at δ̂.
        """
        delta = self.offsets.new_zeros(self.jacobian.n_params)
        logits = self.offsets.clone()
        objective, probs = self._objective(logits, delta)
        gradient = self._gradient(probs, delta)
        initial_norm = gradient_norm = float(torch.linalg.vector_norm(gradient))
        if start is not None:
            delta = start.clone()
            logits = logits + self.jacobian.jvp(delta)
            objective, probs = self._objective(logits, delta)
            gradient = self._gradient(probs, delta)
            gradient_norm = float(torch.linalg.vector_norm(gradient))
        stopping = self.tol * initial_norm
        self.cg_iterations = self.unconverged_solves = self.drifted_solves = 0
        self.converged = self.stalled = False
        rounding_regime = math.sqrt(torch.finfo(delta.dtype).eps) * initial_norm
        iteration = stagnant = 0
        while iteration < self.max_newton_iter:
            iteration += 1
            forcing = self._forcing(gradient_norm, initial_norm)
            # the system is dropped once solved: one (and its factor) at a time
            step, solve = self._inverse(
                self._system(probs, generator), -gradient[:, None], forcing
            )
            cg_iterations = int(solve.n_iter.max())
            self.cg_iterations += cg_iterations
            self.unconverged_solves += not solve.all_converged
            self.drifted_solves += solve.any_drifted
            step = step[:, 0]
            direction = self.jacobian.jvp(step)  # J d: the logits move by t·J d
            accepted = self._line_search(
                logits, delta, objective, gradient, step, direction
            )
            if accepted is None:
                self.stalled = True
                break
            step_size, objective, probs = accepted
            delta = delta + step_size * step
            logits = logits + step_size * direction
            gradient = self._gradient(probs, delta)
            previous_norm = gradient_norm
            gradient_norm = float(torch.linalg.vector_norm(gradient))
            stage.step(
                objective=objective,
                gradient_norm=gradient_norm,
                step_size=step_size,
                cg_iterations=cg_iterations,
            )
            if gradient_norm <= stopping:
                self.converged = True
                break
            halved = gradient_norm <= previous_norm / 2
            stagnant = 0 if halved or gradient_norm > rounding_regime else stagnant + 1
            if stagnant == _STAGNANT_STEPS:
                self.stalled = True
                break
        self.delta, self.n_iter = delta, iteration
        self.objective, self.gradient_norm = objective, gradient_norm
        self.initial_gradient_norm = initial_norm
        return probs

    def _forcing(self, gradient_norm, initial_norm):
        """CG tolerance of a Newton step (inexact Newton).

        In parameter space the CG residual is the Newton residual H d + g, so it need
        only shrink with the gradient: η = min(½, √(‖g‖/‖g₀‖)) (Eisenstat & Walker
        1996). In function space a residual r of B maps to the Newton residual
        -Jᵀ Λ^½ r, up to ‖B - I‖ times larger, so CG runs to tol there.
        """
        if self.choices.space == "function" or initial_norm == 0:
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
            fit_slope = (self._misfit(probs) * direction).sum()
            derivative = self.jacobian.reduction.sum_float(fit_slope) + float(
                trial @ step / self.prior
            )
            armijo = trial_objective <= objective + _ARMIJO * step_size * slope
            if armijo or derivative <= 0:
                return step_size, trial_objective, probs
            step_size /= 2
        return None

    # -- prediction -----------------------------------------------------------------------

    def covariance(self, X):
        """Predictive logit covariances Σ* = J* H⁻¹ J*ᵀ, one (k, k) block per test point.

        Parameters
        ----------
        X : torch.Tensor of shape (m, ...)

        Returns
        -------
        values : torch.Tensor of shape (m, k, k)
        report : CGResult
        """
        return self.system.covariance(X, "blocks", parameter_scale=1.0)

    def low_rank(self):
        """The low-rank Laplace covariance for the probit link, or None where it
        is not used (``policy.probit_error`` None, a CG fit, or a system larger
        than ``policy.eigen_size``).

        With the eigenpairs (f_j, v_j) of JᵀΛJ (from those of Λ^½ J Jᵀ Λ^½ in
        function space), H⁻¹ = s·(I - Σ_j w_j v_j v_jᵀ) with w_j = s f_j/(1 + s f_j);
        the directions of weight above ``policy.probit_tail_weight`` are kept. Built
        at the first call from the fit's Cholesky factor L (L Lᵀ = H, or B = I +
        s·Λ^½ J Jᵀ Λ^½: no training products in parameter space, so after a
        data-parallel fit too) and kept, under a lock; thread-safe.

        Returns
        -------
        LowRankVariance or None
        """
        policy, operator = self.policy, self.system.operator
        if (
            policy.probit_error is None
            or self.choices.solver != "dense"
            or operator.size > policy.eigen_size
        ):
            return None
        with _LOW_RANK_LOCK:
            low_rank = self.__dict__.get("_low_rank")
            if low_rank is None:
                factor = self.system.factor
                curved = factor @ factor.T  # P + shift·I
                curved.diagonal().sub_(operator.shift)
                if self.choices.space == "function":  # P = s·Λ^½ J Jᵀ Λ^½
                    curved /= self.prior
                low_rank = low_rank_from_eigenpairs(
                    operator,
                    prior=self.prior,
                    noise=1.0,
                    rank=None,
                    gram=curved,
                    policy=policy,
                    min_weight=policy.probit_tail_weight,
                )
                self._low_rank = low_rank
        return low_rank

    def variances(self, X):
        """Low-rank logit variances at test inputs X and a bound on their error.

        Parameters
        ----------
        X : torch.Tensor of shape (m, ...)

        Returns
        -------
        variance, overestimate : torch.Tensor of shape (m, k)
            The variances never fall below the exact ones, and exceed them by at
            most ``overestimate`` (see :meth:`LowRankVariance.diagonal`). None
            where :meth:`low_rank` is.
        """
        low_rank = self.low_rank()
        if low_rank is None:
            return None
        variance, overestimate = low_rank.diagonal(
            self.system.operator, X, self.prior, return_bound=True
        )
        shape = (X.shape[0], self.n_logits)
        return variance.reshape(shape), overestimate.reshape(shape)
