"""The regressor's log marginal likelihood: ``optimize=True`` (noise and prior that
maximise it, from one eigendecomposition) and ``log_marginal_likelihood()``.

A mixin of FiniteNTKRegressor: it reads the fitted state (``_posterior``,
``_log_weight``, ``_network``) and the estimator's helpers (``_seed``,
``_generator``, ``_warn_unconverged``, ``_fitted``).
"""

import math
from numbers import Integral

from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, validate_parameter_constraints
from sklearn.utils.validation import check_is_fitted

from ._diagnostics import warn
from ._inference.evidence import spectral_evidence

__all__ = ["MarginalLikelihoodMixin"]

# optimize=True searches noise and prior in [1e-8, 1e5], and warns when the noise
# collapses below this fraction of the residual variance.
NOISE_LOWER_BOUND = 1e-8
COLLAPSED_NOISE = 1e-6


class MarginalLikelihoodMixin:
    """``optimize=True`` and ``log_marginal_likelihood`` for FiniteNTKRegressor."""

    def _maximize_evidence(self, jacobian, residuals, structured, choices):
        """(noise, prior) maximising log p(y), from one eigendecomposition.

        The kernel J Jᵀ (or the Fisher JᵀJ) does not depend on noise and prior, so
        one symmetric eigendecomposition gives the evidence and its gradient for
        every pair (see ``SpectralEvidence``). Returns the assembled matrix too, for
        the dense solve at the optimum.
        """
        if choices.solver != "dense":
            raise ValueError(
                "optimize=True maximises the exact evidence from a dense "
                f"eigendecomposition, but this fit uses solver={choices.solver!r} (a "
                f"{choices.space}-space system too large for the dense solver). Use "
                "solver='dense' if it fits in memory, or choose noise and prior by "
                "GridSearchCV."
            )
        gram, evidence = spectral_evidence(jacobian, residuals, choices.space, structured)
        best = evidence.maximize(
            self.noise,
            self.prior,
            bounds=((NOISE_LOWER_BOUND, 1e5), (1e-8, 1e5)),
            random_state=self._seed(),
        )
        r = residuals.reshape(-1)
        if best.noise <= COLLAPSED_NOISE * float(r @ r) / r.numel():
            warn(
                f"The evidence is maximal at noise={best.noise:.3g}, below "
                f"{COLLAPSED_NOISE:g} of the residual variance: the GP interpolates the "
                "training targets and its intervals will be overconfident. Seen with "
                "very few points; fix noise instead (optimize=False) or add data."
            )
        if not best.converged:
            warn(
                "Maximising the log marginal likelihood over noise and prior did not "
                f"converge; using noise={best.noise:.3g}, prior={best.prior:.3g}.",
                ConvergenceWarning,
            )
        return gram, best

    def log_marginal_likelihood(
        self, method="exact", *, n_probes=32, lanczos_steps=50, return_std_error=False
    ):
        """Log evidence log p(y | X, ``noise_``, ``prior_``) of the fitted model.

        With ``sample_weight`` in fit, the noise covariance is ``noise_`` · diag(1/w).

        Parameters
        ----------
        method : {"exact", "stochastic"}, default="exact"
            "exact" uses a Cholesky factor (assembled here, once, after a CG fit;
            MemoryError, before allocating, when it does not fit). "stochastic" is
            matrix-free, for problems too large for that: log|K| by stochastic
            Lanczos quadrature over Rademacher probes, rᵀK⁻¹r by CG.
        n_probes, lanczos_steps : int, default=32, 50
            Probes (at least 2) and Lanczos steps (at least 1) of the stochastic
            estimate. Small noise needs more steps (measured: 30 steps biased by 15
            nats at noise 0.01, n=2000).
        return_std_error : bool, default=False
            Also return the standard error of the estimate over probes (0 for
            "exact").

        Returns
        -------
        log_likelihood : float
        std_error : float, optional
        """
        check_is_fitted(self)
        if method not in ("exact", "stochastic"):
            raise ValueError(f"method must be 'exact' or 'stochastic', got {method!r}.")
        validate_parameter_constraints(
            {
                "n_probes": [Interval(Integral, 2, None, closed="left")],
                "lanczos_steps": [Interval(Integral, 1, None, closed="left")],
            },
            {"n_probes": n_probes, "lanczos_steps": lanczos_steps},
            caller_name="log_marginal_likelihood",
        )
        if method == "exact":
            value, std_error = self._posterior.log_marginal_likelihood(), 0.0
        else:
            generator = self._generator(self._network.theta.device)
            estimate = self._posterior.stochastic_log_marginal_likelihood(
                n_probes, lanczos_steps, generator
            )
            self._warn_unconverged(estimate.solve, "the evidence's quadratic term")
            # log p = -½ log|K| + ...: half the log-determinant's standard error
            value, std_error = (
                estimate.log_marginal_likelihood,
                estimate.log_det_std_error / 2,
            )
        value += self._log_weight  # the scaled system's evidence -> the weighted model's
        if not math.isfinite(value):
            raise FloatingPointError(
                f"The log marginal likelihood ({method}) is {value}: its terms "
                f"overflow in {self._fitted('dtype')} for targets this large "
                "(rᵀK⁻¹r with r = y - m(X)) or this ill-conditioned a system. Rescale "
                "y (for example with TransformedTargetRegressor), or increase noise."
            )
        return (value, std_error) if return_std_error else value
