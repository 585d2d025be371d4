"""Bad input gets a clear error naming what was wrong and what was expected."""

import re

import numpy as np
import pytest
import torch
from networks import (
    cnn,
    mlp,
    regression_data,
)
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import InvalidParameterError

from sklearn_fntk import FiniteNTKRegressor


@pytest.fixture(scope="module")
def data():
    X, Y, X_test = regression_data(n=12, m=4, n_outputs=2, seed=20)
    return X, Y, X_test


@pytest.fixture(scope="module")
def fitted_single(data):
    X, Y, _ = data
    return FiniteNTKRegressor(mlp(n_out=1, seed=20), noise=0.1).fit(X, Y[:, 0])


@pytest.fixture(scope="module")
def fitted_image():
    X, Y, _ = regression_data(n=10, image=True, seed=21)
    return FiniteNTKRegressor(cnn(seed=21), noise=0.1).fit(X, Y[:, 0])


# -- NaN and inf --------------------------------------------------------------------


@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "infinity")])
def test_nan_and_inf_in_X(data, value, word):
    X, Y, _ = data
    X = X.copy()
    X[3, 1] = value
    with pytest.raises(ValueError, match=f"Input X contains {word}"):
        FiniteNTKRegressor(mlp(n_out=1), noise=0.1).fit(X, Y[:, 0])


@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "infinity")])
def test_nan_and_inf_in_y(data, value, word):
    X, Y, _ = data
    y = Y[:, 0].copy()
    y[5] = value
    with pytest.raises(ValueError, match=f"Input y contains {word}"):
        FiniteNTKRegressor(mlp(n_out=1), noise=0.1).fit(X, y)


@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (-np.inf, "infinity")])
def test_nan_and_inf_in_multi_output_y(data, value, word):
    X, Y, _ = data
    Y = Y.copy()
    Y[2, 1] = value
    with pytest.raises(ValueError, match=f"Input y contains {word}"):
        FiniteNTKRegressor(mlp(n_out=2), noise=0.1).fit(X, Y)


@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "infinity")])
def test_nan_and_inf_in_X_at_predict(fitted_single, data, value, word):
    X_test = data[2].copy()
    X_test[0, 0] = value
    with pytest.raises(ValueError, match=f"Input X contains {word}"):
        fitted_single.predict(X_test)


# -- shapes -------------------------------------------------------------------------


def test_network_rejects_the_feature_count_at_fit():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(10, 5)), rng.normal(size=10)
    with pytest.raises(ValueError) as info:
        FiniteNTKRegressor(mlp(n_in=3, n_out=1), noise=0.1).fit(X, y)
    message = str(info.value)
    assert "per-sample shape (5,)" in message
    assert "expects 3 input features" in message


def test_network_rejects_the_image_shape_at_fit():
    """A CNN given flat vectors: the message names the shape and the input channels."""
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(10, 64)), rng.normal(size=10)
    with pytest.raises(ValueError) as info:
        FiniteNTKRegressor(cnn(), noise=0.1).fit(X, y)
    message = str(info.value)
    assert "per-sample shape (64,)" in message
    assert "expects 1 input channels" in message


def test_predict_with_a_different_feature_count(fitted_single):
    X_bad = np.zeros((4, 4))
    expected = "X has 4 features, but FiniteNTKRegressor is expecting 3 features"
    with pytest.raises(ValueError, match=re.escape(expected)):
        fitted_single.predict(X_bad)
    with pytest.raises(ValueError, match=re.escape(expected)):
        fitted_single.predict_std(X_bad)


def test_predict_with_a_different_image_shape(fitted_image):
    X_bad = np.zeros((3, 1, 6, 6))
    expected = (
        "X has per-sample shape (1, 6, 6), but FiniteNTKRegressor was fitted with "
        "per-sample shape (1, 8, 8)"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        fitted_image.predict(X_bad)
    with pytest.raises(ValueError, match=re.escape(expected)):
        fitted_image.predict(X_bad, return_std=True)


def test_y_output_count_differs_from_the_network(data):
    X, Y, _ = data
    Y3 = np.column_stack([Y, Y[:, 0]])
    expected = "The network produces 2 output(s) per sample, but y has 3"
    with pytest.raises(ValueError, match=re.escape(expected)):
        FiniteNTKRegressor(mlp(n_out=2), noise=0.1).fit(X, Y3)
    # One-dimensional y means one output.
    expected = "The network produces 2 output(s) per sample, but y has 1"
    with pytest.raises(ValueError, match=re.escape(expected)):
        FiniteNTKRegressor(mlp(n_out=2), noise=0.1).fit(X, Y[:, 0])


# -- constructor parameters ----------------------------------------------------------


@pytest.mark.parametrize("network", ["mlp", lambda x: x, np.zeros(3)])
def test_network_must_be_a_module(data, network):
    X, Y, _ = data
    with pytest.raises(InvalidParameterError, match="'network' parameter") as info:
        FiniteNTKRegressor(network, noise=0.1).fit(X, Y[:, 0])
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


@pytest.mark.parametrize("name", ["noise", "prior"])
@pytest.mark.parametrize("value", [0.0, -1.0])
def test_noise_and_prior_must_be_positive(data, name, value):
    X, Y, _ = data
    est = FiniteNTKRegressor(mlp(n_out=1), **{"noise": 0.1, name: value})
    with pytest.raises(InvalidParameterError, match=f"'{name}' parameter"):
        est.fit(X, Y[:, 0])


def test_unknown_parameter_names(data):
    X, Y, _ = data
    est = FiniteNTKRegressor(
        mlp(n_out=1), noise=0.1, parameters=["2.weight", "9.bias", "w"]
    )
    with pytest.raises(ValueError, match=re.escape("['9.bias', 'w']")) as info:
        est.fit(X, Y[:, 0])
    message = str(info.value)
    assert "are not parameters of the network" in message
    assert "2.weight" in message  # the expected names are listed


def test_predict_before_fit(data):
    est = FiniteNTKRegressor(mlp(n_out=1), noise=0.1)
    for method in (est.predict, est.predict_std):
        with pytest.raises(NotFittedError):
            method(data[2])
    with pytest.raises(NotFittedError):
        est.log_marginal_likelihood()
    with pytest.raises(NotFittedError):
        est.sample_y(data[2])


def test_return_std_and_return_cov_together(fitted_single, data):
    with pytest.raises(RuntimeError, match="return_std.*return_cov"):
        fitted_single.predict(data[2], return_std=True, return_cov=True)


def test_user_module_untouched_by_failed_fit():
    """A rejected fit leaves the user's module as it was (no partial mutation)."""
    net = mlp(n_in=3, n_out=1)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError):
        FiniteNTKRegressor(net, noise=0.1).fit(np.zeros((6, 5)), np.zeros(6))
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.requires_grad for p in net.parameters())
