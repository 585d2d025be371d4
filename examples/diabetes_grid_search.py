"""
Choosing noise and prior: grid search or evidence
=================================================

:class:`~sklearn_fntk.FiniteNTKRegressor` has two hyperparameters, the noise
variance σ² (``noise``) and the prior variance s of the weights (``prior``). They are
ordinary estimator parameters, so ``GridSearchCV`` over a ``Pipeline`` works as for
any scikit-learn regressor. Here it runs on scikit-learn's diabetes data set, with
a ``StandardScaler`` in front.

One thing to know before searching: the predictive **mean** depends on σ² and s only
through their ratio, mean(x*) = m(x*) + J* Jᵀ (J Jᵀ + (σ²/s) I)⁻¹ (y - m(X)). A score of
the mean alone, such as R², is constant along the diagonals of a (noise, prior) grid
and cannot fix both. The predictive **variance** depends on both: a held-out
log-likelihood does (:func:`~sklearn_fntk.metrics.log_predictive_density_scorer`,
a scorer for ``GridSearchCV`` and ``cross_val_score``), and so does the log marginal
likelihood (the evidence), which the estimator's defaults (``noise="auto"``,
``prior="auto"``) maximise on the training data in one fit, with no search.

The network is the estimator's default (``network=None``): a randomly initialised
tanh MLP with two hidden layers of 64 units, built at fit time, with a zero prior
mean. A network trained on the same data would have seen every cross-validation
fold; pass a network trained on other data (as in the other examples) to transfer
what it learnt. Set ``SKLEARN_FNTK_EXAMPLE_SMALL=1`` for a quicker, smaller run.
"""

import os
import time

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_diabetes
from sklearn.metrics import r2_score
from sklearn.model_selection import GridSearchCV, KFold, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sklearn_fntk import FiniteNTKRegressor
from sklearn_fntk.metrics import log_predictive_density_scorer

matplotlib.use("Agg")  # write files, open no window
# The problems are small: one thread avoids the cost of synchronising threads.
torch.set_num_threads(1)

SMALL = os.environ.get("SKLEARN_FNTK_EXAMPLE_SMALL", "0") == "1"
# Both grids step by the same factor, so equal ratios σ²/s lie on exact diagonals.
NOISES = np.logspace(-1, 0, 2) if SMALL else np.logspace(-4 / 3, 2 / 3, 7)
PRIORS = np.logspace(-2, 0, 3) if SMALL else np.logspace(-3, 0, 10)
N_FOLDS = 3 if SMALL else 5
Z_95 = 1.959964

# %%
# Data
# ----
# A quarter of the patients is held out for the final comparison. The target is
# standardised with the training statistics, so that σ² is in units of its variance.

