"""
The cost story: dense against matrix-free, as n and p grow
==========================================================

FiniteNTKRegressor solves either the n·k x n·k kernel system (function space) or the
p x p Fisher system (parameter space), by a Cholesky factorisation of the assembled
matrix (``solver="dense"``) or by preconditioned conjugate gradient on matrix-free
products (``solver="cg"``). The dense path costs O(n²p + n³) in function space; CG costs
O(n·p) per iteration and never holds an n x n or n x p matrix.

This example times ``fit`` plus ``predict(return_std=True)`` on 200 test points for
both solvers, first as the number of training points n grows (p fixed), then as the
width of the network, and so p, grows (n fixed), and plots both on log-log axes. Set
``SKLEARN_FNTK_EXAMPLE_SMALL=1`` for a quick run.
"""

# %%
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from sklearn_fntk import FiniteNTKRegressor  # noqa: E402

SMALL = os.environ.get("SKLEARN_FNTK_EXAMPLE_SMALL") == "1"
SIZES = [100, 200, 400] if SMALL else [250, 500, 1000, 2000, 4000]
WIDTHS = [16, 32, 64] if SMALL else [32, 64, 128, 256]
FIXED_N = 300 if SMALL else 1000
FIXED_WIDTH = 32 if SMALL else 64
torch.set_num_threads(1)  # steadier timings on a shared machine


def mlp(width, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, 1),
    )


def data(n, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n + 200, 8))
    y = np.sin(X[:, 0]) + 0.5 * X[:, 1] * X[:, 2] + 0.1 * rng.normal(size=n + 200)
    return X[:n], y[:n], X[n:]


def seconds(network, n, solver):
    """Time of fit + predict(return_std=True), in function space."""
    X, y, X_test = data(n)
    reg = FiniteNTKRegressor(network, noise=0.1, solver=solver, space="function")
    start = time.perf_counter()
    reg.fit(X, y).predict(X_test, return_std=True)
    return time.perf_counter() - start, reg.n_params_


# %%
# Growing n at fixed width
# ------------------------
# A first small fit pays torch's one-off start-up (lazy imports), outside the timings.
seconds(mlp(FIXED_WIDTH), 50, "dense")
by_n = {
    solver: [seconds(mlp(FIXED_WIDTH), n, solver)[0] for n in SIZES]
    for solver in ("dense", "cg")
}
for i, n in enumerate(SIZES):
    print(f"n={n:5d}: dense {by_n['dense'][i]:6.2f} s, cg {by_n['cg'][i]:6.2f} s")

# %%
# Growing p at fixed n
# --------------------
by_p = {"dense": [], "cg": []}
params = []
for width in WIDTHS:
    for solver in ("dense", "cg"):
        elapsed, p = seconds(mlp(width), FIXED_N, solver)
        by_p[solver].append(elapsed)
    params.append(p)
for i, p in enumerate(params):
    print(f"p={p:6d}: dense {by_p['dense'][i]:6.2f} s, cg {by_p['cg'][i]:6.2f} s")

# %%
# Log-log plot
# ------------
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
for solver, marker in (("dense", "o"), ("cg", "s")):
    left.loglog(SIZES, by_n[solver], marker=marker, label=solver)
    right.loglog(params, by_p[solver], marker=marker, label=solver)
left.set(
    xlabel="training points n", ylabel="fit + predict_std (s)", title=f"width {FIXED_WIDTH}"
)
right.set(xlabel="parameters p", title=f"n = {FIXED_N}")
for axis in (left, right):
    axis.legend()
    axis.grid(True, which="both", alpha=0.3)
fig.tight_layout()
fig.savefig("cost_scaling.png", dpi=100)
print("plot written to cost_scaling.png")
