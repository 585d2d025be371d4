"""
Adapting a trained network to a new domain
==========================================

A small network is trained on one part of scikit-learn's diabetes data set (the
patients recorded with sex = 1), then adapted to the other part with only 40 labelled
patients. :class:`~sklearn_fntk.FiniteNTKRegressor` linearizes the trained network
around its weights and conditions the resulting Gaussian process, whose kernel is the
network's finite-width neural tangent kernel, on the 40 new points. It returns a
better mean than the unchanged network and a predictive standard deviation whose
95% intervals we check on held-out patients of the new domain. The figure shows, along
one input, the unchanged network, the adapted mean and the model's own uncertainty,
which grows away from the 40 patients it was adapted on.

Run it from the repository root with ``python examples/quickstart.py [plot.png]``;
the plot is written to ``quickstart.png`` unless another path is given.
``SKLEARN_FNTK_EXAMPLE_SMALL=1`` trains the network for fewer steps (as the tests do).
"""

import os
import sys

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_diabetes
from sklearn.metrics import r2_score

from sklearn_fntk import FiniteNTKRegressor
from sklearn_fntk.metrics import mean_log_predictive_density

matplotlib.use("Agg")  # write files, open no window

# The networks and data sets here are tiny: one thread avoids the cost of
# synchronising threads, which would dominate every step.
torch.set_num_threads(1)


# %%
# Two domains
# -----------
# The source domain is the patients with sex = 1, the new domain those with sex = 2.
# The sex column is constant within each domain, so it is dropped. Features and
# target are standardised with the source domain's statistics, the only data seen
# when the network is trained.

X, y = load_diabetes(return_X_y=True, scaled=False)
SEX = 1
is_source = X[:, SEX] == 1
X = np.delete(X, SEX, axis=1)

X_mean, X_std = X[is_source].mean(axis=0), X[is_source].std(axis=0)
y_mean, y_std = y[is_source].mean(), y[is_source].std()
X = (X - X_mean) / X_std
y = (y - y_mean) / y_std

X_source, y_source = X[is_source], y[is_source]
X_new, y_new = X[~is_source], y[~is_source]

# From the new domain: 40 labelled points to adapt on, the rest held out for testing.
order = np.random.default_rng(0).permutation(len(y_new))
adapt, test = order[:40], order[40:]
X_adapt, y_adapt = X_new[adapt], y_new[adapt]
X_test, y_test = X_new[test], y_new[test]
print(
    f"source domain: {len(y_source)} patients; new domain: {len(y_adapt)} to adapt on, "
    f"{len(y_test)} to test on"
)

# %%
# Train a network on the source domain
# ------------------------------------
# A tanh MLP with two hidden layers of 64 units, trained by full-batch Adam.

torch.manual_seed(0)
network = torch.nn.Sequential(
    torch.nn.Linear(X.shape[1], 64),
    torch.nn.Tanh(),
    torch.nn.Linear(64, 64),
    torch.nn.Tanh(),
    torch.nn.Linear(64, 1),
)
optimizer = torch.optim.Adam(network.parameters(), lr=1e-3, weight_decay=1e-3)
inputs = torch.as_tensor(X_source, dtype=torch.float32)
targets = torch.as_tensor(y_source, dtype=torch.float32)
TRAIN_STEPS = 100 if os.environ.get("SKLEARN_FNTK_EXAMPLE_SMALL") == "1" else 300
for _ in range(TRAIN_STEPS):
    optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(network(inputs)[:, 0], targets)
    loss.backward()
    optimizer.step()


def network_predict(X):
    with torch.no_grad():
        return network(torch.as_tensor(X, dtype=torch.float32))[:, 0].numpy()


r2_train = r2_score(y_source, network_predict(X_source))
print(f"source network, R^2 on its own training data: {r2_train:.3f}")

# %%
# Adapt with the finite NTK
# -------------------------
# With its defaults, ``FiniteNTKRegressor`` fits the noise variance and the prior
# variance of the weights around their trained values by the log marginal likelihood
# of the 40 adaptation points (``noise="auto"``, ``prior="auto"``), as scikit-learn's
# ``GaussianProcessRegressor`` fits its kernel. With ``prior_mean="network"`` (the
# default) the GP's prior mean is the trained network itself, so the GP models the
# correction the new domain needs.

regressor = FiniteNTKRegressor(network).fit(X_adapt, y_adapt)
print(
    f"fitted noise={regressor.noise_:.3g}, prior={regressor.prior_:.3g} "
    f"(log marginal likelihood {regressor.log_marginal_likelihood():.2f}; "
    f"{regressor.n_params_} linearized parameters)"
)

