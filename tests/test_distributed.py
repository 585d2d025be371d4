"""Data-parallel fits (distributed=True) over 2 processes, gloo on the loopback
interface, against the fit of the union of the shards in one process (float64)."""

import io
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_worker import CASES, data, estimator, predictions

from sklearn_fntk import FiniteNTKClassifier, FiniteNTKRegressor

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = WORKER.parent.parent
# Wall-clock bound of a 2-process run: a hang fails the test instead of the suite.
RUN_TIMEOUT = 240


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(output, cases, world_size=2):
    """Run the worker on ``world_size`` processes; their return codes."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    env.update(WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, str(WORKER), str(output), *cases]
    processes = [
        subprocess.Popen(command, env=dict(env, RANK=str(rank)), cwd=ROOT)
        for rank in range(world_size)
    ]
    try:
        return [p.wait(timeout=RUN_TIMEOUT) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The workers' results for every case, by (case, rank)."""
    output = tmp_path_factory.mktemp("distributed")
    codes = run_workers(output, list(CASES))
    assert codes == [0, 0]
    return {
        (name, rank): dict(np.load(output / f"{name}_{rank}.npz"))
        for name in CASES
        for rank in range(2)
    }


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_fit_equals_fit_of_the_union(sharded, name):
    X, y, weights, X_test = data(name)
    reference = predictions(estimator(name).fit(X, y, sample_weight=weights), X_test)
    first, second = sharded[name, 0], sharded[name, 1]
    for key, expected in reference.items():
        # every process ends with the same state, bit for bit
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
        if key == "classes":
            np.testing.assert_array_equal(first[key], expected)
        else:
            np.testing.assert_allclose(first[key], expected, rtol=1e-10, atol=1e-10,
                                       err_msg=key)  # fmt: skip


@pytest.mark.parametrize("name", ["regressor_auto_dense", "classifier_auto_dense"])
def test_pickled_sharded_fit_predicts_in_a_plain_process(sharded, name):
    assert not torch.distributed.is_initialized()
    result = sharded[name, 1]
    model = pickle.load(io.BytesIO(result["pickle"].tobytes()))
    X_test = data(name)[3]
    if isinstance(model, FiniteNTKRegressor):
        mean, std = model.predict(X_test, return_std=True)
        np.testing.assert_array_equal(mean, result["mean"])
        np.testing.assert_array_equal(std, result["std"])
        # what needs the other shards says so
        with pytest.raises(RuntimeError, match="fitted data-parallel over 2 processes"):
            model.log_marginal_likelihood(method="stochastic")
    else:
        np.testing.assert_array_equal(model.predict_proba(X_test), result["proba"])
        assert model.log_marginal_likelihood() == result["log_evidence"]
        # another prior needs a fit on every shard
        with pytest.raises(RuntimeError, match="fitted data-parallel over 2 processes"):
            model.log_marginal_likelihood(2 * model.prior_)


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    """Rank 1 raises mid-fit, then (in the next fit) ends abruptly: the output
    directory and the return codes."""
    output = tmp_path_factory.mktemp("failures")
    return output, run_workers(output, ["failure_exception", "failure_exit"])


def test_failure_of_one_process_ends_the_other(failures):
    output, codes = failures
    assert codes == [0, 3]  # rank 0 went on; rank 1 exited with its own code
    # an exception on rank 1: rank 0 stops at its next all-reduce, and says why
    raised = (output / "failure_0_0.txt").read_text()
    assert raised.startswith("ShardFailure: The data-parallel fit stopped"), raised
    assert "1 other process(es) raised an error" in raised
    failed = (output / "failure_0_1.txt").read_text()
    assert failed == "RuntimeError: injected failure on rank 1"
    # rank 1's process ended mid-fit: the backend tells rank 0 at once
    ended = (output / "failure_1_0.txt").read_text()
    assert ended.startswith("ShardFailure: The data-parallel fit's all-reduce"), ended


def test_distributed_needs_a_process_group():
    X, y, _, _ = data("regressor_auto_dense")
    with pytest.raises(RuntimeError, match="initialised torch.distributed default"):
        estimator("regressor_auto_dense", distributed=True).fit(X, y)


@pytest.mark.parametrize("cls", [FiniteNTKRegressor, FiniteNTKClassifier])
def test_distributed_refuses_function_space(cls):
    from sklearn_fntk._inference.policy import Policy, resolve_choices

    with pytest.raises(ValueError, match="solves in parameter space"):
        resolve_choices(space="function", solver="auto", preconditioner="auto",
                        variance="auto", n_rows=10, n_params=100, layerwise=False,
                        policy=Policy(), distributed=True)  # fmt: skip
