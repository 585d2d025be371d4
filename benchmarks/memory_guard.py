"""The memory guard under an address-space limit: refused before allocating, or fits.

Each dense path (the regressor's dense fit in both spaces, the classifier's dense Newton
steps, the evidence: noise/prior "auto" (dense) and ``log_marginal_likelihood()`` after
a CG fit, ``predict(return_cov=True)`` and ``sample_y``) runs in a subprocess under
``prlimit --as`` (8 GB by default), once at a size that fits and once at a size that
does not. The table says whether the path raised MemoryError, how long it took (a
refusal must come before the work), the peak the guard predicted, and the peak measured:
the growth of ru_maxrss over the path, from a baseline taken after import, data set-up
and (for prediction and the evidence) the fit, with the high-water mark reset first
(/proc/self/clear_refs), since tracemalloc does not see torch's memory.

    python benchmarks/memory_guard.py            # the table, a few minutes
    python benchmarks/memory_guard.py --limit 0  # no prlimit (peaks only)

Why ``--as`` works here: torch maps about 0.9 GB of address space at import
(measured ``VmSize`` after ``import torch, sklearn_fntk`` and a small fit), so an
8 GB address-space limit leaves about 7 GB, and the guard reads it as
RLIMIT_AS - VmSize.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

# case: sizes that fit, then one that does not, under 8 GB of address space
CASES = {
    "regressor dense, function space": (6000, 12000, 40000),
    "regressor dense, parameter space": (4000, 24000),
    "classifier dense, function space": (3000, 30000),
    "classifier dense, parameter space": (3000, 24000),
    "evidence, noise/prior auto": (3000, 20000),
    "evidence after a CG fit": (6000, 40000),
    "predict(return_cov=True)": (6000, 12000, 40000),
    "return_cov after a CG fit": (6000, 40000),
    "sample_y": (3000, 30000),
}


def _peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak():
    """Reset the high-water mark (Linux); the baseline is then the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        pass
    return _peak()


def _network(n_in, n_out, hidden, seed=0):
    import torch

    torch.manual_seed(seed)
    layers, width = [], n_in
    for size in hidden:
        layers += [torch.nn.Linear(width, size), torch.nn.Tanh()]
        width = size
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, n_out))


def run_case(case, size):
    """Run one path at ``size`` in this process; returns a dict for the table."""
    import torch
    from sklearn.base import clone

    import sklearn_fntk._linalg.memory as memory
    from sklearn_fntk import FiniteNTKClassifier, FiniteNTKRegressor

    torch.set_num_threads(1)
    predicted = []
    counted = memory.peak_bytes

    def recording(parts, dtype):
        n_bytes = counted(parts, dtype)
        predicted.append(n_bytes)
        return n_bytes

    memory.peak_bytes = recording
    rng = np.random.default_rng(0)
    small = 200  # training points of the prediction paths
    predicting = ("predict(return_cov=True)", "return_cov after a CG fit", "sample_y")
    n = small if case in predicting else size
    X = rng.normal(size=(n, 4))
    y = np.sin(X @ np.array([1.0, -1.0, 0.5, 0.3])) + 0.1 * rng.normal(size=n)
    if "parameter space" in case:
        # p = size: one hidden layer of width w has 6w + 1 parameters
        estimator_net = _network(4, 1, (size // 6,))
        space = "parameter"
    else:
        estimator_net = _network(4, 1, (16,))
        space = "function"
    if case.startswith("classifier"):
        model = FiniteNTKClassifier(estimator_net, solver="dense", space=space)
        target = y > 0
    elif case == "evidence, noise/prior auto":
        model = FiniteNTKRegressor(estimator_net, solver="dense", space="function")
        target = y
    elif case == "return_cov after a CG fit":  # parameter space: p = 97 < n = 200
        model = FiniteNTKRegressor(
            estimator_net, noise=0.1, prior=1.0, solver="cg", tol=1e-4
        )
        target = y
    elif case == "evidence after a CG fit":
        model = FiniteNTKRegressor(
            estimator_net, noise=0.1, prior=1.0, solver="cg", space="function",
            variance="low_rank", tol=1e-3,
        )  # fmt: skip
        target = y
    else:
        model = FiniteNTKRegressor(
            estimator_net, noise=0.1, prior=1.0, solver="dense", space=space
        )
        target = y
    fit_first = case in ("evidence after a CG fit", *predicting)
    # first calls of BLAS/LAPACK and torch set up buffers: not the path's peak
    clone(model).set_params(network=_network(4, 1, (16,))).fit(X[:100], target[:100])
    if fit_first:
        model.fit(X, target)
        X_test = rng.normal(size=(size, 4))
        model.predict(X_test[:50], return_std=True)  # warm up prediction too
    predicted.clear()
    base = _reset_peak()
    start = time.perf_counter()
    outcome = "ok"
    try:
        if case == "evidence after a CG fit":
            model.log_marginal_likelihood()
        elif case.startswith(("predict(return_cov", "return_cov")):
            model.predict(X_test, return_cov=True)
        elif case == "sample_y":
            model.sample_y(X_test, n_samples=3)
        else:
            model.fit(X, target)
    except MemoryError as error:
        outcome = f"MemoryError: {str(error)[:60]}..."
    seconds = time.perf_counter() - start
    return {
        "case": case,
        "size": size,
        "outcome": outcome,
        "seconds": seconds,
        "predicted": max(predicted, default=0),
        "measured": _peak() - base,
        "available": memory.available_bytes("cpu") + (_peak() - base),
    }


def _child(case, size, limit):
    command = [sys.executable, __file__, "--case", case, "--size", str(size)]
    if limit:
        if shutil.which("prlimit") is None:
            raise SystemExit("prlimit is not installed; pass --limit 0")
        command = ["prlimit", f"--as={limit}", *command]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        return {"case": case, "size": size, "outcome": f"crashed: {tail}"}
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=8_000_000_000)
    parser.add_argument("--case")
    parser.add_argument("--size", type=int)
    parser.add_argument("--only", help="run the cases whose name contains this")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.size)))
        return
    gib = 2**30
    limit = f"prlimit --as={args.limit}" if args.limit else "no limit"
    print(f"{limit}; {os.cpu_count()} CPUs; sizes are n (fits), p or m as named")
    header = (
        f"{'path':36} {'size':>6} {'outcome':14} {'s':>6} {'predicted':>10} "
        f"{'measured':>9} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for case, sizes in CASES.items():
        if args.only and args.only not in case:
            continue
        for size in sizes:
            row = _child(case, size, args.limit)
            outcome = row["outcome"].split(":")[0]
            if "seconds" not in row:
                print(f"{case:36} {size:>6} {row['outcome']}")
                continue
            ratio = row["measured"] / row["predicted"] if row["predicted"] else float("nan")
            measured = row["measured"] / gib
            print(
                f"{case:36} {size:>6} {outcome:14} {row['seconds']:6.1f} "
                f"{row['predicted'] / gib:8.2f}Gi {measured:7.2f}Gi "
                + (f"{ratio:6.2f}" if outcome == "ok" else "     -")
            )


if __name__ == "__main__":
    main()
