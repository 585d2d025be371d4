"""Preconditioners against dense float64 references, and their effect on CG."""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import jacrev

from sklearn_fntk._linalg.cg import conjugate_gradient
from sklearn_fntk._linalg.preconditioners import (
    PIVOT_COST,
    JacobiPreconditioner,
    NystromPreconditioner,
    PivotedCholeskyPreconditioner,
    factor_dtype,
)
from sklearn_fntk._linearize.layerwise import LayerwiseKernel
from sklearn_fntk._linearize.network import FunctionalNetwork

DTYPE = torch.float64


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def psd_matrix(eigenvalues, seed=0):
    """Q diag(λ) Qᵀ with a random orthogonal Q."""
    d = eigenvalues.numel()
    Q = torch.linalg.qr(torch.randn(d, d, dtype=DTYPE, generator=generator(seed))).Q
    P = (Q * eigenvalues) @ Q.T
    return 0.5 * (P + P.T)


def nystrom(P, rank, shift, seed=0):
    return NystromPreconditioner(
        lambda V: P @ V, P.shape[0], rank, shift, dtype=P.dtype, device="cpu",
        generator=generator(seed),
    )  # fmt: skip


def pivoted_cholesky(P, rank, shift, **kwargs):
    return PivotedCholeskyPreconditioner(
        P.diagonal(), lambda i: P[:, i], rank, shift, **kwargs
    )


def as_matrix(preconditioner, d):
    return preconditioner(torch.eye(d, dtype=DTYPE))


def test_jacobi():
    diagonal = torch.tensor([1.0, 2.0, 4.0], dtype=DTYPE)
    R = torch.ones(3, 2, dtype=DTYPE)
    expected = torch.tensor([[1.0, 1.0], [0.5, 0.5], [0.25, 0.25]], dtype=DTYPE)
    torch.testing.assert_close(JacobiPreconditioner(diagonal)(R), expected)


# -- exactness -------------------------------------------------------------------------

FULL_RANK = torch.logspace(0, -4, 40, dtype=DTYPE)


@pytest.mark.parametrize("build", [nystrom, pivoted_cholesky], ids=["nystrom", "pivchol"])
def test_full_rank_is_the_inverse(build):
    P, shift = psd_matrix(FULL_RANK), 1e-3
    A = P + shift * torch.eye(40, dtype=DTYPE)
    M = as_matrix(build(P, 40, shift), 40)
    torch.testing.assert_close(M, torch.linalg.inv(A), rtol=1e-8, atol=1e-8)


def test_nystrom_recovers_a_low_rank_operator():
    eigenvalues = torch.zeros(50, dtype=DTYPE)
    eigenvalues[:6] = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    P = psd_matrix(eigenvalues)
    preconditioner = nystrom(P, 10, 1e-2)
    U, approximation = preconditioner.eigenvectors, preconditioner.eigenvalues
    assert U.shape == (50, 10) and preconditioner.rank == 10
    torch.testing.assert_close(U.T @ U, torch.eye(10, dtype=DTYPE))
    torch.testing.assert_close(approximation[:6], eigenvalues[:6], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        approximation[6:], torch.zeros(4, dtype=DTYPE), atol=1e-10, rtol=0
    )
    # Exact on span U; the complement, here null(P), is scaled by (λ̂_r + μ)⁻¹ = 1/μ.
    A = P + 1e-2 * torch.eye(50, dtype=DTYPE)
    torch.testing.assert_close(
        as_matrix(preconditioner, 50), torch.linalg.inv(A), rtol=1e-8, atol=1e-8
    )


def test_nystrom_is_symmetric_positive_definite():
    P = psd_matrix(torch.logspace(0, -6, 60, dtype=DTYPE))
    M = as_matrix(nystrom(P, 12, 1e-4), 60)
    torch.testing.assert_close(M, M.T)
    assert float(torch.linalg.eigvalsh(M).min()) > 0


def test_nystrom_float32_operator():
    P = psd_matrix(torch.logspace(0, -8, 80, dtype=DTYPE)).float()
    preconditioner = NystromPreconditioner(
        lambda V: P @ V, 80, 40, 1e-6, dtype=torch.float32, device="cpu",
        generator=generator(),
    )  # fmt: skip
    # The factors are float64 whatever the operator's dtype; M R keeps R's dtype.
    assert preconditioner.eigenvectors.dtype == torch.float64
    assert bool(torch.isfinite(preconditioner.eigenvalues).all())
    assert preconditioner(torch.ones(80, 2)).dtype == torch.float32


