"""Which remedy keeps the evidence from collapsing the noise on tiny data sets.

On a handful of points the linearized network's kernel can interpolate the
residuals, and the plain evidence maximum (type-II maximum likelihood) puts the noise
at its lower bound on some tasks: intervals far too narrow. This benchmark runs the
few-shot sinusoid transfer of ``examples/sinusoid_transfer.py`` (a 1-40-40-1 tanh
network trained on sin(x), tasks A sin(x + φ) with noise std 0.1) and fits noise and
prior per task by each candidate rule, from the same exact spectral evidence:

- **ML-II**: the plain maximum, noise searched down to 1e-10 · v (v the mean squared
  residual of the context points);
- **floor c**: the plain maximum with the noise bounded below by c · v;
- **IG(α, c)**: the maximum of evidence + log p(σ²), an inverse-gamma hyperprior of
  shape α whose mode (in log σ²) is c · v: the package's default rule is IG(1, 0.01).
  These rows predict with the Gaussian plug-in at the fitted (σ², s);

then **defaults (Student-t)**, ``FiniteNTKRegressor(network)`` as a user gets it: the
IG(1, 0.01) optimum with σ² integrated out (a Student-t predictive with 2 + n degrees
of freedom, whose std is that of the plug-in times √(ν/(ν - 2))). It reports per
context size the share of tasks whose noise ends within a factor 10 of the search's
lower bound (collapsed), mean RMSE against the noise-free truth, mean NLL (Gaussian,
from the predictive std, for every method alike) and 95% coverage (mean ± 1.96 std)
of noisy test observations, with the example's last-layer Bayesian and RBF GP
baselines beside them.

``--family`` draws the tasks from another family, the same way (x ~ U[-5, 5], noise
std 0.1, the network trained on sin x): ``two-sines``, A₁ sin(x + φ₁) + A₂ sin(2x + φ₂)
with A ~ U[0.1, 2.5] and φ ~ U[0, π]; ``quadratic``, a x² + b x + c with
a ~ U[-0.2, 0.2], b ~ U[-1, 1], c ~ U[-1, 1]; tasks on which nothing was tuned. Run
from the repository root::

    python benchmarks/noise_hyperprior.py [--seeds 5] [--tasks 50] [--points 5 10 20]
        [--family sinusoid|two-sines|quadratic] [--rules ...]
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from sinusoid_transfer import (  # noqa: E402
    NOISE_STD,
    TEST_X,
    X_MAX,
    X_MIN,
    Task,
    adapt_last_layer,
    adapt_rbf_gp,
    sample_task,
    score,
    train_source_network,
)

from sklearn_fntk import FiniteNTKRegressor  # noqa: E402
from sklearn_fntk._inference.evidence import spectral_evidence  # noqa: E402
from sklearn_fntk._inference.hyperparameters import (  # noqa: E402
    NOISE_BOUNDS,
    InverseGammaNoise,
    fit_hyperparameters,
)

RULES = {
    "ML-II": ("floor", NOISE_BOUNDS[0]),
    "floor 1e-3": ("floor", 1e-3),
    "floor 1e-2": ("floor", 1e-2),
    "IG(1, 0.01) plug-in": ("ig", 1.0, 1e-2),
    "IG(1, 0.001)": ("ig", 1.0, 1e-3),
    "IG(0.1, 0.01)": ("ig", 0.1, 1e-2),
    "IG(2, 0.01)": ("ig", 2.0, 1e-2),
    "IG(1, 0.02)": ("ig", 1.0, 2e-2),
    "IG(2, 0.02)": ("ig", 2.0, 2e-2),
    "IG(3, 0.01)": ("ig", 3.0, 1e-2),
    "IG(3, 0.02)": ("ig", 3.0, 2e-2),
}


def _two_sines(rng):
    amplitudes, phases = rng.uniform(0.1, 2.5, 2), rng.uniform(0.0, np.pi, 2)
    return lambda x: (
        amplitudes[0] * np.sin(x + phases[0]) + amplitudes[1] * np.sin(2 * x + phases[1])
    )


def _quadratic(rng):
    a, b, c = rng.uniform(-0.2, 0.2), rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0)
    return lambda x: a * x**2 + b * x + c


FAMILIES = {"two-sines": _two_sines, "quadratic": _quadratic}


def sample_family_task(family, rng, n_context):
    """A task as ``sample_task`` draws them, from ``family``'s functions."""
    if family == "sinusoid":
        return sample_task(rng, n_context)
    f = FAMILIES[family](rng)
    x_context = rng.uniform(X_MIN, X_MAX, size=(n_context, 1))
    y_context = f(x_context[:, 0]) + NOISE_STD * rng.standard_normal(n_context)
    f_test = f(TEST_X[:, 0])
    y_test = f_test + NOISE_STD * rng.standard_normal(len(f_test))
    return Task(np.nan, np.nan, x_context, y_context, f_test, y_test)


