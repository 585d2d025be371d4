"""Estimator machinery shared by the regressor and the classifier.

Everything that touches scikit-learn conventions lives in the estimator layer (this
module, ``_regressor``, ``_classifier``, ``_progress``): parameter constraints, input
validation, the private network copy, the numpy <-> torch boundary, warnings. The
layers below (``_inference``, ``_linearize``, ``_linalg``) see torch tensors only and
report what happened instead of warning.
"""

import io
import warnings
from itertools import chain
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _check_sample_weight, validate_data

from ._inference.policy import Policy, resolve_choices
from ._linearize.jacobian import JacobianProducts, outputs_and_jvp
from ._linearize.layerwise import LayerwiseKernel, supports_structured
from ._linearize.network import FunctionalNetwork, default_mlp
from ._progress import CGProgress

# Memory allowed for cached per-chunk linearizations of the training data.
LINEARIZATION_CACHE_BYTES = 1 << 30

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class DeviceFallbackWarning(UserWarning):
    """An estimator was unpickled on a machine without the device it was fitted on.

    Its fitted state (or its ``network``) was loaded on the CPU instead, where it
    predicts; see the user guide, "Saving and loading".
    """


def _moved(objects, device):
    """A copy of ``objects`` with every tensor (module parameters included) on device.

    Through torch's own serialisation, which copies values bit for bit and keeps
    shared storage and shared objects shared.
    """
    buffer = io.BytesIO()
    torch.save(objects, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location=device, weights_only=False)


