"""Exact Gaussian posterior of the linearized network, in function or parameter space.

Notation as in the user guide ("The method"): r = y - m(X) the training residuals
(n, k) flattened to n·k, s the prior variance, σ² the noise variance,
K = s·J Jᵀ + σ² I and A = Jᵀ J + (σ²/s) I.

    δ = s·Jᵀ K⁻¹ r = A⁻¹ Jᵀ r                              (push-through identity)
    cov(x*) = s·J* J*ᵀ - s²·(J J*ᵀ)ᵀ K⁻¹ (J J*ᵀ) = σ²·J* A⁻¹ J*ᵀ   (Woodbury)
    log p(y) = -½ rᵀK⁻¹r - ½ log|K| - (n·k/2) log 2π, where in parameter space
        rᵀK⁻¹r = (rᵀr - (Jᵀr)ᵀ δ) / σ²,
        log|K| = n·k·log σ² + p·log(s/σ²) + log|A|     (matrix determinant lemma)

Solves go through :class:`LinearSystem` (a Cholesky factor or preconditioned CG).
Predictive variances are exact (a solve per test batch) or low-rank
(:mod:`.low_rank`).
"""

import math
import threading

from .._linalg.cg import iteration_limit
from .._stages import NO_STAGES
from .evidence import spectral_evidence
from .low_rank import low_rank_from_eigenpairs, low_rank_from_sketch
from .operators import FunctionOperator, ParameterOperator
from .stochastic_evidence import stochastic_log_marginal_likelihood
from .system import LinearSystem, build_preconditioner, eigen_parts

__all__ = ["GaussianPosterior"]

_ADVICE = {
    "memory": "use solver='cg', or space='auto'",
    "definite": ("increase noise", "lower prior"),
}
_EVIDENCE_ADVICE = "use log_marginal_likelihood(method='stochastic')"
# The exact evidence after a CG fit assembles a factor once, at the first call,
# which may come from several threads at once.
_EVIDENCE_LOCK = threading.Lock()


