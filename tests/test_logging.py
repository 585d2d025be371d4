"""``verbose`` through the ``logging`` module: each stage of fit and predict with its
wall time (``_stages``, ``_progress``), nothing at INFO unless asked for, tqdm bars
with a total, and the logging configuration restored after a verbose call."""

import logging
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
from networks import mlp, regression_data
from torch import nn

from sklearn_fntk import FiniteNTKClassifier, FiniteNTKRegressor, _progress
from sklearn_fntk._inference.policy import Policy

LOGGER = "sklearn_fntk"


@pytest.fixture(scope="module")
def data():
    X, Y, X_test = regression_data(n=80, m=7, seed=5)
    return X, Y[:, 0], X_test


def stage_records(caplog):
    return [r for r in caplog.records if r.name == LOGGER and hasattr(r, "stage")]


def check_timed(records, caller, names):
    """Each stage of ``names`` logged once at INFO, by ``caller``, with its time."""
    by_name = {}
    for record in records:
        if record.levelno == logging.INFO:
            by_name.setdefault(record.stage, []).append(record)
    for name in names:
        assert len(by_name.get(name, [])) == 1, (name, sorted(by_name))
        (record,) = by_name[name]
        assert record.seconds >= 0.0
        message = record.getMessage()
        assert message.startswith(f"{caller}: ")
        assert message.endswith(f" in {record.seconds:.3f} s")
    return {name: by_name[name][0] for name in names}


# With CG the evidence is exact (JᵀJ and its eigendecomposition) up to
# Policy.eigen_size parameters, by Lanczos quadrature above.
EVIDENCE_STAGES = {
    "exact": ["Gram matrix", "evidence: eigendecomposition"],
    "lanczos": ["evidence: Lanczos, quadratic term", "evidence: Lanczos, log-determinant"],
}


@pytest.mark.parametrize("evidence", ["exact", "lanczos"])
def test_cg_fit_logs_every_stage_with_its_time(data, caplog, evidence):
    X, y, X_test = data
    regressor = FiniteNTKRegressor(mlp(), solver="cg", random_state=0, verbose=1)
    if evidence == "lanczos":
        regressor._policy = Policy(eigen_size=0)
    regressor.fit(X, y)
    stages = check_timed(
        stage_records(caplog),
        "FiniteNTKRegressor.fit",
        [
            "validation and network copy",
            "linearization",
            *EVIDENCE_STAGES[evidence],
            "evidence search",
            "preconditioner",
            "solve (cg, parameter space)",
            "condition number",
            "variance factor",
        ],
    )
    solve = stages["solve (cg, parameter space)"].details
    assert solve["iterations"] == regressor.n_iter_
    assert 0 < solve["residual"] <= regressor.tol
    search = stages["evidence search"].details
    assert (search["noise"], search["prior"]) == (regressor.noise_, regressor.prior_)
    assert stages["preconditioner"].details["rank"] == regressor.rank_
    assert stages["linearization"].details == {"samples": 80, "parameters": 61}

    caplog.clear()
    regressor.predict(X_test, return_std=True)
    check_timed(stage_records(caplog), "FiniteNTKRegressor.predict", ["mean", "variances"])


def test_dense_fit_logs_its_stages(data, caplog):
    X, y, _ = data
    FiniteNTKRegressor(mlp(), verbose=1).fit(X, y)
    check_timed(
        stage_records(caplog),
        "FiniteNTKRegressor.fit",
        [
            "linearization",
            "Gram matrix",
            "evidence: eigendecomposition",
            "evidence search",
            "dense factor",
            "solve (dense, parameter space)",
        ],
    )


def test_classifier_logs_newton_and_the_prior_search(data, caplog):
    X, y, X_test = data
    clf = FiniteNTKClassifier(mlp(), verbose=1).fit(X, y > 0)
    records = stage_records(caplog)
    stages = check_timed(
        records,
        "FiniteNTKClassifier.fit",
        ["validation and network copy", "linearization", "evidence search (prior='auto')"],
    )
    newton = [r for r in records if r.stage == "Newton's method"]
    assert len(newton) >= clf.n_evidence_evaluations_
    assert all(r.depth == 1 for r in newton)  # inside the search
    assert newton[-1].getMessage().startswith("FiniteNTKClassifier.fit:   Newton's")
    assert {r.details["prior"] for r in newton} >= {clf.prior_}
    assert stages["evidence search (prior='auto')"].details["prior"] == clf.prior_
    caplog.clear()
    clf.predict_proba(X_test)
    check_timed(
        stage_records(caplog),
        "FiniteNTKClassifier.predict",
        [f"logits and {clf.link} link"],
    )


def test_verbose_0_logs_nothing_at_info_by_default(data, caplog):
    X, y, X_test = data
    FiniteNTKRegressor(mlp(), solver="cg").fit(X, y).predict(X_test, return_std=True)
    assert not [r for r in caplog.records if r.name.startswith(LOGGER)]


