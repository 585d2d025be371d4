"""noise="auto" and prior="auto": the evidence by default, against dense references.

The reference log evidence is tests/reference.py's (explicit Jacobian by jacrev,
Cholesky of the explicit kernel), evaluated at any (noise, prior).
"""

import warnings

import numpy as np
import pytest
import torch
from reference import reference_jacobian, reference_posterior
from scipy.optimize import minimize_scalar
from scipy.special import gammaln
from sklearn.exceptions import ConvergenceWarning
from torch.func import functional_call, jacrev

from sklearn_fntk import FiniteNTKRegressor
from sklearn_fntk._inference.hyperparameters import NOISE_MODE, NOISE_SHAPE
from sklearn_fntk._inference.policy import Policy

TRUE_NOISE, TRUE_PRIOR = 0.05, 0.5


@pytest.fixture(scope="module")
def network_and_data():
    """y = J w + ε with w ~ N(0, s I), ε ~ N(0, σ² I): the GP with prior_mean="zero"."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
    ).double()
    X = np.random.RandomState(0).randn(600, 3)
    params = {name: p.detach() for name, p in net.named_parameters()}
    blocks = jacrev(lambda p: functional_call(net, p, (torch.as_tensor(X),)))(params)
    J = torch.cat([b.reshape(len(X), -1) for b in blocks.values()], 1).numpy()
    rng = np.random.RandomState(1)
    w = rng.randn(J.shape[1]) * np.sqrt(TRUE_PRIOR)
    y = J @ w + rng.randn(len(X)) * np.sqrt(TRUE_NOISE)
    return net, X, y


def reference_lml(net, X, y, noise, prior):
    return reference_posterior(
        net, X, y, X[:1], noise=noise, prior=prior, prior_mean="zero"
    ).lml


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_auto_recovers_the_noise_and_is_the_plain_fit_at_the_optimum(
    network_and_data, space
):
    net, X, y = network_and_data
    reg = FiniteNTKRegressor(net, prior_mean="zero", space=space, solver="dense")
    reg.fit(X, y)
    assert (reg.noise, reg.prior) == ("auto", "auto")  # the constructor's values stay
    assert abs(reg.noise_ - TRUE_NOISE) / TRUE_NOISE < 0.2
    plain = FiniteNTKRegressor(
        net, noise=reg.noise_, prior=reg.prior_, prior_mean="zero", space=space
    ).fit(X, y)
    np.testing.assert_allclose(reg.predict(X[:20]), plain.predict(X[:20]), rtol=1e-9)
    reference = reference_lml(net, X, y, reg.noise_, reg.prior_)
    np.testing.assert_allclose(reg.log_marginal_likelihood_value_, reference, rtol=1e-9)
    np.testing.assert_allclose(reg.log_marginal_likelihood(), reference, rtol=1e-9)
    # the optimum of evidence + hyperprior: the prior's gradient vanishes; the
    # noise's balances the hyperprior's -α + α·μ/σ² (α = 1, μ = NOISE_MODE·v)
    _, gradient = reg.log_marginal_likelihood(reg.noise_, reg.prior_, eval_gradient=True)
    v = np.mean(y**2)
    assert abs(gradient[1]) < 1e-4
    np.testing.assert_allclose(gradient[0], 1.0 - NOISE_MODE * v / reg.noise_, atol=1e-4)


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_log_marginal_likelihood_at_any_variances_matches_the_reference(
    network_and_data, space
):
    net, X, y = network_and_data
    X, y = X[:150], y[:150]
    reg = FiniteNTKRegressor(net, noise=0.3, prior=2.0, prior_mean="zero", space=space)
    reg.fit(X, y)
    assert (reg.noise_, reg.prior_, reg.log_marginal_likelihood_value_) == (0.3, 2.0, None)
    for noise, prior in [(0.3, 2.0), (0.01, 0.5), (1.0, 10.0)]:
        value = reg.log_marginal_likelihood(noise, prior)
        np.testing.assert_allclose(value, reference_lml(net, X, y, noise, prior), rtol=1e-9)
    # the gradient in (log σ², log s) against central differences of the reference
    value, gradient = reg.log_marginal_likelihood(0.1, 0.7, eval_gradient=True)
    step = 1e-5
    for i in range(2):
        up, down = np.log([0.1, 0.7]), np.log([0.1, 0.7])
        up[i] += step
        down[i] -= step
        difference = (
            reference_lml(net, X, y, *np.exp(up)) - reference_lml(net, X, y, *np.exp(down))
        ) / (2 * step)
        np.testing.assert_allclose(gradient[i], difference, rtol=1e-5, atol=1e-6)


def normal_inverse_gamma_reference(net, X, y, X_test, alpha, beta):
    """The model with σ² integrated out, in dense float64 (prior_mean="zero"):
    w | σ² ~ N(0, λσ² I), σ² ~ IG(α, β), so that y | λ is a multivariate Student-t.

    Returns λ maximising log p(y | λ) (scipy on log λ), the posterior (α', β') of σ²
    there, and a function of λ giving the Student-t predictive's latent variances at
    X_test (ν/(ν - 2) times the squared scale) and β'/α'.
    """
    _, J = reference_jacobian(net, X)
    _, J_test = reference_jacobian(net, X_test)
    J, J_test, r = J.numpy(), J_test.numpy(), np.asarray(y, dtype=np.float64)
    d = len(r)
    posterior_shape = alpha + d / 2

    def terms(lam):
        C = lam * J @ J.T + np.eye(d)
        L = np.linalg.cholesky(C)
        quadratic = np.sum(np.linalg.solve(L, r) ** 2)
        return C, L, beta + quadratic / 2

    def negative_log_evidence(log_lam):
        _, L, posterior_scale = terms(np.exp(log_lam))
        return -(
            gammaln(posterior_shape) - gammaln(alpha) + alpha * np.log(beta)
            - posterior_shape * np.log(posterior_scale)
            - np.sum(np.log(np.diag(L))) - d / 2 * np.log(2 * np.pi)
        )  # fmt: skip

    best = minimize_scalar(
        negative_log_evidence, bounds=(-30, 30), method="bounded", options={"xatol": 1e-10}
    )

    def predictive(lam):
        C, _, posterior_scale = terms(lam)
        cross = lam * J_test @ J.T
        unit = lam * np.sum(J_test**2, 1) - np.sum(cross * np.linalg.solve(C, cross.T).T, 1)
        return posterior_scale / (
            posterior_shape - 1
        ) * unit, posterior_scale / posterior_shape

    return np.exp(best.x), predictive


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_auto_predictive_is_the_student_t_with_the_noise_integrated_out(
    network_and_data, space
):
    """Both "auto": the fitted ratio s/σ² maximises the evidence with σ² integrated
    under its inverse-gamma hyperprior, noise_ is the mode of σ²'s posterior (in log
    σ²), and stds and covariances are the Student-t's, ν = 2α + d."""
    net, X, y = network_and_data
    X, y, X_test = X[:12], y[:12], X[100:110]
    reg = FiniteNTKRegressor(net, prior_mean="zero", space=space, solver="dense")
    reg.fit(X, y)
    alpha = NOISE_SHAPE
    beta = alpha * NOISE_MODE * np.mean(y**2)
    lam, predictive = normal_inverse_gamma_reference(net, X, y, X_test, alpha, beta)
    assert reg.predictive_dof_ == 2 * alpha + len(y)
    assert reg.space_ == space
    np.testing.assert_allclose(reg.prior_ / reg.noise_, lam, rtol=1e-5)
    variance, noise_mode = predictive(reg.prior_ / reg.noise_)
    # In parameter space rᵀK⁻¹r = (‖r‖² - (Jᵀr)ᵀδ)/σ² cancels where the fit nearly
    # interpolates (here n = 12 < p = 161) and noise_ scales with it: 3.4e-8 off with
    # JᵀJ from the per-layer features (bit-equal to the reference's), 3e-10 with
    # autograd's (rounding order only). Eq. (1) over F's eigenpairs instead moves
    # the error to z = c/√f at small f (a sharded fit then differs by 2e-8).
    rtol = 1e-9 if space == "function" else 1e-7
    np.testing.assert_allclose(reg.noise_, noise_mode, rtol=rtol)
    rtol = max(rtol, 1e-8)
    np.testing.assert_allclose(reg.predict_std(X_test) ** 2, variance, rtol=rtol)
    nu = reg.predictive_dof_
    with_noise = variance + nu / (nu - 2) * reg.noise_
    _, std = reg.predict(X_test, return_std=True, include_noise=True)
    np.testing.assert_allclose(std**2, with_noise, rtol=rtol)
    _, cov = reg.predict(X_test, return_cov=True, include_noise=True)
    np.testing.assert_allclose(np.diag(cov), with_noise, rtol=rtol)


