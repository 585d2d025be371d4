"""Dense float64 reference for FiniteNTKClassifier, independent of the package.

Everything is explicit and small: the full Jacobian J (n, k, p) by ``torch.func.jacrev``
over a ``functional_call``; Newton's method on the linearized model's negative log
posterior with the explicit Hessian H = Σ_i J_iᵀ Λ_i J_i + I/s and ``torch.linalg.solve``,
run to machine precision; the Laplace predictive N(μ*, J* H⁻¹ J*ᵀ); the probit link; and
the exact predictive integral E[softmax(f)], f ~ N(μ*, Σ*), by tensor-product
Gauss-Hermite quadrature. A single logit uses the sigmoid likelihood written out as
such (not as a two-class softmax).
"""

import copy
import math

import numpy as np
import torch
from torch.func import functional_call, jacrev


def linearize(module, X):
    """``(f_θ(X), J(X), θ)`` in float64: shapes (n, k), (n, k, p), (p,)."""
    module = copy.deepcopy(module).double().eval()
    names = [name for name, param in module.named_parameters() if param.requires_grad]
    params = dict(module.named_parameters())
    shapes = [params[name].shape for name in names]
    sizes = [params[name].numel() for name in names]
    theta = torch.cat([params[name].detach().reshape(-1) for name in names])
    X = np.asarray(X)  # int64 indices for networks that take tokens
    X = torch.as_tensor(X if X.dtype.kind in "iu" else X.astype(np.float64))

    def logits(w):
        pieces = torch.split(w, sizes)
        weights = {
            name: piece.reshape(shape)
            for name, piece, shape in zip(names, pieces, shapes, strict=True)
        }
        return functional_call(module, weights, (X,)).reshape(X.shape[0], -1)

    with torch.no_grad():
        outputs = logits(theta)
    return outputs, jacrev(logits)(theta), theta


def _likelihood(F, labels, n_classes, weights):
    """Weighted negative log likelihood Σ_i w_i NLL_i, its gradient in F (n, k) and
    curvature w_i Λ_i (n, k, k)."""
    w = weights[:, None]
    if F.shape[1] == 1:  # sigmoid: p = σ(f), -log p(y|f) = softplus(f) - y·f
        y = labels.to(F.dtype)[:, None]
        p = torch.sigmoid(F)
        nll = (w * (torch.nn.functional.softplus(F) - y * F)).sum()
        return nll, w * (p - y), (w * p * (1 - p))[:, :, None]
    log_p = torch.log_softmax(F, dim=1)
    p = log_p.exp()
    Y = torch.nn.functional.one_hot(labels, n_classes).to(F.dtype)
    nll = -(w * Y * log_p).sum()
    curvature = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return nll, w * (p - Y), w[:, :, None] * curvature


def newton_map(
    F0, J, labels, n_classes, prior, *, line_search=True, max_iter=200, weights=None
):
    """MAP δ̂ of Σ_i w_i NLL(F0_i + J_i δ) + ‖δ‖²/(2 prior) by Newton's method.

    ``weights`` w (n,) default to 1. Returns ``(delta, H, history)`` with H the
    Hessian at δ̂ and ``history`` the objective after every iteration. Without line
    search every step is a full Newton step (for showing that it is needed).
    """
    n, k, p = J.shape
    Jf = J.reshape(n * k, p)
    delta = torch.zeros(p, dtype=torch.float64)
    w = torch.ones(n, dtype=torch.float64) if weights is None else torch.as_tensor(weights)

    def objective(d):
        F = F0 + (Jf @ d).reshape(n, k)
        nll, G, curvature = _likelihood(F, labels, n_classes, w)
        return float(nll + d @ d / (2 * prior)), G, curvature

    value, G, curvature = objective(delta)
    history = [value]
    norms = []
    for _ in range(max_iter):
        g = Jf.T @ G.reshape(-1) + delta / prior
        norms.append(float(torch.linalg.vector_norm(g)))
        # to machine precision: stop once the gradient is tiny and no longer shrinking
        if len(norms) > 1 and norms[-1] < 1e-9 * norms[0] and norms[-1] > norms[-2] / 2:
            break
        H = torch.einsum("iap,iab,ibq->pq", J, curvature, J) + torch.eye(p) / prior
        step = torch.linalg.solve(H, -g)
        t, slope = 1.0, float(g @ step)
        while line_search and t > 1e-10:
            if objective(delta + t * step)[0] <= value + 1e-4 * t * slope:
                break
            t /= 2
        delta = delta + t * step
        value, G, curvature = objective(delta)
        history.append(value)
    H = torch.einsum("iap,iab,ibq->pq", J, curvature, J) + torch.eye(p) / prior
    return delta, H, history


