"""Calibration of FiniteNTKClassifier under domain shift, over seeds and label counts.

The set-up, the methods and the scores are those of ``examples/digits_domain_shift.py``
(imported from there): a CNN (p = 6090) trained on half of scikit-learn's 8x8 digits,
adapted with a few labelled images per class of the other half moved by a shift, and
scored on the rest of that half. Two shifts:

- ``rotate``: every target image rotated by 45 degrees (bilinear, corners filled with
  background), the shift no example uses;
- ``translate``: two pixels to the right, as in the example.

Per shift, labels per class (10 and 20) and seed (5), one source network, then the
example's methods: source only; fine-tuning (all weights, Adam, fixed schedule);
fine-tuning + last-layer Laplace (probit, evidence prior); FiniteNTKClassifier with its
defaults (``prior="auto"``, ``link="map"``). Four diagnostic rows reuse the defaults'
fit and its logit means and covariances from ``predict_latent``: ``link="probit"``,
Monte Carlo over the Gaussian logits with 4000 draws (the exact predictive of the
Laplace posterior, up to its sampling error), the mean-field approximation of that
integral (Lu, Ie and Sha 2020: pairwise differences of logits, with their
correlations), and the Laplace bridge (Hobbhahn, Kristiadi and Hennig 2022, with the
sum-to-zero conditioning of laplace-torch). A last row fits ``prior="loo"`` (the prior
maximising the Laplace leave-one-out predictive instead of the evidence; link "map").
Printed: mean ± standard deviation over the seeds of accuracy, NLL and ECE (15 bins)
per method, then the fitted priors and seconds per seed; with ``--per-seed`` every
run.

Run from the repository root::

    python benchmarks/classifier_shift.py --quick    # rotate, 20 labels, 2 seeds
    python benchmarks/classifier_shift.py            # both shifts, 10 and 20, 5 seeds
    python benchmarks/classifier_shift.py --shifts rotate --labels 10 --seeds 3
"""

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from digits_domain_shift import (  # noqa: E402
    adapt,
    domains,
    scores,
    source_network,
    translate,
)

from sklearn_fntk import FiniteNTKClassifier  # noqa: E402

MC_DRAWS = 4000


def rotate(batch, degrees=45.0):
    """Rotate each (1, 8, 8) image about its centre, background outside."""
    rotated = [ndimage.rotate(image[0], degrees, reshape=False, order=1) for image in batch]
    return np.clip(np.stack(rotated)[:, None], 0.0, 1.0).astype(np.float32)


SHIFTS = {"rotate": rotate, "translate": translate}


