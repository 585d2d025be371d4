"""Dense symmetric products and the in-place Cholesky factor (_linalg.dense)."""

import pytest
import torch

from sklearn_fntk._linalg.dense import (
    add_symmetric_product,
    cholesky,
    solve_with_factor,
    symmetrize_from_lower,
)


@pytest.mark.parametrize("d, tile", [(7, 3), (10, 5), (4, 16)])
def test_symmetric_product_from_lower_tiles_equals_the_full_product(d, tile):
    generator = torch.Generator().manual_seed(d)
    A = torch.randn(9, d, dtype=torch.float64, generator=generator)
    C = torch.randn(9, 9, dtype=torch.float64, generator=generator)
    curvature = C @ C.T  # B = Λ A with Λ symmetric: AᵀB is symmetric
    total = torch.zeros(d, d, dtype=torch.float64)
    add_symmetric_product(total, A, A, tile=tile)
    add_symmetric_product(total, A, curvature @ A, tile=tile)
    symmetrize_from_lower(total, tile=tile)
    expected = A.T @ A + A.T @ curvature @ A
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(total, total.T)


def test_cholesky_overwrites_the_matrix_and_reads_its_lower_triangle():
    generator = torch.Generator().manual_seed(0)
    G = torch.randn(6, 6, dtype=torch.float64, generator=generator)
    matrix = G @ G.T + 6 * torch.eye(6, dtype=torch.float64)
    expected = torch.linalg.cholesky(matrix)
    matrix.triu_(1).mul_(1e3).add_(torch.tril(expected @ expected.T))  # upper: junk
    factor = cholesky(matrix, "test matrix", "advice")
    assert factor.data_ptr() == matrix.data_ptr()
    torch.testing.assert_close(factor, expected, rtol=1e-12, atol=1e-12)
    rhs = torch.randn(6, 2, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(
        torch.cholesky_solve(rhs, factor), torch.cholesky_solve(rhs, expected)
    )


def test_cholesky_says_what_failed():
    indefinite = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^The system B is not numerically positive "
                       r"definite in torch.float64; lower prior\.$"):  # fmt: skip
        cholesky(indefinite, "system B", "lower prior")
    nan = torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]])
    with pytest.raises(FloatingPointError, match="^The system B has NaN or infinite"):
        cholesky(nan, "system B", "lower prior")


def test_solve_with_factor_solves_the_system():
    generator = torch.Generator().manual_seed(1)
    G = torch.randn(8, 8, dtype=torch.float64, generator=generator)
    matrix = G @ G.T + 8 * torch.eye(8, dtype=torch.float64)
    B = torch.randn(8, 3, dtype=torch.float64, generator=generator)
    factor = cholesky(matrix.clone(), "test matrix", "advice")
    torch.testing.assert_close(
        solve_with_factor(factor, B), torch.linalg.solve(matrix, B), rtol=1e-12, atol=1e-12
    )
