"""Fast adaptation of trained PyTorch networks with finite neural tangent kernels."""

from ._classifier import FiniteNTKClassifier
from ._persistence import DeviceFallbackWarning
from ._regressor import FiniteNTKRegressor

__version__ = "0.1.0"

__all__ = [
    "DeviceFallbackWarning",
    "FiniteNTKClassifier",
    "FiniteNTKRegressor",
    "__version__",
]
