"""sample_weight: noise precisions of the regressor, likelihood weights of the classifier.

Regressor: sample i has noise variance σ²/w_i. Its posterior is compared with the dense
reference (reference.py) for the heteroscedastic kernel s·J Jᵀ + σ² diag(1/w), and
integer weights with repeated rows. Classifier: w_i multiplies sample i's
log-likelihood; compared with the weighted Newton reference (classifier_reference.py).
"""

import functools

import numpy as np
import pytest
import torch
from classifier_reference import laplace_reference, probit_proba
from networks import cnn, mlp, no_jvp_net, regression_data
from reference import RelativeErrors, reference_jacobian, reference_posterior

from sklearn_fntk import FiniteNTKClassifier, FiniteNTKRegressor
from sklearn_fntk._inference.policy import Policy
from sklearn_fntk._linearize.jacobian import EXPLICIT_MIN_COLUMNS, JacobianProducts
from sklearn_fntk._linearize.layerwise import LayerwiseKernel
from sklearn_fntk._linearize.network import FunctionalNetwork

NOISE, PRIOR = 0.1, 0.5
BATCH_SIZE = 16  # neither n = 30 nor m = 20 is a multiple
MEAN_RTOL, STD_RTOL, LML_RTOL = 1e-6, 1e-5, 1e-6

# Largest relative errors seen (printed at the end of the module with ``-s``).
ERRORS = RelativeErrors("test_sample_weight", ["mean", "std", "lml", "repeat", "proba"])


@pytest.fixture(scope="module", autouse=True)
def _report_errors():
    yield
    print(ERRORS.report())


@pytest.fixture(autouse=True)
def cg_variances(monkeypatch):
    """Exact variances with CG by CG solves, the weighted path under test here."""
    monkeypatch.setattr(FiniteNTKRegressor, "_policy", Policy(variance_factor_max_size=0))


def assert_close(key, actual, expected, rtol):
    """Relative comparison with an absolute floor of 1e-3·rtol of the largest value."""
    actual, expected = np.asarray(actual), np.asarray(expected).reshape(np.shape(actual))
    ERRORS.record(key, actual, expected)
    atol = 1e-3 * rtol * float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def weights(n, seed=0):
    """Positive weights spanning a factor 25: strongly heteroscedastic noise."""
    return np.random.default_rng(seed).uniform(0.2, 5.0, size=n)


# -- regressor cases ----------------------------------------------------------------------

# name: (network factory, regression_data options, kernel_ in function space or with CG)
CASES = {
    "single": (lambda: mlp(n_out=1, seed=1), dict(seed=1), "layerwise"),
    "multi3": (
        lambda: mlp(n_out=3, hidden=10, seed=2),
        dict(n_outputs=3, seed=2),
        "layerwise",
    ),
    "cnn": (lambda: cnn(seed=3), dict(image=True, seed=3), "autodiff"),
    "no_jvp": (lambda: no_jvp_net(n_out=2, seed=4), dict(n_outputs=2, seed=4), "autodiff"),
}


@functools.cache
def case(name):
    """(network, X, y, X_test, weights); y is 1-D for one output."""
    factory, options, _ = CASES[name]
    X, Y, X_test = regression_data(**options)
    y = Y[:, 0] if Y.shape[1] == 1 else Y
    return factory(), X, y, X_test, weights(len(X), seed=options["seed"])


@functools.cache
def reference(name):
    net, X, y, X_test, w = case(name)
    return reference_posterior(net, X, y, X_test, noise=NOISE, prior=PRIOR, weights=w)


def regressor(net, **params):
    defaults = dict(
        noise=NOISE,
        prior=PRIOR,
        tol=1e-12,
        batch_size=BATCH_SIZE,
        variance="exact",
        random_state=0,
    )
    return FiniteNTKRegressor(net, **{**defaults, **params})


