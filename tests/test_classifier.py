"""FiniteNTKClassifier against the dense reference, its links, Newton, errors, ecosystem."""

import pickle
import warnings

import numpy as np
import pytest
import torch
from classifier_reference import (
    exact_proba,
    laplace_reference,
    linearize,
    map_proba,
    newton_map,
    probit_proba,
)
from networks import TokenBag, cnn, token_data
from sklearn.datasets import load_iris
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils._param_validation import InvalidParameterError

from sklearn_fntk import FiniteNTKClassifier
from sklearn_fntk._inference.policy import Policy

NAMES = np.array(["ant", "bee", "cat"])
# The probit link's exact path (the low-rank one is tested on its own, within its
# stated error).
EXACT_PROBIT = Policy(probit_error=None)


def mlp(n_in=2, n_out=3, hidden=12, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(n_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, n_out)
    )


def blobs(n, n_classes, seed=0):
    """(X, labels) in 2-D, labels strings from NAMES; centers fixed by the seed."""
    rng = np.random.default_rng(seed)
    centers = 1.5 * rng.normal(size=(n_classes, 2))
    y = np.arange(n) % n_classes
    return centers[y] + rng.normal(size=(n, 2)), NAMES[y]


def test_one_logit_is_the_second_class():
    """A single logit f gives P(classes_[1]) = σ(f); with prior → 0, f = f_θ."""
    X, y = blobs(30, 2)
    net = mlp(n_out=1)
    clf = FiniteNTKClassifier(net, link="map", prior=1e-12).fit(X, y)
    assert list(clf.classes_) == ["ant", "bee"]
    with torch.no_grad():
        logit = net.double()(torch.as_tensor(X))[:, 0]
    np.testing.assert_allclose(
        clf.predict_proba(X)[:, 1], torch.sigmoid(logit).numpy(), rtol=1e-8
    )


# -- agreement with the dense reference ---------------------------------------------------

CASES = {"3 classes": (3, 3), "2 classes, 2 logits": (2, 2), "2 classes, 1 logit": (2, 1)}
PATHS = {
    "parameter-dense": {"space": "parameter", "solver": "dense"},
    "function-dense": {"space": "function", "solver": "dense"},
    "parameter-cg": {"space": "parameter", "solver": "cg", "preconditioner": None},
    "function-cg": {"space": "function", "solver": "cg", "preconditioner": None},
    "parameter-cg-jacobi": dict(space="parameter", solver="cg", preconditioner="jacobi"),
    "function-cg-nystrom": dict(space="function", solver="cg", preconditioner="nystrom"),
    "parameter-cg-nystrom": dict(space="parameter", solver="cg", preconditioner="nystrom"),
}


@pytest.fixture(scope="module", params=list(CASES))
def reference_case(request):
    """A network, data with string labels, and the dense reference's predictive."""
    n_classes, n_logits = CASES[request.param]
    X, y = blobs(60, n_classes)
    X_test, _ = blobs(20, n_classes, seed=1)
    net = mlp(n_out=n_logits)
    reference = laplace_reference(net, X, y, X_test, prior=2.0)
    return net, X, y, X_test, reference


@pytest.fixture(scope="module")
def token_case():
    """The same for a network that takes integer tokens (an Embedding first)."""
    X, Y, X_test = token_data(n=60, n_outputs=3, seed=7)
    y, net = NAMES[Y.argmax(1)], TokenBag(n_out=3, seed=7)
    return net, X, y, X_test, laplace_reference(net, X, y, X_test, prior=2.0)


@pytest.mark.parametrize("path", list(PATHS)[:4])
def test_integer_tokens_match_dense_reference(token_case, path):
    test_matches_dense_reference(token_case, path)


