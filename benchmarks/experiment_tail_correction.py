"""Experiment: a diagonal tail correction of the low-rank variance (not in the package).

The low-rank variance keeps the top eigenpairs (f_j, v_j) of JᵀJ and gives every other
direction its prior weight, so it never falls below the exact variance but, where
nearly every direction is determined by the data (n ≫ p), far exceeds it. The
correction tried here weighs the tail by the exact diagonal of the tail of JᵀJ,
d = diag((I - VVᵀ) JᵀJ (I - VVᵀ)) (one more pass of explicit Jacobian blocks):

    var(x) ≈ s·[Σ_j (1 - w_j)(j·v_j)² + Σ_i t_i² · c/(d_i + c)],   t = (I - VVᵀ) j,

with w_j = f_j/(f_j + c), c = σ²/s. It is not a bound. The script fits the ``big``
network of bench_scale.py with the defaults used there, then prints, at the first
``--points`` test points, the exact std (block CG on the same fit), the low-rank one
and the corrected one, each as a multiple of the exact.

    python benchmarks/experiment_tail_correction.py --n 10000 --points 20   # 1 minute
    python benchmarks/experiment_tail_correction.py --n 100000 --points 2   # 8 minutes
"""

import argparse
import time

import numpy as np
import torch
from bench_scale import train_test_data, trained_mlp

from sklearn_fntk import FiniteNTKRegressor


def tail_diagonal(jacobian, V):
    """diag((I - VVᵀ) JᵀJ (I - VVᵀ)), shape (p,), from one pass of explicit blocks."""

    def block(J):
        J = J.flatten(0, 1)
        return ((J - (J @ V) @ V.T) ** 2).sum(0)

    return sum(block(J) for _, J in jacobian.jacobian_blocks())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10000, help="training points (10000)")
    parser.add_argument("--points", type=int, default=20, help="test points (20)")
    args = parser.parse_args()
    module = trained_mlp((32, 128, 128, 1))
    X, y, X_test = train_test_data(args.n, 2000, 32, seed=6)
    X, X_test = X.astype(np.float32), X_test.astype(np.float32)
    reg = FiniteNTKRegressor(
        module, noise=1e-2, dtype="float32", tol=1e-4, batch_size=2048, random_state=0
    )
    start = time.perf_counter()
    reg.fit(X, y)
    print(
        f"n={args.n}: fit {time.perf_counter() - start:.1f} s, space={reg.space_}, "
        f"{reg.n_iter_} CG iterations, rank {reg.rank_}, "
        f"tail weight {reg.variance_tail_weight_:.3g}"
    )
    posterior = reg._posterior
    operator = posterior.operator
    prior, c = posterior.prior, posterior.noise / posterior.prior
    low_rank = posterior.low_rank
    V, weights = low_rank.vectors, low_rank.weights
    start = time.perf_counter()
    d = tail_diagonal(operator.jacobian, V)
    print(f"tail diagonal pass {time.perf_counter() - start:.1f} s")

    X_points = torch.as_tensor(X_test[: args.points])
    J_test = operator.test_jacobian(X_points)  # (points, p), one output
    projections = J_test @ V
    tail = J_test - projections @ V.T
    plain = prior * ((J_test**2).sum(1) - (projections**2) @ weights)
    corrected = prior * ((projections**2) @ (1 - weights) + (tail**2) @ (c / (d + c)))
    posterior.low_rank = None  # the exact variance, by CG on the same fit
    start = time.perf_counter()
    exact, _ = posterior.covariance(X_points, diagonal=True)
    posterior.low_rank = low_rank
    print(f"exact std by CG {time.perf_counter() - start:.1f} s")
    for i in range(args.points):
        e, p, q = (float(v[i].sqrt()) for v in (exact, plain, corrected))
        print(
            f"point {i}: exact std {e:.4f}, low-rank {p:.4f} ({p / e:.2f}x), "
            f"tail-corrected {q:.4f} ({q / e:.2f}x)"
        )


if __name__ == "__main__":
    main()
