"""Low-rank predictive variances of Gaussian regression, cached at fit time.

With the top-r eigenpairs (f_j, v_j) of the Fisher JᵀJ, s the prior and c = σ²/s,

    Σ = s·(I - Σ_j f_j/(f_j + c) v_j v_jᵀ)                  (exact over all j)

and keeping r terms gives var(x*) = s·(‖J*‖² - Σ_j≤r f_j/(f_j + c)(J* v_j)²), never
below the exact variance and, when the v_j are the top eigenvectors, above it by at
most s·f_(r+1)/(f_(r+1) + c)·‖J*‖² (LOVE-style, Pleiss et al. 2018: O(r) Jacobian
products per test batch, no training data).
"""

from dataclasses import dataclass

import torch

from .._linalg.memory import check_fits
from .._linalg.preconditioners import NystromPreconditioner
from .operators import ParameterOperator
from .system import eigen_parts, nystrom_sketch

__all__ = ["LowRankVariance", "low_rank_from_eigenpairs", "low_rank_from_sketch"]


@dataclass
class LowRankVariance:
    """Eigenpairs of JᵀJ kept for the low-rank variance.

    Attributes
    ----------
    sketch : NystromPreconditioner
        The same eigenpairs as a preconditioner of the fit's operator.
    vectors : torch.Tensor of shape (p, r)
        V, orthonormal.
    weights : torch.Tensor of shape (r,)
        f/(f + c).
    tail_weight : float
        The largest weight left out, which bounds the overestimate by that fraction
        of s·‖J*‖² (exact with exact eigenpairs, 0 at full rank; for a sketch, the
        weight of its last direction, which the directions past it weigh about as
        much as or less).
    """

    sketch: NystromPreconditioner
    vectors: torch.Tensor
    weights: torch.Tensor
    tail_weight: float

    @property
    def rank(self):
        return int(self.weights.numel())

    def diagonal(self, operator, X, prior, return_bound=False):
        """s·(‖J*‖² - Σ_j w_j (J* v_j)²) per test row of inputs X, shape (m·k,).

        With ``return_bound``, also s·w_(r+1)·‖(I - VVᵀ) J*ᵀ‖² per row, shape (m·k,):
        the left-out directions are orthogonal to V and weigh at most
        ``tail_weight``, so with exact eigenpairs the variance exceeds the exact
        one by at most this.
        """
        prior_variance, JV = operator.test_projections(X, self.vectors)
        variance = prior * (prior_variance - (JV**2) @ self.weights)
        if not return_bound:
            return variance
        residual = (prior_variance - (JV**2).sum(1)).clamp_min(0.0)
        return variance, prior * self.tail_weight * residual