def laplace_reference(
    module, X, y, X_test, *, prior, prior_mean="network", line_search=True, weights=None
):
    """The fitted reference: class order, MAP, predictive mean and covariance.

    Parameters
    ----------
    module : torch.nn.Module
    X, X_test : ndarray
    y : ndarray of shape (n,)
        Labels, any sortable values.
    weights : ndarray of shape (n,) or None
        Positive weights of the samples' log-likelihood terms; None for all 1.

    Returns
    -------
    dict with ``classes``, ``delta``, ``history``, ``mean`` (m, k), ``cov`` (m, k, k)
    """
    classes, labels = np.unique(y, return_inverse=True)
    labels = torch.as_tensor(labels)
    F0, J, _ = linearize(module, X)
    F0_test, J_test, _ = linearize(module, X_test)
    if prior_mean == "zero":
        F0, F0_test = torch.zeros_like(F0), torch.zeros_like(F0_test)
    delta, H, history = newton_map(
        F0, J, labels, len(classes), prior, line_search=line_search, weights=weights
    )
    m, k, p = J_test.shape
    mean = F0_test + (J_test.reshape(m * k, p) @ delta).reshape(m, k)
    H_inv = torch.linalg.inv(H)
    cov = torch.einsum("iap,pq,ibq->iab", J_test, H_inv, J_test)
    return {
        "classes": classes,
        "delta": delta.numpy(),
        "history": history,
        "mean": mean.numpy(),
        "cov": cov.numpy(),
    }


def _class_probabilities(F):
    """softmax over the last axis; one logit: (1 - σ(f), σ(f))."""
    if F.shape[-1] == 1:
        positive = 1.0 / (1.0 + np.exp(-F[..., 0]))
        return np.stack([1.0 - positive, positive], axis=-1)
    F = F - F.max(axis=-1, keepdims=True)
    E = np.exp(F)
    return E / E.sum(axis=-1, keepdims=True)


def probit_proba(mean, cov):
    """softmax(μ / √(1 + π/8·diag Σ)), or σ(μ / √(1 + π/8·σ²)) for one logit."""
    variance = np.diagonal(cov, axis1=1, axis2=2)
    return _class_probabilities(mean / np.sqrt(1.0 + math.pi / 8.0 * variance))


def map_proba(mean):
    return _class_probabilities(mean)


def exact_proba(mean, cov, n_nodes=None):
    """E[softmax(f)], f ~ N(μ, Σ), per point, by tensor-product Gauss-Hermite.

    With Σ = R Rᵀ and f = μ + √2·R x, E[g(f)] = π^(-k/2) Σ w g(μ + √2 R x) over the
    product rule's nodes x and weights w. The sigmoid's complex poles slow the rule
    down for large variances: with the default 200/k nodes per axis (k ≤ 3 logits),
    the result moves by less than 1e-5 with 1.5 times as many nodes for standard
    deviations up to 5 (numpy's rule overflows beyond about 300 nodes).
    """
    k = mean.shape[1]
    n_nodes = 200 // k if n_nodes is None else n_nodes
    nodes, weights = np.polynomial.hermite.hermgauss(n_nodes)
    grids = np.meshgrid(*[nodes] * k, indexing="ij")
    x = np.stack([grid.ravel() for grid in grids], axis=1)  # (q^k, k)
    w = np.prod(np.meshgrid(*[weights] * k, indexing="ij"), axis=0).ravel()
    w = w / math.pi ** (k / 2)
    result = []
    for mu, sigma in zip(mean, cov, strict=True):
        values, vectors = np.linalg.eigh(sigma)
        root = vectors * np.sqrt(np.clip(values, 0.0, None))
        f = mu + math.sqrt(2.0) * x @ root.T
        result.append(w @ _class_probabilities(f))
    return np.array(result)