# %%
# Compare on the held-out points of the new domain
# ------------------------------------------------
# ``predict(..., return_std=True)`` gives the std of the latent function;
# ``include_noise=True`` that of a new observation, which is what a 95% interval for
# the observed targets needs. The unchanged network gets, for its negative log
# predictive density (NLL), a Gaussian whose variance is its mean squared error on the
# 40 adaptation points.

source_prediction = network_predict(X_test)
mean, std = regressor.predict(X_test, return_std=True, include_noise=True)
coverage = np.mean(np.abs(y_test - mean) <= 1.96 * std)
source_std = np.sqrt(np.mean((y_adapt - network_predict(X_adapt)) ** 2))


def nll(mean, std):
    """Mean Gaussian negative log predictive density of the test targets."""
    return -mean_log_predictive_density(y_test, mean, np.broadcast_to(std, mean.shape))


r2_source, r2_adapted = r2_score(y_test, source_prediction), r2_score(y_test, mean)
print(
    f"new domain, source network unchanged: R^2 {r2_source:.3f}, "
    f"NLL {nll(source_prediction, source_std):.3f}"
)
print(
    f"new domain, FiniteNTKRegressor:       R^2 {r2_adapted:.3f}, NLL {nll(mean, std):.3f}"
)
print(
    f"mean predictive std (with noise): {std.mean():.3f} (target std in the new domain: "
    f"{y_test.std():.3f})"
)
print(f"95% interval coverage on the test points: {coverage:.1%}")

# %%
# Plot the model's uncertainty along one input
# --------------------------------------------
# A slice through input space: body-mass index (BMI, standardised) from -4 to 4,
# the other inputs at their mean over the 40 adaptation patients. Along it: the
# unchanged network, the adapted mean and ±2 standard deviations of the *latent*
# function (``include_noise=False``): the model's own uncertainty, without the
# observation noise. It is narrowest where the adaptation patients are (their BMI
# values are marked at the bottom) and widens away from them, where the 40 points say
# little. Right: the held-out patients, with ±2 std of a new observation (noise
# included), the interval whose coverage is printed above.

BMI = 1  # column of the body-mass index once sex is dropped
grid = np.linspace(-4, 4, 200)
X_slice = np.tile(X_adapt.mean(axis=0), (len(grid), 1))
X_slice[:, BMI] = grid
slice_mean, slice_std = regressor.predict(X_slice, return_std=True)

fig, (ax, ax_test) = plt.subplots(
    1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]}
)
ax.fill_between(
    grid,
    slice_mean - 2 * slice_std,
    slice_mean + 2 * slice_std,
    color="tab:blue",
    alpha=0.2,
    label="±2 std of the model (no noise)",
)
ax.plot(grid, slice_mean, color="tab:blue", label="adapted mean (FiniteNTKRegressor)")
ax.plot(
    grid,
    network_predict(X_slice),
    color="tab:gray",
    linestyle="--",
    label="trained network, unadapted",
)
ax.plot(
    X_adapt[:, BMI],
    np.full(len(X_adapt), ax.get_ylim()[0]),
    "|",
    color="black",
    markersize=12,
    label="BMI of the 40 adaptation patients",
)
ax.set_xlabel("body-mass index (standardised); other inputs at their mean")
ax.set_ylabel("standardised disease progression")
ax.set_title("along one input")
ax.legend(loc="upper left", fontsize=8)

rank = np.argsort(mean)
position = np.arange(len(rank))
ax_test.fill_between(
    position,
    mean[rank] - 2 * std[rank],
    mean[rank] + 2 * std[rank],
    color="tab:blue",
    alpha=0.2,
    label="±2 std (with noise)",
)
ax_test.plot(position, mean[rank], color="tab:blue", label="adapted mean")
ax_test.scatter(
    position,
    source_prediction[rank],
    s=8,
    marker="x",
    color="tab:gray",
    label="unadapted network",
)
ax_test.scatter(position, y_test[rank], s=8, color="black", label="true target")
ax_test.set_xlabel("held-out patients, sorted by adapted mean")
ax_test.set_title(f"held out: R² {r2_source:.2f} unadapted, {r2_adapted:.2f} adapted")
ax_test.legend(loc="upper left", fontsize=8)
fig.tight_layout()

plot_path = sys.argv[1] if len(sys.argv) > 1 else "quickstart.png"
fig.savefig(plot_path, dpi=120)
print(f"plot written to {plot_path}")