@pytest.mark.parametrize("path", list(PATHS))
def test_matches_dense_reference(reference_case, path):
    net, X, y, X_test, reference = reference_case
    clf = FiniteNTKClassifier(net, prior=2.0, tol=1e-10, **PATHS[path])
    clf._policy = EXACT_PROBIT
    clf.fit(X, y)
    np.testing.assert_array_equal(clf.classes_, reference["classes"])
    assert (clf.space_, clf.solver_) == (PATHS[path]["space"], PATHS[path]["solver"])
    np.testing.assert_allclose(
        clf.delta_.cpu().numpy(), reference["delta"], rtol=1e-6, atol=1e-9
    )
    expected = {
        "probit": probit_proba(reference["mean"], reference["cov"]),
        "map": map_proba(reference["mean"]),
    }
    for link, proba in expected.items():
        clf.set_params(link=link)
        np.testing.assert_allclose(clf.predict_proba(X_test), proba, rtol=1e-5)


def test_parameter_space_nystrom_from_a_subsample_matches_reference(
    reference_case, monkeypatch
):
    """Newton's Nyström preconditioners sketch (n/m)·J_SᵀΛ_S J_S over random samples S
    (here 20 of 60, a new draw per Newton step); CG still solves the full system."""
    from sklearn_fntk._linearize.jacobian import JacobianProducts

    drawn = []
    subsample = JacobianProducts.subsample

    def recording(self, n_samples, generator=None):
        drawn.append(n_samples)
        return subsample(self, n_samples, generator)

    monkeypatch.setattr(JacobianProducts, "subsample", recording)
    net, X, y, X_test, reference = reference_case
    path = PATHS["parameter-cg-nystrom"]
    clf = FiniteNTKClassifier(
        net, prior=2.0, link="probit", tol=1e-10, random_state=0, **path
    )
    clf._policy = Policy(sketch_samples_per_rank=0, sketch_min_samples=20)
    clf.fit(X, y)
    assert len(drawn) >= 2 and set(drawn) == {20}
    np.testing.assert_allclose(
        clf.delta_.cpu().numpy(), reference["delta"], rtol=1e-6, atol=1e-9
    )
    expected = probit_proba(reference["mean"], reference["cov"])
    np.testing.assert_allclose(clf.predict_proba(X_test), expected, rtol=1e-5)


def test_prior_mean_zero_matches_reference():
    X, y = blobs(40, 3)
    net = mlp()
    reference = laplace_reference(net, X, y, X, prior=0.5, prior_mean="zero")
    clf = FiniteNTKClassifier(net, prior=0.5, prior_mean="zero", link="probit", tol=1e-10)
    clf._policy = EXACT_PROBIT
    clf.fit(X, y)
    expected = probit_proba(reference["mean"], reference["cov"])
    np.testing.assert_allclose(clf.predict_proba(X), expected, rtol=1e-5)


@pytest.mark.parametrize("path", ["parameter-dense", "function-dense"])
@pytest.mark.parametrize("probit_error", [1e-3, 1e-12], ids=["low-rank", "fallback"])
def test_low_rank_probit_within_its_error(reference_case, path, probit_error):
    """The probit link from the low-rank covariance, truncated hard here (weights
    above 0.05 kept), stays within ``probit_error`` of the exact probit formula on
    the dense reference's covariances; its variances exceed the exact ones by at
    most their stated bound; a bound above ``probit_error`` (1e-12: every point)
    falls back to the exact covariance."""
    net, X, y, X_test, reference = reference_case
    clf = FiniteNTKClassifier(net, prior=2.0, link="probit", tol=1e-10, **PATHS[path])
    clf._policy = Policy(probit_error=probit_error, probit_tail_weight=0.05)
    clf.fit(X, y)
    low_rank = clf._posterior.low_rank()
    n_logits = reference["mean"].shape[1]
    assert 0 < low_rank.rank < len(X) * n_logits and low_rank.tail_weight > 0
    X_test_there = torch.as_tensor(X_test, device=clf.delta_.device)
    variance, overestimate = clf._posterior.variances(X_test_there)
    excess = variance.cpu().numpy() - np.diagonal(reference["cov"], axis1=1, axis2=2)
    assert excess.max() > 1e-6  # truncated: the variances are not the exact ones
    assert excess.min() > -1e-9 and (excess <= overestimate.cpu().numpy() + 1e-9).all()
    expected = probit_proba(reference["mean"], reference["cov"])
    proba = clf.predict_proba(X_test)
    assert np.abs(proba - expected).max() <= max(probit_error, 1e-9)
    # the low-rank covariance, built at the first probit call, pickles with the fit
    restored = pickle.loads(pickle.dumps(clf))
    assert restored._posterior.__dict__.get("_low_rank") is not None
    np.testing.assert_array_equal(restored.predict_proba(X_test), proba)


