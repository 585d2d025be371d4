"""scikit-learn's estimator contract, checked whole."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from sklearn_fntk import FiniteNTKClassifier, FiniteNTKRegressor


@parametrize_with_checks([FiniteNTKRegressor(), FiniteNTKClassifier()])
def test_sklearn_compatible(estimator, check):
    check(estimator)
