"""Each message names the problem and the fix (issue 15, "Unclear messages"), and
warnings point at the caller's line."""

import re
import warnings

import numpy as np
import pytest
import torch
from networks import TokenBag, batchnorm_dropout_net, mlp, regression_data, token_data
from sklearn.exceptions import ConvergenceWarning
from torch import nn

from sklearn_fntk import FiniteNTKClassifier, FiniteNTKRegressor
from sklearn_fntk._inference.policy import Policy


@pytest.fixture(scope="module")
def data():
    X, Y, X_test = regression_data(n=30, m=6, seed=51)
    return X, Y[:, 0], X_test


def test_a_device_this_machine_lacks(data, monkeypatch):
    X, y, _ = data
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for estimator in (FiniteNTKRegressor, FiniteNTKClassifier):
        with pytest.raises(ValueError) as info:
            estimator(mlp(), device="cuda").fit(X, y > 0)
        assert str(info.value) == (
            "device='cuda' is not available on this machine (torch.cuda.is_available() "
            "is False). Use device='cpu', or a device this machine has."
        )


class Returns(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind, self.linear = kind, nn.Linear(3, 1)

    def forward(self, x):
        out = self.linear(x)
        return (out, x) if self.kind == "tuple" else {"logits": out}


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_a_network_that_returns_a_tuple_or_dict(data, kind):
    X, y, _ = data
    with pytest.raises(TypeError) as info:
        FiniteNTKRegressor(Returns(kind)).fit(X, y)
    message = str(info.value)
    assert message.startswith(f"The network returned a {kind}, not a tensor")
    assert "out[0] or out['logits']" in message
    assert "features" not in message  # not blamed on X


def test_nd_X_into_a_network_for_vectors(data):
    X, y, _ = data
    X3 = np.repeat(X[:, None, :], 2, axis=1)  # (n, 2, 3): Linear acts on the last axis
    for estimator, target in [(FiniteNTKRegressor, y), (FiniteNTKClassifier, y > 0)]:
        with pytest.raises(ValueError) as info:
            estimator(mlp()).fit(X3, target)
        message = str(info.value)
        assert "output for a batch of 2 samples has shape (2, 2, 1)" in message
        assert "per-sample shape (2, 3)" in message
        assert "nn.Flatten()" in message


def test_numeric_strings_as_regression_targets(data):
    X, y, _ = data
    with pytest.raises(ValueError, match=r"y has dtype <U\d+: .* numeric targets.*astype"):
        FiniteNTKRegressor(mlp()).fit(X, y.astype(str))
    # labels may be strings for the classifier, of course
    FiniteNTKClassifier(mlp()).fit(X, np.where(y > 0, "1.5", "2.0"))


@pytest.mark.parametrize("estimator", [FiniteNTKRegressor, FiniteNTKClassifier])
def test_tensors_that_require_grad_as_X_and_y(data, estimator):
    X, y, X_test = data
    target = y if estimator is FiniteNTKRegressor else (y > 0).astype(float)
    expected = estimator(mlp()).fit(X, target)
    X_t = torch.tensor(X, requires_grad=True)
    y_t = torch.tensor(target, requires_grad=True)
    model = estimator(mlp()).fit(X_t, y_t)
    predict = "predict" if estimator is FiniteNTKRegressor else "predict_proba"
    got = getattr(model, predict)(torch.tensor(X_test, requires_grad=True))
    np.testing.assert_array_equal(got, getattr(expected, predict)(X_test))
    assert X_t.grad is None


def test_the_classifier_never_advises_noise_nor_float64_in_float64(data):
    X, y, _ = data
    with pytest.warns(ConvergenceWarning) as record:
        FiniteNTKClassifier(mlp(), solver="cg", preconditioner=None, max_iter=1).fit(
            X, y > 0
        )
    X, Y, _ = regression_data(n=100, m=1, seed=3)
    with pytest.raises(ValueError) as info:  # B = I + Λ½KΛ½ with K ~ 1e15: rounding
        FiniteNTKClassifier(mlp(), prior=1e15, solver="dense", space="function").fit(
            X, Y[:, 0] > 0
        )
    messages = [str(w.message) for w in record] + [str(info.value)]
    assert str(info.value).endswith("in torch.float64; lower prior.")
    for message in messages:
        assert "noise" not in message
        assert "dtype='float64'" not in message


def test_float64_advice_only_outside_float64(data):
    X, y, _ = data
    X = np.vstack([X] * 4)  # 120 samples, p = 61: J Jᵀ is singular
    y = np.concatenate([y] * 4)
    message = {}
    for dtype, noise in [("float64", 1e-300), ("float32", 1e-30)]:
        with pytest.raises(ValueError) as info:
            FiniteNTKRegressor(
                mlp(), noise=noise, prior=1.0, solver="dense", space="function",
                dtype=dtype,
            ).fit(X, y)  # fmt: skip
        message[dtype] = str(info.value)
    assert message["float64"].endswith("; increase noise, or lower prior.")
    assert message["float32"].endswith(
        "; increase noise, lower prior, or use dtype='float64'."
    )


class BatchCentred(nn.Module):
    """Subtracts the batch mean: its output for a sample depends on the others."""

    def __init__(self):
        super().__init__()
        self.body = mlp()

    def forward(self, x):
        return self.body(x - x.mean(0))


def test_a_network_whose_outputs_depend_on_the_batch(data):
    X, y, _ = data
    with pytest.raises(ValueError) as info:
        FiniteNTKRegressor(BatchCentred()).fit(X, y)
    message = str(info.value)
    assert "depends on the other samples of its batch" in message
    assert "BatchNorm, must use its running statistics" in message


def test_batchnorm_in_eval_mode_is_per_sample(data):
    X, y, _ = data
    FiniteNTKRegressor(batchnorm_dropout_net(), noise=0.1).fit(X, y)  # no error


def test_warnings_point_at_the_callers_line(data):
    X, y, X_test = data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = FiniteNTKRegressor(
            mlp(),
            noise=1e-3,
            prior=1.0,
            solver="cg",
            variance="exact",
            preconditioner=None,
            max_iter=1,
        )
        reg._policy = Policy(variance_factor_max_size=0)  # variances by CG too
        reg.fit(X, y)  # the fit's CG warns
        reg.predict(X_test, return_std=True)  # and the variances' CG
        FiniteNTKClassifier(mlp(), solver="cg", preconditioner=None, max_iter=1).fit(
            X, y > 0
        )
    ours = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(ours) >= 3
    assert all(w.filename == __file__ for w in ours), [(w.filename, w.lineno) for w in ours]


def test_evidence_and_sampling_arguments(data):
    X, y, X_test = data
    reg = FiniteNTKRegressor(mlp(), noise=0.1).fit(X, y)
    pattern = "The 'lanczos_steps' parameter of log_marginal_likelihood must be an int"
    with pytest.raises(ValueError, match=re.escape(pattern)):
        reg.log_marginal_likelihood(method="stochastic", lanczos_steps=0)
    with pytest.raises(ValueError, match="'n_probes' parameter .* range \\[2, inf\\)"):
        reg.log_marginal_likelihood(method="stochastic", n_probes=1)
    # an array of pairs failed inside with a TypeError from math.isfinite
    for noise in ([0.1, 0.2], 0.0, "0.1"):
        with pytest.raises(ValueError, match="The 'noise' parameter of log_marginal"):
            reg.log_marginal_likelihood(noise, 1.0)
    with pytest.raises(ValueError, match="The 'prior' parameter of log_marginal"):
        reg.log_marginal_likelihood(0.1, -1.0)
    for n_samples in (2.5, 0, "3"):
        with pytest.raises(ValueError, match="The 'n_samples' parameter of sample_y"):
            reg.sample_y(X_test, n_samples=n_samples)


def _skorch_like_classes():
    """A NeuralNet / NeuralNetRegressor pair declared in a module named like
    skorch's, as skorch's classes are found without importing skorch."""

    class NeuralNet:
        def __init__(self, module):
            self.module = module

        def initialize(self):
            self.module_ = self.module()
            return self

    class NeuralNetRegressor(NeuralNet):
        pass

    for cls in (NeuralNet, NeuralNetRegressor):
        cls.__module__ = "skorch.regressor"
    return NeuralNetRegressor


@pytest.mark.parametrize("initialized", [False, True])
def test_a_skorch_net_is_refused_naming_its_module(data, initialized):
    X, y, _ = data
    net = _skorch_like_classes()(mlp)
    if initialized:
        net.initialize()
    for estimator, target in [(FiniteNTKRegressor, y), (FiniteNTKClassifier, y > 0)]:
        with pytest.raises(TypeError) as info:
            estimator(net).fit(X, target)
        assert str(info.value) == (
            "network is a skorch net (NeuralNetRegressor), not a torch.nn.Module. Pass "
            "its trained module: network=net.module_ (it exists once the net is fitted "
            "or initialized)."
        )
    if initialized:  # and its module_ works
        FiniteNTKRegressor(net.module_, noise=0.1, prior=1.0).fit(X, y)


def test_another_wrapper_holding_a_module_is_refused_naming_it(data):
    X, y, _ = data

    class Wrapper:
        module_ = mlp()

    with pytest.raises(TypeError, match=r"^network is a wrapper \(Wrapper\), not a "):
        FiniteNTKRegressor(Wrapper()).fit(X, y)
    # anything else gets scikit-learn's parameter error, unchanged
    with pytest.raises(ValueError, match="The 'network' parameter of FiniteNTKRegressor"):
        FiniteNTKRegressor("mlp").fit(X, y)


def test_integer_inputs():
    """Integer X goes to a network for features as floats, and as int64 indices to
    one that takes only those (an Embedding first); such a network then needs
    integer values at prediction."""
    X, Y, X_test = token_data(seed=8)
    reg = FiniteNTKRegressor(TokenBag(), noise=0.1, prior=1.0).fit(X, Y[:, 0])
    np.testing.assert_array_equal(reg.predict(X_test.astype(float)), reg.predict(X_test))
    pattern = "The network takes integer indices as input .* X has non-integer values"
    with pytest.raises(ValueError, match=pattern):
        reg.predict(X_test + 0.5)
    counts = FiniteNTKRegressor(mlp(n_in=5), noise=0.1, prior=1.0).fit(X, Y[:, 0])
    as_floats = FiniteNTKRegressor(mlp(n_in=5), noise=0.1, prior=1.0).fit(X * 1.0, Y[:, 0])
    np.testing.assert_array_equal(counts.predict(X_test), as_floats.predict(X_test))
    with pytest.raises(ValueError, match="cannot be applied to X .* expects 3 input"):
        FiniteNTKRegressor(mlp(n_in=3), noise=0.1, prior=1.0).fit(X, Y[:, 0])
