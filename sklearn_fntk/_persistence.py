"""Fitted estimators that pickle on one machine and load on another.

Every tensor of a pickle is on the CPU (a fit on ``device="cuda"`` included), and
unpickling puts it back on its device, or on the CPU with a DeviceFallbackWarning
where this machine lacks that device; see the user guide, "Saving and loading".
"""

import io
from itertools import chain

import torch

from ._diagnostics import warn

__all__ = ["DeviceFallbackWarning", "DevicePersistence", "unavailable_device"]


class DeviceFallbackWarning(UserWarning):
    """An estimator was unpickled on a machine without the device it was fitted on.

    Its fitted state (or its ``network``) was loaded on the CPU instead, where it
    predicts; see the user guide, "Saving and loading". Its ``device`` parameter is
    left as given, so a new ``fit`` uses that device again.

    See Also
    --------
    FiniteNTKRegressor : Its ``device`` parameter.
    FiniteNTKClassifier : Its ``device`` parameter.

    Examples
    --------
    >>> import warnings
    >>> from sklearn_fntk import DeviceFallbackWarning
    >>> warnings.filterwarnings("ignore", category=DeviceFallbackWarning)
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


def unavailable_device(device):
    """Why tensors cannot be put on ``device`` here, or None if they can."""
    if _device_available(device):
        return None
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    if device.type == "cuda":
        return "torch.cuda.is_available() is False"
    return f"torch cannot allocate on {device.type} here"


class DevicePersistence:
    """Pickling across devices, for an estimator whose fitted state is on the device
    of its private network (``_network``) and whose ``network`` parameter may be a
    module on any device."""

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
        DeviceFallbackWarning: the fitted state stays there and predicts there (it
        predicts wherever its network is) until the next fit, which uses
        ``device`` again (left as it was, for ``get_params``).
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
        if missing:
            what = " and ".join(
                f"{'given a network' if group == 'network' else 'fitted'} on {device}"
                for group, device in missing.items()
            )
            warn(
                f"This {type(self).__name__} was {what}, which this machine does not "
                "have: it was loaded on the CPU and predicts there. Its device "
                f"parameter is still {self.device!r}; set_params(device='cpu') to fit "
                "it again here.",
                DeviceFallbackWarning,
            )
