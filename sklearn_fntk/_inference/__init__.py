"""Posterior inference of the linearized network, shared by both estimators.

``policy`` resolves every "auto" choice; ``operators`` are the two systems (parameter
space JᵀΛJ + c·I, function space s·Λ^½JJᵀΛ^½ + c·I; Λ = I for regression);
``system`` solves with one of them (Cholesky or preconditioned CG) and forms
covariances; ``gaussian`` is the regression posterior, ``low_rank`` its cached
variances, ``laplace`` the classifier's Laplace/Newton posterior and ``evidence`` the
log marginal likelihood. Imports ``_linearize`` and ``_linalg`` only.
"""
