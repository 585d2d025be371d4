"""Snapshot every prediction of a fixed grid of small fits, and compare two snapshots.

A refactoring tool: it shows that a change to the package changed no result. It fits
``FiniteNTKRegressor`` and ``FiniteNTKClassifier`` through the public API only (so it
survives modules moving), on small float64 problems with fixed seeds, over a grid of
networks (MLPs with one and three outputs, a small CNN on 6x6 images), solvers,
solve spaces, preconditioners, variances and links, and saves each prediction
(means, stds, covariances, log marginal likelihoods, class probabilities, decision
functions, fitted hyperparameters and iteration counts) under a key that names its
configuration, for example ``reg/mlp1/cg/function/jacobi/exact:std``.

Take a snapshot with each version of the code, then compare::

    PYTHONPATH=/tmp/fntk_before python benchmarks/snapshot.py /tmp/snapshot_before.npz
    python benchmarks/snapshot.py /tmp/snapshot_after.npz
    python benchmarks/snapshot.py --compare /tmp/snapshot_before.npz \\
        /tmp/snapshot_after.npz [--rtol 1e-10] [--differences-only]

``PYTHONPATH=TREE`` puts TREE's ``sklearn_fntk`` ahead of the editable install (the
script prints which copy it imported; run it as a script, not with ``-c`` from
another checkout, whose own directory would come first). The whole snapshot takes
about a minute on one thread. Every regressor parameter is passed explicitly (noise,
prior, ..., max_iter), so that a later change of a default does not show up as a
difference; the classifier gets only network, prior, prior_mean, parameters, link,
n_samples, solver, space, preconditioner, tol, batch_size, dtype and random_state.
A configuration that raises is skipped with a message (and then shows as a missing
key in a comparison against a snapshot that has it). Warnings are ignored
(``--show-warnings`` prints them instead).

Comparison criterion: arrays A (first file, the reference) and B (second file) of the
same key agree when, elementwise, ``|a - b| <= rtol * max(1, |a|)`` (``--rtol``,
default 1e-10): relative for entries above 1 in magnitude, absolute below; NaNs must
sit in the same places. For each key the comparison prints the max absolute and the
max relative difference ``|a - b| / max(1, |a|)``; it exits with status 1 if any key
exceeds the tolerance, differs in shape, or is missing from either file. Iteration
counts and ranks are compared like any other entry, so a change in them (a CG solve
taking one more iteration) also counts as a difference.
"""

import argparse
import os
import platform
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn

# Sizes: training points of each problem, test points for means and stds, and the
# first COV_POINTS of those for full covariances.
N_TEST, COV_POINTS = 20, 5
# Jacobian chunks smaller than n, so that chunked code paths run.
BATCH_SIZE = 32
# CG tolerance: tight, so that results are the exact solution up to rounding.
CG_TOL = 1e-10
REGRESSOR_DEFAULTS = dict(
    noise=0.1,
    prior=1.0,
    prior_mean="network",
    parameters=None,
    solver="dense",
    space="function",
    preconditioner=None,
    fisher_product="exact",
    variance="exact",
    rank=None,
    tol=CG_TOL,
    max_iter=5000,
    batch_size=BATCH_SIZE,
    dtype="float64",
    device="cpu",
    random_state=0,
    verbose=0,
)
CLASSIFIER_DEFAULTS = dict(
    prior=1.0,
    prior_mean="network",
    parameters=None,
    link="probit",
    n_samples=200,
    solver="dense",
    space="function",
    preconditioner=None,
    tol=CG_TOL,
    batch_size=BATCH_SIZE,
    dtype="float64",
    random_state=0,
)
META_PREFIX = "_meta:"


# -- problems ---------------------------------------------------------------------------


def mlp(n_in, n_hidden, n_out, seed):
    """A random tanh MLP ``n_in``-``n_hidden``-``n_out``.

    Parameters
    ----------
    n_in, n_hidden, n_out : int
        Layer widths.
    seed : int
        Seed of torch's default initialisation.

    Returns
    -------
    torch.nn.Sequential
        Parameters named ``0.weight``, ``0.bias``, ``2.weight``, ``2.bias``.
    """
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.Tanh(), nn.Linear(n_hidden, n_out))