def _grid():
    for name in CASES:
        for space in ("function", "parameter"):
            for solver in ("dense", "cg"):
                yield pytest.param(name, space, solver, id=f"{name}-{space}-{solver}")


@functools.cache
def fitted(name, space, solver):
    net, X, y, _, w = case(name)
    return regressor(net, space=space, solver=solver).fit(X, y, sample_weight=w)


@pytest.mark.parametrize("name, space, solver", list(_grid()))
def test_regressor_matches_heteroscedastic_reference(name, space, solver):
    _, _, _, X_test, _ = case(name)
    ref = reference(name)
    est = fitted(name, space, solver)
    assert (est.space_, est.solver_) == (space, solver)
    assert est.kernel_ == CASES[name][2]  # per-layer features where they apply
    mean, std = est.predict(X_test, return_std=True)
    assert_close("mean", mean, ref.mean, MEAN_RTOL)
    assert_close("std", std, ref.std, STD_RTOL)
    assert_close("lml", est.log_marginal_likelihood(), ref.lml, LML_RTOL)


@pytest.mark.parametrize("name", ["single", "cnn"])
def test_regressor_with_preconditioners_matches_reference(name):
    """Nyström (both spaces) and pivoted Cholesky / Jacobi (function space) on the
    scaled system, with the low-rank variance sketch built from the same products."""
    net, X, y, X_test, w = case(name)
    ref = reference(name)
    for space, preconditioner in [
        ("parameter", "nystrom"),
        ("function", "nystrom"),
        ("function", "pivoted_cholesky"),
        ("function", "jacobi"),
    ]:
        est = regressor(net, space=space, solver="cg", preconditioner=preconditioner)
        est.fit(X, y, sample_weight=w)
        mean, std = est.predict(X_test, return_std=True)
        assert_close("mean", mean, ref.mean, MEAN_RTOL)
        assert_close("std", std, ref.std, STD_RTOL)
    # the low-rank variance never underestimates the exact one
    est = regressor(net, space="parameter", solver="cg", variance="low_rank", rank=200)
    std = est.fit(X, y, sample_weight=w).predict(X_test, return_std=True)[1]
    assert np.all(std >= ref.std.reshape(std.shape) * (1 - 1e-8))
    assert_close("mean", est.predict(X_test), ref.mean, MEAN_RTOL)


def test_finite_difference_fisher_product_is_weighted():
    net, X, y, X_test, w = case("single")
    est = regressor(net, space="parameter", solver="cg", fisher_product="finite_difference")
    mean, std = est.fit(X, y, sample_weight=w).predict(X_test, return_std=True)
    # O(√eps) per product in float64
    np.testing.assert_allclose(mean, reference("single").mean[:, 0], rtol=1e-5)
    np.testing.assert_allclose(std, reference("single").std[:, 0], rtol=1e-5)


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_stochastic_log_marginal_likelihood_is_weighted(space):
    """The matrix-free estimate carries the same ½·k·Σ log w as the exact value."""
    est = fitted("multi3", space, "dense")
    exact = est.log_marginal_likelihood()
    estimate, std_error = est.log_marginal_likelihood(
        method="stochastic", n_probes=64, lanczos_steps=80, return_std_error=True
    )
    n = len(case("multi3")[1])
    assert abs(estimate - exact) < 4 * std_error + 1e-3 * n