# -- the links ----------------------------------------------------------------------------


@pytest.mark.parametrize("n_logits", [3, 1])
def test_mc_converges_to_exact_predictive(n_logits):
    """MC error against Gauss-Hermite quadrature of E[softmax(f)] shrinks as 1/√S."""
    X, y = blobs(40, 3 if n_logits == 3 else 2)
    X_test = np.random.default_rng(2).normal(scale=3.0, size=(15, 2))
    net = mlp(n_out=n_logits)
    reference = laplace_reference(net, X, y, X_test, prior=3.0)
    exact = exact_proba(reference["mean"], reference["cov"])
    # the covariance matters here: the MAP softmax is far from the integral
    assert np.abs(exact - map_proba(reference["mean"])).max() > 0.1
    clf = FiniteNTKClassifier(net, prior=3.0, tol=1e-10, link="mc").fit(X, y)
    errors = {}
    for n_samples in [100, 1000, 10_000, 100_000]:
        clf.set_params(n_samples=n_samples, random_state=0)
        errors[n_samples] = np.abs(clf.predict_proba(X_test) - exact).max()
        assert errors[n_samples] <= 3.0 / np.sqrt(n_samples)
    assert errors[100_000] < errors[100] / 10


def test_mc_is_seeded_and_pointwise():
    X, y = blobs(40, 3)
    clf = FiniteNTKClassifier(mlp(), link="mc", n_samples=200, random_state=3).fit(X, y)
    first = clf.predict_proba(X)
    np.testing.assert_array_equal(clf.predict_proba(X), first)
    # common random numbers: a point's prediction does not depend on the others
    np.testing.assert_allclose(clf.predict_proba(X[::-1][:7]), first[::-1][:7], rtol=1e-12)


@pytest.mark.parametrize("link", ["probit", "mc", "map"])
@pytest.mark.parametrize("case", list(CASES))
def test_decision_function_ranks_as_predict_proba(link, case):
    n_classes, n_logits = CASES[case]
    X, y = blobs(40, n_classes)
    clf = FiniteNTKClassifier(mlp(n_out=n_logits), link=link, random_state=0).fit(X, y)
    proba, scores = clf.predict_proba(X), clf.decision_function(X)
    np.testing.assert_allclose(clf.predict_log_proba(X), np.log(proba), rtol=1e-10)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-12)
    if n_classes == 2:
        assert scores.shape == (40,)
        # the log-odds of classes_[1]
        np.testing.assert_allclose(scores, np.log(proba[:, 1] / proba[:, 0]), rtol=1e-8)
        positive = (scores > 0).astype(int)
        np.testing.assert_array_equal(clf.predict(X), clf.classes_[positive])
    else:
        assert scores.shape == (40, 3)
        np.testing.assert_array_equal(scores.argmax(1), proba.argmax(1))
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[proba.argmax(1)])


# -- Newton's method ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def confident_task():
    """A network trained to |logits| ≈ 40 on 3 blobs; 30% of the labels then move on."""
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 3.0], [3.0, -2.0], [-3.0, -2.0]])
    y = rng.integers(0, 3, 90)
    X = centers[y] + rng.normal(size=(90, 2))
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    inputs, targets = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(inputs), targets).backward()
        optimizer.step()
    with torch.no_grad():
        net[2].weight *= 4
        net[2].bias *= 4
        assert float(net(inputs).abs().max()) > 30
    shifted = y.copy()
    moved = rng.random(90) < 0.3
    shifted[moved] = (shifted[moved] + 1) % 3
    return net, X, shifted


