"""Lanczos steps of the matrix-free evidence against its exact optimum.

noise="auto" and prior="auto" on the CG path maximise a Lanczos quadrature of the
evidence (``LanczosSpectrum``): ``Policy.evidence_probes`` Rademacher
probes of ``Policy.evidence_log_det_steps`` steps for log|K|, and
``Policy.evidence_quadratic_steps`` steps from Jᵀr for the quadratic term. This
script fits the same data with the dense solver (the exact evidence, one float64
eigendecomposition of JᵀJ) and then with CG in parameter space under several
(probes, log-det steps, quadratic steps), and prints each optimum, the exact log
evidence there, and the quadrature's own error bound there
(``SpectralEvidence.quadrature_gap``, its Gauss against its Gauss-Radau rules). The
defaults start the runs at the default steps and double them until that gap is
under ``Policy.evidence_gap_nats`` at the optimum (``reached``: the steps they
ended at); the other rows hold their steps fixed.

    python benchmarks/evidence_steps.py [--n 20000] [--widths 8 64 64 1]

Data: ``bench_scale.make_data`` (seed 5) plus noise of std 0.1; network:
``bench_scale.trained_mlp`` (MLP 8-64-64-1, p = 4801, 300 Adam steps). float64, so
that only the quadrature's steps and probes differ from the exact evidence.
"""

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import make_data, trained_mlp  # noqa: E402

from sklearn_fntk import FiniteNTKRegressor  # noqa: E402
from sklearn_fntk._inference.policy import Policy  # noqa: E402

# (probes, log-det steps, quadratic steps, max growth); the first is the default
# Policy (the runs start there and double until resolved at the optimum), the others
# run their steps only (max growth 1), as every fit did before the runs could grow
SETTINGS = (
    (16, 150, 200, 8),
    (16, 150, 200, 1),
    (64, 150, 200, 1),
    (16, 400, 1000, 1),
    (16, 300, 400, 1),
    (16, 600, 800, 1),
)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 64, 64, 1])
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # the unconverged settings warn: the gap column
    module = trained_mlp(args.widths)
    X, y = make_data(args.n, args.widths[0], seed=5)
    y = y + 0.1 * np.random.default_rng(1).normal(size=args.n)
    exact = FiniteNTKRegressor(
        module, space="parameter", dtype="float64", solver="dense"
    ).fit(X, y)
    value = exact.log_marginal_likelihood_value_
    print(f"n={args.n}, p={exact.n_params_}: exact optimum noise {exact.noise_:.5g}, "
          f"prior {exact.prior_:.5g}, log evidence {value:.1f}")  # fmt: skip
    print(f"{'probes':>6} {'log-det':>7} {'quadr.':>6} {'growth':>6} {'reached':>9} "
          f"{'noise':>9} {'prior':>9} {'exact log evidence there':>25} {'gap':>8} "
          f"{'seconds':>8}")  # fmt: skip
    for probes, log_det_steps, quadratic_steps, growth in SETTINGS:
        reg = FiniteNTKRegressor(
            module, space="parameter", dtype="float64", solver="cg", random_state=0
        )
        reg._policy = dataclasses.replace(
            Policy(),
            evidence_probes=probes,
            evidence_log_det_steps=log_det_steps,
            evidence_quadratic_steps=quadratic_steps,
            evidence_max_growth=growth,
        )
        start = time.perf_counter()
        reg.fit(X, y)
        seconds = time.perf_counter() - start
        there = exact.log_marginal_likelihood(reg.noise_, reg.prior_)
        evidence = reg._evidence
        gap = evidence.quadrature_gap(reg.noise_, reg.prior_)
        # the steps the runs reached: their Gauss rules' nodes
        reached = (f"{evidence._log_det_nodes.numel() // probes}/"
                   f"{evidence.eigenvalues.numel()}")  # fmt: skip
        print(f"{probes:6d} {log_det_steps:7d} {quadratic_steps:6d} {growth:6d} "
              f"{reached:>9} {reg.noise_:9.5g} {reg.prior_:9.5g} {there:25.1f} "
              f"{gap:8.3g} {seconds:8.0f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
