"""The estimators compute in IEEE float32 whatever PyTorch's TF32 switches say, and
give the user's settings back."""

import threading

import numpy as np
import pytest
import torch
from networks import regression_data

from sklearn_fntk import FiniteNTKClassifier, FiniteNTKRegressor
from sklearn_fntk._precision import _switches


def settings():
    return [getattr(owner, name) for owner, name, _ in _switches()]


IEEE = [value for _, _, value in _switches()]


class Recording(torch.nn.Module):
    """A small MLP that records the precision switches at each forward pass."""

    def __init__(self, n_out=1):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, n_out)
        )
        self.seen = []

    def forward(self, x):
        self.seen.append(settings())
        return self.net(x)


@pytest.fixture
def tf32_on():
    """The user trains with TF32 matrix products (and TF32 convolutions, PyTorch's
    default); their settings are put back after the test."""
    before = settings()
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    user = settings()
    assert user != IEEE
    yield user
    for (owner, name, _), value in zip(_switches(), before, strict=True):
        setattr(owner, name, value)


@pytest.mark.parametrize("estimator", ["regressor", "classifier"])
def test_methods_run_in_ieee_float32_and_restore_the_settings(tf32_on, estimator):
    X, y, X_test = regression_data(n=40, m=10)
    if estimator == "regressor":
        model = FiniteNTKRegressor(Recording(), dtype="float32", noise=0.1, prior=1.0)
        methods = ["predict", "predict_std"]
    else:
        y = y[:, 0] > 0
        model = FiniteNTKClassifier(Recording(), dtype="float32", prior=1.0)
        methods = ["predict_proba", "decision_function", "predict_latent"]
    model.fit(X, y)
    assert settings() == tf32_on
    for method in methods:
        getattr(model, method)(X_test)
        assert settings() == tf32_on
    # the estimator's copy of the network recorded every forward pass
    seen = model._network.module.seen
    assert len(seen) > 0 and all(switches == IEEE for switches in seen)


def test_threads_restore_the_settings_once_all_have_left(tf32_on):
    X, y, X_test = regression_data(n=40, m=200)
    model = FiniteNTKRegressor(Recording(), dtype="float32", noise=0.1, prior=1.0)
    model.fit(X, y)
    results, start = [None] * 4, threading.Barrier(4)

    def predict(i):
        start.wait()
        results[i] = model.predict(X_test, return_std=True)

    threads = [threading.Thread(target=predict, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert settings() == tf32_on
    for mean, std in results[1:]:
        np.testing.assert_array_equal(mean, results[0][0])
        np.testing.assert_array_equal(std, results[0][1])
    assert all(switches == IEEE for switches in model._network.module.seen)
