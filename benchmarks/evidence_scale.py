"""noise="auto" and prior="auto" on the CG path: accuracy and cost of the evidence.

With the dense solver the evidence is exact (one eigendecomposition); with CG it is a
Lanczos quadrature (``LanczosSpectrum``). Two experiments:

- ``medium``: n = 4000 points, MLP 10-64-64-1 (p = 4929), float64. The "auto" fit
  with the dense solver against the one with CG forced, in function and parameter
  space: the fitted noise and prior and their relative differences (the target is
  5%), and the seconds of each fit.
- ``big``: n = 100,000 points, MLP 32-128-128-1 (p = 20,865), float32, CG: the
  seconds of one fit at fixed noise and prior against the fit with both "auto"
  (the target is at most 3x), in one process, side by side.

Run from the repository root::

    python benchmarks/evidence_scale.py medium
    python benchmarks/evidence_scale.py big [--quick]
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import train_test_data, trained_mlp  # noqa: E402

from sklearn_fntk import FiniteNTKRegressor  # noqa: E402


def timed_fit(regressor, X, y):
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        regressor.fit(X, y)
    for warning in caught:
        print(f"  warning: {warning.message}")
    return time.perf_counter() - start


def medium(args):
    module = trained_mlp((10, 64, 64, 1))
    X, y, _ = train_test_data(4000, 10, 10, seed=3)
    y = y + 0.1 * np.random.default_rng(4).normal(size=len(y))
    print(f"n={len(y)}, MLP 10-64-64-1, float64, noise std 0.1 added to the targets")
    print(f"{'space':>10} {'solver':>7} {'noise_':>10} {'prior_':>10} {'seconds':>8}")
    for space in ("function", "parameter"):
        fits = {}
        for solver in ("dense", "cg"):
            reg = FiniteNTKRegressor(module, space=space, solver=solver, random_state=0)
            seconds = timed_fit(reg, X, y)
            fits[solver] = reg
            print(
                f"{space:>10} {solver:>7} {reg.noise_:>10.4g} {reg.prior_:>10.4g} "
                f"{seconds:>8.1f}"
            )
        dense, cg = fits["dense"], fits["cg"]
        print(
            f"{space:>10} relative difference cg/dense - 1: noise "
            f"{cg.noise_ / dense.noise_ - 1:+.2%}, "
            f"prior {cg.prior_ / dense.prior_ - 1:+.2%}"
        )


def big(args):
    n = 10000 if args.quick else 100000
    module = trained_mlp((32, 128, 128, 1))
    X, y, _ = train_test_data(n, 10, 32, seed=6)
    X = X.astype(np.float32)
    options = dict(dtype="float32", tol=1e-4, batch_size=2048, random_state=0)
    fixed = FiniteNTKRegressor(module, noise=1e-2, prior=1.0, **options)
    auto = FiniteNTKRegressor(module, **options)
    seconds_fixed = timed_fit(fixed, X, y)
    seconds_auto = timed_fit(auto, X, y)
    print(
        f"n={n}, MLP 32-128-128-1 (p={fixed.n_params_}), float32, {fixed.space_} space, "
        f"solver {fixed.solver_}"
    )
    print(
        f"fit at noise=1e-2, prior=1: {seconds_fixed:.1f} s, {fixed.n_iter_} CG iterations"
    )
    print(
        f"fit with noise and prior 'auto': {seconds_auto:.1f} s ({auto.n_iter_} CG "
        f"iterations; noise_ {auto.noise_:.4g}, prior_ {auto.prior_:.4g}); "
        f"ratio {seconds_auto / seconds_fixed:.2f}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=["medium", "big"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    globals()[args.experiment](args)


if __name__ == "__main__":
    main()
