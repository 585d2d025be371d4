"""Do the logged stages of a verbose fit account for its wall time?

A ``verbose=1`` fit of FiniteNTKRegressor with ``solver="cg"`` on n generated points
(20,000 by default) with a small trained tanh MLP logs each stage of the fit with its
wall time (``sklearn_fntk._progress``). This script collects the log records, prints
each top-level stage, the sum of their times, the wall time of ``fit`` measured
around the call, and their ratio (it should be within 10% of 1: time spent outside
any stage is time ``verbose`` does not explain), then does the same for a
``predict(return_std=True)`` on 2,000 test points.

    python benchmarks/verbose_stages.py                              # noise, prior "auto"
    python benchmarks/verbose_stages.py --noise 0.01 --prior 1.0     # fixed: no evidence

Measured 2026-11-28 (2 cores, load ~0.5): n = 20,000, p = 1281, "auto": fit 3.74 s,
ratio 0.975 (the evidence is exact here: JᵀJ decomposed, p <= Policy.eigen_size);
fixed noise and prior: fit 4.30 s, ratio 0.990; predict 0.09 s, ratio 0.98.
"""

import argparse
import logging
import time

import numpy as np
import torch

from sklearn_fntk import FiniteNTKRegressor


class Collect(logging.Handler):
    """Keeps the stage records (those with a ``stage`` attribute)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        if hasattr(record, "stage"):
            self.records.append(record)


def trained_mlp(X, y, seed, steps=300):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(X.shape[1], 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 1),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    inputs, targets = torch.as_tensor(X[:2000]), torch.as_tensor(y[:2000])
    net = net.double()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(net(inputs)[:, 0], targets)
        loss.backward()
        optimizer.step()
    return net


def report(title, handler, wall):
    stages = [r for r in handler.records if r.depth == 0]
    print(f"\n{title}")
    for record in stages:
        print(f"  {record.seconds:8.3f} s  {record.stage}")
    total = sum(r.seconds for r in stages)
    print(f"  sum of logged stages {total:.3f} s, wall time {wall:.3f} s, "
          f"ratio {total / wall:.3f}")  # fmt: skip
    handler.records.clear()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", default="auto", help='"auto" or a number')
    parser.add_argument("--prior", default="auto", help='"auto" or a number')
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    X = rng.standard_normal((args.n + args.n_test, 5))
    y = np.sin(2 * X[:, 0]) + 0.5 * X[:, 1] * X[:, 2] + 0.1 * rng.standard_normal(len(X))
    X_train, y_train, X_test = X[: args.n], y[: args.n], X[args.n :]
    net = trained_mlp(X_train, y_train, args.seed)

    handler = Collect()
    logger = logging.getLogger("sklearn_fntk")
    logger.addHandler(handler)
    values = {
        name: value if value == "auto" else float(value)
        for name, value in (("noise", args.noise), ("prior", args.prior))
    }
    regressor = FiniteNTKRegressor(net, solver="cg", random_state=0, verbose=1, **values)
    start = time.perf_counter()
    regressor.fit(X_train, y_train)
    wall = time.perf_counter() - start
    print(f"n = {args.n}, p = {regressor.n_params_}, noise {values['noise']}, "
          f"prior {values['prior']}, space {regressor.space_}, "
          f"solver {regressor.solver_}, preconditioner {regressor.preconditioner_}, "
          f"variance {regressor.variance_}, {regressor.n_iter_} CG iterations")  # fmt: skip
    report("fit", handler, wall)
    start = time.perf_counter()
    regressor.predict(X_test, return_std=True)
    wall = time.perf_counter() - start
    report(f"predict(return_std=True) on {args.n_test} points", handler, wall)


if __name__ == "__main__":
    main()