@pytest.mark.parametrize("space", ["parameter", "function"])
def test_newton_line_search_from_confident_network(confident_task, space):
    net, X, y = confident_task
    F0, J, _ = linearize(net, X)
    # full Newton steps overshoot from confident logits: the objective explodes
    _, _, full_steps = newton_map(F0, J, torch.as_tensor(y), 3, 1.0, line_search=False)
    assert full_steps[1] > 10 * full_steps[0]
    assert min(full_steps[1:]) > full_steps[0]
    _, _, damped = newton_map(F0, J, torch.as_tensor(y), 3, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        clf = FiniteNTKClassifier(net, prior=1.0, tol=1e-10, space=space).fit(X, y)
    assert 1 <= clf.n_newton_iter_ <= 30
    np.testing.assert_allclose(clf._posterior.objective, damped[-1], rtol=1e-12)
    assert damped[-1] < full_steps[0] / 5


def test_convergence_warning_names_max_newton_iter_and_tol(confident_task):
    net, X, y = confident_task
    with pytest.warns(ConvergenceWarning, match=r"max_newton_iter=2 .*tol=1e-10"):
        clf = FiniteNTKClassifier(net, tol=1e-10, max_newton_iter=2).fit(X, y)
    assert clf.n_newton_iter_ == 2


def test_convergence_warning_names_max_iter_for_cg_steps(confident_task):
    """max_iter bounds each CG solve, as in the regressor; the estimator warns."""
    net, X, y = confident_task
    clf = FiniteNTKClassifier(net, tol=1e-10, solver="cg", preconditioner=None, max_iter=1)
    with pytest.warns(ConvergenceWarning, match=r"max_iter=1 iterations"):
        clf.fit(X, y)
    assert clf.n_iter_ == clf.n_newton_iter_  # one CG iteration per Newton step


def test_n_iter_at_least_one_when_already_optimal():
    """prior → 0 pins δ at 0: the initial point is optimal, still one iteration."""
    X, y = blobs(30, 3)
    clf = FiniteNTKClassifier(mlp(), prior=1e-14).fit(X, y)
    assert clf.n_newton_iter_ >= 1 and clf.n_iter_ >= 1
    assert float(clf.delta_.abs().max()) < 1e-10


# -- bad input ----------------------------------------------------------------------------


def test_continuous_targets_rejected():
    X, _ = blobs(20, 2)
    with pytest.raises(ValueError, match="Unknown label type: continuous"):
        FiniteNTKClassifier(mlp(n_out=1)).fit(X, np.linspace(0.1, 2.0, 20))


def test_single_class_rejected():
    X, _ = blobs(20, 2)
    message = r"at least 2 classes in y; got 1 class: \['bee'\]"
    with pytest.raises(ValueError, match=message):
        FiniteNTKClassifier(mlp(n_out=1)).fit(X, np.full(20, "bee"))


@pytest.mark.parametrize(
    ("n_classes", "n_logits", "message"),
    [
        (3, 2, r"produces 2 logit\(s\) per sample, but y has 3 classes; expected 3 \("),
        (3, 1, r"produces 1 logit\(s\) per sample, but y has 3 classes; expected 3 \("),
        (2, 3, r"produces 3 logit\(s\) .* 2 classes; expected 2 .* or 1 \(the logit"),
    ],
)
def test_logit_count_mismatch_rejected(n_classes, n_logits, message):
    X, y = blobs(30, n_classes)
    with pytest.raises(ValueError, match=message):
        FiniteNTKClassifier(mlp(n_out=n_logits)).fit(X, y)


@pytest.mark.parametrize(
    "params", [{"link": "logit"}, {"n_samples": 0}, {"max_newton_iter": None}, {"prior": 0}]
)
def test_invalid_parameters_rejected(params):
    X, y = blobs(20, 2)
    with pytest.raises(InvalidParameterError):
        FiniteNTKClassifier(mlp(n_out=1), **params).fit(X, y)


def test_wrong_input_shape_at_predict():
    X, y = blobs(20, 2)
    clf = FiniteNTKClassifier(mlp(n_out=1)).fit(X, y)
    with pytest.raises(ValueError, match="features"):
        clf.predict(np.ones((3, 5)))


# -- networks, images, ecosystem -------------------------------------------------------


def test_user_network_left_untouched():
    net = mlp()
    net.train()
    net[0].weight.requires_grad_(False)
    before = {name: value.clone() for name, value in net.state_dict().items()}
    X, y = blobs(30, 3)
    clf = FiniteNTKClassifier(net).fit(X, y)
    assert net.training and not net[0].weight.requires_grad
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name])
    # the frozen layer is not linearized
    assert clf.n_params_ == 12 + 12 * 3 + 3


