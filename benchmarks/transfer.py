"""Few-shot sinusoid transfer (Maddox et al. 2021) over several seeds and context sizes.

The set-up, the methods and the scores are those of ``examples/sinusoid_transfer.py``
(imported from there): a 1-40-40-1 tanh network trained on sin(x), new tasks
A sin(x + φ) with A ~ U[0.1, 5], φ ~ U[0, π] observed at n random points with noise
std 0.1, scored on a 200-point grid of [-5, 5]. Per seed: one source network, the
fine-tuning learning rate and step count chosen on ``--validation-tasks`` tasks of
their own for each n, then ``--tasks`` test tasks for each n. Printed per n: mean ±
standard error (of the per-seed means) of RMSE, NLL and 95% coverage per method.

One diagnostic row is added to the example's methods: **finite NTK, known σ²** fixes
the noise variance at its true value 0.01 and picks the prior by the evidence over a
grid. It uses knowledge the other methods do not have; it is there to show how much of
the evidence-fitted model's miscalibration comes from fitting the noise on a handful
of points.

Run from the repository root::

    python benchmarks/transfer.py --quick           # 2 seeds x 20 tasks, n = 10 only
    python benchmarks/transfer.py                   # 5 seeds x 50 tasks, n = 5, 10, 20
    python benchmarks/transfer.py --seeds 3 --tasks 100 --points 10
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from sinusoid_transfer import (  # noqa: E402
    NOISE_STD,
    TEST_X,
    choose_fine_tuning,
    evaluate,
    format_table,
    make_adapters,
    sample_task,
    train_source_network,
)

from sklearn_fntk import FiniteNTKRegressor  # noqa: E402

PRIOR_GRID = np.logspace(-3, 1, 17)


def adapt_finite_ntk_known_noise(network, task):
    """The true noise variance, and the prior maximising the evidence on a grid."""
    fits = [
        FiniteNTKRegressor(network, noise=NOISE_STD**2, prior=prior).fit(
            task.x_context, task.y_context
        )
        for prior in PRIOR_GRID
    ]
    best = max(fits, key=FiniteNTKRegressor.log_marginal_likelihood)
    return best.predict(TEST_X), best.predict_std(TEST_X, include_noise=True)


def run(seeds, n_tasks, context_sizes, n_validation_tasks):
    """{n: {method: {metric: array (n_seeds, n_tasks)}}} and the fine-tuning choices."""
    per_seed = {n: [] for n in context_sizes}
    schedules = {n: [] for n in context_sizes}
    for seed in seeds:
        start = time.perf_counter()
        network = train_source_network(seed)
        for n in context_sizes:
            validation_rng = np.random.default_rng([seed, n, 1])
            learning_rate, steps = choose_fine_tuning(
                network, validation_rng, n, n_validation_tasks
            )
            schedules[n].append((learning_rate, steps))
            test_rng = np.random.default_rng([seed, n, 2])
            tasks = [sample_task(test_rng, n) for _ in range(n_tasks)]
            adapters = make_adapters(network, learning_rate, steps)
            adapters["finite NTK, known σ²"] = lambda task, network=network: (
                adapt_finite_ntk_known_noise(network, task)
            )
            per_seed[n].append(evaluate(adapters, tasks))
        print(f"seed {seed} done in {time.perf_counter() - start:.0f} s", flush=True)
    results = {
        n: {
            method: {
                metric: np.stack([seed_results[method][metric] for seed_results in runs])
                for metric in runs[0][method]
            }
            for method in runs[0]
        }
        for n, runs in per_seed.items()
    }
    return results, schedules


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="defaults of 2 seeds x 20 tasks, n = 10 (instead of 5 x 50, n = 5 10 20)",
    )
    parser.add_argument("--seeds", type=int, help="seeds 0 .. SEEDS-1 (default 5)")
    parser.add_argument("--tasks", type=int, help="test tasks per seed and n (default 50)")
    parser.add_argument(
        "--points", type=int, nargs="+", help="context sizes n (default 5 10 20)"
    )
    parser.add_argument(
        "--validation-tasks",
        type=int,
        default=10,
        help="tasks per seed and n to choose the fine-tuning schedule on",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    n_seeds, n_tasks, context_sizes = (2, 20, [10]) if args.quick else (5, 50, [5, 10, 20])
    n_seeds = args.seeds or n_seeds
    n_tasks = args.tasks or n_tasks
    context_sizes = args.points or context_sizes
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)

    start = time.perf_counter()
    results, schedules = run(range(n_seeds), n_tasks, context_sizes, args.validation_tasks)
    for n, table in results.items():
        choices = ", ".join(f"lr {lr:g} x {steps}" for lr, steps in schedules[n])
        print(
            f"\n{n} context points: {n_seeds} seeds x {n_tasks} tasks "
            f"(mean ± s.e. of the seed means); fine-tuning per seed: {choices}"
        )
        print(format_table(table))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
