"""Exact Gaussian posterior of the linearized network, in function or parameter space.

Notation as in DESIGN.md §1: r = y - m(X) the training residuals (n, k) flattened to
n·k, s the prior variance, σ² the noise variance, K = s·J Jᵀ + σ² I and
A = Jᵀ J + (σ²/s) I.

    δ = s·Jᵀ K⁻¹ r = A⁻¹ Jᵀ r                              (push-through identity)
    cov(x*) = s·J* J*ᵀ - s²·(J J*ᵀ)ᵀ K⁻¹ (J J*ᵀ) = σ²·J* A⁻¹ J*ᵀ   (Woodbury)
    log p(y) = -½ rᵀK⁻¹r - ½ log|K| - (n·k/2) log 2π, where in parameter space
        rᵀK⁻¹r = (rᵀr - (Jᵀr)ᵀ δ) / σ²,
        log|K| = n·k·log σ² + p·log(s/σ²) + log|A|     (matrix determinant lemma)

Solves go through a Cholesky factor (``solver="dense"``) or batched preconditioned CG.
Predictive variances are exact (a solve per test batch) or low-rank: with the top-r
eigenpairs (f_j, v_j) of the Fisher JᵀJ and c = σ²/s,

    Σ = s·(I - Σ_j f_j/(f_j + c) v_j v_jᵀ)                  (exact over all j)

and keeping r terms gives var(x*) = s·(‖J*‖² - Σ_j≤r f_j/(f_j + c)(J* v_j)²), never
below the exact variance (see ``_low_rank_variance``) and, when the v_j are the top
eigenvectors, above it by at most s·f_(r+1)/(f_(r+1) + c)·‖J*‖² (LOVE-style, Pleiss
et al. 2018: cached at fit time, O(r) Jacobian products per test batch, no training
data).
"""

import math

import torch

from ._cg import conjugate_gradient
from ._evidence import stochastic_log_marginal_likelihood
from ._memory import check_fits
from ._operators import KernelOperator, ParameterOperator
from ._preconditioners import (
    NYSTROM_MAX_RANK,
    JacobiPreconditioner,
    NystromPreconditioner,
    PivotedCholeskyPreconditioner,
    sketch_samples,
)

__all__ = ["GaussianPosterior", "cholesky"]

# Low-rank variance: keep the directions of JᵀJ whose weight f / (f + c) exceeds
# this; a sketch grows until its last weight is at most this, or the rank cap.
LOW_RANK_WEIGHT = 0.01
# Low-rank variance from exact eigenpairs (one eigh of J Jᵀ or JᵀJ) up to this order;
# a Nyström sketch above it.
EIGEN_SIZE = 4096
# Memory cap on the low-rank factor V, shape (p, r): it bounds r.
LOW_RANK_BYTES = 1 << 29
# Nyström preconditioner: grow until λ_r ≤ this multiple of the shift.
NYSTROM_RATIO = 10.0


