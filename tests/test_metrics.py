"""sklearn_fntk.metrics: the log predictive density and its scorer."""

import numpy as np
import pytest
import torch
from scipy.stats import norm
from scipy.stats import t as student_t
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sklearn_fntk import FiniteNTKRegressor
from sklearn_fntk.metrics import log_predictive_density_scorer, mean_log_predictive_density


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3))
    y = np.sin(X[:, 0]) + 0.1 * rng.normal(size=60)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    )
    return net, X, y


def test_mean_log_predictive_density_is_the_gaussian_log_density():
    rng = np.random.default_rng(1)
    y, mean, std = rng.normal(size=(3, 10, 2))
    std = np.abs(std) + 0.1
    expected = norm.logpdf(y, loc=mean, scale=std).mean()
    assert mean_log_predictive_density(y, mean, std) == pytest.approx(expected, rel=1e-12)


def test_mean_log_predictive_density_of_a_student_t():
    rng = np.random.default_rng(2)
    y, mean, std = rng.normal(size=(3, 10, 2))
    std = np.abs(std) + 0.1
    dof = 4.5
    expected = student_t.logpdf(y, dof, loc=mean, scale=std * np.sqrt((dof - 2) / dof))
    score = mean_log_predictive_density(y, mean, std, dof=dof)
    assert score == pytest.approx(expected.mean(), rel=1e-12)
    # the Student-t's variance is std²
    assert student_t.var(dof, scale=np.sqrt((dof - 2) / dof)) == pytest.approx(1.0)


def test_mean_log_predictive_density_rejects_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        mean_log_predictive_density(np.zeros(3), np.zeros(3), np.ones(4))
    with pytest.raises(ValueError, match="y_std must be positive"):
        mean_log_predictive_density(np.zeros(3), np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="dof must be above 2"):
        mean_log_predictive_density(np.zeros(3), np.zeros(3), np.ones(3), dof=2.0)


def test_scorer_includes_the_noise(data):
    net, X, y = data
    reg = FiniteNTKRegressor(net, noise=0.05, prior=0.5).fit(X[:40], y[:40])
    mean, latent_std = reg.predict(X[40:], return_std=True)
    std = np.sqrt(latent_std**2 + reg.noise_)
    expected = norm.logpdf(y[40:], loc=mean, scale=std).mean()
    score = log_predictive_density_scorer(reg, X[40:], y[40:])
    assert score == pytest.approx(expected, rel=1e-10)


def test_scorer_scores_the_student_t_of_auto_hyperparameters(data):
    net, X, y = data
    pipe = make_pipeline(StandardScaler(), FiniteNTKRegressor(net)).fit(X[:40], y[:40])
    dof = pipe[-1].predictive_dof_
    assert np.isfinite(dof)
    mean, std = pipe.predict(X[40:], return_std=True, include_noise=True)
    scale = std * np.sqrt((dof - 2) / dof)
    expected = student_t.logpdf(y[40:], dof, loc=mean, scale=scale).mean()
    score = log_predictive_density_scorer(pipe, X[40:], y[40:])
    assert score == pytest.approx(expected, rel=1e-10)
    assert score != pytest.approx(norm.logpdf(y[40:], loc=mean, scale=std).mean())


def test_scorer_in_grid_search_and_cross_val_score_through_a_pipeline(data):
    net, X, y = data
    grid = {"finitentkregressor__noise": [0.01, 1.0], "finitentkregressor__prior": [0.1]}
    pipe = make_pipeline(StandardScaler(), FiniteNTKRegressor(net))
    search = GridSearchCV(pipe, grid, scoring=log_predictive_density_scorer, cv=KFold(3))
    search.fit(X, y)
    scores = search.cv_results_["mean_test_score"]
    # noise 1.0 is ten times the truth's variance: the density scores it lower
    assert search.best_params_["finitentkregressor__noise"] == 0.01
    assert scores[0] > scores[1]
    folds = cross_val_score(pipe, X, y, scoring=log_predictive_density_scorer, cv=KFold(3))
    assert folds.shape == (3,) and np.all(np.isfinite(folds))
