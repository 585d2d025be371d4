"""A torch module seen as a pure function of a flat parameter vector.

The estimators linearize ``f(w, X)`` around the trained weights ``θ``. Everything
downstream (Jacobian products, operators, solvers) works with flat p-vectors, so this
module owns the one mapping between a p-vector and the module's named parameters.
The user's module is deep-copied (as skorch does) and the copy is put in eval mode;
the original is never touched.
"""

import copy

import torch
from torch.func import functional_call

__all__ = ["FunctionalNetwork", "default_mlp"]


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

    def __call__(self, w, X):
        """Outputs ``f(w, X)`` flattened per sample to shape (n, k)."""
        out = functional_call(self.module, self.unflatten(w), (X,))
        return out.reshape(X.shape[0], -1)

    def single(self, w, x):
        """``f(w, x)`` for one sample ``x`` (no batch axis): shape (k,)."""
        return self(w, x.unsqueeze(0))[0]


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