class GaussianPosterior:
    """Posterior over δ = w - θ given Gaussian observations of the linearized network.

    The constructor stores; :meth:`fit` builds the solver and solves.

    Parameters
    ----------
    jacobian : JacobianProducts
        Products with J over the training inputs.
    residuals : torch.Tensor of shape (n, k)
    prior, noise : float
    choices : Choices
        Resolved space, solver, preconditioner and variance method.
    fisher_product : {"exact", "finite_difference"}, default="exact"
        How the parameter-space operator multiplies by JᵀJ.
    structured : LayerwiseKernel or None, default=None
        Per-layer kernel for function space (Linear/elementwise networks).
    rank : int or None, default=None
        Rank of the Nyström / pivoted Cholesky preconditioner and of the low-rank
        variance; None grows it adaptively up to ``policy.max_rank``.
    tol : float, default=1e-6
    max_iter : int or None, default=None
    policy : Policy

    Attributes
    ----------
    operator : ParameterOperator or FunctionOperator
    system : LinearSystem
    variance_system : LinearSystem
        Serves predictive covariances: ``system``, or for exact variances with CG a
        dense factor of the same operator (where ``Policy.factors``).
    delta : torch.Tensor of shape (p,)
        Posterior mean of w - θ, after :meth:`fit`.
    report : CGResult
        The fit solve's report.
    condition_number : float
        κ of the system solved (see ``LinearSystem.condition_number``): in a dtype
        of unit roundoff u, rounding alone may move δ, and the predictive mean, by
        about u·κ (relative), by CG or by the dense factor.
    rank : int
        Rank of the preconditioner or low-rank variance built (0 if none).
    low_rank : LowRankVariance or None
    residual_sq_norm : float
        ‖r‖², over all shards of a data-parallel fit (as are the products).
    n_rows : int
        n·k, over all shards.
    """

    def __init__(
        self,
        jacobian,
        residuals,
        *,
        prior,
        noise,
        choices,
        policy,
        fisher_product="exact",
        structured=None,
        rank=None,
        tol=1e-6,
        max_iter=None,
    ):
        self.jacobian, self.residuals = jacobian, residuals.reshape(-1)
        self._shape = residuals.shape
        self.prior, self.noise, self.choices, self.policy = prior, noise, choices, policy
        self.fisher_product, self.structured = fisher_product, structured
        self.rank_option, self.tol, self.max_iter = rank, tol, max_iter

    @property
    def space(self):
        return self.choices.space

    def _operator(self):
        if self.space == "function":
            return FunctionOperator(
                self.jacobian,
                prior=self.prior,
                shift=self.noise,
                structured=self.structured,
            )
        return ParameterOperator(
            self.jacobian, shift=self.noise / self.prior, fisher_product=self.fisher_product
        )

    def fit(self, *, gram=None, generator=None, stages=NO_STAGES):
        """Build the solver (factor, preconditioner, low-rank variance) and solve.

        Parameters
        ----------
        gram : torch.Tensor of shape (d, d) or None
            J Jᵀ (function space) or JᵀJ (parameter space) already assembled, reused
            instead of assembling it again.
        generator : torch.Generator or None
            Randomness of the Nyström sketches.
        stages : Stages
            Where the stages (factor, preconditioner, solve, ...) are reported.

        Returns
        -------
        self
        """
        choices, policy, rank = self.choices, self.policy, self.rank_option
        operator = self._operator()
        system = LinearSystem(
            operator, solver=choices.solver, tol=self.tol, max_iter=self.max_iter
        )
        low_rank = None
        low_rank_variance = choices.variance == "low_rank"
        exact_eigenpairs = low_rank_variance and operator.size <= policy.eigen_size
        if choices.solver == "dense":
            eigen_phase = []
            if exact_eigenpairs:  # the Gram matrix and its eigendecomposition
                eigen_phase = eigen_parts(operator, self.jacobian.w.dtype)
            system.check_dense(
                f"{self.space}-space system",
                _ADVICE["memory"],
                gram_held=gram is not None or exact_eigenpairs,
                phases=[eigen_phase],
            )
        if gram is None and choices.solver == "dense" and exact_eigenpairs:
            with stages("Gram matrix", size=operator.size):
                gram = operator.gram_dense()  # assembled once for both uses
        variance_options = dict(
            prior=self.prior, noise=self.noise, rank=rank, policy=policy
        )
        if exact_eigenpairs:
            with stages("low-rank variance (eigenpairs)") as stage:
                low_rank = low_rank_from_eigenpairs(operator, gram=gram, **variance_options)
                stage.note(rank=low_rank.rank)
        elif low_rank_variance:
            with stages("low-rank variance (Nystrom sketch)") as stage:
                low_rank = low_rank_from_sketch(
                    operator, generator=generator, **variance_options
                )
                stage.note(rank=low_rank.rank)
        if choices.preconditioner is not None:
            with stages("preconditioner", kind=choices.preconditioner) as stage:
                preconditioner = build_preconditioner(
                    operator,
                    choices.preconditioner,
                    rank=rank,
                    tol=self.tol,
                    generator=generator,
                    policy=policy,
                    low_rank=low_rank,
                )
                stage.note(rank=getattr(preconditioner, "rank", 0))
        else:
            preconditioner = None
        what = f"{self.space}-space system"
        if choices.solver == "dense":
            with stages("dense factor", size=operator.size):
                system.build(gram=gram, what=what, advice=_ADVICE)
        else:
            system.build(preconditioner=preconditioner, what=what, advice=_ADVICE)
        total = None
        if choices.solver == "cg":
            total = iteration_limit(self.max_iter, operator.size)
        with stages(f"solve ({choices.solver}, {self.space} space)", total=total) as stage:

            def callback(iteration, residuals):
                stage.step(residual=float(residuals.max()))

            if self.space == "function":
                # α = K⁻¹ r ; δ = s·Jᵀ α
                rhs = self.residuals
                report = system.solve(rhs, callback=callback)
                delta = self.prior * self.jacobian.vjp(report.solution.reshape(self._shape))
            else:
                # δ = A⁻¹ Jᵀ r
                rhs = self.jacobian.vjp(self.residuals.reshape(self._shape))
                report = system.solve(rhs, callback=callback)
                delta = report.solution
            if choices.solver == "cg":
                residual = report.true_residual_norms
                stage.note(
                    iterations=int(report.n_iter.max()),
                    residual=float(residual.max()),
                    tol=self.tol,
                )
        # ‖r‖² and n·k over the shards, for the evidence
        reduction, r = self.jacobian.reduction, self.residuals
        self.residual_sq_norm = reduction.sum_float(r @ r)
        self.n_rows = int(reduction.sum_float(r.numel()))
        with stages("condition number"):
            self.condition_number = system.condition_number(generator)
        variance_system = system
        factored = choices.variance == "exact" and choices.solver == "cg"
        itemsize = self.jacobian.w.element_size()
        if factored and policy.factors(self.space, operator.size, self.n_rows, itemsize):
            # exact variances from one dense factor, whatever n: a Cholesky solve
            # per test batch instead of a CG solve
            dense = LinearSystem(operator, solver="dense", tol=self.tol)
            with stages("variance factor", size=operator.size) as stage:
                try:
                    dense.check_dense(what, _ADVICE["memory"], gram_held=gram is not None)
                    dense.build(gram=gram, what=what, advice=_ADVICE)
                except (MemoryError, ValueError):
                    # too large for memory now, or not positive definite in this
                    # dtype (float32 at a tiny noise): CG solves per test batch,
                    # which a data-parallel fit's predictions cannot make
                    if self.jacobian.reduction.distributed:
                        raise
                    dense = system
                    stage.note(fallback="CG per test batch")
            variance_system = dense
        ranks = [0 if low_rank is None else low_rank.rank]
        ranks.append(getattr(preconditioner, "rank", 0))
        self.operator, self.system, self.low_rank = operator, system, low_rank
        self.variance_system = variance_system
        self._rhs, self.report, self.delta = rhs, report, delta
        self.rank = max(ranks)
        return self

    @property
    def n_iter(self):
        """CG iterations of the fit solve (1 for the dense solver: one direct solve)."""
        return int(self.report.n_iter.max())

    @property
    def variance_tail_weight(self):
        """Low-rank variance: the largest weight f/(f + c) left out; else None."""
        return None if self.low_rank is None else self.low_rank.tail_weight

    # -- predictions ------------------------------------------------------------------

    def check_covariance(self, n_rows, what, advice, after=()):
        """Raise MemoryError unless the full covariance over ``n_rows`` test rows
        (m·k) fits, with what the caller then holds (``after``); see
        :meth:`LinearSystem.check_covariance`."""
        return self.system.check_covariance(n_rows, what, advice, after)

    def covariance(self, X, diagonal):
        """Posterior covariance of the latent outputs J* δ at test inputs X.

        Parameters
        ----------
        X : torch.Tensor of shape (m, ...)
        diagonal : bool
            Return only the variances, shape (m·k,); otherwise the (m·k, m·k)
            covariance over test points and outputs (always exact).

        Returns
        -------
        values : torch.Tensor
        report : CGResult or None
            None for the low-rank variance (no solve).
        """
        if diagonal and self.low_rank is not None:
            return self.low_rank.diagonal(self.operator, X, self.prior), None
        mode = "diagonal" if diagonal else "full"
        return self.variance_system.covariance(X, mode, parameter_scale=self.noise)

    # -- evidence ---------------------------------------------------------------------

    def stochastic_log_marginal_likelihood(self, n_probes, lanczos_steps, generator):
        """Matrix-free estimate of log p(y) (``evidence``): SLQ for log|K|, CG.

        It always works with the kernel K, built from the same Jacobian products
        when the fit solved in parameter space.
        """
        kernel = self.operator
        if self.space == "parameter":
            kernel = FunctionOperator(self.jacobian, prior=self.prior, shift=self.noise)
        return stochastic_log_marginal_likelihood(
            kernel.matmat,
            self.residuals,
            kernel.size,
            self.noise,
            n_probes=n_probes,
            lanczos_steps=lanczos_steps,
            tol=self.tol,
            generator=generator,
        )

    def spectral_evidence(self, lanczos=None):
        """The :class:`SpectralEvidence` of the training data, for any (noise, prior):
        exact (``lanczos`` None) or a Lanczos quadrature with those options. Built
        at the first call of each kind and kept, under the evidence lock (one
        eigendecomposition, not one per call); thread-safe."""
        kind = "exact" if lanczos is None else "lanczos"
        with _EVIDENCE_LOCK:
            cache = self.__dict__.setdefault("_spectral_evidence", {})
            if kind not in cache:
                residuals = self.residuals.reshape(self._shape)
                cache[kind] = spectral_evidence(
                    self.jacobian, residuals, self.space, self.structured, lanczos
                )[1]
            return cache[kind]

    def evidence_factor(self):
        """The Cholesky factor of the system, for the exact evidence: the solver's,
        or after a CG fit one assembled at the first call and kept (apart from the
        solver's state); thread-safe."""
        if self.variance_system.factor is not None:  # the solver's, or the variances'
            return self.variance_system.factor
        with _EVIDENCE_LOCK:
            factor = self.__dict__.get("_evidence_factor")
            if factor is None:
                what = f"{self.space}-space system"
                self.system.check_dense(
                    f"{what} (for the exact evidence)", _EVIDENCE_ADVICE
                )
                factor = self.system.factor_dense(None, what, _ADVICE)
                self._evidence_factor = factor
        return factor

    def log_marginal_likelihood(self):
        """log p(y) at this prior and noise; exact (uses a Cholesky factor).

        After a CG fit the factor of the same space is assembled here, once.
        """
        factor = self.evidence_factor()
        r, d = self.residuals, self.n_rows
        solution = self.report.solution
        log_det_factor = 2.0 * factor.diagonal().log().sum()
        if self.space == "function":
            quadratic = r @ solution
            log_det = log_det_factor
        else:
            quadratic = (self.residual_sq_norm - self._rhs @ solution) / self.noise
            p = self.operator.size
            log_det = (
                d * math.log(self.noise)
                + p * math.log(self.prior / self.noise)
                + log_det_factor
            )
        return float(-0.5 * quadratic - 0.5 * log_det - 0.5 * d * math.log(2 * math.pi))