def test_images_with_a_cnn_and_pickle():
    """A (1, 8, 8)-image CNN with one logit; pickling keeps the predictions."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 1, 8, 8))
    y = np.where(X[:, 0, :4].mean((1, 2)) > X[:, 0, 4:].mean((1, 2)), "up", "down")
    clf = FiniteNTKClassifier(cnn(), tol=1e-8).fit(X, y)
    assert clf.n_logits_ == 1 and clf.input_shape_ == (1, 8, 8)
    proba = clf.predict_proba(X[:5])
    restored = pickle.loads(pickle.dumps(clf))
    np.testing.assert_allclose(restored.predict_proba(X[:5]), proba, rtol=1e-10)
    assert clf.score(X, y) > 0.8


@pytest.fixture(scope="module")
def iris_names():
    X, y = load_iris(return_X_y=True)
    return X, np.array(["setosa", "versicolor", "virginica"])[y]


def test_pipeline_with_string_labels(iris_names):
    X, y = iris_names
    pipe = make_pipeline(StandardScaler(), FiniteNTKClassifier(mlp(4, 3, hidden=8)))
    pipe.fit(X, y)
    assert set(pipe.predict(X)) <= set(y)
    assert pipe.score(X, y) > 0.9
    assert pipe.predict_proba(X).shape == (150, 3)


def test_cross_val_score_with_string_labels(iris_names):
    X, y = iris_names
    pipe = make_pipeline(StandardScaler(), FiniteNTKClassifier(mlp(4, 3, hidden=8)))
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    scores = cross_val_score(pipe, X, y, cv=cv, scoring="neg_log_loss")
    assert np.all(np.isfinite(scores)) and scores.mean() > -0.5


def test_grid_search_over_prior(iris_names):
    X, y = iris_names
    pipe = make_pipeline(StandardScaler(), FiniteNTKClassifier(mlp(4, 3, hidden=8)))
    search = GridSearchCV(
        pipe,
        {"finitentkclassifier__prior": [1e-3, 1.0, 100.0]},
        cv=StratifiedKFold(3, shuffle=True, random_state=0),
        scoring="neg_log_loss",
    ).fit(X, y)
    assert search.best_params_["finitentkclassifier__prior"] in (1.0, 100.0)
    assert set(search.predict(X)) <= set(y)


@pytest.mark.parametrize(
    "n_classes, last, layer",
    [(3, torch.nn.Softmax(dim=1), "Softmax"), (2, torch.nn.Sigmoid(), "Sigmoid")],
)
def test_network_returning_probabilities_warns(n_classes, last, layer):
    """A final Softmax (Sigmoid) makes the outputs probabilities, not logits; the
    same network without it, or ending with LogSoftmax (log-probabilities are
    logits), is quiet, as is the default network."""
    X, y = load_iris(return_X_y=True)
    X, y = (X - X.mean(0)) / X.std(0), y if n_classes == 3 else (y == 2).astype(int)
    torch.manual_seed(0)
    n_logits = 3 if n_classes == 3 else 1
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, n_logits)
    )
    with pytest.warns(
        UserWarning, match=f"seems to return probabilities \\(a final {layer}\\)"
    ):
        FiniteNTKClassifier(torch.nn.Sequential(net, last), prior=1.0).fit(X, y)
    quiet = [net, None] + (
        [torch.nn.Sequential(net, torch.nn.LogSoftmax(dim=1))] if n_classes == 3 else []
    )
    for network in quiet:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            FiniteNTKClassifier(network, prior=1.0, random_state=0).fit(X, y)
