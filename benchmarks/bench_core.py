"""Core benchmark: kernel products, and fit + predict against an explicit-Jacobian GP.

Everything is measured side by side in one process and printed as times and ratios;
nothing is asserted. benchmarks/README.md says what each ratio means.

(a) Kernel products. One product K u = s·J(Jᵀu) + σ²u by ``FunctionOperator`` over
    ``JacobianProducts`` with the cached linearization (``cache_bytes=1 << 30``), with
    a fresh VJP + JVP per product (``cache_bytes=0``), and with the layerwise kernel
    the estimator uses for Linear/elementwise networks, each divided by the time of
    one forward + backward pass of a plain copy of the module over the same points.

(b) Fit + predict. ``FiniteNTKRegressor`` with ``solver="dense"`` and ``solver="cg"``
    (no preconditioner, Jacobi, "auto"; exact and low-rank variances) against a
    reference written here from the formulas: the explicit (n·k x p) Jacobian by
    ``torch.func.jacrev``, K = s·J Jᵀ + σ²I, Cholesky, the cross kernel s·J J*ᵀ. The
    reference and the dense solver run only where the Jacobian fits in
    ``--reference-max-gib``; above, only the CG rows run.

Run from the repository root: ``python benchmarks/bench_core.py [--quick]``.
"""

import argparse
import copy
import statistics
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from torch.func import functional_call, jacrev, vmap

from sklearn_fntk import FiniteNTKRegressor
from sklearn_fntk._inference.operators import FunctionOperator
from sklearn_fntk._linearize.jacobian import JacobianProducts
from sklearn_fntk._linearize.layerwise import LayerwiseKernel
from sklearn_fntk._linearize.network import FunctionalNetwork

_DTYPES = {"float64": torch.float64, "float32": torch.float32}