def test_scaled_products_match_explicit_jacobian():
    """JacobianProducts(row_scale) and LayerwiseKernel(row_scale) are diag(√w) J."""
    net, X, _, _, w = case("multi3")
    _, J = reference_jacobian(net, X)
    k = J.shape[0] // len(X)
    scale = torch.as_tensor(np.sqrt(w))
    J_scaled = scale.repeat_interleave(k)[:, None] * J
    network = FunctionalNetwork(net, None, dtype=torch.float64, device="cpu")
    Xt = torch.as_tensor(X)
    generator = torch.Generator().manual_seed(0)
    n_columns = EXPLICIT_MIN_COLUMNS * k  # enough for the explicit blocks
    V = torch.randn(J.shape[1], n_columns, dtype=torch.float64, generator=generator)
    U = torch.randn(len(X), k, n_columns, dtype=torch.float64, generator=generator)
    for cache_bytes in (0, 1 << 30):
        products = JacobianProducts(
            network,
            network.theta,
            Xt,
            batch_size=BATCH_SIZE,
            cache_bytes=cache_bytes,
            row_scale=scale,
        )
        # one column takes the JVP / VJP path, all of them the explicit blocks
        assert products._explicit_is_cheaper(n_columns)
        for columns in (slice(0, 1), slice(None)):
            JV = products.jvp(V[:, columns]).reshape(-1, V[:, columns].shape[1])
            torch.testing.assert_close(JV, J_scaled @ V[:, columns], rtol=1e-10, atol=1e-12)
            JtU = products.vjp(U[..., columns])
            expected = J_scaled.T @ U[..., columns].reshape(J.shape[0], -1)
            torch.testing.assert_close(JtU, expected, rtol=1e-10, atol=1e-12)
        fisher = products.fisher_product_fd(V[:, :3])
        torch.testing.assert_close(
            fisher, J_scaled.T @ J_scaled @ V[:, :3], rtol=1e-5, atol=0
        )
    kernel = LayerwiseKernel(network, Xt, batch_size=BATCH_SIZE, row_scale=scale)
    torch.testing.assert_close(
        kernel.dense(), J_scaled @ J_scaled.T, rtol=1e-10, atol=1e-12
    )
    # other inputs are never scaled
    torch.testing.assert_close(
        kernel.diagonal(kernel.features(Xt)), (J**2).sum(1), rtol=1e-10, atol=1e-12
    )


# -- integer weights, zero weights, unit weights ------------------------------------------


def _equivalent_fits(name, space, solver, w, X_equivalent, y_equivalent, **params):
    """(mean, std, log evidence) of the fit with weights w and of the plain fit on
    (X_equivalent, y_equivalent), both with ``params``."""
    net, X, y, X_test, _ = case(name)
    params.update(space=space, solver=solver)
    weighted = regressor(net, **params).fit(X, y, sample_weight=w)
    plain = regressor(net, **params).fit(X_equivalent, y_equivalent)
    return [
        (*est.predict(X_test, return_std=True), est.log_marginal_likelihood())
        for est in (weighted, plain)
    ]


@pytest.mark.parametrize("name", ["single", "no_jvp"])
@pytest.mark.parametrize("space, solver", [("function", "dense"), ("parameter", "cg")])
def test_integer_weights_are_repeated_rows(name, space, solver):
    """Same mean and std; the evidence differs (the repeats' noises are independent)."""
    _, X, y, _, _ = case(name)
    w = np.random.default_rng(5).integers(1, 4, size=len(X))
    weighted, repeated = _equivalent_fits(
        name, space, solver, w, np.repeat(X, w, axis=0), np.repeat(y, w, axis=0)
    )
    assert_close("repeat", weighted[0], repeated[0], 1e-9)
    assert_close("repeat", weighted[1], repeated[1], 1e-9)


@pytest.mark.parametrize("prior_mean", ["network", "zero"])
def test_integer_weights_are_repeated_rows_with_normalize_y(prior_mean):
    """normalize_y standardizes y by its weighted mean and std, those of the
    repeated rows (unweighted, the std differed by 5% and the mean by 2e-3)."""
    _, X, y, _, _ = case("single")
    w = np.random.default_rng(5).integers(1, 8, size=len(X))
    weighted, repeated = _equivalent_fits(
        "single", "function", "dense", w, np.repeat(X, w, axis=0),
        np.repeat(y, w, axis=0), normalize_y=True, prior_mean=prior_mean,
    )  # fmt: skip
    assert_close("repeat", weighted[0], repeated[0], 1e-9)
    assert_close("repeat", weighted[1], repeated[1], 1e-9)


