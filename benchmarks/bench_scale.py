"""Scale: preconditioning, finite-difference FVPs, low-rank variance, big n.

Each experiment runs its competitors side by side in one process and prints ratios,
so that the numbers survive a shared, drifting machine:

    python benchmarks/bench_scale.py nystrom        # CG iterations, none vs Nyström
    python benchmarks/bench_scale.py fvp            # exact vs finite-difference FVP
    python benchmarks/bench_scale.py low_rank       # low-rank vs exact predict_std
    python benchmarks/bench_scale.py reference      # defaults vs explicit Jacobian
    python benchmarks/bench_scale.py big            # n = 100,000 in float32: time, RSS

``--quick`` shrinks every size (for a smoke run). The networks are MLPs trained for a
few hundred Adam steps on a smooth synthetic target, so that their NTK spectra are
those of trained networks, not of random initialisations.
"""

import argparse
import resource
import time
import warnings

import numpy as np
import torch
from torch import nn

from sklearn_fntk import FiniteNTKRegressor, _base
from sklearn_fntk._inference import gaussian, low_rank, system
from sklearn_fntk._inference.policy import Policy
from sklearn_fntk._linalg import preconditioners
from sklearn_fntk._linearize.jacobian import JacobianProducts
from sklearn_fntk._linearize.network import FunctionalNetwork


def trained_mlp(widths, n_train=2000, steps=300, seed=0):
    """An MLP with ``widths`` (input, hidden..., output), trained briefly."""
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    module = nn.Sequential(*layers[:-1])
    X, y = make_data(n_train, widths[0], seed=seed + 1)
    X, y = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        ((module(X)[:, 0] - y) ** 2).mean().backward()
        optimizer.step()
    return module


