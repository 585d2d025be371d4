"""One process of the data-parallel fits of test_distributed.py (and of
benchmarks/distributed.py's cases): run as a script with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set, it joins a gloo process group on the loopback
interface, fits every case on its shard and saves what it predicts.

    python tests/distributed_worker.py OUTPUT_DIR CASES...

The test imports the cases and the data from here, to fit the union of the shards
in one process.
"""

import io
import os
import pickle
import sys
from datetime import timedelta

import numpy as np
import torch
from torch import nn

from sklearn_fntk import FiniteNTKClassifier, FiniteNTKRegressor

# Seconds a process waits in a collective for the others (a dead peer is reported
# at once by its closed sockets; a live one that stopped only after this).
GROUP_TIMEOUT = 60

# name: (estimator, its parameters, the sizes of the shards)
CASES = {
    "regressor_auto_dense": (
        "regressor",
        dict(noise="auto", prior="auto", solver="dense"),
        (39, 1),
    ),
    "regressor_cg_nystrom": (
        "regressor",
        dict(noise=0.05, prior=2.0, solver="cg", preconditioner="nystrom", tol=1e-13),
        (25, 15),
    ),
    "regressor_cg_jacobi_weighted": (
        "regressor",
        dict(noise=0.05, prior=0.5, solver="cg", preconditioner="jacobi", tol=1e-13),
        (12, 28),
    ),
    "classifier_auto_dense": (
        "classifier",
        dict(prior="auto", solver="dense", link="probit"),
        (44, 1),
    ),
    "classifier_loo_dense_weighted": (
        "classifier",
        dict(prior="loo", solver="dense"),
        (30, 15),
    ),
    "classifier_cg": (
        "classifier",
        dict(prior=3.0, solver="cg", tol=1e-12, link="map"),
        (20, 25),
    ),
}
TEST_POINTS = 7


def network(kind, seed=0):
    torch.manual_seed(seed)
    n_out = 1 if kind == "regressor" else 4
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, n_out)).double()


def data(name):
    """(X, y, sample_weight or None, X_test) of a case, the same in every process."""
    kind, _, sizes = CASES[name]
    rng = np.random.default_rng(len(name))
    n = sum(sizes)
    X = rng.normal(size=(n, 3))
    X_test = rng.normal(size=(TEST_POINTS, 3))
    if kind == "regressor":
        y = np.sin(X[:, 0]) + 0.5 * X[:, 1] + 0.1 * rng.normal(size=n)
    else:  # labels 0..2, and the last row (rank 1's) the only one of class 3
        y = np.digitize(X[:, 0] + 0.3 * X[:, 2], [-0.5, 0.5])
        y[-1] = 3
    weights = rng.uniform(0.5, 2.0, size=n) if "weighted" in name else None
    return X, y, weights, X_test


def estimator(name, **extra):
    kind, params, _ = CASES[name]
    cls = FiniteNTKRegressor if kind == "regressor" else FiniteNTKClassifier
    return cls(network(kind), dtype="float64", random_state=0, **params, **extra)


def shard(name, rank):
    """This rank's rows of the case's data."""
    sizes = CASES[name][2]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def predictions(model, X_test):
    """What a fit's state gives, as a dict of arrays."""
    out = {"delta": model.delta_.detach().numpy(), "prior": np.array(model.prior_)}
    out["log_evidence"] = np.array(model.log_marginal_likelihood())
    if isinstance(model, FiniteNTKRegressor):
        mean, std = model.predict(X_test, return_std=True)
        out.update(mean=mean, std=std, noise=np.array(model.noise_))
    else:
        out.update(proba=model.predict_proba(X_test), classes=model.classes_)
    return out


class FailingAfter(nn.Module):
    """``module``, raising at its ``calls``-th forward pass (mid-fit)."""

    def __init__(self, module, calls):
        super().__init__()
        self.module, self.calls = module, calls

    def forward(self, x):
        global _FORWARD_CALLS
        _FORWARD_CALLS += 1
        if _FORWARD_CALLS == self.calls:
            raise RuntimeError("injected failure on rank 1")
        return self.module(x)


_FORWARD_CALLS = 0


def run_failure(rank, output, exit_process):
    """Rank 1 fails mid-fit (an exception, or the process ending); rank 0 reports
    what it raised."""
    name = "regressor_cg_nystrom"
    X, y, _, _ = data(name)
    model = estimator(name, distributed=True)
    if rank == 1:  # the 8th forward pass: the preconditioner's explicit Jacobian,
        # after the fit's first all-reduces; an exception, or the process ending
        # abruptly with its sockets closed
        failing = _ExitAfter if exit_process else FailingAfter
        model.set_params(network=failing(model.network, calls=8))
    try:
        model.fit(X[shard(name, rank)], y[shard(name, rank)])
        message = "no error"
    except Exception as error:  # noqa: BLE001 - reported to the test
        message = f"{type(error).__name__}: {error}"
    with open(os.path.join(output, f"failure_{int(exit_process)}_{rank}.txt"), "w") as f:
        f.write(message)


class _ExitAfter(FailingAfter):
    def forward(self, x):
        global _FORWARD_CALLS
        _FORWARD_CALLS += 1
        if _FORWARD_CALLS >= self.calls:
            os._exit(3)
        return self.module(x)


def main(output, cases):
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=GROUP_TIMEOUT))
    for name in cases:
        if name.startswith("failure"):
            global _FORWARD_CALLS
            _FORWARD_CALLS = 0
            run_failure(rank, output, exit_process=name == "failure_exit")
            continue
        X, y, weights, X_test = data(name)
        rows = shard(name, rank)
        model = estimator(name, distributed=True)
        fit_weights = None if weights is None else weights[rows]
        model.fit(X[rows], y[rows], sample_weight=fit_weights)
        result = predictions(model, X_test)
        buffer = io.BytesIO()
        pickle.dump(model, buffer)
        result["pickle"] = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
        np.savez(os.path.join(output, f"{name}_{rank}.npz"), **result)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