@pytest.mark.parametrize("name", ["single", "cnn"])
def test_zero_weights_remove_rows(name):
    _, X, y, _, _ = case(name)
    w = np.ones(len(X))
    w[::3] = 0.0
    weighted, kept = _equivalent_fits(name, "function", "dense", w, X[w > 0], y[w > 0])
    # the zero-weight samples are dropped before anything is computed
    for a, b in zip(weighted, kept, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["single", "cnn"])
@pytest.mark.parametrize("space, solver", [("function", "cg"), ("parameter", "dense")])
def test_unit_weights_change_nothing(name, space, solver):
    _, X, y, _, _ = case(name)
    ones, plain = _equivalent_fits(name, space, solver, np.ones(len(X)), X, y)
    for a, b in zip(ones, plain, strict=True):
        np.testing.assert_array_equal(a, b)


def test_log_marginal_likelihood_of_uniform_weights():
    """All weights 2 at noise σ² is the model with noise σ²/2: the same evidence (the
    ½·k·Σ log w term undoes the scaling of the rows)."""
    net, X, y, _, _ = case("single")
    w = np.full(len(X), 2.0)
    weighted = regressor(net).fit(X, y, sample_weight=w).log_marginal_likelihood()
    halved = regressor(net, noise=NOISE / 2).fit(X, y).log_marginal_likelihood()
    np.testing.assert_allclose(weighted, halved, rtol=1e-12)


# -- noise="auto" -------------------------------------------------------------------------


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_auto_noise_recovers_heteroscedastic_noise(space):
    """Noise std 0.1/√w_i, known up to the global σ²: the evidence finds σ² ≈ 0.01.

    The targets are drawn from the linearized model itself (prior draw plus noise),
    so the model is right and only the noise level is to be found.
    """
    n = 600
    rng = np.random.default_rng(0)
    net = mlp(n_in=3, n_out=1, hidden=12, seed=7)
    X = rng.normal(size=(n, 3))
    f, J = reference_jacobian(net, X)
    delta = rng.normal(size=J.shape[1])
    w = rng.uniform(0.1, 10.0, size=n)
    y = f.numpy()[:, 0] + J.numpy() @ delta + 0.1 / np.sqrt(w) * rng.normal(size=n)
    options = dict(space=space, random_state=0)
    weighted = FiniteNTKRegressor(net, **options).fit(X, y, sample_weight=w)
    assert abs(weighted.noise_ - 0.01) < 0.2 * 0.01
    # without the weights the noise is about the average of 0.01/w_i: far from 0.01
    plain = FiniteNTKRegressor(net, **options).fit(X, y)
    assert abs(plain.noise_ - 0.01) > 0.4 * 0.01
    # the reported evidence is that of the weighted model at the optimum
    ref = reference_posterior(
        net, X, y, X[:2], noise=weighted.noise_, prior=weighted.prior_, weights=w
    )
    np.testing.assert_allclose(weighted.log_marginal_likelihood(), ref.lml, rtol=1e-8)


# -- classifier ---------------------------------------------------------------------------


def blobs(n, n_classes, seed=0):
    rng = np.random.default_rng(seed)
    centers = 1.5 * rng.normal(size=(n_classes, 2))
    y = np.arange(n) % n_classes
    return centers[y] + rng.normal(size=(n, 2)), y


CLASSIFIER_PATHS = [
    dict(space="parameter", solver="dense"),
    dict(space="function", solver="dense"),
    dict(space="parameter", solver="cg", preconditioner="jacobi"),
    dict(space="function", solver="cg", preconditioner="nystrom"),
]


