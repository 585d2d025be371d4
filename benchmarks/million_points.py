"""A fit and predict(return_std=True) at scale: stage times, products and peak memory.

    python benchmarks/million_points.py --n 1000000                  # defaults ("auto")
    python benchmarks/million_points.py --n 1000000 --fixed           # noise, prior fixed
    python benchmarks/million_points.py --n 100000 --widths 8 256 256 128 1
    python benchmarks/million_points.py --n 100000 --autograd         # A/B: no layerwise
    python benchmarks/million_points.py --n 100000 --products         # A/B per product
    python benchmarks/million_points.py --n 1000000 --device cuda     # on a GPU

The network is an MLP (tanh; default 8-128-128-32-1, p = 21,825) trained briefly on
2000 other samples of the same generated target (``bench_scale.trained_mlp``); inputs
are standard normal, the target sin(x·a) + 0.5 cos(2 x·b) (``bench_scale.make_data``).
Every stage's wall time is printed (inclusive: a stage may contain another), with the
Jacobian product columns it ran (one column of J V or Jᵀ U over all n samples counts
n) and the peak RSS of the process (``ru_maxrss``). ``--autograd`` turns off the
parameter-space products from per-layer features (the A/B of that change);
``--profile`` adds a cProfile summary. ``--products`` times only Fisher products
JᵀJ V (1 and 16 columns) both ways, alternating in one process, and prints ratios.
"""

import argparse
import cProfile
import io
import pstats
import resource
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import make_data, trained_mlp  # noqa: E402

from sklearn_fntk import FiniteNTKRegressor, _base, _marginal_likelihood  # noqa: E402
from sklearn_fntk import _regressor as regressor_module  # noqa: E402
from sklearn_fntk._inference import gaussian, low_rank, system  # noqa: E402
from sklearn_fntk._linearize.jacobian import JacobianProducts  # noqa: E402
from sklearn_fntk._linearize.layerwise import LayerwiseKernel  # noqa: E402
from sklearn_fntk._linearize.network import FunctionalNetwork  # noqa: E402

# (owner, attribute, stage label): wrapped while a fit and its predictions run.
STAGES = (
    (_base.FiniteNTKBase, "_training_jacobian", "outputs and features (setup)"),
    (_marginal_likelihood, "spectral_evidence", "evidence: Lanczos quadrature"),
    (_marginal_likelihood, "fit_hyperparameters", "evidence: (noise, prior) search"),
    (gaussian, "low_rank_from_sketch", "low-rank variance (with its sketch)"),
    (low_rank, "nystrom_sketch", "  Nystrom sketch"),
    (system, "nystrom_sketch", "Nystrom preconditioner"),
    (system.LinearSystem, "solve", "CG solve"),
    (system.LinearSystem, "condition_number", "condition number"),
    (_base.FiniteNTKBase, "_latent_mean", "predict: mean"),
    (regressor_module.FiniteNTKRegressor, "_latent_variance", "predict: std"),
)


class Stages:
    """Wall time per stage and Jacobian product columns (samples x columns / n)."""

    def __init__(self, n):
        self.n, self.seconds, self.columns = n, defaultdict(float), defaultdict(float)
        self._current, self._originals = [], []

    def __enter__(self):
        for owner, name, label in STAGES:
            self._wrap(owner, name, label)
        for name in ("jvp", "vjp"):
            self._count(name)
        return self

    def _wrap(self, owner, name, label):
        original = getattr(owner, name)
        self._originals.append((owner, name, original))

        def timed(*args, **kwargs):
            self._current.append(label)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self._current.pop()

        setattr(owner, name, timed)

    def _count(self, name):
        original = getattr(JacobianProducts, name)
        self._originals.append((JacobianProducts, name, original))
        stages = self

        def counted(products, array):
            columns = 1 if array.ndim == (1 if name == "jvp" else 2) else array.shape[-1]
            label = stages._current[-1] if stages._current else "other"
            stages.columns[label] += columns * products.n_samples / stages.n
            return original(products, array)

        setattr(JacobianProducts, name, counted)

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._originals):
            setattr(owner, name, original)

    def report(self, total):
        print(f"{'stage':>40} {'seconds':>9} {'share':>6} {'product columns':>16}")
        for _, _, label in STAGES:
            if label in self.seconds:
                seconds = self.seconds[label]
                print(
                    f"{label:>40} {seconds:9.1f} {seconds / total:6.2f} "
                    f"{self.columns.get(label, 0.0):16.1f}"
                )