def cnn(seed):
    """A random CNN on (n, 1, 6, 6) images: Conv2d(1, 3, 3), tanh, Linear(48, 1).

    Parameters
    ----------
    seed : int
        Seed of torch's default initialisation.

    Returns
    -------
    torch.nn.Sequential
        Parameters named ``0.*`` (convolution) and ``3.*`` (last layer).
    """
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 1)
    )


def regression_problems():
    """The regression problems: name -> (network, X, y, X_test, last-layer names).

    Returns
    -------
    dict
        ``mlp1``: n=80, 3 features, one output (p=81); ``mlp3``: n=60, three outputs
        (p=115, 180 function-space rows); ``cnn``: n=40 images 1x6x6 (p=79).
    """
    rng = np.random.default_rng(0)
    problems = {}
    X = rng.normal(size=(80 + N_TEST, 3))
    y = np.sin(X @ np.array([1.0, -0.5, 0.3])) + 0.1 * rng.normal(size=len(X))
    problems["mlp1"] = (
        mlp(3, 16, 1, seed=1),
        X[:80],
        y[:80],
        X[80:],
        ["2.weight", "2.bias"],
    )
    X = rng.normal(size=(60 + N_TEST, 3))
    Y = np.stack([np.sin(X[:, 0]), np.cos(X[:, 1]), X[:, 2] * X[:, 0]], axis=1)
    Y += 0.1 * rng.normal(size=Y.shape)
    problems["mlp3"] = (
        mlp(3, 16, 3, seed=2),
        X[:60],
        Y[:60],
        X[60:],
        ["2.weight", "2.bias"],
    )
    X = rng.normal(size=(40 + N_TEST, 1, 6, 6))
    y = np.tanh(X[:, 0, 2:4, 2:4].sum(axis=(1, 2))) + 0.1 * rng.normal(size=len(X))
    problems["cnn"] = (cnn(seed=3), X[:40], y[:40], X[40:], ["3.weight", "3.bias"])
    return problems


def classification_problems():
    """The classification problems: name -> (network, X, y, X_test).

    Returns
    -------
    dict
        ``c3``: 3 overlapping Gaussian classes in 2-D, n=90, 3 logits; ``c2_1logit``
        and ``c2_2logit``: 2 classes, n=80, with a 1-logit and a 2-logit network.
    """
    rng = np.random.default_rng(1)
    centers = np.array([[0.0, 1.0], [1.0, -0.5], [-1.0, -0.5]])
    labels = np.arange(90 + N_TEST) % 3
    X = centers[labels] + 0.8 * rng.normal(size=(len(labels), 2))
    problems = {"c3": (mlp(2, 16, 3, seed=4), X[:90], labels[:90], X[90:])}
    labels = np.arange(80 + N_TEST) % 2
    X = centers[labels] + 0.8 * rng.normal(size=(len(labels), 2))
    problems["c2_1logit"] = (mlp(2, 16, 1, seed=5), X[:80], labels[:80], X[80:])
    problems["c2_2logit"] = (mlp(2, 16, 2, seed=6), X[:80], labels[:80], X[80:])
    return problems


# -- grid -------------------------------------------------------------------------------