def make_data(n, d, seed=0):
    """Inputs N(0, I) and a smooth target sin(x·a) + 0.5 cos(x·b)."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=d) / np.sqrt(d), rng.normal(size=d) / np.sqrt(d)
    X = rng.normal(size=(n, d))
    return X, np.sin(X @ a) + 0.5 * np.cos(2 * X @ b)


def train_test_data(n, m, d, seed):
    """n training inputs and targets, and m test inputs, from :func:`make_data`."""
    X, y = make_data(n + m, d, seed=seed)
    return X[:n], y[:n], X[n:]


def timed(call):
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


class SketchTimer:
    """Seconds spent building preconditioners and low-rank variances in fits.

    While active, wraps the posterior's setup steps: ``seconds`` accumulates the
    whole setup (preconditioner and low-rank variance), ``preconditioner`` the part
    spent building preconditioners (Nyström sketches, pivoted Cholesky, Jacobi).
    A low-rank variance's sketch also preconditions CG; its Rayleigh-Ritz passes
    over the data (or its eigendecomposition) count as variance only.
    """

    SETUP = (
        (gaussian, "build_preconditioner"),
        (gaussian, "low_rank_from_sketch"),
        (gaussian, "low_rank_from_eigenpairs"),
    )
    PRECONDITIONER = (
        (system, "nystrom_sketch"),
        (low_rank, "nystrom_sketch"),
        (preconditioners.PivotedCholeskyPreconditioner, "__init__"),
        (preconditioners.JacobiPreconditioner, "__init__"),
    )

    def __enter__(self):
        self.seconds, self.preconditioner, self._originals = 0.0, 0.0, []
        targets = [(owner, name, "seconds") for owner, name in self.SETUP]
        targets += [(owner, name, "preconditioner") for owner, name in self.PRECONDITIONER]
        for owner, name, total in targets:
            original = getattr(owner, name)
            self._originals.append((owner, name, original))

            def timed_method(*args, _original=original, _total=total, **kwargs):
                result, seconds = timed(lambda: _original(*args, **kwargs))
                setattr(self, _total, getattr(self, _total) + seconds)
                return result

            setattr(owner, name, timed_method)
        return self

    def __exit__(self, *exc):
        for owner, name, original in self._originals:
            setattr(owner, name, original)


def warm_up(module, X, y):
    """One small fit: the first torch.func call in a process costs seconds."""
    FiniteNTKRegressor(module, solver="cg", max_iter=2).fit(X[:64], y[:64])


def relative(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def mean_kernel_diagonal(module, X):
    network = FunctionalNetwork(module, dtype=torch.float64, device="cpu")
    jacobian = JacobianProducts(
        network, network.theta, torch.as_tensor(X[:200]), batch_size=200
    )
    J = jacobian.jacobian(slice(0, 200))
    return float((J**2).sum((1, 2)).mean())


def nystrom(args):
    n = 500 if args.quick else 2000
    module = trained_mlp((8, 64, 64, 1))
    X, y = make_data(n, 8, seed=2)
    noise = 1e-4 * mean_kernel_diagonal(module, X)
    print(f"n={n}, MLP 8-64-64-1, noise = 1e-4 x mean kernel diagonal = {noise:.3g}")
    warm_up(module, X, y)
    results = {}
    for preconditioner in [None, "jacobi", "nystrom", "pivoted_cholesky"]:
        reg = FiniteNTKRegressor(
            module,
            noise=noise,
            solver="cg",
            space="function",
            tol=1e-6,
            preconditioner=preconditioner,
            variance="exact",
            random_state=0,
        )
        with warnings.catch_warnings(), SketchTimer() as sketch:
            warnings.simplefilter("ignore")
            _, seconds = timed(lambda reg=reg: reg.fit(X, y))
        results[preconditioner] = (
            reg.n_iter_,
            reg.rank_,
            seconds,
            sketch.preconditioner,
            reg.predict(X[:200]),
        )
    base_iter, _, base_time, _, base_pred = results[None]
    print(
        f"{'preconditioner':>18} {'iters':>6} {'rank':>5} {'iters/none':>10} "
        f"{'fit time/none':>13} {'build/fit':>9} {'pred rel diff':>13}"
    )
    for name, (iters, rank, seconds, build, pred) in results.items():
        print(
            f"{name!s:>18} {iters:6d} {rank:5d} {iters / base_iter:10.3f} "
            f"{seconds / base_time:13.3f} {build / seconds:9.2f} "
            f"{relative(pred, base_pred):13.2e}"
        )


def fvp(args):
    n = 4000 if args.quick else 20000
    module = trained_mlp((10, 64, 64, 1))
    X, y = make_data(n, 10, seed=3)
    common = dict(
        noise=1e-2,
        solver="cg",
        space="parameter",
        tol=1e-6,
        preconditioner="nystrom",
        random_state=0,
        variance="exact",
    )
    warm_up(module, X, y)
    # "exact, fresh": the exact product without the cached linearization, a fresh
    # JVP and VJP per product: the form the paper's finite-difference product was
    # compared with (and what the exact product costs where the cache does not fit).
    configurations = [
        ("exact, cached", "exact", _base.LINEARIZATION_CACHE_BYTES),
        ("exact, fresh", "exact", 0),
        ("finite diff.", "finite_difference", 0),
    ]
    # The best of two fits each, in interleaved rounds: identical sketches varied
    # ±40% run to run, and a fixed order would favour whichever runs on a quiet spell.
    runs = {name: [] for name, _, _ in configurations}
    regressors = {}
    default_cache = _base.LINEARIZATION_CACHE_BYTES
    for _ in range(2):
        for name, product, cache_bytes in configurations:
            reg = FiniteNTKRegressor(module, fisher_product=product, **common)
            _base.LINEARIZATION_CACHE_BYTES = cache_bytes
            try:
                with SketchTimer() as sketch:
                    _, seconds = timed(lambda reg=reg: reg.fit(X, y))
            finally:
                _base.LINEARIZATION_CACHE_BYTES = default_cache
            runs[name].append((seconds, sketch.preconditioner))
            regressors[name] = reg
    fits = {name: (regressors[name], *min(runs[name])) for name in runs}
    fd, fd_seconds, fd_sketch = fits["finite diff."]
    print(
        f"n={n}, MLP 10-64-64-1 (p={fd.n_params_}), parameter space, float64, "
        f"Nyström rank {fd.rank_} (sketched with exact explicit blocks in every fit, "
        f"from {Policy().sketch_samples(n, fd.rank_, 1)} random samples)"
    )
    print(
        f"{'product':>14} {'iters':>5} {'fit s':>7} {'sketch s':>8} {'CG s':>7} "
        f"{'fit / fd fit':>12} {'CG / fd CG':>10}"
    )
    for name, (reg, seconds, sketch_seconds) in fits.items():
        cg = seconds - sketch_seconds
        print(
            f"{name:>14} {reg.n_iter_:5d} {seconds:7.2f} {sketch_seconds:8.2f} {cg:7.2f} "
            f"{seconds / fd_seconds:12.2f} {cg / (fd_seconds - fd_sketch):10.2f}"
        )
    exact = fits["exact, cached"][0]
    Xt = X[:500]
    print(
        "prediction rel diff fd vs exact: "
        f"mean {relative(fd.predict(Xt), exact.predict(Xt)):.2e}"
    )
    for dtype in [torch.float32, torch.float64]:
        network = FunctionalNetwork(module, dtype=dtype, device="cpu")
        jacobian = JacobianProducts(
            network, network.theta, torch.as_tensor(X[:5000], dtype=dtype), batch_size=1000
        )
        V = torch.randn(
            network.n_params, 8, dtype=dtype, generator=torch.Generator().manual_seed(0)
        )
        exact_product = jacobian.vjp(jacobian.jvp(V))
        fd_product = jacobian.fisher_product_fd(V)
        error = torch.linalg.vector_norm(fd_product - exact_product, dim=0)
        error = error / torch.linalg.vector_norm(exact_product, dim=0)
        print(
            f"FVP relative error (8 random v, n=5000) {dtype}: max {float(error.max()):.2e}"
        )


def low_rank(args):
    """predict_std: low-rank vs exact on the CG path, and vs the dense solver's exact.

    Exact variances on the CG path are a block CG over the test points, slow enough
    that they are timed on the first ``m_exact`` test points only and scaled to m (a
    block CG's cost grows at least linearly with its columns, so the scaled time
    understates the exact path's cost). Errors are measured on those points.
    """
    n, m, m_exact = (1000, 300, 60) if args.quick else (3000, 1000, 100)
    module = trained_mlp((16, 128, 128, 1))
    X, y, Xt = train_test_data(n, m, 16, seed=4)
    common = dict(noise=1e-2, solver="cg", tol=1e-8, random_state=0)
    fits = {}
    for name, params in [
        ("exact (cg)", dict(variance="exact", **common)),
        ("low_rank", dict(variance="low_rank", **common)),
        ("low_rank r=512", dict(variance="low_rank", rank=512, **common)),
        ("exact (dense)", dict(noise=1e-2, solver="dense", variance="exact")),
    ]:
        reg = FiniteNTKRegressor(module, **params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rank 512 warns about its tail weight
            _, fit_seconds = timed(lambda reg=reg: reg.fit(X, y))
        points = Xt[:m_exact] if name == "exact (cg)" else Xt
        std, seconds = timed(lambda reg=reg, points=points: reg.predict_std(points))
        fits[name] = (reg, fit_seconds, std[:m_exact], seconds * m / points.shape[0])
    reg, _, std_exact, t_exact = fits["exact (cg)"]
    print(
        f"n={n}, m={m} test points, MLP 16-128-128-1 (p={reg.n_params_}), "
        f"space={reg.space_}, kernel={reg.kernel_}, noise 1e-2 "
        f"(exact cg timed on {m_exact} points, scaled to {m})"
    )
    print(
        f"{'variance':>15} {'fit s':>7} {'std s':>8} {'exact cg / this':>15} "
        f"{'max rel std err':>15} {'rank':>5} {'tail weight':>11}"
    )
    for name, (reg, fit_seconds, std, seconds) in fits.items():
        error = np.max(np.abs(std - std_exact) / std_exact)
        weight = reg.variance_tail_weight_
        print(
            f"{name:>15} {fit_seconds:7.2f} {seconds:8.2f} {t_exact / seconds:15.1f} "
            f"{error:15.2e} {reg.rank_:5d} "
            f"{'-' if weight is None else f'{weight:.3g}':>11}"
        )


def reference(args):
    n, m = (600, 200) if args.quick else (3000, 1000)
    module = trained_mlp((20, 256, 256, 1))
    X, y, Xt = train_test_data(n, m, 20, seed=5)
    noise, prior = 1e-2, 1.0

    def ours():
        reg = FiniteNTKRegressor(module, noise=noise, prior=prior).fit(X, y)
        return reg, reg.predict(Xt, return_std=True)

    def explicit():
        network = FunctionalNetwork(module, dtype=torch.float64, device="cpu")
        theta = network.theta

        def jac(inputs):
            products = JacobianProducts(
                network, theta, torch.as_tensor(inputs), batch_size=len(inputs)
            )
            return products.jacobian(slice(0, len(inputs)))[:, 0, :], products.outputs[:, 0]

        J, f = jac(X)
        Js, fs = jac(Xt)
        K = prior * J @ J.T
        K.diagonal().add_(noise)
        L = torch.linalg.cholesky(K)
        alpha = torch.cholesky_solve((torch.as_tensor(y) - f)[:, None], L)[:, 0]
        cross = prior * J @ Js.T
        mean = fs + cross.T @ alpha
        var = prior * (Js**2).sum(1) - (cross * torch.cholesky_solve(cross, L)).sum(0)
        return mean.numpy(), var.sqrt().numpy()

    (reg, (mean, std)), t_ours = timed(ours)
    (mean_ref, std_ref), t_ref = timed(explicit)
    print(
        f"n={n}, m={m}, MLP 20-256-256-1 (p={reg.n_params_}), defaults: "
        f"space={reg.space_}, solver={reg.solver_}, kernel={reg.kernel_}"
    )
    print(f"fit+predict_std time ours / explicit-Jacobian Cholesky: {t_ours / t_ref:.3f}")
    print(
        f"max relative difference: mean {relative(mean, mean_ref):.2e}, "
        f"std {np.max(np.abs(std - std_ref) / std_ref):.2e}"
    )


def big(args):
    n, m = (10000, 500) if args.quick else (100000, 2000)
    module = trained_mlp((32, 128, 128, 1))
    X, y, Xt = train_test_data(n, m, 32, seed=6)
    X, Xt = X.astype(np.float32), Xt.astype(np.float32)
    reg = FiniteNTKRegressor(
        module, noise=1e-2, dtype="float32", tol=1e-4, batch_size=2048, random_state=0
    )
    with SketchTimer() as sketch:
        _, t_fit = timed(lambda: reg.fit(X, y))
    _, t_std = timed(lambda: reg.predict(Xt, return_std=True))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    dense_gb = n * reg.n_params_ * 4 / 2**30
    print(
        f"n={n}, MLP 32-128-128-1 (p={reg.n_params_}), float32: space={reg.space_}, "
        f"solver={reg.solver_}, preconditioner={reg.preconditioner_}, "
        f"{reg.n_iter_} CG iterations, rank {reg.rank_}, variance={reg.variance_} "
        f"(tail weight {reg.variance_tail_weight_:.3g})"
    )
    print(
        f"preconditioner build (the sketch) {sketch.preconditioner:.1f} s "
        f"({sketch.preconditioner / t_fit:.2f} of the fit); low-rank variance and "
        f"preconditioner together {sketch.seconds:.1f} s ({sketch.seconds / t_fit:.2f})"
    )
    print(
        f"fit {t_fit:.1f} s + predict(return_std) on {m} points {t_std:.1f} s = "
        f"{(t_fit + t_std) / 60:.2f} min; peak RSS {peak:.2f} GiB "
        f"(a dense Jacobian alone: {dense_gb:.1f} GiB)"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "experiment", choices=["nystrom", "fvp", "low_rank", "reference", "big"]
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    globals()[args.experiment](args)


if __name__ == "__main__":
    main()