def fit_rule(evidence, v, rule):
    """(noise, prior) of one rule; ``collapsed`` when the noise is near the floor."""
    if rule[0] == "ig":
        hyperprior = InverseGammaNoise(rule[1], rule[2] * v)
        best = fit_hyperparameters(
            evidence, noise="auto", prior="auto", mean_squared_residual=v,
            hyperprior=hyperprior,
        )  # fmt: skip
        floor = NOISE_BOUNDS[0] * v
    else:
        floor = rule[1] * v
        best = fit_hyperparameters(
            _Floored(evidence, floor), noise="auto", prior="auto",
            mean_squared_residual=v, hyperprior=None,
        )  # fmt: skip
    return best.noise, best.prior, best.noise <= 10 * floor


class _Floored:
    """The evidence with σ² replaced by floor + σ²: a lower bound on the noise."""

    def __init__(self, evidence, floor):
        self.evidence, self.floor = evidence, floor

    def mean_kernel_diagonal(self):
        return self.evidence.mean_kernel_diagonal()

    def log_marginal_likelihood(self, noise, prior, eval_gradient=False):
        value, gradient = self.evidence.log_marginal_likelihood(
            self.floor + noise, prior, eval_gradient=True
        )
        gradient = gradient.copy()
        gradient[0] *= noise / (self.floor + noise)  # d/dlog σ² of the shifted noise
        return value, gradient


DEFAULTS = "defaults (Student-t)"


def run_task(network, task, results, rules):
    x, y = task.x_context, task.y_context
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = FiniteNTKRegressor(network, noise=1.0, prior=1.0, solver="dense")
        base.fit(x, y)
    posterior = base._posterior
    residuals = posterior.residuals.reshape(posterior._shape)
    _, evidence = spectral_evidence(posterior.jacobian, residuals, base.space_)
    v = float(residuals.pow(2).mean())
    for name, rule in rules.items():
        noise, prior, collapsed = fit_rule(evidence, v, rule)
        if rule[0] == "floor":
            noise = noise + rule[1] * v
        reg = FiniteNTKRegressor(network, noise=noise, prior=prior).fit(x, y)
        mean = reg.predict(TEST_X)
        std = reg.predict_std(TEST_X, include_noise=True)
        results[name].append({**score(task, mean, std), "collapsed": collapsed})
    defaults = FiniteNTKRegressor(network, random_state=0).fit(x, y)
    mean, std = defaults.predict(TEST_X, return_std=True, include_noise=True)
    collapsed = defaults.noise_ <= 10 * NOISE_BOUNDS[0] * v
    results[DEFAULTS].append({**score(task, mean, std), "collapsed": collapsed})
    for name, adapt in [
        ("last layer", lambda t: adapt_last_layer(network, t)),
        ("RBF GP", adapt_rbf_gp),
    ]:
        mean, std = adapt(task)
        results[name].append({**score(task, mean, std), "collapsed": False})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds FIRST .. FIRST+SEEDS-1 (choose rules on other seeds than you report)",
    )
    parser.add_argument(
        "--rules", nargs="+", help=f"a subset of the rules {list(RULES)} (default all)"
    )
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument(
        "--family", choices=["sinusoid", *FAMILIES], default="sinusoid",
        help="the tasks' functions (default the sinusoids A sin(x + φ))",
    )  # fmt: skip
    parser.add_argument("--points", type=int, nargs="+", default=[5, 10, 20])
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rules = {name: RULES[name] for name in (args.rules or RULES)}
    names = [*rules, DEFAULTS, "last layer", "RBF GP"]
    table = {n: {name: [] for name in names} for n in args.points}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        network = train_source_network(seed)
        for n in args.points:
            # the sinusoids' stream is the transfer benchmark's test tasks'
            stream = 2 + ["sinusoid", *FAMILIES].index(args.family)
            rng = np.random.default_rng([seed, n, stream])
            for _ in range(args.tasks):
                task = sample_family_task(args.family, rng, n)
                run_task(network, task, table[n], rules)
    for n, results in table.items():
        print(
            f"\n{args.family}: {n} context points, {args.seeds} seeds x {args.tasks} tasks"
        )
        print(
            f"{'rule':<22}{'collapsed':>10}{'RMSE':>8}{'NLL':>10}{'median NLL':>12}"
            f"{'coverage':>10}"
        )
        for name, rows in results.items():
            metric = {key: np.array([row[key] for row in rows]) for key in rows[0]}
            print(
                f"{name:<22}{metric['collapsed'].mean():>10.3f}"
                f"{metric['rmse'].mean():>8.3f}{metric['nll'].mean():>10.3f}"
                f"{np.median(metric['nll']):>12.3f}{metric['coverage'].mean():>10.3f}"
            )
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
