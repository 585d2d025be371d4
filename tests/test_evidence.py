"""SpectralEvidence and the stochastic log evidence against dense float64 references.

The references factorise K = s·G + σ² I itself (Cholesky, slogdet) or take the SVD
of an explicit J (no Gram matrix is squared); Jacobians of small MLPs are built with
``torch.func.jacrev`` per sample, independently of the package.
"""

import math

import numpy as np
import pytest
import torch
from conftest import TEST_DEVICE
from torch.func import functional_call, jacrev, vmap

from sklearn_fntk._inference.evidence import LanczosSpectrum, SpectralEvidence
from sklearn_fntk._inference.hyperparameters import maximize_evidence
from sklearn_fntk._inference.stochastic_evidence import stochastic_log_marginal_likelihood
from sklearn_fntk._linalg.lanczos import (
    Lanczos,
    lanczos,
    quadrature,
    rademacher,
    stochastic_log_det,
)

NOISES = np.array([1e-2, 1e-1, 1.0, 10.0])
PRIORS = np.array([0.1, 1.0, 10.0])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Dense eigensolvers slow down by 10-20x when OpenMP threads oversubscribe a
    loaded machine; these tests are timed on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


BOUNDS = ((1e-8, 1e5), (1e-8, 1e5))


def random_jacobian(n, p, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=generator, dtype=torch.float64) / math.sqrt(p)


def mlp_jacobian(n, n_features, hidden, seed):
    """Inputs X (n, n_features) and the Jacobian (n, p) of a tanh MLP at its init."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(n_features, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, 1),
    ).double()
    params = {name: t.detach() for name, t in net.named_parameters()}
    X = torch.randn(n, n_features, dtype=torch.float64)

    def single(p, x):
        return functional_call(net, p, (x[None],)).reshape(-1)

    jac = vmap(jacrev(single), in_dims=(None, 0))(params, X)
    return torch.cat([jac[name].reshape(n, -1) for name in params], dim=1)


def dense_lml(G, r, noise, prior):
    """log p(y) from the Cholesky factor of K = s·G + σ² I."""
    K = prior * G + noise * torch.eye(G.shape[0], dtype=torch.float64)
    L = torch.linalg.cholesky(K)
    alpha = torch.cholesky_solve(r[:, None], L)[:, 0]
    log_det = torch.linalg.slogdet(K)[1]
    return float(-0.5 * r @ alpha - 0.5 * log_det - 0.5 * r.numel() * math.log(2 * math.pi))


def svd_lml(J, r, noise, prior):
    """log p(y) from the full SVD of J: G's eigenvalues are S² and exact zeros."""
    d = J.shape[0]
    U, S, _ = torch.linalg.svd(J, full_matrices=True)
    g = torch.zeros(d, dtype=torch.float64)
    g[: S.numel()] = S**2
    D = prior * g + noise
    z = U.T @ r
    return float(
        -0.5 * (z**2 / D).sum() - 0.5 * D.log().sum() - 0.5 * d * math.log(2 * math.pi)
    )


# (n, p): full-rank G, low-rank G (p << n), and p < n near the function/parameter switch
SHAPES = [(150, 300), (200, 20), (120, 90)]


@pytest.mark.parametrize("n, p", SHAPES)
def test_lml_matches_dense_cholesky_on_a_grid(n, p):
    J = random_jacobian(n, p, seed=n + p)
    r = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    G = J @ J.T
    noise, prior = np.meshgrid(NOISES, PRIORS, indexing="ij")  # (4, 3)
    expected = np.array(
        [dense_lml(G, r, a, b) for a, b in zip(noise.ravel(), prior.ravel(), strict=True)]
    ).reshape(noise.shape)
    # from_fisher also for p > n: F's p - n zero eigenvalues are not G's
    evidences = [
        SpectralEvidence.from_kernel(G, r),
        SpectralEvidence.from_fisher(J.T @ J, J.T @ r, r @ r, n),
    ]
    assert evidences[1].n_null == max(n - p, 0)
    for evidence in evidences:
        # vectorised: (4, 1) against (1, 3) broadcasts to the (4, 3) grid
        lml = evidence.log_marginal_likelihood(NOISES[:, None], PRIORS[None, :])
        assert lml.shape == (4, 3)
        np.testing.assert_allclose(lml, expected, rtol=1e-10)


