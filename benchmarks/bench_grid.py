"""Grid search over (noise, prior): refitting per pair vs one factorisation per fold.

K(σ², s) = s·G + σ² I with G = J Jᵀ does not depend on the pair, so the 25 pairs x 3
folds that GridSearchCV fits one by one (a Cholesky of K each) can reuse one
factorisation of G_train per fold, whatever the grid:

- the kernel of all n points is formed once, by the package's layerwise kernel
  (``LayerwiseKernel``: per layer, the Hadamard product of the Gram matrices of the
  layer's inputs and of the output gradients; no Jacobian), and sliced per fold into
  G_train (train x train) and the cross kernel G_cross (test x train);
- eigendecomposition G_train = U diag(g) Uᵀ (``SpectralEvidence``, what
  noise="auto" uses): α = K⁻¹ r = U diag(1/(s·g + σ²)) Uᵀ r for every pair;
- or Householder tridiagonalisation G_train = Q T Qᵀ (``TridiagonalKernel`` below,
  LAPACK dsytrd): α = Q (T + (σ²/s) I)⁻¹ Qᵀ r / s, one O(d) tridiagonal solve per
  pair. It skips the eigenvectors (diagonalising T and back-transforming), most of
  the cost of an eigendecomposition here.

Both give the held-out mean f_θ(X_test) + s·G_cross α. Every pair is solved on its own
(nothing uses that this grid has only 9 distinct prior/noise ratios). The reuse is a
helper of this script, not of the package: it scores R² of the regressor's mean with
``prior_mean="network"`` only, where GridSearchCV takes any estimator and scorer.

Both reuse paths must give GridSearchCV's held-out R² (to 1e-6); the script prints the
three timings and the ratios, with one thread and with torch's default thread count
(the BLAS behind scipy gets the same count). Then, on all n points, the evidence
maximiser and log p(y) there: exact, by stochastic Lanczos quadrature, and the
regressor's own ``log_marginal_likelihood()``.

Run from the repository root::

    python benchmarks/bench_grid.py [--n 2000] [--hidden 48] [--threads 1 2] [--repeats 1]
"""

import argparse
import copy
import math
import time

import numpy as np
import torch
from scipy.linalg import lapack
from sklearn.model_selection import GridSearchCV, KFold
from threadpoolctl import threadpool_limits
from torch.func import functional_call, jacrev, vmap

from sklearn_fntk import FiniteNTKRegressor
from sklearn_fntk._inference.evidence import SpectralEvidence
from sklearn_fntk._inference.hyperparameters import maximize_evidence
from sklearn_fntk._inference.stochastic_evidence import stochastic_log_marginal_likelihood
from sklearn_fntk._linearize.layerwise import LayerwiseKernel
from sklearn_fntk._linearize.network import FunctionalNetwork

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


def outputs_and_gram(net, X):
    """f_θ(X) of shape (n,) and G = J Jᵀ of shape (n, n) over all of X, float64.

    By the layerwise kernel the estimator itself uses for this network (and with its
    default chunk of 1024 samples): no Jacobian is formed.
    """
    network = FunctionalNetwork(net, dtype=torch.float64, device="cpu")
    X = torch.as_tensor(X, dtype=torch.float64)
    kernel = LayerwiseKernel(network, X, batch_size=1024)
    return kernel.outputs.reshape(-1), kernel.dense()


class TridiagonalKernel:
    """K⁻¹ r for any (noise, prior) from one tridiagonalisation G = Q T Qᵀ.

    K = s·G + σ² I = s·Q (T + μI) Qᵀ with μ = σ²/s, so α = K⁻¹ r = Q (T + μI)⁻¹ Qᵀ r / s.
    LAPACK's dsytrd reduces G once (Householder, 4/3 d³ flops); then each pair costs one
    positive-definite tridiagonal solve (dptsv, O(d)), and all pairs share one
    application of Qᵀ and one of Q (dormqr on the stored reflectors, O(d²) per
    column). Same interface as ``SpectralEvidence.posterior_mean_coefficients``.

    Parameters
    ----------
    gram : torch.Tensor of shape (d, d)
        G, symmetric positive semi-definite.
    residuals : torch.Tensor of shape (d,)
    """

    def __init__(self, gram, residuals):
        d = gram.shape[0]
        lwork = int(lapack.dsytrd_lwork(d, lower=1)[0])  # blocked; lwork=d is BLAS-2
        reduced, self._diagonal, self._offdiagonal, self._tau, info = lapack.dsytrd(
            np.array(gram.numpy(), dtype=np.float64, order="F"),  # a copy to overwrite
            lower=1,
            lwork=lwork,
            overwrite_a=1,
        )
        assert info == 0, info
        # lower storage: Q = H_1 ⋯ H_{d-1}, reflector i zero above row i + 1, so Q acts
        # on rows 1.. only, as the Q of a QR factorisation stored in reduced[1:, :-1]
        self._reflectors = reduced[1:, :-1]
        self._projected = self._apply_q(residuals.numpy()[:, None], "T")  # Qᵀ r

    def _apply_q(self, B, trans):
        """Q B (trans="N") or Qᵀ B (trans="T") for B of shape (d, m)."""
        B = np.array(B, dtype=np.float64, order="F")
        B[1:], _, info = lapack.dormqr(
            "L", trans, self._reflectors, self._tau, B[1:], lwork=64 * B.shape[1]
        )
        assert info == 0, info
        return B

    def posterior_mean_coefficients(self, noise, prior):
        """α = K⁻¹ r for every broadcast pair: shape (d,) + their shape."""
        noise, prior = np.broadcast_arrays(np.asarray(noise), np.asarray(prior))
        solves = np.empty((self._diagonal.size, noise.size), order="F")
        for j, (sigma2, s) in enumerate(zip(noise.ravel(), prior.ravel(), strict=True)):
            *_, solution, info = lapack.dptsv(
                self._diagonal + sigma2 / s, self._offdiagonal, self._projected
            )
            assert info == 0, info
            solves[:, j] = solution[:, 0] / s
        return self._apply_q(solves, "N").reshape(-1, *noise.shape)