@pytest.mark.parametrize(
    "n_classes, n_logits", [(3, 3), (2, 1)], ids=["3 logits", "1 logit"]
)
def test_classifier_matches_weighted_reference(n_classes, n_logits):
    X, y = blobs(60, n_classes)
    X_test, _ = blobs(20, n_classes, seed=1)
    net = mlp(n_in=2, n_out=n_logits)
    w = weights(len(X), seed=3)
    ref = laplace_reference(net, X, y, X_test, prior=2.0, weights=w)
    expected = probit_proba(ref["mean"], ref["cov"])
    unweighted = laplace_reference(net, X, y, X_test, prior=2.0)
    # the weights matter: without them the answer is clearly different
    assert (
        np.abs(probit_proba(unweighted["mean"], unweighted["cov"]) - expected).max() > 1e-2
    )
    for path in CLASSIFIER_PATHS:
        clf = FiniteNTKClassifier(
            net, prior=2.0, link="probit", tol=1e-10, random_state=0, **path
        )
        clf._policy = Policy(probit_error=None)  # the exact probit link
        clf.fit(X, y, sample_weight=w)
        np.testing.assert_allclose(
            clf.delta_.cpu().numpy(), ref["delta"], rtol=1e-6, atol=1e-9
        )
        assert_close("proba", clf.predict_proba(X_test), expected, 1e-6)


@pytest.mark.parametrize("path", CLASSIFIER_PATHS[:2], ids=["parameter", "function"])
def test_classifier_integer_weights_are_repeated_rows(path):
    X, y = blobs(40, 3)
    net = mlp(n_in=2, n_out=3)
    w = np.random.default_rng(2).integers(0, 4, size=len(X))
    options = dict(link="probit", tol=1e-10, random_state=0, **path)
    weighted = FiniteNTKClassifier(net, **options).fit(X, y, sample_weight=w)
    repeated = FiniteNTKClassifier(net, **options).fit(
        np.repeat(X, w, axis=0), np.repeat(y, w)
    )
    # the Laplace evidence of prior="auto" too: its maximiser is the same
    assert weighted.prior_ == pytest.approx(repeated.prior_, rel=1e-8)
    assert weighted.log_marginal_likelihood() == pytest.approx(
        repeated.log_marginal_likelihood(), rel=1e-10
    )
    assert_close("repeat", weighted.predict_proba(X), repeated.predict_proba(X), 1e-8)


def test_classifier_unit_weights_change_nothing():
    X, y = blobs(40, 3)
    net = mlp(n_in=2, n_out=3)
    ones = FiniteNTKClassifier(net).fit(X, y, sample_weight=np.ones(len(X)))
    plain = FiniteNTKClassifier(net).fit(X, y)
    np.testing.assert_array_equal(ones.predict_proba(X), plain.predict_proba(X))


def test_classes_are_those_of_the_samples_kept():
    X, y = blobs(30, 3)
    w = (y != 2).astype(float)
    clf = FiniteNTKClassifier(mlp(n_in=2, n_out=1)).fit(X, y, sample_weight=w)
    np.testing.assert_array_equal(clf.classes_, [0, 1])


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", [FiniteNTKRegressor, FiniteNTKClassifier])
def test_bad_sample_weight(estimator):
    X, y = blobs(30, 2)
    est = estimator(mlp(n_in=2, n_out=1))
    w = np.ones(len(X))
    w[3] = -1.0
    with pytest.raises(
        ValueError, match="Negative values in data passed to `sample_weight`"
    ):
        est.fit(X, y, sample_weight=w)
    with pytest.raises(
        ValueError, match=r"sample_weight.shape == \(29,\), expected \(30,\)"
    ):
        est.fit(X, y, sample_weight=np.ones(29))
    with pytest.raises(
        ValueError, match="Sample weights must contain at least one non-zero"
    ):
        est.fit(X, y, sample_weight=np.zeros(len(X)))
    with pytest.raises(ValueError, match="Input sample_weight contains NaN"):
        est.fit(X, y, sample_weight=np.full(len(X), np.nan))
