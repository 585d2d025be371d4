"""The exact finite NTK of a multilayer perceptron, layer by layer, without Jacobians.

For a chain of ``nn.Linear`` layers y_l = W_l x_l + b_l and elementwise activations,
the Jacobian of output a of sample i with respect to (W_l, b_l) is
(g_ia x_iᵀ, g_ia), where x_i = x_l(i) is the layer's input and g_ia = ∂f_a(x_i)/∂y_l
the gradient of the output with respect to the layer's output. Inner products of
Jacobian rows therefore split per layer (Novak et al. 2022, "structured derivatives"):

    (J Jᵀ)[(i, a), (j, b)] = Σ_l (x_i·x_j + 1) (g_ia·g_jb)

with the ``+ 1`` for a selected bias and the x_i·x_j for a selected weight. Writing
z_i for the layer's "augmented input" (x_i, 1) (or x_i alone, or 1 alone, according
to which of weight and bias are linearized), each layer contributes (Z Zᵀ) ⊙ (G Gᵀ).
Products with J Jᵀ need no autograd once the per-layer Z (n, d_z) and G (n, k, d_out)
are stored: memory O(n·k·Σ widths), never O(n·p). Rows and columns are indexed by
sample·k + output, the (n, k) row-major flattening used across the package.
"""

import bisect

import torch
from torch import nn
from torch.func import functional_call

from .jacobian import EXPLICIT_BLOCK_BYTES, scale_rows
from .network import NETWORK_LOCK

__all__ = ["LayerwiseKernel", "supports_structured"]

# Products with m columns run over blocks of samples of a chunk whose per-layer
# temporaries (rows, m, d_out) take at most this many bytes (at least
# _MIN_PRODUCT_ROWS rows), near the cache: 16-column products at p = 21,825 became
# 1.4-2x faster per column, single columns no slower, than over whole 1024-sample
# chunks (docs/background/benchmarks.rst, "Measurements behind the defaults").
_PRODUCT_BLOCK_BYTES = 1 << 20
_MIN_PRODUCT_ROWS = 32
# On a GPU a product's cost over 1024-sample chunks is kernel launches, not flops: at
# n = 10⁶, p = 21,825 on an H200, single-column products took 0.26 s each, against
# 1.7 ms per column in 512-column ones. There the training features are kept in
# chunks of at least _GPU_CHUNK_ROWS samples, and products run over blocks of up to
# _GPU_PRODUCT_BLOCK_BYTES.
_GPU_CHUNK_ROWS = 1 << 16
_GPU_PRODUCT_BLOCK_BYTES = 1 << 28


def _on_cpu(tensor):
    return tensor.device.type == "cpu"


# Modules applied elementwise (or as the identity in eval mode, like dropout): their
# Jacobian is diagonal, so the per-layer split above holds. Exact types only, since a
# subclass may override ``forward``.
_ELEMENTWISE = frozenset(
    {
        nn.Identity,
        nn.Tanh,
        nn.ReLU,
        nn.ReLU6,
        nn.LeakyReLU,
        nn.PReLU,
        nn.GELU,
        nn.Sigmoid,
        nn.SiLU,
        nn.Mish,
        nn.ELU,
        nn.CELU,
        nn.SELU,
        nn.Softplus,
        nn.Softsign,
        nn.Hardtanh,
        nn.Hardswish,
        nn.Hardsigmoid,
        nn.LogSigmoid,
        nn.Tanhshrink,
        nn.Dropout,
        nn.AlphaDropout,
    }
)


def _leaf_layers(module, prefix=""):
    """``[(name, layer)]`` of a (nested) Sequential in call order, or None if not one."""
    if type(module) is not nn.Sequential:
        return None
    layers = []
    # ``_modules``, unlike ``named_children``, keeps a module that is used twice.
    for name, child in module._modules.items():
        path = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            inner = _leaf_layers(child, prefix=f"{path}.")
            if inner is None:
                return None
            layers += inner
        else:
            layers.append((path, child))
    return layers


def _is_leading_flatten(layer, position):
    return (
        type(layer) is nn.Flatten
        and position == 0
        and layer.start_dim == 1
        and layer.end_dim == -1
    )


