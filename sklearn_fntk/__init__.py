"""Fast adaptation of trained PyTorch networks with finite neural tangent kernels."""

from ._regressor import FiniteNTKRegressor

__version__ = "0.1.0"

__all__ = ["FiniteNTKRegressor", "__version__"]