def _rank_budget(operator, policy):
    """The largest r whose factor V (p, r) fits in ``policy.low_rank_bytes``."""
    w = operator.jacobian.w
    return max(1, policy.low_rank_bytes // (w.numel() * w.element_size()))


def low_rank_from_eigenpairs(
    operator, *, prior, noise, rank, gram, policy, min_weight=None
):
    """Exact top eigenpairs (f, V) of JᵀJ and the weights f/(f + c).

    One eigendecomposition of G = J Jᵀ = E diag(f) Eᵀ (function space) gives
    V = Jᵀ E f^-½, the eigenvectors of JᵀJ (r products with Jᵀ); in parameter space
    G = JᵀJ and V = E. Keeping the r directions of weight above
    ``policy.low_rank_weight`` (or ``rank`` of them) leaves out at most the next
    weight times s·‖J*‖², exactly. When r is the full rank of J the "low-rank"
    variance is the exact one. With an operator's curvature Λ, J is Λ^½J
    throughout (G = Λ^½ J Jᵀ Λ^½ or JᵀΛJ, V = JᵀΛ^½ E f^-½): the Laplace
    covariance H⁻¹ = s·(I - Σ_j w_j v_j v_jᵀ) with c = 1/s, ``noise`` 1.

    Parameters
    ----------
    operator : ParameterOperator or FunctionOperator
        Of regression (Λ = I).
    prior, noise : float
    rank : int or None
    gram : torch.Tensor or None
        G assembled already (required with a curvature).
    policy : Policy
    min_weight : float or None, default=None
        The weight above which directions are kept; None: ``policy.low_rank_weight``.

    Returns
    -------
    LowRankVariance
    """
    op = operator
    if gram is None:  # else the caller checked
        w = op.jacobian.w
        parts = eigen_parts(op, w.dtype)
        advice = "use variance='exact'"
        check_fits(parts, w.dtype, w.device, "The exact low-rank variance", advice)
        gram = op.gram_dense()
    fisher, E = torch.linalg.eigh(gram)
    fisher, E = fisher.flip(0), E.flip(1)  # descending
    # Eigenvalues at rounding level (J's null space) are not kept.
    keep = int((fisher > torch.finfo(fisher.dtype).eps * op.size * fisher[0]).sum())
    weights = fisher[:keep] / (fisher[:keep] + noise / prior)
    if rank is None:
        min_weight = policy.low_rank_weight if min_weight is None else min_weight
        rank = int((weights > min_weight).sum())
    rank = max(1, min(rank, keep, _rank_budget(op, policy)))
    tail_weight = float(weights[rank]) if rank < keep else 0.0
    # A copy of the kept columns: a view would keep (and pickle) all of E.
    fisher, E, weights = fisher[:rank], E[:, :rank].contiguous(), weights[:rank]
    parameter_space = isinstance(op, ParameterOperator)
    if parameter_space:
        V = E
    else:
        shape = (op.n_samples, op.n_outputs, rank)
        V = op.jacobian.vjp(op.curve(E).reshape(shape)) / fisher.sqrt()
    # The same eigenpairs of P (JᵀJ, or s·J Jᵀ) precondition CG optimally.
    scale = 1.0 if parameter_space else prior
    sketch = NystromPreconditioner.from_eigenpairs(E, scale * fisher, op.shift)
    return LowRankVariance(sketch, V, weights, tail_weight)


def _transposed_basis(jacobian, U, block_rows=1 << 16):
    """C = Jᵀ Q for an orthonormal basis Q of range(J U), U of shape (p, r).

    W = J U is orthonormalised in place, without the copies of a dense QR: R from a
    QR of ``block_rows`` rows of W at a time, stacked under the previous R (the
    R factor of W, as stable as one QR of W), then each block W_b ← W_b R⁻¹. A
    Cholesky factor of WᵀW (from one Fisher product, F U) would square W's
    conditioning and lose the small Ritz values in float32.
    """
    W = jacobian.jvp(U).reshape(-1, U.shape[1])
    shape = (jacobian.n_samples, jacobian.n_outputs, -1)
    if W.shape[0] <= block_rows:  # small (and maybe wide: fewer rows than r)
        return jacobian.vjp(torch.linalg.qr(W).Q.reshape(shape))
    R = W.new_zeros(0, U.shape[1])
    for start in range(0, W.shape[0], block_rows):
        R = torch.linalg.qr(torch.cat([R, W[start : start + block_rows]]), mode="r").R
    for start in range(0, W.shape[0], block_rows):
        block = W[start : start + block_rows]
        block.copy_(torch.linalg.solve_triangular(R, block, upper=True, left=False))
    return jacobian.vjp(W.reshape(shape))


def low_rank_from_sketch(operator, *, prior, noise, rank, generator, policy):
    """Eigenpairs (f, V) of JᵀJ and the weights f/(f + c), from a Nyström sketch.

    The sketch of P gives the dominant subspace; U (n·k, r) is an orthonormal basis
    of it in function space (the sketch's eigenvectors there; in parameter space,
    those of JᵀJ mapped through J and orthonormalised in place, see
    :func:`_transposed_basis`). With C = Jᵀ U and
    CᵀC = UᵀJJᵀU = Q diag(f) Qᵀ, V = C Q f^-½ is exactly orthonormal and

        V diag(f/(f + c)) Vᵀ = Jᵀ U (Uᵀ(JJᵀ + cI)U)⁻¹ Uᵀ J ⪯ Jᵀ (JJᵀ + cI)⁻¹ J,

    because U (UᵀAU)⁻¹ Uᵀ ⪯ A⁻¹ for A positive definite and U orthonormal: the
    low-rank variance never falls below the exact one.

    Parameters
    ----------
    operator, prior, noise, policy
        As for :func:`low_rank_from_eigenpairs`.
    rank : int or None
        A fixed sketch rank, or None to grow it until the last weight is at most
        ``policy.low_rank_weight`` (or to ``policy.max_rank``).
    generator : torch.Generator or None

    Returns
    -------
    LowRankVariance
    """
    c = noise / prior
    # Stop once λ_r ≤ ratio·shift, i.e. the weight f_r/(f_r + c) ≤ low_rank_weight.
    ratio = policy.low_rank_weight / (1 - policy.low_rank_weight)
    max_rank = min(policy.max_rank, _rank_budget(operator, policy))
    sketch = nystrom_sketch(
        operator,
        ratio=ratio,
        rank=rank,
        max_rank=max_rank,
        generator=generator,
        policy=policy,
    )
    jacobian = operator.jacobian
    U = sketch.eigenvectors[:, sketch.eigenvalues > 0].to(jacobian.w.dtype)
    if isinstance(operator, ParameterOperator):
        C = _transposed_basis(jacobian, U)
    else:
        shape = (operator.n_samples, operator.n_outputs, U.shape[1])
        C = jacobian.vjp(U.reshape(shape))
    fisher, Q = torch.linalg.eigh(C.T @ C)
    fisher, Q = fisher.flip(0), Q.flip(1)  # descending
    keep = fisher > torch.finfo(fisher.dtype).eps * fisher[0]
    fisher, Q = fisher[keep], Q[:, keep]
    V = (C @ Q) / fisher.sqrt()
    weights = fisher / (fisher + c)
    tail_weight = float(weights[-1]) if weights.numel() else 1.0
    return LowRankVariance(sketch, V, weights, tail_weight)
