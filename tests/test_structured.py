"""LayerwiseKernel against an explicit float64 Jacobian, and supports_structured."""

import pytest
import torch
from torch import nn
from torch.func import jacrev

from sklearn_fntk._linearize.layerwise import LayerwiseKernel, supports_structured
from sklearn_fntk._linearize.network import FunctionalNetwork

DTYPE = torch.float64


def mlp(widths, activation=nn.Tanh, bias=True):
    layers = []
    for d_in, d_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(d_in, d_out, bias=bias), activation()]
    return nn.Sequential(*layers[:-1])


def reference_jacobian(network, X):
    """J of shape (n·k, p): rows (sample, output) row-major, by reverse mode."""
    return jacrev(lambda w: network(w, X).reshape(-1))(network.theta)


CASES = {
    "tanh-single-output": (lambda: mlp([3, 8, 6, 1]), None, (11, 3)),
    "relu-multi-output": (lambda: mlp([3, 8, 6, 3], nn.ReLU), None, (11, 3)),
    "no-bias": (lambda: mlp([3, 8, 6, 2], bias=False), None, (11, 3)),
    "last-layer-only": (lambda: mlp([3, 8, 6, 2]), ["4.weight", "4.bias"], (11, 3)),
    "weights-only": (lambda: mlp([3, 8, 6, 2], nn.GELU), ["0.weight", "4.weight"], (11, 3)),
    "biases-only": (lambda: mlp([3, 8, 6, 2]), ["0.bias", "2.bias"], (11, 3)),
    "nested-flatten-images": (
        lambda: nn.Sequential(
            nn.Flatten(),
            nn.Sequential(nn.Linear(12, 7), nn.SiLU(), nn.Dropout(0.5)),
            nn.Sequential(nn.Linear(7, 5, bias=False), nn.Softplus(), nn.Linear(5, 2)),
        ),
        None,
        (11, 2, 3, 2),
    ),
}


# Features kept per setup chunk (the CPU's default), or concatenated into chunks of at
# least 8 samples (as on a GPU, where chunks reach 65,536): 11 samples make one merged
# chunk of 8 and a ragged one of 3.
CHUNKS = {"setup-chunks": None, "merged-chunks": 8}


@pytest.fixture(
    params=[(name, chunks) for name in CASES for chunks in CHUNKS],
    ids=lambda param: "-".join(param),
    scope="module",
)
def case(request):
    name, chunks = request.param
    build, parameters, shape = CASES[name]
    torch.manual_seed(0)
    network = FunctionalNetwork(build(), parameters, dtype=DTYPE, device="cpu")
    X = torch.randn(*shape, dtype=DTYPE)
    X_test = torch.randn(5, *shape[1:], dtype=DTYPE)
    # batch_size 4 leaves a ragged last chunk.
    kernel = LayerwiseKernel(network, X, batch_size=4, chunk_rows=CHUNKS[chunks])
    return network, X, X_test, kernel, reference_jacobian(network, X)


def test_supported_cases(case):
    network, *_ = case
    assert supports_structured(network.module, network.names)


def test_outputs_and_shapes(case):
    network, X, _, kernel, J = case
    torch.testing.assert_close(kernel.outputs, network(network.theta, X))
    assert kernel.size == J.shape[0] == X.shape[0] * kernel.n_outputs
    rows = [chunk.n_rows for chunk in kernel._features]
    assert rows == ([4, 4, 3] if kernel.chunk_rows == 4 else [8, 3])


def test_dense_matches_jacobian(case):
    *_, kernel, J = case
    torch.testing.assert_close(kernel.dense(), J @ J.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("columns", [1, 3, 40])
def test_matmat(case, columns):
    """Both product paths (per layer, by Gram rows) and the one matmat picks."""
    *_, kernel, J = case
    U = torch.randn(
        kernel.size, columns, dtype=DTYPE, generator=torch.Generator().manual_seed(1)
    )
    expected = J @ (J.T @ U)
    for product in [kernel.matmat, kernel._matmat_by_layers, kernel._matmat_by_gram_rows]:
        torch.testing.assert_close(product(U), expected, rtol=1e-12, atol=1e-12)


def test_diagonal(case):
    *_, kernel, J = case
    torch.testing.assert_close(kernel.diagonal(), (J**2).sum(1), rtol=1e-12, atol=1e-12)


def test_columns(case):
    *_, kernel, J = case
    for index in (0, kernel.size // 2, kernel.size - 1):
        torch.testing.assert_close(
            kernel.column(index), J @ J[index], rtol=1e-12, atol=1e-12
        )


def test_cross_and_test_diagonal(case):
    network, _, X_test, kernel, J = case
    J_test = reference_jacobian(network, X_test)
    features = kernel.features(X_test)
    torch.testing.assert_close(kernel.cross(features), J @ J_test.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        kernel.diagonal(features), (J_test**2).sum(1), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        kernel.gram(features, features), J_test @ J_test.T, rtol=1e-12, atol=1e-12
    )


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, X):
        return self.linear(X)


def names(module):
    return [name for name, _ in module.named_parameters()]


@pytest.mark.parametrize(
    "module",
    [
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 1)),
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)),
        nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1)),
        nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=1), nn.Linear(4, 1)),
        nn.Sequential(nn.Linear(3, 4), nn.Flatten(), nn.Linear(4, 1)),
        Custom(),
        nn.Sequential(Custom()),
    ],
    ids=["cnn", "batchnorm", "layernorm", "softmax", "inner-flatten", "custom", "wrapped"],
)
def test_unsupported_networks(module):
    assert not supports_structured(module, names(module))


def test_unsupported_selections():
    shared = nn.Linear(4, 4)
    assert not supports_structured(
        nn.Sequential(nn.Linear(3, 4), shared, nn.Tanh(), shared), ["0.weight"]
    )
    prelu = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 1))
    assert supports_structured(prelu, ["0.weight", "2.weight"])
    assert not supports_structured(prelu, names(prelu))
    hooked = nn.Sequential(nn.Linear(3, 1))
    hooked[0].register_forward_hook(lambda module, inputs, output: 2 * output)
    assert not supports_structured(hooked, names(hooked))
    assert not supports_structured(nn.Sequential(nn.Linear(3, 1)), [])


def test_rejections():
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 1))
    with pytest.raises(ValueError, match="supports_structured"):
        LayerwiseKernel(
            FunctionalNetwork(conv, dtype=DTYPE, device="cpu"),
            torch.zeros(2, 1, 3, 6, dtype=DTYPE),
            batch_size=2,
        )
    network = FunctionalNetwork(mlp([3, 4, 1]), dtype=DTYPE, device="cpu")
    with pytest.raises(ValueError, match="one vector per sample"):
        LayerwiseKernel(network, torch.zeros(2, 5, 3, dtype=DTYPE), batch_size=2)
