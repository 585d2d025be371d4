"""Dense symmetric positive definite solves: a Cholesky factor that says when it fails."""

import torch

__all__ = [
    "add_symmetric_product",
    "cholesky",
    "solve_with_factor",
    "symmetrize_from_lower",
]

# Column tiles of a symmetric product: the lower block triangle of T tiles costs
# (T + 1)/(2T) of the full product (0.55 at p = 21,825), and tiles this wide keep
# the matrix products efficient (measured: 0.63 of the full product's time at
# p = 8192, 1024-wide tiles).
SYMMETRIC_TILE = 1024


def cholesky(matrix, what, advice):
    """Lower Cholesky factor of ``matrix``, written over it, shape (d, d).

    The factor takes the matrix's memory (no second d x d array at the peak, which
    at d = 21,825 in float32 is 1.8 GiB): LAPACK factors a column-major array in
    place, and a row-major matrix is its transpose in column-major order, whose
    upper factor U = Lᵀ is then L in row-major order. The caller gives up
    ``matrix``.

    Parameters
    ----------
    matrix : torch.Tensor of shape (d, d)
        Symmetric positive definite (its lower triangle is read); overwritten when
        contiguous.
    what : str
        What the matrix is, for the message.
    advice : str
        What the caller can change, for the message.

    Raises
    ------
    FloatingPointError
        When the matrix has NaN or infinite entries (nothing to advise: what fed it
        is not finite).
    ValueError
        When the factorisation breaks down (the matrix is not numerically positive
        definite in its dtype).
    """
    # Checked before the factorisation: after a breakdown LAPACK leaves the rest of
    # the matrix as it was, but cuSOLVER fills it with NaN.
    if not _all_finite(matrix):
        raise FloatingPointError(f"The {what} has NaN or infinite entries.")
    column_major = matrix.contiguous().mT  # Mᵀ: its upper triangle is M's lower
    info = column_major.new_empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(column_major, upper=True, out=(column_major, info))
    factor = column_major.mT  # L, row-major
    if int(info) == 0 and bool(torch.isfinite(factor.diagonal()).all()):
        return factor
    raise ValueError(
        f"The {what} is not numerically positive definite in {matrix.dtype}; {advice}."
    )


def solve_with_factor(factor, B):
    """(L Lᵀ)⁻¹ B for the lower factor L of :func:`cholesky`, B of shape (d, m).

    Two triangular solves: they take the row-major factor as it is, where
    ``torch.cholesky_solve`` copies it (1.8 GiB at d = 21,825 in float32).
    """
    half = torch.linalg.solve_triangular(factor, B, upper=False)
    return torch.linalg.solve_triangular(factor.mT, half, upper=True)


def _all_finite(matrix, rows=1024):
    """Whether every entry is finite, a block of rows at a time (a boolean copy of
    a 21,825² matrix would take 0.5 GiB)."""
    return all(bool(torch.isfinite(block).all()) for block in matrix.split(rows))


def add_symmetric_product(total, A, B, tile=SYMMETRIC_TILE):
    """total += Aᵀ B on and below the diagonal tiles, for a symmetric Aᵀ B.

    Row tile i of ``total`` gets A[:, tile i]ᵀ B[:, :end of tile i], written in
    place (no temporary the size of ``total``); :func:`symmetrize_from_lower`
    completes the upper triangle once every product is added.

    Parameters
    ----------
    total : torch.Tensor of shape (d, d)
    A, B : torch.Tensor of shape (b, d)
        With Aᵀ B symmetric (A = B, or B = Λ A with Λ symmetric).
    tile : int, default=SYMMETRIC_TILE
    """
    d = total.shape[0]
    for start in range(0, d, tile):
        stop = min(start + tile, d)
        total[start:stop, :stop].addmm_(A[:, start:stop].T, B[:, :stop])


def symmetrize_from_lower(total, tile=SYMMETRIC_TILE):
    """Copy the lower triangle of ``total`` (d, d) to its upper one, in place, a
    tile at a time (those of :func:`add_symmetric_product`); returns ``total``,
    exactly symmetric."""
    d = total.shape[0]
    for start in range(0, d, tile):
        stop = min(start + tile, d)
        block = total[start:stop, start:stop]
        block.copy_(block.tril() + block.tril(-1).T)
        total[:start, start:stop] = total[start:stop, :start].T
    return total
