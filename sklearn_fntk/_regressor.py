"""FiniteNTKRegressor: exact GP regression with the finite NTK of a trained network."""

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import RegressorMixin, _fit_context
from sklearn.utils._param_validation import (
    Interval,
    StrOptions,
)
from sklearn.utils.validation import check_is_fitted

from ._base import FiniteNTKBase, _to_tensor
from ._diagnostics import (
    check_finite,
    check_low_rank_variance,
    check_regression_solve,
    warn,
)
from ._inference.gaussian import GaussianPosterior
from ._joint_predictive import JointPredictiveMixin
from ._linearize.jacobian import scale_rows
from ._marginal_likelihood import MarginalLikelihoodMixin

__all__ = ["FiniteNTKRegressor"]


class FiniteNTKRegressor(
    RegressorMixin, JointPredictiveMixin, MarginalLikelihoodMixin, FiniteNTKBase
):
    """Gaussian-process regression with the finite-width NTK of a trained network.

    The network f_θ is linearized around its trained weights θ,
    f(x; w) = f_θ(x) + J(x)(w - θ), and given the prior w ~ N(θ, prior·I). With
    Gaussian noise this is a GP with kernel ``prior · J(x) J(x')ᵀ``, joint over the
    network's k outputs, whose posterior is computed exactly, matrix-free: Jacobian
    products stream the data in chunks, and the linear system is solved in function
    space (size n·k) or parameter space (size p) by Cholesky or conjugate gradient.

    Parameters
    ----------
    network : torch.nn.Module or None, default=None
        The trained network; it maps a batch (n, ...) to outputs (n,) or (n, k). It is
        deep-copied and used in eval mode; the module passed in is never changed.
        None builds a randomly initialised tanh MLP (64, 64) at fit time.
    noise : float or "auto", default="auto"
        Observation noise variance σ² (in units of y squared); σ²/w_i for a sample
        of weight w_i (``sample_weight`` in :meth:`fit`). "auto" fits it by the
        marginal likelihood, as GaussianProcessRegressor fits its kernel, with a
        weak inverse-gamma hyperprior whose mode is 1% of the mean squared residual
        ‖y - m(X)‖²/d, so that a handful of points cannot collapse it to zero (see
        the user guide, "Choosing noise and prior"). A number fixes it (as in a
        grid search).
    prior : float or "auto", default="auto"
        Prior variance s of the weights around θ: the kernel is s·J(x)J(x')ᵀ.
        "auto" fits it by the marginal likelihood (jointly with an "auto" noise); a
        number fixes it. The predictive mean depends on noise and prior only
        through their ratio: cross-validating the mean cannot fix both, the
        evidence can. With the dense solver the evidence is exact (one
        eigendecomposition of J Jᵀ or JᵀJ serves every candidate); with CG it is a
        matrix-free Lanczos quadrature.
    prior_mean : {"network", "zero"}, default="network"
        GP prior mean: the trained network's output f_θ(x), or zero.
    parameters : list of str or None, default=None
        Names (as in ``network.named_parameters()``) of the parameters to linearize,
        for example the last layer's; the others stay fixed. None: every parameter
        with ``requires_grad=True``.
    solver : {"auto", "dense", "cg"}, default="auto"
        Cholesky of the assembled system, or preconditioned conjugate gradient with
        matrix-free products. "auto" picks dense for systems up to 4096.
    space : {"auto", "function", "parameter"}, default="auto"
        Solve with K = s·JJᵀ + σ²I (size n·k) or with JᵀJ + (σ²/s)I (size p).
        "auto" picks the smaller.
    preconditioner : {"auto", "jacobi", "nystrom", "pivoted_cholesky"} or None, \
            default="auto"
        CG preconditioner (used by ``solver="cg"`` only): a randomized Nyström
        approximation from ``rank`` operator products (in parameter space, of the
        Fisher of a random subset of samples, rescaled), a partial pivoted Cholesky
        of the kernel (function space only), or the exact diagonal. "auto": Nyström
        from the low-rank variance's eigenpairs when the variance is low-rank, else
        pivoted Cholesky where kernel columns are cheap (function space with the
        layerwise kernel), else Nyström. See the user guide, "Preconditioners".
    fisher_product : {"exact", "finite_difference"}, default="exact"
        Parameter-space products JᵀJ v: exact (a JVP then a VJP), or the
        finite-difference form of Maddox et al. (2021), ∇ ½‖f_θ(X) - f_θ+εv(X)‖² / ε:
        one forward and backward pass, O(√machine-ε) relative error. Only used by the
        CG iterations in parameter space; warns in float32, where its error is
        amplified by the conditioning.
    variance : {"auto", "exact", "low_rank"}, default="auto"
        Predictive variances. "exact" solves against the test Jacobian (Cholesky
        factor, or CG per test batch). "low_rank" keeps the top eigenpairs of the
        Fisher JᵀJ whose weight f/(f + σ²/s) exceeds 1% (exact up to size 4096,
        else from a Nyström sketch capped at rank 512), so predicting needs only the
        test Jacobian times a (p, rank) factor; it never underestimates the exact
        variance and overestimates it by at most ``prior · w · ‖J(x)‖²``, with
        ``w = variance_tail_weight_`` (a warning when w > 0.1). "auto": "exact"
        with the dense solver, "low_rank" with CG. ``return_cov`` is always exact.
    rank : int or None, default=None
        Rank of the Nyström / pivoted Cholesky preconditioner and of the low-rank
        variance. None: adaptive, up to 512 (see the user guide, "Preconditioners"
        and "Predictive variances").
    tol : float, default=1e-6
        CG stops when the relative residual ‖b - Ax‖/‖b‖ of every column is below;
        for exact predictive variances, once each variance is within ``tol`` of its
        exact value (relative), which the residual rule did not ensure in function
        space (there the posterior variance is the prior variance minus a term
        nearly as large).
    max_iter : int or None, default=None
        CG iteration limit; None means 10 times the system size.
    batch_size : int, default=1024
        Samples per chunk in every Jacobian product and explicit Jacobian block.
    dtype : {"float64", "float32"}, default="float64"
        Precision of all torch computation (the network copy is cast to it).
    device : str or torch.device, default="cpu"
        Where the network copy, the data and all computation live. A fitted
        estimator pickles with its tensors on the CPU and loads back on this device,
        or on the CPU with a ``DeviceFallbackWarning`` where the machine lacks it
        (see the user guide, "Saving and loading").
    random_state : int, RandomState instance or None, default=None
        Seeds the default network's initialisation, the Nyström sketches, the
        Lanczos probes and the random restarts of the evidence maximisation.
    verbose : int, default=0
        Print CG progress when positive.

    Attributes
    ----------
    network_ : torch.nn.Module
        The private eval-mode copy of the network.
    delta_ : torch.Tensor of shape (``n_params_``,)
        Posterior mean of w - θ; the predictive mean is f_θ(x) + J(x)·``delta_``
        (without the f_θ term for ``prior_mean="zero"``).
    n_features_in_ : int
    input_shape_ : tuple
        Per-sample shape of X seen in fit.
    n_outputs_ : int
    n_params_ : int
    space_, solver_ : str
        The resolved solve space and solver.
    n_iter_ : int
        CG iterations of the fit (1 for the dense solver: one direct solve).
    noise_, prior_ : float
        The noise and prior variances used: ``noise`` and ``prior`` where they are
        numbers, their evidence-maximising values where they are "auto" (as
        GaussianProcessRegressor's ``kernel_`` is to ``kernel``).
    log_marginal_likelihood_value_ : float or None
        The log evidence at ``noise_`` and ``prior_`` found by the "auto" search
        (exact with the dense solver, the Lanczos estimate with CG); None when both
        were given as numbers.
    kernel_ : {"layerwise", "autodiff"}
        "layerwise" when the network is Linear layers and elementwise activations
        and the solve is in function space, or in parameter space with CG: kernel
        products, Jacobian products, diagonals and columns then come from
        per-layer features (a few matmuls per layer), not autodiff.
    preconditioner_, variance_ : str or None
        The resolved preconditioner and variance method.
    rank_ : int
        Rank of the preconditioner / low-rank variance built by ``fit`` (0 if
        none). An adaptive pivoted Cholesky preconditioner resumes its
        factorisation, up to 512 columns, before exact CG variances.
    variance_tail_weight_ : float or None
        For the low-rank variance, see ``variance``.
    forward_mode_ : bool
        False when the network lacks forward-mode rules and J·v uses a double VJP.

    Notes
    -----
    A fitted estimator is thread-safe: concurrent predictions equal serial ones bit
    for bit (its network's passes run one at a time under a process-wide lock). A
    fit that fails, KeyboardInterrupt included, leaves the previous fitted state;
    X, y and ``sample_weight`` are never written to. See the user guide,
    "Reliability".

    Examples
    --------
    >>> import torch
    >>> from sklearn.datasets import load_diabetes
    >>> from sklearn_fntk import FiniteNTKRegressor
    >>> X, y = load_diabetes(return_X_y=True)
    >>> net = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(),
    ...                           torch.nn.Linear(32, 1))
    >>> reg = FiniteNTKRegressor(net, prior_mean="zero").fit(X, y / y.std())
    >>> mean, std = reg.predict(X[:3], return_std=True)
    """

    _parameter_constraints = {
        **FiniteNTKBase._COMMON_CONSTRAINTS,
        "noise": [Interval(Real, 0, None, closed="neither"), StrOptions({"auto"})],
        "prior": [Interval(Real, 0, None, closed="neither"), StrOptions({"auto"})],
        "preconditioner": [
            StrOptions({"auto", "jacobi", "nystrom", "pivoted_cholesky"}),
            None,
        ],
        "fisher_product": [StrOptions({"exact", "finite_difference"})],
        "variance": [StrOptions({"auto", "exact", "low_rank"})],
        "rank": [Interval(Integral, 1, None, closed="left"), None],
    }
    _conditioning_advice = "increase noise"

    def __init__(
        self,
        network=None,
        *,
        noise="auto",
        prior="auto",
        prior_mean="network",
        parameters=None,
        solver="auto",
        space="auto",
        preconditioner="auto",
        fisher_product="exact",
        variance="auto",
        rank=None,
        tol=1e-6,
        max_iter=None,
        batch_size=1024,
        dtype="float64",
        device="cpu",
        random_state=None,
        verbose=0,
    ):
        self.network = network
        self.noise = noise
        self.prior = prior
        self.prior_mean = prior_mean
        self.parameters = parameters
        self.solver = solver
        self.space = space
        self.preconditioner = preconditioner
        self.fisher_product = fisher_product
        self.variance = variance
        self.rank = rank
        self.tol = tol
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Condition the linearized-network GP on (X, y).

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Inputs in the shape the network takes (2-D features or n-D images).
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative per-sample weights w_i scaling the noise precision: sample
            i has noise variance ``noise / w_i`` (on all its outputs). For the
            posterior, an integer weight is the same as repeating the sample that
            many times and a zero weight as leaving it out. ``noise_`` is the
            variance at weight 1, and :meth:`log_marginal_likelihood` (maximised by
            noise and prior set to "auto") is that of the weighted model: one observation of
            variance ``noise / w_i`` per sample. None: all weights 1.

        Returns
        -------
        self : FiniteNTKRegressor
        """
        X, y, sample_weight, state = self._validate_fit_data(
            X, y, sample_weight, multi_output=True, y_numeric=True
        )
        if y.dtype.kind not in "biuf":
            raise ValueError(
                f"y has dtype {y.dtype}: {type(self).__name__} needs numeric targets. "
                "Convert them, for example with y.astype(float)."
            )
        Y = y.reshape(y.shape[0], -1)
        n_outputs = Y.shape[1]
        network = self._make_network(X, n_outputs)
        theta = network.theta
        choices = self._resolve(
            X.shape[0] * n_outputs,
            network.n_params,
            self._layerwise(network),
            variance=self.variance,
        )
        X = _to_tensor(X, theta)  # one copy, shared by the kernel and the products
        # Noise variances σ²/w_i: the GP on the rows of J and r scaled by √w_i has
        # noise σ² I, so everything below works on that scaled system. Its log
        # evidence is that of the weighted model less ½ Σ log w (one term per row).
        row_scale, log_weight = None, 0.0
        if sample_weight is not None:
            row_scale = torch.sqrt(_to_tensor(sample_weight, theta))
            log_weight = 0.5 * n_outputs * float(np.log(sample_weight).sum())
        structured = self._structured_kernel(network, X, choices, row_scale)
        # Iterative solves reuse each chunk's forward pass, except where the kernel
        # is layerwise or the finite-difference Fisher product runs its own passes.
        finite_difference = (
            choices.space == "parameter" and self.fisher_product == "finite_difference"
        )
        if finite_difference and choices.solver == "cg" and self.dtype == "float32":
            warn(
                "fisher_product='finite_difference' in float32 is exact only to about "
                "1e-3 (relative), and the solve amplifies that by the system's "
                "conditioning (predicted means were measured 14% off although CG "
                "converged). Use fisher_product='exact' or dtype='float64'."
            )
        iterative = choices.solver == "cg" and structured is None and not finite_difference
        jacobian = self._training_jacobian(
            network,
            X,
            cache=iterative,
            row_scale=row_scale,
            # parameter space: products from per-layer features, no autograd
            layerwise=iterative and self._layerwise(network),
        )
        # r = y - m(X), with m(X) = f_θ(X) or 0, scaled like J's rows
        targets = self._targets(Y, theta)
        scaled_targets = scale_rows(targets, row_scale)
        residuals = targets - jacobian.outputs if self.prior_mean == "network" else targets
        residuals = scale_rows(residuals, row_scale)
        noise, prior, gram, evidence, lml_value = self.noise, self.prior, None, None, None
        if "auto" in (noise, prior):
            gram, evidence, best = self._fit_hyperparameters(
                jacobian, residuals, structured, choices
            )
            noise, prior = best.noise, best.prior
            lml_value = best.log_marginal_likelihood + log_weight
        posterior = GaussianPosterior(
            jacobian,
            residuals,
            prior=prior,
            noise=noise,
            choices=choices,
            policy=self._policy,
            fisher_product=self.fisher_product,
            structured=structured,
            rank=self.rank,
            tol=self.tol,
            max_iter=self.max_iter,
        )
        progress = self._cg_progress()
        try:
            posterior.fit(
                gram=gram, generator=self._generator(self.device), callback=progress
            )
        finally:
            if progress is not None:
                progress.close()
        scale = float(torch.linalg.vector_norm(scaled_targets))
        check_regression_solve(self, posterior, scale)
        check_low_rank_variance(choices.variance, posterior)
        self._commit(
            {
                **state,
                "_y_ndim": y.ndim,
                "n_outputs_": n_outputs,
                "_network": network,
                "space_": choices.space,
                "solver_": choices.solver,
                "preconditioner_": choices.preconditioner,
                "variance_": choices.variance,
                "_log_weight": log_weight,
                "kernel_": (
                    "layerwise"
                    if structured is not None or jacobian.structured is not None
                    else "autodiff"
                ),
                "forward_mode_": jacobian.forward_mode,
                "noise_": noise,
                "prior_": prior,
                "_evidence": evidence,
                "log_marginal_likelihood_value_": lml_value,
                "_posterior": posterior,
                "delta_": posterior.delta,
                "n_iter_": posterior.n_iter,
                "rank_": posterior.rank,
                "variance_tail_weight_": posterior.variance_tail_weight,
            }
        )
        return self

    def _shape_outputs(self, array):
        """(m, k) -> (m,) when fitted on a 1-D y."""
        return array[:, 0] if self._y_ndim == 1 else array

    def _latent_variance(self, X):
        """Predictive variances of the latent outputs, shape (m, k)."""
        parts = []
        for start in range(0, X.shape[0], self.batch_size):
            chunk = X[start : start + self.batch_size]
            variance, report = self._posterior.covariance(chunk, diagonal=True)
            self._warn_unconverged(report, "predictive variances")
            check_finite(
                variance.reshape(-1, self.n_outputs_),
                "The predictive variances on X",
                "the network's gradients are not finite there",
                offset=start,
            )
            parts.append(variance.reshape(-1, self.n_outputs_))
        return torch.cat(parts).clamp_min(0.0)

    def predict(self, X, return_std=False, return_cov=False, include_noise=False):
        """Predictive mean, and optionally std or covariance.

        As in scikit-learn's GaussianProcessRegressor, std and cov are of the noise-free
        latent f by default; ``include_noise=True`` makes them those of a new
        observation y (this argument passes through a Pipeline's ``predict``).

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
        return_std : bool, default=False
        return_cov : bool, default=False
            The covariance between test points, per output (cross-output terms are
            not returned). Needs the test Jacobian of all points at once; raises
            MemoryError, before allocating, when it does not fit.
        include_noise : bool, default=False
            Add the noise variance ``noise_`` to the variances.

        Returns
        -------
        y_mean : ndarray of shape (n_samples,) or (n_samples, n_outputs)
        y_std : ndarray of shape (n_samples,) or (n_samples, n_outputs), optional
        y_cov : ndarray, optional
            Shape (n_samples, n_samples), or (n_samples, n_samples, n_outputs) for
            a multi-output fit.
        """
        if return_std and return_cov:
            raise RuntimeError("At most one of return_std or return_cov can be requested.")
        check_is_fitted(self)
        X = self._validate_predict_X(X)
        mean = self._shape_outputs(self._numpy(self._latent_mean(X)))
        noise = self.noise_ if include_noise else 0.0
        if return_std:
            std = torch.sqrt(self._latent_variance(X) + noise)
            return mean, self._shape_outputs(self._numpy(std))
        if return_cov:
            m, k = X.shape[0], self.n_outputs_
            # the per-output blocks, and their float64 copy where the dtype differs
            after = [("the per-output blocks", (m, m, k), torch.float64)]
            cov = self._latent_covariance(X, "return_cov", after)
            cov.diagonal().add_(noise)
            # per-output blocks cov[i, a, j, a] -> (m, m, k)
            per_output = torch.einsum("iaja->ija", cov.reshape(m, k, m, k))
            per_output = self._numpy(per_output)
            return mean, per_output[:, :, 0] if self._y_ndim == 1 else per_output
        return mean

    def predict_std(self, X, include_noise=False):
        """Predictive standard deviation.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
        include_noise : bool, default=False
            Add the noise variance: the std of a new observation y, not of f.

        Returns
        -------
        std : ndarray of shape (n_samples,) or (n_samples, n_outputs)
        """
        check_is_fitted(self)
        variance = self._latent_variance(self._validate_predict_X(X))
        if include_noise:
            variance = variance + self.noise_
        return self._shape_outputs(self._numpy(torch.sqrt(variance)))