def supports_structured(module, parameter_names):
    """Whether :class:`LayerwiseKernel` computes the exact kernel of this network.

    True only for an ``nn.Sequential`` (Sequentials may nest) of ``nn.Linear`` layers
    and elementwise activations (Tanh, ReLU, GELU, Sigmoid, SiLU, ELU, Softplus,
    LeakyReLU, Identity, Dropout and AlphaDropout, which are identities in eval mode,
    ...), optionally starting with ``nn.Flatten()``, in which every selected parameter
    is the ``weight`` or the ``bias`` of one of those Linear layers, no layer is used
    twice (shared weights) and no module carries forward hooks. False for
    convolutions, normalisation layers, attention, any other or custom module.

    Parameters
    ----------
    module : torch.nn.Module
    parameter_names : iterable of str
        Names from ``module.named_parameters()`` that are linearized, e.g.
        ``FunctionalNetwork.names``.

    Returns
    -------
    bool
    """
    layers = _leaf_layers(module)
    selected = set(parameter_names)
    if not layers or not selected:
        return False
    if len({id(layer) for _, layer in layers}) != len(layers):
        return False
    if any(m._forward_hooks or m._forward_pre_hooks for m in module.modules()):
        return False
    linearizable = set()
    for position, (path, layer) in enumerate(layers):
        if type(layer) is nn.Linear:
            linearizable.add(f"{path}.weight")
            if layer.bias is not None:
                linearizable.add(f"{path}.bias")
        elif type(layer) not in _ELEMENTWISE and not _is_leading_flatten(layer, position):
            return False
    return selected <= linearizable


class _Layer:
    """Which of a Linear layer's weight and bias are linearized, and its sizes."""

    def __init__(self, weight, bias, d_in, d_out):
        self.weight, self.bias = weight, bias
        self.d_in, self.d_out = d_in, d_out

    def flatten(self, P):
        """Per-layer gradients P (..., d_out, d_z) -> (..., p_l), in the layout of
        the flat parameter vector (the weight row-major, then the bias)."""
        parts = [P[..., : self.d_in].flatten(-2)] if self.weight else []
        if self.bias:
            parts.append(P[..., -1])
        return torch.cat(parts, dim=-1)

    def unflatten(self, V):
        """Flat columns V (p_l, m) -> (m, d_out, d_z), the inverse of :meth:`flatten`:
        a view of a (d_z, m·d_out) array, the layout :meth:`_ChunkFeatures.product`
        multiplies fastest."""
        m = V.shape[1]
        T = V.new_empty(self.d_in * self.weight + self.bias, m, self.d_out)
        start = 0
        if self.weight:
            start = self.d_out * self.d_in
            T[: self.d_in] = V[:start].reshape(self.d_out, self.d_in, m).permute(1, 2, 0)
        if self.bias:
            T[-1] = V[start : start + self.d_out].T
        return T.reshape(T.shape[0], -1).T.reshape(m, self.d_out, -1)

    @property
    def size(self):
        """p_l, the layer's linearized parameters."""
        return self.d_out * (self.d_in * self.weight + self.bias)

    def augmented_input(self, x):
        """z = (x, 1), x or 1 per sample according to the selection: (b, d_z)."""
        parts = [x] if self.weight else []
        if self.bias:
            parts.append(x.new_ones(x.shape[0], 1))
        return torch.cat(parts, dim=1)