def reused_grid(net, X, y, folds, factorise):
    """The same scores from one factorisation of the training kernel per fold.

    ``factorise(G_train, r)`` returns an object with
    ``posterior_mean_coefficients(noise, prior)``. Returns the scores (n_folds,
    noise, prior), the total time, and the parts of it spent on the kernel of all n
    points and on the factorisations.
    """
    start = time.perf_counter()
    outputs, G = outputs_and_gram(net, X)
    gram_time = time.perf_counter() - start
    factor_time = 0.0
    y = torch.as_tensor(y, dtype=torch.float64)
    noise, prior = np.meshgrid(NOISES, PRIORS, indexing="ij")  # (5, 5)
    scores = np.empty((len(folds), len(NOISES), len(PRIORS)))
    for k, (train, test) in enumerate(folds):
        train, test = torch.as_tensor(train), torch.as_tensor(test)
        r = y[train] - outputs[train]  # prior_mean="network"
        factor_start = time.perf_counter()
        factors = factorise(G[train][:, train], r)
        factor_time += time.perf_counter() - factor_start
        alpha = torch.from_numpy(factors.posterior_mean_coefficients(noise, prior))
        alpha = alpha.reshape(len(train), -1)  # (n_train, 25), pairs row-major
        # mean = f_θ(X_test) + s·G_cross α, for all 25 pairs at once
        cross = G[test][:, train]
        mean = outputs[test, None] + torch.from_numpy(prior.ravel()) * (cross @ alpha)
        scores[k] = r2(y[test], mean).reshape(noise.shape).numpy()
    return scores, time.perf_counter() - start, gram_time, factor_time


REUSES = {
    "eigh per fold": SpectralEvidence.from_kernel,
    "tridiagonal per fold": TridiagonalKernel,
}


def compare(net, X, y, folds, repeats):
    """Time GridSearchCV and both reuses, best of ``repeats`` interleaved rounds; check
    they agree; return GridSearchCV's scores."""
    best = {}
    for _ in range(repeats):
        search_scores, search_time = grid_search_cv(net, X, y, folds)
        best["search"] = min(best.get("search", math.inf), search_time)
        for name, factorise in REUSES.items():
            scores, *times = reused_grid(net, X, y, folds, factorise)
            difference = np.abs(scores - search_scores).max()
            assert difference < 1e-6, (name, difference)
            best[name] = min(best.get(name, (math.inf,)), (*times, difference))
    print(f"  {'GridSearchCV (75 fits)':<32}: {best['search']:6.2f} s")
    for name in REUSES:
        total, gram_time, factor_time, difference = best[name]
        print(
            f"  {name + ' (75 scores)':<32}: {total:6.2f} s = "
            f"{best['search'] / total:4.1f}x cheaper (G of all n {gram_time:.2f} s, "
            f"3 factorisations {factor_time:.2f} s); max |R² difference| "
            f"{difference:.1e}"
        )
    return search_scores


def evidence_comparison(net, X, y):
    """log p(y) on all points at its maximiser: exact, by SLQ, and the regressor's."""
    outputs, J = outputs_and_jacobian(net, X)
    r = torch.as_tensor(y, dtype=torch.float64) - outputs
    n = r.numel()
    start = time.perf_counter()
    evidence = SpectralEvidence.from_kernel(J @ J.T, r)
    eigh_time = time.perf_counter() - start
    start = time.perf_counter()
    best = maximize_evidence(evidence, (0.1, 0.1), bounds=((1e-8, 1e5), (1e-8, 1e5)))
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
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, torch.get_num_threads()],
        help="thread counts to time the grid with (torch and BLAS); default: 1 and "
        "torch's default",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="interleaved rounds; best time kept"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    X, y_source, y = make_data(args.n, args.features, args.seed)
    net = trained_mlp(X, y_source, args.hidden, args.seed)
    p = sum(t.numel() for t in net.parameters())
    folds = list(KFold(3).split(X))
    print(f"n = {args.n}, p = {p}, 3 folds, {len(NOISES)} x {len(PRIORS)} grid")
    for threads in dict.fromkeys(args.threads):
        torch.set_num_threads(threads)
        with threadpool_limits(threads):
            print(f"{threads} thread(s), best of {args.repeats}:")
            search_scores = compare(net, X, y, folds, args.repeats)

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
