"""Solves with one operator A = P + c·I: its set-up (factor or preconditioner), its
solves, and the quadratic forms Bᵀ A⁻¹ B that predictive covariances need.

Both posteriors (Gaussian regression, Laplace classification) go through
:class:`LinearSystem`: construction stores, :meth:`LinearSystem.build` factors the
assembled operator (``solver="dense"``) or takes a preconditioner built by
:func:`build_preconditioner` (``solver="cg"``), and every solve returns the CG report
(:class:`CGResult`), which the estimators turn into warnings.
"""

import torch

from .._linalg.cg import CGResult, conjugate_gradient
from .._linalg.dense import cholesky, solve_with_factor
from .._linalg.lanczos import largest_eigenvalue
from .._linalg.memory import check_fits, largest
from .._linalg.preconditioners import (
    JacobiPreconditioner,
    NystromPreconditioner,
    PivotedCholeskyPreconditioner,
)
from .operators import ParameterOperator

__all__ = [
    "LinearSystem",
    "build_preconditioner",
    "eigen_parts",
    "eigh_parts",
    "nystrom_sketch",
]

# Vectors of shape (d, m) that a block CG solve holds at once: X, R, Z and P, and
# per iteration the active columns' P, R, A P, their updates and M R; the true
# residual at the end.
_CG_VECTORS = 10


def eigh_parts(size, dtype):
    """What a symmetric eigendecomposition of a (size, size) matrix adds at its peak
    (LAPACK's syevd: the eigenvectors and a workspace of twice their size)."""
    return [("its eigendecomposition and workspace", (3, size, size), dtype)]


def eigen_parts(operator, dtype):
    """What the eigendecomposition of ``operator``'s Gram matrix (J Jᵀ or JᵀJ) in
    ``dtype`` holds at its peak: the Gram matrix, its copy in ``dtype`` where that
    differs, the eigendecomposition, what assembling it left (blocks) and the
    cached linearization; parts for :func:`check_fits`."""
    d, w = operator.size, operator.jacobian.w
    parts = [("the Gram matrix", (d, d))]
    if dtype != w.dtype:
        parts.append(("its copy", (d, d), dtype))
    parts += eigh_parts(d, dtype)
    return parts + operator.assembly_parts() + operator.cache_parts()


def definite_advice(choices, dtype):
    """What to change when a dense system is not numerically positive definite:
    ``choices`` (strings), and float64 where the system is in another dtype, as
    "a, b, or c"."""
    choices = list(choices) + ([] if dtype == torch.float64 else ["use dtype='float64'"])
    if len(choices) == 1:
        return choices[0]
    return ", ".join(choices[:-1]) + f", or {choices[-1]}"


def nystrom_sketch(operator, *, ratio, rank, max_rank, generator, policy):
    """Nyström sketch of the PSD part P of ``operator`` (r products with P).

    In parameter space P = JᵀΛJ = Σ_i J_iᵀΛ_iJ_i sums over the training samples, and
    the sketch is taken of the unbiased estimate (n/m)·Σ_(i∈S) J_iᵀΛ_iJ_i over m
    random samples S (``policy.sketch_samples``; all n when fewer), r the largest
    rank the sketch may reach: its products cost m/n of full ones. A preconditioner
    only needs P's dominant subspace roughly; CG still solves the exact system.

    Parameters
    ----------
    operator : ParameterOperator or FunctionOperator
    ratio : float
        Adaptive rank: grow until λ̂_r ≤ ratio·shift.
    rank : int or None
        A fixed rank, or None to grow adaptively up to ``max_rank``.
    max_rank : int
    generator : torch.Generator or None
    policy : Policy

    Returns
    -------
    NystromPreconditioner
    """
    op, w = operator, operator.jacobian.w
    options = dict(dtype=w.dtype, device=w.device, generator=generator)
    if isinstance(op, ParameterOperator):
        final_rank = max_rank if rank is None else rank
        samples = policy.sketch_samples(op.n_samples, final_rank, op.n_outputs)
        # each shard of a data-parallel fit subsamples its own rows
        op = op.subsampled(samples, op.jacobian.reduction.local_generator(generator))
    if rank is not None:
        rank = min(rank, op.size)
        return NystromPreconditioner(op.psd_matmat, op.size, rank, op.shift, **options)
    return NystromPreconditioner.adaptive(
        op.psd_matmat, op.size, op.shift, ratio=ratio, max_rank=max_rank, **options
    )


