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

__all__ = ["link_scores", "probit_error_bound", "probit_scores"]


def probit_scores(mean, variance, n_classes):
    """The probit link's class scores, shape (m, C), for logit means and variances
    of shape (m, k)."""
    variance = variance.clamp_min(0.0)
    return class_logits(mean / torch.sqrt(1.0 + math.pi / 8.0 * variance), n_classes)


def probit_error_bound(mean, variance, overestimate, n_classes):
    """Largest change of the probit link's probabilities, shape (m,), when the
    variances may be too large by up to ``overestimate`` (all of shape (m, k)).

    Each score μ/√(1 + π/8·v) is monotone in v, so the exact scores lie between
    those at v and at v - overestimate, a change d (m, C) or less per class. The
    softmax moves p_c by p_c Σ_d p_d (Δz_c - Δz_d) ≤ ¼ (max Δz - min Δz) to first
    order at every point of the segment, hence ¼ of the range of [0, d] overall.
    """
    d = probit_scores(mean, variance - overestimate, n_classes) - probit_scores(
        mean, variance, n_classes
    )
    return (d.amax(1).clamp_min(0.0) - d.amin(1).clamp_max(0.0)) / 4


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
        return probit_scores(mean, cov.diagonal(dim1=1, dim2=2), n_classes)
    # mc: logits μ + Σ^½ z_s, shape (m, S, k); the log of the mean softmax
    samples = mean[:, None, :] + torch.einsum("iab,sb->isa", psd_sqrt(cov), draws)
    log_probs = torch.log_softmax(class_logits(samples, n_classes), dim=-1)
    return torch.logsumexp(log_probs, dim=1) - math.log(draws.shape[0])
