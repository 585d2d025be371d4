"""Predictive std with the CG solver and the default variance, against the dense one.

n = 3000 points, MLP 20-256-256-1 (p = 71,425; the network of bench_core.py),
float64, noise 0.01 and prior 0.01 fixed: the fit with ``solver="cg"`` and
``variance="auto"`` (exact, from a dense factor of the 3000 x 3000 function-space
system assembled at fit time) against ``solver="dense"`` (the path checked against
the float64 reference in the tests), at ``tol`` 1e-10 and 1e-8, on 50 test points:
the largest relative std difference. Targets: 1e-5 at tol=1e-10, 1e-4 at 1e-8.

Run from the repository root::

    python benchmarks/variance_accuracy.py
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import train_test_data, trained_mlp  # noqa: E402

from sklearn_fntk import FiniteNTKRegressor  # noqa: E402


def main():
    module = trained_mlp((20, 256, 256, 1))
    X, y, X_test = train_test_data(3000, 50, 20, seed=5)
    options = dict(noise=0.01, prior=0.01, random_state=0)
    start = time.perf_counter()
    dense = FiniteNTKRegressor(module, solver="dense", **options).fit(X, y)
    reference = dense.predict_std(X_test)
    print(
        f"n=3000, p={dense.n_params_}, float64; dense fit + std "
        f"{time.perf_counter() - start:.1f} s"
    )
    for tol in (1e-10, 1e-8):
        start = time.perf_counter()
        cg = FiniteNTKRegressor(module, solver="cg", tol=tol, **options).fit(X, y)
        std = cg.predict_std(X_test)
        error = np.max(np.abs(std - reference) / reference)
        print(
            f"solver='cg', tol={tol:g}: variance_={cg.variance_}, {cg.n_iter_} CG "
            f"iterations, largest relative std difference {error:.2e} "
            f"({time.perf_counter() - start:.1f} s)"
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