X, y = load_diabetes(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
y_mean, y_std = y_train.mean(), y_train.std()
y_train, y_test = (y_train - y_mean) / y_std, (y_test - y_mean) / y_std
print(f"{len(y_train)} training and {len(y_test)} test patients, {X.shape[1]} features")


def make_model(**params):
    regressor = FiniteNTKRegressor(prior_mean="zero", random_state=0, **params)
    return make_pipeline(StandardScaler(), regressor)


# %%
# Grid search
# -----------
# Both R² and the held-out log predictive density are recorded; the refit uses the
# latter, since R² ties along every diagonal of the grid.

start = time.perf_counter()
search = GridSearchCV(
    make_model(),
    {"finitentkregressor__noise": NOISES, "finitentkregressor__prior": PRIORS},
    scoring={"r2": "r2", "log_density": log_predictive_density_scorer},
    refit="log_density",
    cv=KFold(N_FOLDS, shuffle=True, random_state=0),
).fit(X_train, y_train)
search_seconds = time.perf_counter() - start
best_noise = search.best_params_["finitentkregressor__noise"]
best_prior = search.best_params_["finitentkregressor__prior"]
print(
    f"GridSearchCV: {len(NOISES)} x {len(PRIORS)} pairs x {N_FOLDS} folds in "
    f"{search_seconds:.1f} s; best by log density: noise {best_noise:.3g}, "
    f"prior {best_prior:.3g}"
)
cv_r2 = search.cv_results_["mean_test_r2"]
n_tied = np.sum(np.abs(cv_r2 - cv_r2.max()) < 1e-9)
print(f"best cross-validated R² {cv_r2.max():.4f}, shared by {n_tied} pairs (same σ²/s)")

# %%
# Evidence
# --------
# The defaults, ``noise="auto"`` and ``prior="auto"``, fit σ² and s on the training
# data by maximising the log marginal likelihood: one fit, one eigendecomposition of
# the kernel matrix.

start = time.perf_counter()
evidence_model = make_model().fit(X_train, y_train)
evidence_seconds = time.perf_counter() - start
fitted = evidence_model[-1]
print(
    f"defaults (evidence) in {evidence_seconds:.1f} s: noise {fitted.noise_:.3g}, "
    f"prior {fitted.prior_:.3g} (log evidence {fitted.log_marginal_likelihood():.1f})"
)

# %%
# Compare on the held-out patients
# --------------------------------
# The coverage is that of the 95% interval mean ± 1.96 · std for a new observation
# (noise included).

print(
    f"\n{'model':<28}{'noise':>8}{'prior':>8}{'R²':>7}{'log density':>13}{'coverage':>10}"
)
for name, model in [
    ("grid search (log density)", search.best_estimator_),
    ("defaults (evidence)", evidence_model),
]:
    mean, std = model.predict(X_test, return_std=True, include_noise=True)
    coverage = np.mean(np.abs(y_test - mean) <= Z_95 * std)
    density = log_predictive_density_scorer(model, X_test, y_test)
    print(
        f"{name:<28}{model[-1].noise_:>8.3g}{model[-1].prior_:>8.3g}"
        f"{r2_score(y_test, mean):>7.3f}{density:>13.3f}{coverage:>10.1%}"
    )

# %%
# Plot the grid and the predictions
# ---------------------------------
# Left and middle: the cross-validated scores over the grid, with the evidence
# optimum (star). R² is constant along the diagonals (constant σ²/s). The log density
# also scores the predictive variance and singles out a noise level; it changes
# little along the prior, as the noise dominates the predictive variance of these
# data. Right: held-out predictions of the evidence model with their 95% intervals.

n_noise, n_prior = len(NOISES), len(PRIORS)
# cv_results_ lists the pairs with the noise as the outer loop (sorted parameter names)
fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
for ax, metric, title in [
    (axes[0], "r2", "cross-validated R²"),
    (axes[1], "log_density", "cross-validated log predictive density"),
]:
    grid = search.cv_results_[f"mean_test_{metric}"].reshape(n_noise, n_prior)
    image = ax.pcolormesh(
        np.log10(PRIORS), np.log10(NOISES), grid, shading="nearest", cmap="viridis"
    )
    fig.colorbar(image, ax=ax)
    ax.plot(
        np.log10(fitted.prior_), np.log10(fitted.noise_), "*", color="white", ms=14, mec="k"
    )
    ax.set(xlabel="log₁₀ prior s", ylabel="log₁₀ noise σ²", title=title)

mean, std = evidence_model.predict(X_test, return_std=True, include_noise=True)
axes[2].errorbar(y_test, mean, yerr=Z_95 * std, fmt="o", ms=3, alpha=0.6, lw=0.8)
limits = [min(y_test.min(), mean.min()), max(y_test.max(), mean.max())]
axes[2].plot(limits, limits, "k--", lw=1)
axes[2].set(
    xlabel="true (standardised)",
    ylabel="predicted",
    title="defaults (evidence): held-out mean ± 1.96 std",
)
fig.tight_layout()
fig.savefig("diabetes_grid_search.png", dpi=110)
print("\nwrote diabetes_grid_search.png")