@pytest.mark.parametrize("build", [nystrom, pivoted_cholesky], ids=["nystrom", "pivchol"])
def test_float32_operator_with_a_wide_spectrum(build):
    # λ_1/μ = 1e7, λ_i = 1e5·exp(-i/8): in float32, factors kept (or M applied) in
    # float32 lost M's action on the top directions to rounding of the complement
    # term, and CG ran to 1000 iterations without reaching 1e-4; in float64 it
    # takes 11. Plain CG does not converge either.
    d, shift = 400, 1e-2
    P = psd_matrix(1e5 * torch.exp(-torch.arange(d, dtype=DTYPE) / 8.0)).float()
    b = torch.randn(d, 2, generator=generator(1))
    preconditioner = build(P, 200, shift)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ConvergenceWarning fails the test
        result = conjugate_gradient(
            lambda V: P @ V + shift * V, b, preconditioner=preconditioner, tol=1e-4,
            max_iter=50,
        )  # fmt: skip
    assert bool(result.converged.all())
    assert result.solution.dtype == torch.float32


def test_nystrom_rank_validation():
    with pytest.raises(ValueError, match="rank"):
        nystrom(torch.eye(5, dtype=DTYPE), 6, 1.0)


def test_adaptive_rank():
    # λ_i = 0.8^i: λ_r ≤ 10μ = 1e-5 from r = 52; with growth 2 the rank goes 8, 16,
    # 32, 64; with the default growth 4: 8, 32, 128.
    P = psd_matrix(0.8 ** torch.arange(200, dtype=DTYPE))
    calls = []

    def matmat(V):
        calls.append(V.shape[1])
        return P @ V

    preconditioner = NystromPreconditioner.adaptive(
        matmat, 200, 1e-6, ratio=10.0, initial_rank=8, growth=2, dtype=DTYPE,
        device="cpu", generator=generator(),
    )  # fmt: skip
    assert preconditioner.rank == 64 and calls == [8, 8, 16, 32]
    assert float(preconditioner.eigenvalues[-1]) <= 1e-5
    calls.clear()
    default_growth = NystromPreconditioner.adaptive(
        matmat, 200, 1e-6, ratio=10.0, initial_rank=8, dtype=DTYPE, device="cpu",
        generator=generator(),
    )  # fmt: skip
    assert default_growth.rank == 128 and calls == [8, 24, 96]
    capped = NystromPreconditioner.adaptive(
        lambda V: P @ V, 200, 1e-6, initial_rank=8, max_rank=20, dtype=DTYPE,
        device="cpu", generator=generator(),
    )  # fmt: skip
    assert capped.rank == 20


def test_pivoted_cholesky_factor():
    P = psd_matrix(torch.logspace(0, -3, 30, dtype=DTYPE))
    preconditioner = pivoted_cholesky(P, 8, 1e-2)
    L = preconditioner.factor
    assert L.shape == (30, 8) and preconditioner.pivots.shape == (8,)
    # The first pivot is the largest diagonal entry; L Lᵀ interpolates its columns.
    assert int(preconditioner.pivots[0]) == int(torch.argmax(P.diagonal()))
    pivots = preconditioner.pivots
    torch.testing.assert_close((L @ L.T)[:, pivots], P[:, pivots])
    torch.testing.assert_close(
        torch.trace(P - L @ L.T), torch.tensor(preconditioner.remaining_trace, dtype=DTYPE)
    )
    A_approx = L @ L.T + 1e-2 * torch.eye(30, dtype=DTYPE)
    torch.testing.assert_close(
        as_matrix(preconditioner, 30), torch.linalg.inv(A_approx), rtol=1e-9, atol=1e-9
    )


