"""Grid search over (noise, prior): refitting per pair vs one eigendecomposition per fold.

K(σ², s) = s·G + σ² I with G = J Jᵀ does not depend on the pair, so the 25 pairs x 3
folds that GridSearchCV fits one by one (a Cholesky of K each) can reuse, per fold, one
eigendecomposition G_train = U diag(g) Uᵀ (``SpectralEvidence``): for every pair
α = K⁻¹ r = U diag(1/(s·g + σ²)) Uᵀ r, and the held-out mean is
f_θ(X_test) + s·J_test J_trainᵀ α.

Both paths must give the same held-out R² (to 1e-6); the script prints both timings
and their ratio. Then, on all n points, the evidence maximiser and log p(y) there:
exact, by stochastic Lanczos quadrature, and the regressor's own
``log_marginal_likelihood()``.

Run from the repository root::

    python benchmarks/bench_grid.py [--n 2000] [--hidden 48] [--threads 1]
"""

import argparse
import copy
import math
import time

import numpy as np
import torch
from sklearn.model_selection import GridSearchCV, KFold
from torch.func import functional_call, jacrev, vmap

from sklearn_fntk import FiniteNTKRegressor
from sklearn_fntk._evidence import SpectralEvidence, stochastic_log_marginal_likelihood

NOISES = [0.003, 0.01, 0.03, 0.1, 0.3]
PRIORS = [0.001, 0.003, 0.01, 0.03, 0.1]


def make_data(n, n_features, seed):
    """Inputs X, a source task and a related target task, noise variance 0.01.

    As in Maddox et al. (2021), the network is trained on the source task and the
    finite-NTK GP adapts it to the target task: f_W(X) = Σ sin(X W) + ½ tanh(z₁z₂)
    with W and a perturbed W.
    """
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_features))

    def task(W):
        Z = X @ W
        return np.sin(Z).sum(1) + 0.5 * np.tanh(Z[:, 0] * Z[:, 1])

    W = rng.normal(size=(n_features, 3)) / math.sqrt(n_features)
    W_target = W + 0.3 * rng.normal(size=W.shape) / math.sqrt(n_features)
    y_source = task(W) + 0.1 * rng.normal(size=n)
    y_target = task(W_target) + 0.1 * rng.normal(size=n)
    return X, y_source, y_target


