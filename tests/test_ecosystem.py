"""FiniteNTKRegressor inside the scikit-learn ecosystem, through its public API only.

Pipelines, grid search (serial, joblib processes, dask), cross-validation, pickling
(also of both estimators across devices), cloning and pandas input, on small MLPs and
at most 200 samples.
"""

import io
import pickle
import warnings

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.model_selection import (
    GridSearchCV,
    KFold,
    cross_val_score,
    cross_validate,
)
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from sklearn_fntk import DeviceFallbackWarning, FiniteNTKClassifier, FiniteNTKRegressor
from sklearn_fntk._base import FiniteNTKBase

GRID = {
    "finiteNTKregressor__noise": [0.1, 0.3, 1.0],
    "finiteNTKregressor__prior": [0.1, 1.0, 10.0],
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """On shared, loaded cores two OpenMP threads made these small fits 20-50x slower
    than one (joblib already gives its worker processes one thread each)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(n_in=10, n_out=1, hidden=16, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(n_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, n_out)
    )


@pytest.fixture(scope="module")
def diabetes():
    """The first 150 diabetes samples, y standardised."""
    X, y = load_diabetes(return_X_y=True)
    X, y = X[:150], y[:150]
    return X, (y - y.mean()) / y.std()


def search(n_jobs=None):
    pipeline = Pipeline(
        [("scale", StandardScaler()), ("finiteNTKregressor", FiniteNTKRegressor(mlp()))]
    )
    return GridSearchCV(pipeline, GRID, cv=3, n_jobs=n_jobs)


@pytest.fixture(scope="module")
def serial_search(diabetes):
    return search().fit(*diabetes)


def assert_same_search(found, reference):
    assert found.best_params_ == reference.best_params_
    np.testing.assert_allclose(
        found.cv_results_["mean_test_score"],
        reference.cv_results_["mean_test_score"],
        rtol=1e-10,
    )


def test_grid_search_in_pipeline_with_two_processes(diabetes, serial_search):
    assert len(serial_search.cv_results_["params"]) == 9
    assert np.all(np.isfinite(serial_search.cv_results_["mean_test_score"]))
    assert_same_search(search(n_jobs=2).fit(*diabetes), serial_search)


def test_grid_search_on_dask(diabetes, serial_search):
    pytest.importorskip("dask")
    distributed = pytest.importorskip("dask.distributed")
    cluster = distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    )
    with cluster, distributed.Client(cluster), joblib.parallel_backend("dask"):
        found = search(n_jobs=-1).fit(*diabetes)
    assert_same_search(found, serial_search)


def test_cross_val_score_and_cross_validate(diabetes):
    X, y = diabetes
    X = StandardScaler().fit_transform(X)
    regressor = FiniteNTKRegressor(mlp(), noise=0.3)
    cv = KFold(3)
    scores = cross_val_score(regressor, X, y, cv=cv)
    expected = [
        clone(regressor).fit(X[train], y[train]).score(X[test], y[test])
        for train, test in cv.split(X)
    ]
    np.testing.assert_allclose(scores, expected, rtol=1e-12)

    results = cross_validate(
        regressor,
        X,
        y,
        cv=cv,
        scoring=["r2", "neg_mean_squared_error"],
        return_estimator=True,
    )
    np.testing.assert_allclose(results["test_r2"], expected, rtol=1e-12)
    assert np.all(results["test_neg_mean_squared_error"] < 0)
    networks = [estimator.network_ for estimator in results["estimator"]]
    assert len({id(network) for network in networks}) == 3


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_pickle_and_joblib_round_trips_predict_identically(diabetes, solver):
    X, y = diabetes
    X = StandardScaler().fit_transform(X)
    regressor = FiniteNTKRegressor(mlp(), noise=0.3, solver=solver, tol=1e-10)
    regressor.fit(X[:100], y[:100])
    mean, std = regressor.predict(X[100:], return_std=True)

    restored = [pickle.loads(pickle.dumps(regressor))]
    buffer = io.BytesIO()
    joblib.dump(regressor, buffer)
    buffer.seek(0)
    restored.append(joblib.load(buffer))
    for copy in restored:
        assert copy.solver_ == solver
        copy_mean, copy_std = copy.predict(X[100:], return_std=True)
        np.testing.assert_array_equal(copy_mean, mean)
        np.testing.assert_array_equal(copy_std, std)


def tensors_in(obj, seen=None, kind=torch.Tensor):
    """Every torch tensor (or other ``kind``) reachable from obj through containers
    and attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (type, str, bytes, np.ndarray)):
        return []
    seen.add(id(obj))
    if isinstance(obj, kind):
        return [obj]
    if isinstance(obj, torch.Tensor):
        return []
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    else:
        children = list(getattr(obj, "__dict__", {}).values())
    return [found for child in children for found in tensors_in(child, seen, kind)]


