"""Scores of predictive distributions, for model selection with scikit-learn.

The predictive mean of the regressor depends on ``noise`` and ``prior`` only through
their ratio, so a score of the mean (R², the default of ``GridSearchCV``) cannot fix
both; the log predictive density of held-out targets, with the noise included, can.
"""

import numpy as np

__all__ = ["log_predictive_density_scorer", "mean_log_predictive_density"]


def mean_log_predictive_density(y_true, y_mean, y_std):
    """Mean Gaussian log density of the targets under the predictive distributions.

    (1/N) Σ log N(y_i | μ_i, σ_i²) over every sample and output; higher is better.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,) or (n_samples, n_outputs)
        Observed targets.
    y_mean : array-like of the shape of ``y_true``
        Predictive means.
    y_std : array-like of the shape of ``y_true``
        Predictive standard deviations of the targets (noise included), positive.

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
    z = (y_true - y_mean) / y_std
    return float(np.mean(-0.5 * z**2 - np.log(y_std) - 0.5 * np.log(2 * np.pi)))


def log_predictive_density_scorer(estimator, X, y):
    """Scorer: :func:`mean_log_predictive_density` of ``estimator`` on (X, y).

    For ``GridSearchCV(scoring=...)``, ``cross_val_score(scoring=...)`` and the like:
    it calls ``estimator.predict(X, return_std=True, include_noise=True)``, so it
    works with :class:`~sklearn_fntk.FiniteNTKRegressor` and with a
    :class:`~sklearn.pipeline.Pipeline` that ends in one (a pipeline passes these
    arguments to its last step).

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
    return mean_log_predictive_density(np.asarray(y).reshape(np.shape(mean)), mean, std)