def cholesky(matrix, what):
    """Lower Cholesky factor, with an actionable error when it breaks down."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise ValueError(
            f"The {what} is not numerically positive definite in {matrix.dtype}; "
            "increase noise, lower prior, or use dtype='float64'."
        )
    return factor


class GaussianPosterior:
    """Posterior over δ = w - θ given Gaussian observations of the linearized network.

    Parameters
    ----------
    jacobian : JacobianProducts
        Products with J over the training inputs.
    residuals : torch.Tensor of shape (n, k)
    prior, noise : float
    space : {"function", "parameter"}
    solver : {"dense", "cg"}
    preconditioner : {None, "jacobi", "nystrom", "pivoted_cholesky"}
        "pivoted_cholesky" is for function space only.
    fisher_product : {"exact", "finite_difference"}
        How the parameter-space operator multiplies by JᵀJ.
    structured : LayerwiseKernel or None
        Per-layer kernel for function space (Linear/elementwise networks).
    variance : {"exact", "low_rank"}
    gram : torch.Tensor of shape (d, d) or None
        J Jᵀ (function space) or JᵀJ (parameter space) already assembled, reused
        by the dense solver instead of assembling it again.
    rank : int or None
        Rank of the Nyström / pivoted Cholesky preconditioner and of the low-rank
        variance; None grows it adaptively up to ``max_rank``.
    max_rank : int
    tol : float
    max_iter : int or None
    generator : torch.Generator or None
        Randomness of the Nyström sketches.
    callback : CGProgress or None
        Passed to CG during the fit solve, then closed.

    Attributes
    ----------
    delta : torch.Tensor of shape (p,)
        Posterior mean of w - θ.
    n_iter : int
        CG iterations of the fit solve (1 for the dense solver: one direct solve).
    residual_norm : float
        Final relative CG residual (0 for the dense solver).
    rank : int
        Rank of the preconditioner or low-rank variance actually built (0 if none).
    variance_tail_weight : float or None
        Low-rank variance: the largest weight f/(f + c) left out, which bounds the
        overestimate by that fraction of s·‖J*‖². Exact with exact eigenpairs (0 at
        full rank); for a Nyström sketch, the weight of its last direction, which the
        directions past it weigh about as much as or less.
    """

    def __init__(
        self,
        jacobian,
        residuals,
        *,
        prior,
        noise,
        space,
        solver,
        preconditioner=None,
        fisher_product="exact",
        structured=None,
        variance="exact",
        gram=None,
        rank=None,
        max_rank=NYSTROM_MAX_RANK,
        tol=1e-6,
        max_iter=None,
        generator=None,
        callback=None,
    ):
        self.prior, self.noise, self.space, self.solver = prior, noise, space, solver
        self.tol, self.max_iter, self.callback = tol, max_iter, callback
        self.variance = variance
        if space == "function":
            self.operator = KernelOperator(
                jacobian, prior=prior, noise=noise, structured=structured
            )
        else:
            self.operator = ParameterOperator(
                jacobian, prior=prior, noise=noise, fisher_product=fisher_product
            )
        self.residuals = residuals.reshape(-1)
        self._factor = None
        self._preconditioner = None
        self._low_rank = None
        self.rank, self.variance_tail_weight = 0, None
        sketch_options = dict(rank=rank, max_rank=max_rank, generator=generator)
        exact_eigenpairs = variance == "low_rank" and self.operator.size <= EIGEN_SIZE
        if gram is None and solver == "dense" and exact_eigenpairs:
            gram = self.operator.gram_dense()  # assembled once for both uses
        if exact_eigenpairs:
            self._low_rank = self._low_rank_from_eigenpairs(rank, gram)
        elif variance == "low_rank":
            self._low_rank = self._low_rank_variance(**sketch_options)
        if solver == "dense":
            self._factor = self._dense_factor(gram)
        elif preconditioner is not None:
            self._preconditioner = self._build_preconditioner(
                preconditioner, **sketch_options
            )

        if space == "function":
            # α = K⁻¹ r ; δ = s·Jᵀ α
            self._rhs = self.residuals
            self._solution, self.n_iter, self.residual_norm = self._solve_fit(self._rhs)
            shape = residuals.shape
            self.delta = prior * jacobian.vjp(self._solution.reshape(shape))
        else:
            # δ = A⁻¹ Jᵀ r
            self._rhs = jacobian.vjp(residuals)
            self._solution, self.n_iter, self.residual_norm = self._solve_fit(self._rhs)
            self.delta = self._solution
        if self.callback is not None:  # progress reporting is for the fit solve only
            self.callback.close()
            self.callback = None

    # -- setup ------------------------------------------------------------------------

    def _dense_factor(self, gram=None, advice="use solver='cg', or space='auto'"):
        """Cholesky factor of the assembled operator, after checking it fits."""
        size, jacobian = self.operator.size, self.operator.jacobian
        check_fits(
            (size, size),
            jacobian.w.dtype,
            jacobian.w.device,
            f"The dense {self.space}-space system",
            advice,
        )
        return cholesky(self.operator.dense(gram), f"{self.space}-space system")

    def _nystrom(self, ratio, rank, max_rank, generator):
        """Nyström sketch of the PSD part P of the operator (r products with P).

        In parameter space P = JᵀJ = Σ_i J_iᵀJ_i sums over the training samples,
        and the sketch is taken of the unbiased estimate (n/m)·Σ_(i∈S) J_iᵀJ_i over
        m random samples S (:func:`sketch_samples`; all n when fewer), r the largest
        rank the sketch may reach: its products cost m/n of full ones.
        The preconditioner only needs P's dominant subspace roughly; CG still
        solves the exact system.
        """
        op, w = self.operator, self.operator.jacobian.w
        options = dict(dtype=w.dtype, device=w.device, generator=generator)
        if self.space == "parameter":
            final_rank = max_rank if rank is None else rank
            samples = sketch_samples(op.n_samples, final_rank, op.n_outputs)
            op = op.subsampled(samples, generator)
        if rank is not None:
            rank = min(rank, op.size)
            return NystromPreconditioner(op.psd_matmat, op.size, rank, op.shift, **options)
        return NystromPreconditioner.adaptive(
            op.psd_matmat, op.size, op.shift, ratio=ratio, max_rank=max_rank, **options
        )

    def _build_preconditioner(self, kind, rank, max_rank, generator):
        op = self.operator
        if kind == "jacobi":
            return JacobiPreconditioner(op.diagonal())
        if kind == "pivoted_cholesky":
            # Adaptive: stop where the build reaches about a quarter of the fit.
            cg_tol = self.tol if rank is None else None
            built = PivotedCholeskyPreconditioner(
                op.psd_diagonal(),
                op.column,
                max_rank if rank is None else rank,
                op.shift,
                cg_tol=cg_tol,
            )
        elif self._low_rank is not None:
            # The variance's eigenpairs are a finer Nyström approximation: reuse them.
            built = self._low_rank[0]
        else:
            built = self._nystrom(NYSTROM_RATIO, rank, max_rank, generator)
        self.rank = max(self.rank, built.rank)
        return built

    def _rank_budget(self):
        """The largest r whose factor V (p, r) fits in ``LOW_RANK_BYTES``."""
        w = self.operator.jacobian.w
        return max(1, LOW_RANK_BYTES // (w.numel() * w.element_size()))

    def _low_rank_from_eigenpairs(self, rank, gram):
        """Exact top eigenpairs (f, V) of JᵀJ and the weights f/(f + c).

        One eigendecomposition of G = J Jᵀ = E diag(f) Eᵀ (function space) gives
        V = Jᵀ E f^-½, the eigenvectors of JᵀJ (r products with Jᵀ); in parameter
        space G = JᵀJ and V = E. Keeping the r directions of weight above
        ``LOW_RANK_WEIGHT`` (or ``rank`` of them) leaves out at most the next weight
        times s·‖J*‖²: ``variance_tail_weight`` is that weight, exactly. When r is
        the full rank of J the "low-rank" variance is the exact one.
        """
        op = self.operator
        if gram is None:
            gram = op.gram_dense()
        fisher, E = torch.linalg.eigh(gram)
        fisher, E = fisher.flip(0), E.flip(1)  # descending
        # Eigenvalues at rounding level (J's null space) are not kept.
        keep = int((fisher > torch.finfo(fisher.dtype).eps * op.size * fisher[0]).sum())
        weights = fisher[:keep] / (fisher[:keep] + self.noise / self.prior)
        if rank is None:
            rank = int((weights > LOW_RANK_WEIGHT).sum())
        rank = max(1, min(rank, keep, self._rank_budget()))
        self.variance_tail_weight = float(weights[rank]) if rank < keep else 0.0
        # A copy of the kept columns: a view would keep (and pickle) all of E.
        fisher, E, weights = fisher[:rank], E[:, :rank].contiguous(), weights[:rank]
        if self.space == "function":
            shape = (op.n_samples, op.n_outputs, rank)
            V = op.jacobian.vjp(E.reshape(shape)) / fisher.sqrt()
        else:
            V = E
        self.rank = rank
        # The same eigenpairs of P = gram_scale·G precondition CG optimally.
        sketch = NystromPreconditioner.from_eigenpairs(
            E, op.gram_scale * fisher, op.shift
        )
        return sketch, V, weights

    def _low_rank_variance(self, rank, max_rank, generator):
        """Eigenpairs (f, V) of JᵀJ and the weights f/(f + c), from a sketch.

        The Nyström sketch of P gives the dominant subspace; U (n·k, r) is an
        orthonormal basis of it in function space (the sketch's eigenvectors there;
        in parameter space, those of JᵀJ mapped through J and orthonormalised).
        With C = Jᵀ U and CᵀC = UᵀJJᵀU = Q diag(f) Qᵀ, V = C Q f^-½ is exactly
        orthonormal and

            V diag(f/(f + c)) Vᵀ = Jᵀ U (Uᵀ(JJᵀ + cI)U)⁻¹ Uᵀ J ⪯ Jᵀ (JJᵀ + cI)⁻¹ J,

        because U (UᵀAU)⁻¹ Uᵀ ⪯ A⁻¹ for A positive definite and U orthonormal: the
        low-rank variance never falls below the exact one.
        """
        c = self.noise / self.prior
        # Stop once λ_r ≤ ratio·shift, i.e. the weight f_r/(f_r + c) ≤ LOW_RANK_WEIGHT.
        ratio = LOW_RANK_WEIGHT / (1 - LOW_RANK_WEIGHT)
        max_rank = min(max_rank, self._rank_budget())
        sketch = self._nystrom(ratio, rank, max_rank, generator)
        jacobian = self.operator.jacobian
        U = sketch.eigenvectors[:, sketch.eigenvalues > 0].to(jacobian.w.dtype)
        if self.space == "parameter":
            U = torch.linalg.qr(jacobian.jvp(U).reshape(-1, U.shape[1])).Q
        shape = (self.operator.n_samples, self.operator.n_outputs, U.shape[1])
        C = jacobian.vjp(U.reshape(shape))
        fisher, Q = torch.linalg.eigh(C.T @ C)
        fisher, Q = fisher.flip(0), Q.flip(1)  # descending
        keep = fisher > torch.finfo(fisher.dtype).eps * fisher[0]
        fisher, Q = fisher[keep], Q[:, keep]
        V = (C @ Q) / fisher.sqrt()
        weights = fisher / (fisher + c)
        self.rank = int(weights.numel())
        self.variance_tail_weight = float(weights[-1]) if self.rank else 1.0
        return sketch, V, weights

    # -- solves -----------------------------------------------------------------------

    def _solve_fit(self, rhs):
        if self._factor is not None:
            return self.solve(rhs), 1, 0.0
        result = self._cg(rhs)
        return result.solution, int(result.n_iter.max()), float(result.residual_norms.max())

    def _cg(self, B, stop=None):
        return conjugate_gradient(
            self.operator.matmat,
            B,
            preconditioner=self._preconditioner,
            tol=self.tol,
            max_iter=self.max_iter,
            callback=self.callback,
            stop=stop,
        )

    def solve(self, B):
        """(operator)⁻¹ B for B of shape (d,) or (d, m)."""
        if self._factor is None:
            return self._cg(B).solution
        column = B.reshape(B.shape[0], -1)
        return torch.cholesky_solve(column, self._factor).reshape(B.shape)

    # -- predictions ------------------------------------------------------------------

    def covariance(self, X, diagonal):
        """Posterior covariance of the latent outputs J* δ at test inputs X.

        Parameters
        ----------
        X : torch.Tensor of shape (m, ...)
        diagonal : bool
            Return only the variances, shape (m·k,); otherwise the (m·k, m·k)
            covariance over test points and outputs (always exact).
        """
        if diagonal and self._low_rank is not None:
            return self._low_rank_diagonal(X)
        if self.space == "parameter":
            # σ²·J* A⁻¹ J*ᵀ
            Jt = self.operator.test_jacobian(X)
            return self.noise * self._inverse_form(Jt.T, None, diagonal)
        # s·J* J*ᵀ - (s·J J*ᵀ)ᵀ K⁻¹ (s·J J*ᵀ)
        prior, cross = self.operator.test_kernels(X, diagonal)
        variances = prior if diagonal else prior.diagonal()
        return prior - self._inverse_form(cross, variances, diagonal)

    def _inverse_form(self, B, prior, diagonal):
        """Bᵀ A⁻¹ B for the operator A (only its diagonal if ``diagonal``), for the
        variances diag(prior - BᵀA⁻¹B), or diag(BᵀA⁻¹B) if prior is None.

        With the dense solver, from the Cholesky factor. By CG, each column stops
        once the variance it gives is within ``tol`` (relative), not once its
        residual is: CG's z is the Galerkin solution in its Krylov space, so bᵀz
        falls short of bᵀA⁻¹b by exactly eᵀAe = rᵀA⁻¹r ≤ ‖r‖²/μ (e the error, r the
        residual, A ⪰ μI with μ the operator's shift), and stopping once
        ‖r‖²/μ ≤ tol·v̂, with v̂ the variance from z, bounds the error by tol·v̂. The
        residual rule ignored the cancellation in prior - bᵀz (function space),
        where the prior variance can exceed the posterior's a thousandfold: n = 2000,
        MLP 10-64-64-1, tol=1e-4: std errors up to 13% (76% at 1e-3). Covariances
        between columns i ≠ j take the symmetric form b_iᵀz_j + z_iᵀb_j - z_iᵀA z_j
        (one more product with A), whose error -e_iᵀA e_j is at most
        tol·√(v̂_i v̂_j), where b_iᵀz_j's error u_iᵀA e_j scales with the prior.
        """

        def combine(a, b):
            return (a * b).sum(0) if diagonal else a.T @ b

        if self._factor is not None:
            return combine(B, self.solve(B))
        shift, tol = self.operator.shift, self.tol
        # A residual at rounding level cannot shrink further (float32 cancellation).
        floor = 10 * torch.finfo(B.dtype).eps * torch.linalg.vector_norm(B, dim=0)

        def variance_is_accurate(Z, R, columns):
            explained = (B[:, columns] * Z).sum(0)
            variance = explained if prior is None else prior[columns] - explained
            squared = (R**2).sum(0)
            return (squared / shift <= tol * variance) | (squared <= floor[columns] ** 2)

        if isinstance(self._preconditioner, PivotedCholeskyPreconditioner):
            # Built for the fit's one right-hand side; a column per test point
            # repays its full rank (the factor cg_tol=None would have built).
            self._preconditioner.complete()
        Z = self._cg(B, stop=variance_is_accurate).solution
        if diagonal:  # there the symmetric form equals bᵀz (Galerkin)
            return combine(B, Z)
        return combine(B, Z) + combine(Z, B) - combine(Z, self.operator.matmat(Z))

    def _low_rank_diagonal(self, X):
        """s·(‖J*‖² - Σ_j w_j (J* v_j)²) per test row, shape (m·k,)."""
        _, V, weights = self._low_rank
        prior_variance, JV = self.operator.test_projections(X, V)
        return self.prior * (prior_variance - (JV**2) @ weights)

    def stochastic_log_marginal_likelihood(self, n_probes, lanczos_steps, generator):
        """Matrix-free estimate of log p(y) (``_evidence``): SLQ for log|K|, CG.

        It always works with the kernel K, built from the same Jacobian products
        when the fit solved in parameter space.
        """
        kernel = self.operator
        if self.space == "parameter":
            kernel = KernelOperator(kernel.jacobian, prior=self.prior, noise=self.noise)
        return stochastic_log_marginal_likelihood(
            kernel.matmat,
            self.residuals,
            kernel.size,
            self.noise,
            n_probes=n_probes,
            lanczos_steps=lanczos_steps,
            tol=self.tol,
            generator=generator,
        )

    def log_marginal_likelihood(self):
        """log p(y) at this prior and noise; exact (uses a Cholesky factor).

        After a CG fit the factor of the same space is assembled here, once.
        """
        if self._factor is None:
            self._factor = self._dense_factor(
                advice="use log_marginal_likelihood(method='stochastic')"
            )
        r, d = self.residuals, self.residuals.numel()
        log_det_factor = 2.0 * torch.log(self._factor.diagonal()).sum()
        if self.space == "function":
            quadratic = r @ self._solution
            log_det = log_det_factor
        else:
            quadratic = (r @ r - self._rhs @ self._solution) / self.noise
            p = self.operator.size
            log_det = (
                d * math.log(self.noise)
                + p * math.log(self.prior / self.noise)
                + log_det_factor
            )
        return float(-0.5 * quadratic - 0.5 * log_det - 0.5 * d * math.log(2 * math.pi))
