"""Dense symmetric positive definite solves: a Cholesky factor that says when it fails."""

import torch

__all__ = ["cholesky"]


def cholesky(matrix, what, advice):
    """Lower Cholesky factor of ``matrix``, shape (d, d).

    Parameters
    ----------
    matrix : torch.Tensor of shape (d, d)
        Symmetric positive definite.
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
    factor, info = torch.linalg.cholesky_ex(matrix)
    failed = int(info) != 0 or not bool(torch.isfinite(factor.diagonal()).all())
    if failed and not bool(torch.isfinite(matrix).all()):
        raise FloatingPointError(f"The {what} has NaN or infinite entries.")
    if failed:
        raise ValueError(
            f"The {what} is not numerically positive definite in {matrix.dtype}; {advice}."
        )
    return factor
