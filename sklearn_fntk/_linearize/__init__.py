"""The network as a function of its weights, and products with its Jacobian.

A torch module becomes a pure function f(w, X) of a flat parameter vector
(``network``); ``jacobian`` gives chunked Jacobian-vector, vector-Jacobian and
Fisher-vector products over the data; ``layerwise`` the exact finite NTK of
Linear/elementwise networks from per-layer features. Imports ``_linalg`` only.
"""
