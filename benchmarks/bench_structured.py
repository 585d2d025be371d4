"""Kernel products J Jᵀ U: layerwise (structured) against generic VJP + JVP.

Both are timed side by side in one process, on the same MLP and points, and reported
as multiples of one forward + backward pass (the cost of a training-gradient step over
the same points), so the ratios travel across machines better than seconds do.

    python benchmarks/bench_structured.py [--n 3000] [--columns 1 8] [--dtype float64]
"""

import argparse
import time

import torch
from torch import nn

from sklearn_fntk._inference.operators import FunctionOperator
from sklearn_fntk._linearize.jacobian import JacobianProducts
from sklearn_fntk._linearize.layerwise import LayerwiseKernel
from sklearn_fntk._linearize.network import FunctionalNetwork


def best_seconds(calls, repeats):
    """Fastest of ``repeats`` timings of each call, the calls taken in turn.

    Interleaving and the minimum keep the ratios meaningful when other processes share
    the machine: each call sees the same load, and the minimum its least disturbed run.
    """
    times = {name: [] for name in calls}
    for _ in range(repeats + 1):  # the first round warms up
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: min(seconds[1:]) for name, seconds in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--columns", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Linear(20, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1)
    ).to(dtype)
    X = torch.randn(args.n, 20, dtype=dtype)
    network = FunctionalNetwork(module, dtype=dtype, device="cpu")
    print(
        f"MLP 20-256-256-1 (p={network.n_params}), n={args.n}, {args.dtype}, "
        f"batch_size={args.batch_size}, torch threads={torch.get_num_threads()}"
    )

    def forward_backward():
        module.zero_grad()
        module(X).sum().backward()

    start = time.perf_counter()
    kernel = LayerwiseKernel(network, X, batch_size=args.batch_size)
    structured_setup = time.perf_counter() - start
    start = time.perf_counter()
    jacobian = JacobianProducts(
        network, network.theta, X, batch_size=args.batch_size, cache_bytes=1 << 30
    )
    generic_setup = time.perf_counter() - start
    generic = FunctionOperator(jacobian, prior=1.0, shift=0.0)
    baseline = best_seconds({"forward_backward": forward_backward}, args.repeats)
    baseline = baseline["forward_backward"]
    print(f"forward + backward over the n points: {1e3 * baseline:.1f} ms (= 1x)")
    print(
        f"setup (one-off): structured {structured_setup / baseline:.1f}x, "
        f"generic {generic_setup / baseline:.1f}x (linearization cached: "
        f"{jacobian.cached})"
    )

    for m in args.columns:
        U = torch.randn(kernel.size, m, dtype=dtype)
        times = best_seconds(
            {
                "forward_backward": forward_backward,
                "structured": lambda U=U: kernel.matmat(U),
                "generic": lambda U=U: generic.matmat(U),
            },
            args.repeats,
        )
        structured = times["structured"] / times["forward_backward"]
        vjp_jvp = times["generic"] / times["forward_backward"]
        difference = torch.linalg.matrix_norm(kernel.matmat(U) - generic.matmat(U))
        relative = float(difference / torch.linalg.matrix_norm(generic.matmat(U)))
        print(
            f"J Jᵀ U, {m} column(s): structured {structured:.2f}x, generic VJP+JVP "
            f"{vjp_jvp:.2f}x, speed-up {vjp_jvp / structured:.1f}x "
            f"(relative difference {relative:.1e})"
        )


if __name__ == "__main__":
    main()
