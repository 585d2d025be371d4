"""Preconditioners for conjugate gradient: callables ``R -> M R`` with M ≈ A⁻¹."""

__all__ = ["JacobiPreconditioner"]


class JacobiPreconditioner:
    """M = diag(A)⁻¹, from the operator's exact diagonal.

    Parameters
    ----------
    diagonal : torch.Tensor of shape (d,)
        Positive diagonal of A.
    """

    def __init__(self, diagonal):
        self.inverse_diagonal = 1.0 / diagonal

    def __call__(self, R):
        return self.inverse_diagonal[:, None] * R
