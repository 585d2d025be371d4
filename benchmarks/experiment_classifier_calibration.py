"""Why the classifier's Laplace predictive is under-confident on shifted digits.

An experiment behind the user guide's "Calibration" section, not a benchmark: on one
configuration of ``benchmarks/classifier_shift.py`` (default: translated digits, 20
labels per class, seed 0), it fits FiniteNTKClassifier under several priors and scores
the Gaussian logits each gives, N(μ*, Σ*) from ``predict_latent``, by the exact
predictive E[softmax(f)] (Monte Carlo, 4000 draws), the probit link and the posterior
mode (``link="map"``). Rows:

- ``scale s``: isotropic priors s·I over a grid, and the evidence's maximiser;
- ``per layer``: one prior variance per layer (conv1, conv2, fc), maximising the
  package's Laplace evidence over the three by Nelder-Mead; a per-parameter prior
  variance c_j² is the isotropic prior of the network whose parameter j is c_j times
  a new one (``Scaled`` below), so the package fits it unchanged;
- ``g-prior``: each weight's prior variance s / diag(JᵀΛJ)_j (Λ at the source
  network's predictions on the labelled images; Antorán et al. 2023), s by the
  evidence;
- ``zero prior mean``: ``prior_mean="zero"``, s by the evidence;
- ``tempered τ``: the evidence's fit with its covariances scaled by τ (how much too
  wide the Laplace posterior is).

Run from the repository root (about 10 minutes on one core)::

    python benchmarks/experiment_classifier_calibration.py
    python benchmarks/experiment_classifier_calibration.py --shift rotate --labels 10
"""

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize
from sklearn.exceptions import ConvergenceWarning
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from classifier_shift import SHIFTS, diagnostic_links, softmax  # noqa: E402
from digits_domain_shift import domains, scores, source_network  # noqa: E402

from sklearn_fntk import FiniteNTKClassifier  # noqa: E402

LAYERS = {
    "conv1": ("0.weight", "0.bias"),
    "conv2": ("3.weight", "3.bias"),
    "fc": ("7.weight", "7.bias"),
}


class Scaled(torch.nn.Module):
    """``module`` whose parameter ``name`` is ``scales[name]`` times a new parameter.

    An isotropic prior N(θ', s·I) on the new parameters is a prior of variance
    s·scale² on the original ones, elementwise.
    """

    def __init__(self, module, scales):
        super().__init__()
        self.module = copy.deepcopy(module).eval()
        self.scales = {name: torch.as_tensor(scale) for name, scale in scales.items()}
        self.names = [name for name, _ in self.module.named_parameters()]
        self.inner = torch.nn.ParameterList(
            torch.nn.Parameter(param.detach() / self.scales[name])
            for name, param in self.module.named_parameters()
        )

    def forward(self, x):
        weights = {
            name: param * self.scales[name].to(param.dtype)
            for name, param in zip(self.names, self.inner, strict=True)
        }
        return functional_call(self.module, weights, (x,))


def row(name, clf, data, tau=1.0):
    """Scores of the fit's Gaussian logits: Monte Carlo, probit and mode."""
    mean, cov = clf.predict_latent(data["X_test"])
    cov = tau * cov
    y = data["y_test"]
    mc = scores(diagnostic_links(mean, cov, 0)["  Monte Carlo (4000 draws)"], y)
    variance = np.diagonal(cov, axis1=1, axis2=2)
    probit = scores(softmax(mean / np.sqrt(1.0 + np.pi / 8.0 * variance)), y)
    mode = scores(softmax(mean), y)
    evidence = clf.log_marginal_likelihood() if tau == 1.0 else float("nan")
    print(
        f"{name:<34}{evidence:>9.2f}{variance.mean():>9.3g}"
        + "".join(
            f"{s['accuracy']:>7.3f}{s['NLL']:>7.3f}{s['ECE']:>7.3f}"
            for s in (mc, probit, mode)
        ),
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shift", choices=list(SHIFTS), default="translate")
    parser.add_argument("--labels", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = domains(SHIFTS[args.shift], labels_per_class=args.labels, seed=args.seed)
    network = source_network(data, seed=args.seed)
    X, y = data["X_adapt"], data["y_adapt"]
    start = time.perf_counter()
    print(f"{args.shift}, {args.labels} labels per class, seed {args.seed}")
    print(
        f"{'prior':<34}{'log ev.':>9}{'var':>9}"
        f"{'MC: acc':>9}{'NLL':>7}{'ECE':>7}{'probit':>7}{'NLL':>7}{'ECE':>7}"
        f"{'map':>7}{'NLL':>7}{'ECE':>7}"
    )

    def fit(module, **options):
        return FiniteNTKClassifier(module, random_state=0, **options).fit(X, y)

    best = fit(network)
    for s in (0.003, 0.01, 0.03, 0.1, 1.0):
        row(f"scale s = {s:g}", fit(network, prior=s), data)
    row(f"scale s = {best.prior_:.3g} (evidence)", best, data)

    def per_layer(log_variances):
        scales = {
            name: np.exp(0.5 * log_variance)
            for (layer, names), log_variance in zip(
                LAYERS.items(), log_variances, strict=True
            )
            for name in names
        }
        return fit(Scaled(network, scales), prior=1.0)

    start_point = np.full(3, np.log(best.prior_))
    result = minimize(
        lambda v: -per_layer(v).log_marginal_likelihood(),
        start_point,
        method="Nelder-Mead",
        options={"xatol": 0.02, "fatol": 0.01, "maxfev": 80},
    )
    variances = ", ".join(f"{np.exp(v):.3g}" for v in result.x)
    row(f"per layer ({variances})", per_layer(result.x), data)

    # g-prior: variance s / diag(JᵀΛJ) at the source network's predictions
    with warnings.catch_warnings():  # one Newton step is all the probe needs
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe = FiniteNTKClassifier(network, prior=1.0, max_newton_iter=1).fit(X, y)
    jacobian = probe._posterior.jacobian
    with torch.no_grad():
        probs = torch.softmax(jacobian.outputs, dim=1)
    curvature = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    fisher = sum(
        torch.einsum("iap,iab,ibp->p", J, curvature[rows], J)
        for rows, J in jacobian.jacobian_blocks()
    )
    scale = (1.0 / fisher.clamp_min(1e-12 * fisher.max()).sqrt()).float()
    pieces = torch.split(scale, [p.numel() for p in network.parameters()])
    scales = {
        name: piece.reshape(param.shape)
        for (name, param), piece in zip(network.named_parameters(), pieces, strict=True)
    }
    g_prior = fit(Scaled(network, scales))
    row(f"g-prior (s = {g_prior.prior_:.3g}, evidence)", g_prior, data)
    zero = fit(network, prior_mean="zero")
    row(f"zero prior mean (s = {zero.prior_:.3g})", zero, data)
    for tau in (0.3, 0.1, 0.03, 0.01):
        row(f"evidence fit, tempered τ = {tau:g}", best, data, tau=tau)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
