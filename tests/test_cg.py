"""Batched preconditioned conjugate gradient (_linalg.cg) on random SPD systems."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from sklearn_fntk._linalg.cg import conjugate_gradient


def spd_matrix(d, eigenvalues=None, seed=0):
    """Q diag(λ) Qᵀ with a random orthogonal Q; returns (A, Q, λ)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    if eigenvalues is None:
        eigenvalues = torch.logspace(0, 3, d, dtype=torch.float64)  # condition 1e3
    A = (Q * eigenvalues) @ Q.T
    return (A + A.T) / 2, Q, eigenvalues


class CountingMatmat:
    """A V, recording how many columns each call receives."""

    def __init__(self, A):
        self.A, self.widths = A, []

    def __call__(self, V):
        assert V.ndim == 2
        self.widths.append(V.shape[1])
        return self.A @ V


def relative_residuals(A, X, B):
    return torch.linalg.vector_norm(B - A @ X, dim=0) / torch.linalg.vector_norm(B, dim=0)


@pytest.mark.parametrize("d, m", [(40, 1), (40, 5), (120, 3)])
def test_batched_solve_matches_direct_solve(d, m):
    A, _, _ = spd_matrix(d, seed=d + m)
    B = torch.randn(d, m, dtype=torch.float64, generator=torch.Generator().manual_seed(m))
    result = conjugate_gradient(lambda V: A @ V, B, tol=1e-10)
    expected = torch.linalg.solve(A, B)
    assert result.solution.shape == (d, m)
    np.testing.assert_allclose(result.solution, expected, rtol=1e-7, atol=1e-9)
    assert result.converged.shape == (m,) and bool(result.converged.all())
    assert result.n_iter.shape == (m,) and result.residual_norms.shape == (m,)
    # Reported residuals are below tol, and the true residuals agree with them.
    assert bool((result.residual_norms <= 1e-10).all())
    assert bool((relative_residuals(A, result.solution, B) <= 1e-8).all())
    # Iterations are positive and no more than the default cap.
    assert bool((result.n_iter >= 1).all())


def test_vector_right_hand_side_keeps_its_shape():
    A, _, _ = spd_matrix(30, seed=1)
    b = torch.randn(30, dtype=torch.float64)
    result = conjugate_gradient(lambda V: A @ V, b, tol=1e-12)
    assert result.solution.shape == (30,)
    assert result.n_iter.shape == (1,)
    np.testing.assert_allclose(result.solution, torch.linalg.solve(A, b), rtol=1e-9)


def test_per_column_convergence_and_iteration_counts():
    """Each column stops on its own; finished columns are not passed to the operator.

    With distinct eigenvalues, exact CG converges in as many iterations as the
    right-hand side has eigencomponents: an eigenvector needs 1, a combination of
    five eigenvectors 5, a generic vector up to d.
    """
    d = 60
    eigenvalues = torch.linspace(1.0, 50.0, d, dtype=torch.float64)
    A, Q, _ = spd_matrix(d, eigenvalues, seed=2)
    g = torch.Generator().manual_seed(3)
    B = torch.stack(
        [
            Q[:, 7],  # one eigencomponent
            torch.zeros(d, dtype=torch.float64),  # zero right-hand side
            Q[:, [0, 10, 20, 30, 59]] @ torch.randn(5, dtype=torch.float64, generator=g),
            torch.randn(d, dtype=torch.float64, generator=g),  # generic
        ],
        dim=1,
    )
    matmat = CountingMatmat(A)
    result = conjugate_gradient(matmat, B, tol=1e-10)
    n_iter = result.n_iter.tolist()
    assert n_iter[0] == 1
    assert n_iter[1] == 0
    assert 5 <= n_iter[2] <= 7
    assert n_iter[3] > n_iter[2] + 5
    assert bool(result.converged.all())
    # The zero column is solved by zero, exactly, with residual 0.
    assert torch.equal(result.solution[:, 1], torch.zeros(d, dtype=torch.float64))
    assert float(result.residual_norms[1]) == 0.0
    expected = torch.linalg.solve(A, B)
    np.testing.assert_allclose(result.solution, expected, rtol=1e-7, atol=1e-10)
    # Widths: 3 active columns at first (the zero one never runs), then fewer.
    assert matmat.widths[0] == 3
    assert matmat.widths == sorted(matmat.widths, reverse=True)
    assert matmat.widths[-1] == 1
    assert len(matmat.widths) == max(n_iter)
    assert sum(matmat.widths) == sum(n_iter)


