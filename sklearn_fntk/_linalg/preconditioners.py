"""Preconditioners for conjugate gradient: callables ``R -> M R`` with M ≈ A⁻¹.

Each class does its setup (diagonal, sketch, factorisation) in ``__init__`` and is then
applied to a block of residuals R of shape (d, m), as ``conjugate_gradient`` expects.
The low-rank preconditioners see the system as

    A = P + μ I,    P symmetric positive semidefinite, μ > 0 (``shift``),

which covers both systems of the linearized-network GP:

- function space, K = s·J Jᵀ + σ² I:   P = s·J Jᵀ (kernel products),   μ = σ²;
- parameter space, A = Jᵀ J + (σ²/s) I: P = Jᵀ J (Fisher-vector products), μ = σ²/s.

They are told products with P, never with A: pass the operator's product minus the
shift (or the P-product directly), not ``operator.matmat`` itself.
"""

import math
import threading

import torch

# A column of the pivoted Cholesky factor costs about this many CG iterations (a kernel
# column and the update against the earlier columns, against a kernel product and
# the preconditioner; measured 0.13-0.19 with the layerwise kernel, n = 2000-3000).
PIVOT_COST = 0.2
# Default cap on the rank of an adaptive Nyström preconditioner (a (d, r) factor).
NYSTROM_MAX_RANK = 512
# PivotedCholeskyPreconditioner.complete runs at predict time, possibly from several
# threads at once: one of them completes the factor, the others then find it done.
_COMPLETION_LOCK = threading.Lock()

__all__ = [
    "JacobiPreconditioner",
    "NystromPreconditioner",
    "NYSTROM_MAX_RANK",
    "PivotedCholeskyPreconditioner",
    "factor_dtype",
]


def factor_dtype(tensor):
    """The dtype the low-rank factors are kept in: float64, for the reason given in
    :class:`NystromPreconditioner`, except on devices without float64 (Apple's
    MPS), where ``tensor``'s own."""
    return tensor.dtype if tensor.device.type == "mps" else torch.float64


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


class _NystromSketch:
    """A growing orthonormal test matrix Ω (d, r) and its image Y = P Ω.

    Columns are added in blocks, each block orthonormalised against the earlier ones,
    so Ω stays orthonormal and no product with P is ever repeated.
    """

    def __init__(self, matmat, size, *, dtype, device, generator):
        self.matmat, self.size, self.generator = matmat, size, generator
        self.test_matrix = torch.empty(size, 0, dtype=dtype, device=device)
        self.image = torch.empty(size, 0, dtype=dtype, device=device)

    @property
    def rank(self):
        return self.test_matrix.shape[1]

    def grow(self, n_columns):
        """Add ``n_columns`` Gaussian directions (n_columns products with P)."""
        Omega = self.test_matrix
        block = torch.randn(
            self.size,
            n_columns,
            dtype=Omega.dtype,
            device=Omega.device,
            generator=self.generator,
        )
        # Twice is enough (Giraud et al. 2005): Gram-Schmidt of the block against Ω.
        for _ in range(2):
            block = block - Omega @ (Omega.T @ block)
        block = torch.linalg.qr(block).Q
        self.test_matrix = torch.cat([Omega, block], dim=1)
        self.image = torch.cat([self.image, self.matmat(block)], dim=1)

    def eigendecomposition(self):
        """``(U, λ̂)``: the Nyström approximation P⟨Ω⟩ = U diag(λ̂) Uᵀ.

        Frangella, Tropp & Udell (2021), Algorithm 2.1, stable form: with a tiny
        shift ν, Y_ν = Y + νΩ = (P + νI)Ω, C = chol(Ωᵀ Y_ν), B = Y_ν C⁻ᵀ (so that
        B Bᵀ = (P + νI)⟨Ω⟩), B = U Σ Vᵀ, λ̂ = max(0, Σ² - ν). λ̂ is descending.

        Computed and returned in float64 whatever the products' dtype (see
        :func:`factor_dtype`); this costs float64 copies of Ω and Y.
        """
        dtype = factor_dtype(self.image)
        Omega, Y = self.test_matrix.to(dtype), self.image.to(dtype)
        eps = torch.finfo(dtype).eps
        # ν = √d · eps(‖Y‖_F), Frobenius for ‖Y‖₂ (at most √r larger; ‖Y‖₂ costs
        # an SVD, a quarter of the factorisation: docs/benchmarks.rst); grown
        # tenfold while rounding (e.g. a float32 operator that is not exactly
        # symmetric) still leaves Ωᵀ Y_ν indefinite.
        nu = self.size**0.5 * eps * float(torch.linalg.matrix_norm(Y))
        nu = max(nu, torch.finfo(Y.dtype).tiny)
        for _ in range(8):
            Y_nu = Y + nu * Omega
            core = Omega.T @ Y_nu
            factor, info = torch.linalg.cholesky_ex(0.5 * (core + core.T))
            if int(info) == 0:
                break
            nu *= 10.0
        else:
            raise ValueError(
                "The Nyström sketch is not positive semidefinite: the products passed "
                "as `matmat` must be with a symmetric positive semidefinite P."
            )
        # B = Y_ν C⁻ᵀ with C = factor (lower): solve B Cᵀ = Y_ν.
        B = torch.linalg.solve_triangular(factor.T, Y_nu, upper=True, left=False)
        U, sigma, _ = torch.linalg.svd(B, full_matrices=False)
        return U, torch.clamp(sigma**2 - nu, min=0.0)