@pytest.mark.parametrize("estimator", ["regressor", "classifier"])
def test_fitted_state_holds_no_random_generator(diabetes, estimator):
    """The Nyström sketches' generator is not kept: a CUDA generator in the state
    made a classifier fitted on a GPU fail to unpickle on a CPU-only machine, and
    shared random state is not thread-safe."""
    X, y = diabetes
    X = StandardScaler().fit_transform(X)
    options = dict(solver="cg", preconditioner="nystrom", random_state=0)
    if estimator == "regressor":
        model = FiniteNTKRegressor(mlp(), noise=0.3, prior=1.0, **options).fit(X, y)
    else:
        model = FiniteNTKClassifier(mlp(), prior=1.0, **options).fit(X, y > 0)
    assert tensors_in(model, kind=torch.Generator) == []


@pytest.fixture
def fitted_on_cuda(monkeypatch):
    """Pickling sees the fitted state and the network on cuda:0; unpickling sees a
    machine without CUDA."""
    devices = FiniteNTKBase._devices

    def on_cuda(self):
        return {
            group: None if device is None else torch.device("cuda:0")
            for group, device in devices(self).items()
        }

    monkeypatch.setattr(FiniteNTKBase, "_devices", on_cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_pickled_state_of_a_gpu_fit_holds_cpu_copies(diabetes, fitted_on_cuda):
    X, y = diabetes
    regressor = FiniteNTKRegressor(mlp(), noise=0.3, device="cpu").fit(X, y)
    state = regressor.__getstate__()
    assert state["_pickled_devices"] == {"fitted": "cuda:0", "network": "cuda:0"}
    assert "_pickled_devices" not in vars(regressor)
    assert all(tensor.device.type == "cpu" for tensor in tensors_in(state))
    # copies (they went through the move), sharing what they shared; the other
    # parameters are the estimator's own
    assert state["_network"] is not regressor._network
    assert state["network"] is not regressor.network
    assert state["delta_"] is state["_posterior"].delta
    assert state["parameters"] is regressor.parameters
    torch.testing.assert_close(state["delta_"], regressor.delta_, rtol=0, atol=0)


@pytest.mark.parametrize("estimator", ["regressor", "classifier"])
def test_gpu_fit_loads_on_a_cpu_only_machine(diabetes, fitted_on_cuda, estimator):
    X, y = diabetes
    X = StandardScaler().fit_transform(X)
    if estimator == "regressor":
        model, target = FiniteNTKRegressor(mlp(), noise=0.3, device="cpu"), y
        methods = ["predict", "predict_std"]
    else:
        model, target = FiniteNTKClassifier(mlp(), device="cpu"), y > 0
        methods = ["predict_proba", "decision_function"]
    model.fit(X[:100], target[:100])
    expected = {method: getattr(model, method)(X[100:]) for method in methods}
    model.set_params(device="cuda:0")  # as if fitted with it

    with pytest.warns(DeviceFallbackWarning) as record:
        restored = pickle.loads(pickle.dumps(model))
    name = type(model).__name__
    assert str(record[0].message) == (
        f"This {name} was fitted on cuda:0 and given a network on cuda:0, which "
        "this machine does not have: it was loaded on the CPU and predicts there. "
        "Its device parameter is still 'cuda:0'; set_params(device='cpu') to fit it "
        "again here."
    )
    assert restored.get_params()["device"] == "cuda:0"
    assert restored.delta_.device.type == "cpu"
    for method, values in expected.items():
        np.testing.assert_array_equal(getattr(restored, method)(X[100:]), values)

    restored.set_params(device="cpu").fit(X[:100], target[:100])
    assert "_device_override" not in vars(restored)
    for method, values in expected.items():
        np.testing.assert_array_equal(getattr(restored, method)(X[100:]), values)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fit_pickles_through_the_cpu(diabetes, monkeypatch):
    X, y = diabetes
    X = StandardScaler().fit_transform(X)
    regressor = FiniteNTKRegressor(mlp(), noise=0.3, device="cuda")
    mean, std = regressor.fit(X[:100], y[:100]).predict(X[100:], return_std=True)
    assert all(t.device.type == "cpu" for t in tensors_in(regressor.__getstate__()))
    data = pickle.dumps(regressor)

    restored = pickle.loads(data)
    assert restored.delta_.device.type == "cuda"
    copy_mean, copy_std = restored.predict(X[100:], return_std=True)
    np.testing.assert_array_equal(copy_mean, mean)
    np.testing.assert_array_equal(copy_std, std)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(DeviceFallbackWarning, match="fitted on cuda:0"):
        on_cpu = pickle.loads(data)
    assert on_cpu.delta_.device.type == "cpu"
    cpu_mean, cpu_std = on_cpu.predict(X[100:], return_std=True)
    np.testing.assert_allclose(cpu_mean, mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(cpu_std, std, rtol=1e-9, atol=1e-12)


def test_clone_copies_the_network_independently(diabetes):
    X, y = diabetes
    X = StandardScaler().fit_transform(X)
    net = mlp()
    original_weights = [t.detach().clone() for t in net.parameters()]
    regressor = FiniteNTKRegressor(net, noise=0.3).fit(X, y)
    before = regressor.predict(X)

    copy = clone(regressor)
    assert copy.network is not regressor.network
    copy.fit(X, y)
    np.testing.assert_array_equal(copy.predict(X), before)
    assert copy.network_ is not regressor.network_
    with torch.no_grad():
        for tensor in copy.network_.parameters():
            tensor.add_(1.0)
        for tensor in copy.network.parameters():
            tensor.mul_(-2.0)

    np.testing.assert_array_equal(regressor.predict(X), before)
    for tensor, weights in zip(net.parameters(), original_weights, strict=True):
        torch.testing.assert_close(tensor.detach(), weights, rtol=0, atol=0)
    for tensor, weights in zip(
        regressor.network_.parameters(), original_weights, strict=True
    ):
        torch.testing.assert_close(tensor.detach().float().cpu(), weights, rtol=0, atol=0)


def test_pandas_feature_names_follow_scikit_learn(diabetes):
    X, y = diabetes
    columns = [f"x{i}" for i in range(X.shape[1])]
    frame = pd.DataFrame(StandardScaler().fit_transform(X), columns=columns)
    regressor = FiniteNTKRegressor(mlp(), noise=0.3).fit(frame, y)
    np.testing.assert_array_equal(regressor.feature_names_in_, columns)
    assert regressor.n_features_in_ == X.shape[1]
    reference = Ridge().fit(frame, y)

    renamed = frame.rename(columns={"x0": "other"})
    # scikit-learn >= 1.2 raises (not warns) on feature names that differ from fit
    with pytest.raises(ValueError, match="feature names should match") as expected:
        reference.predict(renamed)
    with pytest.raises(ValueError, match="feature names should match") as raised:
        regressor.predict(renamed)
    assert str(raised.value) == str(expected.value)

    # ... and warns on an array without names after fitting with names
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        reference.predict(frame.to_numpy())
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        unnamed = regressor.predict(frame.to_numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(regressor.predict(frame), unnamed)


def test_multi_output_score_is_uniform_average_r2(diabetes):
    X, y = diabetes
    X = StandardScaler().fit_transform(X)
    rng = np.random.default_rng(0)
    Y = np.column_stack([y, np.tanh(X[:, 2]) + 0.1 * rng.normal(size=len(y)), X[:, 3]])
    regressor = FiniteNTKRegressor(mlp(n_out=3), noise=0.3).fit(X[:100], Y[:100])
    prediction = regressor.predict(X[100:])
    assert prediction.shape == (50, 3)
    expected = r2_score(Y[100:], prediction, multioutput="uniform_average")
    assert regressor.score(X[100:], Y[100:]) == pytest.approx(expected, rel=1e-12)


# -- uncertainty through wrappers ---------------------------------------------------------


class StandardizedMean(torch.nn.Module):
    """Outputs (net(x) - loc) / scale with the Jacobian of net: the prior mean and
    kernel of FiniteNTKRegressor(net, normalize_y=True) on standardized targets."""

    def __init__(self, net, loc, scale):
        super().__init__()
        self.net = net
        # buffers, so that the estimator's .to(device) moves them with the network
        self.register_buffer("loc", torch.as_tensor(loc))
        self.register_buffer("scale", torch.as_tensor(scale))

    def forward(self, x):
        out = self.net(x)
        return out + ((out - self.loc) / self.scale - out).detach()


@pytest.mark.parametrize("prior_mean", ["network", "zero"])
def test_normalize_y_is_a_fit_on_standardized_y_scaled_back(diabetes, prior_mean):
    X, y = diabetes
    Y = np.column_stack([50 * y + 150, -3 * y**2 + 7])  # two outputs, two scales
    loc, scale = Y.mean(axis=0), Y.std(axis=0)
    options = dict(noise=0.3, prior=2.0, prior_mean=prior_mean)
    model = FiniteNTKRegressor(mlp(n_out=2), normalize_y=True, **options).fit(X, Y)
    reference = FiniteNTKRegressor(
        StandardizedMean(mlp(n_out=2), loc, scale), **options
    ).fit(X, (Y - loc) / scale)
    test = X[:20]
    mean, std = model.predict(test, return_std=True, include_noise=True)
    mean_ref, std_ref = reference.predict(test, return_std=True, include_noise=True)
    np.testing.assert_allclose(mean, mean_ref * scale + loc, rtol=1e-10)
    np.testing.assert_allclose(std, std_ref * scale, rtol=1e-10)
    np.testing.assert_allclose(
        model.predict_std(test), reference.predict_std(test) * scale, rtol=1e-10
    )
    _, cov = model.predict(test, return_cov=True, include_noise=True)
    _, cov_ref = reference.predict(test, return_cov=True, include_noise=True)
    np.testing.assert_allclose(cov, cov_ref * scale**2, rtol=1e-9, atol=1e-12)
    draws = model.sample_y(test[:5], 3, random_state=1)  # (5, 2, 3)
    draws_ref = reference.sample_y(test[:5], 3, random_state=1)
    np.testing.assert_allclose(draws, draws_ref * scale[:, None] + loc[:, None], rtol=1e-8)
    assert model.noise_ == reference.noise_ and model.prior_ == reference.prior_
    np.testing.assert_allclose(
        model.log_marginal_likelihood(), reference.log_marginal_likelihood(), rtol=1e-10
    )


def test_transformed_target_regressor_mean_and_normalize_y_std(diabetes):
    """TransformedTargetRegressor passes predict's arguments to the regressor but
    expects one array back, so return_std fails in scikit-learn's code; normalize_y
    is the way to a std in y's units, with the same mean for prior_mean="zero"."""
    from sklearn.compose import TransformedTargetRegressor

    X, y = diabetes
    y = 50 * y + 150
    options = dict(noise=0.3, prior=2.0, prior_mean="zero")
    wrapped = TransformedTargetRegressor(
        regressor=FiniteNTKRegressor(mlp(), **options), transformer=StandardScaler()
    ).fit(X, y)
    model = FiniteNTKRegressor(mlp(), normalize_y=True, **options).fit(X, y)
    mean, std = model.predict(X[:20], return_std=True)
    np.testing.assert_allclose(wrapped.predict(X[:20]), mean, rtol=1e-10)
    with pytest.raises(AttributeError, match="'tuple' object has no attribute 'ndim'"):
        wrapped.predict(X[:20], return_std=True)
    inner_std = wrapped.regressor_.predict_std(X[:20])  # standardized units
    np.testing.assert_allclose(std, inner_std * y.std(), rtol=1e-10)


def test_pipeline_passes_return_std_and_include_noise(diabetes):
    X, y = diabetes
    pipeline = Pipeline(
        [("scale", StandardScaler()), ("ntk", FiniteNTKRegressor(mlp(), noise=0.3))]
    ).fit(X, y)
    mean, std = pipeline.predict(X[:10], return_std=True, include_noise=True)
    regressor, Z = pipeline[-1], pipeline[0].transform(X[:10])
    np.testing.assert_array_equal(mean, regressor.predict(Z))
    np.testing.assert_array_equal(std, regressor.predict_std(Z, include_noise=True))
    assert np.all(std > regressor.predict_std(Z))
