"""FiniteNTKRegressor: exact GP regression with the finite NTK of a trained network."""

import math
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
    check_output_noise,
    check_output_rounding,
    check_regression_solve,
    warn,
)
from ._inference.gaussian import GaussianPosterior
from ._inference.hyperparameters import student_t_variance_factor
from ._joint_predictive import JointPredictiveMixin
from ._linearize.jacobian import scale_rows
from ._marginal_likelihood import MarginalLikelihoodMixin
from ._precision import full_float32_precision
from ._sharding import check_same, check_same_parameters, detach
from ._stages import NO_STAGES

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
        the user guide, "Choosing hyperparameters"); with ``prior="auto"`` too, it
        is integrated out under that hyperprior and the predictive is a Student-t
        (``predictive_dof_``). A number fixes it (as in a grid search).
    prior : float or "auto", default="auto"
        Prior variance s of the weights around θ: the kernel is s·J(x)J(x')ᵀ.
        "auto" fits it by the marginal likelihood (jointly with an "auto" noise); a
        number fixes it. The predictive mean depends on noise and prior only
        through their ratio: cross-validating the mean cannot fix both, the
        evidence can. It is exact (one eigendecomposition of J Jᵀ or JᵀJ serves
        every candidate) with the dense solver (in parameter space up to 8192
        parameters, ``Policy.variance_factor_max_size``) and with CG in parameter
        space up to 4096 (``Policy.eigen_size``); otherwise a Lanczos
        quadrature of the same spectrum, over the assembled JᵀJ where the dense
        solver assembles it anyway, else matrix-free, whose steps grow until its
        Gauss and Gauss-Radau bounds agree within a nat at the fitted pair (a
        ``ConvergenceWarning`` where they cannot, with the gap).
    prior_mean : {"network", "zero"}, default="network"
        GP prior mean: the trained network's output f_θ(x), or zero.
    parameters : list of str or None, default=None
        Names (as in ``network.named_parameters()``) of the parameters to linearize,
        for example the last layer's; the others stay fixed. None: every parameter
        with ``requires_grad=True``.
    solver : {"auto", "dense", "cg"}, default="auto"
        Cholesky of the assembled system, or preconditioned conjugate gradient with
        matrix-free products. "auto" picks dense for systems up to 4096, and in
        parameter space wherever exact variances factor the system anyway: JᵀJ
        accumulated over the data, whatever n, when the p x p array takes at most
        2 GiB (``Policy.factor_bytes``: p ≤ 23,170 in float32) and its assembly at
        most 3e13 multiply-adds (``Policy.factor_max_cost``, n·k·p²/2: n = 100k at
        p = 21,825 is 2.4e13, minutes on two cores).
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
        with the dense solver (see ``solver``) and with CG up to size 8192 (from a
        dense factor), "low_rank" above. ``return_cov`` is always exact.
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
    normalize_y : bool, default=False
        Standardize each output of y (its mean and std over the training samples,
        weighted by ``sample_weight`` as repeated samples) before fitting, as
        GaussianProcessRegressor's ``normalize_y``, in float64 whatever the
        ``dtype`` (a small signal on a large offset keeps its digits in float32);
        with ``prior_mean="network"`` the network's outputs are standardized
        alike, so the model is unchanged up to the units of noise and prior. Predictive
        means, stds, covariances and samples come back in y's units; ``noise``,
        ``noise_``, ``prior_`` and the log marginal likelihood are those of the
        standardized y. This is the way to a std in y's units for targets of any
        scale: ``TransformedTargetRegressor`` cannot pass ``return_std`` back
        (its ``predict`` expects one array).
    verbose : int, default=0
        Progress through the ``logging`` module, logger ``"sklearn_fntk"``: every
        stage of fit and predict (validation, linearization, the evidence and its
        search, preconditioner or dense factor, the solve with its iterations and
        final residual, the variance factor, the predictive mean and variances) is
        logged at INFO with its wall time and details; loop steps (CG and Lanczos
        iterations) at DEBUG. 0 changes no logging configuration (records show
        where the user lets INFO through, e.g.
        ``logging.basicConfig(level=logging.INFO)``); 1 shows the INFO lines (on
        stderr where no handler is configured) and, with tqdm installed (the
        ``progress`` extra), bars for stages with a known step count (CG with
        ``max_iter`` as its bound, Lanczos steps, prediction chunks); 2 also the
        DEBUG lines. See the user guide, "Progress and logging".
    distributed : bool, default=False
        Fit data-parallel: every process of the initialised default
        torch.distributed process group (gloo on CPUs, NCCL on GPUs; launched by
        torchrun, for example) calls ``fit`` on its own shard of the data, with the
        same network, parameters and an int ``random_state``; each Jacobian product
        is all-reduced over the processes, and every process ends with the same
        fitted state. The fit solves in parameter space; predictions are local, and
        the estimator pickles and loads in any process. See the user guide,
        "Data-parallel fits", for what needs the other shards after the fit.

    Attributes
    ----------
    network_ : torch.nn.Module
        The private eval-mode copy of the network.
    delta_ : torch.Tensor of shape (``n_params_``,)
        Posterior mean of w - θ; the predictive mean is f_θ(x) + J(x)·``delta_``
        (without the f_θ term for ``prior_mean="zero"``).
    n_features_in_ : int
        Number of features seen during fit (the size of a sample's first axis for
        n-D inputs).
    feature_names_in_ : ndarray of shape (``n_features_in_``,)
        Names of the features seen during fit; defined only when X has feature
        names that are all strings (a pandas DataFrame).
    input_shape_ : tuple
        Per-sample shape of X seen in fit.
    n_outputs_ : int
        Number of outputs k of the network (1 for a 1-D y).
    n_params_ : int
        Number of linearized parameters p (those named by ``parameters``).
    space_, solver_ : str
        The resolved solve space and solver.
    n_iter_ : int
        CG iterations of the fit (1 for the dense solver: one direct solve).
    noise_, prior_ : float
        The noise and prior variances used: ``noise`` and ``prior`` where they are
        numbers, their evidence-maximising values where they are "auto" (as
        GaussianProcessRegressor's ``kernel_`` is to ``kernel``).
    predictive_dof_ : float
        Degrees of freedom ν of the predictive distribution. With ``noise`` and
        ``prior`` both "auto", the noise variance is integrated out under its
        inverse-gamma hyperprior (s = λσ², λ = ``prior_ / noise_`` by the evidence,
        a normal-inverse-gamma model): the predictive of a latent or a new
        observation is a Student-t with ν = 2 + n·k (n samples, k outputs), centred
        on the predictive mean, whose scale is the Gaussian plug-in std at
        ``noise_`` and ``prior_``; stds, covariances and ``sample_y`` are those of
        the Student-t (variances ν/(ν - 2) times the plug-in's: 1.4 at n·k = 5,
        1.05 at 40). Otherwise ∞: the Gaussian at ``noise_`` and ``prior_``. See
        the user guide, "Choosing hyperparameters".
    log_marginal_likelihood_value_ : float or None
        The log evidence at ``noise_`` and ``prior_`` found by the "auto" search
        (exact, or the Lanczos estimate: see ``prior``); None when both
        were given as numbers.
    kernel_ : {"layerwise", "autodiff"}
        "layerwise" when the network is Linear layers and elementwise activations
        (and, in parameter space, ``fisher_product="exact"`` or the dense solver):
        kernel products, Jacobian products and blocks, diagonals and columns then
        come from per-layer features (a few matmuls per layer), not autodiff.
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

    See Also
    --------
    FiniteNTKClassifier : The same linearization for classification.
    sklearn.gaussian_process.GaussianProcessRegressor : GP regression with a
        chosen kernel.
    sklearn_fntk.metrics.log_predictive_density_scorer : A scorer for choosing
        ``noise`` and ``prior`` by cross-validation.

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
        "normalize_y": ["boolean"],
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
        normalize_y=False,
        verbose=0,
        distributed=False,
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
        self.normalize_y = normalize_y
        self.verbose = verbose
        self.distributed = distributed

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

    @_fit_context(prefer_skip_nested_validation=True)
    @full_float32_precision
    def fit(self, X, y, sample_weight=None):
        """Condition the linearized-network GP on (X, y).

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Inputs in the shape the network takes (2-D features or n-D images).
            Integer X goes to a network that takes no floats (an Embedding first)
            as int64 indices, and to others as floats.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            Targets, one column per output of the network.
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
            The fitted estimator.
        """
        return self._fit_in_stages(X, y, sample_weight)

    def _fit_shard(self, X, y, sample_weight, reduction, stages):
        """:meth:`fit` on the data, or on this process's shard of them, its stages
        reported to ``stages``."""
        with stages("validation and network copy"):
            X, y, sample_weight, state = self._validate_fit_data(
                X, y, sample_weight, multi_output=True, y_numeric=True
            )
            network, choices = self._network_and_choices(X, y, reduction)
            X = network.inputs(X)  # one copy, shared by kernel and products
        Y = y.reshape(y.shape[0], -1)
        n_outputs = Y.shape[1]
        theta = network.theta
        # Noise variances σ²/w_i: the GP on the rows of J and r scaled by √w_i has
        # noise σ² I, so everything below works on that scaled system. Its log
        # evidence is that of the weighted model less ½ Σ log w (one term per row).
        row_scale, log_weight = None, 0.0
        if sample_weight is not None:
            row_scale = torch.sqrt(_to_tensor(sample_weight, theta))
            log_weight = 0.5 * n_outputs * reduction.sum_float(np.log(sample_weight).sum())
        structured = self._structured_kernel(network, X, choices, row_scale, stages)
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
        # JᵀJ assembled from explicit Jacobian blocks (the dense parameter space)
        blocks = choices.solver == "dense" and choices.space == "parameter"
        with stages("linearization", samples=X.shape[0], parameters=network.n_params):
            jacobian = self._training_jacobian(
                network,
                X,
                cache=iterative,
                row_scale=row_scale,
                reduction=reduction,
                # parameter space: products and blocks from per-layer features
                layerwise=(iterative or blocks) and self._layerwise(network),
            )
        # r = y - m(X), with m(X) = f_θ(X) or 0, scaled like J's rows; with
        # normalize_y, y and f_θ(X) in standardized units. Formed in float64 and
        # rounded to the dtype once: standardized first, a small signal on a large
        # offset keeps its digits in float32.
        targets = torch.tensor(Y, dtype=torch.float64, device=theta.device)  # a copy
        y_mean, y_scale = self._target_scaling(targets, sample_weight, reduction)
        targets = (targets - y_mean) / y_scale
        outputs = (jacobian.outputs.to(torch.float64) - y_mean) / y_scale
        residuals = targets - outputs if self.prior_mean == "network" else targets
        residuals = scale_rows(self._targets(residuals, theta, Y), row_scale)
        noise, prior, gram, evidence, lml_value = self.noise, self.prior, None, None, None
        dof = math.inf
        if "auto" in (noise, prior):
            gram, evidence, best = self._fit_hyperparameters(
                jacobian, residuals, structured, choices, stages
            )
            noise, prior, dof = best.noise, best.prior, best.degrees_of_freedom
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
        posterior.fit(gram=gram, generator=self._generator(self.device), stages=stages)
        scale = reduction.sum_float(scale_rows(targets, row_scale).square().sum()) ** 0.5
        check_regression_solve(self, posterior, scale)
        check_low_rank_variance(choices.variance, posterior)
        check_output_noise(self, posterior, jacobian, residuals, reduction)
        check_output_rounding(self, posterior, jacobian.outputs, y_scale, reduction)
        detach(reduction, jacobian)
        self._commit(
            {
                **state,
                "_y_ndim": y.ndim,
                "_y_mean": y_mean,
                "_y_scale": y_scale,
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
                "predictive_dof_": dof,
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

    def _network_and_choices(self, X, y, reduction):
        """The private network for (X, y) and the resolved choices of this fit (the
        shapes and the network checked to agree over the shards)."""
        if y.dtype.kind not in "biuf":
            raise ValueError(
                f"y has dtype {y.dtype}: {type(self).__name__} needs numeric targets. "
                "Convert them, for example with y.astype(float)."
            )
        n_outputs = 1 if y.ndim == 1 else y.shape[1]
        if reduction.distributed:
            shape = (X.shape[1:], y.ndim, n_outputs)
            check_same(reduction, shape, "the shape of X's samples, y's ndim and outputs")
        network = self._make_network(X, n_outputs)
        check_same_parameters(reduction, network.theta)
        choices = self._resolve(
            int(reduction.sum_float(X.shape[0])) * n_outputs,
            network.n_params,
            self._layerwise(network),
            variance=self.variance,
        )
        return network, choices

    def _target_scaling(self, targets, sample_weight, reduction):
        """(mean, std) of each column of ``targets`` (n, k) over all shards, weighted
        by ``sample_weight`` ((n,) or None: all 1) as repeated samples would be, with
        ``normalize_y`` (a std of 0 counts as 1), else (0, 1): y in model units is
        (y - mean)/std."""
        if not self.normalize_y:
            return torch.zeros_like(targets[0]), torch.ones_like(targets[0])
        weights = torch.ones_like(targets[:, 0])
        if sample_weight is not None:
            weights = _to_tensor(sample_weight, targets)
        total = reduction.sum_float(weights.sum())
        mean = reduction.sum(weights @ targets) / total
        std = torch.sqrt(reduction.sum(weights @ (targets - mean) ** 2) / total)
        return mean, torch.where(std > 0, std, torch.ones_like(std))

    def _mean(self, X, stages=NO_STAGES):
        """Predictive mean in y's units, shape (m, k)."""
        return self._latent_mean(X, stages, loc=self._y_mean, scale=self._y_scale)

    def _variance(self, X, include_noise, stages=NO_STAGES):
        """Predictive variances in y's units, shape (m, k): of f, or of a new
        observation with ``include_noise``."""
        variance = self._latent_variance(X, stages)
        if include_noise:
            variance = variance + self.noise_
        return variance * self._variance_scale()

    def _variance_scale(self):
        """Plug-in (co)variances in model units -> predictive ones in y's units: the
        Student-t's ν/(ν - 2) (1 for a Gaussian predictive) times y's scale²."""
        return student_t_variance_factor(self.predictive_dof_) * self._y_scale**2

    def _shape_outputs(self, array):
        """(m, k) -> (m,) when fitted on a 1-D y."""
        return array[:, 0] if self._y_ndim == 1 else array

    def _latent_variance(self, X, stages=NO_STAGES):
        """Predictive variances of the latent outputs in model units, shape (m, k);
        the chunks are steps of the stage "variances" of ``stages``."""
        parts = []
        with stages("variances", total=self._n_chunks(X)) as stage:
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
                stage.step()
        return torch.cat(parts).clamp_min(0.0)

    @full_float32_precision
    def predict(self, X, return_std=False, return_cov=False, include_noise=False):
        """Predictive mean, and optionally std or covariance.

        As in scikit-learn's GaussianProcessRegressor, std and cov are of the noise-free
        latent f by default; ``include_noise=True`` makes them those of a new
        observation y (this argument passes through a Pipeline's ``predict``). They
        are those of the Student-t predictive where ``predictive_dof_`` is finite.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Test inputs, in the per-sample shape seen in fit.
        return_std : bool, default=False
            Also return the predictive standard deviation.
        return_cov : bool, default=False
            The covariance between test points, per output (cross-output terms are
            not returned). Needs the test Jacobian of all points at once; raises
            MemoryError, before allocating, when it does not fit.
        include_noise : bool, default=False
            Add the noise variance ``noise_`` to the variances.

        Returns
        -------
        y_mean : ndarray of shape (n_samples,) or (n_samples, n_outputs)
            Predictive mean.
        y_std : ndarray of shape (n_samples,) or (n_samples, n_outputs), optional
            Predictive standard deviation, with ``return_std=True``.
        y_cov : ndarray, optional
            Predictive covariance, with ``return_cov=True``. Shape
            (n_samples, n_samples), or (n_samples, n_samples, n_outputs) for a
            multi-output fit.
        """
        if return_std and return_cov:
            raise RuntimeError("At most one of return_std or return_cov can be requested.")
        check_is_fitted(self)
        with self._stages("predict") as stages:
            return self._predict(X, return_std, return_cov, include_noise, stages)

    def _predict(self, X, return_std, return_cov, include_noise, stages):
        """:meth:`predict`, its stages reported to ``stages``."""
        X = self._validate_predict_X(X)
        mean = self._shape_outputs(self._numpy(self._mean(X, stages)))
        if return_std:
            std = torch.sqrt(self._variance(X, include_noise, stages))
            return mean, self._shape_outputs(self._numpy(std))
        if return_cov:
            m, k = X.shape[0], self.n_outputs_
            # the per-output blocks, and their float64 copy where the dtype differs
            after = [("the per-output blocks", (m, m, k), torch.float64)]
            with stages("covariance", test_rows=m * k):
                cov = self._latent_covariance(X, "return_cov", after)
            if include_noise:
                cov.diagonal().add_(self.noise_)
            # per-output blocks cov[i, a, j, a] -> (m, m, k), in y's units
            per_output = torch.einsum("iaja->ija", cov.reshape(m, k, m, k))
            per_output = self._numpy(per_output * self._variance_scale())
            return mean, per_output[:, :, 0] if self._y_ndim == 1 else per_output
        return mean

    @full_float32_precision
    def predict_std(self, X, include_noise=False):
        """Predictive standard deviation.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Test inputs, in the per-sample shape seen in fit.
        include_noise : bool, default=False
            Add the noise variance: the std of a new observation y, not of f.

        Returns
        -------
        std : ndarray of shape (n_samples,) or (n_samples, n_outputs)
            Predictive standard deviation.
        """
        check_is_fitted(self)
        with self._stages("predict_std") as stages:
            variance = self._variance(self._validate_predict_X(X), include_noise, stages)
        return self._shape_outputs(self._numpy(torch.sqrt(variance)))
