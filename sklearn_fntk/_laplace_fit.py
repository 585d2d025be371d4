"""The Laplace fit of FiniteNTKClassifier: its posterior at a fixed prior or at the
evidence's maximum (``prior="auto"``), its log evidence, and the warnings they call for.

A mixin of the estimator layer, kept apart from ``_classifier`` (labels, links, the
prediction API) for size; it reads the estimator's parameters and turns the reports of
``_inference.laplace`` and ``_inference.laplace_evidence`` into warnings that name the
parameter to change.
"""

import math
from numbers import Real

import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, validate_parameter_constraints
from sklearn.utils.validation import check_is_fitted

from ._diagnostics import warn
from ._inference.laplace import LaplacePosterior
from ._inference.laplace_evidence import laplace_evidence, maximize_laplace_evidence
from ._inference.laplace_loo import laplace_loo
from ._precision import full_float32_precision

__all__ = ["LaplaceFitMixin"]

# prior="auto" searches the prior variance within these bounds. The dense search finds
# the root of the evidence's exact derivative in t = log s to ``tol``, with Newton's
# method run to at most EXACT_SEARCH_NEWTON_TOL (quadratic convergence: a step or two
# more) so that the derivative is accurate beyond that; the CG search, on stochastic
# values, stops at STOCHASTIC_SEARCH_XTOL or ``tol``, whichever is larger.
PRIOR_BOUNDS = (1e-8, 1e5)
EXACT_SEARCH_NEWTON_TOL = 1e-10
STOCHASTIC_SEARCH_XTOL = 1e-2
# prior="loo" maximises the leave-one-out predictive by its values, to this tolerance
# in log s (the criterion is flat near its maximum: finer costs fits, not accuracy).
LOO_SEARCH_XTOL = 1e-3


