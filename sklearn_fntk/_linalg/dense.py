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
    ValueError
        When the factorisation breaks down (the matrix is not numerically positive
        definite in its dtype).
    """
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise ValueError(
            f"The {what} is not numerically positive definite in {matrix.dtype}; {advice}."
        )
    return factor