def softmax(logits):
    logits = logits - logits.max(-1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(-1, keepdims=True)


def diagnostic_links(mean, cov, seed):
    """Probabilities of the Gaussian logits N(mean, cov) under three more links."""
    k = mean.shape[1]
    variance = np.diagonal(cov, axis1=1, axis2=2)
    # Monte Carlo: the same draws for every point
    draws = np.random.default_rng(seed).standard_normal((MC_DRAWS, k))
    values, vectors = np.linalg.eigh(cov)
    roots = vectors * np.sqrt(np.clip(values, 0.0, None))[:, None, :]
    mc = np.stack(
        [softmax(m + draws @ r.T).mean(0) for m, r in zip(mean, roots, strict=True)]
    )
    # mean-field: p_a ∝ 1 / (1 + Σ_b≠a exp(-(μ_a - μ_b) / √(1 + π/8 · var(f_a - f_b))))
    pair_variance = variance[:, :, None] + variance[:, None, :] - 2 * cov
    gaps = mean[:, :, None] - mean[:, None, :]
    terms = np.exp(-gaps / np.sqrt(1.0 + math.pi / 8.0 * pair_variance))
    terms[:, np.arange(k), np.arange(k)] = 0.0
    mean_field = 1.0 / (1.0 + terms.sum(2))
    mean_field /= mean_field.sum(1, keepdims=True)
    # Laplace bridge, after conditioning the Gaussian on Σ_a f_a = 0
    rows, total = cov.sum(2), cov.sum((1, 2))
    centred = mean - rows * mean.sum(1, keepdims=True) / total[:, None]
    conditioned = cov - rows[:, :, None] * rows[:, None, :] / total[:, None, None]
    spread = np.diagonal(conditioned, axis1=1, axis2=2)
    alpha = (
        1.0 - 2.0 / k + np.exp(centred) / k**2 * np.exp(-centred).sum(1, keepdims=True)
    ) / spread
    return {
        f"  Monte Carlo ({MC_DRAWS} draws)": mc,
        "  mean-field": mean_field,
        "  Laplace bridge": alpha / alpha.sum(1, keepdims=True),
    }


def run(shift, labels_per_class, seed):
    """Scores per method, the fitted prior and seconds, for one configuration."""
    data = domains(SHIFTS[shift], labels_per_class=labels_per_class, seed=seed)
    network = source_network(data, seed=seed)
    probabilities, seconds, ntk = adapt(network, data, seed=seed)
    mean, cov = ntk.predict_latent(data["X_test"])
    # the defaults' probabilities are the softmax of the latent mean
    assert np.allclose(softmax(mean), probabilities["FiniteNTKClassifier"], atol=1e-10)
    probabilities.update(diagnostic_links(mean, cov, seed))
    loo = FiniteNTKClassifier(network, prior="loo", random_state=seed)
    start = time.perf_counter()
    probabilities['FiniteNTKClassifier, prior="loo"'] = loo.fit(
        data["X_adapt"], data["y_adapt"]
    ).predict_proba(data["X_test"])
    seconds["loo"] = time.perf_counter() - start
    rows = {method: scores(p, data["y_test"]) for method, p in probabilities.items()}
    variance = np.diagonal(cov, axis1=1, axis2=2).mean()
    return rows, (ntk.prior_, loo.prior_), variance, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shifts", nargs="+", choices=list(SHIFTS), default=list(SHIFTS))
    parser.add_argument("--labels", nargs="+", type=int, default=[10, 20])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--per-seed", action="store_true")
    parser.add_argument("--quick", action="store_true", help="rotate, 20 labels, 2 seeds")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.shifts, args.labels, args.seeds = ["rotate"], [20], 2
    torch.set_num_threads(args.threads)
    print(
        f"digits, CNN (p=6090), {args.seeds} seeds; torch {torch.__version__}, "
        f"{args.threads} thread(s)"
    )
    for shift in args.shifts:
        for labels in args.labels:
            results, priors, variances, seconds = [], [], [], []
            start = time.perf_counter()
            for seed in range(args.seeds):
                rows, prior, variance, times = run(shift, labels, seed)
                results.append(rows)
                priors.append(prior)
                variances.append(variance)
                seconds.append(times)
                if args.per_seed:
                    print(f"  {shift}, {labels} labels/class, seed {seed}")
                    for method, score in rows.items():
                        print(
                            f"    {method:<36}{score['accuracy']:>7.3f}"
                            f"{score['NLL']:>7.3f}{score['ECE']:>7.3f}"
                        )
            elapsed = time.perf_counter() - start
            print(
                f"\n{shift}, {labels} labels per class ({10 * labels} images), "
                f"{args.seeds} seeds, {elapsed:.0f} s: mean ± std over seeds"
            )
            print(f"{'method':<38}{'accuracy':>15}{'NLL':>15}{'ECE':>15}")
            for method in results[0]:
                cells = []
                for metric in ("accuracy", "NLL", "ECE"):
                    values = np.array([rows[method][metric] for rows in results])
                    cells.append(f"{values.mean():.3f} ± {values.std():.3f}")
                print(f"{method:<38}" + "".join(f"{cell:>15}" for cell in cells))
            print(
                f"prior_ by the evidence: {', '.join(f'{p:.3g}' for p, _ in priors)}; "
                f"by leave-one-out: {', '.join(f'{p:.3g}' for _, p in priors)}; mean "
                f"test-logit variance at the evidence's: "
                f"{', '.join(f'{v:.1f}' for v in variances)}"
            )
            print(
                "seconds per seed (fit and predict): defaults "
                f"{np.mean([t['FiniteNTKClassifier'] for t in seconds]):.1f}, "
                f'prior="loo" {np.mean([t["loo"] for t in seconds]):.1f}, fine-tuning '
                f"{np.mean([t['fine-tuning'] for t in seconds]):.1f}"
            )


if __name__ == "__main__":
    main()