@pytest.mark.parametrize("n, p", [(200, 20), (150, 149)])
def test_rank_deficient_kernel_with_tiny_noise_matches_svd(n, p):
    # cond(K) reaches 1e9 here: Cholesky of K loses ~7 digits, the SVD of J does not;
    # G's zero eigenvalues must count as exact zeros (σ² alone), not rounding noise.
    J = random_jacobian(n, p, seed=3)
    r = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    from_kernel = SpectralEvidence.from_kernel(J @ J.T, r)
    from_fisher = SpectralEvidence.from_fisher(J.T @ J, J.T @ r, r @ r, n)
    assert from_fisher.n_null == n - p
    for noise, prior in [(1e-6, 1.0), (1e-6, 1e3), (1e-3, 1e3)]:
        expected = svd_lml(J, r, noise, prior)
        for evidence in (from_kernel, from_fisher):
            value = evidence.log_marginal_likelihood(noise, prior)
            assert value == pytest.approx(expected, rel=1e-10)


def test_multi_output_residuals_are_flattened_row_major():
    n, k, p = 40, 3, 70
    J = random_jacobian(n * k, p, seed=5)  # rows i*k + a
    R = torch.randn(n, k, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    evidence = SpectralEvidence.from_kernel(J @ J.T, R)
    expected = dense_lml(J @ J.T, R.reshape(-1), 0.3, 2.0)
    assert evidence.size == n * k
    assert evidence.log_marginal_likelihood(0.3, 2.0) == pytest.approx(expected, rel=1e-10)


def test_scalar_and_array_return_types():
    J = random_jacobian(30, 10, seed=7)
    r = torch.ones(30, dtype=torch.float64)
    evidence = SpectralEvidence.from_kernel(J @ J.T, r)
    value, gradient = evidence.log_marginal_likelihood(0.1, 1.0, eval_gradient=True)
    assert isinstance(value, float) and gradient.shape == (2,)
    values, gradients = evidence.log_marginal_likelihood(
        [0.1, 0.2], 1.0, eval_gradient=True
    )
    assert values.shape == (2,) and gradients.shape == (2, 2)
    assert values[0] == value
    with pytest.raises(ValueError, match="positive"):
        evidence.log_marginal_likelihood(0.0, 1.0)


@pytest.mark.parametrize("n, p", SHAPES)
def test_gradient_matches_central_differences(n, p):
    J = random_jacobian(n, p, seed=8)
    r = torch.randn(n, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    evidence = (
        SpectralEvidence.from_fisher(J.T @ J, J.T @ r, r @ r, n)
        if p < n
        else SpectralEvidence.from_kernel(J @ J.T, r)
    )
    log_noise, log_prior = np.log([0.05, 0.3, 2.0]), np.log([0.5, 1.0, 4.0])
    _, gradient = evidence.log_marginal_likelihood(
        np.exp(log_noise), np.exp(log_prior), eval_gradient=True
    )
    h = 1e-5

    def lml(a, b):
        return evidence.log_marginal_likelihood(np.exp(a), np.exp(b))

    d_noise = (lml(log_noise + h, log_prior) - lml(log_noise - h, log_prior)) / (2 * h)
    d_prior = (lml(log_noise, log_prior + h) - lml(log_noise, log_prior - h)) / (2 * h)
    np.testing.assert_allclose(gradient[:, 0], d_noise, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gradient[:, 1], d_prior, rtol=1e-6, atol=1e-6)


def test_posterior_mean_coefficients_match_direct_solves():
    n, p = 80, 50
    J = random_jacobian(n, p, seed=10)
    r = torch.randn(n, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    noise, prior = np.array([0.01, 0.5, 3.0]), np.array([2.0, 1.0, 0.1])
    alpha = SpectralEvidence.from_kernel(J @ J.T, r).posterior_mean_coefficients(
        noise, prior
    )
    delta = SpectralEvidence.from_fisher(
        J.T @ J, J.T @ r, r @ r, n
    ).posterior_mean_coefficients(noise, prior)
    assert alpha.shape == (n, 3) and delta.shape == (p, 3)
    for i, (a, b) in enumerate(zip(noise, prior, strict=True)):
        K = b * J @ J.T + a * torch.eye(n, dtype=torch.float64)
        expected_alpha = torch.linalg.solve(K, r)  # K⁻¹ r
        # δ = (JᵀJ + σ²/s I)⁻¹ Jᵀ r = s·Jᵀ K⁻¹ r
        A = J.T @ J + (a / b) * torch.eye(p, dtype=torch.float64)
        expected_delta = torch.linalg.solve(A, J.T @ r)
        np.testing.assert_allclose(alpha[:, i], expected_alpha.numpy(), rtol=1e-9)
        np.testing.assert_allclose(delta[:, i], expected_delta.numpy(), rtol=1e-9)
        np.testing.assert_allclose(
            delta[:, i], (b * J.T @ expected_alpha).numpy(), rtol=1e-8
        )


def test_maximize_recovers_the_noise_of_an_ntk_draw():
    # y - m(X) = J w + ε with w ~ N(0, s·I), ε ~ N(0, σ² I): exactly the model
    # n = 600 against p = 229: over 10 draws the estimate was off by 10% at most
    n, noise, prior = 600, 0.05, 2.0
    J = mlp_jacobian(n, n_features=4, hidden=12, seed=0)  # p = 229 < n
    generator = torch.Generator().manual_seed(12)
    w = math.sqrt(prior) * torch.randn(J.shape[1], generator=generator, dtype=torch.float64)
    eps = math.sqrt(noise) * torch.randn(n, generator=generator, dtype=torch.float64)
    r = J @ w + eps
    function_space = SpectralEvidence.from_kernel(J @ J.T, r)
    parameter_space = SpectralEvidence.from_fisher(J.T @ J, J.T @ r, r @ r, n)
    best = maximize_evidence(function_space, (1.0, 1.0), bounds=BOUNDS)
    assert best.converged
    assert best.noise == pytest.approx(noise, rel=0.2)
    truth = function_space.log_marginal_likelihood(noise, prior)
    assert best.log_marginal_likelihood >= truth
    # an interior optimum: the gradient vanishes there
    _, gradient = function_space.log_marginal_likelihood(
        best.noise, best.prior, eval_gradient=True
    )
    np.testing.assert_allclose(gradient, 0.0, atol=1e-3)
    other = maximize_evidence(parameter_space, (1.0, 1.0), bounds=BOUNDS)
    assert other.noise == pytest.approx(best.noise, rel=1e-4)
    assert other.prior == pytest.approx(best.prior, rel=1e-4)


def test_maximize_respects_bounds():
    J = random_jacobian(60, 20, seed=13)
    r = J @ torch.randn(20, dtype=torch.float64) + 0.1 * torch.randn(
        60, dtype=torch.float64
    )
    evidence = SpectralEvidence.from_kernel(J @ J.T, r)
    best = maximize_evidence(
        evidence, (1.0, 1.0), bounds=((0.5, 2.0), (1e-3, 1e3)), n_restarts=1
    )
    assert best.noise == pytest.approx(0.5)  # the true 0.01 lies below the bound


def test_slq_is_exact_on_a_diagonal_kernel_with_few_eigenvalues():
    # Hutchinson is exact for diagonal log K with ±1 probes, and Lanczos reaches an
    # invariant subspace after 4 steps (4 distinct eigenvalues): breakdown is handled.
    diagonal = torch.tensor([0.5, 1.0, 2.0, 5.0], dtype=torch.float64).repeat(25)
    r = torch.linspace(-1.0, 1.0, 100, dtype=torch.float64)
    result = stochastic_log_marginal_likelihood(
        lambda V: diagonal[:, None] * V,
        r,
        100,
        0.5,
        n_probes=4,
        lanczos_steps=20,
        tol=1e-12,
        generator=torch.Generator().manual_seed(0),
    )
    log_det = float(diagonal.log().sum())
    quadratic = float((r**2 / diagonal).sum())
    assert result.log_det == pytest.approx(log_det, rel=1e-10)
    assert result.log_det_std_error == pytest.approx(0.0, abs=1e-8)
    assert result.quadratic == pytest.approx(quadratic, rel=1e-10)
    expected = -0.5 * quadratic - 0.5 * log_det - 50 * math.log(2 * math.pi)
    assert result.log_marginal_likelihood == pytest.approx(expected, rel=1e-10)


def test_slq_matches_exact_lml_at_n_2000():
    n, noise, prior = 2000, 0.01, 1.0
    J = mlp_jacobian(n, n_features=5, hidden=24, seed=1)  # p = 769
    generator = torch.Generator().manual_seed(14)
    w = math.sqrt(prior) * torch.randn(J.shape[1], generator=generator, dtype=torch.float64)
    r = J @ w + math.sqrt(noise) * torch.randn(n, generator=generator, dtype=torch.float64)
    exact = dense_lml(J @ J.T, r, noise, prior)
    K_log_det = float(
        torch.linalg.slogdet(prior * J @ J.T + noise * torch.eye(n, dtype=torch.float64))[1]
    )

    def matmat(V):  # K V = s·J(JᵀV) + σ² V
        return prior * (J @ (J.T @ V)) + noise * V

    result = stochastic_log_marginal_likelihood(
        matmat,
        r,
        n,
        noise,
        n_probes=64,
        lanczos_steps=50,
        generator=torch.Generator().manual_seed(0),
    )
    assert result.log_marginal_likelihood == pytest.approx(exact, rel=0.01)
    # the reported standard error describes the log-det error
    assert abs(result.log_det - K_log_det) < 4 * result.log_det_std_error
    assert 0 < result.log_det_std_error < 0.01 * abs(K_log_det)


def test_slq_validates_its_arguments():
    r = torch.ones(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="size"):
        stochastic_log_marginal_likelihood(lambda V: V, r, 6, 1.0)
    with pytest.raises(ValueError, match="n_probes"):
        stochastic_log_marginal_likelihood(lambda V: V, r, 5, 1.0, n_probes=1)


def test_float32_lanczos_quadrature_resolves_a_wide_spectrum():
    # A Fisher's spectrum spans many decades. In float32 the Lanczos recurrence must
    # not call a step a breakdown while its residual is far above rounding: it once
    # stopped at β ≤ d·ε·‖K‖ (here 2.4e-4 of the top), after a fraction of the
    # steps, and the evidence's optimum moved with it (prior 0.25 against 45 in
    # float64 at n = 20,000, p = 4801). Float32 must give float64's quadrature.
    d, c, steps = 2000, 1.0, 200
    # a few large eigenvalues over a wide bulk, as in a Fisher
    top = torch.logspace(3, 6, 50, dtype=torch.float64)
    eigenvalues = torch.cat([top, torch.logspace(-2, 2, d - 50, dtype=torch.float64)])
    probes = rademacher(d, 4, dtype=torch.float64, device="cpu",
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    estimates = {}
    for dtype in (torch.float64, torch.float32):
        K = eigenvalues.to(dtype)
        product = lambda V, K=K: K[:, None] * V  # noqa: E731
        *_, lengths = lanczos(product, probes.to(dtype) / d**0.5, steps)
        assert lengths.tolist() == [steps] * 4
        rules = quadrature(product, probes.to(dtype), steps)
        estimates[dtype] = torch.tensor(
            [d * (w.double() * torch.log(nodes.double() + c)).sum() for nodes, w in rules]
        )
    torch.testing.assert_close(
        estimates[torch.float32], estimates[torch.float64], rtol=1e-3, atol=0
    )


def test_lanczos_evidence_is_evaluated_in_float64_on_the_cpu():
    # Whatever the dtype and device of the products. The parameter-space weights were
    # kept on the products' device: on CUDA evaluating the evidence then mixed
    # devices and failed (SKLEARN_FNTK_TEST_DEVICE=cuda runs this there). J has
    # orthogonal columns, so that F = JᵀJ is diagonal: ±1 probes and 12 Lanczos
    # steps make the quadrature exact, whichever device draws the probes.
    generator = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(60, 12, generator=generator, dtype=torch.float64))[0]
    J = Q * torch.linspace(0.5, 3.0, 12, dtype=torch.float64)
    r = torch.linspace(-1.0, 1.0, 60, dtype=torch.float64)
    J32, r32 = J.to(TEST_DEVICE, torch.float32), r.to(TEST_DEVICE, torch.float32)
    options = dict(
        quadratic_steps=12,
        log_det_steps=12,
        n_probes=4,
        generator=torch.Generator(device=TEST_DEVICE).manual_seed(0),
    )
    evidence = LanczosSpectrum(
        lambda V: J32.T @ (J32 @ V),
        J32.T @ r32,
        space="parameter",
        size=60,
        residual_sq_norm=float(r32 @ r32),
        options=options,
    ).evidence()
    tensors = [value for value in vars(evidence).values() if torch.is_tensor(value)]
    assert len(tensors) >= 5
    assert all(t.dtype == torch.float64 and t.device.type == "cpu" for t in tensors)
    exact = dense_lml(J @ J.T, r, 0.1, 2.0)
    assert evidence.log_marginal_likelihood(0.1, 2.0) == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("steps", [3, 8, 30])
def test_gauss_and_radau_quadratures_bracket_the_evidence_terms(steps):
    # On a positive semi-definite A with a wide spectrum: for f(λ) = s/(s·λ + σ²)
    # Gauss from below and Gauss-Radau (a node at 0) from above, for
    # f(λ) = log(s·λ + σ²) the other way round; equal once Lanczos reaches an
    # invariant space (30 steps: the 30 distinct eigenvalues).
    eigenvalues = torch.logspace(-3, 3, 30, dtype=torch.float64)
    b = torch.linspace(0.5, 1.5, 30, dtype=torch.float64)
    ((gauss, radau),) = quadrature(
        lambda V: eigenvalues[:, None] * V, b[:, None], steps, radau=True
    )
    terms = [  # (f(λ; σ², s), +1 where Gauss is the lower bound)
        (lambda x, noise, prior: prior / (prior * x + noise), 1),
        (lambda x, noise, prior: (prior * x + noise).log(), -1),
    ]
    for noise, prior in [(1e-2, 1.0), (1e-4, 10.0)]:
        for f, sign in terms:
            exact = float((b**2 * f(eigenvalues, noise, prior)).sum())
            low, high = (
                float((b @ b) * (w * f(nodes, noise, prior)).sum())
                for nodes, w in (gauss, radau)
            )
            low, high = (low, high) if sign > 0 else (high, low)
            if steps < 30:
                assert low < exact - 1e-6 * abs(exact) and high > exact + 1e-6 * abs(exact)
            else:
                assert low == pytest.approx(exact, rel=1e-10)
                assert high == pytest.approx(exact, rel=1e-10)


def test_lanczos_resumes_where_it_stopped():
    # Extended in pieces, the run is the run of all the steps at once, bit for bit,
    # also for a column whose Krylov space becomes invariant (5 eigenvectors) before
    # the pieces end, and up to the order.
    generator = torch.Generator().manual_seed(4)
    d = 40
    eigenvalues = torch.logspace(-3, 3, d, dtype=torch.float64)
    Q = torch.randn(d, 2, generator=generator, dtype=torch.float64)
    Q[5:, 1] = 0.0
    Q = Q / torch.linalg.vector_norm(Q, dim=0)
    product = lambda V: eigenvalues[:, None] * V  # noqa: E731
    for pieces in ([3, 4, 30], [1, 2, 7, d + 3]):
        whole = Lanczos(product, Q).extend(pieces[-1])
        run = Lanczos(product, Q)
        for steps in pieces:
            run.extend(steps)
        assert run.steps == whole.steps == min(pieces[-1], d)
        assert run.lengths.tolist() == whole.lengths.tolist() == [run.steps, 5]
        assert torch.equal(run.alpha, whole.alpha) and torch.equal(run.beta, whole.beta)
    assert run.exhausted and not Lanczos(product, Q).extend(10).exhausted


def spectrum_options(**changes):
    options = dict(
        quadratic_steps=2, log_det_steps=2, n_probes=4, gap_nats=1.0, max_growth=64,
        basis_bytes=1 << 30, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    return {**options, **changes}


def wide_spectrum_problem():
    """F = JᵀJ diagonal over 6 decades (p = 60), and Jᵀr."""
    p = 60
    f = torch.logspace(-2, 4, p, dtype=torch.float64)
    Jt_r = torch.linspace(0.5, 2.0, p, dtype=torch.float64) * f.sqrt()
    return (lambda V: f[:, None] * V), Jt_r, dict(size=500, residual_sq_norm=900.0)


def test_lanczos_spectrum_grows_until_resolved_at_the_optimum():
    # From 2 steps, each term whose Gauss and Gauss-Radau rules differ by more than
    # half a nat at the optimum doubles its steps; at the end the evidence there is
    # within the gap of the same probes' exact quadrature (all p steps), and the
    # gap bounds its error.
    product, Jt_r, sizes = wide_spectrum_problem()
    noise, prior = 0.3, 20.0
    spectrum = LanczosSpectrum(
        product, Jt_r, space="parameter", options=spectrum_options(), **sizes
    )
    first_gaps = spectrum.evidence().quadrature_gaps(noise, prior)
    assert min(first_gaps) > 1.0
    evidence = spectrum.converge(lambda e: (noise, prior), spectrum_options())
    quadratic_steps, log_det_steps = spectrum.steps
    assert {quadratic_steps, log_det_steps} <= {4, 8, 16, 32, 60}
    assert max(evidence.quadrature_gaps(noise, prior)) <= 0.5
    exact = LanczosSpectrum(
        product, Jt_r, space="parameter", options=spectrum_options(
            quadratic_steps=60, log_det_steps=60), **sizes
    ).evidence()  # fmt: skip
    error = abs(evidence.log_marginal_likelihood(noise, prior) -
                exact.log_marginal_likelihood(noise, prior))  # fmt: skip
    assert error <= evidence.quadrature_gap(noise, prior) + 1e-9


@pytest.mark.parametrize(
    "limit, steps",
    [(dict(max_growth=4), (8, 8)), (dict(basis_bytes=4 * 60 * 8 * 6), (16, 6))],
)
def test_lanczos_spectrum_growth_stops_at_its_limits(limit, steps):
    # max_growth times the first steps; bases of at most basis_bytes (6 steps of 4
    # probes of order 60 in float64, 24 of the one quadratic column, capped at 16
    # by max_growth's default here).
    product, Jt_r, sizes = wide_spectrum_problem()
    options = spectrum_options(**{"max_growth": 8, **limit})
    spectrum = LanczosSpectrum(product, Jt_r, space="parameter", options=options, **sizes)
    spectrum.converge(lambda e: (0.3, 20.0), options)
    assert spectrum.steps == steps


@pytest.mark.parametrize("usable, steps", [(math.inf, (16, 16)), (0.0, (2, 2))])
def test_lanczos_spectrum_growth_stays_within_the_memory_left(usable, steps):
    # Each doubling asks how many bytes a new allocation may take (the memory
    # guard's share of what is available): unlimited, the limits above stop it;
    # with none left, no run grows.
    product, Jt_r, sizes = wide_spectrum_problem()
    options = spectrum_options(max_growth=8)
    asked = []
    spectrum = LanczosSpectrum(
        product, Jt_r, space="parameter", options=options,
        usable=lambda: asked.append(1) or usable, **sizes,
    )  # fmt: skip
    spectrum.converge(lambda e: (0.3, 20.0), options)
    assert spectrum.steps == steps
    assert len(asked) >= 1 + (usable > 0) * 3  # once per doubling and the last look


def test_stochastic_log_det_brackets_and_grows():
    # A = I + diag(f), f over 6 decades: for Rademacher probes zᵀ log(A) z = log|A|
    # exactly, so the quadratures' errors are the steps' alone. Each probe's Gauss
    # rule of log is an upper bound and its Gauss-Radau rule with a node at 1 (the
    # floor) a lower one; with a gap of 0.5 the steps double from 2 until the two
    # are that close, and the estimate is within it.
    f = torch.logspace(-3, 3, 80, dtype=torch.float64)
    exact = float(torch.log1p(f).sum())
    options = dict(dtype=torch.float64, device="cpu", n_probes=4)

    def estimate(**growth):
        return stochastic_log_det(
            lambda V: V + f[:, None] * V, 80, 1.0, steps=2,
            generator=torch.Generator().manual_seed(0), **options, **growth,
        )  # fmt: skip

    fixed = estimate()
    assert fixed.steps == 2 and fixed.log_det > exact
    assert fixed.quadrature_gap > fixed.log_det - exact > 1.0
    grown = estimate(gap=0.5, max_steps=80)
    assert grown.steps in (4, 8, 16, 32, 64, 80)
    assert grown.quadrature_gap <= 0.5
    assert 0 <= grown.log_det - exact <= grown.quadrature_gap + 1e-9
    capped = estimate(gap=0.5, max_steps=5)
    assert capped.steps == 5 and capped.quadrature_gap > 0.5


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_lanczos_evidence_ignores_rounding_level_ritz_values(seed):
    # F = JᵀJ of rank 40 < p = 120. Past its rank, a float32 Lanczos run from Jᵀr
    # finds Ritz values of F's null space at rounding level (here one negative, so
    # clamped to 0) with rounding-level weights; eq. (2) divided by s·0 + σ², and
    # rᵀK⁻¹r·σ² came out at -112 and -48 for σ² = 1e-10 (exact: ‖r_⊥‖² = 270 and
    # 295), which sent the noise search to its lower bound on real data. Such nodes
    # are dropped from the parameter-space quadratic term.
    generator = torch.Generator().manual_seed(seed)
    J = torch.randn(300, 40, generator=generator, dtype=torch.float64) @ torch.randn(
        40, 120, generator=generator, dtype=torch.float64
    )
    J = J * torch.logspace(0, -3, 120, dtype=torch.float64)
    r = torch.randn(300, generator=generator, dtype=torch.float64)
    J32, r32 = J.float(), r.float()
    options = dict(
        quadratic_steps=120, log_det_steps=10, n_probes=2,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    evidence = LanczosSpectrum(
        lambda V: J32.T @ (J32 @ V), J32.T @ r32, space="parameter", size=300,
        residual_sq_norm=float(r32 @ r32), options=options,
    ).evidence()  # fmt: skip
    noise = torch.tensor([1e-10], dtype=torch.float64)
    quadratic = float(evidence._terms(noise, torch.ones_like(noise))[0]) * 1e-10
    r_perp = r - J @ torch.linalg.lstsq(J, r[:, None]).solution[:, 0]
    assert quadratic == pytest.approx(float(r_perp @ r_perp), rel=1e-5)
    # past its resolvable spectrum the run counts as resolved: its Gauss-Radau rule
    # needs Ritz values above 0, and was made of those weights alone (1.9e12 and
    # 1.7e12 nats)
    assert evidence.quadrature_gaps(1e-10, 1.0)[0] == 0.0


@pytest.mark.parametrize("seed", [0, 5])
def test_float32_fisher_evidence_never_undercuts_the_data_fit(seed):
    # J's singular values span 1 to 1e-6: F = JᵀJ, formed in float32, has its
    # eigenvalues below about ε₃₂·λ_max at rounding level, and eq. (2) took
    # c_i²/f_i from them: at σ² = 1e-10, rᵀK⁻¹r·σ² came out at 186 and 213 against
    # the exact 213 and 216 (other seeds too high; low is what inflates the
    # evidence at small noise). Dropped, those directions count as null, so the
    # term can only exceed the exact one.
    generator = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(300, 120, generator=generator, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(120, 120, generator=generator, dtype=torch.float64))[0]
    J = U * torch.logspace(0, -6, 120, dtype=torch.float64) @ V.T
    r = torch.randn(300, generator=generator, dtype=torch.float64)
    J32, r32 = J.float(), r.float()
    noise = torch.tensor([1e-10], dtype=torch.float64)
    exact, rounded = (
        float(evidence._terms(noise, torch.ones_like(noise))[0]) * 1e-10
        for evidence in (
            SpectralEvidence.from_fisher(J.T @ J, J.T @ r, float(r @ r), 300),
            SpectralEvidence.from_fisher(J32.T @ J32, J32.T @ r32, float(r32 @ r32), 300),
        )
    )
    assert rounded >= exact * (1 - 1e-4)


def test_float32_parameter_space_evidence_on_a_digits_cnn():
    # A CNN (p = 793) on 1400 digits, noise and prior "auto": the dense solver in
    # parameter space. In float32 the evidence ran to noise 3e-11 (the edge of its
    # search) and the factor then failed; float32 cannot resolve float64's optimum
    # (condition number 1e7 there), and now stops short of it, with the warning.
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning

    from sklearn_fntk import FiniteNTKRegressor

    digits = load_digits()
    X, y = digits.images[:1400, None] / 16.0, digits.target[:1400] / 9.0

    def fit(dtype):
        torch.manual_seed(0)
        network = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3), torch.nn.Tanh(), torch.nn.Conv2d(8, 8, 3),
            torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 1),
        )  # fmt: skip
        return FiniteNTKRegressor(network, dtype=dtype).fit(X, y)

    reference = fit("float64")
    ill_conditioned = "too ill-conditioned for float32"
    with pytest.warns(ConvergenceWarning, match=ill_conditioned) as record:
        model = fit("float32")
    assert not [w for w in record if "edge of the search" in str(w.message)]
    assert model.space_ == reference.space_ == "parameter"
    assert model.solver_ == "dense"
    # 10 nats below float64's optimum, by float64's evidence
    loss = reference.log_marginal_likelihood_value_ - reference.log_marginal_likelihood(
        model.noise_, model.prior_
    )
    assert 0 <= loss < 15