def test_pivoted_cholesky_stops_on_tolerance():
    eigenvalues = torch.zeros(40, dtype=DTYPE)
    eigenvalues[:5] = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25])
    P = psd_matrix(eigenvalues)
    preconditioner = pivoted_cholesky(P, 30, 1e-3, tol=1e-10)
    assert preconditioner.rank == 5
    L = preconditioner.factor
    torch.testing.assert_close(L @ L.T, P, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cg_tol", [1e-3, 1e-8])
def test_pivoted_cholesky_stops_once_its_cost_balances_the_predicted_cg_work(cg_tol):
    """With cg_tol, j columns are enough once j·PIVOT_COST ≥ ⅓·ln(2/cg_tol)·√(1 +
    d_max/μ), d_max the largest remaining diagonal: the first such j is the rank;
    complete() then resumes to the cap."""
    P, shift = psd_matrix(torch.logspace(2, -6, 200, dtype=DTYPE)), 1e-5
    capped = pivoted_cholesky(P, 200, shift)
    adaptive = pivoted_cholesky(P, 200, shift, cg_tol=cg_tol)
    r = adaptive.rank
    assert 0 < r < capped.rank
    # The same greedy factor, stopped early.
    torch.testing.assert_close(adaptive.factor, capped.factor[:, :r])

    def enough(j):
        largest = float((P.diagonal() - (capped.factor[:, :j] ** 2).sum(1)).max())
        predicted = math.log(2 / cg_tol) * math.sqrt(1 + largest / shift)
        return j * PIVOT_COST >= predicted / 3

    assert enough(r) and not enough(r - 1)
    # complete() resumes it: the factor cg_tol=None builds, and its inverse.
    adaptive.complete()
    assert adaptive.rank == capped.rank
    torch.testing.assert_close(adaptive.factor, capped.factor)
    torch.testing.assert_close(as_matrix(adaptive, 200), as_matrix(capped, 200))


# -- CG iteration counts ---------------------------------------------------------------


def iterations(A, b, preconditioner):
    """CG iterations to a 1e-11 relative residual; checks the solution to 1e-6."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = conjugate_gradient(
            lambda V: A @ V, b, preconditioner=preconditioner, tol=1e-11,
            max_iter=4 * A.shape[0],
        )  # fmt: skip
    exact = torch.linalg.solve(A, b)
    error = torch.linalg.vector_norm(result.solution - exact) / torch.linalg.vector_norm(
        exact
    )
    assert float(error) <= 1e-6
    return int(result.n_iter.max())


def compare(P, shift, b, preconditioners):
    A = P + shift * torch.eye(P.shape[0], dtype=DTYPE)
    counts = {"none": iterations(A, b, None)}
    for name, preconditioner in preconditioners.items():
        counts[name] = iterations(A, b, preconditioner)
    return counts


def test_cg_synthetic_fast_decay():
    d, shift = 600, 1e-5
    P = psd_matrix(torch.exp(-torch.arange(d, dtype=DTYPE) / 8.0))  # λ_92 ≈ μ
    b = torch.randn(d, 2, dtype=DTYPE, generator=generator(1))
    counts = compare(
        P,
        shift,
        b,
        {
            "jacobi": JacobiPreconditioner(P.diagonal() + shift),
            "nystrom": nystrom(P, 100, shift),
            "pivoted_cholesky": pivoted_cholesky(P, 100, shift),
        },
    )
    assert counts["nystrom"] * 3 <= counts["none"]
    assert counts["pivoted_cholesky"] * 3 <= counts["none"]


@pytest.fixture(scope="module")
def trained_ntk():
    """A 4-32-32-1 tanh MLP fitted to a smooth function; its NTK structure (float64)."""
    torch.manual_seed(0)
    n = 500
    X = 2 * torch.rand(n, 4) - 1
    y = torch.sin(3 * X[:, 0]) * torch.cos(2 * X[:, 1]) + X[:, 2] ** 2 - 0.5 * X[:, 3]
    module = nn.Sequential(
        nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    )
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        loss = ((module(X)[:, 0] - y) ** 2).mean()
        loss.backward()
        optimizer.step()
    network = FunctionalNetwork(module, dtype=DTYPE, device="cpu")
    X = X.to(DTYPE)
    kernel = LayerwiseKernel(network, X, batch_size=128)
    J = jacrev(lambda w: network(w, X).reshape(-1))(network.theta)
    noise = 1e-3 * float(kernel.diagonal().mean())
    return kernel, J, y.to(DTYPE)[:, None], noise


def test_cg_trained_ntk_function_space(trained_ntk):
    # K = J Jᵀ + σ² I (prior s = 1); the preconditioners see only products, columns
    # and the diagonal of the structured kernel.
    kernel, J, y, noise = trained_ntk
    P = J @ J.T
    counts = compare(
        P,
        noise,
        y,
        {
            "jacobi": JacobiPreconditioner(kernel.diagonal() + noise),
            "nystrom": NystromPreconditioner(
                kernel.matmat,
                kernel.size,
                100,
                noise,
                dtype=DTYPE,
                device="cpu",
                generator=generator(),
            ),  # fmt: skip
            "pivoted_cholesky": PivotedCholeskyPreconditioner(
                kernel.diagonal(), kernel.column, 100, noise
            ),
        },
    )
    assert counts["nystrom"] * 3 <= counts["none"]
    assert counts["pivoted_cholesky"] * 3 <= counts["none"]


def test_cg_trained_ntk_parameter_space(trained_ntk):
    # A = Jᵀ J + (σ²/s) I: the Nyström sketch is built from Fisher-vector products.
    _, J, y, noise = trained_ntk
    p = J.shape[1]
    counts = compare(
        J.T @ J,
        noise,
        J.T @ y,
        {
            "nystrom": NystromPreconditioner(
                lambda V: J.T @ (J @ V),
                p,
                100,
                noise,
                dtype=DTYPE,
                device="cpu",
                generator=generator(),
            )  # fmt: skip
        },
    )
    assert counts["nystrom"] * 3 <= counts["none"]


def test_factor_dtype():
    # float64 wherever the device has it; a device without float64 (Apple's MPS,
    # imitated here) keeps the operator's dtype instead of failing.
    assert factor_dtype(torch.ones(2, dtype=torch.float32)) == torch.float64
    mps = SimpleNamespace(dtype=torch.float32, device=torch.device("mps"))
    assert factor_dtype(mps) == torch.float32
