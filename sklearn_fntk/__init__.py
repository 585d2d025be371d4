"""Fast adaptation of trained PyTorch networks with finite neural tangent kernels."""

from ._base import DeviceFallbackWarning
from ._classifier import FiniteNTKClassifier
from ._regressor import FiniteNTKRegressor

__version__ = "0.1.0"

__all__ = [
    "DeviceFallbackWarning",
    "FiniteNTKClassifier",
    "FiniteNTKRegressor",
    "__version__",
]
