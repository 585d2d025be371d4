"""FiniteNTKRegressor against the independent dense float64 reference (reference.py)."""

import copy
import functools
import pickle
import warnings

import numpy as np
import pytest
import torch
from networks import (
    TokenBag,
    batchnorm_dropout_net,
    cnn,
    mlp,
    regression_data,
    token_data,
)
from reference import RelativeErrors, reference_jacobian, reference_posterior
from sklearn.metrics import r2_score

from sklearn_fntk import FiniteNTKRegressor
from sklearn_fntk._inference.policy import Policy

NOISE, PRIOR = 0.1, 0.5
# Chunks of 16 samples: neither n=30 nor m=20 is a multiple.
BATCH_SIZE = 16
MEAN_RTOL, STD_RTOL, LML_RTOL = 1e-6, 1e-5, 1e-6
# Exact variances by CG solves, not by the dense factor the small cases would get.
CG_VARIANCES = Policy(variance_factor_max_size=0, factor_bytes=0)

# Largest relative errors seen (printed at the end of the module with ``-s``).
ERRORS = RelativeErrors("test_regressor", ["mean", "std", "lml"])
_record = ERRORS.record


@pytest.fixture(scope="module", autouse=True)
def _report_errors():
    yield
    print(ERRORS.report())


def assert_close(actual, expected, rtol):
    """Relative comparison, with an absolute floor well below the data's scale."""
    expected = np.asarray(expected)
    atol = 1e-3 * rtol * float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# -- cases ------------------------------------------------------------------------------


@functools.cache
def case(name):
    """(network, X, y, X_test, parameters) for a named case."""
    if name == "single":
        X, Y, X_test = regression_data(seed=1)
        return mlp(n_out=1, seed=1), X, Y[:, 0], X_test, None
    if name == "multi3":
        X, Y, X_test = regression_data(n_outputs=3, seed=2)
        return mlp(n_out=3, hidden=10, seed=2), X, Y, X_test, None
    if name == "cnn":
        X, Y, X_test = regression_data(image=True, seed=3)
        return cnn(seed=3), X, Y[:, 0], X_test, None
    if name == "last_layer":
        X, Y, X_test = regression_data(n_outputs=2, seed=4)
        return mlp(n_out=2, hidden=16, seed=4), X, Y, X_test, ["2.weight", "2.bias"]
    if name == "batchnorm":
        X, Y, X_test = regression_data(seed=5)
        return batchnorm_dropout_net(seed=5), X, Y[:, 0], X_test, None
    if name == "tokens":  # integer X, taken as indices
        X, Y, X_test = token_data(n_outputs=2, seed=6)
        return TokenBag(n_out=2, seed=6), X, Y, X_test, None
    raise KeyError(name)


CASES = ["single", "multi3", "cnn", "last_layer", "batchnorm", "tokens"]


@functools.cache
def reference(name, prior_mean="network"):
    net, X, y, X_test, parameters = case(name)
    return reference_posterior(
        net,
        X,
        y,
        X_test,
        noise=NOISE,
        prior=PRIOR,
        prior_mean=prior_mean,
        parameters=parameters,
    )


def make(name, **params):
    net, _, _, _, parameters = case(name)
    defaults = dict(
        noise=NOISE,
        prior=PRIOR,
        parameters=parameters,
        tol=1e-12,
        batch_size=BATCH_SIZE,
        dtype="float64",
    )
    return FiniteNTKRegressor(net, **{**defaults, **params})


def make_solver(name, space, solver, **params):
    """Plain CG (no preconditioner) with exact variances, or the dense solver."""
    if solver == "cg":
        params = {"preconditioner": None, "variance": "exact", **params}
    return make(name, space=space, solver=solver, **params)


@functools.cache
def fitted(name, prior_mean="network", space="function", solver="dense"):
    _, X, y, _, _ = case(name)
    return make_solver(name, space, solver, prior_mean=prior_mean).fit(X, y)


def as_2d(array, m):
    return np.asarray(array).reshape(m, -1)


def n_test(solver):
    """Test points to predict at: CG variances solve one system per test row (and
    output), so the CG cases use fewer (the reference rows are independent)."""
    return 20 if solver == "dense" else 10