def regressor_cases(problems):
    """The regressor configurations.

    Parameters
    ----------
    problems : dict
        From :func:`regression_problems`.

    Yields
    ------
    key : str
        Stable name of the configuration.
    problem : str
        Key into ``problems``.
    params : dict
        Overrides of ``REGRESSOR_DEFAULTS``.
    extra : dict
        ``sample_weight`` (bool) and ``lml`` ("exact" or "stochastic").
    """
    plain = dict(sample_weight=False, lml="exact")
    for name in problems:
        for space in ("function", "parameter"):
            yield (
                f"reg/{name}/dense/{space}",
                name,
                dict(solver="dense", space=space),
                plain,
            )
            preconditioners = ["jacobi", "nystrom"]
            if space == "function":
                preconditioners.append("pivoted_cholesky")
            for pre in preconditioners:
                for variance in ("exact", "low_rank"):
                    params = dict(
                        solver="cg", space=space, preconditioner=pre, variance=variance
                    )
                    yield f"reg/{name}/cg/{space}/{pre}/{variance}", name, params, plain
    last = problems["mlp1"][4]
    for solver, space in (("dense", "function"), ("cg", "parameter")):
        cg = dict(preconditioner="nystrom") if solver == "cg" else {}
        base = dict(solver=solver, space=space, **cg)
        tag = f"{solver}/{space}"
        yield f"reg/mlp1/{tag}/last_layer", "mlp1", dict(base, parameters=last), plain
        yield (
            f"reg/mlp1/{tag}/sample_weight",
            "mlp1",
            base,
            dict(plain, sample_weight=True),
        )
        yield (
            f"reg/mlp1/{tag}/prior_mean_zero",
            "mlp1",
            dict(base, prior_mean="zero"),
            plain,
        )
    for space in ("function", "parameter"):
        params = dict(solver="dense", space=space, noise="auto", prior="auto")
        yield f"reg/mlp1/dense/{space}/evidence", "mlp1", params, plain
        params = dict(
            solver="cg", space=space, preconditioner="nystrom", variance="low_rank"
        )
        yield (
            f"reg/mlp1/cg/{space}/nystrom/low_rank/lml_stochastic",
            "mlp1",
            params,
            dict(plain, lml="stochastic"),
        )
    params = dict(solver="cg", space="parameter", preconditioner="nystrom")
    yield (
        "reg/mlp1/cg/parameter/nystrom/exact/finite_difference",
        "mlp1",
        dict(params, fisher_product="finite_difference"),
        plain,
    )
    params = dict(solver="cg", space="function", preconditioner="nystrom", rank=8)
    yield "reg/mlp1/cg/function/nystrom/exact/rank8", "mlp1", params, plain
    yield (
        "reg/mlp3/cg/function/none/exact",
        "mlp3",
        dict(solver="cg", space="function", preconditioner=None),
        plain,
    )
    auto = dict(solver="auto", space="auto", preconditioner="auto", variance="auto")
    yield "reg/cnn/auto", "cnn", auto, plain


def classifier_cases(problems):
    """The classifier configurations.

    Parameters
    ----------
    problems : dict
        From :func:`classification_problems`.

    Yields
    ------
    key : str
        Stable name of the configuration.
    problem : str
        Key into ``problems``.
    params : dict
        Overrides of ``CLASSIFIER_DEFAULTS``.
    """
    for name in problems:
        for link in ("probit", "map", "mc"):
            for space in ("function", "parameter"):
                params = dict(solver="dense", space=space, link=link)
                yield f"clf/{name}/dense/{space}/{link}", name, params
                for pre in ("jacobi", "nystrom"):
                    params = dict(solver="cg", space=space, preconditioner=pre, link=link)
                    yield f"clf/{name}/cg/{space}/{pre}/{link}", name, params
    params = dict(solver="dense", space="parameter", parameters=["2.weight", "2.bias"])
    yield "clf/c3/dense/parameter/probit/last_layer", "c3", params
    params = dict(
        solver="cg", space="function", preconditioner="nystrom", prior_mean="zero"
    )
    yield "clf/c3/cg/function/nystrom/probit/prior_mean_zero", "c3", params


# -- running ----------------------------------------------------------------------------


