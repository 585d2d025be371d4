"""Independent dense float64 reference for the finite-NTK Gaussian process.

Nothing here imports ``sklearn_fntk``. The Jacobian is built whole with
``torch.func.jacrev`` over ``torch.func.functional_call`` on a *batched* forward pass
(the package uses per-sample ``vmap`` and JVP/VJP products instead), then the textbook
GP formulas of Rasmussen & Williams (2006), Algorithm 2.1, are applied with a Cholesky
factor of the explicit kernel matrix:

    K     = s·J Jᵀ + σ² I                                (n·k x n·k, joint over outputs)
            (s·J Jᵀ + σ² diag(1/w) with sample weights w, each sample's on its k rows)
    mean  = m(X*) + s·J* Jᵀ K⁻¹ r,        r = y - m(X)
    cov   = s·J* J*ᵀ - s²·J* Jᵀ K⁻¹ J J*ᵀ
    log p = -½ rᵀ K⁻¹ r - ½ log|K| - (n·k/2) log 2π

Rows of J are ordered sample-major, then output: row ``i*k + a`` is output ``a`` of
sample ``i``.
"""

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call, jacrev

__all__ = [
    "ReferencePosterior",
    "RelativeErrors",
    "reference_jacobian",
    "reference_posterior",
]


@dataclass
class ReferencePosterior:
    """Dense float64 posterior.

    Attributes
    ----------
    mean : ndarray of shape (m, k)
    std : ndarray of shape (m, k)
        Latent (noise-free) predictive standard deviation.
    cov : ndarray of shape (m*k, m*k)
        Joint latent covariance over test points and outputs (row ``i*k + a``).
    lml : float
        Log marginal likelihood of the training targets.
    K : ndarray of shape (n*k, n*k)
        Training kernel matrix including the noise.
    """

    mean: np.ndarray
    std: np.ndarray
    cov: np.ndarray
    lml: float
    K: np.ndarray


class RelativeErrors:
    """The largest relative errors seen per quantity, for a test module's report."""

    def __init__(self, module, keys):
        self.module = module
        self.largest = dict.fromkeys(keys, 0.0)

    def record(self, key, actual, expected):
        """Record max |actual - expected| / max(|expected|, 1e-3·max |expected|)."""
        actual, expected = np.asarray(actual), np.asarray(expected)
        scale = np.maximum(np.abs(expected), 1e-3 * np.abs(expected).max())
        error = float(np.max(np.abs(actual - expected) / scale))
        self.largest[key] = max(self.largest[key], error)

    def report(self):
        return f"\n[{self.module}] largest relative errors: " + ", ".join(
            f"{key} {value:.2e}" for key, value in self.largest.items()
        )


def _float64_eval_copy(module):
    return copy.deepcopy(module).to(torch.float64).eval()


def _selected_names(module, parameters):
    if parameters is None:
        return [name for name, t in module.named_parameters() if t.requires_grad]
    wanted = set(parameters)
    return [name for name, _ in module.named_parameters() if name in wanted]


def _as_tensor(X):
    """X in float64, or int64 indices where its values are integers (networks that
    take tokens; the test networks for features get floats)."""
    X = np.asarray(X)
    return torch.as_tensor(X if X.dtype.kind in "iu" else X.astype(np.float64))


def reference_jacobian(module, X, parameters=None):
    """Outputs f(X) of shape (n, k) and the explicit Jacobian of shape (n*k, p).

    ``module`` is copied, cast to float64 and put in eval mode; the parameters in
    ``parameters`` (all trainable ones for None) are the Jacobian's columns, in
    ``named_parameters`` order.
    """
    net = _float64_eval_copy(module)
    for tensor in net.parameters():
        tensor.requires_grad_(False)
    names = _selected_names(module, parameters)
    all_params = dict(net.named_parameters())
    params = {name: all_params[name].detach().clone() for name in names}
    X = _as_tensor(X)
    n = X.shape[0]

    def f(p):
        return functional_call(net, p, (X,)).reshape(n, -1)

    with torch.no_grad():
        outputs = f(params)
    k = outputs.shape[1]
    jac = jacrev(f)(params)  # name -> (n, k, *shape)
    J = torch.cat([jac[name].detach().reshape(n, k, -1) for name in names], dim=-1)
    return outputs, J.reshape(n * k, -1)


def reference_posterior(
    module,
    X_train,
    Y_train,
    X_test,
    *,
    noise,
    prior=1.0,
    prior_mean="network",
    parameters=None,
    weights=None,
):
    """Dense float64 GP posterior of the linearized network.

    Parameters
    ----------
    module : torch.nn.Module
    X_train : array of shape (n, ...)
    Y_train : array of shape (n,) or (n, k)
    X_test : array of shape (m, ...)
    noise, prior : float
    prior_mean : {"network", "zero"}
    parameters : list of str or None
    weights : array of shape (n,) or None
        Positive sample weights: sample i has noise variance ``noise / weights[i]``.

    Returns
    -------
    ReferencePosterior
    """
    f_train, J = reference_jacobian(module, X_train, parameters)
    f_test, J_star = reference_jacobian(module, X_test, parameters)
    n, k = f_train.shape
    m = f_test.shape[0]
    Y = _as_tensor(Y_train).reshape(n, -1)
    assert Y.shape[1] == k, (Y.shape, k)
    if prior_mean == "network":
        m_train, m_test = f_train, f_test
    elif prior_mean == "zero":
        m_train, m_test = torch.zeros_like(f_train), torch.zeros_like(f_test)
    else:
        raise ValueError(prior_mean)

    r = (Y - m_train).reshape(-1, 1)
    w = torch.ones(n, dtype=torch.float64) if weights is None else _as_tensor(weights)
    K = prior * (J @ J.T) + noise * torch.diag(1.0 / w.repeat_interleave(k))
    L = torch.linalg.cholesky(K)
    alpha = torch.cholesky_solve(r, L)  # K⁻¹ r
    K_cross = prior * (J @ J_star.T)  # (n*k, m*k)
    mean = m_test.reshape(-1) + (K_cross.T @ alpha).reshape(-1)
    V = torch.linalg.solve_triangular(L, K_cross, upper=False)  # L⁻¹ K_*
    cov = prior * (J_star @ J_star.T) - V.T @ V
    variance = torch.clamp(torch.diagonal(cov), min=0.0)
    lml = (
        -0.5 * float(r.reshape(-1) @ alpha.reshape(-1))
        - float(torch.log(torch.diagonal(L)).sum())
        - 0.5 * n * k * math.log(2 * math.pi)
    )
    return ReferencePosterior(
        mean=mean.reshape(m, k).numpy(),
        std=torch.sqrt(variance).reshape(m, k).numpy(),
        cov=cov.numpy(),
        lml=lml,
        K=K.numpy(),
    )