# -- mean, std, log marginal likelihood ------------------------------------------------


def _grid():
    # The full cross product: case x prior mean x space x solver.
    for name in CASES:
        for prior_mean in ("network", "zero"):
            for space in ("function", "parameter"):
                for solver in ("dense", "cg"):
                    yield pytest.param(
                        name,
                        prior_mean,
                        space,
                        solver,
                        id=f"{name}-{prior_mean}-{space}-{solver}",
                    )


GRID = list(_grid())


@pytest.mark.parametrize("name, prior_mean, space, solver", GRID)
def test_mean_and_std_match_reference(name, prior_mean, space, solver):
    _, _, y, X_test, _ = case(name)
    m = n_test(solver)
    X_test = X_test[:m]
    ref = reference(name, prior_mean)
    est = fitted(name, prior_mean, space, solver)
    assert (est.space_, est.solver_) == (space, solver)
    mean, std = est.predict(X_test, return_std=True)
    # 1-D y gives 1-D predictions; (n, k) y gives (m, k).
    expected_shape = (m,) if y.ndim == 1 else (m, y.shape[1])
    assert mean.shape == expected_shape and std.shape == expected_shape
    _record("mean", as_2d(mean, m), ref.mean[:m])
    _record("std", as_2d(std, m), ref.std[:m])
    assert_close(as_2d(mean, m), ref.mean[:m], MEAN_RTOL)
    assert_close(as_2d(std, m), ref.std[:m], STD_RTOL)
    # predict without return_std gives the same mean.
    assert_close(est.predict(X_test), mean, 1e-12)


@pytest.mark.parametrize("name, prior_mean, space, solver", GRID)
def test_log_marginal_likelihood_matches_reference(name, prior_mean, space, solver):
    ref = reference(name, prior_mean)
    lml = fitted(name, prior_mean, space, solver).log_marginal_likelihood()
    _record("lml", lml, ref.lml)
    np.testing.assert_allclose(lml, ref.lml, rtol=LML_RTOL)


def test_prior_mean_changes_the_answer():
    """The two prior means are different models (guards the grid against a no-op)."""
    _, _, _, X_test, _ = case("single")
    a = fitted("single", "network").predict(X_test)
    b = fitted("single", "zero").predict(X_test)
    assert np.max(np.abs(a - b)) > 1e-3


def test_batchnorm_network_is_evaluated_in_eval_mode():
    """The reference (eval mode) differs from the train-mode outputs of the module."""
    net, X, _, _, _ = case("batchnorm")
    assert net.training
    est = fitted("batchnorm", "network")
    with torch.no_grad():
        eval_out = copy.deepcopy(net).double().eval()(torch.as_tensor(X)).numpy()
        train_out = copy.deepcopy(net).double().train()(torch.as_tensor(X)).numpy()
    assert np.max(np.abs(eval_out - train_out)) > 1e-2
    assert not est.network_.training
    assert all(not module.training for module in est.network_.modules())


# -- covariance, noise, sampling, score ------------------------------------------------


@pytest.mark.parametrize("space", ["function", "parameter"])
@pytest.mark.parametrize("solver", ["dense", "cg"])
@pytest.mark.parametrize("name", ["single", "multi3"])
def test_return_cov_matches_reference_blocks(name, space, solver):
    _, _, y, X_test, _ = case(name)
    ref = reference(name)
    est = fitted(name, "network", space, solver)
    m, k = n_test(solver), ref.mean.shape[1]
    mean, cov = est.predict(X_test[:m], return_cov=True)
    M = X_test.shape[0]
    blocks = ref.cov.reshape(M, k, M, k)[:m, :, :m, :]
    if y.ndim == 1:
        assert mean.shape == (m,)
        assert cov.shape == (m, m)
        expected = blocks[:, 0, :, 0]
    else:
        assert mean.shape == (m, k)
        assert cov.shape == (m, m, k)
        expected = np.stack([blocks[:, a, :, a] for a in range(k)], axis=-1)
    assert_close(as_2d(mean, m), ref.mean[:m], MEAN_RTOL)
    # Covariances have off-diagonal entries near zero: compare against the scale of
    # the variances.
    np.testing.assert_allclose(
        cov, expected, rtol=STD_RTOL, atol=1e-7 * np.abs(expected).max()
    )


