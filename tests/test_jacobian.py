"""JacobianProducts (chunked JVP / VJP) against the explicit jacrev Jacobian."""

import pickle

import numpy as np
import pytest
import torch
from networks import (
    cnn,
    mlp,
    no_jvp_net,
    regression_data,
)
from reference import reference_jacobian, reference_posterior
from torch.func import jvp

from sklearn_fntk import FiniteNTKRegressor
from sklearn_fntk._inference.low_rank import _transposed_basis
from sklearn_fntk._linearize.jacobian import (
    EXPLICIT_MIN_COLUMNS,
    JacobianProducts,
    outputs_and_jvp,
)
from sklearn_fntk._linearize.layerwise import LayerwiseKernel
from sklearn_fntk._linearize.network import FunctionalNetwork

CACHED, UNCACHED = 1 << 30, 0
# Products by autograd, or from the layerwise kernel's per-layer features.
# (the features kept per setup chunk, as on the CPU, or merged by two, as on a GPU)
LAYERWISE = pytest.mark.parametrize(
    "layerwise",
    [False, "setup-chunks", "merged-chunks"],
    ids=["autograd", "layers", "merged"],
)
RTOL = 1e-10


def assert_close(actual, expected, rtol=RTOL):
    expected = np.asarray(expected)
    np.testing.assert_allclose(
        np.asarray(actual), expected, rtol=rtol, atol=rtol * np.abs(expected).max()
    )


def setup(module, X, parameters=None, batch_size=7, cache_bytes=UNCACHED, layerwise=False):
    """(JacobianProducts, reference outputs (n, k), reference J (n*k, p))."""
    network = FunctionalNetwork(module, parameters, dtype=torch.float64, device="cpu")
    X_tensor = torch.as_tensor(X)
    structured = None
    if layerwise:
        chunk_rows = 2 * batch_size if layerwise == "merged-chunks" else None
        structured = LayerwiseKernel(
            network, X_tensor, batch_size=batch_size, chunk_rows=chunk_rows
        )
    products = JacobianProducts(
        network,
        network.theta,
        X_tensor,
        batch_size=batch_size,
        cache_bytes=cache_bytes,
        structured=structured,
    )
    outputs, J = reference_jacobian(module, X, parameters)
    return products, outputs, J


def check_products(products, outputs, J, n_columns=4, seed=0):
    n, k = outputs.shape
    p = J.shape[1]
    assert (products.n_samples, products.n_outputs, products.n_params) == (n, k, p)
    assert_close(products.outputs, outputs)
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(p, generator=g, dtype=torch.float64)
    V = torch.randn(p, n_columns, generator=g, dtype=torch.float64)
    u = torch.randn(n, k, generator=g, dtype=torch.float64)
    U = torch.randn(n, k, n_columns, generator=g, dtype=torch.float64)

    Jv = products.jvp(v)
    assert Jv.shape == (n, k)
    assert_close(Jv, (J @ v).reshape(n, k))
    JV = products.jvp(V)
    assert JV.shape == (n, k, n_columns)
    assert_close(JV, (J @ V).reshape(n, k, n_columns))

    Jtu = products.vjp(u)
    assert Jtu.shape == (p,)
    assert_close(Jtu, J.T @ u.reshape(-1))
    JtU = products.vjp(U)
    assert JtU.shape == (p, n_columns)
    assert_close(JtU, J.T @ U.reshape(n * k, n_columns))
    # One column passed as a matrix is the same as the vector.
    assert_close(products.jvp(v[:, None])[..., 0], Jv)
    assert_close(products.vjp(u[..., None])[:, 0], Jtu)