def trained_mlp(X, y, hidden, seed, steps=300):
    """A tanh MLP (two hidden layers) fitted by Adam, briefly: the 'trained network'."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(X.shape[1], hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, 1),
    )
    inputs = torch.as_tensor(X, dtype=torch.float32)
    targets = torch.as_tensor(y, dtype=torch.float32)[:, None]
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(net(inputs), targets).backward()
        optimizer.step()
    return net


def outputs_and_jacobian(net, X):
    """f_θ(X) of shape (n,) and the explicit Jacobian J of shape (n, p), float64."""
    net = copy.deepcopy(net).double()
    params = {name: t.detach() for name, t in net.named_parameters()}
    X = torch.as_tensor(X, dtype=torch.float64)

    def single(p, x):
        return functional_call(net, p, (x[None],)).reshape(-1)

    jac = vmap(jacrev(single), in_dims=(None, 0))(params, X)
    J = torch.cat([jac[name].reshape(X.shape[0], -1) for name in params], dim=1)
    with torch.no_grad():
        outputs = net(X).reshape(-1)
    return outputs, J


def r2(y, prediction):
    """R² per column of prediction (m, q) against y (m,)."""
    residual = ((y[:, None] - prediction) ** 2).sum(0)
    return 1.0 - residual / ((y - y.mean()) ** 2).sum()


def grid_search_cv(net, X, y, folds):
    """GridSearchCV over the 5 x 5 grid; split scores as (n_folds, noise, prior)."""
    search = GridSearchCV(
        FiniteNTKRegressor(net, solver="dense"),
        {"noise": NOISES, "prior": PRIORS},
        cv=folds,
        n_jobs=1,
        refit=False,
    )
    start = time.perf_counter()
    search.fit(X, y)
    elapsed = time.perf_counter() - start
    scores = np.empty((len(folds), len(NOISES), len(PRIORS)))
    for i, params in enumerate(search.cv_results_["params"]):
        a, b = NOISES.index(params["noise"]), PRIORS.index(params["prior"])
        for k in range(len(folds)):
            scores[k, a, b] = search.cv_results_[f"split{k}_test_score"][i]
    return scores, elapsed


def spectral_grid(net, X, y, folds):
    """The same scores from one eigendecomposition per fold (J computed once).

    Returns the scores (n_folds, noise, prior), the total time, and the parts of it
    spent on the Jacobian and on the eigendecompositions.
    """
    start = time.perf_counter()
    outputs, J = outputs_and_jacobian(net, X)
    jacobian_time = time.perf_counter() - start
    eigh_time = 0.0
    y = torch.as_tensor(y, dtype=torch.float64)
    noise, prior = np.meshgrid(NOISES, PRIORS, indexing="ij")  # (5, 5)
    scores = np.empty((len(folds), len(NOISES), len(PRIORS)))
    for k, (train, test) in enumerate(folds):
        J_train, J_test = J[train], J[test]
        r = y[train] - outputs[train]  # prior_mean="network"
        eigh_start = time.perf_counter()
        evidence = SpectralEvidence.from_kernel(J_train @ J_train.T, r)
        eigh_time += time.perf_counter() - eigh_start
        alpha = torch.from_numpy(evidence.posterior_mean_coefficients(noise, prior))
        alpha = alpha.reshape(len(train), -1)  # (n_train, 25), pairs row-major
        # mean = f_θ(X_test) + s·J_test J_trainᵀ α, for all 25 pairs at once
        cross = J_test @ J_train.T
        mean = outputs[test, None] + torch.from_numpy(prior.ravel()) * (cross @ alpha)
        scores[k] = r2(y[test], mean).reshape(noise.shape).numpy()
    return scores, time.perf_counter() - start, jacobian_time, eigh_time


def evidence_comparison(net, X, y):
    """log p(y) on all points at its maximiser: exact, by SLQ, and the regressor's."""
    outputs, J = outputs_and_jacobian(net, X)
    r = torch.as_tensor(y, dtype=torch.float64) - outputs
    n = r.numel()
    start = time.perf_counter()
    evidence = SpectralEvidence.from_kernel(J @ J.T, r)
    eigh_time = time.perf_counter() - start
    start = time.perf_counter()
    best = evidence.maximize(0.1, 0.1, random_state=0)
    maximize_time = time.perf_counter() - start
    noise, prior = best.noise, best.prior

    def matmat(V):  # K V = s·J(JᵀV) + σ² V
        return prior * (J @ (J.T @ V)) + noise * V

    start = time.perf_counter()
    slq = stochastic_log_marginal_likelihood(
        matmat,
        r,
        n,
        noise,
        n_probes=64,
        lanczos_steps=50,
        generator=torch.Generator().manual_seed(0),
    )
    slq_time = time.perf_counter() - start
    regressor = FiniteNTKRegressor(net, noise=noise, prior=prior, solver="dense")
    package = regressor.fit(X, y).log_marginal_likelihood()
    exact = best.log_marginal_likelihood
    print(f"evidence maximum, n = {n}      : noise={noise:.4g}, prior={prior:.4g}")
    print(f"  eigh of G, then L-BFGS-B     : {eigh_time:.2f} s + {maximize_time:.2f} s")
    print(f"  log p(y) exact               : {exact:12.3f}")
    print(
        f"  log p(y) SLQ (64 x 50 steps) : {slq.log_marginal_likelihood:12.3f}  "
        f"(s.e. {0.5 * slq.log_det_std_error:.3f}, {slq_time:.2f} s), relative error "
        f"{abs(slq.log_marginal_likelihood / exact - 1):.2e}"
    )
    print(
        f"  FiniteNTKRegressor           : {package:12.3f}  "
        f"(relative difference {abs(package / exact - 1):.1e})"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    X, y_source, y = make_data(args.n, args.features, args.seed)
    net = trained_mlp(X, y_source, args.hidden, args.seed)
    p = sum(t.numel() for t in net.parameters())
    folds = list(KFold(3).split(X))
    print(
        f"n = {args.n}, p = {p}, 3 folds, {len(NOISES)} x {len(PRIORS)} grid, "
        f"torch threads = {torch.get_num_threads()}"
    )

    spectral_scores, spectral_time, jacobian_time, eigh_time = spectral_grid(
        net, X, y, folds
    )
    search_scores, search_time = grid_search_cv(net, X, y, folds)
    difference = np.abs(spectral_scores - search_scores).max()
    print(f"GridSearchCV (75 fits)         : {search_time:8.2f} s")
    print(
        f"one eigh per fold (75 scores)  : {spectral_time:8.2f} s  (Jacobian "
        f"{jacobian_time:.2f} s, 3 x G = J Jᵀ and eigh {eigh_time:.2f} s)"
    )
    print(f"ratio                          : {search_time / spectral_time:8.1f} x")
    print(f"max |R² difference|            : {difference:.2e}")
    assert difference < 1e-6, difference

    # The mean, hence R², depends on (σ², s) only through s/σ²: δ = (JᵀJ + σ²/s I)⁻¹ Jᵀr
    mean_scores = search_scores.mean(0)
    ratios = np.round(
        np.log10(np.divide.outer(1 / np.array(NOISES), 1 / np.array(PRIORS))), 6
    )
    spread = max(np.ptp(mean_scores[ratios == value]) for value in np.unique(ratios))
    a, b = np.unravel_index(mean_scores.argmax(), mean_scores.shape)
    print(
        f"best CV R²                     : {mean_scores[a, b]:.4f} at "
        f"prior/noise = {PRIORS[b] / NOISES[a]:.3g}; R² spread over pairs with equal "
        f"prior/noise: {spread:.1e}"
    )
    evidence_comparison(net, X, y)


if __name__ == "__main__":
    main()