@pytest.mark.parametrize("name", ["single", "multi3"])
def test_predict_std_include_noise(name):
    _, _, _, X_test, _ = case(name)
    ref = reference(name)
    est = fitted(name)
    m = X_test.shape[0]
    noisy = as_2d(est.predict_std(X_test, include_noise=True), m)
    assert_close(noisy, np.sqrt(ref.std**2 + NOISE), STD_RTOL)
    latent = as_2d(est.predict_std(X_test, include_noise=False), m)
    assert_close(latent, ref.std, STD_RTOL)


@pytest.mark.parametrize("name", ["single", "multi3"])
def test_sample_y_shapes(name):
    _, _, y, X_test, _ = case(name)
    est = fitted(name)
    m = X_test.shape[0]
    draws = est.sample_y(X_test, n_samples=5, random_state=0)
    if y.ndim == 1:
        assert draws.shape == (m, 5)
        assert est.sample_y(X_test).shape == (m, 1)
    else:
        assert draws.shape == (m, y.shape[1], 5)
        assert est.sample_y(X_test).shape == (m, y.shape[1], 1)
    np.testing.assert_array_equal(draws, est.sample_y(X_test, n_samples=5, random_state=0))
    assert not np.array_equal(draws, est.sample_y(X_test, n_samples=5, random_state=1))


@pytest.mark.parametrize("name", ["single", "multi3"])
def test_sample_y_mean_and_std_approach_the_posterior(name):
    _, _, y, X_test, _ = case(name)
    ref = reference(name)
    est = fitted(name)
    n_samples = 4000
    draws = est.sample_y(X_test, n_samples=n_samples, random_state=0)
    m, k = ref.mean.shape
    draws = draws.reshape(m, k, n_samples)
    # The sample mean has std std/sqrt(N): allow 5 of those (plus a tiny floor).
    sample_mean = draws.mean(axis=-1)
    bound = 5 * ref.std / np.sqrt(n_samples) + 1e-9
    assert np.all(np.abs(sample_mean - ref.mean) <= bound)
    # The sample std has relative std about 1/sqrt(2N).
    sample_std = draws.std(axis=-1)
    np.testing.assert_allclose(
        sample_std, ref.std, rtol=5 / np.sqrt(2 * n_samples), atol=1e-9
    )


@pytest.mark.parametrize("name", ["single", "multi3"])
def test_score_is_r2(name):
    _, X, y, X_test, _ = case(name)
    ref = reference(name)
    est = fitted(name)
    rng = np.random.default_rng(0)
    y_test = ref.mean + 0.3 * rng.normal(size=ref.mean.shape)
    if y.ndim == 1:
        y_test = y_test[:, 0]
    expected = r2_score(y_test, ref.mean.reshape(y_test.shape))
    np.testing.assert_allclose(est.score(X_test, y_test), expected, rtol=1e-8)
    # And on the training data against the training predictions.
    np.testing.assert_allclose(est.score(X, y), r2_score(y, est.predict(X)), rtol=1e-12)


# -- preconditioner, precision, solver bookkeeping -------------------------------------


@pytest.mark.parametrize("space", ["function", "parameter"])
@pytest.mark.parametrize("name", ["multi3", "cnn", "batchnorm"])
def test_jacobi_preconditioner_gives_the_same_answer(name, space):
    _, X, y, X_test, _ = case(name)
    ref = reference(name)
    est = make_solver(name, space, "cg", preconditioner="jacobi").fit(X, y)
    m = n_test("cg")
    mean, std = est.predict(X_test[:m], return_std=True)
    assert_close(as_2d(mean, m), ref.mean[:m], MEAN_RTOL)
    assert_close(as_2d(std, m), ref.std[:m], STD_RTOL)
    np.testing.assert_allclose(est.log_marginal_likelihood(), ref.lml, rtol=LML_RTOL)
    assert est.n_iter_ > 1


