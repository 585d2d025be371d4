"""Links: class scores from each test point's Gaussian logits N(μ*, Σ*).

The softmax of a link's scores is its predictive distribution over the C classes;
k = C logits, or k = 1 (class logits (0, f), see :func:`class_logits`):

    map:    μ*
    probit: μ* / √(1 + π/8 · diag Σ*)     (MacKay 1992, per logit)
    mc:     log (1/S) Σ_s softmax(μ* + Σ*^½ z_s),   z_s ~ N(0, I_k)
"""

import math

import torch

from .laplace import class_logits
from .operators import psd_sqrt

__all__ = ["link_scores"]


def link_scores(link, mean, cov, n_classes, draws=None):
    """Class scores, shape (m, C), of ``link`` for logits N(mean, cov).

    Parameters
    ----------
    link : {"map", "probit", "mc"}
    mean : torch.Tensor of shape (m, k)
    cov : torch.Tensor of shape (m, k, k) or None
        Unused (may be None) for "map".
    n_classes : int
    draws : torch.Tensor of shape (S, k) or None
        Standard normal draws z_s for "mc", shared by every test point.

    Returns
    -------
    torch.Tensor of shape (m, C)
    """
    if link == "map":
        return class_logits(mean, n_classes)
    if link == "probit":
        variance = cov.diagonal(dim1=1, dim2=2).clamp_min(0.0)
        return class_logits(mean / torch.sqrt(1.0 + math.pi / 8.0 * variance), n_classes)
    # mc: logits μ + Σ^½ z_s, shape (m, S, k); the log of the mean softmax
    samples = mean[:, None, :] + torch.einsum("iab,sb->isa", psd_sqrt(cov), draws)
    log_probs = torch.log_softmax(class_logits(samples, n_classes), dim=-1)
    return torch.logsumexp(log_probs, dim=1) - math.log(draws.shape[0])