def _device_available(device):
    """Whether tensors can be put on ``device`` on this machine."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        index = 0 if device.index is None else device.index
        return torch.cuda.is_available() and index < torch.cuda.device_count()
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):  # not compiled in, or no such device
        return False
    return True


def _input_hint(module):
    """What the first weighted layer of ``module`` expects, for error messages."""
    for layer in module.modules():
        if hasattr(layer, "in_features"):
            return f" (its first layer expects {layer.in_features} input features)"
        if hasattr(layer, "in_channels"):
            return f" (its first layer expects {layer.in_channels} input channels)"
    return ""


class FiniteNTKBase(BaseEstimator):
    """Parameters, validation and Jacobian plumbing common to both estimators.

    Each estimator declares its own ``_parameter_constraints``, from
    ``_COMMON_CONSTRAINTS`` (the parameters both have, meaning the same in both)
    and its own.
    """

    _COMMON_CONSTRAINTS = {
        "network": [torch.nn.Module, None],
        "prior": [Interval(Real, 0, None, closed="neither")],
        "prior_mean": [StrOptions({"network", "zero"})],
        "parameters": [list, tuple, None],
        "solver": [StrOptions({"auto", "dense", "cg"})],
        "space": [StrOptions({"auto", "function", "parameter"})],
        "tol": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left"), None],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "dtype": [StrOptions(set(_DTYPES))],
        "device": [str, torch.device],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }
    # Sizes, ranks and thresholds of the automatic choices (tests may set an
    # instance's ``_policy`` to another Policy).
    _policy = Policy()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags

    # -- conversion -------------------------------------------------------------------

    @property
    def _torch_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def _device(self):
        """Where tensors are made: ``device``, except after unpickling on a machine
        without the fitted device, where the fitted state stays on the CPU until the
        next fit (see ``__setstate__``)."""
        return getattr(self, "_device_override", None) or self.device

    def _tensor(self, array):
        array = np.ascontiguousarray(array)
        if not array.flags.writeable:  # torch cannot wrap read-only memory
            array = array.copy()
        return torch.as_tensor(array, dtype=self._torch_dtype, device=self._device)

    @staticmethod
    def _numpy(tensor):
        return tensor.detach().cpu().numpy().astype(np.float64)

    # -- persistence ------------------------------------------------------------------

    def _devices(self):
        """Devices of what a pickle carries, None where there is no tensor.

        ``"fitted"``: the fitted state's (all on one device, the private network's);
        ``"network"``: the ``network`` parameter's (its first parameter or buffer).
        """
        fitted = self.__dict__.get("_network")
        network = self.__dict__.get("network")
        tensors = (
            chain(network.parameters(), network.buffers())
            if isinstance(network, torch.nn.Module)
            else ()
        )
        return {
            "fitted": None if fitted is None else fitted.theta.device,
            "network": next((tensor.device for tensor in tensors), None),
        }

    def _device_group(self, group, state):
        """Keys of ``state`` that ``group`` (a key of ``_devices``) covers."""
        if group == "network":
            return ["network"]
        parameters = set(self._get_param_names())
        return [key for key in state if key not in parameters]

    def __getstate__(self):
        """The state to pickle, every tensor in it on the CPU.

        What lives elsewhere (a fitted state on ``device="cuda"``, a ``network``
        passed on a GPU) is copied to the CPU and its device recorded, so that the
        pickle loads on any machine; see ``__setstate__``.
        """
        state = dict(super().__getstate__())  # object's is self.__dict__ itself
        moved = {}
        for group, device in self._devices().items():
            if device is None or device.type == "cpu":
                continue
            keys = self._device_group(group, state)
            state.update(_moved({key: state[key] for key in keys}, "cpu"))
            moved[group] = str(device)
        if moved:
            state["_pickled_devices"] = moved
        return state

    def __setstate__(self, state):
        """Restore a pickled estimator, its tensors back on their devices.

        A device this machine lacks is replaced by the CPU, with a
        DeviceFallbackWarning: the fitted state stays there and predicts there until
        the next fit, which uses ``device`` again (left as it was, for ``get_params``).
        """
        state = dict(state)
        moved = state.pop("_pickled_devices", {})
        super().__setstate__(state)
        missing = {}
        for group, device in moved.items():
            if not _device_available(device):
                missing[group] = device
                continue
            keys = self._device_group(group, state)
            self.__dict__.update(_moved({key: state[key] for key in keys}, device))
        if "fitted" in missing:
            self._device_override = "cpu"
        if missing:
            what = " and ".join(
                f"{'given a network' if group == 'network' else 'fitted'} on {device}"
                for group, device in missing.items()
            )
            warnings.warn(
                f"This {type(self).__name__} was {what}, which this machine does not "
                "have: it was loaded on the CPU and predicts there. Its device "
                f"parameter is still {self.device!r}; set_params(device='cpu') to fit "
                "it again here.",
                DeviceFallbackWarning,
                stacklevel=2,
            )

    # -- validation -------------------------------------------------------------------

    def _validate_fit_data(self, X, y, sample_weight=None, **kwargs):
        """Validated (X, y, sample_weight), without the samples of weight zero.

        sample_weight: None, or the positive weights of the samples kept.
        """
        X, y = validate_data(
            self, X, y, allow_nd=True, dtype=[np.float64, np.float32], **kwargs
        )
        self.input_shape_ = X.shape[1:]
        if sample_weight is None:
            return X, y, None
        # rejects all-zero and negative weights and a wrong shape, with sklearn's
        # messages; a weight of zero is the same as leaving the sample out
        sample_weight = _check_sample_weight(
            sample_weight, X, dtype=np.float64, ensure_non_negative=True
        )
        keep = sample_weight > 0
        return X[keep], y[keep], sample_weight[keep]

    def _validate_predict_X(self, X):
        X = validate_data(
            self, X, reset=False, allow_nd=True, dtype=[np.float64, np.float32]
        )
        if X.shape[1:] != self.input_shape_:
            raise ValueError(
                f"X has per-sample shape {X.shape[1:]}, but "
                f"{type(self).__name__} was fitted with per-sample shape "
                f"{self.input_shape_}."
            )
        return X

    # -- the network ------------------------------------------------------------------

    def _seed(self):
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    def _make_network(self, X, n_outputs):
        """The private FunctionalNetwork for X, its output count checked.

        Parameters
        ----------
        X : ndarray of shape (n, ...)
        n_outputs : int
            Outputs per sample the targets need.
        """
        # the new fitted state lives on ``device``, whatever unpickling chose before
        self.__dict__.pop("_device_override", None)
        module = self.network
        if module is None:
            n_features = int(np.prod(X.shape[1:]))
            module = default_mlp(n_features, n_outputs, seed=self._seed())
            if X.ndim > 2:
                module = torch.nn.Sequential(torch.nn.Flatten(), module)
        network = FunctionalNetwork(
            module, self.parameters, dtype=self._torch_dtype, device=self._device
        )
        sample = self._tensor(X[:2])
        try:
            with torch.no_grad():
                out = network(network.theta, sample)
        except Exception as error:
            raise ValueError(
                f"The network cannot be applied to X with per-sample shape "
                f"{X.shape[1:]}{_input_hint(network.module)}: "
                f"{type(error).__name__}: {error}"
            ) from error
        self._check_output_count(out.shape[1], n_outputs)
        return network

    def _check_output_count(self, n_network, n_expected):
        """Raise ValueError unless the network's output count is the one expected."""
        if n_network != n_expected:
            raise ValueError(self._output_mismatch_message(n_network, n_expected))

    def _output_mismatch_message(self, n_network, n_expected):
        return (
            f"The network produces {n_network} output(s) per sample, but y has "
            f"{n_expected} output(s) per sample."
        )

    def _training_jacobian(self, X, cache, row_scale=None):
        """JacobianProducts over the training inputs X (a tensor) at θ.

        ``row_scale`` (a tensor (n,) or None) scales each sample's rows of J.
        """
        return JacobianProducts(
            self._network,
            self._network.theta,
            X,
            batch_size=self.batch_size,
            cache_bytes=LINEARIZATION_CACHE_BYTES if cache else 0,
            row_scale=row_scale,
        )

    def _generator(self):
        """A torch Generator seeded from ``random_state`` (for Nyström sketches)."""
        generator = torch.Generator(device=self._device)
        generator.manual_seed(self._seed())
        return generator

    def _layerwise(self, network):
        """Whether the layerwise kernel applies to ``network`` (a FunctionalNetwork):
        Linear layers and elementwise activations whose linearized parameters are
        Linear weights and biases (see ``supports_structured``)."""
        return supports_structured(network.module, network.names)

    def _structured_kernel(self, network, X, choices, row_scale=None):
        """The layerwise kernel of the training inputs X (a tensor) where it applies
        (in function space, see :meth:`_layerwise`); None elsewhere. ``row_scale`` as
        in :meth:`_training_jacobian`."""
        if choices.space != "function" or not self._layerwise(network):
            return None
        return LayerwiseKernel(network, X, batch_size=self.batch_size, row_scale=row_scale)

    def _warn_unconverged(self, report, stage):
        """A ConvergenceWarning, naming what to change, when a CG solve (``report``,
        a CGResult, or None for none) stopped short of its stopping rule."""
        if report is None or report.all_converged:
            return
        unconverged = int((~report.converged).sum())
        warnings.warn(
            f"{type(self).__name__}: conjugate gradient ({stage}) stopped after "
            f"max_iter={report.max_iter} iterations with {unconverged} of "
            f"{report.converged.numel()} right-hand sides short of the stopping rule "
            f"at tol={self.tol:g} (worst relative residual "
            f"{float(report.residual_norms.max()):.3g}). Increase max_iter, loosen "
            f"tol, {self._conditioning_advice}, or use solver='dense'.",
            ConvergenceWarning,
            stacklevel=3,
        )

    def _resolve(self, n_rows, n_params, layerwise, variance="exact"):
        """Every "auto" of this fit (see ``resolve_choices``), with the network's
        sizes: n·k rows and p parameters."""
        return resolve_choices(
            space=self.space,
            solver=self.solver,
            preconditioner=self.preconditioner,
            variance=variance,
            n_rows=n_rows,
            n_params=n_params,
            layerwise=layerwise,
            policy=self._policy,
        )

    def _cg_progress(self):
        """A CG progress callback when ``verbose > 0``, else None."""
        return CGProgress(type(self).__name__, self.tol) if self.verbose else None

    def _linearized_chunks(self, X):
        """Yield ``(rows, f(θ, X_rows), J(X_rows) δ)`` over chunks of X (a tensor)."""
        network, theta = self._network, self._network.theta
        for start in range(0, X.shape[0], self.batch_size):
            rows = slice(start, start + self.batch_size)
            outputs, shift = outputs_and_jvp(
                network, theta, X[rows], self.delta_, self.forward_mode_
            )
            yield rows, outputs, shift

    def _latent_mean(self, X):
        """Predictive mean m(x*) + J* δ, shape (m, k)."""
        parts = []
        for _, outputs, shift in self._linearized_chunks(X):
            parts.append(outputs + shift if self.prior_mean == "network" else shift)
        return torch.cat(parts)

    @property
    def network_(self):
        """The private eval-mode copy of the network (parameters at θ)."""
        return self._network.module

    @property
    def n_params_(self):
        """Number of linearized parameters p."""
        return self._network.n_params
