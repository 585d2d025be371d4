"""The memory guard (_linalg.memory): what it reads, and that every dense path asks it
first, counting what the path holds at its peak, and refuses before allocating."""

import math
import resource

import numpy as np
import pytest
import torch
from networks import mlp, regression_data

import sklearn_fntk._linalg.memory as memory
from sklearn_fntk import FiniteNTKClassifier, FiniteNTKRegressor
from sklearn_fntk._inference.operators import FunctionOperator, ParameterOperator
from sklearn_fntk._linearize.layerwise import LayerwiseKernel

GiB = 2**30


# -- what is available ------------------------------------------------------------------


def fake_files(monkeypatch, files):
    """Serve ``files`` ({path: text}) to the guard's reads; any other path is absent."""
    monkeypatch.setattr(memory, "_read", files.get)


MEMINFO = "MemTotal: 16000000 kB\nMemFree: 1000000 kB\nMemAvailable: 9000000 kB\n"


def test_available_memory_is_memavailable_not_memfree(monkeypatch):
    fake_files(monkeypatch, {"/proc/meminfo": MEMINFO})
    monkeypatch.setattr(resource, "getrlimit", lambda _: (-1, -1))
    assert memory.available_bytes("cpu") == 9000000 * 1024


def test_cgroup_v2_limit_of_the_process_and_its_ancestors(monkeypatch):
    root = memory._CGROUP_ROOT
    fake_files(
        monkeypatch,
        {
            "/proc/meminfo": MEMINFO,
            "/proc/self/cgroup": "0::/jobs/task\n",
            f"{root}/jobs/task/memory.max": "max\n",
            f"{root}/jobs/task/memory.current": "100\n",
            f"{root}/jobs/memory.max": str(3 * GiB),
            f"{root}/jobs/memory.current": str(2 * GiB),
            f"{root}/jobs/memory.stat": "anon 1\ninactive_file 268435456\n",
        },
    )
    monkeypatch.setattr(resource, "getrlimit", lambda _: (-1, -1))
    # the parent's 3 GiB limit, less its 2 GiB usage, plus its reclaimable cache
    assert memory.available_bytes("cpu") == GiB + 256 * 2**20
    assert min(memory.memory_limits("cpu").items(), key=lambda kv: kv[1])[0] == (
        "the cgroup limit"
    )


def test_cgroup_v1_limit(monkeypatch):
    base = f"{memory._CGROUP_ROOT}/memory"
    fake_files(
        monkeypatch,
        {
            "/proc/meminfo": MEMINFO,
            "/proc/self/cgroup": "4:memory:/\n3:cpu:/other\n",
            f"{base}/memory.limit_in_bytes": str(2 * GiB),
            f"{base}/memory.usage_in_bytes": str(GiB),
        },
    )
    monkeypatch.setattr(resource, "getrlimit", lambda _: (-1, -1))
    assert memory.available_bytes("cpu") == GiB


def test_address_space_limit_less_what_is_mapped(monkeypatch):
    status = "VmSize:\t1048576 kB\nVmData:\t524288 kB\n"
    fake_files(monkeypatch, {"/proc/meminfo": MEMINFO, "/proc/self/status": status})
    limits = {resource.RLIMIT_AS: (3 * GiB, 3 * GiB), resource.RLIMIT_DATA: (-1, -1)}
    monkeypatch.setattr(resource, "getrlimit", limits.__getitem__)
    assert memory.available_bytes("cpu") == 2 * GiB  # 3 GiB less the 1 GiB mapped
    limits[resource.RLIMIT_DATA] = (GiB, GiB)
    assert memory.available_bytes("cpu") == GiB // 2


def test_this_machine_reports_something_finite():
    assert 0 < memory.available_bytes("cpu") < math.inf


def test_check_fits_counts_every_part_and_names_the_limit(monkeypatch):
    monkeypatch.setattr(memory, "memory_limits", lambda device: {"a limit": 10**6})
    parts = [("a", (100, 100)), ("b", (2, 100, 100)), ("c", (100,), torch.float32)]
    assert memory.peak_bytes(parts, torch.float64) == 3 * 80_000 + 400
    assert memory.check_fits(parts, torch.float64, "cpu", "X", "Y") == 240_400
    with pytest.raises(MemoryError) as info:
        memory.check_fits([("a", (400, 400))], torch.float64, "cpu", "The thing", "do Z")
    message = str(info.value)
    assert message.startswith(
        "The thing needs 0.00 GiB at its peak (a 400 x 400 (float64))"
    )
    assert "available to this process on cpu (bounded by a limit); do Z." in message


# -- every dense path asks first ---------------------------------------------------------


@pytest.fixture
def no_memory(monkeypatch):
    """A machine with 1 kB to spare, where assembling a dense matrix is a bug."""
    monkeypatch.setattr(memory, "memory_limits", lambda device: {"a test limit": 1000})

    def assembled(*args, **kwargs):
        raise AssertionError("a dense matrix was assembled before the memory check")

    for owner in (FunctionOperator, ParameterOperator):
        monkeypatch.setattr(owner, "gram_dense", assembled)
    monkeypatch.setattr(LayerwiseKernel, "dense", assembled)


@pytest.fixture(scope="module")
def data():
    X, Y, X_test = regression_data(n=40, m=12, seed=41)
    return X, Y[:, 0], X_test