def test_student_t_draws_are_the_gaussian_draws_rescaled(network_and_data):
    """sample_y with ν finite: mean + (Gaussian deviation)·√(ν/u), u ~ χ²_ν per draw,
    with the Gaussian deviation of the plug-in at noise_ and prior_."""
    net, X, y = network_and_data
    X, y, X_test = X[:12], y[:12], X[100:105]
    student = FiniteNTKRegressor(net, prior_mean="zero").fit(X, y)
    plug_in = FiniteNTKRegressor(
        net, noise=student.noise_, prior=student.prior_, prior_mean="zero"
    ).fit(X, y)
    assert plug_in.predictive_dof_ == np.inf
    draws = student.sample_y(X_test, n_samples=4, random_state=3)
    gaussian = plug_in.sample_y(X_test, n_samples=4, random_state=3)
    rng = np.random.RandomState(3)
    rng.standard_normal((len(X_test), 4))  # the normal draws come first
    nu = student.predictive_dof_
    scale = np.sqrt(nu / rng.chisquare(nu, 4))
    mean = plug_in.predict(X_test)[:, None]
    np.testing.assert_allclose(draws - mean, (gaussian - mean) * scale, rtol=1e-8)


def test_one_auto_the_other_fixed(network_and_data):
    net, X, y = network_and_data
    reg = FiniteNTKRegressor(net, noise=0.05, prior_mean="zero").fit(X[:200], y[:200])
    assert reg.noise_ == 0.05
    _, gradient = reg.log_marginal_likelihood(reg.noise_, reg.prior_, eval_gradient=True)
    assert abs(gradient[1]) < 1e-4  # the prior alone maximises the evidence
    fixed_prior = FiniteNTKRegressor(net, prior=0.5, prior_mean="zero").fit(X, y)
    assert fixed_prior.prior_ == 0.5 and fixed_prior.noise_ != "auto"
    # not conjugate with one variance fixed: the Gaussian at the fitted pair
    assert reg.predictive_dof_ == fixed_prior.predictive_dof_ == np.inf
    plain = FiniteNTKRegressor(net, noise=0.05, prior=reg.prior_, prior_mean="zero")
    np.testing.assert_array_equal(
        reg.predict_std(X[:5]), plain.fit(X[:200], y[:200]).predict_std(X[:5])
    )


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_cg_evidence_optimum_is_close_to_the_dense_one(network_and_data, space):
    """With CG the evidence is a Lanczos quadrature: its optimum near the exact one."""
    net, X, y = network_and_data
    options = dict(prior_mean="zero", space=space, random_state=0)
    dense = FiniteNTKRegressor(net, solver="dense", **options).fit(X, y)
    cg = FiniteNTKRegressor(net, solver="cg", **options).fit(X, y)
    assert cg.noise_ == pytest.approx(dense.noise_, rel=0.05)
    assert cg.prior_ == pytest.approx(dense.prior_, rel=0.25)
    # the estimate of the evidence there is within its probes' error of the truth
    exact = reference_lml(net, X, y, cg.noise_, cg.prior_)
    assert abs(cg.log_marginal_likelihood_value_ - exact) < 0.01 * len(y)


