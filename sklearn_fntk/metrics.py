"""Scores of predictive distributions, for model selection with scikit-learn.

The predictive mean of the regressor depends on ``noise`` and ``prior`` only through
their ratio, so a score of the mean (R², the default of ``GridSearchCV``) cannot fix
both; the log predictive density of held-out targets, with the noise included, can.
With noise and prior both "auto" the regressor's predictive is a Student-t
(``predictive_dof_``); the scorer scores that density.
"""

import numpy as np
from scipy.stats import t as student_t

__all__ = ["log_predictive_density_scorer", "mean_log_predictive_density"]


def mean_log_predictive_density(y_true, y_mean, y_std, *, dof=np.inf):
    """Mean log density of the targets under the predictive distributions.

    (1/N) Σ log N(y_i | μ_i, σ_i²) over every sample and output; higher is better.
    With finite ``dof`` ν the predictive distributions are Student-t's with ν degrees
    of freedom and standard deviations σ_i (scale σ_i·√((ν - 2)/ν)).

    Parameters
    ----------
    y_true : array-like of shape (n_samples,) or (n_samples, n_outputs)
        Observed targets.
    y_mean : array-like of the shape of ``y_true``
        Predictive means.
    y_std : array-like of the shape of ``y_true``
        Predictive standard deviations of the targets (noise included), positive.
    dof : float, default=inf
        Degrees of freedom of a Student-t predictive (above 2); inf for Gaussian.

    Returns
    -------
    float
        The mean log density, in nats; higher is better.

    See Also
    --------
    log_predictive_density_scorer : This score as a scikit-learn scorer.
    sklearn.metrics.r2_score : A score of the mean alone.

    Examples
    --------
    >>> from sklearn_fntk.metrics import mean_log_predictive_density
    >>> round(mean_log_predictive_density([0.0, 1.0], [0.0, 0.0], [1.0, 1.0]), 4)
    -1.1689
    """
    y_true, y_mean, y_std = (
        np.asarray(a, dtype=np.float64) for a in (y_true, y_mean, y_std)
    )
    if not (y_true.shape == y_mean.shape == y_std.shape):
        raise ValueError(
            f"y_true, y_mean and y_std must have one shape; got {y_true.shape}, "
            f"{y_mean.shape} and {y_std.shape}."
        )
    if not np.all(y_std > 0):
        raise ValueError("y_std must be positive.")
    if not dof > 2:
        raise ValueError(f"dof must be above 2 (a finite standard deviation); got {dof}.")
    if np.isfinite(dof):
        scale = y_std * np.sqrt((dof - 2) / dof)
        return float(np.mean(student_t.logpdf(y_true, dof, loc=y_mean, scale=scale)))
    z = (y_true - y_mean) / y_std
    return float(np.mean(-0.5 * z**2 - np.log(y_std) - 0.5 * np.log(2 * np.pi)))


def log_predictive_density_scorer(estimator, X, y):
    """Scorer: :func:`mean_log_predictive_density` of ``estimator`` on (X, y).

    For ``GridSearchCV(scoring=...)``, ``cross_val_score(scoring=...)`` and the like:
    it calls ``estimator.predict(X, return_std=True, include_noise=True)``, so it
    works with :class:`~sklearn_fntk.FiniteNTKRegressor` and with a
    :class:`~sklearn.pipeline.Pipeline` that ends in one (a pipeline passes these
    arguments to its last step). The density is the Student-t of the regressor's
    ``predictive_dof_`` where it is finite (noise and prior both "auto"), else the
    Gaussian.

    Parameters
    ----------
    estimator : fitted estimator
        A fitted :class:`~sklearn_fntk.FiniteNTKRegressor`, or a pipeline ending in
        one.
    X : array-like of shape (n_samples, ...)
        Held-out inputs.
    y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        Their targets.

    Returns
    -------
    float
        The mean log predictive density of ``y``, noise included; higher is better,
        as for scikit-learn's scorers.

    See Also
    --------
    mean_log_predictive_density : The score itself, from means and stds.
    sklearn.model_selection.GridSearchCV : Takes it as ``scoring``.

    Examples
    --------
    >>> from sklearn.model_selection import GridSearchCV
    >>> from sklearn_fntk import FiniteNTKRegressor
    >>> from sklearn_fntk.metrics import log_predictive_density_scorer
    >>> search = GridSearchCV(
    ...     FiniteNTKRegressor(), {"noise": [0.01, 0.1], "prior": [0.1, 1.0]},
    ...     scoring=log_predictive_density_scorer,
    ... )
    """
    mean, std = estimator.predict(X, return_std=True, include_noise=True)
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    dof = float(getattr(final, "predictive_dof_", np.inf))
    y = np.asarray(y).reshape(np.shape(mean))
    return mean_log_predictive_density(y, mean, std, dof=dof)