# --cg name: (label, FiniteNTKRegressor parameters, which test points get a std:
#   "all", "subset" (--exact-std-points, time scaled to all) or "none" (mean only)).
# Each test point's exact CG variance costs about as many iterations as the fit, so
# the exact std is measured with the best preconditioner only.
CG_CONFIGURATIONS = {
    "none": ("cg, no preconditioner", dict(preconditioner=None, variance="exact"), "none"),
    "jacobi": ("cg, jacobi", dict(preconditioner="jacobi", variance="exact"), "none"),
    "auto": ("cg, auto", dict(preconditioner="auto", variance="exact"), "subset"),
    "low-rank": (
        "cg, auto, low-rank std",
        dict(preconditioner="auto", variance="low_rank"),
        "all",
    ),
}
# The network is trained on its own sample of this size from the same distribution.
TRAIN_POINTS = 2000


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[2000, 20000],
        help="training set sizes n (default: 2000 20000)",
    )
    parser.add_argument(
        "--n-test", type=int, default=500, help="test points in (b) (default: 500)"
    )
    parser.add_argument(
        "--exact-std-points",
        type=int,
        default=50,
        help="test points on which CG computes the exact std, its time "
        "scaled to --n-test (default: 50)",
    )
    parser.add_argument("--width", type=int, default=256, help="hidden width (256)")
    parser.add_argument("--n-features", type=int, default=20, help="input features (20)")
    parser.add_argument(
        "--train-steps",
        type=int,
        default=200,
        help="Adam steps (batches of 256) before linearizing; 0 keeps "
        "the random initialisation (default: 200)",
    )
    parser.add_argument(
        "--noise", type=float, default=1e-2, help="noise variance in (b) (default: 1e-2)"
    )
    parser.add_argument(
        "--prior", type=float, default=1e-2, help="prior variance in (b) (default: 1e-2)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1024,
        help="samples per Jacobian chunk (default: 1024, the estimator's)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed rounds in (a), after one warm-up round (default: 5)",
    )
    parser.add_argument(
        "--reference-max-gib",
        type=float,
        default=4.0,
        help="largest explicit Jacobian the reference may build (4 GiB)",
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float64")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--part",
        nargs="+",
        choices=["a", "b"],
        default=["a", "b"],
        help="which parts to run (default: both)",
    )
    parser.add_argument(
        "--cg",
        nargs="+",
        choices=list(CG_CONFIGURATIONS),
        default=list(CG_CONFIGURATIONS),
        help="CG rows of (b) (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 rounds in (a); (b) only at the smallest size, exact CG std on 8 points",
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats = 3
        args.exact_std_points = min(args.exact_std_points, 8)
    args.exact_std_points = min(args.exact_std_points, args.n_test)
    return args


# -- problem ----------------------------------------------------------------------------


def make_network(n_features, width, seed):
    """A tanh MLP n_features-width-width-1."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(n_features, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, 1),
    )


def make_data(n, n_features, rng):
    """Gaussian inputs and a smooth standardised target of two random projections."""
    X = rng.standard_normal((n, n_features))
    directions = rng.standard_normal((n_features, 2)) / np.sqrt(n_features)
    projections = X @ directions
    y = np.sin(2 * projections[:, 0]) + 0.5 * projections[:, 1] ** 2
    return X, (y - y.mean()) / y.std()


def train_briefly(network, X, y, steps, seed):
    """Adam on mini-batches of 256, in float32."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.as_tensor(X, dtype=torch.float32)
    targets = torch.as_tensor(y, dtype=torch.float32)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    for _ in range(steps):
        batch = torch.randint(0, len(targets), (256,), generator=generator)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(network(inputs[batch])[:, 0], targets[batch])
        loss.backward()
        optimizer.step()


# -- timing -----------------------------------------------------------------------------


def timed(function):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def interleaved_medians(calls, repeats):
    """Median seconds of each call over ``repeats`` rounds, after a warm-up round.

    Each round runs every call once, in turn, so that all of them see the same load
    on a shared machine and their ratios stay meaningful.
    """
    times = {name: [] for name in calls}
    for _ in range(repeats + 1):
        for name, call in calls.items():
            times[name].append(timed(call)[0])
    return {name: statistics.median(seconds[1:]) for name, seconds in times.items()}


# -- (a) kernel products ----------------------------------------------------------------


def bench_products(network, X, args, dtype):
    """Seconds of one forward + backward pass, of K u three ways, and of their setup."""
    module = copy.deepcopy(network).to(dtype)
    inputs = torch.as_tensor(X, dtype=dtype)

    def forward_backward():
        module.zero_grad(set_to_none=True)
        module(inputs).sum().backward()

    functional = FunctionalNetwork(network, dtype=dtype, device="cpu")
    products = dict(batch_size=args.batch_size)
    # Untimed: the first forward-mode product of a process loads torch's JVP
    # decompositions, a one-off cost that would otherwise land in the first build.
    JacobianProducts(functional, functional.theta, inputs[:2], cache_bytes=0, **products)
    cached_build, cached = timed(
        lambda: JacobianProducts(
            functional, functional.theta, inputs, cache_bytes=1 << 30, **products
        )
    )
    fresh = JacobianProducts(
        functional, functional.theta, inputs, cache_bytes=0, **products
    )
    layerwise_build, layerwise = timed(
        lambda: LayerwiseKernel(functional, inputs, batch_size=args.batch_size)
    )
    kernels = {
        "cached": FunctionOperator(cached, prior=1.0, shift=1e-2),
        "fresh": FunctionOperator(fresh, prior=1.0, shift=1e-2),
        "layerwise": FunctionOperator(fresh, prior=1.0, shift=1e-2, structured=layerwise),
    }
    u = torch.randn(len(X), 1, dtype=dtype, generator=torch.Generator().manual_seed(0))
    calls = {"forward+backward": forward_backward}
    calls.update({name: (lambda k=kernel: k.matmat(u)) for name, kernel in kernels.items()})
    row = interleaved_medians(calls, args.repeats)
    row.update(
        n=len(X),
        is_cached=cached.cached,
        cached_build=cached_build,
        layerwise_build=layerwise_build,
    )
    return row


PRODUCT_COLUMNS = {
    "cached": "cached K u",
    "fresh": "fresh K u",
    "layerwise": "layerwise K u",
    "cached_build": "cache build",
    "layerwise_build": "layerwise build",
}


def print_products_header():
    print(
        "\n(a) seconds of one kernel product K u (u: n x 1), and its ratio to one "
        "forward+backward pass"
    )
    columns = " ".join(f"{name:>17}" for name in PRODUCT_COLUMNS.values())
    print(f"{'n':>7} {'fwd+bwd':>9} {columns}", flush=True)


def print_products_row(row):
    base = row["forward+backward"]
    cells = " ".join(
        f"{row[key]:>8.3f} ({row[key] / base:>6.2f})" for key in PRODUCT_COLUMNS
    )
    note = "" if row["is_cached"] else "  (cache did not fit: recomputed)"
    print(f"{row['n']:>7} {base:>9.3f} {cells}{note}", flush=True)


# -- (b) fit + predict ------------------------------------------------------------------


def explicit_jacobian(module, X, batch_size):
    """The (n·k, p) Jacobian of ``module`` at its weights, by jacrev over samples."""
    params = {name: tensor.detach() for name, tensor in module.named_parameters()}

    def single(params, x):
        return functional_call(module, params, (x[None],))[0]

    per_sample = vmap(jacrev(single), in_dims=(None, 0))
    blocks = []
    for start in range(0, len(X), batch_size):
        jac = per_sample(params, X[start : start + batch_size])
        blocks.append(torch.cat([j.flatten(2) for j in jac.values()], dim=2).flatten(0, 1))
    return torch.cat(blocks)


def reference_fit_predict(network, X, y, X_test, args, dtype):
    """Exact posterior mean and latent std from the explicit Jacobian, timed."""
    module = copy.deepcopy(network).to(dtype).eval()
    for tensor in module.parameters():
        tensor.requires_grad_(False)
    X, X_test = torch.as_tensor(X, dtype=dtype), torch.as_tensor(X_test, dtype=dtype)
    s, noise, chunk = args.prior, args.noise, args.batch_size

    def fit():
        J = explicit_jacobian(module, X, chunk)
        K = s * (J @ J.T)
        K.diagonal().add_(noise)
        factor = torch.linalg.cholesky(K)
        residuals = torch.as_tensor(y, dtype=dtype) - module(X).reshape(-1)
        return J, factor, torch.cholesky_solve(residuals[:, None], factor)

    def predict(J, factor, alpha):
        J_test = explicit_jacobian(module, X_test, chunk)
        cross = s * (J @ J_test.T)  # (n, m)
        mean = module(X_test).reshape(-1) + (cross.T @ alpha)[:, 0]
        explained = (cross * torch.cholesky_solve(cross, factor)).sum(0)
        variance = s * (J_test**2).sum(1) - explained
        return mean.numpy(), variance.clamp_min(0).sqrt().numpy()

    fit_time, fitted = timed(fit)
    predict_time, (mean, std) = timed(lambda: predict(*fitted))
    return {
        "fit": fit_time,
        "predict": predict_time,
        "std points": len(X_test),
        "mean": mean,
        "std": std,
    }


def ours_fit_predict(network, X, y, X_test, n_std, args, **params):
    """Times of fit and of predicting at all test points, with a std at n_std of them.

    For n_std = 0 the prediction is the mean only.
    """
    regressor = FiniteNTKRegressor(
        network,
        noise=args.noise,
        prior=args.prior,
        batch_size=args.batch_size,
        dtype=args.dtype,
        random_state=0,
        **params,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_time, _ = timed(lambda: regressor.fit(X, y))
        if n_std == len(X_test):
            predict_time, (_, std) = timed(
                lambda: regressor.predict(X_test, return_std=True)
            )
        elif n_std:
            mean_time, _ = timed(lambda: regressor.predict(X_test[n_std:]))
            std_time, (_, std) = timed(
                lambda: regressor.predict(X_test[:n_std], return_std=True)
            )
            # the std's cost is linear in the test points: scale it to all of them
            predict_time = mean_time + std_time * len(X_test) / n_std
        else:
            predict_time, _ = timed(lambda: regressor.predict(X_test))
            std = None
    stopped_early = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    setting = [f"{regressor.kernel_} kernel", f"{regressor.variance_} variance"]
    if regressor.solver_ == "cg":
        setting.insert(1, f"preconditioner {regressor.preconditioner_}")
    setting += sorted(
        {
            f"{w.category.__name__}: {str(w.message)[:60]}..."
            for w in caught
            if issubclass(w.category, UserWarning)
            and not issubclass(w.category, ConvergenceWarning)
        }
    )
    return {
        "fit": fit_time,
        "predict": predict_time,
        "std points": n_std,
        "mean": regressor.predict(X_test),
        "std": std,
        "n_iter": regressor.n_iter_ if regressor.solver_ == "cg" else None,
        "stopped early": stopped_early,
        "rank": regressor.rank_,
        "setting": ", ".join(setting),
    }


def fit_predict_rows(network, X, y, X_test, args, dtype, with_reference):
    """Yield (label, result): the reference and the dense solver if asked, then CG."""
    n_test = len(X_test)
    if with_reference:
        yield (
            "explicit-J reference",
            reference_fit_predict(network, X, y, X_test, args, dtype),
        )
        yield "dense", ours_fit_predict(network, X, y, X_test, n_test, args, solver="dense")
    for name in args.cg:
        label, params, std_points = CG_CONFIGURATIONS[name]
        n_std = {"all": n_test, "subset": args.exact_std_points, "none": 0}[std_points]
        yield (
            label,
            ours_fit_predict(
                network, X, y, X_test, n_std, args, solver="cg", tol=1e-6, **params
            ),
        )


def max_relative_difference(ours, reference):
    """max |ours - reference| / max |reference|."""
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def seconds_cell(seconds, reference_seconds=None, estimated=False):
    """'~  12.34 (0.56)': seconds, '~' if estimated, and the ratio to the reference."""
    ratio = f"({seconds / reference_seconds:>5.2f})" if reference_seconds else ""
    return f"{'~' if estimated else ' '}{seconds:>7.2f} {ratio:<7}"


def bench_fit_predict(network, X, y, X_test, args, dtype):
    """Run (b) at one training set size, printing each row as soon as it is measured."""
    n, n_test = len(X), len(X_test)
    jacobian_gib = n * sum(p.numel() for p in network.parameters()) * 8 / 2**30
    with_reference = jacobian_gib <= args.reference_max_gib
    print(
        f"\n(b) fit + predict at {n_test} test points, n={n}, noise={args.noise:g}, "
        f"prior={args.prior:g}, {args.dtype}; seconds (ours / reference)"
    )
    if not with_reference:
        print(
            f"reference and dense solver skipped: the Jacobian would take "
            f"{jacobian_gib:.1f} GiB > --reference-max-gib"
        )
    print(
        f"{'method':<23} {'fit':<16} {'predict':>7} {'std pts':>7}  {'fit + predict':<16} "
        f"{'CG iters':>8} {'rank':>5} {'mean diff':>9} {'std diff':>9}  resolved as",
        flush=True,
    )
    reference = None
    for label, result in fit_predict_rows(
        network, X, y, X_test, args, dtype, with_reference
    ):
        n_std = result["std points"]
        fit = seconds_cell(result["fit"], reference and reference["fit"])
        total = "-"
        if n_std:
            total = seconds_cell(
                result["fit"] + result["predict"],
                reference and reference["fit"] + reference["predict"],
                estimated=n_std < n_test,
            )
        mean_diff = std_diff = "-"
        if reference is not None:
            mean_diff = f"{max_relative_difference(result['mean'], reference['mean']):.1e}"
            if n_std:
                diff = max_relative_difference(result["std"], reference["std"][:n_std])
                std_diff = f"{diff:.1e}"
        iters = str(result.get("n_iter") or "-") + (
            "!" if result.get("stopped early") else ""
        )
        print(
            f"{label:<23} {fit:<16} {result['predict']:>7.2f} {n_std:>7}  {total:<16} "
            f"{iters:>8} {result.get('rank', '-')!s:>5} {mean_diff:>9} {std_diff:>9}  "
            f"{result.get('setting', '')}",
            flush=True,
        )
        if label == "explicit-J reference":
            reference = result


def main():
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = _DTYPES[args.dtype]
    sizes = sorted(args.sizes)
    rng = np.random.default_rng(args.seed)
    X_all, y_all = make_data(TRAIN_POINTS + args.n_test + sizes[-1], args.n_features, rng)
    X_fit, y_fit = X_all[:TRAIN_POINTS], y_all[:TRAIN_POINTS]
    X_test = X_all[TRAIN_POINTS : TRAIN_POINTS + args.n_test]
    X_train = X_all[TRAIN_POINTS + args.n_test :]
    y_train = y_all[TRAIN_POINTS + args.n_test :]

    network = make_network(args.n_features, args.width, args.seed)
    n_params = sum(p.numel() for p in network.parameters())
    train_time, _ = timed(
        lambda: train_briefly(network, X_fit, y_fit, args.train_steps, args.seed)
    )
    trained = (
        f"trained by {args.train_steps} Adam steps ({train_time:.1f} s)"
        if args.train_steps
        else "at its random initialisation"
    )
    print(
        f"MLP {args.n_features}-{args.width}-{args.width}-1 (tanh), p={n_params}, "
        f"{trained}; {args.dtype}, {torch.get_num_threads()} torch threads, "
        f"batch_size={args.batch_size}"
    )

    if "a" in args.part:
        print_products_header()
        for n in sizes:
            print_products_row(bench_products(network, X_train[:n], args, dtype))
    if "b" in args.part:
        for n in sizes[:1] if args.quick else sizes:
            bench_fit_predict(network, X_train[:n], y_train[:n], X_test, args, dtype)
        print(
            "\n~: exact CG std measured on 'std pts' test points, its time scaled to "
            "all; !: CG stopped at max_iter (ConvergenceWarning)"
        )


if __name__ == "__main__":
    main()