def build_preconditioner(operator, kind, *, rank, tol, generator, policy, low_rank=None):
    """The CG preconditioner ``kind`` of ``operator``.

    Parameters
    ----------
    operator : ParameterOperator or FunctionOperator
    kind : {"jacobi", "nystrom", "pivoted_cholesky"} or None
    rank : int or None
        Nyström / pivoted Cholesky rank; None: adaptive up to ``policy.max_rank``
        (pivoted Cholesky then also stops once its build has cost about a third of
        the CG work predicted to remain: see ``PivotedCholeskyPreconditioner``).
    tol : float
        The CG tolerance it will serve.
    generator : torch.Generator or None
        For Nyström sketches.
    policy : Policy
    low_rank : LowRankVariance or None
        When given, its eigenpairs (a finer Nyström approximation) are reused.

    Returns
    -------
    callable or None
    """
    if kind is None:
        return None
    if kind == "jacobi":
        return JacobiPreconditioner(operator.diagonal())
    if kind == "pivoted_cholesky":
        return PivotedCholeskyPreconditioner(
            operator.psd_diagonal(),
            operator.column,
            policy.max_rank if rank is None else rank,
            operator.shift,
            cg_tol=tol if rank is None else None,
        )
    if low_rank is not None:
        return low_rank.sketch
    return nystrom_sketch(
        operator,
        ratio=policy.nystrom_ratio,
        rank=rank,
        max_rank=policy.max_rank,
        generator=generator,
        policy=policy,
    )


def _combine(a, b, mode, n_outputs):
    """aᵀb in ``mode``: its diagonal (m,), its (k, k) blocks per test point
    (m/k, k, k), or all of it (m, m), for a and b of shape (d, m)."""
    if mode == "diagonal":
        return (a * b).sum(0)
    if mode == "full":
        return a.T @ b
    d = a.shape[0]
    shape = (d, -1, n_outputs)
    return torch.einsum("dia,dib->iab", a.reshape(shape), b.reshape(shape))


def _direct_report(solution, n_columns):
    """The CGResult of a direct solve: one "iteration", converged, residual 0."""
    return CGResult(
        solution,
        torch.ones(n_columns, dtype=torch.long),
        torch.zeros(n_columns, dtype=solution.dtype),
        torch.ones(n_columns, dtype=torch.bool),
        1,
    )