def _log_evidence_at(F0, J, labels, n_classes, log_prior, delta, weights):
    """-L(δ) - ½ log|I + s·JᵀΛ(δ)J| at δ, s = exp(log_prior): differentiable."""
    n, k, p = J.shape
    s = torch.exp(log_prior)
    F = F0 + (J.reshape(n * k, p) @ delta).reshape(n, k)
    nll, _, curvature = _likelihood(F, labels, n_classes, weights)
    A = torch.eye(p, dtype=torch.float64) + s * torch.einsum(
        "iap,iab,ibq->pq", J, curvature, J
    )
    return -(nll + delta @ delta / (2 * s)) - 0.5 * torch.logdet(A)


def laplace_log_evidence(F0, J, labels, n_classes, prior, weights=None):
    """The Laplace log evidence and its derivative in log s, at ``prior``.

    The value is -L(δ̂) - ½ log|I + s·JᵀΛJ| with the dense MAP δ̂ and H of
    :func:`newton_map`. The derivative is by autograd, not by a formula: through one
    Newton step from δ̂, δ(t) = δ̂ - H(δ̂, t)⁻¹ g(δ̂, t) with t = log s, whose
    derivative at the fixed point is the implicit function theorem's dδ̂/dt (the
    gradient g vanishes there), so autograd sees how the MAP and the curvature Λ(δ̂)
    move with s.

    Returns
    -------
    (value, derivative) : floats
    """
    n, k, p = J.shape
    w = torch.ones(n, dtype=torch.float64) if weights is None else torch.as_tensor(weights)
    delta_hat, _, _ = newton_map(F0, J, labels, n_classes, prior, weights=w)
    t = torch.tensor(math.log(prior), dtype=torch.float64, requires_grad=True)
    s = torch.exp(t)
    F = F0 + (J.reshape(n * k, p) @ delta_hat).reshape(n, k)
    _, G, curvature = _likelihood(F, labels, n_classes, w)
    g = J.reshape(n * k, p).T @ G.reshape(-1) + delta_hat / s
    H = torch.einsum("iap,iab,ibq->pq", J, curvature, J) + torch.eye(p) / s
    delta = delta_hat - torch.linalg.solve(H, g)
    value = _log_evidence_at(F0, J, labels, n_classes, t, delta, w)
    (derivative,) = torch.autograd.grad(value, t)
    return float(value.detach()), float(derivative)


def evidence_optimum(F0, J, labels, n_classes, weights=None, start=1.0):
    """The prior maximising the Laplace log evidence: the root of its autograd
    derivative in log s (scipy's brentq), bracketed by factors of 10 from ``start``."""
    from scipy.optimize import brentq

    def derivative(t):
        return laplace_log_evidence(F0, J, labels, n_classes, math.exp(t), weights)[1]

    a = math.log(start)
    step = math.log(10.0) if derivative(a) > 0 else -math.log(10.0)
    b = a + step
    while derivative(b) * step > 0:
        a, b = b, b + step
    t = brentq(derivative, min(a, b), max(a, b), xtol=1e-13, rtol=1e-15)
    return math.exp(t)


def leave_one_out(F0, J, labels, n_classes, prior, weights=None):
    """The Laplace leave-one-out log predictive of the posterior mode's probabilities.

    With the dense MAP δ̂ and H of :func:`newton_map`: Σ_i = J_i H⁻¹ J_iᵀ, the cavity
    C_i = (Σ_i⁻¹ - Λ_i)⁻¹ by two explicit inverses, the leave-one-out logits
    F̂_i + C_i g_i (g_i the weighted gradient of point i's negative log likelihood in
    its logits), and Σ_i w_i log p(y_i | those logits) / Σ_i w_i.
    """
    n, k, p = J.shape
    w = torch.ones(n, dtype=torch.float64) if weights is None else torch.as_tensor(weights)
    delta, H, _ = newton_map(F0, J, labels, n_classes, prior, weights=w)
    F = F0 + (J.reshape(n * k, p) @ delta).reshape(n, k)
    _, G, curvature = _likelihood(F, labels, n_classes, w)
    sigma = torch.einsum("iap,pq,ibq->iab", J, torch.linalg.inv(H), J)
    cavity = torch.linalg.inv(torch.linalg.inv(sigma) - curvature)
    F_loo = F + torch.einsum("iab,ib->ia", cavity, G)
    if k == 1:  # class logits (0, f)
        F_loo = torch.cat([torch.zeros_like(F_loo), F_loo], dim=1)
    log_p = torch.log_softmax(F_loo, dim=1).gather(1, labels[:, None])[:, 0]
    return float((w * log_p).sum() / w.sum())