def test_tiny_data_do_not_collapse_the_noise():
    """Two points the network can interpolate: ML-II puts the noise at zero; the
    hyperprior keeps it near its mode, 1% of the mean squared residual."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    )
    X = np.array([[-1.0], [1.0]])
    y = np.sin(3 * X[:, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg = FiniteNTKRegressor(net, random_state=0).fit(X, y)
    X_there = torch.as_tensor(X, device=reg.delta_.device)
    outputs = reg.network_(X_there).detach().cpu().numpy()[:, 0]
    v = np.mean((y - outputs) ** 2)
    assert 0.1 * NOISE_MODE * v < reg.noise_ < 10 * NOISE_MODE * v


def test_same_data_same_variances(network_and_data):
    """The search is deterministic: random_state=None refits give identical values."""
    net, X, y = network_and_data
    first = FiniteNTKRegressor(net).fit(X[:100], y[:100])
    second = FiniteNTKRegressor(net).fit(X[:100], y[:100])
    assert (first.noise_, first.prior_) == (second.noise_, second.prior_)


def test_stochastic_log_marginal_likelihood_estimates_the_exact_one(network_and_data):
    net, X, y = network_and_data
    reg = FiniteNTKRegressor(net, noise=0.05, prior=1.0, tol=1e-10, random_state=0)
    reg.fit(X, y)
    exact = reg.log_marginal_likelihood()
    estimate, std_error = reg.log_marginal_likelihood(
        method="stochastic", n_probes=64, lanczos_steps=80, return_std_error=True
    )
    assert reg.log_marginal_likelihood(return_std_error=True) == (exact, 0.0)
    assert 0 < std_error < 0.01 * len(y)
    assert abs(estimate - exact) < 4 * std_error + 1e-3 * len(y)
    # elsewhere, the Lanczos quadrature of the spectrum
    other = reg.log_marginal_likelihood(0.1, 2.0, method="stochastic")
    assert abs(other - reg.log_marginal_likelihood(0.1, 2.0)) < 0.01 * len(y)


def test_bad_log_marginal_likelihood_calls(network_and_data):
    net, X, y = network_and_data
    reg = FiniteNTKRegressor(net, noise=0.1, prior=1.0).fit(X[:50], y[:50])
    with pytest.raises(ValueError, match="method must be 'exact' or 'stochastic'"):
        reg.log_marginal_likelihood(method="approximate")
    with pytest.raises(ValueError, match="at the fitted noise and prior only"):
        reg.log_marginal_likelihood(0.2, return_std_error=True)


def test_large_fisher_is_factored_whatever_n(network_and_data):
    """Parameter space above eigen_size and dense_max_size, within factor_bytes and
    factor_max_cost: "auto" assembles JᵀJ and factors it (dense solver, exact
    variances), and the evidence's Lanczos runs over that matrix: the same
    quadrature as the matrix-free one (same probes), so the same optimum."""
    net, X, y = network_and_data  # n = 600 > p = 161
    small = dict(dense_max_size=16, variance_factor_max_size=16, eigen_size=16)
    options = dict(prior_mean="zero", random_state=0)
    reg = FiniteNTKRegressor(net, **options)
    reg._policy = Policy(**small)
    reg.fit(X, y)
    assert (reg.space_, reg.solver_, reg.variance_) == ("parameter", "dense", "exact")
    matrix_free = FiniteNTKRegressor(net, solver="cg", variance="low_rank", **options)
    matrix_free._policy = Policy(**small)
    matrix_free.fit(X, y)
    assert reg.noise_ == pytest.approx(matrix_free.noise_, rel=1e-6)
    assert reg.prior_ == pytest.approx(matrix_free.prior_, rel=1e-6)
    ref = reference_posterior(
        net, X, y, X[:20], noise=reg.noise_, prior=reg.prior_, prior_mean="zero"
    )
    np.testing.assert_allclose(reg.predict(X[:20]), ref.mean[:, 0], rtol=1e-8)
    scale = np.sqrt(reg.predictive_dof_ / (reg.predictive_dof_ - 2))
    np.testing.assert_allclose(reg.predict_std(X[:20]), scale * ref.std[:, 0], rtol=1e-8)


@pytest.mark.parametrize(
    "steps",
    [
        dict(evidence_quadratic_steps=3),
        dict(evidence_quadratic_steps=3, evidence_log_det_steps=4),
    ],
)
def test_unresolved_matrix_free_evidence_grows_to_its_optimum(network_and_data, steps):
    """The Lanczos evidence's terms are bracketed by their Gauss and Gauss-Radau
    quadratures: with 3 quadratic steps for p = 161 they differ by about 1700 nats
    at the optimum. The runs double their steps until they agree within a nat there,
    and the fit lands, without a warning, at the optimum of the same probes' exact
    quadrature (past p = 161 steps)."""
    net, X, y = network_and_data
    small = dict(dense_max_size=16, variance_factor_max_size=16, eigen_size=16)
    exact = FiniteNTKRegressor(net, solver="cg", random_state=0)
    exact._policy = Policy(
        evidence_quadratic_steps=161, evidence_log_det_steps=161, **small
    )
    exact.fit(X, y)
    reg = FiniteNTKRegressor(net, solver="cg", random_state=0)
    reg._policy = Policy(**steps, **small)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        reg.fit(X, y)
    assert 3 < reg._evidence.eigenvalues.numel() < 161  # the quadratic term's nodes
    assert reg._evidence.quadrature_gap(reg.noise_, reg.prior_) <= 1.0
    assert reg.noise_ == pytest.approx(exact.noise_, rel=0.01)
    assert reg.prior_ == pytest.approx(exact.prior_, rel=0.01)


def test_matrix_free_evidence_warns_where_asked_beyond_what_it_resolved(
    network_and_data,
):
    """The fit grows its runs to resolve the fitted pair (24 quadratic steps from
    3, 16 log-determinant steps from 4): log_marginal_likelihood there is quiet;
    at noise 1e-4, prior 10 the same quadrature is known only within about 1.8e6
    nats, and it says so."""
    net, X, y = network_and_data
    small = dict(dense_max_size=16, variance_factor_max_size=16, eigen_size=16)
    reg = FiniteNTKRegressor(net, solver="cg", random_state=0)
    reg._policy = Policy(evidence_quadratic_steps=3, evidence_log_det_steps=4, **small)
    reg.fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        reg.log_marginal_likelihood(reg.noise_, reg.prior_, method="stochastic")
    with pytest.warns(ConvergenceWarning, match="noise=0.0001, prior=10: its Lanczos"):
        reg.log_marginal_likelihood(1e-4, 10.0, method="stochastic")


def test_stochastic_evidence_at_the_fit_warns_with_too_few_steps(network_and_data):
    """log_marginal_likelihood(method="stochastic") at the fitted pair: its
    log-determinant's Gauss and Gauss-Radau rules (a node at σ²) bracket each
    probe's form; with 2 steps for K of order 600 they differ by more than a nat
    and it warns, with 200 steps it is quiet."""
    net, X, y = network_and_data
    reg = FiniteNTKRegressor(net, noise=0.05, prior=0.4, solver="cg", random_state=0)
    reg.fit(X, y)
    with pytest.warns(ConvergenceWarning, match="lanczos_steps=2: its Gauss"):
        reg.log_marginal_likelihood(method="stochastic", lanczos_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        reg.log_marginal_likelihood(method="stochastic", lanczos_steps=200)


@pytest.mark.parametrize(
    "limit", [dict(evidence_max_growth=1), dict(evidence_basis_bytes=161 * 8 * 3)]
)
def test_matrix_free_evidence_that_cannot_grow_warns(network_and_data, limit):
    """Where the runs may not grow (by ``evidence_max_growth``, or bases limited
    to the first 3 steps' bytes) the unresolved evidence warns, with its gap."""
    net, X, y = network_and_data
    small = dict(dense_max_size=16, variance_factor_max_size=16, eigen_size=16)
    reg = FiniteNTKRegressor(net, solver="cg", random_state=0)
    reg._policy = Policy(evidence_quadratic_steps=3, **limit, **small)
    with pytest.warns(
        ConvergenceWarning, match="the matrix-free evidence has not"
    ) as record:
        reg.fit(X, y)
    (message,) = [
        str(w.message) for w in record if "matrix-free evidence" in str(w.message)
    ]
    assert float(message.split("within ")[1].split(" nats")[0]) > 1.0


@pytest.mark.parametrize(
    "limit", [dict(factor_bytes=161 * 161 * 8 - 1), dict(factor_max_cost=1.0)]
)
def test_factor_beyond_its_limits_is_not_built(network_and_data, limit):
    """One byte or one multiply-add over: CG, and the low-rank variance."""
    net, X, y = network_and_data
    reg = FiniteNTKRegressor(net, noise=0.1, prior=1.0, random_state=0)
    reg._policy = Policy(
        dense_max_size=16, variance_factor_max_size=16, eigen_size=16, **limit
    )
    reg.fit(X, y)
    assert (reg.space_, reg.solver_, reg.variance_) == ("parameter", "cg", "low_rank")


def test_factor_that_memory_cannot_hold_is_not_the_default(network_and_data, monkeypatch):
    """With less memory than twice the p x p array, "auto" stays matrix-free (and
    the fit works) instead of a dense path the memory guard would refuse."""
    from sklearn_fntk import _base

    net, X, y = network_and_data
    monkeypatch.setattr(_base, "available_bytes", lambda device: 2 * 161 * 161 * 8 - 1)
    reg = FiniteNTKRegressor(net, noise=0.1, prior=1.0, random_state=0)
    reg._policy = Policy(dense_max_size=16, variance_factor_max_size=16, eigen_size=16)
    reg.fit(X, y)
    assert (reg.solver_, reg.variance_) == ("cg", "low_rank")
    monkeypatch.setattr(_base, "available_bytes", lambda device: 2 * 161 * 161 * 8)
    reg.fit(X, y)
    assert (reg.solver_, reg.variance_) == ("dense", "exact")
