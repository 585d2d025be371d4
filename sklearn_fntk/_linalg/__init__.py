"""Numerical linear algebra: batched preconditioned CG, Lanczos and stochastic
log-determinants, dense Cholesky solves, preconditioners, memory checks.

The lowest layer: it imports torch (and the standard library) only, knows nothing of
networks or estimators, and reports what happened (result objects, exceptions)
instead of warning.
"""