@pytest.mark.parametrize("cache_bytes", [UNCACHED, CACHED], ids=["uncached", "cached"])
@pytest.mark.parametrize("batch_size", [7, 16, 64])
# 4 columns go through products, 2·EXPLICIT_MIN_COLUMNS (k = 2) through explicit blocks
@pytest.mark.parametrize("n_columns", [4, 2 * EXPLICIT_MIN_COLUMNS])
def test_mlp_products_match_explicit_jacobian(batch_size, cache_bytes, n_columns):
    X, _, _ = regression_data(n=30, n_outputs=2, seed=10)
    products, outputs, J = setup(mlp(n_out=2, seed=10), X, None, batch_size, cache_bytes)
    assert products.cached == (cache_bytes > 0)
    assert products.forward_mode
    assert len(products.chunks) == -(-30 // batch_size)
    assert products._explicit_is_cheaper(n_columns) == (n_columns > 4)
    check_products(products, outputs, J, n_columns=n_columns)


@pytest.mark.parametrize("cache_bytes", [UNCACHED, CACHED], ids=["uncached", "cached"])
def test_cnn_products_match_explicit_jacobian(cache_bytes):
    X, _, _ = regression_data(n=10, image=True, seed=11)
    products, outputs, J = setup(cnn(seed=11), X, None, 4, cache_bytes)
    assert products.cached == (cache_bytes > 0)
    check_products(products, outputs, J, n_columns=2)


@LAYERWISE
@pytest.mark.parametrize("cache_bytes", [UNCACHED, CACHED], ids=["uncached", "cached"])
def test_parameter_subset_products(cache_bytes, layerwise):
    X, _, _ = regression_data(n=20, n_outputs=3, seed=12)
    names = ["0.bias", "2.weight"]
    module = mlp(n_out=3, seed=12)
    products, outputs, J = setup(module, X, names, 6, cache_bytes, layerwise)
    assert J.shape[1] == 12 + 3 * 12
    check_products(products, outputs, J)


@pytest.mark.parametrize("batch_size", [7, 16, 64])
# 4 columns through the features' products, 2·EXPLICIT_MIN_COLUMNS (k = 2) through
# explicit blocks built from them
@pytest.mark.parametrize("n_columns", [1, 4, 2 * EXPLICIT_MIN_COLUMNS])
@pytest.mark.parametrize("chunks", ["setup-chunks", "merged-chunks"])
def test_layerwise_products_match_explicit_jacobian(batch_size, n_columns, chunks):
    X, _, _ = regression_data(n=30, n_outputs=2, seed=10)
    module = mlp(n_out=2, seed=10)
    products, outputs, J = setup(module, X, None, batch_size, layerwise=chunks)
    assert products.cached and products.cached_bytes > 0
    assert products._explicit_is_cheaper(n_columns) == (n_columns > 4)
    check_products(products, outputs, J, n_columns=n_columns)


@LAYERWISE
def test_explicit_jacobian_blocks_and_outputs_and_jvp(layerwise):
    X, _, _ = regression_data(n=23, n_outputs=2, seed=13)
    products, outputs, J = setup(mlp(n_out=2, seed=13), X, None, 5, layerwise=layerwise)
    n, k = outputs.shape
    # a block is valid until the next is yielded (one buffer): copies kept
    blocks = [block.clone() for _, block in products.jacobian_blocks()]
    # blocks of the 5-sample setup chunks, or of the 10-sample merged ones
    merged = layerwise == "merged-chunks"
    assert [b.shape[0] for b in blocks] == ([10, 10, 3] if merged else [5, 5, 5, 5, 3])
    assert_close(torch.cat(blocks).reshape(n * k, -1), J)
    V = torch.randn(J.shape[1], 3, dtype=torch.float64)
    for forward_mode in (True, False):
        f, JV = outputs_and_jvp(
            products.network, products.w, torch.as_tensor(X), V, forward_mode
        )
        assert_close(f, outputs)
        assert_close(JV, (J @ V).reshape(n, k, 3))


def test_cached_products_survive_pickling():
    X, _, _ = regression_data(n=20, n_outputs=2, seed=14)
    products, outputs, J = setup(mlp(n_out=2, seed=14), X, None, 8, CACHED)
    clone = pickle.loads(pickle.dumps(products))
    assert clone.cached
    check_products(clone, outputs, J, seed=1)


def test_finite_difference_fisher_product():
    """Maddox et al.'s product: JᵀJ v up to O(√eps) in float64."""
    X, _, _ = regression_data(n=20, n_outputs=2, seed=15)
    products, _, J = setup(mlp(n_out=2, seed=15), X, None, 8)
    V = torch.randn(J.shape[1], 3, dtype=torch.float64)
    assert_close(products.fisher_product_fd(V), J.T @ (J @ V), rtol=1e-5)


@LAYERWISE
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("n_samples", [9, 23])
def test_subsample_is_a_rescaled_random_subset_of_the_rows(weighted, n_samples, layerwise):
    """(n/m)·Σ_(i∈S) J_iᵀJ_i over m distinct random samples S (times their weights);
    all n samples give the Fisher itself."""
    X, _, _ = regression_data(n=23, n_outputs=2, seed=16)
    products, _, J = setup(mlp(n_out=2, seed=16), X, None, 5, layerwise=layerwise)
    n, k = 23, 2
    weights = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    if weighted:
        products.row_scale = weights.sqrt()
        J = J * weights.sqrt().repeat_interleave(k)[:, None]
    drawn, sub = products.subsample(n_samples, torch.Generator().manual_seed(0))
    assert (sub.structured is not None) == bool(layerwise)
    assert sub.n_samples == n_samples and sub.batch_size == products.batch_size
    assert len(set(drawn.tolist())) == n_samples and bool((drawn.diff() > 0).all())
    assert_close(sub.X, X[drawn.numpy()])
    rows = torch.tensor([i * k + a for i in drawn.tolist() for a in range(k)])
    expected = (n / n_samples) * J[rows].T @ J[rows]
    V = torch.randn(J.shape[1], 2 * EXPLICIT_MIN_COLUMNS, dtype=torch.float64)
    assert_close(sub.fisher_product(V), expected @ V)  # explicit blocks
    assert_close(sub.fisher_product(V[:, :2]), expected @ V[:, :2])  # JVP + VJP
    if n_samples == n:
        assert_close(expected, J.T @ J)


# -- networks without forward-mode rules: the double-VJP fallback ---------------------


def test_custom_function_has_no_forward_mode():
    """Guard: torch.func.jvp really fails on the network the fallback tests use."""
    net = no_jvp_net().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(NotImplementedError):
        jvp(net, (x,), (x,))


@pytest.mark.parametrize("cache_bytes", [UNCACHED, CACHED], ids=["uncached", "cached"])
@pytest.mark.parametrize("batch_size", [7, 64])
def test_double_vjp_fallback_matches_explicit_jacobian(batch_size, cache_bytes):
    X, _, _ = regression_data(n=30, n_outputs=2, seed=16)
    products, outputs, J = setup(no_jvp_net(seed=16), X, None, batch_size, cache_bytes)
    assert products.forward_mode is False
    assert products.cached == (cache_bytes > 0)
    check_products(products, outputs, J)
    f, JV = outputs_and_jvp(
        products.network, products.w, torch.as_tensor(X), J.new_ones(J.shape[1], 2), False
    )
    assert_close(f, outputs)
    assert_close(JV, (J @ J.new_ones(J.shape[1], 2)).reshape(*outputs.shape, 2))


@pytest.mark.parametrize(
    "space, solver",
    [
        ("function", "dense"),
        ("parameter", "dense"),
        ("function", "cg"),
        ("parameter", "cg"),
    ],
)
def test_regressor_without_forward_mode_matches_reference(space, solver):
    X, Y, X_test = regression_data(n=30, m=8, n_outputs=2, seed=17)
    net = no_jvp_net(seed=17)
    params = dict(
        noise=0.1, prior=0.5, space=space, solver=solver, tol=1e-12, batch_size=16
    )
    if solver == "cg":
        params.update(preconditioner=None, variance="exact")
    est = FiniteNTKRegressor(net, **params).fit(X, Y)
    assert est.forward_mode_ is False
    ref = reference_posterior(net, X, Y, X_test, noise=0.1, prior=0.5)
    mean, std = est.predict(X_test, return_std=True)
    assert_close(mean, ref.mean, rtol=1e-6)
    assert_close(std, ref.std, rtol=1e-5)
    np.testing.assert_allclose(est.log_marginal_likelihood(), ref.lml, rtol=1e-6)


def test_regressor_with_forward_mode_reports_it():
    X, Y, _ = regression_data(n=10, seed=18)
    est = FiniteNTKRegressor(mlp(seed=18), noise=0.1).fit(X, Y[:, 0])
    assert est.forward_mode_ is True


@pytest.mark.parametrize("block_rows", [7, 10**6], ids=["blockwise", "one-qr"])
def test_transposed_basis_projects_onto_the_range_of_J_U(block_rows):
    """Jᵀ Q for an orthonormal basis Q of range(J U), orthonormalised block by block
    in place (or by one QR): C Cᵀ = Jᵀ P J, P the projector onto range(J U)."""
    X, _, _ = regression_data(n=40, n_outputs=2, seed=17)
    products, _, J = setup(mlp(n_out=2, seed=17), X, None, 16)
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(J.shape[1], 6, generator=g, dtype=torch.float64)).Q
    C = _transposed_basis(products, U, block_rows=block_rows)
    W = J @ U
    projector = W @ torch.linalg.pinv(W)
    assert_close(C @ C.T, J.T @ projector @ J)
