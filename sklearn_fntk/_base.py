"""Estimator machinery shared by the regressor and the classifier.

Everything that touches scikit-learn conventions lives in the estimator layer (this
module, ``_regressor``, ``_classifier`` and the modules beside them): parameter
constraints, input validation, the private network copy, the numpy <-> torch
boundary, the fitted state, warnings. The
layers below (``_inference``, ``_linearize``, ``_linalg``) see torch tensors only and
report what happened instead of warning.
"""

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _check_sample_weight, validate_data

from ._diagnostics import check_finite, nonfinite_error, nonfinite_rows, warn_solve
from ._inference.policy import Policy, resolve_choices
from ._linalg.memory import available_bytes
from ._linalg.reduction import LOCAL
from ._linearize.jacobian import JacobianProducts, outputs_and_jvp
from ._linearize.layerwise import LayerwiseKernel, supports_structured
from ._linearize.network import (
    FunctionalNetwork,
    NetworkOutputError,
    default_mlp,
    tensor_copy,
)
from ._persistence import DevicePersistence, unavailable_device
from ._progress import stages_for
from ._sharding import fit_reduction
from ._stages import NO_STAGES

# Memory allowed for cached per-chunk linearizations of the training data.
LINEARIZATION_CACHE_BYTES = 1 << 30

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# X keeps these dtypes through validation (integers for networks that take indices,
# see FunctionalNetwork.adopt_inputs); others become float64.
_INPUT_DTYPES = [np.float64, np.float32, np.int64, np.int32, np.int16, np.int8, np.uint8]


