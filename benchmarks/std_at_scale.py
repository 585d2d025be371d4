"""Predictive std at scale with the defaults, against the exact std, and its cost.

    python benchmarks/std_at_scale.py                     # n = 100,000, p = 21,825
    python benchmarks/std_at_scale.py --n 20000 --checked 5    # a quicker look

The data and network of ``million_points.py`` (MLP 8-128-128-32-1, tanh, trained
briefly on other samples; inputs N(0, I), target sin(x·a) + 0.5 cos(2 x·b) plus noise
0.1), float32. In order, in one process:

1. ``FiniteNTKRegressor(net, dtype="float32")`` with every default (noise and prior
   "auto") fitted, then ``predict(return_std=True)`` on 2000 test points: wall times,
   their ratio, and the peak RSS of the process up to there (``ru_maxrss``);
2. with ``--one-fit``, the same fit with noise and prior fixed at the values step 1
   found: one fit, the denominator of "hyperparameters in at most 3x one fit" (the
   stages of step 1 say it too: the fixed fit runs the same ones but the evidence's);
3. with ``--low-rank``, the former default above 8192 parameters
   (``variance="low_rank"``), for comparison;
4. the exact std at ``--checked`` of the test points, computed independently of the
   dense path: a float64 fit at the same noise and prior whose variances come from
   preconditioned CG solves (A x = J*ᵀ with A = JᵀJ + (σ²/s) I, each column run until
   its variance is within 1e-8, relative; no dense factor), times the Student-t
   factor ν/(ν - 2) of step 1 (the defaults' predictive). Printed: the largest
   relative difference of step 1's (and step 3's) std from it.
"""

import argparse
import logging
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import make_data, trained_mlp  # noqa: E402

from sklearn_fntk import FiniteNTKRegressor  # noqa: E402
from sklearn_fntk._inference.policy import Policy  # noqa: E402


def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed_fit(regressor, X, y):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings(
            "ignore", message=".*torch.jit.script", category=DeprecationWarning
        )
        start = time.perf_counter()
        regressor.fit(X, y)
        seconds = time.perf_counter() - start
    for warning in caught:
        print(f"  warning: {str(warning.message)[:160]}")
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--checked", type=int, default=20)
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 128, 128, 32, 1])
    parser.add_argument("--low-rank", action="store_true", help="also the low-rank std")
    parser.add_argument("--one-fit", action="store_true", help="also a fixed fit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(format="  %(message)s")  # the defaults' stages (verbose=1)
    module = trained_mlp(tuple(args.widths), seed=args.seed)
    X, f = make_data(args.n + args.n_test, args.widths[0], seed=args.seed + 7)
    X = X.astype(np.float32)
    X, X_test = X[: args.n], X[args.n :]
    noise = np.random.default_rng(args.seed + 8).normal(size=args.n)
    y = (f[: args.n] + 0.1 * noise).astype(np.float32)
    checked = np.random.default_rng(args.seed + 9).choice(
        args.n_test, args.checked, replace=False
    )
    print(
        f"n={args.n}, MLP {'-'.join(map(str, args.widths))}, float32, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )

    default = FiniteNTKRegressor(module, dtype="float32", random_state=0, verbose=1)
    fit_seconds = timed_fit(default, X, y)
    start = time.perf_counter()
    _, std = default.predict(X_test, return_std=True)
    predict_seconds = time.perf_counter() - start
    peak = peak_gib()
    noise_, prior_, dof = default.noise_, default.prior_, default.predictive_dof_
    print(
        f"defaults: p={default.n_params_}, solver={default.solver_}, "
        f"space={default.space_}, variance={default.variance_}; noise_={noise_:.5g}, "
        f"prior_={prior_:.5g}, predictive_dof_={dof:g}\n"
        f"  fit {fit_seconds:.1f} s, predict(return_std) on {args.n_test} points "
        f"{predict_seconds:.1f} s: predict / fit = {predict_seconds / fit_seconds:.3f}; "
        f"peak RSS so far {peak:.2f} GiB",
        flush=True,
    )
    std = std[checked]
    del default

    if args.one_fit:
        fixed = FiniteNTKRegressor(
            module, dtype="float32", noise=noise_, prior=prior_, random_state=0
        )
        fixed_seconds = timed_fit(fixed, X, y)
        print(
            f"one fit at that noise and prior: {fixed_seconds:.1f} s; defaults "
            f"('auto') / one fit = {fit_seconds / fixed_seconds:.2f}",
            flush=True,
        )
        del fixed

    low_rank_std = None
    if args.low_rank:
        low_rank = FiniteNTKRegressor(
            module, dtype="float32", variance="low_rank", random_state=0
        )
        low_rank_seconds = timed_fit(low_rank, X, y)
        low_rank_std = low_rank.predict_std(X_test[checked])
        print(
            f"variance='low_rank' (the former default): fit {low_rank_seconds:.1f} s, "
            f"rank {low_rank.rank_}, tail weight {low_rank.variance_tail_weight_:.3g}",
            flush=True,
        )
        del low_rank

    start = time.perf_counter()
    exact = FiniteNTKRegressor(
        module, noise=noise_, prior=prior_, solver="cg", variance="exact",
        tol=1e-8, random_state=0,
    )  # fmt: skip
    exact._policy = Policy(variance_factor_max_size=0, factor_bytes=0)  # CG variances
    timed_fit(exact, X.astype(np.float64), y.astype(np.float64))
    exact_std = exact.predict_std(X_test[checked].astype(np.float64))
    exact_std = exact_std * np.sqrt(dof / (dof - 2))  # the Student-t predictive
    print(
        f"exact std at {args.checked} points (float64, CG variances to 1e-8): "
        f"{time.perf_counter() - start:.1f} s",
        flush=True,
    )
    error = np.abs(std - exact_std) / exact_std
    print(
        f"defaults: largest relative std error {error.max():.2e} "
        f"(median {np.median(error):.2e}) over {args.checked} points"
    )
    if low_rank_std is not None:
        error = (low_rank_std - exact_std) / exact_std
        print(
            f"low-rank: relative std error {error.min():+.3f} to {error.max():+.3f} "
            f"(median {np.median(error):+.3f})"
        )


if __name__ == "__main__":
    main()