def run_regressor(estimator_class, problem, params, extra):
    """Fit one regressor configuration and collect its results.

    Parameters
    ----------
    estimator_class : type
        ``FiniteNTKRegressor``.
    problem : tuple
        ``(network, X, y, X_test, last_layer)``.
    params : dict
        Overrides of ``REGRESSOR_DEFAULTS``.
    extra : dict
        See :func:`regressor_cases`.

    Returns
    -------
    dict
        Result name -> ndarray.
    """
    network, X, y, X_test, _ = problem
    estimator = estimator_class(network, **{**REGRESSOR_DEFAULTS, **params})
    weight = None
    if extra["sample_weight"]:
        weight = 0.5 + np.random.default_rng(7).random(len(X))
    estimator.fit(X, y, sample_weight=weight)
    out = {"mean": estimator.predict(X_test)}
    out["std_mean"], out["std"] = estimator.predict(X_test, return_std=True)
    out["cov_mean"], out["cov"] = estimator.predict(X_test[:COV_POINTS], return_cov=True)
    if extra["lml"] == "stochastic":
        out["lml_stochastic"] = estimator.log_marginal_likelihood(
            method="stochastic", return_std_error=True
        )
    else:
        out["lml"] = estimator.log_marginal_likelihood()
    out["noise_"], out["prior_"] = estimator.noise_, estimator.prior_
    out["n_iter_"], out["rank_"] = estimator.n_iter_, estimator.rank_
    return out


def run_classifier(estimator_class, problem, params):
    """Fit one classifier configuration and collect its results.

    Parameters
    ----------
    estimator_class : type
        ``FiniteNTKClassifier``.
    problem : tuple
        ``(network, X, y, X_test)``.
    params : dict
        Overrides of ``CLASSIFIER_DEFAULTS``.

    Returns
    -------
    dict
        Result name -> ndarray.
    """
    network, X, y, X_test = problem
    estimator = estimator_class(network, **{**CLASSIFIER_DEFAULTS, **params})
    estimator.fit(X, y)
    return {
        "proba": estimator.predict_proba(X_test),
        "decision": estimator.decision_function(X_test),
        "n_iter_": estimator.n_iter_,
    }


def take_snapshot(path, only=None, show_warnings=False):
    """Run the whole grid and save every result to ``path`` (an .npz file).

    Parameters
    ----------
    path : str
        Output file.
    only : str or None
        Run only the configurations whose key contains this substring.
    show_warnings : bool
        Print warnings instead of ignoring them.

    Returns
    -------
    int
        The number of configurations skipped because they raised.
    """
    import sklearn_fntk
    from sklearn_fntk import FiniteNTKClassifier, FiniteNTKRegressor

    torch.set_num_threads(1)
    print(f"sklearn_fntk from {os.path.dirname(sklearn_fntk.__file__)}", flush=True)
    regression, classification = regression_problems(), classification_problems()
    cases = [
        (
            key,
            lambda p=params, n=name, e=extra: run_regressor(
                FiniteNTKRegressor, regression[n], p, e
            ),
        )
        for key, name, params, extra in regressor_cases(regression)
    ] + [
        (
            key,
            lambda p=params, n=name: run_classifier(
                FiniteNTKClassifier, classification[n], p
            ),
        )
        for key, name, params in classifier_cases(classification)
    ]
    results, skipped, start = {}, 0, time.perf_counter()
    for key, run in cases:
        if only is not None and only not in key:
            continue
        tic = time.perf_counter()
        with warnings.catch_warnings(record=show_warnings) as caught:
            if not show_warnings:
                warnings.simplefilter("ignore")
            else:
                warnings.simplefilter("always")
            try:
                out = run()
            except Exception as error:  # any failure: report it and skip
                skipped += 1
                print(f"SKIP {key}: {type(error).__name__}: {error}", flush=True)
                continue
        for name, value in out.items():
            results[f"{key}:{name}"] = np.asarray(value, dtype=np.float64)
        print(f"{time.perf_counter() - tic:6.2f} s  {key}", flush=True)
        for warning in caught or []:
            print(f"    {warning.category.__name__}: {warning.message}", flush=True)
    results[META_PREFIX + "package"] = np.array(os.path.dirname(sklearn_fntk.__file__))
    results[META_PREFIX + "versions"] = np.array(
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"torch {torch.__version__}"
    )
    np.savez(path, **results)
    n_keys = sum(not k.startswith(META_PREFIX) for k in results)
    print(
        f"saved {n_keys} arrays to {path} in {time.perf_counter() - start:.1f} s "
        f"({skipped} configuration(s) skipped)"
    )
    return skipped