class NystromPreconditioner:
    """Randomized Nyström preconditioner for A = P + μ I.

    Frangella, Tropp & Udell (2021), "Randomized Nyström preconditioning": a rank-r
    Nyström approximation P ≈ U Λ̂ Uᵀ from r products with P (Algorithm 2.1) gives

        M = U (Λ̂ + μI)⁻¹ Uᵀ + (λ̂_r + μ)⁻¹ (I - U Uᵀ),

    their P⁻¹ of eq. (5.3) divided by the constant λ̂_r + μ (CG is unchanged by a
    constant factor), so that M itself approximates A⁻¹: M = A⁻¹ when r = d, and on
    the span of U it is the exact inverse of the approximation. With r a little above
    the effective dimension (λ̂_r ≲ μ), the condition number of M A is O(1) (their
    Theorem 5.1).

    The factors are kept, and M applied, in float64 whatever the operator's dtype
    (residuals are cast there and back; see :func:`factor_dtype`). M's condition
    number is about λ_1/λ̂_r, and in float32 the rounding of its complement term,
    (λ̂_r + μ)⁻¹(I - U Uᵀ) R, swamped the small action (λ_1 + μ)⁻¹ on the top
    directions, and CG stalled. A float32 operator with spectrum 1e5·exp(-i/8),
    μ = 1e-2, rank 200: 1000 iterations without reaching 1e-4 before, 11 with the
    factors in float64. A trained MLP, n = 2000, p = 4929, float32, parameter space:
    3000 before, 12 now.

    Parameters
    ----------
    matmat : callable
        ``matmat(V) -> P V`` for V of shape (d, j): products with the PSD part P only,
        without the shift (``K V - σ² V`` = s·J(Jᵀ V) in function space; Jᵀ(J V) in
        parameter space). Called once, with j = ``rank`` columns.
    size : int
        d, the order of A.
    rank : int
        r, the sketch size; at most d.
    shift : float
        μ > 0, the multiple of the identity in A (σ² or σ²/s).
    dtype : torch.dtype
    device : torch.device or str
    generator : torch.Generator or None
        Source of the Gaussian test matrix (on ``device``).

    Attributes
    ----------
    eigenvectors : torch.Tensor of shape (d, r), float64
        U, orthonormal columns.
    eigenvalues : torch.Tensor of shape (r,), float64
        λ̂, the approximate eigenvalues of P, descending and non-negative.
    shift : float
    rank : int
    """

    def __init__(self, matmat, size, rank, shift, *, dtype, device, generator=None):
        if not 1 <= rank <= size:
            raise ValueError(f"rank must be in [1, size={size}], got {rank}.")
        sketch = _NystromSketch(
            matmat, size, dtype=dtype, device=device, generator=generator
        )
        sketch.grow(rank)
        self._set_factors(*sketch.eigendecomposition(), shift)

    @classmethod
    def adaptive(
        cls,
        matmat,
        size,
        shift,
        *,
        dtype,
        device,
        ratio=10.0,
        initial_rank=32,
        growth=4,
        max_rank=NYSTROM_MAX_RANK,
        generator=None,
    ):
        """A Nyström preconditioner whose rank grows until λ̂_r ≤ ``ratio`` · μ.

        The rank grows geometrically from ``initial_rank`` (Frangella, Tropp & Udell
        2021, Algorithm 5.1 with the stopping rule on the last eigenvalue), reusing
        the earlier products: the total cost is r products with P for the final rank
        r, in a few blocks. The factor 4 (not their 2) keeps the number of blocks
        small: a block of columns is one pass over the data (explicit Jacobian
        blocks), whose fixed cost dominates its per-column cost (see
        docs/benchmarks.rst, "Measurements behind the defaults"). λ̂_r ≤ ratio·μ bounds the
        preconditioned spectrum of the unsketched directions by about
        (λ_(r+1) + μ)/(λ̂_r + μ) ≤ ratio + 1 when the sketch is accurate.

        Parameters
        ----------
        matmat, size, shift, dtype, device, generator
            As for the constructor.
        ratio : float, default=10.0
            Stop once the smallest sketched eigenvalue is at most ``ratio`` · μ.
        initial_rank : int, default=32
        growth : int, default=4
            Factor by which the rank grows each round.
        max_rank : int, default=512
            Cap on the rank (and on the products with P); also capped at ``size``.
            The preconditioner stores a (size, rank) matrix.

        Returns
        -------
        NystromPreconditioner
        """
        max_rank = min(max_rank, size)
        sketch = _NystromSketch(
            matmat, size, dtype=dtype, device=device, generator=generator
        )
        target = min(initial_rank, max_rank)
        while True:
            sketch.grow(target - sketch.rank)
            U, eigenvalues = sketch.eigendecomposition()
            if eigenvalues[-1] <= ratio * shift or sketch.rank >= max_rank:
                break
            target = min(growth * sketch.rank, max_rank)
        return cls.from_eigenpairs(U, eigenvalues, shift)

    @classmethod
    def from_eigenpairs(cls, eigenvectors, eigenvalues, shift):
        """The preconditioner of a known rank-r eigendecomposition P ≈ U diag(λ) Uᵀ.

        With exact top eigenpairs this is the best rank-r choice (no sketch needed).

        Parameters
        ----------
        eigenvectors : torch.Tensor of shape (d, r)
            Orthonormal columns.
        eigenvalues : torch.Tensor of shape (r,)
            Descending, non-negative.
        shift : float

        Returns
        -------
        NystromPreconditioner
        """
        preconditioner = cls.__new__(cls)
        preconditioner._set_factors(eigenvectors, eigenvalues, shift)
        return preconditioner

    def _set_factors(self, eigenvectors, eigenvalues, shift):
        dtype = factor_dtype(eigenvectors)
        self.eigenvectors, self.eigenvalues = eigenvectors.to(dtype), eigenvalues.to(dtype)
        self.shift = shift
        self.rank = eigenvalues.numel()
        # (Λ̂ + μI)⁻¹ on span U ; (λ̂_r + μ)⁻¹ on its complement.
        self._inverse_eigenvalues = 1.0 / (self.eigenvalues + shift)
        self._complement_scale = 1.0 / (float(self.eigenvalues[-1]) + shift)

    @property
    def largest_eigenvalue(self):
        """λ̂_1, the largest eigenvalue of the approximation of P (≤ λ_max(P))."""
        return float(self.eigenvalues[0])

    def __call__(self, R):
        # M R = U (Λ̂ + μI)⁻¹ Uᵀ R + (λ̂_r + μ)⁻¹ (R - U Uᵀ R), in the factors' dtype
        U = self.eigenvectors
        R_ = R.to(U.dtype)
        UtR = U.T @ R_
        inside = U @ (self._inverse_eigenvalues[:, None] * UtR)
        return (inside + self._complement_scale * (R_ - U @ UtR)).to(R.dtype)


