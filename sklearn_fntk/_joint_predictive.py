"""The regressor's joint predictive distribution over test points and outputs:
``predict(X, return_cov=True)`` and ``sample_y``, which hold (m·k) x (m·k)
matrices and ask the memory guard first.

A mixin of FiniteNTKRegressor: it reads the fitted state (``_posterior``,
``n_outputs_``, ``_y_ndim``, ``_y_scale``, ``predictive_dof_``) and the estimator's
helpers (``_mean``).
"""

import math
from numbers import Integral

import numpy as np
import torch
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, validate_parameter_constraints
from sklearn.utils.validation import check_is_fitted

from ._inference.system import eigh_parts
from ._precision import full_float32_precision

__all__ = ["JointPredictiveMixin"]


class JointPredictiveMixin:
    """Joint covariances and posterior draws for FiniteNTKRegressor."""

    def _latent_covariance(self, X, what, after=()):
        """Joint predictive covariance of the latent outputs over all test points and
        outputs in model units (standardized with ``normalize_y``), (m·k, m·k), after
        checking that it fits with what the caller then holds (``after``)."""
        rows = X.shape[0] * self.n_outputs_
        advice = "pass fewer test points at a time"
        self._posterior.check_covariance(rows, what, advice, after)
        covariance, report = self._posterior.covariance(X, diagonal=False)
        self._warn_unconverged(report, "predictive covariance")
        return covariance

    @full_float32_precision
    def sample_y(self, X, n_samples=1, random_state=0):
        """Draw latent functions from the posterior at X (joint over points and outputs).

        The draws are mean + U·diag(√λ)·z, with U diag(λ) Uᵀ the eigendecomposition
        of the joint covariance (in float64; negative rounding eigenvalues count as
        0) and z standard normal; for a Student-t predictive (``predictive_dof_`` ν
        finite), that of the plug-in covariance and z·√(ν/u), u ~ χ²_ν per draw, a
        draw of the multivariate Student-t. Raises MemoryError, before allocating,
        when the covariance and its eigendecomposition do not fit.

        Parameters
        ----------
        X : array-like of shape (n_samples_X, ...)
            Test inputs, in the per-sample shape seen in fit.
        n_samples : int, default=1
            Number of draws per test point.
        random_state : int, RandomState instance or None, default=0
            Seeds the standard normal draws z (and the χ² draws u).

        Returns
        -------
        y_samples : ndarray
            Shape (n_samples_X, n_samples), or (n_samples_X, n_outputs, n_samples)
            for a multi-output fit.
        """
        validate_parameter_constraints(
            {"n_samples": [Interval(Integral, 1, None, closed="left")]},
            {"n_samples": n_samples},
            caller_name="sample_y",
        )
        check_is_fitted(self)
        X = self._validate_predict_X(X)
        rng = check_random_state(random_state)
        mean = self._numpy(self._mean(X))
        rows = X.shape[0] * self.n_outputs_
        after = [("a float64 copy for the eigendecomposition", (rows, rows), torch.float64)]
        after += eigh_parts(rows, torch.float64)
        covariance = self._latent_covariance(X, "sample_y", after).to(torch.float64)
        eigenvalues, factor = torch.linalg.eigh(covariance)
        del covariance
        factor.mul_(eigenvalues.clamp_min(0.0).sqrt())  # U diag(√λ), in place
        normal = rng.standard_normal((rows, n_samples))
        if math.isfinite(self.predictive_dof_):
            normal *= np.sqrt(
                self.predictive_dof_ / rng.chisquare(self.predictive_dof_, n_samples)
            )
        normal = torch.from_numpy(normal)
        deviations = (factor @ normal.to(factor.device)).cpu().numpy()
        deviations = deviations.reshape(X.shape[0], self.n_outputs_, n_samples)
        scale = self._numpy(self._y_scale)[:, None]  # model units -> y's
        draws = mean.reshape(X.shape[0], self.n_outputs_, 1) + scale * deviations
        return draws[:, 0, :] if self._y_ndim == 1 else draws