@pytest.mark.parametrize("name", ["multi3", "cnn", "batchnorm"])
def test_finite_difference_fisher_product_agrees_with_reference(name):
    """Parameter-space CG on the paper's finite-difference Fisher-vector products."""
    _, X, y, X_test, _ = case(name)
    ref = reference(name)
    est = make_solver(
        name, "parameter", "cg", fisher_product="finite_difference", tol=1e-10
    ).fit(X, y)
    assert not est._posterior.operator.jacobian.cached  # it runs its own passes
    m = n_test("cg")
    mean, std = est.predict(X_test[:m], return_std=True)
    # O(√eps) per product in float64
    assert_close(as_2d(mean, m), ref.mean[:m], 1e-5)
    assert_close(as_2d(std, m), ref.std[:m], 1e-5)


def test_finite_difference_fisher_product_warns_in_float32():
    _, X, y, _, _ = case("single")
    est = make_solver(
        "single", "parameter", "cg", fisher_product="finite_difference",
        dtype="float32", tol=1e-4,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="fisher_product='exact' or dtype='float64'"):
        est.fit(X, y)
    # Not with the exact product, nor where the product is not used.
    for params in [
        dict(fisher_product="exact"),
        dict(fisher_product="finite_difference", solver="dense"),
    ]:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="fisher_product=")
            est.set_params(**params).fit(X, y)


@pytest.mark.parametrize(
    "name, space, solver",
    [
        ("multi3", "function", "dense"),
        ("multi3", "parameter", "dense"),
        ("multi3", "function", "cg"),
        ("multi3", "parameter", "cg"),
        ("cnn", "function", "dense"),
        ("cnn", "parameter", "cg"),
    ],
)
def test_float32_agrees_loosely(name, space, solver):
    _, X, y, X_test, _ = case(name)
    ref = reference(name)
    est = make_solver(name, space, solver, dtype="float32", tol=1e-6).fit(X, y)
    m = n_test(solver)
    mean, std = est.predict(X_test[:m], return_std=True)
    assert mean.dtype == np.float64  # outputs are numpy float64 whatever the dtype
    assert est.delta_.dtype == torch.float32
    assert_close(as_2d(mean, m), ref.mean[:m], 1e-3)
    assert_close(as_2d(std, m), ref.std[:m], 1e-3)
    np.testing.assert_allclose(est.log_marginal_likelihood(), ref.lml, rtol=1e-3)


def test_float32_normalize_y_keeps_a_small_signal_on_a_large_offset():
    """normalize_y standardizes y before it is rounded to float32, and adds the
    offset back in float64: y = 1e6 + 0.1·signal keeps float32's relative accuracy
    in the signal's units. Rounded first, y and the predicted means were multiples
    of 0.0625 (ε₃₂·1e6), about the signal's std."""
    X, Y, X_test = regression_data(n=60)
    y = 1e6 + 0.1 * Y[:, 0]
    loc, scale = y.mean(), y.std()
    options = dict(noise=NOISE, prior=PRIOR, prior_mean="zero", normalize_y=True)
    model = FiniteNTKRegressor(mlp(), dtype="float32", **options).fit(X, y)
    mean, std = model.predict(X_test, return_std=True)
    ref = reference_posterior(
        mlp(), X, (y - loc) / scale, X_test, noise=NOISE, prior=PRIOR, prior_mean="zero"
    )
    expected = ref.mean[:, 0] * scale + loc
    np.testing.assert_allclose(mean, expected, rtol=0, atol=1e-3 * scale)
    np.testing.assert_allclose(std, ref.std[:, 0] * scale, rtol=1e-3)