class PivotedCholeskyPreconditioner:
    """M = (L Lᵀ + μ I)⁻¹ from a partial pivoted Cholesky factor L of P (function space).

    The greedy pivoted Cholesky of Harbrecht, Peters & Schneider (2012), as used for
    GP kernels by Gardner et al. (2018, GPyTorch): at step j pick the pivot i with the
    largest remaining diagonal d_i of P - L Lᵀ, and append the column
    l = (P[:, i] - L L[i]ᵀ) / √d_i. It needs the diagonal of P and r columns of P, so
    it suits the kernel (P = s·J Jᵀ), whose entries are cheap; M is applied by
    Woodbury with an r x r Cholesky factor:

        (L Lᵀ + μI)⁻¹ R = (R - L (μI + Lᵀ L)⁻¹ Lᵀ R) / μ.

    Parameters
    ----------
    diagonal : torch.Tensor of shape (d,)
        diag P (without the shift).
    column : callable
        ``column(i) -> P[:, i]``, shape (d,), for an integer i.
    rank : int
        Maximum number of columns r of L (and calls to ``column``).
    shift : float
        μ > 0.
    tol : float, default=1e-8
        Stop early once the trace of the remaining diagonal, tr(P - L Lᵀ), is at most
        ``tol`` times tr P.
    cg_tol : float or None, default=None
        The relative tolerance of the CG solve this preconditioner will serve. When
        given, the factorisation also stops once it has cost a third of the CG work
        predicted for the rest of the fit, so that building it takes about a
        quarter of the fit: after j columns, once

            j · PIVOT_COST ≥ ⅓ · ln(2/cg_tol) · √(1 + d_max/μ),

        with d_max the largest remaining diagonal entry. The right-hand side is a
        third of the predicted CG iterations: the preconditioned spectrum lies in
        [1, 1 + λ_max(P - LLᵀ)/μ], and on trained MLPs (function space, layerwise
        kernel; n = 2000-3000, noise 1e-4-1e-3 of the mean kernel diagonal,
        cg_tol 1e-6 and 1e-3, ranks 64-512) the iterations measured were 0.6-1.3
        times ln(2/cg_tol)·√(1 + d_max/μ). ``PIVOT_COST`` is a column of the
        factorisation in units of one CG iteration (measured 0.13-0.19 there).
        :meth:`complete` resumes it up to ``rank`` for solves with many right-hand
        sides. None: only ``rank`` and ``tol`` stop it.

    Attributes
    ----------
    factor : torch.Tensor of shape (d, r), float64
        L, with r ≤ ``rank`` the number of steps taken. Kept, and M applied, in
        float64 whatever P's dtype, for the reason given in
        :class:`NystromPreconditioner` (float32, spectrum 1e5·exp(-i/8), μ = 1e-2,
        rank 200: 1000 CG iterations without reaching 1e-4 before, 11 now).
    pivots : torch.Tensor of shape (r,)
        Indices of the columns of P used, in order.
    rank : int
    remaining_trace : float
        tr(P - L Lᵀ), the trace-norm error of the approximation.
    """

    def __init__(self, diagonal, column, rank, shift, *, tol=1e-8, cg_tol=None):
        size = diagonal.shape[0]
        self.shift, self._column = shift, column
        # float64 throughout, whatever P's dtype: see factor_dtype.
        self._remaining = diagonal.to(factor_dtype(diagonal), copy=True)
        self._stop_trace = tol * float(self._remaining.sum())
        self._rows = self._remaining.new_empty(min(rank, size), size)  # Lᵀ, by rows
        self._pivots, self.factor = [], None
        self._factorize(cg_tol)

    def complete(self):
        """Resume the factorisation up to ``rank`` columns (or ``tol``), ignoring
        ``cg_tol``: for solves with many right-hand sides, such as one per test
        point. The greedy pivots continue where they stopped, so the factor is the
        one that ``cg_tol=None`` would have built. Thread-safe: the factor it
        leaves is the same whichever thread completes it."""
        with _COMPLETION_LOCK:
            self._factorize(None)

    def _factorize(self, cg_tol):
        """Add greedy columns until a stopping rule holds; then set the factor (only
        when columns were added: :meth:`complete` runs before every variance solve)."""
        rows, remaining, pivots = self._rows, self._remaining, self._pivots
        start = len(pivots)
        for j in range(start, rows.shape[0]):
            pivot = int(torch.argmax(remaining))
            pivot_value = float(remaining[pivot])
            exhausted = float(remaining.sum()) <= self._stop_trace
            if pivot_value <= 0.0 or exhausted:
                break
            if self._built_enough(j, pivot_value, cg_tol):
                break
            # l = (P[:, i] - L L[i]ᵀ) / √d_i
            row = self._column(pivot).to(rows.dtype) - rows[:j].T @ rows[:j, pivot]
            row /= pivot_value**0.5
            rows[j] = row
            pivots.append(pivot)
            # d ← d - l² ; the pivot is eliminated exactly (rounding aside).
            remaining -= row**2
            remaining[pivot] = 0.0
            remaining.clamp_(min=0.0)
        if self.factor is not None and len(pivots) == start:
            return
        self.factor = rows[: len(pivots)].T
        self.pivots = torch.tensor(pivots, dtype=torch.long, device=remaining.device)
        self.rank = len(pivots)
        self.remaining_trace = float(remaining.sum())
        # Woodbury core μI + Lᵀ L (r x r), factored once per factor.
        core = self.factor.T @ self.factor
        core.diagonal().add_(self.shift)
        self._core_factor = torch.linalg.cholesky(core)

    @property
    def largest_eigenvalue(self):
        """The largest eigenvalue of L Lᵀ (≤ λ_max(P)), from the r x r LᵀL."""
        if self.rank == 0:
            return 0.0
        return float(torch.linalg.eigvalsh(self.factor.T @ self.factor)[-1])

    def _built_enough(self, n_columns, largest_remaining, cg_tol):
        """The ``cg_tol`` stopping rule, after ``n_columns`` columns."""
        if cg_tol is None:
            return False
        remaining = largest_remaining / self.shift
        iterations = math.log(2.0 / cg_tol) * math.sqrt(1.0 + remaining)
        return n_columns * PIVOT_COST >= iterations / 3.0

    def __call__(self, R):
        # (R - L (μI + LᵀL)⁻¹ Lᵀ R) / μ, in the factor's dtype
        L = self.factor
        R_ = R.to(L.dtype)
        inner = torch.cholesky_solve(L.T @ R_, self._core_factor)
        return ((R_ - L @ inner) / self.shift).to(R.dtype)