def products(module, X, args):
    """Seconds per Fisher product JᵀJ V, by autograd and from per-layer features:
    the best of ``rounds`` alternating rounds."""
    network = FunctionalNetwork(module, dtype=getattr(torch, args.dtype), device="cpu")
    X = torch.as_tensor(X)
    options = dict(batch_size=args.batch_size)
    start = time.perf_counter()
    structured = LayerwiseKernel(network, X, **options)
    print(f"per-layer features: {time.perf_counter() - start:.1f} s, "
          f"{structured.feature_bytes / 2**30:.2f} GiB")  # fmt: skip
    both = {
        "autograd": JacobianProducts(network, network.theta, X, **options),
        "layers": JacobianProducts(
            network, network.theta, X, structured=structured, **options
        ),
    }
    generator = torch.Generator().manual_seed(0)
    for m in (1, 16):
        V = torch.randn(network.n_params, m, generator=generator).to(network.theta)
        best = {name: float("inf") for name in both}
        for _ in range(2):
            for name, jacobian in both.items():
                start = time.perf_counter()
                jacobian.fisher_product(V)
                best[name] = min(best[name], time.perf_counter() - start)
        print(
            f"{m:2d} column(s): autograd {best['autograd']:.2f} s, layers "
            f"{best['layers']:.2f} s, ratio {best['autograd'] / best['layers']:.1f}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 128, 128, 32, 1])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--fixed", action="store_true", help="fix noise and prior")
    parser.add_argument("--noise-std", type=float, default=0.1, help="of the data")
    parser.add_argument("--noise", type=float, default=0.02)
    parser.add_argument("--prior", type=float, default=0.01)
    parser.add_argument("--autograd", action="store_true", help="no layerwise products")
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--products", action="store_true", help="time products only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    module = trained_mlp(tuple(args.widths), seed=args.seed)
    d = args.widths[0]
    X, f = make_data(args.n + args.n_test, d, seed=args.seed + 7)
    X = X.astype(args.dtype)
    X, X_test, f_test = X[: args.n], X[args.n :], f[args.n :]
    noise = np.random.default_rng(args.seed + 8).normal(size=args.n)
    y = (f[: args.n] + args.noise_std * noise).astype(args.dtype)
    if args.products:
        return products(module, X, args)
    hyper = dict(noise=args.noise, prior=args.prior) if args.fixed else {}
    reg = FiniteNTKRegressor(
        module,
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        random_state=0,
        **hyper,
    )
    if args.autograd:  # the A/B: products by autograd as before
        original = reg._training_jacobian
        reg._training_jacobian = lambda *a, layerwise=False, **k: original(*a, **k)
    fixed = f"fixed noise={args.noise:g} prior={args.prior:g}"
    print(
        f"n={args.n}, MLP {'-'.join(map(str, args.widths))}, {args.dtype}, "
        f"{fixed if args.fixed else 'noise and prior auto'}"
        f", {args.device}, {torch.get_num_threads()} threads, products "
        f"{'by autograd' if args.autograd else 'from per-layer features'}",
        flush=True,
    )
    profiler = cProfile.Profile() if args.profile else None
    with warnings.catch_warnings(record=True) as caught, Stages(args.n) as stages:
        warnings.simplefilter("always")
        if profiler:
            profiler.enable()
        start = time.perf_counter()
        reg.fit(X, y)
        fitted = time.perf_counter()
        mean, std = reg.predict(X_test, return_std=True)
        done = time.perf_counter()
        if profiler:
            profiler.disable()
    total = done - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if args.device.startswith("cuda"):
        device_peak = torch.cuda.max_memory_allocated(args.device) / 2**30
        print(f"peak memory allocated on {args.device}: {device_peak:.2f} GiB")
    print(
        f"p={reg.n_params_}: space={reg.space_}, solver={reg.solver_}, "
        f"preconditioner={reg.preconditioner_}, variance={reg.variance_}, "
        f"kernel={reg.kernel_}; {reg.n_iter_} CG iterations, rank {reg.rank_}, "
        f"tail weight {reg.variance_tail_weight_}"
    )
    print(
        f"noise_={reg.noise_:.5g}, prior_={reg.prior_:.5g}, "
        f"log evidence {reg.log_marginal_likelihood_value_}"
    )
    stages.report(total)
    print(
        f"fit {fitted - start:.1f} s + predict(return_std) on {args.n_test} points "
        f"{done - fitted:.1f} s = {total / 60:.2f} min; peak RSS {peak:.2f} GiB"
    )
    print(
        f"test RMSE against the noise-free target "
        f"{float(np.sqrt(np.mean((mean - f_test) ** 2))):.4g}, "
        f"std median {float(np.median(std)):.4g} (min {float(std.min()):.4g}, "
        f"max {float(std.max()):.4g})"
    )
    for warning in caught:
        if issubclass(warning.category, DeprecationWarning):
            continue
        print(f"warning: {str(warning.message)[:200]}")
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(30)
        print(out.getvalue())


if __name__ == "__main__":
    main()