@pytest.mark.parametrize("space", ["function", "parameter"])
@pytest.mark.parametrize("name", ["multi3", "cnn"])
def test_cg_with_default_preconditioner(name, space):
    """preconditioner="auto" (pivoted Cholesky or Nyström) changes nothing but speed."""
    _, X, y, X_test, _ = case(name)
    ref = reference(name)
    est = make(name, space=space, solver="cg", variance="exact").fit(X, y)
    m = n_test("cg")
    mean = est.predict(X_test[:m])
    fit_rank = est.rank_
    std = est.predict_std(X_test[:m])
    if est.preconditioner_ == "pivoted_cholesky":
        # Stopped for the fit's one solve; resumed for the std's many (to J's rank).
        assert 0 < fit_rank < est._posterior.system.preconditioner.rank
    assert_close(as_2d(mean, m), ref.mean[:m], MEAN_RTOL)
    assert_close(as_2d(std, m), ref.std[:m], STD_RTOL)
    np.testing.assert_allclose(est.log_marginal_likelihood(), ref.lml, rtol=LML_RTOL)


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_cg_variance_is_accurate_to_tol_despite_cancellation(space):
    """CG variances stop on the variance's accuracy, not on the residual.

    With noise 1e-6 the prior variance exceeds the posterior's 1.4e3- to 1.6e6-fold
    here (function space: prior - cross·K⁻¹cross). Stopping on the relative
    residual at tol=1e-3 left a std error of 1.7e-3 in function space (2.0e-5 now);
    the variance rule bounds the variance's error by tol, so the std's by tol/2.
    """
    name, noise, tol = "single", 1e-6, 1e-3
    net, X, y, X_test, parameters = case(name)
    ref = reference_posterior(
        net, X, y, X_test, noise=noise, prior=PRIOR, prior_mean="network",
        parameters=parameters,
    )  # fmt: skip
    est = make(name, space=space, solver="cg", variance="exact", noise=noise, tol=tol)
    est._policy = CG_VARIANCES
    m = n_test("cg")
    _, std = est.fit(X, y).predict(X_test[:m], return_std=True)
    assert est._posterior.variance_system.factor is None  # by CG, not a dense factor
    error = np.max(np.abs(as_2d(std, m) / ref.std[:m] - 1))
    print(f"{space}: largest relative std error {error:.2e}")
    assert error <= tol / 2
    # The joint covariance: errors within tol·√(v_i v_j) (function space: 4.9e-1 by
    # the residual rule and b_iᵀz_j, 4.1e-5 with the symmetric form).
    _, cov = est.predict(X_test[:m], return_cov=True)
    expected = ref.cov[:m, :m]
    scale = np.sqrt(np.outer(np.diag(expected), np.diag(expected)))
    error = np.max(np.abs(cov - expected) / scale)
    print(f"{space}: largest covariance error / sqrt(v_i v_j) {error:.2e}")
    assert error <= tol


@pytest.mark.parametrize("preconditioner", [None, "jacobi"])
def test_cg_variance_is_accurate_to_tol_where_cg_loses_orthogonality(preconditioner):
    """Function-space CG variances are within tol at tol=1e-6 too.

    prior - bᵀz, with z the CG iterate for b, is the variance only while z's
    residual r stays orthogonal to z (Galerkin); after a few hundred iterations in
    float64 it is not, and the error zᵀr, either sign, is far above the rule's
    ‖r‖²/μ. Here (n=300, noise 1e-2) the variance was 1.7e-4 off (relative) with no
    preconditioner and 9.4e-5 with Jacobi, against tol=1e-6; the symmetric form
    2bᵀz - zᵀAz, off by exactly eᵀAe ≤ ‖r‖²/μ, gives 4.8e-7 and 5.7e-7.
    """
    X, Y, X_test = regression_data(n=300, m=10, seed=7)
    net, tol, noise = mlp(seed=7, hidden=16), 1e-6, 1e-2
    ref = reference_posterior(net, X, Y, X_test, noise=noise, prior=1.0)
    est = FiniteNTKRegressor(
        net, noise=noise, prior=1.0, solver="cg", space="function",
        preconditioner=preconditioner, variance="exact", tol=tol,
    )  # fmt: skip
    est._policy = CG_VARIANCES
    _, std = est.fit(X, Y[:, 0]).predict(X_test, return_std=True)
    assert est._posterior.variance_system.factor is None
    error = np.max(np.abs(std**2 / ref.std[:, 0] ** 2 - 1))
    print(f"{preconditioner}: largest relative variance error {error:.2e}")
    assert error <= tol