def compare(path_a, path_b, rtol=1e-10, differences_only=False):
    """Compare two snapshots key by key; see the module docstring for the criterion.

    Parameters
    ----------
    path_a, path_b : str
        Snapshots; ``path_a`` is the reference (its magnitudes scale the tolerance).
    rtol : float
        Tolerance of ``|a - b| <= rtol * max(1, |a|)``.
    differences_only : bool
        Print only the keys that differ at all (and any missing or misshapen).

    Returns
    -------
    bool
        True when every key is in both files with equal shapes and within tolerance.
    """
    with np.load(path_a) as file_a, np.load(path_b) as file_b:
        a = {key: file_a[key] for key in file_a.files}
        b = {key: file_b[key] for key in file_b.files}
    for key in sorted(k for k in a if k.startswith(META_PREFIX)):
        print(f"{key[len(META_PREFIX) :]}: A {a[key]} | B {b.get(key, '-')}")
    keys_a = {k for k in a if not k.startswith(META_PREFIX)}
    keys_b = {k for k in b if not k.startswith(META_PREFIX)}
    ok = True
    width = max(map(len, keys_a | keys_b), default=10)
    print(f"{'key':<{width}}  {'max abs diff':>12}  {'max rel diff':>12}")
    worst = 0.0
    for key in sorted(keys_a | keys_b):
        if key not in keys_a or key not in keys_b:
            ok = False
            print(f"{key:<{width}}  MISSING in {'B' if key in keys_a else 'A'}")
            continue
        x, y = a[key], b[key]
        if x.shape != y.shape:
            ok = False
            print(f"{key:<{width}}  SHAPE {x.shape} vs {y.shape}")
            continue
        nan_x, nan_y = np.isnan(x), np.isnan(y)
        diff = np.where(nan_x & nan_y, 0.0, np.abs(x - y))
        diff = np.where(nan_x ^ nan_y, np.inf, diff)
        relative = diff / np.maximum(1.0, np.abs(np.nan_to_num(x)))
        max_abs = float(diff.max(initial=0.0))
        max_rel = float(relative.max(initial=0.0))
        worst = max(worst, max_rel)
        flag = ""
        if max_rel > rtol:
            ok, flag = False, "  EXCEEDS"
        if max_abs > 0 or not differences_only:
            print(f"{key:<{width}}  {max_abs:12.3e}  {max_rel:12.3e}{flag}")
    print(
        f"{len(keys_a & keys_b)} common keys, {len(keys_a ^ keys_b)} missing from one "
        f"side; largest relative difference {worst:.3e}; tolerance {rtol:g}: "
        f"{'OK' if ok else 'DIFFERENT'}"
    )
    return ok


def main():
    """Command line: take a snapshot, or compare two (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", nargs="?", help="snapshot file to write (.npz)")
    parser.add_argument(
        "--compare", nargs=2, metavar=("A", "B"), help="compare two snapshot files"
    )
    parser.add_argument(
        "--rtol",
        type=float,
        default=1e-10,
        help="tolerance: |a - b| <= rtol * max(1, |a|) elementwise (default 1e-10)",
    )
    parser.add_argument(
        "--differences-only",
        action="store_true",
        help="with --compare, print only the keys that differ at all",
    )
    parser.add_argument(
        "--only", default=None, help="run only configurations whose key contains this"
    )
    parser.add_argument(
        "--show-warnings", action="store_true", help="print warnings instead of ignoring"
    )
    args = parser.parse_args()
    if args.compare:
        ok = compare(*args.compare, rtol=args.rtol, differences_only=args.differences_only)
        sys.exit(0 if ok else 1)
    if args.output is None:
        parser.error("give an output file, or --compare A B")
    take_snapshot(args.output, only=args.only, show_warnings=args.show_warnings)


if __name__ == "__main__":
    main()
