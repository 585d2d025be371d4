"""Leave-one-out predictive of the linearized softmax model's Laplace posterior.

Notation as in :mod:`.laplace` and :mod:`.laplace_evidence`: F̂_i = m(x_i) + J_i δ̂ the
logits of training point i at the MAP, π_i their probabilities, Λ_i = v_i (diag(π_i) -
π_i π_iᵀ), g_i = v_i (π_i - Y_i) the gradient of its weighted negative log likelihood,
and Σ_i = J_i H⁻¹ J_iᵀ the posterior covariance of its logits. Laplace's method
replaces point i's likelihood by a Gaussian site in F_i (curvature Λ_i, gradient g_i
at F̂_i); removing the site from the marginal N(F̂_i, Σ_i) leaves the cavity, the
approximate posterior of F_i given the other points (Vehtari et al. 2016, "Bayesian
leave-one-out cross-validation approximations for Gaussian latent variable models",
here with k logits):

    C_i = (Σ_i⁻¹ - Λ_i)⁻¹ = Σ_i + Σ_i Λ_i^½ (I - Λ_i^½ Σ_i Λ_i^½)⁻¹ Λ_i^½ Σ_i      (1)
    F_(-i) = F̂_i + C_i g_i                                                          (2)

(the second form of (1) needs no inverse of Σ_i, and I - Λ_i^½ Σ_i Λ_i^½ ≻ 0 since
H ⪰ J_iᵀ Λ_i J_i + I/s). The leave-one-out log predictive of the posterior mode's
probabilities (the classifier's ``link="map"``) is then

    LOO(s) = Σ_i v_i log softmax(F̃_(-i))_(y_i) / Σ_i v_i                            (3)

with F̃ the class logits (one logit f: (0, f)). Unlike the evidence, which by the
chain rule scores the predictions of every prefix of the data, from none of them on
(log p(y) = Σ_i log p(y_i | y_(<i))), (3) scores predictions made from all the other
points, as the classifier's are; ``prior="loo"`` maximises it. Dense solver only: the
Σ_i come from the fit's Cholesky factor (:func:`.laplace_evidence.training_covariances`).
"""

import torch

from .laplace import class_logits
from .laplace_evidence import training_covariances
from .operators import psd_sqrt

__all__ = ["laplace_loo", "loo_logits"]


def loo_logits(posterior):
    """The leave-one-out logits F_(-i) of eq. (2), shape (n, k), of a dense fit."""
    covariances, _ = training_covariances(posterior)
    probs = posterior.probs
    curvature = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    root = psd_sqrt(posterior.weights[:, None, None] * curvature)  # Λ_i^½
    gradient = posterior._misfit(probs)  # g_i
    k = probs.shape[1]
    inner = torch.eye(k, dtype=probs.dtype, device=probs.device) - root @ covariances @ root
    step = covariances @ gradient[:, :, None]  # Σ_i g_i, then eq. (1) applied to g_i
    step = step + covariances @ root @ torch.linalg.solve(inner, root @ step)
    logits = posterior.offsets + posterior.jacobian.jvp(posterior.delta)
    return logits + step[:, :, 0]


def laplace_loo(posterior):
    """The leave-one-out log predictive (3) of a dense :class:`LaplacePosterior`.

    Parameters
    ----------
    posterior : LaplacePosterior
        Fitted with the dense solver.

    Returns
    -------
    float
        Σ_i v_i log p(y_i | the other points) / Σ_i v_i, over all shards.
    """
    if posterior.system.factor is None:
        raise ValueError("The leave-one-out predictive needs the dense solver.")
    logits = class_logits(loo_logits(posterior), posterior.n_classes)
    log_probs = torch.log_softmax(logits, dim=-1)
    chosen = log_probs.gather(1, posterior.labels[:, None])[:, 0]
    reduction = posterior.jacobian.reduction
    total = reduction.sum_float((posterior.weights * chosen).sum())
    return total / reduction.sum_float(posterior.weights.sum())