def test_callback_sees_active_residuals():
    A, _, _ = spd_matrix(25, seed=4)
    B = torch.randn(25, 2, dtype=torch.float64)
    seen = []
    result = conjugate_gradient(
        lambda V: A @ V, B, tol=1e-8, callback=lambda i, r: seen.append((i, r.clone()))
    )
    assert [i for i, _ in seen] == list(range(1, int(result.n_iter.max()) + 1))
    assert float(seen[-1][1].max()) <= 1e-8
    assert all(r.numel() <= 2 for _, r in seen)


def test_reports_without_warning_when_max_iter_too_small():
    """The solver reports (converged, max_iter); the estimators decide what to warn."""
    A, _, _ = spd_matrix(50, torch.logspace(0, 4, 50, dtype=torch.float64), seed=5)
    B = torch.randn(50, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = conjugate_gradient(lambda V: A @ V, B, tol=1e-10, max_iter=3)
    assert result.max_iter == 3 and not result.all_converged
    assert not bool(result.converged.any())
    assert result.n_iter.tolist() == [3, 3, 3]
    assert bool((result.residual_norms > 1e-10).all())
    # The reported residuals are those of the returned iterate.
    np.testing.assert_allclose(
        result.residual_norms, relative_residuals(A, result.solution, B), rtol=1e-6
    )


def test_no_warning_when_converged():
    A, _, _ = spd_matrix(20, seed=6)
    B = torch.randn(20, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        result = conjugate_gradient(lambda V: A @ V, B, tol=1e-8)
    assert bool(result.converged.all())


def test_exact_inverse_preconditioner_converges_in_one_iteration():
    A, _, _ = spd_matrix(40, torch.logspace(0, 5, 40, dtype=torch.float64), seed=7)
    A_inv = torch.linalg.inv(A)
    B = torch.randn(40, 4, dtype=torch.float64)
    result = conjugate_gradient(
        lambda V: A @ V, B, preconditioner=lambda R: A_inv @ R, tol=1e-8
    )
    assert result.n_iter.tolist() == [1, 1, 1, 1]
    np.testing.assert_allclose(result.solution, torch.linalg.solve(A, B), rtol=1e-8)


def test_diagonal_preconditioner_helps_a_badly_scaled_system():
    """Jacobi on D A D (D a wide diagonal scaling) cuts iterations, same answer."""
    d = 80
    base, _, _ = spd_matrix(d, torch.linspace(1.0, 4.0, d, dtype=torch.float64), seed=8)
    scale = torch.logspace(0, 2, d, dtype=torch.float64)
    A = scale[:, None] * base * scale[None, :]
    B = torch.randn(d, 2, dtype=torch.float64)
    plain = conjugate_gradient(lambda V: A @ V, B, tol=1e-10, max_iter=10 * d)
    inverse_diagonal = 1.0 / torch.diagonal(A)
    jacobi = conjugate_gradient(
        lambda V: A @ V,
        B,
        preconditioner=lambda R: inverse_diagonal[:, None] * R,
        tol=1e-10,
    )
    expected = torch.linalg.solve(A, B)
    np.testing.assert_allclose(jacobi.solution, expected, rtol=1e-6, atol=1e-12)
    assert int(jacobi.n_iter.max()) < int(plain.n_iter.max())


def test_custom_stopping_rule_replaces_the_residual_rule():
    # Column 0 stops once its iterate's first entry is within 1e-3 of the solution's,
    # column 1 at once: the rule sees each active column's iterate and residual.
    A, _, _ = spd_matrix(30, seed=3)
    B = torch.randn(30, 2, generator=torch.Generator().manual_seed(3), dtype=A.dtype)
    exact = torch.linalg.solve(A, B)
    seen = []

    def stop(X, R, columns):
        assert X.shape == R.shape == (30, columns.numel())
        seen.append(columns.tolist())
        close = (X[0] - exact[0, columns]).abs() <= 1e-3 * exact[0, columns].abs()
        return close | (columns == 1)

    result = conjugate_gradient(A.__matmul__, B, tol=1e-14, stop=stop)
    # First on both, then on the one still running, last on both for `converged`.
    assert seen[0] == seen[-1] == [0, 1]
    assert all(columns == [0] for columns in seen[1:-1])
    assert bool(result.converged.all()) and int(result.n_iter[1]) == 0
    assert abs(float(result.solution[0, 0] - exact[0, 0])) <= 1e-3 * abs(float(exact[0, 0]))
    # Far fewer iterations than the residual rule at tol=1e-14 needs.
    assert int(result.n_iter[0]) < int(conjugate_gradient(A.__matmul__, B).n_iter[0])
