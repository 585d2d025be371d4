"""The classifier's Laplace evidence, prior="auto" and predict_latent, against the dense
float64 reference of classifier_reference.py (explicit Jacobian, dense Newton,
autograd for the evidence's derivative)."""

import math
import warnings

import numpy as np
import pytest
import torch
from classifier_reference import (
    evidence_optimum,
    laplace_log_evidence,
    laplace_reference,
    leave_one_out,
    linearize,
)
from scipy.optimize import minimize_scalar
from sklearn.exceptions import ConvergenceWarning

from sklearn_fntk import FiniteNTKClassifier
from sklearn_fntk._inference.laplace_evidence import laplace_evidence
from sklearn_fntk._inference.laplace_loo import laplace_loo
from sklearn_fntk._inference.policy import Policy

NAMES = np.array(["ant", "bee", "cat"])
CASES = {"3 classes": (3, 3), "2 classes, 1 logit": (2, 1)}
DENSE = {
    "parameter": {"space": "parameter", "solver": "dense"},
    "function": {"space": "function", "solver": "dense"},
}


def mlp(n_out, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(2, 12), torch.nn.Tanh(), torch.nn.Linear(12, n_out)
    )


def blobs(n, n_classes, seed=0):
    """Overlapping blobs, so that the evidence has an interior maximum."""
    rng = np.random.default_rng(seed)
    centers = 1.5 * rng.normal(size=(n_classes, 2))
    y = np.arange(n) % n_classes
    return centers[y] + rng.normal(size=(n, 2)), NAMES[y]


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """Network, data, the linearization and the reference optimum of the evidence."""
    n_classes, n_logits = CASES[request.param]
    X, y = blobs(60, n_classes)
    net = mlp(n_logits)
    F0, J, _ = linearize(net, X)
    labels = torch.as_tensor(np.unique(y, return_inverse=True)[1])
    weights = np.random.default_rng(1).uniform(0.5, 2.0, size=60)
    return {
        "net": net,
        "X": X,
        "y": y,
        "reference": (F0, J, labels, n_classes),
        "weights": weights,
        "optimum": evidence_optimum(F0, J, labels, n_classes),
    }


@pytest.mark.parametrize("space", list(DENSE))
@pytest.mark.parametrize("prior", [0.3, 4.0])
def test_evidence_and_its_derivative_match_reference(case, space, prior):
    """Value to 1e-10 (relative), and the exact derivative in log s (implicit function
    theorem by hand, eqs. (3)-(4)) against autograd through a Newton step."""
    clf = FiniteNTKClassifier(case["net"], prior=prior, tol=1e-12, **DENSE[space])
    clf.fit(case["X"], case["y"])
    value, derivative = laplace_log_evidence(*case["reference"], prior)
    assert clf.log_marginal_likelihood() == pytest.approx(value, rel=1e-10)
    assert clf.log_marginal_likelihood(return_std_error=True) == (
        pytest.approx(value, rel=1e-10),
        0.0,
    )
    evidence = laplace_evidence(clf._posterior, gradient=True)
    assert evidence.gradient == pytest.approx(derivative, rel=1e-8, abs=1e-9)


@pytest.mark.parametrize("space", list(DENSE))
def test_evidence_at_other_priors_matches_reference(case, space):
    """log_marginal_likelihood(prior=s) refits the MAP at s (from delta_) and leaves
    the fitted state as it was: an evidence curve, to 1e-10 of the reference's."""
    clf = FiniteNTKClassifier(case["net"], tol=1e-12, **DENSE[space])
    clf.fit(case["X"], case["y"])
    delta, fitted = clf.delta_.clone(), clf.log_marginal_likelihood()
    for prior in (0.3, 4.0, clf.prior_):
        value, _ = laplace_log_evidence(*case["reference"], prior)
        assert clf.log_marginal_likelihood(prior) == pytest.approx(value, rel=1e-10)
    assert fitted == pytest.approx(value, rel=1e-10)
    assert torch.equal(clf.delta_, delta) and clf.log_marginal_likelihood() == fitted
    with pytest.raises(ValueError, match="The 'prior' parameter of log_marginal"):
        clf.log_marginal_likelihood(0.0)