class LaplaceFitMixin:
    """Fitting the Laplace posterior, with the evidence where ``prior="auto"`` and the
    leave-one-out predictive where ``prior="loo"``."""

    def _fit_posterior(self, arguments, stages):
        """The posterior at ``prior``, or at the evidence's maximum for "auto", or at
        the leave-one-out predictive's for "loo"; stages (Newton's method at each
        prior, the search) reported to ``stages``.

        Returns the fitted LaplacePosterior, its LaplaceEvidence (None for a fixed
        prior: computed on demand) and the number of priors tried.
        """
        shared = {}  # G = J Jᵀ of the dense function-space solver, assembled once
        exact = arguments["choices"].solver == "dense"
        if self.prior == "loo" and not exact:
            raise ValueError(
                f"{type(self).__name__}: prior='loo' needs the dense solver (the "
                "training points' logit covariances, from its Cholesky factor); got "
                f"solver={arguments['choices'].solver!r}. Use solver='dense', or "
                "prior='auto'."
            )
        tol = self.tol
        if self.prior in ("auto", "loo") and exact:
            tol = min(tol, EXACT_SEARCH_NEWTON_TOL)

        def fit_at(prior, start):
            posterior = LaplacePosterior(
                **arguments,
                prior=prior,
                policy=self._policy,
                tol=tol,
                max_iter=self.max_iter,
                max_newton_iter=self.max_newton_iter,
            )
            posterior.fit(
                start=start,
                gram=shared.get("gram"),
                generator=self._generator(arguments["jacobian"].w.device),
                stages=stages,
            )
            shared["gram"] = posterior.gram
            return posterior

        if self.prior not in ("auto", "loo"):
            return fit_at(float(self.prior), None), None, 1
        loo = self.prior == "loo"
        if loo:
            xtol, name = max(self.tol, LOO_SEARCH_XTOL), "leave-one-out search"
        else:
            # the exact derivative is only as accurate as the dtype: finer than √ε
            # Brent's method chases rounding (float32: 11-16 priors instead of 7)
            rounding = math.sqrt(torch.finfo(self._torch_dtype).eps)
            xtol = max(self.tol, rounding if exact else STOCHASTIC_SEARCH_XTOL)
            name = "evidence search"
        with stages(f"{name} (prior={self.prior!r})") as stage:
            search = maximize_laplace_evidence(
                fit_at,
                start=1.0,
                bounds=PRIOR_BOUNDS,
                exact=exact,
                xtol=xtol,
                evidence_options=self._evidence_options(),
                criterion=laplace_loo if loo else None,
            )
            stage.note(
                prior=search.prior,
                log_evidence=search.evidence.log_marginal_likelihood,
                priors_tried=search.n_evaluations,
            )
        if search.at_bound is not None:
            low, high = PRIOR_BOUNDS
            criterion = "leave-one-out predictive" if loo else "Laplace evidence"
            warn(
                f"{type(self).__name__}: the {criterion} is largest at the "
                f"{search.at_bound} bound of prior, {search.prior:g} (searched within "
                f"[{low:g}, {high:g}]): "
                + (
                    "moving the weights explains the labels no better than the "
                    "network as it is."
                    if search.at_bound == "lower"
                    else "the training data are separable and it keeps "
                    "rising with prior; the probabilities will be overconfident."
                )
                + " Pass prior as a number instead (for example chosen by "
                "GridSearchCV)."
            )
        gap = search.evidence.quadrature_gap
        if gap > self._policy.evidence_gap_nats:
            warn(
                f"{type(self).__name__}: the stochastic Laplace evidence has not "
                f"converged at the fitted prior={search.prior:.3g}: its Lanczos "
                f"quadrature is known only within {gap:.3g} nats there (its Gauss and "
                "Gauss-Radau bounds) after the most steps the fit allows "
                "(Policy.evidence_max_growth, evidence_basis_bytes), so the prior may "
                "be far from the evidence's maximum. Use solver='dense' where it "
                "fits in memory, or set prior to a number (for example by "
                "GridSearchCV).",
                ConvergenceWarning,
            )
        return search.posterior, search.evidence, search.n_evaluations

    def _evidence_options(self):
        """Options of the stochastic log-determinant (CG solver), from the policy:
        its steps grow as the regressor's Lanczos evidence's do."""
        policy = self._policy
        return dict(
            n_probes=policy.laplace_evidence_probes,
            lanczos_steps=policy.laplace_evidence_steps,
            generator_seed=self._seed(),
            gap_nats=policy.evidence_gap_nats,
            basis_bytes=policy.evidence_basis_bytes,
            max_growth=policy.evidence_max_growth,
        )

    @full_float32_precision
    def log_marginal_likelihood(self, prior=None, return_std_error=False):
        """Laplace approximation of log p(y | X, prior) of the linearized model.

        -L(δ̂) - ½ log|I + s·JᵀΛJ| at the MAP δ̂ for the prior variance s (see the
        user guide). With the dense solver it is exact; with CG the
        log-determinant is a stochastic Lanczos quadrature estimate, with the
        probes ``prior="auto"`` used (the same at every s).

        Parameters
        ----------
        prior : float or None, default=None
            The prior variance s; None means ``prior_``. At another s the MAP is
            found again (Newton's method from ``delta_``, on the training data this
            estimator keeps), and the fitted state does not change: an evidence
            curve over priors, as GaussianProcessClassifier's
            ``log_marginal_likelihood(theta)`` gives.
        return_std_error : bool, default=False
            Also return the standard error of the estimate over its probes (0 with
            the dense solver).

        Returns
        -------
        log_likelihood : float
            The Laplace approximation of the log evidence.
        std_error : float, optional
            With ``return_std_error``: its standard error.
        """
        check_is_fitted(self)
        validate_parameter_constraints(
            {"prior": [Interval(Real, 0, None, closed="neither"), None]},
            {"prior": prior},
            caller_name="log_marginal_likelihood",
        )
        if prior is None or prior == self.prior_:
            evidence = self._evidence
            if evidence is None:  # computed here, not stored: predictions read-only
                evidence = self._laplace_evidence(self._posterior)
        else:
            fitted = self._posterior
            posterior = fitted.at_prior(float(prior)).fit(
                start=fitted.delta,
                gram=fitted.gram,
                generator=self._generator(fitted.delta.device),
            )
            self._warn_newton(posterior)
            evidence = self._laplace_evidence(posterior)
        value = evidence.log_marginal_likelihood
        return (value, evidence.std_error / 2) if return_std_error else value

    def _laplace_evidence(self, posterior):
        """The LaplaceEvidence of a fitted posterior at its prior."""
        options = self._evidence_options()
        generator = torch.Generator(device=posterior.delta.device)
        generator.manual_seed(options.pop("generator_seed"))
        return laplace_evidence(posterior, generator=generator, **options)