def _as_array(values):
    """A torch tensor (on any device, requiring grad or not) as a numpy array; other
    values as they are, for scikit-learn's validation."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return values


def _to_tensor(array, like):
    """A copy of ``array`` with the dtype and device of the tensor ``like``."""
    return tensor_copy(array, like.dtype, like.device)


def _input_hint(module):
    """What the first weighted layer of ``module`` expects, for error messages."""
    for layer in module.modules():
        if hasattr(layer, "in_features"):
            return f" (its first layer expects {layer.in_features} input features)"
        if hasattr(layer, "in_channels"):
            return f" (its first layer expects {layer.in_channels} input channels)"
    return ""


class FiniteNTKBase(DevicePersistence, BaseEstimator):
    """Parameters, validation and Jacobian plumbing common to both estimators.

    Each estimator declares its own ``_parameter_constraints``, from
    ``_COMMON_CONSTRAINTS`` (the parameters both have, meaning the same in both)
    and its own.

    A fit builds its state apart and commits it at the end (:meth:`_commit`): a
    fit that fails (an exception, KeyboardInterrupt included) leaves the previous
    fitted state as it was. Predictions read the fitted state only: the
    parameters they depend on are copied at fit (``_PREDICT_PARAMETERS``).
    """

    _COMMON_CONSTRAINTS = {
        "network": [torch.nn.Module, None],
        "prior": [Interval(Real, 0, None, closed="neither")],
        "prior_mean": [StrOptions({"network", "zero"})],
        "parameters": [list, tuple, None],
        "solver": [StrOptions({"auto", "dense", "cg"})],
        "space": [StrOptions({"auto", "function", "parameter"})],
        # tol >= 1 would stop CG before its first iteration (δ = 0)
        "tol": [Interval(Real, 0, 1, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left"), None],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "dtype": [StrOptions(set(_DTYPES))],
        "device": [str, torch.device],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "distributed": ["boolean"],
    }
    # Parameters of the fitted model that predictions read, copied at fit:
    # set_params after a fit changes nothing until the next fit. Options of how a
    # prediction is computed stay live: ``batch_size`` (the chunks; a smaller one
    # is the fix for a MemoryError at predict), ``random_state`` (draws at predict
    # time) and the classifier's ``link`` and ``n_samples``.
    _PREDICT_PARAMETERS = ("prior_mean", "tol", "dtype")
    # Sizes, ranks and thresholds of the automatic choices (tests may set an
    # instance's ``_policy`` to another Policy).
    _policy = Policy()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags

    def _validate_params(self):
        """scikit-learn's parameter validation, after a hint for a network given
        wrapped (a skorch net) rather than as its torch module."""
        _check_not_wrapped(self.network)
        super()._validate_params()

    # -- fitted state -------------------------------------------------------------------

    def _commit(self, state):
        """Replace the fitted state by ``state`` (a dict of attributes), at once.

        The new ``__dict__`` is built aside and swapped in by one assignment: a
        KeyboardInterrupt cannot leave half of it, and other threads see the old
        or the new state, never a mix. ``feature_names_in_`` goes when the new fit
        had no feature names.
        """
        stale = {"feature_names_in_"} - set(state)
        new = {key: value for key, value in self.__dict__.items() if key not in stale}
        new.update(state)
        new["_fitted_parameters"] = {
            name: getattr(self, name) for name in self._PREDICT_PARAMETERS
        }
        self.__dict__ = new

    def _fitted(self, name):
        """The value parameter ``name`` had at fit (see ``_PREDICT_PARAMETERS``)."""
        return self._fitted_parameters[name]

    # -- conversion -------------------------------------------------------------------

    @property
    def _torch_dtype(self):
        return _DTYPES[self.dtype]

    def _tensor(self, array):
        """A copy of ``array`` as a tensor of the fitted state's dtype and device."""
        return _to_tensor(array, self._network.theta)

    @staticmethod
    def _numpy(tensor):
        return np.asarray(tensor.detach().cpu().numpy(), dtype=np.float64)

    # -- validation -------------------------------------------------------------------

    def _validate_fit_data(self, X, y, sample_weight=None, **kwargs):
        """Validated (X, y, sample_weight, seen), without the samples of weight zero.

        sample_weight: None, or the positive weights of the samples kept. seen: the
        attributes validation records (``n_features_in_``, ``feature_names_in_``,
        ``input_shape_``), for :meth:`_commit`: the estimator itself keeps its
        previous ones until the fit succeeds.
        """
        names = ("n_features_in_", "feature_names_in_")
        previous = {key: self.__dict__[key] for key in names if key in self.__dict__}
        try:
            X, y = validate_data(
                self,
                _as_array(X),
                _as_array(y),
                allow_nd=True,
                dtype=_INPUT_DTYPES,
                **kwargs,
            )
            seen = {key: self.__dict__[key] for key in names if key in self.__dict__}
        finally:
            for key in names:
                self.__dict__.pop(key, None)
            self.__dict__.update(previous)
        seen["input_shape_"] = X.shape[1:]
        if sample_weight is None:
            return X, y, None, seen
        # rejects all-zero and negative weights and a wrong shape, with sklearn's
        # messages; a weight of zero is the same as leaving the sample out
        sample_weight = _check_sample_weight(
            _as_array(sample_weight), X, dtype=np.float64, ensure_non_negative=True
        )
        keep = sample_weight > 0
        return X[keep], y[keep], sample_weight[keep], seen

    def _targets(self, values, theta, y):
        """``values``, a float64 tensor formed from the targets ``y``, rounded to θ's
        dtype, checked to fit its range."""
        targets = values.to(theta.dtype)
        if not bool(torch.isfinite(targets).all()):
            raise ValueError(
                f"y has values up to {float(np.abs(y).max()):.3g}, beyond the range "
                f"of {self.dtype} (largest {torch.finfo(theta.dtype).max:.3g}). "
                "Rescale y (normalize_y=True, or TransformedTargetRegressor), or use "
                "dtype='float64'."
            )
        return targets

    def _validate_predict_X(self, X):
        """Validated X for prediction, as a tensor of the fitted dtype and device."""
        X = validate_data(
            self, _as_array(X), reset=False, allow_nd=True, dtype=_INPUT_DTYPES
        )
        if X.shape[1:] != self.input_shape_:
            raise ValueError(
                f"X has per-sample shape {X.shape[1:]}, but "
                f"{type(self).__name__} was fitted with per-sample shape "
                f"{self.input_shape_}."
            )
        return self._network.inputs(X)

    def _check_device(self):
        reason = unavailable_device(self.device)
        if reason is not None:
            raise ValueError(
                f"device={self.device!r} is not available on this machine ({reason}). "
                "Use device='cpu', or a device this machine has."
            )

    # -- the network ------------------------------------------------------------------

    def _seed(self):
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    def _make_network(self, X, n_outputs, check_count=None):
        """The private FunctionalNetwork for X, its outputs checked.

        Parameters
        ----------
        X : ndarray of shape (n, ...)
        n_outputs : int
            Outputs per sample the targets need (and the default network has).
        check_count : callable or None
            ``check_count(n_network)`` raises unless the network's output count
            suits the targets; None: it must be ``n_outputs``.

        Raises
        ------
        ValueError
            When the network cannot be applied to X, returns other than one output
            vector per sample ((n,) or (n, k)), the wrong output count, or outputs
            for a sample that depend on the other samples of the batch.
        TypeError
            When the network returns other than a tensor.
        """
        self._check_device()
        module = self.network
        if module is None:
            n_features = int(np.prod(X.shape[1:]))
            module = default_mlp(n_features, n_outputs, seed=self._seed())
            if X.ndim > 2:
                module = torch.nn.Sequential(torch.nn.Flatten(), module)
        network = FunctionalNetwork(
            module, self.parameters, dtype=self._torch_dtype, device=self.device
        )
        try:
            raw = network.adopt_inputs(X)
        except NetworkOutputError:
            raise
        except Exception as error:
            raise ValueError(
                f"The network cannot be applied to X with per-sample shape "
                f"{X.shape[1:]}{_input_hint(network.module)}: "
                f"{type(error).__name__}: {error}"
            ) from error
        sample = network.inputs(X[:2])
        b = sample.shape[0]
        if raw.ndim not in (1, 2) or raw.shape[0] != b:
            hint = ""
            if raw.ndim > 2 and raw.shape[0] == b and len(X.shape) > 2:
                hint = (
                    f" Was a network for vectors given X with per-sample shape "
                    f"{tuple(X.shape[1:])}? Flatten X to 2-D, or start the network "
                    "with nn.Flatten()."
                )
            raise ValueError(
                f"The network's output for a batch of {b} samples has shape "
                f"{tuple(raw.shape)}; expected one output vector per sample, ({b},) or "
                f"({b}, k).{hint}"
            )
        n_network = raw.reshape(b, -1).shape[1]
        if check_count is None:
            self._check_output_count(n_network, n_outputs)
        else:
            check_count(n_network)
        _check_batch_independence(network, sample)
        return network

    def _check_output_count(self, n_network, n_expected):
        """Raise ValueError unless the network's output count is the one expected."""
        if n_network != n_expected:
            raise ValueError(
                f"The network produces {n_network} output(s) per sample, but y has "
                f"{n_expected} output(s) per sample."
            )

    def _training_jacobian(
        self, network, X, cache, row_scale=None, reduction=LOCAL, layerwise=False
    ):
        """JacobianProducts over the training inputs X (a tensor) at θ, with the
        network's outputs and Jacobian checked to be finite.

        ``row_scale`` (a tensor (n,) or None) scales each sample's rows of J;
        ``reduction`` sums its products over the shards of a data-parallel fit.
        ``layerwise``: take the products from the layerwise kernel's per-layer
        features (where :meth:`_layerwise` holds) instead of autograd.
        """
        structured = None
        if layerwise:
            structured = LayerwiseKernel(
                network, X, batch_size=self.batch_size, row_scale=row_scale
            )
        jacobian = JacobianProducts(
            network,
            network.theta,
            X,
            batch_size=self.batch_size,
            cache_bytes=LINEARIZATION_CACHE_BYTES if cache else 0,
            row_scale=row_scale,
            reduction=reduction,
            structured=structured,
        )
        check_finite(
            jacobian.outputs,
            "The network's outputs on the training inputs X",
            "the network must be finite on every training sample (remove or fix "
            "those samples, or the network)",
        )
        # One VJP with a positive cotangent: any NaN or infinite entry of J shows.
        if not bool(torch.isfinite(jacobian.vjp(torch.ones_like(jacobian.outputs))).all()):
            rows = [
                c.start + row
                for c, J in jacobian.jacobian_blocks()
                for row in nonfinite_rows(J)
            ]
            raise nonfinite_error(
                rows,
                X.shape[0],
                "The network's Jacobian (its gradients with respect to the linearized "
                "parameters) on the training inputs X",
                "the linearization needs finite gradients (for example no sqrt or log "
                "at 0, no overflow in float32)",
            )
        return jacobian

    def _generator(self, device):
        """A torch Generator on ``device`` seeded from ``random_state``, for
        Nyström sketches and Lanczos probes."""
        generator = torch.Generator(device=device)
        generator.manual_seed(self._seed())
        return generator

    def _layerwise(self, network):
        """Whether the layerwise kernel applies to ``network`` (a FunctionalNetwork):
        Linear layers and elementwise activations whose linearized parameters are
        Linear weights and biases (see ``supports_structured``)."""
        return supports_structured(network.module, network.names)

    def _structured_kernel(self, network, X, choices, row_scale=None, stages=NO_STAGES):
        """The layerwise kernel of the training inputs X (a tensor) where it applies
        (in function space, see :meth:`_layerwise`); None elsewhere. ``row_scale`` as
        in :meth:`_training_jacobian`; its building is a stage of ``stages``."""
        if choices.space != "function" or not self._layerwise(network):
            return None
        with stages("layerwise kernel"):
            return LayerwiseKernel(
                network, X, batch_size=self.batch_size, row_scale=row_scale
            )

    def _warn_unconverged(self, report, stage, tol=None, dtype=None):
        """A ConvergenceWarning, naming what to change, when a CG solve (``report``,
        a CGResult, or None for none) fell short of its stopping rule. ``tol`` and
        ``dtype``: those it ran under (default: the fitted ones)."""
        warn_solve(
            type(self).__name__,
            report,
            stage,
            tol=self._fitted("tol") if tol is None else tol,
            dtype=self._fitted("dtype") if dtype is None else dtype,
            advice=self._conditioning_advice,
        )

    def _resolve(self, n_rows, n_params, layerwise, variance="exact"):
        """Every "auto" of this fit (see ``resolve_choices``), with the network's
        sizes: n·k rows (over all shards) and p parameters, and the memory this
        process can allocate (not for a data-parallel fit, whose processes must
        choose alike)."""
        available = None if self.distributed else available_bytes(self.device)
        return resolve_choices(
            space=self.space,
            solver=self.solver,
            preconditioner=self.preconditioner,
            variance=variance,
            n_rows=n_rows,
            n_params=n_params,
            layerwise=layerwise,
            policy=self._policy,
            itemsize=self._torch_dtype.itemsize,
            available=available,
            distributed=self.distributed,
        )

    def _fit_in_stages(self, X, y, sample_weight):
        """:meth:`fit`: ``_fit_shard`` on the data (or this process's shard of them,
        its sums reduced over the shards), inside the reduction's failure guard and
        the logged stage "fit"."""
        reduction = fit_reduction(self)
        with reduction.guard(), self._stages("fit") as stages:
            return self._fit_shard(X, y, sample_weight, reduction, stages)

    def _stages(self, method):
        """The stages of one call of ``method`` (a context manager yielding a
        ``Stages``), logged as ``verbose`` says (see ``_progress``)."""
        return stages_for(f"{type(self).__name__}.{method}", self.verbose)

    def _n_chunks(self, X):
        """Chunks of ``batch_size`` samples in X."""
        return -(-X.shape[0] // self.batch_size)

    def _latent_mean(self, X, stages=NO_STAGES, loc=0.0, scale=1.0):
        """Predictive mean m(x*) + scale·J* δ, shape (m, k), checked to be finite,
        where m(x*) is f_θ(x*), or ``loc`` for ``prior_mean="zero"``; ``loc`` and
        ``scale`` (numbers or tensors (k,)) map model units to y's. The chunks are
        steps of the stage "mean" of ``stages``."""
        network, theta = self._network, self._network.theta
        zero_mean = self._fitted("prior_mean") == "zero"
        parts = []
        with stages("mean", total=self._n_chunks(X)) as stage:
            for start in range(0, X.shape[0], self.batch_size):
                outputs, shift = outputs_and_jvp(
                    network, theta, X[start : start + self.batch_size], self.delta_,
                    self.forward_mode_,
                )  # fmt: skip
                check_finite(
                    outputs,
                    "The network's outputs on X",
                    "the network must be finite where it predicts",
                    offset=start,
                )
                check_finite(
                    shift,
                    "The linearized corrections J(x)·delta_ on X",
                    "the network's gradients are not finite there",
                    offset=start,
                )
                parts.append((loc if zero_mean else outputs) + scale * shift)
                stage.step()
        return torch.cat(parts)

    @property
    def network_(self):
        """The private eval-mode copy of the network (parameters at θ)."""
        return self._network.module

    @property
    def n_params_(self):
        """Number of linearized parameters p."""
        return self._network.n_params


def _is_skorch_net(obj):
    """Whether ``obj`` is a skorch NeuralNet, known without importing skorch."""
    return any(
        cls.__name__ == "NeuralNet" and cls.__module__.split(".")[0] == "skorch"
        for cls in type(obj).__mro__
    )


def _check_not_wrapped(network):
    """TypeError, naming ``net.module_``, for a network given wrapped: a skorch net,
    or another object that is no torch Module but holds one as ``module_``."""
    if isinstance(network, torch.nn.Module) or network is None:
        return
    if _is_skorch_net(network) or isinstance(
        getattr(network, "module_", None), torch.nn.Module
    ):
        kind = "skorch net" if _is_skorch_net(network) else "wrapper"
        raise TypeError(
            f"network is a {kind} ({type(network).__name__}), not a torch.nn.Module. "
            "Pass its trained module: network=net.module_ (it exists once the net "
            "is fitted or initialized)."
        )


def _check_batch_independence(network, sample):
    """Raise ValueError where the network's output for a sample depends on the other
    samples of its batch (in eval mode): the linearization is per sample.

    Compares f(X[:2]) with f(X[:1]) and f(X[1:2]), to √ε of the dtype (batched and
    single products differ by rounding only).
    """
    if sample.shape[0] < 2:
        return
    with torch.no_grad():
        together = network(network.theta, sample)
        apart = torch.cat([network(network.theta, sample[i : i + 1]) for i in range(2)])
    tolerance = torch.finfo(together.dtype).eps ** 0.5
    finite = together[torch.isfinite(together)]  # NaN and inf: the finite checks' job
    scale = max(float(finite.abs().max()), 1.0) if finite.numel() else 1.0
    close = torch.allclose(
        together, apart, rtol=tolerance, atol=tolerance * scale, equal_nan=True
    )
    if not close:
        difference = float((together - apart).abs().max())
        raise ValueError(
            "The network's output for a sample depends on the other samples of its "
            f"batch: in eval mode, two samples evaluated together and one at a time "
            f"differ by up to {difference:.3g}. The linearized model needs one output "
            "per sample that depends on that sample only (normalisation over the "
            "batch, such as BatchNorm, must use its running statistics; no "
            "operations across the batch axis)."
        )
