"""A torch module seen as a pure function of a flat parameter vector.

The estimators linearize ``f(w, X)`` around the trained weights ``θ``. Everything
downstream (Jacobian products, operators, solvers) works with flat p-vectors, so this
module owns the one mapping between a p-vector and the module's named parameters.
The user's module is deep-copied (as skorch does) and the copy is put in eval mode;
the original is never touched.

Thread safety: ``functional_call`` swaps the given tensors into the module for the
duration of a call, and forward-mode AD (``torch.func.jvp``) keeps its dual levels in
global state, so two threads evaluating the network at once corrupt each other's
results. Every evaluation of the module, and every forward-mode section
(:mod:`.jacobian`), holds ``NETWORK_LOCK``; backward passes through graphs built
earlier need no lock.
"""

import copy
import threading

import numpy as np
import torch
from torch.func import functional_call

__all__ = [
    "NETWORK_LOCK",
    "FunctionalNetwork",
    "NetworkOutputError",
    "default_mlp",
    "tensor_copy",
]

# Held by every call of a module through ``functional_call`` and every forward-mode
# section; reentrant, since a forward-mode section calls the network.
NETWORK_LOCK = threading.RLock()


class NetworkOutputError(TypeError):
    """The module returned something other than one tensor."""


class FunctionalNetwork:
    """Private eval-mode copy of a module as ``f(w, X) -> (n, k)``.

    Parameters
    ----------
    module : torch.nn.Module
        The user's network; it is deep-copied, never modified.
    parameters : list of str or None
        Names of the parameters to linearize (``module.named_parameters()`` names).
        None selects every parameter with ``requires_grad=True``.
    dtype : torch.dtype
    device : torch.device or str

    Attributes
    ----------
    module : torch.nn.Module
        The private copy, in eval mode, all its tensors free of autograd.
    names : list of str
        Selected parameter names, in ``named_parameters`` order.
    theta : torch.Tensor of shape (p,)
        The trained values of the selected parameters, flattened.
    copies_input : bool
        Whether every call passes the module a copy of X, set by :meth:`probe` when
        the module writes to its input (``x -= m``, ``ReLU(inplace=True)`` first):
        the training inputs are evaluated many times, and torch.func's transforms
        refuse to let a function write to a tensor it did not create.
    input_dtype : torch.dtype
        The dtype :meth:`inputs` gives X: ``dtype``, or int64 for a module that
        takes integer indices (an Embedding first; see :meth:`adopt_inputs`).
    """

    def __init__(self, module, parameters=None, *, dtype, device):
        self.module = copy.deepcopy(module).to(device=device, dtype=dtype).eval()
        named = dict(self.module.named_parameters())
        if parameters is None:
            user_flags = dict(module.named_parameters())
            self.names = [name for name in named if user_flags[name].requires_grad]
        else:
            if isinstance(parameters, str):
                parameters = [parameters]
            unknown = [name for name in parameters if name not in named]
            if unknown:
                raise ValueError(
                    f"parameters {unknown} are not parameters of the network; "
                    f"expected names from {list(named)}."
                )
            selected = set(parameters)
            self.names = [name for name in named if name in selected]
        if not self.names:
            raise ValueError(
                "The network has no parameters to linearize: pass `parameters` or "
                "a network with trainable parameters."
            )
        for tensor in self.module.parameters():
            tensor.requires_grad_(False)
        self.shapes = [named[name].shape for name in self.names]
        self.sizes = [named[name].numel() for name in self.names]
        self.theta = torch.cat([named[name].detach().reshape(-1) for name in self.names])
        self.copies_input = False
        self.input_dtype = self.theta.dtype

    @property
    def n_params(self):
        return self.theta.numel()

    def unflatten(self, w):
        """Split a p-vector into a ``{name: tensor}`` dict of the parameters' shapes."""
        pieces = torch.split(w, self.sizes)
        return {
            name: piece.view(shape)
            for name, piece, shape in zip(self.names, pieces, self.shapes, strict=True)
        }

    def _apply(self, w, X):
        """The module's own output at parameters w, checked to be one tensor."""
        if self.copies_input:
            X = X.clone()
        with NETWORK_LOCK:
            out = functional_call(self.module, self.unflatten(w), (X,))
        if not isinstance(out, torch.Tensor):
            raise NetworkOutputError(
                f"The network returned a {type(out).__name__}, not a tensor: it must "
                "map a batch (n, ...) to one tensor of outputs (n,) or (n, k). Wrap it "
                "in a module that returns the output to linearize (for example "
                "out[0] or out['logits'])."
            )
        return out

    def __call__(self, w, X):
        """Outputs ``f(w, X)`` flattened per sample to shape (n, k)."""
        return self._apply(w, X).reshape(X.shape[0], -1)

    def probe(self, X):
        """The module's output at θ on X, as the module returns it (not flattened).

        Records whether the module wrote to its input (``copies_input``): in-place
        operations bump a tensor's version counter, whether they change values or
        not. X itself may be written to; pass a copy.

        Parameters
        ----------
        X : torch.Tensor of shape (b, ...)

        Returns
        -------
        torch.Tensor
        """
        version = X._version
        with torch.no_grad():
            out = self._apply(self.theta, X)
        self.copies_input = self.copies_input or X._version != version
        return out

    def inputs(self, X):
        """A copy of the array X as a tensor of ``input_dtype`` on the network's
        device, never a view of the caller's memory (a module may write to its
        input).

        Raises
        ------
        ValueError
            When the module takes integer indices and X has other values.
        """
        X = np.asarray(X)
        if self.input_dtype == torch.long and X.dtype.kind not in "iu":
            if not np.array_equal(X, np.round(X)):
                raise ValueError(
                    "The network takes integer indices as input (it was fitted on "
                    "integer X that it cannot take as floats), but X has non-integer "
                    "values."
                )
        return tensor_copy(X, self.input_dtype, self.theta.device)

    def adopt_inputs(self, X):
        """The module's output (:meth:`probe`) on the first two samples of X, passed
        as ``input_dtype``; integer X that the module cannot take as floats but can
        as int64 indices (an Embedding first) sets ``input_dtype`` to int64.

        Raises
        ------
        Exception
            The module's error on X as floats, where int64 does not serve either.
        """
        try:
            return self.probe(self.inputs(X[:2]))
        except NetworkOutputError:
            raise
        except Exception:
            if np.asarray(X).dtype.kind not in "iu":
                raise
            self.input_dtype = torch.long
            try:
                return self.probe(self.inputs(X[:2]))
            except Exception:
                self.input_dtype = self.theta.dtype
            raise

    def single(self, w, x):
        """``f(w, x)`` for one sample ``x`` (no batch axis): shape (k,)."""
        return self(w, x.unsqueeze(0))[0]


def tensor_copy(array, dtype, device):
    """A copy of the numeric ``array`` as a tensor of ``dtype`` on ``device``, never a
    view of the caller's memory (a network that writes to its input must not write
    to the caller's array)."""
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"Expected numeric values, got an array of dtype {array.dtype}.")
    return torch.tensor(np.ascontiguousarray(array), dtype=dtype, device=device)


def default_mlp(n_features, n_outputs, *, hidden=(64, 64), seed=0):
    """The network used when ``network=None``: a randomly initialised tanh MLP.

    Its finite-width NTK at initialisation gives a GP usable out of the box.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers, width = [], n_features
        for size in hidden:
            layers += [torch.nn.Linear(width, size), torch.nn.Tanh()]
            width = size
        layers.append(torch.nn.Linear(width, n_outputs))
        return torch.nn.Sequential(*layers)
    finally:
        torch.random.set_rng_state(generator_state)