class _ChunkFeatures:
    """Per-layer Z (b, d_z) and G (b, k, d_out) of one chunk of samples."""

    def __init__(self, Z, G):
        self.Z, self.G = Z, G
        self.n_rows, self.n_outputs = G[0].shape[:2]

    @classmethod
    def concatenate(cls, chunks):
        """One chunk of the samples of consecutive ``chunks``."""
        if len(chunks) == 1:
            return chunks[0]
        Z = [torch.cat(layer) for layer in zip(*(chunk.Z for chunk in chunks), strict=True)]
        G = [torch.cat(layer) for layer in zip(*(chunk.G for chunk in chunks), strict=True)]
        return cls(Z, G)

    def _row_blocks(self, n_columns):
        """Row slices of this chunk for products with ``n_columns`` columns."""
        itemsize = self.G[0].element_size()
        row_bytes = n_columns * max(G.shape[2] for G in self.G) * itemsize
        budget = _PRODUCT_BLOCK_BYTES if _on_cpu(self.G[0]) else _GPU_PRODUCT_BLOCK_BYTES
        step, size = max(budget // row_bytes, _MIN_PRODUCT_ROWS), self.n_rows
        return [slice(start, start + step) for start in range(0, size, step)]

    def add_transpose_product(self, U, totals):
        """Add Jᵀ U per layer to ``totals``: U (b, k, m); ``totals`` one (d_z, m·d_out)
        array per layer, the parameter gradients transposed (the weight gradient and,
        as its last row, the bias gradient, per column and output unit).

        (J_lᵀ u)[o, c] = Σ_i w_i[o] z_i[c] with w_i = Σ_a u_ia g_ia: broadcast products
        over the k outputs (batched tiny matmuls are far slower), then one GEMM added
        in place, Zᵀ W: a (d_z, m·d_out) result runs at several times the rate of its
        transpose (m·d_out, d_z) when d_z is small (docs/background/benchmarks.rst).
        """
        k = U.shape[1]
        for rows in self._row_blocks(U.shape[2]):
            U_rows = U[rows]
            for Z, G, total in zip(self.Z, self.G, totals, strict=True):
                G_rows = G[rows]
                W = U_rows[:, 0, :, None] * G_rows[:, 0, None, :]  # (b, m, d_out)
                for a in range(1, k):
                    W.addcmul_(U_rows[:, a, :, None], G_rows[:, a, None, :])
                total.addmm_(Z[rows].T, W.flatten(1))

    def product(self, gradients):
        """J V per layer, summed: [(m, d_out, d_z)] -> (b, k, m).

        (J_l V)_ia = g_iaᵀ (V z_i) for each column V (d_out, d_z): one GEMM for all
        V z_i, then a product and sum over d_out per output.
        """
        m, k = gradients[0].shape[0], self.n_outputs
        total = self.G[0].new_zeros(self.n_rows, k, m)
        for rows in self._row_blocks(m):
            for Z, G, V in zip(self.Z, self.G, gradients, strict=True):
                d_out, d_z = V.shape[1:]
                VZ = (Z[rows] @ V.reshape(m * d_out, d_z).T).reshape(-1, m, d_out)
                for a in range(k):
                    total[rows, a] += (G[rows, a, None, :] * VZ).sum(-1)
        return total

    def jacobian(self, layers, rows, buffer):
        """Explicit Jacobian rows of the samples ``rows`` of this chunk, shape
        (b, k, p): per layer g_ia z_iᵀ, written in place in the layout of the flat
        parameter vector (``layers``: one _Layer each) into the first b rows of
        ``buffer`` (at least (b, k, p))."""
        b = rows.stop - rows.start
        J = buffer[:b]
        k = J.shape[1]
        start = 0
        for layer, Z, G in zip(layers, self.Z, self.G, strict=True):
            Z, G = Z[rows], G[rows]
            if layer.weight:
                size = layer.d_out * layer.d_in
                weight = J[..., start : start + size].view(b, k, layer.d_out, layer.d_in)
                torch.mul(G[..., None], Z[:, None, None, : layer.d_in], out=weight)
                start += size
            if layer.bias:  # z's last entry is 1
                J[..., start : start + layer.d_out] = G
                start += layer.d_out
        return J

    def cross(self, other):
        """Σ_l (Z Z'ᵀ) ⊙ (G G'ᵀ): shape (b·k, b'·k), rows (sample, output)."""
        k = self.n_outputs
        total = 0
        for Z, G, Z2, G2 in zip(self.Z, self.G, other.Z, other.G, strict=True):
            ZZ = (Z @ Z2.T).repeat_interleave(k, 0).repeat_interleave(k, 1)
            total = total + ZZ * (G.flatten(0, 1) @ G2.flatten(0, 1).T)
        return total

    def column(self, z, g):
        """Σ_l (Z z)(G g) against one sample's per-layer z (d_z,), g (d_out,): (b·k,)."""
        total = 0
        for Z, G, z_i, g_ia in zip(self.Z, self.G, z, g, strict=True):
            total = total + (Z @ z_i)[:, None] * (G @ g_ia)
        return total.reshape(-1)

    def diagonal(self):
        """‖z_i‖² ‖g_ia‖² summed over layers: shape (b·k,)."""
        total = 0
        for Z, G in zip(self.Z, self.G, strict=True):
            total = total + (Z**2).sum(1)[:, None] * (G**2).sum(2)
        return total.reshape(-1)


class LayerwiseKernel:
    """Exact products with the finite NTK J Jᵀ of a Linear/elementwise network.

    Setup runs, per chunk, one forward pass that records each linearized layer's input
    and k backward passes from the outputs to every linearized layer's output; the
    products then cost a few matrix multiplications per layer, with no autograd. The
    kernel is J Jᵀ: no prior variance s and no noise (K = s·J Jᵀ + σ² I).

    Parameters
    ----------
    network : FunctionalNetwork
        A network for which ``supports_structured(network.module, network.names)``;
        linearized at ``network.theta``.
    X : torch.Tensor of shape (n, ...)
        Training inputs; a sample is a vector, or is flattened by a leading Flatten.
    batch_size : int
        Samples per chunk in the setup passes and, on the CPU, in the products.
    chunk_rows : int or None, default=None
        Least samples per chunk of the training features kept for the products (the
        last chunk may have fewer): consecutive setup chunks are concatenated up to
        it. None: ``batch_size`` on the CPU, at least 65,536 on other devices.
    row_scale : torch.Tensor of shape (n,) or None, default=None
        Per-sample factors of the training rows of J (√w for sample weights w): the
        kernel is then diag(row_scale) J Jᵀ diag(row_scale), by scaling each sample's
        output gradients G. Other inputs (:meth:`features`) are never scaled.

    Attributes
    ----------
    n_samples, n_outputs : int
    size : int
        n·k, the order of the kernel.
    outputs : torch.Tensor of shape (n, k)
        The network's outputs f(θ, X), a by-product of the setup.
    """

    def __init__(self, network, X, *, batch_size, chunk_rows=None, row_scale=None):
        if not supports_structured(network.module, network.names):
            raise ValueError(
                "LayerwiseKernel needs an nn.Sequential of Linear layers and "
                "elementwise activations whose linearized parameters are Linear "
                "weights and biases; check supports_structured first."
            )
        if chunk_rows is None:
            on_cpu = _on_cpu(network.theta)
            chunk_rows = batch_size if on_cpu else max(batch_size, _GPU_CHUNK_ROWS)
        self.batch_size, self.chunk_rows, self._network = batch_size, chunk_rows, network
        self._leaves = _leaf_layers(network.module)
        names = set(network.names)
        self._layers = {
            position: _Layer(
                f"{path}.weight" in names,
                f"{path}.bias" in names,
                layer.in_features,
                layer.out_features,
            )
            for position, (path, layer) in enumerate(self._leaves)
            if f"{path}.weight" in names or f"{path}.bias" in names
        }
        # Values at θ of the linearized parameters; the others are the module's own.
        self._values = network.unflatten(network.theta)
        self._copies_input = network.copies_input
        self.n_samples = X.shape[0]
        self._features, self._starts, pending, outputs = [], [], [], []
        for start in range(0, self.n_samples, batch_size):
            rows = slice(start, start + batch_size)
            features, out = self._chunk_features(X[rows], row_scale, rows)
            if not pending:
                self._starts.append(start)
            pending.append(features)
            outputs.append(out)
            stop = start + batch_size
            if stop - self._starts[-1] >= chunk_rows or stop >= self.n_samples:
                self._features.append(_ChunkFeatures.concatenate(pending))
                pending = []
        self.outputs = torch.cat(outputs)
        self.n_outputs = self.outputs.shape[1]
        self.size = self.n_samples * self.n_outputs

    @property
    def feature_bytes(self):
        """Memory held by the per-layer features Z and G of the inputs."""
        return sum(
            tensor.numel() * tensor.element_size()
            for features in self._features
            for tensor in (*features.Z, *features.G)
        )

    def _chunk_features(self, X, row_scale=None, rows=slice(None)):
        """One forward and k backward passes: (_ChunkFeatures, outputs (b, k)).

        X holds the rows ``rows`` of the training inputs when ``row_scale`` (n,) is
        given: each sample's G, hence its rows of J, is scaled by its factor.
        """
        first = min(self._layers)
        Z, layer_outputs = [], []
        h = X.clone() if self._copies_input else X  # see FunctionalNetwork
        # the layers are the private copy's, which other threads may call
        with torch.enable_grad(), NETWORK_LOCK:
            for position, (path, layer) in enumerate(self._leaves):
                if type(layer) is not nn.Linear:
                    h = layer(h)
                    continue
                selected = self._layers.get(position)
                if selected is not None:
                    if h.ndim != 2:
                        raise ValueError(
                            f"Layer {path!r} receives inputs of shape "
                            f"{tuple(h.shape)}; the layerwise kernel needs one vector "
                            "per sample (flatten n-D inputs with a leading "
                            "nn.Flatten())."
                        )
                    Z.append(selected.augmented_input(h.detach()))
                local = {
                    name: self._values.get(f"{path}.{name}", tensor)
                    for name, tensor in layer.named_parameters()
                }
                h = functional_call(layer, local, (h,))
                if position == first:
                    # The graph starts here: nothing before needs gradients.
                    h = h.detach().requires_grad_()
                if selected is not None:
                    layer_outputs.append(h)
            out = h.reshape(X.shape[0], -1)
            # G_l[:, a] = ∂f_a/∂y_l per sample: samples do not interact, so the
            # gradient of Σ_i f_a(x_i) with respect to y_l(x_i) is its row i.
            k = out.shape[1]
            grads = [
                torch.autograd.grad(out[:, a].sum(), layer_outputs, retain_graph=a < k - 1)
                for a in range(k)
            ]
        G = [
            scale_rows(torch.stack(per_output, dim=1), row_scale, rows)
            for per_output in zip(*grads, strict=True)
        ]
        return _ChunkFeatures(Z, G), out.detach()

    def features(self, X):
        """Per-layer features of other inputs, for :meth:`cross` and :meth:`diagonal`.

        Parameters
        ----------
        X : torch.Tensor of shape (m, ...)

        Returns
        -------
        list of _ChunkFeatures
            One per chunk of ``batch_size`` rows; memory O(m·k·Σ widths).
        """
        return [
            self._chunk_features(X[start : start + self.batch_size])[0]
            for start in range(0, X.shape[0], self.batch_size)
        ]

    def matmat(self, U):
        """(J Jᵀ) U for U of shape (n·k, m); returns (n·k, m).

        Through the parameters (:meth:`_matmat_by_layers`, about 4·n·m·p flops), or,
        for many columns on few samples, through row blocks of J Jᵀ
        (:meth:`_matmat_by_gram_rows`, about 2·(n·k)²·(m + Σ_l widths) flops, all
        matrix products), whichever costs fewer flops.
        """
        n, k, m = self.n_samples, self.n_outputs, U.shape[1]
        layers = list(zip(self._features[0].Z, self._features[0].G, strict=True))
        widths = sum(Z.shape[1] + k * G.shape[2] for Z, G in layers)
        params = sum(Z.shape[1] * G.shape[2] for Z, G in layers)
        rows = max(chunk.n_rows for chunk in self._features)
        block_bytes = rows * k * self.size * U.element_size()
        fits = block_bytes <= EXPLICIT_BLOCK_BYTES
        if fits and (n * k) * (m + widths) < 2 * m * params:
            return self._matmat_by_gram_rows(U)
        return self._matmat_by_layers(U)

    def _matmat_by_gram_rows(self, U):
        """(J Jᵀ) U one chunk of rows of J Jᵀ (its cross kernel with all) at a time."""
        rows = (self.gram([chunk], self._features) @ U for chunk in self._features)
        return torch.cat(list(rows))

    def _matmat_by_layers(self, U):
        """(J Jᵀ) U: first Jᵀ U, as per-layer gradients, then J applied to them."""
        m = U.shape[1]
        gradients = self._transpose_layers(U.reshape(self.n_samples, self.n_outputs, m))
        return self._apply_layers(gradients).reshape(self.size, m)

    def _transpose_layers(self, U):
        """Jᵀ U for U of shape (n, k, m), as per-layer (m, d_out, d_z) gradients
        summed over chunks (views of (d_z, m·d_out) arrays)."""
        m, first = U.shape[2], self._features[0]
        totals = [
            U.new_zeros(Z.shape[1], m * G.shape[2])
            for Z, G in zip(first.Z, first.G, strict=True)
        ]
        for start, features in zip(self._starts, self._features, strict=True):
            features.add_transpose_product(U[start : start + features.n_rows], totals)
        return [total.T.reshape(m, -1, total.shape[0]) for total in totals]

    def _apply_layers(self, gradients):
        """J applied to per-layer (m, d_out, d_z) columns, chunk by chunk: (n, k, m)."""
        return torch.cat([features.product(gradients) for features in self._features])

    # -- products with J and Jᵀ in parameter space -----------------------------------

    @property
    def n_params(self):
        """p, the linearized parameters, in the network's flat order."""
        return sum(layer.size for layer in self._layers.values())

    def vjp(self, U):
        """Jᵀ U for U of shape (n, k) or (n, k, m); returns (p,) or (p, m), in the
        layout of the network's flat parameter vector."""
        columns = U if U.ndim == 3 else U[..., None]
        gradients = self._transpose_layers(columns)
        layers = self._layers.values()
        flat = torch.cat(
            [layer.flatten(P) for layer, P in zip(layers, gradients, strict=True)], dim=1
        ).T.contiguous()
        return flat if U.ndim == 3 else flat[:, 0]

    def jvp(self, V):
        """J V for V of shape (p,) or (p, m) (flat parameter layout); returns
        (n, k) or (n, k, m)."""
        columns = V if V.ndim == 2 else V[:, None]
        layers = list(self._layers.values())
        pieces = torch.split(columns, [layer.size for layer in layers])
        gradients = [
            layer.unflatten(piece) for layer, piece in zip(layers, pieces, strict=True)
        ]
        JV = self._apply_layers(gradients)
        return JV if V.ndim == 2 else JV[..., 0]

    def jacobian_blocks(self, block_samples):
        """Yield ``(rows, J_rows)``, the explicit Jacobian (b, k, p) of at most
        ``block_samples`` consecutive samples within a chunk, from the features (no
        autograd).

        Every block is written into one buffer: a block is valid until the next is
        yielded (a fresh array per block cost as much kernel time in page faults as
        the products took at p = 10⁵).
        """
        layers = list(self._layers.values())
        first = self._features[0].G[0]
        rows_per_block = min(block_samples, first.shape[0])
        buffer = first.new_empty(rows_per_block, self.n_outputs, self.n_params)
        for start, features in zip(self._starts, self._features, strict=True):
            size = features.n_rows
            for offset in range(0, size, block_samples):
                local = slice(offset, min(offset + block_samples, size))
                rows = slice(start + local.start, start + local.stop)
                yield rows, features.jacobian(layers, local, buffer)

    def of(self, X, row_scale=None):
        """The same network's layerwise kernel over other inputs X (rows of J
        scaled by ``row_scale``)."""
        return LayerwiseKernel(
            self._network,
            X,
            batch_size=self.batch_size,
            chunk_rows=self.chunk_rows,
            row_scale=row_scale,
        )

    def diagonal(self, features=None):
        """diag(J Jᵀ) = Σ_l ‖z_i‖² ‖g_ia‖², shape (n·k,) (or (m·k,) for ``features``).

        Parameters
        ----------
        features : list of _ChunkFeatures or None
            From :meth:`features`, for the diagonal at other inputs; None for the
            training inputs.
        """
        features = self._features if features is None else features
        return torch.cat([chunk.diagonal() for chunk in features])

    def column(self, index):
        """Column ``index`` = i·k + a of J Jᵀ, shape (n·k,).

        (J Jᵀ)[(j, b), (i, a)] = Σ_l (z_j·z_i)(g_jb·g_ia), from sample i's features.
        """
        sample, output = divmod(int(index), self.n_outputs)
        chunk = bisect.bisect_right(self._starts, sample) - 1
        source, row = self._features[chunk], sample - self._starts[chunk]
        z = [Z[row] for Z in source.Z]
        g = [G[row, output] for G in source.G]
        return torch.cat([features.column(z, g) for features in self._features])

    def cross(self, features):
        """J J*ᵀ between the training inputs and other inputs.

        Parameters
        ----------
        features : list of _ChunkFeatures
            From :meth:`features` of m other inputs.

        Returns
        -------
        torch.Tensor of shape (n·k, m·k)
        """
        return self.gram(self._features, features)

    @staticmethod
    def gram(features_a, features_b):
        """J_a J_bᵀ between two inputs' features, shape (n_a·k, n_b·k)."""
        return torch.cat(
            [torch.cat([a.cross(b) for b in features_b], dim=1) for a in features_a]
        )

    def dense(self):
        """J Jᵀ assembled, shape (n·k, n·k)."""
        return self.cross(self._features)
