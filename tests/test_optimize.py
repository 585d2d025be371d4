"""FiniteNTKRegressor(optimize=True): noise and prior by maximising the evidence."""

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

from sklearn_fntk import FiniteNTKRegressor

TRUE_NOISE, TRUE_PRIOR = 0.05, 0.5


@pytest.fixture(scope="module")
def network_and_data():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
    ).double()
    X = np.random.RandomState(0).randn(600, 3)
    params = {name: p.detach() for name, p in net.named_parameters()}
    blocks = jacrev(lambda p: functional_call(net, p, (torch.as_tensor(X),)))(params)
    J = torch.cat([b.reshape(len(X), -1) for b in blocks.values()], 1).numpy()
    rng = np.random.RandomState(1)
    # y = J w + ε with w ~ N(0, s I), ε ~ N(0, σ² I): the GP with prior_mean="zero"
    w = rng.randn(J.shape[1]) * np.sqrt(TRUE_PRIOR)
    y = J @ w + rng.randn(len(X)) * np.sqrt(TRUE_NOISE)
    return net, X, y


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_optimize_recovers_noise(network_and_data, space):
    net, X, y = network_and_data
    reg = FiniteNTKRegressor(
        net,
        noise=1.0,
        prior=1.0,
        prior_mean="zero",
        space=space,
        optimize=True,
        random_state=0,
    ).fit(X, y)
    assert abs(reg.noise_ - TRUE_NOISE) / TRUE_NOISE < 0.2
    assert (reg.noise, reg.prior) == (1.0, 1.0)  # the constructor's values stay
    # the fitted model is the plain one at the optimum, and the optimum beats the start
    plain = FiniteNTKRegressor(
        net, noise=reg.noise_, prior=reg.prior_, prior_mean="zero", space=space
    ).fit(X, y)
    np.testing.assert_allclose(reg.predict(X[:20]), plain.predict(X[:20]), rtol=1e-9)
    start = FiniteNTKRegressor(net, prior_mean="zero", noise=1.0, space=space).fit(X, y)
    assert reg.log_marginal_likelihood() > start.log_marginal_likelihood()
    np.testing.assert_allclose(
        reg.log_marginal_likelihood(), plain.log_marginal_likelihood(), rtol=1e-9
    )


def test_optimize_needs_dense_solver(network_and_data):
    net, X, y = network_and_data
    reg = FiniteNTKRegressor(net, solver="cg", optimize=True)
    with pytest.raises(ValueError, match="optimize=True .* solver='cg'"):
        reg.fit(X[:50], y[:50])


def test_without_optimize_fitted_values_are_the_parameters(network_and_data):
    net, X, y = network_and_data
    reg = FiniteNTKRegressor(net, noise=0.3, prior=2.0).fit(X[:50], y[:50])
    assert (reg.noise_, reg.prior_) == (0.3, 2.0)


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_stochastic_log_marginal_likelihood_estimates_the_exact_one(
    network_and_data, space
):
    net, X, y = network_and_data
    reg = FiniteNTKRegressor(net, noise=0.05, space=space, tol=1e-10, random_state=0)
    reg.fit(X, y)
    exact = reg.log_marginal_likelihood()
    estimate, std_error = reg.log_marginal_likelihood(
        "stochastic", n_probes=64, lanczos_steps=80, return_std_error=True
    )
    assert reg.log_marginal_likelihood(return_std_error=True) == (exact, 0.0)
    # log p(y) is a sum over the n observations: errors are judged per observation
    assert 0 < std_error < 0.01 * len(y)
    assert abs(estimate - exact) < 4 * std_error + 1e-3 * len(y)


def test_unknown_log_marginal_likelihood_method(network_and_data):
    net, X, y = network_and_data
    reg = FiniteNTKRegressor(net).fit(X[:50], y[:50])
    with pytest.raises(ValueError, match="method must be 'exact' or 'stochastic'"):
        reg.log_marginal_likelihood("approximate")


def test_optimize_warns_when_noise_collapses():
    """Two exactly fitted points: the evidence prefers no noise at all."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    )
    X = np.array([[-1.0], [1.0]])
    y = np.sin(3 * X[:, 0])
    with pytest.warns(UserWarning, match="the GP interpolates the training targets"):
        reg = FiniteNTKRegressor(net, optimize=True, random_state=0).fit(X, y)
    assert reg.noise_ <= 1e-6 * np.mean(
        (y - reg.network_(torch.as_tensor(X)).detach().numpy()[:, 0]) ** 2
    )