def test_verbose_0_logs_where_the_user_lets_info_through(data, caplog):
    X, y, _ = data
    caplog.set_level(logging.INFO, logger=LOGGER)
    FiniteNTKRegressor(mlp(), solver="cg").fit(X, y)
    records = stage_records(caplog)
    assert "solve (cg, parameter space)" in {r.stage for r in records}
    assert all(r.levelno == logging.INFO for r in records)  # no DEBUG steps


def test_verbose_2_logs_the_steps_at_debug(data, caplog):
    X, y, _ = data
    regressor = FiniteNTKRegressor(mlp(), noise=0.1, prior=1.0, solver="cg", verbose=2)
    regressor.fit(X, y)
    steps = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.DEBUG and " step " in r.getMessage()
    ]
    limit = 10 * regressor.n_params_  # max_iter=None: 10 times the system size
    assert f"solve (cg, parameter space) step 1/{limit} (residual=" in steps[0]
    assert len(steps) == 1 + regressor.n_iter_ // 10  # the first and every tenth


def test_a_failed_stage_is_logged_as_failed(data, caplog):
    X, y, _ = data

    class NaNAfterFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 1)

        def forward(self, x):
            out = self.linear(x)[:, 0]
            return torch.where(torch.arange(len(x)) == 5, torch.nan, out)

    with pytest.raises(ValueError, match="NaN or infinite for 1 of 80 samples"):
        FiniteNTKRegressor(NaNAfterFirst(), verbose=1).fit(X, y)
    (failed,) = [r for r in stage_records(caplog) if "failed after" in r.getMessage()]
    assert failed.stage == "linearization"


def test_verbose_restores_the_logging_configuration(data):
    X, y, _ = data
    logger = logging.getLogger(LOGGER)
    level, handlers = logger.level, list(logger.handlers)
    FiniteNTKRegressor(mlp(), verbose=2).fit(X, y)
    assert (logger.level, logger.handlers) == (level, handlers)


SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from networks import mlp, regression_data
    from sklearn_fntk import FiniteNTKRegressor
    X, Y, _ = regression_data(n=40, m=1, seed=0)
    FiniteNTKRegressor(mlp(), noise=0.1, prior=1.0, verbose={verbose}).fit(X, Y[:, 0])
    """
)


@pytest.mark.parametrize("verbose", [0, 1])
def test_verbose_writes_to_stderr_where_nothing_is_configured(verbose):
    tests = str(__import__("pathlib").Path(__file__).parent)
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(tests=tests, verbose=verbose)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == ""
    lines = completed.stderr.splitlines()
    if verbose == 0:
        assert lines == []
    else:
        assert lines[0].startswith("FiniteNTKRegressor.fit: validation and network copy")
        assert lines[-2].startswith("FiniteNTKRegressor.fit: solve (dense, ")
        assert lines[-1].startswith("FiniteNTKRegressor.fit: condition number")
        assert all(line.endswith(" s") for line in lines)


class FakeBar:
    """Stands in for tqdm: records its total, its updates and whether it closed."""

    bars = []

    def __init__(self, total, desc, leave, position):
        self.total, self.desc, self.n, self.closed = total, desc, 0, False
        FakeBar.bars.append(self)

    def update(self, n):
        self.n += n

    def set_postfix_str(self, text, refresh):
        self.postfix = text

    def close(self):
        self.closed = True


def test_tqdm_bars_with_a_total(data, monkeypatch):
    X, y, _ = data
    module = types.ModuleType("tqdm.auto")
    module.tqdm = FakeBar
    monkeypatch.setitem(sys.modules, "tqdm", types.ModuleType("tqdm"))
    monkeypatch.setitem(sys.modules, "tqdm.auto", module)
    monkeypatch.setattr(_progress, "_HAS_TQDM", True)
    FakeBar.bars = []
    regressor = FiniteNTKRegressor(mlp(), noise=0.1, prior=1.0, solver="cg", verbose=1)
    regressor.fit(X, y)
    (bar,) = FakeBar.bars
    assert bar.desc == "FiniteNTKRegressor.fit: solve (cg, parameter space)"
    assert (bar.total, bar.n) == (10 * regressor.n_params_, regressor.n_iter_)
    assert bar.closed
    assert bar.postfix.startswith("residual=")
    FakeBar.bars = []
    regressor.set_params(verbose=0).fit(X, y)  # no bars without verbose
    assert FakeBar.bars == []
    regressor.set_params(verbose=1, batch_size=30).predict(np.vstack([X] * 2))
    (bar,) = FakeBar.bars
    assert (bar.desc, bar.total, bar.n) == ("FiniteNTKRegressor.predict: mean", 6, 6)