class LinearSystem:
    """Solves with ``operator``: a Cholesky factor, or preconditioned CG.

    Parameters
    ----------
    operator : ParameterOperator or FunctionOperator
    solver : {"dense", "cg"}
    tol : float
        CG's relative residual; for quadratic forms, their relative accuracy.
    max_iter : int or None
        CG iteration limit per solve (None: 10·d).

    Attributes
    ----------
    factor : torch.Tensor of shape (d, d) or None
        Lower Cholesky factor (dense solver), after :meth:`build`.
    preconditioner : callable or None
    """

    def __init__(self, operator, *, solver, tol, max_iter=None):
        self.operator, self.solver = operator, solver
        self.tol, self.max_iter = tol, max_iter
        self.factor = self.preconditioner = None

    @property
    def size(self):
        return self.operator.size

    def build(self, *, preconditioner=None, gram=None, what, advice):
        """Factor the assembled operator (dense solver), or keep ``preconditioner``.

        Parameters
        ----------
        preconditioner : callable or None
            For CG.
        gram : torch.Tensor or None
            J Jᵀ (function space) or JᵀΛJ (parameter space) already assembled.
        what : str
            What the system is, for error messages.
        advice : dict
            What to change, for error messages: under "definite" when its Cholesky
            factorisation fails (float64 is suggested where the system is in
            another dtype). Memory is checked beforehand (:meth:`check_dense`).

        Returns
        -------
        self
        """
        if self.solver == "dense":
            self.factor = self.factor_dense(gram, what, advice)
        else:
            self.preconditioner = preconditioner
        return self

    def check_dense(self, what, advice, *, gram_held=False, phases=()):
        """Raise MemoryError unless the dense path fits, before it allocates.

        Parameters
        ----------
        what : str
            The path, for the message.
        advice : str
            What to change, for the message.
        gram_held : bool, default=False
            Whether the caller holds the Gram matrix meanwhile (see
            ``dense_parts``).
        phases : sequence of lists of parts, default=()
            Other phases of the caller's path (see :func:`check_fits`); the peak
            is the largest phase.

        Returns
        -------
        int
            The predicted peak in bytes.
        """
        w = self.operator.jacobian.w
        parts = largest([self.operator.dense_parts(gram_held), *phases], w.dtype)
        return check_fits(parts, w.dtype, w.device, f"The dense {what}", advice)

    def factor_dense(self, gram, what, advice):
        """Cholesky factor of the assembled operator (``what`` and ``advice`` as in
        :meth:`build`; memory is checked by :meth:`check_dense`)."""
        w = self.operator.jacobian.w
        advice = definite_advice(advice["definite"], w.dtype)
        return cholesky(self.operator.dense(gram), what, advice)

    def condition_number(self, generator=None):
        """κ(A) = (λ_max(P) + c)/c, the condition number of A = P + c·I.

        λ_max(P) from the preconditioner where it knows it (Nyström, pivoted
        Cholesky: their approximation of P's top), else from 20 Lanczos steps.
        """
        op = self.operator
        top = getattr(self.preconditioner, "largest_eigenvalue", None)
        if top is None:
            w = op.jacobian.w
            top = largest_eigenvalue(
                op.psd_matmat, op.size, dtype=w.dtype, device=w.device, generator=generator
            )
        return (max(top, 0.0) + op.shift) / op.shift

    def solve(self, B, *, tol=None, stop=None, callback=None):
        """A⁻¹ B for B of shape (d,) or (d, m).

        Parameters
        ----------
        B : torch.Tensor
        tol : float or None
            CG tolerance for this solve (default: the system's).
        stop : callable or None
            A CG stopping rule (see ``conjugate_gradient``).
        callback : callable or None
            CG progress callback.

        Returns
        -------
        CGResult
            For the dense solver: one "iteration", converged, residual 0.
        """
        if self.factor is not None:
            column = B.reshape(B.shape[0], -1)
            solution = solve_with_factor(self.factor, column).reshape(B.shape)
            return _direct_report(solution, column.shape[1])
        return conjugate_gradient(
            self.operator.matmat,
            B,
            preconditioner=self.preconditioner,
            tol=self.tol if tol is None else tol,
            max_iter=self.max_iter,
            callback=callback,
            stop=stop,
            verify=True,
        )

    def inverse_form(self, B, prior, mode):
        """Bᵀ A⁻¹ B in ``mode`` ("diagonal", "blocks" or "full"), for the variances
        diag(prior - BᵀA⁻¹B), or diag(BᵀA⁻¹B) if ``prior`` is None.

        With the dense solver, from the Cholesky factor. By CG, each column stops
        once the variance it gives is within ``tol`` (relative), not once its
        residual is: every entry takes the symmetric form
        b_iᵀz_j + z_iᵀb_j - z_iᵀA z_j (one more product with A), which falls short of
        b_iᵀA⁻¹b_j by exactly e_iᵀA e_j (e the error of z), whatever the rounding;
        on the diagonal that is rᵀA⁻¹r ≤ ‖r‖²/μ (r the residual, A ⪰ μI with μ the
        operator's shift), so stopping once ‖r‖²/μ ≤ tol·v̂, with v̂ the variance
        from z, bounds the error by tol·v̂, and off it by tol·√(v̂_i v̂_j). The
        residual rule ignored the cancellation in prior - bᵀz (function space),
        where the prior variance can exceed the posterior's a thousandfold; and bᵀz
        alone is off by eᵀAe only while z's residual stays orthogonal to z
        (Galerkin), which rounding undoes after some hundred iterations: the error
        zᵀr, of either sign, left variances 1.7e-4 off (relative) at tol=1e-6.
        b_iᵀz_j's error u_iᵀA e_j scales with the prior.

        Parameters
        ----------
        B : torch.Tensor of shape (d, m)
        prior : torch.Tensor of shape (m,) or None
            Prior variances of the columns.
        mode : {"diagonal", "blocks", "full"}
            "blocks": the (k, k) block of each test point, k the operator's outputs.

        Returns
        -------
        values : torch.Tensor
            Shape (m,), (m/k, k, k) or (m, m).
        report : CGResult
        """
        k = self.operator.n_outputs
        if self.factor is not None:
            # BᵀA⁻¹B = VᵀV with V = L⁻¹B: one triangular solve, not two
            half = torch.linalg.solve_triangular(self.factor, B, upper=False)
            return _combine(half, half, mode, k), _direct_report(half, B.shape[1])
        shift, tol = self.operator.shift, self.tol
        # A residual at rounding level cannot shrink further (float32 cancellation).
        floor = 10 * torch.finfo(B.dtype).eps * torch.linalg.vector_norm(B, dim=0)

        def variance_is_accurate(Z, R, columns):
            explained = (B[:, columns] * Z).sum(0)
            variance = explained if prior is None else prior[columns] - explained
            squared = (R**2).sum(0)
            return (squared / shift <= tol * variance) | (squared <= floor[columns] ** 2)

        if isinstance(self.preconditioner, PivotedCholeskyPreconditioner):
            # Built for the fit's one right-hand side; a column per test point
            # repays its full rank (the factor cg_tol=None would have built).
            self.preconditioner.complete()
        result = self.solve(B, stop=variance_is_accurate)
        Z = result.solution
        AZ = self.operator.matmat(Z)
        values = (
            _combine(B, Z, mode, k) + _combine(Z, B, mode, k) - _combine(Z, AZ, mode, k)
        )
        return values, result

    def covariance_parts(self, n_rows):
        """What a full covariance over ``n_rows`` = m·k test rows holds at its peak.

        The test Jacobian (m·k, p) (with the layerwise kernel, the row blocks of the
        test kernel instead), in function space the cross kernel (n·k, m·k), the
        solve's vectors (right-hand side and solution, or the CG vectors), and the
        (m·k, m·k) result and its terms.
        """
        op, m = self.operator, n_rows
        size = op.size
        parts = []
        if getattr(op, "structured", None) is None:
            parts.append(("the test Jacobian", (m, op.n_params)))
        else:  # the test kernel from a chunk's rows at a time, then concatenated
            rows = min(op.jacobian.batch_size * op.n_outputs, m)
            parts.append(("kernel row blocks", (2, rows, m)))
        if not isinstance(op, ParameterOperator):
            parts.append(("the cross kernel", (2, size, m)))
        if self.factor is not None:
            parts.append(("the solve's right-hand side and solution", (2, size, m)))
        else:
            parts.append(("the conjugate-gradient vectors", (_CG_VECTORS, size, m)))
        return parts + [("the covariance and its terms", (3, m, m))]

    def check_covariance(self, n_rows, what, advice, after=()):
        """Raise MemoryError unless a full covariance over ``n_rows`` test rows fits,
        and what the caller then holds besides it (``after``, parts).

        Returns
        -------
        int
            The predicted peak in bytes.
        """
        w = self.operator.jacobian.w
        result = [("the covariance", (n_rows, n_rows))]
        parts = largest([self.covariance_parts(n_rows), result + list(after)], w.dtype)
        return check_fits(parts, w.dtype, w.device, what, advice)

    def covariance(self, X, mode, parameter_scale):
        """Posterior covariance of the latent outputs J*(w - θ) at test inputs X.

        Parameter space: scale·J* A⁻¹ J*ᵀ (regression: σ²·J*(JᵀJ + σ²/s)⁻¹J*ᵀ;
        Laplace: J* H⁻¹ J*ᵀ). Function space: s·J* J*ᵀ - Cᵀ B⁻¹ C with
        C = s·Λ^½ J J*ᵀ (Woodbury).

        Parameters
        ----------
        X : torch.Tensor of shape (m, ...)
        mode : {"diagonal", "blocks", "full"}
        parameter_scale : float
            The scale of A⁻¹ in parameter space (σ² or 1).

        Returns
        -------
        values : torch.Tensor
            Shape (m·k,), (m, k, k) or (m·k, m·k).
        report : CGResult
        """
        op = self.operator
        if isinstance(op, ParameterOperator):
            Jt = op.test_jacobian(X)
            values, report = self.inverse_form(Jt.T, None, mode)
            return parameter_scale * values, report
        prior, cross = op.test_kernels(X, mode)
        if mode == "diagonal":
            variances = prior
        elif mode == "blocks":
            variances = prior.diagonal(dim1=1, dim2=2).reshape(-1)
        else:
            variances = prior.diagonal()
        values, report = self.inverse_form(cross, variances, mode)
        return prior - values, report
