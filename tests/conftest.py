"""Settings shared by every test module.

``SKLEARN_FNTK_TEST_DEVICE=cuda pytest`` runs the suite with the estimators' default
``device`` set to ``cuda``: every estimator a test builds without naming a device fits
and predicts there, against the same float64 references computed on the CPU. Tests
that name ``device="cpu"`` and the lower layers' tests stay on the CPU.
"""

import os

import pytest
import torch

from sklearn_fntk import FiniteNTKClassifier, FiniteNTKRegressor

TEST_DEVICE = os.environ.get("SKLEARN_FNTK_TEST_DEVICE", "cpu")


@pytest.fixture(autouse=True, scope="session")
def estimators_default_to_the_test_device():
    """The estimators' default ``device`` is ``TEST_DEVICE`` for the session."""
    defaults = [
        cls.__init__.__kwdefaults__ for cls in (FiniteNTKRegressor, FiniteNTKClassifier)
    ]
    saved = [kwdefaults["device"] for kwdefaults in defaults]
    for kwdefaults in defaults:
        kwdefaults["device"] = TEST_DEVICE
    yield
    for kwdefaults, device in zip(defaults, saved, strict=True):
        kwdefaults["device"] = device


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run each test module on one torch thread.

    The problems are small: threads only add overhead, and on a shared 2-core machine
    oversubscription made the many small CG steps crawl (10x measured).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