@pytest.mark.parametrize(
    "space, what",
    [
        ("function", "The dense function-space system needs"),
        ("parameter", "The dense parameter-space system needs"),
    ],
)
def test_regressor_dense_fit(data, no_memory, space, what):
    X, y, _ = data
    with pytest.raises(MemoryError) as info:
        FiniteNTKRegressor(mlp(), noise=0.1, prior=1.0, solver="dense", space=space).fit(
            X, y
        )
    message = str(info.value)
    assert message.startswith(what)
    system = "the system (then its Cholesky factor, in place)"
    assert f"{system} 40 x 40" in message or f"{system} 61 x 61" in message
    assert message.endswith("use solver='cg', or space='auto'.")


@pytest.mark.parametrize(
    "space, what", [("function", "Laplace system B"), ("parameter", "Laplace precision H")]
)
def test_classifier_dense_fit(data, no_memory, space, what):
    X, y, _ = data
    with pytest.raises(MemoryError) as info:
        FiniteNTKClassifier(mlp(), solver="dense", space=space).fit(X, y > 0)
    message = str(info.value)
    assert message.startswith(f"The dense {what} needs")
    if space == "function":  # the Gram matrix, kept through the Newton steps
        assert "the Gram matrix J Jᵀ 40 x 40" in message
        assert "the curvature products 2 x 40 x 40" in message
    assert "noise" not in message


def test_evidence_maximisation(data, no_memory):
    X, y, _ = data
    with pytest.raises(MemoryError) as info:
        FiniteNTKRegressor(mlp(), space="function", solver="dense").fit(X, y)
    message = str(info.value)
    assert message.startswith("The exact evidence (noise or prior 'auto'")
    assert "its eigendecomposition and workspace 3 x 40 x 40" in message
    assert "solver='cg'" in message


@pytest.mark.parametrize(
    "estimator, what, bases, advice",
    [
        (
            FiniteNTKRegressor,
            "The matrix-free evidence (noise or prior 'auto' with CG)",
            "the log-determinant's Lanczos bases 16 x 151 x 40",
            "set noise and prior.",
        ),
        (
            FiniteNTKClassifier,
            "The stochastic Laplace evidence (prior 'auto' with CG)",
            "the log-determinant's Lanczos bases 32 x 51 x ",
            "set prior to a number.",
        ),
    ],
)
def test_lanczos_evidence(data, monkeypatch, estimator, what, bases, advice):
    # the bases of the quadrature's first steps (their growth stays within what is
    # left: test_evidence.py, test_classifier_evidence.py)
    X, y, _ = data
    if estimator is FiniteNTKClassifier:
        y = (y > np.median(y)).astype(int)
    monkeypatch.setattr(memory, "memory_limits", lambda device: {"a test limit": 10**5})
    with pytest.raises(MemoryError) as info:
        estimator(mlp(), solver="cg").fit(X, y)
    message = str(info.value)
    assert message.startswith(what) and message.endswith(advice)
    assert bases in message


def test_exact_evidence_after_a_cg_fit(data, monkeypatch):
    X, y, _ = data
    reg = FiniteNTKRegressor(mlp(), noise=0.1, prior=1.0, solver="cg", variance="low_rank")
    reg.fit(X, y)  # no dense factor: exact variances would assemble one at fit
    monkeypatch.setattr(memory, "memory_limits", lambda device: {"a test limit": 1000})
    with pytest.raises(MemoryError, match="method='stochastic'"):
        reg.log_marginal_likelihood()
    reg.log_marginal_likelihood(method="stochastic")  # matrix-free: no dense matrix


@pytest.mark.parametrize("method", ["return_cov", "sample_y"])
@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_joint_covariances(data, monkeypatch, method, solver):
    X, y, X_test = data
    reg = FiniteNTKRegressor(mlp(), noise=0.1, prior=1.0, solver=solver).fit(X, y)
    monkeypatch.setattr(memory, "memory_limits", lambda device: {"a test limit": 1000})
    with pytest.raises(MemoryError) as info:
        if method == "return_cov":
            reg.predict(X_test, return_cov=True)
        else:
            reg.sample_y(X_test)
    message = str(info.value)
    assert message.startswith(f"{method} needs")
    assert "the covariance and its terms 3 x 12 x 12" in message
    assert message.endswith("pass fewer test points at a time.")


def test_exact_low_rank_variance(data, monkeypatch):
    X, y, _ = data
    monkeypatch.setattr(memory, "memory_limits", lambda device: {"a test limit": 1000})
    with pytest.raises(MemoryError, match="The exact low-rank variance needs"):
        FiniteNTKRegressor(
            mlp(), noise=0.1, prior=1.0, solver="cg", variance="low_rank"
        ).fit(X, y)


def test_paths_that_fit_pass_and_match_the_unguarded_result(data, monkeypatch):
    X, y, X_test = data
    expected = FiniteNTKRegressor(mlp(), noise=0.1, solver="dense").fit(X, y)
    mean, cov = expected.predict(X_test, return_cov=True)
    # a machine with just enough: 40 x 40 float64 matrices fit, many times over
    monkeypatch.setattr(memory, "memory_limits", lambda device: {"a test limit": 10**7})
    reg = FiniteNTKRegressor(mlp(), noise=0.1, solver="dense").fit(X, y)
    got_mean, got_cov = reg.predict(X_test, return_cov=True)
    np.testing.assert_array_equal(got_mean, mean)
    np.testing.assert_array_equal(got_cov, cov)
    assert reg.sample_y(X_test, n_samples=2).shape == (12, 2)
    assert np.isfinite(reg.log_marginal_likelihood())