@pytest.mark.parametrize("space", list(DENSE))
def test_weighted_evidence_matches_reference(case, space):
    """Sample weights scale each sample's log-likelihood, gradient and curvature."""
    clf = FiniteNTKClassifier(case["net"], prior=2.0, tol=1e-12, **DENSE[space])
    clf.fit(case["X"], case["y"], sample_weight=case["weights"])
    value, derivative = laplace_log_evidence(
        *case["reference"], 2.0, weights=case["weights"]
    )
    assert clf.log_marginal_likelihood() == pytest.approx(value, rel=1e-10)
    gradient = laplace_evidence(clf._posterior, gradient=True).gradient
    assert gradient == pytest.approx(derivative, rel=1e-8, abs=1e-9)


@pytest.mark.parametrize("space", list(DENSE))
def test_auto_prior_is_the_reference_optimum(case, space):
    """prior="auto" (the default) finds the root of the exact derivative."""
    clf = FiniteNTKClassifier(case["net"], tol=1e-10, **DENSE[space])
    clf.fit(case["X"], case["y"])
    optimum = case["optimum"]
    assert clf.prior_ == pytest.approx(optimum, rel=1e-8)
    value, derivative = laplace_log_evidence(*case["reference"], optimum)
    assert abs(derivative) < 1e-8
    assert clf.log_marginal_likelihood() == pytest.approx(value, rel=1e-12)
    assert 4 <= clf.n_evidence_evaluations_ <= 20
    # the posterior kept is the one at prior_
    reference = laplace_reference(
        case["net"], case["X"], case["y"], case["X"][:5], prior=clf.prior_
    )
    np.testing.assert_allclose(
        clf.delta_.cpu().numpy(), reference["delta"], rtol=1e-7, atol=1e-9
    )


CG = {
    "parameter": dict(space="parameter", solver="cg", preconditioner=None),
    "function": dict(space="function", solver="cg", preconditioner=None),
}


@pytest.mark.parametrize("space", list(CG))
def test_stochastic_evidence_within_its_standard_error(case, space):
    """With CG the log-determinant is a stochastic Lanczos quadrature estimate.

    Lanczos runs to the system size, so each probe's quadrature zᵀ log(A) z is exact
    up to rounding and the only error is Hutchinson's, which the reported standard
    error measures: the estimate is within 4 of them (deterministic: a fixed seed),
    and with 400 probes that error is below half a nat. -L(δ̂) is exact to the
    Newton tolerance.
    """
    clf = FiniteNTKClassifier(
        case["net"], prior=2.0, tol=1e-10, random_state=0, **CG[space]
    )
    # 200 steps: at least the system size (p = 75 or 49, n·k = 180 or 60)
    clf._policy = Policy(laplace_evidence_probes=400, laplace_evidence_steps=200)
    clf.fit(case["X"], case["y"])
    value, _ = laplace_log_evidence(*case["reference"], 2.0)
    estimate, std_error = clf.log_marginal_likelihood(return_std_error=True)
    assert 0 < std_error < 0.5
    assert abs(estimate - value) <= 4 * std_error
    # the same seed, the same probes: the estimate is reproducible
    assert clf.log_marginal_likelihood() == estimate
    # and at another prior (the MAP found again there)
    value, _ = laplace_log_evidence(*case["reference"], 0.5)
    estimate, std_error = clf.log_marginal_likelihood(0.5, return_std_error=True)
    assert 0 < std_error < 0.5
    assert abs(estimate - value) <= 4 * std_error


@pytest.mark.parametrize("space", list(CG))
def test_stochastic_search_near_the_reference_optimum(case, space):
    """With CG, prior="auto" maximises the stochastic estimate by its values, with the
    same probes at every prior (so the estimate is a smooth function of s), to 1%
    in log s. Its maximiser differs from the exact one by the estimate's error in the
    derivative; what matters is the evidence that costs, measured in the exact
    evidence: with 400 probes under 0.011 nats here (the priors within 10%), asserted
    under 0.05 nats."""
    clf = FiniteNTKClassifier(case["net"], tol=1e-10, random_state=0, **CG[space])
    clf._policy = Policy(laplace_evidence_probes=400, laplace_evidence_steps=200)
    clf.fit(case["X"], case["y"])
    optimum = case["optimum"]
    best, _ = laplace_log_evidence(*case["reference"], optimum)
    found, _ = laplace_log_evidence(*case["reference"], clf.prior_)
    assert 0 <= best - found < 0.05
    assert clf.prior_ == pytest.approx(optimum, rel=0.15)
    estimate, std_error = clf.log_marginal_likelihood(return_std_error=True)
    assert abs(estimate - found) <= 4 * std_error