def _check_low_rank_variance(space, rank, random_state):
    name = "single"
    net, X, y, X_test, parameters = case(name)
    ref = reference(name)
    est = make(
        name,
        space=space,
        solver="cg",
        variance="low_rank",
        rank=rank,
        random_state=random_state,
    ).fit(X, y)
    assert est.variance_ == "low_rank"
    assert 0 < est.rank_ and 0 <= est.variance_tail_weight_ <= 1
    variance = est.predict_std(X_test) ** 2
    exact = ref.std[:, 0] ** 2
    _, J_test = reference_jacobian(net, X_test, parameters)
    prior_variance = PRIOR * (J_test**2).sum(1).numpy()
    rounding = 1e-9 * prior_variance
    # Documented: never below the exact variance; and here the overestimate stays
    # within prior · w · ‖J(x)‖², w the weight of the last direction kept.
    assert np.all(variance >= exact - rounding), np.min((variance - exact) / exact)
    assert np.all(variance - exact <= est.variance_tail_weight_ * prior_variance + rounding)
    # The mean does not depend on the variance method.
    assert_close(est.predict(X_test), ref.mean[:, 0], MEAN_RTOL)


@pytest.fixture(autouse=True)
def cg_variances(monkeypatch):
    """Exact variances with CG by CG solves (the path under test here), not from the
    dense factor that ``variance_factor_max_size`` allows (tested on its own)."""
    monkeypatch.setattr(FiniteNTKRegressor, "_policy", Policy(variance_factor_max_size=0))


@pytest.fixture
def sketched(monkeypatch):
    """Force the Nyström-sketch path of the low-rank variance (no exact eigh)."""
    policy = Policy(eigen_size=0, variance_factor_max_size=0)
    monkeypatch.setattr(FiniteNTKRegressor, "_policy", policy)


# The Nyström sketch is random (seeded by random_state); the parameter-space seeds
# below are ones where an earlier Rayleigh-Ritz step underestimated the variance.
@pytest.mark.parametrize("rank, random_state", [(None, 0), (None, 2), (10, 0)])
def test_sketched_low_rank_variance_is_a_bounded_overestimate_function_space(
    sketched, rank, random_state
):
    _check_low_rank_variance("function", rank, random_state)


@pytest.mark.parametrize("rank, random_state", [(None, 3), (10, 0)])
def test_sketched_low_rank_variance_is_a_bounded_overestimate_parameter_space(
    sketched, rank, random_state
):
    _check_low_rank_variance("parameter", rank, random_state)


