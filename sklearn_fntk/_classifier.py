"""FiniteNTKClassifier: Laplace GP classification with the finite NTK of a trained network.

The posterior (Newton's method for the MAP, the Laplace covariance) is
``_inference.laplace.LaplacePosterior``, its evidence (``prior="auto"``)
``_inference.laplace_evidence``; this module holds what is specific to the
estimator: labels, links and the scikit-learn API. Links turn the Gaussian over each
test point's logits, mean μ* and covariance Σ* (k x k), into class scores whose
softmax is the predictive distribution (``_inference.links``).
"""

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import ClassifierMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted

from ._base import FiniteNTKBase, _to_tensor
from ._diagnostics import actions, warn
from ._inference.links import link_scores, probit_error_bound, probit_scores
from ._laplace_fit import LaplaceFitMixin
from ._precision import full_float32_precision
from ._sharding import (
    check_same,
    check_same_parameters,
    class_union,
    detach,
)

__all__ = ["FiniteNTKClassifier"]


class FiniteNTKClassifier(ClassifierMixin, LaplaceFitMixin, FiniteNTKBase):
    """Laplace GP classification with the finite-width NTK of a trained network.

    The network's logits are linearized around its trained weights θ,
    f(x; w) = f_θ(x) + J(x)(w - θ), with the prior w ~ N(θ, prior·I) and a softmax
    likelihood (sigmoid for a single logit). The negative log posterior is then
    convex in w; its minimum (MAP) is found by Newton's method with exact
    Fisher-vector products and a backtracking line search, and the Laplace
    approximation around it gives each test point a Gaussian over its logits, which
    ``link`` turns into class probabilities.

    Parameters
    ----------
    network : torch.nn.Module or None, default=None
        The trained network; it maps a batch (n, ...) to logits (n, C), one per class
        in ``classes_`` order, or, for two classes, to one logit (n,) or (n, 1) of
        ``classes_[1]``. It is deep-copied and used in eval mode; the module passed
        in is never changed. None builds a randomly initialised tanh MLP (64, 64) at
        fit time, with one logit for two classes and C logits otherwise.
    prior : float, "auto" or "loo", default="auto"
        Prior variance s of the weights around θ: the kernel is s·J(x)J(x')ᵀ. "auto"
        maximises the Laplace approximation of the log marginal likelihood (the
        evidence) over s, refitting the MAP at each candidate: with the dense solver
        by the root of its exact derivative in log s, with CG by its values, the
        log-determinant estimated by stochastic Lanczos quadrature with the same
        probes at every s, its steps grown until its Gauss and Gauss-Radau bounds
        agree within a nat (see the user guide). "loo" maximises instead the Laplace
        approximation of the leave-one-out log predictive of the posterior mode's
        probabilities (each training point's cavity, the posterior with its
        likelihood removed), by its values; dense solver only. The evidence scores
        predictions made from few points as well as from many, and picks smaller
        priors; "loo" scores predictions from all the other points, and picked priors
        3 to 180 times larger on shifted digits (user guide, "Calibration"). The
        result is ``prior_``. A number fixes s (as GridSearchCV needs).
    prior_mean : {"network", "zero"}, default="network"
        Prior mean of the logits: the trained network's f_θ(x), or zero.
    parameters : list of str or None, default=None
        Names (as in ``network.named_parameters()``) of the parameters to linearize;
        the others stay fixed. None: every parameter with ``requires_grad=True``.
    link : {"map", "probit", "mc"}, default="map"
        How the Gaussian over the logits μ*, Σ* becomes probabilities: softmax(μ*),
        the posterior mode's probabilities; the probit approximation
        softmax(μ*/√(1 + π/8·diag Σ*)); or Monte Carlo, the mean softmax over
        ``n_samples`` draws from N(μ*, Σ*). "map" is the default because it is the
        calibrated one where we measured: the Laplace posterior of the linearized
        network is wide (its curvature vanishes at confidently fitted training
        points), and its exact predictive (``"mc"``), like ``"probit"``, is
        under-confident (user guide, "Calibration"). Σ* itself is returned by
        :meth:`predict_latent` with any link. After a dense fit, "probit" takes
        diag Σ* from a low-rank covariance built at its first prediction, its
        probabilities within 1e-3 of the exact formula's (user guide, "The link").
    n_samples : int, default=1000
        Draws per test point for ``link="mc"``. The same standard normal draws are
        used for every test point of a call, so each point's prediction depends only
        on that point.
    solver : {"auto", "dense", "cg"}, default="auto"
        Cholesky of the assembled system, or conjugate gradient with matrix-free
        Fisher-vector products. "auto" picks dense for systems up to 4096.
    space : {"auto", "function", "parameter"}, default="auto"
        Solve with H = JᵀΛJ + I/prior (size p) or, via Woodbury, with
        B = I + Λ^½ (prior·JJᵀ) Λ^½ (size n·k). "auto" picks the smaller.
    preconditioner : {"auto", "jacobi", "nystrom"} or None, default="auto"
        CG preconditioner, rebuilt at every Newton iteration: "jacobi" takes the exact
        diagonal from explicit Jacobian blocks; "nystrom" an adaptive randomized
        Nyström approximation (Frangella, Tropp & Udell 2021) of Jᵀ Λ J (sketched
        from max(4·512/k, 1024) random samples, rescaled, as in regression), or of
        Λ^½ K Λ^½ in function space. "auto" means "nystrom".
    tol : float, default=1e-6
        Newton stops when the gradient norm falls to tol times its initial value;
        predictive covariances by CG are accurate to tol (relative).
    max_iter : int or None, default=None
        CG iteration limit per linear solve (each Newton step, each covariance
        batch); None means 10 times the system size. As in the regressor.
    max_newton_iter : int, default=100
        Newton iteration limit.
    batch_size : int, default=256
        Samples per chunk in every Jacobian product and explicit Jacobian block.
    dtype : {"float64", "float32"}, default="float64"
        Precision of all torch computation (the network copy is cast to it).
    device : str or torch.device, default="cpu"
        Where the network copy, the data and all computation live. A fitted
        estimator pickles with its tensors on the CPU and loads back on this device,
        or on the CPU with a ``DeviceFallbackWarning`` where the machine lacks it
        (see the user guide, "Saving and loading").
    random_state : int, RandomState instance or None, default=None
        Seeds the default network's initialisation and the draws of ``link="mc"``.
    verbose : int, default=0
        Progress through the ``logging`` module, logger ``"sklearn_fntk"``: every
        stage of fit and predict (linearization, Newton's method at each prior
        tried, the prior search) is logged at INFO with its wall time and details,
        steps at DEBUG. 0 changes no logging configuration (records show where the
        user lets INFO through, e.g. ``logging.basicConfig(level=logging.INFO)``);
        1 shows the INFO lines (on stderr where no handler is configured) and,
        with tqdm installed (the ``progress`` extra), a bar for Newton's method;
        2 also the DEBUG lines. See the user guide, "Progress and logging".
    distributed : bool, default=False
        Fit data-parallel: every process of the initialised default
        torch.distributed process group calls ``fit`` on its own shard of the data,
        with the same network, parameters and an int ``random_state``; ``classes_``
        is the union of the shards' labels, each Jacobian product is all-reduced,
        and every process ends with the same fitted state (the Laplace evidence
        included, computed during the fit). The fit solves in parameter space;
        predictions are local (after a CG fit, ``link="map"`` only: the
        covariances need the other shards). See the user guide, "Data-parallel
        fits".

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Sorted class labels; logit j is ``classes_[j]`` (one logit: ``classes_[1]``).
    network_ : torch.nn.Module
        The private eval-mode copy of the network.
    prior_ : float
        The prior variance used: ``prior``, or the maximiser of the evidence
        ("auto") or of the leave-one-out predictive ("loo").
    delta_ : torch.Tensor of shape (``n_params_``,)
        MAP of w - θ; the predictive logit mean is f_θ(x) + J(x)·``delta_`` (without
        the f_θ term for ``prior_mean="zero"``).
    n_features_in_ : int
        Number of features seen during fit (the size of a sample's first axis for
        n-D inputs).
    feature_names_in_ : ndarray of shape (``n_features_in_``,)
        Names of the features seen during fit; defined only when X has feature
        names that are all strings (a pandas DataFrame).
    input_shape_ : tuple
        Per-sample shape of X seen in fit.
    n_logits_ : int
        Logits per sample: n_classes, or 1 for a binary network with one logit.
    n_params_ : int
        Number of linearized parameters p (those named by ``parameters``).
    space_, solver_ : str
        The resolved solve space and solver.
    preconditioner_ : str or None
        The resolved CG preconditioner (None for the dense solver).
    n_iter_ : int
        CG iterations of the fit at ``prior_``, summed over its Newton steps (1 per
        step for the dense solver: one direct solve), as ``max_iter`` counts them.
    n_newton_iter_ : int
        Newton iterations of the fit at ``prior_``.
    n_evidence_evaluations_ : int
        Priors tried by ``prior="auto"`` or ``"loo"`` (1 for a fixed prior).
    forward_mode_ : bool
        False when the network lacks forward-mode rules and J·v uses a double VJP.

    See Also
    --------
    FiniteNTKRegressor : The same linearization for regression.
    sklearn.gaussian_process.GaussianProcessClassifier : Laplace GP classification
        with a chosen kernel.
    sklearn.linear_model.LogisticRegression : What the classifier is for a network's
        last layer alone (``parameters`` naming it).

    Notes
    -----
    A fitted estimator is thread-safe: concurrent predictions equal serial ones bit
    for bit (its network's passes run one at a time under a process-wide lock). A
    fit that fails, KeyboardInterrupt included, leaves the previous fitted state;
    X, y and ``sample_weight`` are never written to. See the user guide,
    "Reliability".

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from sklearn_fntk import FiniteNTKClassifier
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = FiniteNTKClassifier(random_state=0).fit(X, y)
    >>> proba = clf.predict_proba(X[:3])
    """

    _parameter_constraints = {
        **FiniteNTKBase._COMMON_CONSTRAINTS,
        "prior": [
            Interval(Real, 0, None, closed="neither"),
            StrOptions({"auto", "loo"}),
        ],
        "preconditioner": [StrOptions({"auto", "jacobi", "nystrom"}), None],
        "link": [StrOptions({"map", "probit", "mc"})],
        "n_samples": [Interval(Integral, 1, None, closed="left")],
        "max_newton_iter": [Interval(Integral, 1, None, closed="left")],
    }
    _conditioning_advice = "lower prior"

    def __init__(
        self,
        network=None,
        *,
        prior="auto",
        prior_mean="network",
        parameters=None,
        link="map",
        n_samples=1000,
        solver="auto",
        space="auto",
        preconditioner="auto",
        tol=1e-6,
        max_iter=None,
        max_newton_iter=100,
        batch_size=256,
        dtype="float64",
        device="cpu",
        random_state=None,
        verbose=0,
        distributed=False,
    ):
        self.network = network
        self.prior = prior
        self.prior_mean = prior_mean
        self.parameters = parameters
        self.link = link
        self.n_samples = n_samples
        self.solver = solver
        self.space = space
        self.preconditioner = preconditioner
        self.tol = tol
        self.max_iter = max_iter
        self.max_newton_iter = max_newton_iter
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.distributed = distributed

    @_fit_context(prefer_skip_nested_validation=True)
    @full_float32_precision
    def fit(self, X, y, sample_weight=None):
        """Find the MAP and Laplace posterior of the linearized network on (X, y).

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Inputs in the shape the network takes (2-D features or n-D images).
            Integer X goes to a network that takes no floats (an Embedding first)
            as int64 indices, and to others as floats.
        y : array-like of shape (n_samples,)
            Class labels, any sortable values.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative per-sample weights multiplying each sample's log-likelihood
            (and so its gradient and Laplace curvature), as in LogisticRegression. An
            integer weight is the same as repeating the sample that many times and a
            zero weight as leaving it out (``classes_`` are those of the samples
            kept). None: all weights 1.

        Returns
        -------
        self : FiniteNTKClassifier
            The fitted estimator.
        """
        return self._fit_in_stages(X, y, sample_weight)

    def _fit_shard(self, X, y, sample_weight, reduction, stages):
        """:meth:`fit` on the data, or on this process's shard of them, its stages
        reported to ``stages``."""
        with stages("validation and network copy"):
            X, y, sample_weight, state = self._validate_fit_data(X, y, sample_weight)
            classes, labels, network = self._labels_and_network(X, y, reduction)
        n_classes = len(classes)
        theta = network.theta
        check_same_parameters(reduction, theta)
        with stages("linearization", samples=X.shape[0], parameters=network.n_params):
            jacobian = self._training_jacobian(
                network, network.inputs(X), cache=True, reduction=reduction
            )
        n_logits = jacobian.n_outputs
        if self.network is not None:
            self._check_logits(jacobian.outputs, network.module)
        n_rows = int(reduction.sum_float(X.shape[0])) * n_logits
        choices = self._resolve(n_rows, network.n_params, False, variance=None)
        offsets = jacobian.outputs
        if self.prior_mean == "zero":
            offsets = torch.zeros_like(offsets)
        arguments = dict(
            jacobian=jacobian,
            offsets=offsets,
            labels=torch.as_tensor(labels, device=offsets.device),
            weights=None if sample_weight is None else _to_tensor(sample_weight, theta),
            n_classes=n_classes,
            choices=choices,
        )
        posterior, evidence, evaluations = self._fit_posterior(arguments, stages)
        if not bool(torch.isfinite(posterior.delta).all()):
            raise FloatingPointError(
                f"{type(self).__name__}: Newton's method returned NaN or infinite "
                "values, although the network's outputs and Jacobian on X are finite: "
                "the Laplace system is too ill-conditioned "
                f"(prior={posterior.prior:g}) for {self.dtype}. "
                + actions("use dtype='float64'" * (self.dtype != "float64"), "lower prior")
            )
        self._warn_newton(posterior)
        if reduction.distributed and evidence is None:  # while the shards are here
            evidence = self._laplace_evidence(posterior)
        detach(reduction, jacobian)
        self._commit(
            {
                **state,
                "classes_": classes,
                "_network": network,
                "forward_mode_": jacobian.forward_mode,
                "n_logits_": n_logits,
                "space_": choices.space,
                "solver_": choices.solver,
                "preconditioner_": choices.preconditioner,
                "_posterior": posterior,
                "delta_": posterior.delta,
                "n_iter_": posterior.cg_iterations,
                "n_newton_iter_": posterior.n_iter,
                "prior_": posterior.prior,
                "_evidence": evidence,
                "n_evidence_evaluations_": evaluations,
            }
        )
        return self

    def _labels_and_network(self, X, y, reduction):
        """``classes_`` (over all shards), the labels as class indices, and the
        private network."""
        check_classification_targets(y)
        if reduction.distributed:
            check_same(reduction, X.shape[1:], "the shape of X's samples")
        classes = class_union(reduction, np.unique(y))
        labels = np.searchsorted(classes, y)
        n_classes = len(classes)
        if n_classes < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes in y; got "
                f"1 class: {classes.tolist()}."
            )

        def check_count(n_network):
            self._check_logit_count(n_network, n_classes)

        network = self._make_network(X, 1 if n_classes == 2 else n_classes, check_count)
        return classes, labels, network

    def _check_logits(self, outputs, module):
        """Warn where the network's outputs on X look like probabilities, not
        logits: a final Softmax (every row in [0, 1], summing to 1) or, for one
        output, a last module that is a Sigmoid (a range alone says too little
        there). The linearized model's softmax then starts from near-uniform
        probabilities, and the Jacobian is that of the probabilities, flat where
        they saturate: the digits example's network with a Softmax appended gave
        accuracy 0.57 and NLL 1.36, against 0.93 and 0.23 without."""
        n_logits = outputs.shape[1]
        inside = bool(((outputs >= 0) & (outputs <= 1)).all())
        if n_logits > 1:
            row_sums = outputs.sum(1)
            tolerance = 1e3 * torch.finfo(outputs.dtype).eps * n_logits
            if not (inside and bool(((row_sums - 1).abs() <= tolerance).all())):
                return
            layer = "Softmax"
        elif inside and isinstance(list(module.modules())[-1], torch.nn.Sigmoid):
            layer = "Sigmoid"
        else:
            return
        warn(
            f"{type(self).__name__}: the network's outputs on X all lie in [0, 1]"
            + (", each row summing to 1" if n_logits > 1 else "")
            + f": it seems to return probabilities (a final {layer}), where "
            "logits are needed (the classifier applies the "
            + ("softmax" if n_logits > 1 else "sigmoid")
            + f" itself). Remove the final {layer} layer"
            + (", or end the network with LogSoftmax instead." if n_logits > 1 else ".")
        )

    def _warn_newton(self, posterior):
        """Warn where Newton's method or its CG solves stopped short."""
        gradient, initial = posterior.gradient_norm, posterior.initial_gradient_norm
        float64 = "use dtype='float64'" if self.dtype != "float64" else ""
        if posterior.drifted_solves:
            warn(
                f"{type(self).__name__}: the conjugate gradient solves of "
                f"{posterior.drifted_solves} of {posterior.n_iter} Newton steps met "
                f"their stopping rule by the CG recurrence but not by their true "
                f"residual (rounding in {self.dtype}). "
                + actions(float64, "lower prior", "loosen tol"),
                ConvergenceWarning,
            )
        elif posterior.unconverged_solves:
            warn(
                f"{type(self).__name__}: the conjugate gradient solves of "
                f"{posterior.unconverged_solves} of {posterior.n_iter} Newton steps "
                f"stopped at max_iter={self.max_iter} iterations. "
                + actions("increase max_iter", "lower prior", "use solver='dense'"),
                ConvergenceWarning,
            )
        if gradient <= self.tol * initial:
            return  # the search may run Newton's method past tol; tol is what counts
        if posterior.stalled:
            warn(
                f"Newton's method stopped at iteration {posterior.n_iter} with gradient "
                f"norm {gradient:.3g}, above tol={self.tol:g} times its initial "
                f"{initial:.3g}: the gradient is at its rounding floor in {self.dtype} "
                "(its steps no longer reduce it). "
                + actions(f"loosen tol={self.tol:g}", float64),
                ConvergenceWarning,
            )
        elif not posterior.converged:
            warn(
                f"Newton's method stopped after max_newton_iter={self.max_newton_iter} "
                f"iterations with gradient norm {gradient:.3g} above "
                f"tol={self.tol:g} times its initial {initial:.3g}. Increase "
                "max_newton_iter or loosen tol.",
                ConvergenceWarning,
            )

    def _check_logit_count(self, n_network, n_classes):
        """k must be C, or 1 for two classes."""
        if n_network == n_classes or (n_classes == 2 and n_network == 1):
            return
        expected = f"{n_classes} (one per class in classes_ order)"
        if n_classes == 2:
            expected += " or 1 (the logit of classes_[1])"
        raise ValueError(
            f"The network produces {n_network} logit(s) per sample, but y has "
            f"{n_classes} classes; expected {expected}."
        )

    # -- prediction -----------------------------------------------------------------------

    def _latent(self, X, covariance=True):
        """Yield each chunk's logit mean (b, k) and covariance (b, k, k), or None
        for the covariance when it is not asked for; X a validated tensor."""
        for start in range(0, X.shape[0], self.batch_size):
            chunk = X[start : start + self.batch_size]
            mean = self._latent_mean(chunk)
            if not covariance:
                yield mean, None
                continue
            cov, report = self._posterior.covariance(chunk)
            self._warn_unconverged(report, "predictive covariances")
            yield mean, cov

    def _scores(self, X):
        """The link's class scores, shape (m, C); their softmax is predict_proba."""
        check_is_fitted(self)
        X = self._validate_predict_X(X)
        draws = None
        if self.link == "mc":
            rng = check_random_state(self.random_state)
            draws = self._tensor(rng.standard_normal((self.n_samples, self.n_logits_)))
        parts = []
        low_rank = self.link == "probit" and self._posterior.low_rank() is not None
        with (
            self._stages("predict") as stages,
            stages(f"logits and {self.link} link", total=self._n_chunks(X)) as stage,
        ):
            if low_rank:
                chunks = self._low_rank_probit(X)
            else:
                covariance = self.link != "map"
                chunks = (
                    link_scores(self.link, mean, cov, len(self.classes_), draws)
                    for mean, cov in self._latent(X, covariance=covariance)
                )
            for scores in chunks:
                parts.append(scores)
                stage.step()
        return torch.cat(parts)

    def _low_rank_probit(self, X):
        """Yield each chunk's probit scores from the posterior's low-rank variances,
        within the policy's ``probit_error`` of the exact probit probabilities: a test
        point whose bound exceeds it gets its exact covariance."""
        n_classes = len(self.classes_)
        for start in range(0, X.shape[0], self.batch_size):
            chunk = X[start : start + self.batch_size]
            mean = self._latent_mean(chunk)
            variance, overestimate = self._posterior.variances(chunk)
            scores = probit_scores(mean, variance, n_classes)
            bound = probit_error_bound(mean, variance, overestimate, n_classes)
            exact = bound > self._posterior.policy.probit_error
            if exact.any():
                cov, report = self._posterior.covariance(chunk[exact])
                self._warn_unconverged(report, "predictive covariances")
                scores[exact] = link_scores("probit", mean[exact], cov, n_classes)
            yield scores

    @full_float32_precision
    def predict_latent(self, X):
        """Posterior mean and covariance of the logits at each test point.

        The Laplace posterior N(δ̂, H⁻¹) of the linearized network gives each test
        point x* Gaussian logits with mean μ* = m(x*) + J(x*)δ̂ and covariance
        Σ* = J(x*) H⁻¹ J(x*)ᵀ, whatever ``link`` is; the links turn them into
        probabilities. Covariances are exact with the dense solver, accurate to
        ``tol`` (relative) with CG.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Test inputs, in the per-sample shape seen in fit.

        Returns
        -------
        mean : ndarray of shape (n_samples, n_logits)
            The mean logits μ*, in ``classes_`` order (one logit: that of ``classes_[1]``).
        cov : ndarray of shape (n_samples, n_logits, n_logits)
            Their covariance Σ*, one block per test point (no covariances between
            test points).
        """
        check_is_fitted(self)
        X = self._validate_predict_X(X)
        means, covariances = zip(*self._latent(X), strict=True)
        return self._numpy(torch.cat(means)), self._numpy(torch.cat(covariances))

    @full_float32_precision
    def decision_function(self, X):
        """The link's scores: they rank classes as :meth:`predict_proba` does.

        map: logits μ*; probit: moderated logits μ*/√(1 + π/8·diag Σ*); mc:
        log-probabilities. With one logit the first class scores 0.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Test inputs, in the per-sample shape seen in fit.

        Returns
        -------
        scores : ndarray of shape (n_samples,) or (n_samples, n_classes)
            For two classes, the log-odds of ``classes_[1]`` under the link (the
            difference of the two scores).
        """
        scores = self._numpy(self._scores(X))
        return scores[:, 1] - scores[:, 0] if scores.shape[1] == 2 else scores

    @full_float32_precision
    def predict_proba(self, X):
        """Predictive class probabilities under ``link``.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Test inputs, in the per-sample shape seen in fit.

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
            Columns in ``classes_`` order.
        """
        return self._numpy(torch.softmax(self._scores(X), dim=-1))

    @full_float32_precision
    def predict_log_proba(self, X):
        """Logarithm of :meth:`predict_proba`, computed stably.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Test inputs, in the per-sample shape seen in fit.

        Returns
        -------
        log_proba : ndarray of shape (n_samples, n_classes)
            Columns in ``classes_`` order.
        """
        return self._numpy(torch.log_softmax(self._scores(X), dim=-1))

    @full_float32_precision
    def predict(self, X):
        """The most probable class under ``link``.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Test inputs, in the per-sample shape seen in fit.

        Returns
        -------
        y_pred : ndarray of shape (n_samples,)
            Values of ``classes_``.
        """
        scores = self._numpy(self._scores(X))
        return self.classes_[scores.argmax(axis=1)]
