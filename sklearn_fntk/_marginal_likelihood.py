"""The regressor's log marginal likelihood: noise and prior "auto" (the variances
that maximise it, with the noise hyperprior) and ``log_marginal_likelihood`` at the
fitted or any variances.

A mixin of FiniteNTKRegressor: it reads the fitted state (``_posterior``,
``_evidence``, ``_log_weight``, ``_network``, ``space_``, ``solver_``) and the
estimator's helpers (``_generator``, ``_policy``, ``_warn_unconverged``,
``_fitted``).
"""

import math
from numbers import Integral, Real

from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, validate_parameter_constraints
from sklearn.utils.validation import check_is_fitted

from ._diagnostics import warn
from ._inference.evidence import spectral_evidence
from ._inference.hyperparameters import fit_hyperparameters
from ._precision import full_float32_precision

__all__ = ["MarginalLikelihoodMixin"]


class MarginalLikelihoodMixin:
    """``noise="auto"`` / ``prior="auto"`` and ``log_marginal_likelihood`` for
    FiniteNTKRegressor."""

    def _fit_hyperparameters(self, jacobian, residuals, structured, choices, stages):
        """Fit the "auto" ones of noise and prior by the evidence (see
        ``_inference.hyperparameters``): exact from one eigendecomposition with the
        dense solver (in parameter space up to ``Policy.variance_factor_max_size``
        parameters), and with CG in parameter space up to ``Policy.eigen_size``
        (JᵀJ is accumulated over the data in one pass, and the factor reuses it);
        by Lanczos quadrature otherwise: over the dense JᵀJ where the dense solver
        assembles it anyway (larger p), else matrix-free. Stages reported to
        ``stages``. Returns the Gram matrix (if assembled, for the dense solve or the
        variance factor), the evidence and the optimum."""
        policy, parameter_space = self._policy, choices.space == "parameter"
        p = jacobian.n_params
        small_fisher = parameter_space and p <= policy.eigen_size
        large_fisher = parameter_space and p > policy.variance_factor_max_size
        dense = choices.solver == "dense"
        lanczos = None
        if (not dense and not small_fisher) or (dense and large_fisher):
            lanczos = policy.lanczos_options(self._generator(jacobian.w.device))
        r, reduction = residuals.reshape(-1), jacobian.reduction  # over the shards
        mean_squared_residual = reduction.sum_float(r @ r) / reduction.sum_float(r.numel())

        def search(evidence):
            return fit_hyperparameters(
                evidence,
                noise=self.noise,
                prior=self.prior,
                mean_squared_residual=mean_squared_residual,
                hyperprior="default",
            )

        def optimum(evidence):
            best = search(evidence)
            return best.noise, best.prior

        gram, evidence = spectral_evidence(
            jacobian,
            residuals,
            choices.space,
            structured,
            lanczos,
            stages,
            assemble=dense,
            optimum=optimum,
        )
        with stages("evidence search") as stage:
            best = search(evidence)
            stage.note(
                noise=best.noise,
                prior=best.prior,
                log_evidence=best.log_marginal_likelihood,
            )
        # a vanishing noise (an interpolating GP) or an unbounded prior; the
        # other ends (all noise, or a network that needs no change) are answers
        if {"noise lower", "prior upper"} & set(best.bounds_hit):
            warn(
                f"The evidence is maximal at the edge of the search (noise="
                f"{best.noise:.3g}, prior={best.prior:.3g}): the data determine "
                "these poorly. Set noise or prior to a number from prior knowledge."
            )
        if evidence.radau is not None:
            self._warn_quadrature_gap(evidence, best.noise, best.prior, "at the fitted")
        if not best.converged:
            warn(
                "Maximising the log marginal likelihood over noise and prior did not "
                f"converge; using noise={best.noise:.3g}, prior={best.prior:.3g}. Set "
                "noise or prior to a number.",
                ConvergenceWarning,
            )
        return gram, evidence, best

    def _warn_quadrature_gap(self, evidence, noise, prior, where):
        """Warn where the Lanczos evidence is not resolved at (noise, prior): its
        Gauss and Gauss-Radau quadratures, which bracket the exact terms, differ by
        more than ``Policy.evidence_gap_nats``. A fit's runs have grown as far as
        they may (``LanczosSpectrum.converge``) to resolve the fitted pair; other
        pairs they may not resolve."""
        gap = evidence.quadrature_gap(noise, prior)
        if gap <= self._policy.evidence_gap_nats:
            return
        if where == "at the fitted":
            consequence = (
                "after the most steps the fit allows (Policy.evidence_max_growth, "
                "evidence_basis_bytes), so these variances may be far from the "
                "evidence's maximum"
            )
        else:
            consequence = (
                "the value may be off by that much (the fit resolved its Lanczos "
                "runs at the fitted pair only)"
            )
        warn(
            f"{type(self).__name__}: the matrix-free evidence has not converged "
            f"{where} noise={noise:.3g}, prior={prior:.3g}: its Lanczos quadratures "
            f"are known only within {gap:.3g} nats there (their Gauss and "
            f"Gauss-Radau bounds); {consequence}. Use solver='dense' where it fits "
            "in memory, or set noise and prior to numbers (for example by "
            "GridSearchCV).",
            ConvergenceWarning,
        )

    @full_float32_precision
    def log_marginal_likelihood(
        self,
        noise=None,
        prior=None,
        eval_gradient=False,
        *,
        method="exact",
        n_probes=32,
        lanczos_steps=150,
        return_std_error=False,
    ):
        """Log evidence log p(y | X, noise, prior), at the fitted or any variances.

        As GaussianProcessRegressor's, at any hyperparameters: the fitted network's
        Jacobian and residuals stay, only σ² and s change. With ``sample_weight`` in
        fit, the noise covariance is noise · diag(1/w).

        Parameters
        ----------
        noise, prior : float or None, default=None
            The noise σ² and the prior s; None means ``noise_`` and ``prior_``.
        eval_gradient : bool, default=False
            Also return the gradient with respect to (log σ², log s).
        method : {"exact", "stochastic"}, default="exact"
            "exact": at the fitted variances from a Cholesky factor (assembled here,
            once, after a CG fit); elsewhere, or with ``eval_gradient``, from one
            eigendecomposition of J Jᵀ (or JᵀJ), reused from an "auto" fit with the
            dense solver. "stochastic" is matrix-free, for problems too large for
            that: at the fitted variances log|K| by stochastic Lanczos quadrature
            over Rademacher probes and rᵀK⁻¹r by CG; elsewhere, or with
            ``eval_gradient``, the Lanczos quadrature of the spectrum that an "auto"
            fit with CG used (or a new one), with a ``ConvergenceWarning`` where its
            Gauss and Gauss-Radau bounds there differ by more than a nat.
        n_probes, lanczos_steps : int, default=32, 150
            Probes and Lanczos steps of the stochastic estimate at the fitted
            variances. Small noise needs more steps (see the user guide): a
            ``ConvergenceWarning`` says where the Gauss and Gauss-Radau
            quadratures of the log-determinant differ by more than a nat.
        return_std_error : bool, default=False
            Also return the standard error of the estimate over probes (0 for
            "exact"), at the fitted variances only.

        Returns
        -------
        log_likelihood : float
            The log evidence log p(y | X).
        gradient : ndarray of shape (2,), optional
            With ``eval_gradient``: [∂/∂log σ², ∂/∂log s].
        std_error : float, optional
            With ``return_std_error``: its standard error.
        """
        check_is_fitted(self)
        if method not in ("exact", "stochastic"):
            raise ValueError(f"method must be 'exact' or 'stochastic', got {method!r}.")
        positive = [Interval(Real, 0, None, closed="neither"), None]
        validate_parameter_constraints(
            {
                "noise": positive,
                "prior": positive,
                "n_probes": [Interval(Integral, 2, None, closed="left")],
                "lanczos_steps": [Interval(Integral, 1, None, closed="left")],
            },
            {
                "noise": noise,
                "prior": prior,
                "n_probes": n_probes,
                "lanczos_steps": lanczos_steps,
            },
            caller_name="log_marginal_likelihood",
        )
        at_fit = noise is None and prior is None and not eval_gradient
        if not at_fit:
            if return_std_error:
                raise ValueError(
                    "return_std_error=True applies at the fitted noise and prior only, "
                    "without eval_gradient."
                )
            noise = self.noise_ if noise is None else noise
            prior = self.prior_ if prior is None else prior
            evidence = self._spectral_evidence(method)
            if evidence.radau is not None:
                self._warn_quadrature_gap(evidence, noise, prior, "at")
            result = evidence.log_marginal_likelihood(noise, prior, eval_gradient)
            value = (result[0] if eval_gradient else result) + self._log_weight
            self._check_evidence(value, method)
            return (value, result[1]) if eval_gradient else value
        if method == "exact":
            value, std_error = self._posterior.log_marginal_likelihood(), 0.0
        else:
            generator = self._generator(self._network.theta.device)
            estimate = self._posterior.stochastic_log_marginal_likelihood(
                n_probes, lanczos_steps, generator
            )
            self._warn_unconverged(estimate.solve, "the evidence's quadratic term")
            if estimate.quadrature_gap > self._policy.evidence_gap_nats:
                warn(
                    f"{type(self).__name__}: the stochastic evidence's log-determinant "
                    f"has not converged in lanczos_steps={lanczos_steps}: its Gauss "
                    "and Gauss-Radau quadratures put the log evidence only within "
                    f"{estimate.quadrature_gap:.3g} nats. Increase lanczos_steps.",
                    ConvergenceWarning,
                )
            # log p = -½ log|K| + ...: half the log-determinant's standard error
            value, std_error = (
                estimate.log_marginal_likelihood,
                estimate.log_det_std_error / 2,
            )
        value += self._log_weight  # the scaled system's evidence -> the weighted model's
        self._check_evidence(value, method)
        return (value, std_error) if return_std_error else value

    def _check_evidence(self, value, method):
        """FloatingPointError where the evidence overflowed."""
        if not math.isfinite(value):
            raise FloatingPointError(
                f"The log marginal likelihood ({method}) is {value}: its terms "
                f"overflow in {self._fitted('dtype')} for targets this large "
                "(rᵀK⁻¹r with r = y - m(X)) or this ill-conditioned a system. Rescale "
                "y (for example with TransformedTargetRegressor), or increase noise."
            )

    def _spectral_evidence(self, method):
        """The evidence for any variances: the fit's if it had the kind ``method``
        asks for (exact from an eigendecomposition, or a Lanczos quadrature), else
        the posterior's, built at the first such call and kept."""
        exact = method == "exact"
        evidence = self._evidence
        if evidence is not None and evidence.exact == exact:
            return evidence
        lanczos = None
        if not exact:
            generator = self._generator(self._network.theta.device)
            lanczos = self._policy.lanczos_options(generator)
        return self._posterior.spectral_evidence(lanczos)