@pytest.mark.parametrize("name", ["single", "multi3"])
@pytest.mark.parametrize("variance", ["exact", "low_rank"])
def test_parameter_space_sketch_of_a_subsample(sketched, monkeypatch, name, variance):
    """The parameter-space Nyström sketch sees the Fisher of
    max(SKETCH_SAMPLES_PER_RANK · rank / k, SKETCH_MIN_SAMPLES) random samples; CG
    still solves the full system, and the low-rank variance (its Rayleigh-Ritz step
    uses all the data) still never falls below the exact one."""
    from sklearn_fntk._linearize.jacobian import JacobianProducts

    drawn, sketched_columns = [], []
    subsample = JacobianProducts.subsample

    def recording(self, n_samples, generator=None):
        drawn.append(n_samples)
        rows, products = subsample(self, n_samples, generator)
        fisher_product = products.fisher_product

        def counted(V, **kwargs):
            sketched_columns.append(V.shape[1])
            return fisher_product(V, **kwargs)

        products.fisher_product = counted
        return rows, products

    monkeypatch.setattr(JacobianProducts, "subsample", recording)
    net, X, y, X_test, parameters = case(name)
    ref = reference(name)
    est = make(
        name, space="parameter", solver="cg", preconditioner="nystrom",
        variance=variance, rank=8, random_state=0, tol=1e-10,
    )  # fmt: skip
    est._policy = Policy(
        eigen_size=0, sketch_samples_per_rank=2, sketch_min_samples=4,
        variance_factor_max_size=0,
    )  # fmt: skip
    est.fit(X, y)
    k = ref.mean.shape[1]
    assert drawn == [max(-(-2 * 8 // k), 4)] and sum(sketched_columns) == est.rank_ == 8
    assert_close(as_2d(est.predict(X_test), len(X_test)), ref.mean, MEAN_RTOL)
    if variance == "low_rank":
        m = len(X_test)
        variance = as_2d(est.predict_std(X_test), m) ** 2
        rounding = 1e-9 * np.max(ref.std**2)
        assert np.all(variance >= ref.std**2 - rounding)


@pytest.mark.parametrize("space", ["function", "parameter"])
@pytest.mark.parametrize("rank", [3, 10])
def test_low_rank_variance_from_exact_eigenpairs_is_a_bounded_overestimate(space, rank):
    _check_low_rank_variance(space, rank, 0)


@pytest.mark.parametrize("name", ["single", "multi3"])
@pytest.mark.parametrize("space", ["function", "parameter"])
@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_low_rank_variance_at_full_rank_is_exact(name, space, solver):
    """With every direction kept (tail weight 0) the low-rank std is the exact one."""
    _, X, y, X_test, _ = case(name)
    ref = reference(name)
    # rank above J's rank (at most n·k here) keeps every direction.
    est = make(name, space=space, solver=solver, variance="low_rank", rank=1000)
    est.fit(X, y)
    assert est.variance_tail_weight_ == 0.0 and est.rank_ <= np.asarray(y).size
    m = X_test.shape[0]
    assert_close(as_2d(est.predict_std(X_test), m), ref.std, STD_RTOL)


@pytest.mark.parametrize(
    "name, n_rows, n_params",
    [("single", 30, 61), ("multi3", 90, 73), ("last_layer", 60, 34)],
)
def test_auto_picks_the_smaller_space_and_dense(name, n_rows, n_params):
    _, X, y, X_test, _ = case(name)
    est = make(name, space="auto", solver="auto").fit(X, y)
    assert est.n_params_ == n_params
    assert est.n_outputs_ == n_rows // 30
    assert est.space_ == ("function" if n_rows <= n_params else "parameter")
    assert est.solver_ == "dense"
    assert_close(
        as_2d(est.predict(X_test), X_test.shape[0]), reference(name).mean, MEAN_RTOL
    )


def test_two_dimensional_y_with_one_output_keeps_two_dimensions():
    _, X, y, X_test, _ = case("single")
    est = make("single").fit(X, y[:, None])
    mean, std = est.predict(X_test, return_std=True)
    assert mean.shape == std.shape == (X_test.shape[0], 1)
    _, cov = est.predict(X_test, return_cov=True)
    assert cov.shape == (X_test.shape[0], X_test.shape[0], 1)
    assert_close(mean, reference("single").mean, MEAN_RTOL)


@pytest.mark.parametrize("space", ["function", "parameter"])
def test_pickle_round_trip_after_cg_fit(space):
    _, _, _, X_test, _ = case("multi3")
    est = fitted("multi3", "network", space, "cg")
    clone = pickle.loads(pickle.dumps(est))
    m = n_test("cg")
    mean, std = clone.predict(X_test[:m], return_std=True)
    ref = reference("multi3")
    assert_close(mean, ref.mean[:m], MEAN_RTOL)
    assert_close(std, ref.std[:m], STD_RTOL)


# -- the user's module is never changed ------------------------------------------------


def _snapshot(module):
    return {
        "state": {
            key: value.detach().clone() for key, value in module.state_dict().items()
        },
        "dtypes": {key: value.dtype for key, value in module.state_dict().items()},
        "training": {name: sub.training for name, sub in module.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in module.named_parameters()},
        "grad": {name: p.grad for name, p in module.named_parameters()},
    }


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_user_module_is_unchanged_and_frozen_parameters_are_not_linearized(solver):
    net = batchnorm_dropout_net(seed=7)
    net[0].bias.requires_grad_(False)  # the user froze this one
    X, Y, X_test = regression_data(seed=7)
    y = Y[:, 0]
    before = _snapshot(net)

    est = FiniteNTKRegressor(
        net,
        noise=NOISE,
        prior=PRIOR,
        solver=solver,
        variance="exact",
        tol=1e-12,
        batch_size=BATCH_SIZE,
    ).fit(X, y)
    X_test = X_test[: n_test(solver)]
    mean, std = est.predict(X_test, return_std=True)
    est.predict(X_test, return_cov=True)
    est.log_marginal_likelihood()

    after = _snapshot(net)
    assert after["training"] == before["training"] and net.training
    assert after["requires_grad"] == before["requires_grad"]
    assert after["dtypes"] == before["dtypes"]
    assert all(g is None for g in after["grad"].values())
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert est.network_ is not net

    # The frozen bias is not linearized: p counts trainable parameters only, and the
    # reference (which skips requires_grad=False too) agrees.
    n_trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert est.n_params_ == n_trainable < sum(p.numel() for p in net.parameters())
    ref = reference_posterior(net, X, y, X_test, noise=NOISE, prior=PRIOR)
    assert_close(mean, ref.mean[:, 0], MEAN_RTOL)
    assert_close(std, ref.std[:, 0], STD_RTOL)


def test_auto_variance_follows_the_solver_and_a_short_low_rank_sketch_warns():
    """auto: exact with the dense solver, low-rank with CG; rank 2 warns."""
    name = "single"
    _, X, y, X_test, _ = case(name)
    ref = reference(name)
    dense = make_solver(name, "function", "dense", variance="auto").fit(X, y)
    assert dense.variance_ == "exact" and dense.variance_tail_weight_ is None
    assert_close(dense.predict_std(X_test[:10]), ref.std[:10, 0], STD_RTOL)
    with pytest.warns(UserWarning, match="Increase rank, or use variance='exact'"):
        short = make_solver(name, "function", "cg", rank=2, variance="auto").fit(X, y)
    assert short.variance_ == "low_rank" and short.rank_ == 2


@pytest.mark.parametrize("space", ["function", "parameter"])
@pytest.mark.parametrize("name", ["multi3", "cnn"])
def test_cg_fit_exact_variances_from_a_dense_factor(monkeypatch, name, space):
    """variance="auto" with CG: exact, from one dense factor of the system assembled
    at fit time (up to variance_factor_max_size)."""
    monkeypatch.setattr(FiniteNTKRegressor, "_policy", Policy())
    _, X, y, X_test, _ = case(name)
    ref = reference(name)
    est = make(name, space=space, solver="cg", tol=1e-10).fit(X, y)
    assert est.variance_ == "exact"
    assert est._posterior.variance_system.factor is not None
    m = len(X_test)
    std = est.predict_std(X_test)
    assert_close(as_2d(std, m), ref.std, 1e-9)
    assert_close(as_2d(est.predict(X_test), m), ref.mean, MEAN_RTOL)


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_outputs_whose_residuals_differ_in_scale_warn(solver):
    """One noise variance for two outputs in units 100 apart: the intervals are 10
    times too wide for the first. The fit warns with the mean squares of y less
    the fitted mean at the training inputs, per output; standardized, they are
    within a factor 10 and it is quiet."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4))
    Y = np.c_[
        np.sin(X[:, 0]) + 0.5 * X[:, 1] + 0.1 * rng.normal(size=300),
        100 * np.cos(X[:, 2]) + 10 * rng.normal(size=300),
    ]
    with pytest.warns(UserWarning, match="the 2 outputs share one noise") as record:
        model = FiniteNTKRegressor(solver=solver, random_state=0).fit(X, Y)
    (message,) = [str(w.message) for w in record if "share one noise" in str(w.message)]
    low, high = (
        float(part.split(" (output")[0]) for part in message.split("from ")[1].split(" to ")
    )
    expected = ((Y - model.predict(X)) ** 2).mean(0)
    np.testing.assert_allclose([low, high], expected, rtol=2e-3)  # as printed, 3 digits
    assert message.endswith(
        "or fit one estimator per output (each with a network of that output alone)."
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FiniteNTKRegressor(solver=solver, normalize_y=True, random_state=0).fit(X, Y)


def test_float32_rounding_of_the_network_outputs_warns():
    """A network whose outputs sit near 1e6: float32 rounds them (the prior mean) to
    steps of 0.0625, 4 to 7 times the fitted noise std; its mean error was 20 times
    float64's, the latent std 8 times too small, silently. float64 is quiet."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 3))
    net = mlp()
    with torch.no_grad():
        net[-1].bias += 1e6
        y = net.double()(torch.as_tensor(X)).numpy()[:, 0]
    y = y + 0.01 * np.sin(X[:, 0]) + 0.001 * rng.normal(size=200)
    with pytest.warns(UserWarning, match="float32 rounds the network's outputs") as record:
        FiniteNTKRegressor(net, dtype="float32").fit(X, y)
    (message,) = [str(w.message) for w in record if "rounds the network" in str(w.message)]
    assert "up to 1e+06 in magnitude" in message and "Use dtype='float64'" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        FiniteNTKRegressor(net, dtype="float64").fit(X, y)