def test_bound_warnings_name_prior(case, monkeypatch):
    """At a bound of the search the estimator warns and names ``prior``."""
    import sklearn_fntk._laplace_fit as laplace_fit

    optimum = case["optimum"]
    monkeypatch.setattr(laplace_fit, "PRIOR_BOUNDS", (optimum / 100, optimum / 10))
    clf = FiniteNTKClassifier(case["net"], solver="dense")
    with pytest.warns(UserWarning, match=r"upper bound of prior.*Pass prior as a number"):
        clf.fit(case["X"], case["y"])
    assert clf.prior_ == pytest.approx(optimum / 10)
    monkeypatch.setattr(laplace_fit, "PRIOR_BOUNDS", (optimum * 10, optimum * 100))
    with pytest.warns(UserWarning, match=r"lower bound of prior.*Pass prior as a number"):
        clf.fit(case["X"], case["y"])
    assert clf.prior_ == pytest.approx(optimum * 10)


def test_fixed_prior_runs_no_search(case):
    clf = FiniteNTKClassifier(case["net"], prior=0.7).fit(case["X"], case["y"])
    assert clf.prior_ == 0.7 and clf.n_evidence_evaluations_ == 1


def test_auto_prior_fits_quietly_and_reports(case, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clf = FiniteNTKClassifier(case["net"], verbose=1).fit(case["X"], case["y"])
    (search,) = [r for r in caplog.records if r.stage.startswith("evidence search")]
    assert search.details["prior"] == clf.prior_
    assert search.details["priors_tried"] == clf.n_evidence_evaluations_
    assert f"prior={clf.prior_:.3g}" in search.getMessage()
    assert math.isfinite(clf.log_marginal_likelihood())


@pytest.mark.parametrize("space", list(DENSE))
def test_float32_search_stops_newton_at_its_rounding_floor(case, space):
    """The dense search runs Newton's method to 1e-10, below float32's rounding floor:
    each prior's Newton steps stop once they no longer halve the gradient (they ran
    to max_newton_iter=100 before, 11x the time), quietly, at float64's optimum, in
    no more priors than float64 needs."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        clf = FiniteNTKClassifier(case["net"], dtype="float32", **DENSE[space])
        clf.fit(case["X"], case["y"])
    assert clf._posterior.stalled and clf.n_newton_iter_ <= 10
    assert clf.prior_ == pytest.approx(case["optimum"], rel=1e-3)
    # Brent's method stops at √ε in log s (it chased float32 rounding: 8 priors
    # against float64's 6-7 on these cases)
    in_float64 = FiniteNTKClassifier(case["net"], **DENSE[space]).fit(case["X"], case["y"])
    assert clf.n_evidence_evaluations_ <= in_float64.n_evidence_evaluations_


# -- prior="loo" -----------------------------------------------------------------------


@pytest.mark.parametrize("space", list(DENSE))
@pytest.mark.parametrize("prior", [0.3, 4.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_leave_one_out_matches_reference(case, space, prior, weighted):
    """The Laplace leave-one-out log predictive, eqs. (1)-(3) of laplace_loo, against
    explicit inverses of H, Σ_i and the cavity precision, to 1e-9."""
    weights = case["weights"] if weighted else None
    clf = FiniteNTKClassifier(case["net"], prior=prior, tol=1e-12, **DENSE[space])
    clf.fit(case["X"], case["y"], sample_weight=weights)
    expected = leave_one_out(*case["reference"], prior, weights=weights)
    assert laplace_loo(clf._posterior) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("space", list(DENSE))
def test_loo_prior_is_the_reference_optimum(case, space):
    """prior="loo" maximises the leave-one-out predictive: to its tolerance in log s
    (1e-3), and its value there within 1e-6 of the reference's maximum."""
    clf = FiniteNTKClassifier(case["net"], prior="loo", tol=1e-10, **DENSE[space])
    clf.fit(case["X"], case["y"])
    result = minimize_scalar(
        lambda t: -leave_one_out(*case["reference"], math.exp(t)),
        bounds=(math.log(1e-3), math.log(1e3)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    assert math.exp(result.x) == pytest.approx(clf.prior_, rel=1e-2)
    found = leave_one_out(*case["reference"], clf.prior_)
    assert 0 <= -result.fun - found < 1e-6
    assert laplace_loo(clf._posterior) == pytest.approx(found, rel=1e-9)
    # the evidence kept is the one at prior_
    value, _ = laplace_log_evidence(*case["reference"], clf.prior_)
    assert clf.log_marginal_likelihood() == pytest.approx(value, rel=1e-9)
    assert 4 <= clf.n_evidence_evaluations_ <= 30


def test_loo_prior_needs_the_dense_solver(case):
    clf = FiniteNTKClassifier(case["net"], prior="loo", solver="cg")
    with pytest.raises(ValueError, match="prior='loo' needs the dense solver"):
        clf.fit(case["X"], case["y"])
    assert not hasattr(clf, "prior_")


# -- predict_latent ---------------------------------------------------------------------

PATHS = {
    **{f"{space}-dense": DENSE[space] for space in DENSE},
    **{f"{space}-cg": CG[space] for space in CG},
}


@pytest.mark.parametrize("path", list(PATHS))
def test_predict_latent_matches_reference(case, path):
    """The logit mean and covariance per test point, in every space and solver."""
    X_test, _ = blobs(7, 3, seed=4)
    reference = laplace_reference(case["net"], case["X"], case["y"], X_test, prior=1.5)
    clf = FiniteNTKClassifier(case["net"], prior=1.5, tol=1e-10, **PATHS[path])
    mean, cov = clf.fit(case["X"], case["y"]).predict_latent(X_test)
    k = case["reference"][1].shape[1]
    assert mean.shape == (7, k) and cov.shape == (7, k, k)
    np.testing.assert_allclose(mean, reference["mean"], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(cov, reference["cov"], rtol=1e-7, atol=1e-9)
    # chunking does not change it
    clf.set_params(batch_size=3)
    np.testing.assert_allclose(clf.predict_latent(X_test)[1], cov, rtol=1e-10)


@pytest.mark.parametrize("space", list(CG))
def test_stochastic_evidence_grows_its_steps_until_resolved(space):
    """With 2 Lanczos steps per probe the log-determinant's Gauss and Gauss-Radau
    rules (a node at 1: B ⪰ I) differ by 1.7-1.9 nats of evidence at the optimum. The
    steps double at each prior tried until they agree within a nat, so the prior
    found is one whose evidence (with the same probes, exact quadrature: 200 steps)
    is within a nat of the maximum; held at 2 steps, the fit warns instead."""
    X, y = blobs(60, 3)
    net = mlp(3)
    fits = {}
    for name, policy in {
        "exact": dict(laplace_evidence_steps=200),
        "grown": dict(laplace_evidence_steps=2),
    }.items():
        clf = FiniteNTKClassifier(net, tol=1e-10, random_state=0, **CG[space])
        clf._policy = Policy(**policy)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            fits[name] = clf.fit(X, y)
    assert fits["grown"]._evidence.quadrature_gap <= 1.0
    there = FiniteNTKClassifier(
        net, prior=fits["grown"].prior_, tol=1e-10, random_state=0, **CG[space]
    )
    there._policy = Policy(laplace_evidence_steps=200)
    best = fits["exact"].log_marginal_likelihood()
    assert 0 <= best - there.fit(X, y).log_marginal_likelihood() <= 1.0
    held = FiniteNTKClassifier(net, tol=1e-10, random_state=0, **CG[space])
    held._policy = Policy(laplace_evidence_steps=2, evidence_max_growth=1)
    with pytest.warns(ConvergenceWarning, match="stochastic Laplace evidence has not"):
        held.fit(X, y)


def test_stochastic_evidence_grows_within_the_memory_left(monkeypatch):
    """With no memory left for larger Lanczos bases the steps stay at 2 and the
    fit warns, as when held by the policy."""
    from sklearn_fntk._inference import laplace_evidence

    monkeypatch.setattr(laplace_evidence, "usable_bytes", lambda *args: 0.0)
    X, y = blobs(60, 3)
    clf = FiniteNTKClassifier(mlp(3), tol=1e-10, random_state=0, **CG["parameter"])
    clf._policy = Policy(laplace_evidence_steps=2)
    with pytest.warns(ConvergenceWarning, match="stochastic Laplace evidence has not"):
        clf.fit(X, y)
