"""The device paths on a GPU: device="cuda" against device="cpu", float32 and float64,
both estimators, dense and CG solvers, and a CUDA fit pickled then loaded in a
CPU-only process (CUDA_VISIBLE_DEVICES="").

    PYTHONPATH=. python benchmarks/gpu_check.py

Prints, per case, the fit time ratio GPU/CPU and the largest |difference| of the
predictions (mean and std, or probabilities) to the CPU fit's; and for the pickled
fits, the largest |difference| of the CPU-only process's predictions to the CUDA
fit's. Without a GPU it says so and exits with status 0.
"""

import os
import pickle
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

from sklearn_fntk import FiniteNTKClassifier, FiniteNTKRegressor

N_TRAIN, N_TEST = 3000, 500
# (estimator, its parameters): the paths a GPU user takes
CASES = [
    ("regressor dense, noise/prior auto", "regressor", dict(solver="dense")),
    (
        "regressor CG, Nyström, exact variance",
        "regressor",
        dict(solver="cg", noise=0.01, prior=1.0, space="parameter"),
    ),
    (
        "regressor CG, function space, noise auto",
        "regressor",
        dict(solver="cg", space="function", prior=1.0),
    ),
    ("classifier dense, prior auto, probit", "classifier", dict(solver="dense")),
    ("classifier CG, probit", "classifier", dict(solver="cg", prior=1.0)),
]

LOAD_AND_PREDICT = """
import pickle, sys, warnings
import numpy as np
import torch
assert not torch.cuda.is_available()
warnings.simplefilter("ignore")  # DeviceFallbackWarning: expected here
with open(sys.argv[1], "rb") as f:
    model, X = pickle.load(f)
if hasattr(model, "predict_proba"):
    out = model.predict_proba(X)
else:
    out = np.concatenate(model.predict(X, return_std=True))
np.save(sys.argv[2], out)
"""


def data(kind, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N_TRAIN + N_TEST, 8))
    if kind == "regressor":
        y = np.sin(X[:, 0]) + X[:, 1] * X[:, 2] + 0.1 * rng.normal(size=len(X))
    else:
        y = np.digitize(X[:, 0] + 0.5 * X[:, 1], [-0.7, 0.7])
    return X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:]


def network(kind, seed=0):
    torch.manual_seed(seed)
    n_out = 1 if kind == "regressor" else 3
    return nn.Sequential(
        nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, n_out)
    )


def fit_predict(kind, params, dtype, device):
    X, y, X_test = data(kind)
    cls = FiniteNTKRegressor if kind == "regressor" else FiniteNTKClassifier
    model = cls(network(kind), dtype=dtype, device=device, random_state=0, **params)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.fit(X, y)
    if kind == "regressor":
        out = np.concatenate(model.predict(X_test, return_std=True))
    else:
        out = model.predict_proba(X_test)
    if device == "cuda":
        torch.cuda.synchronize()
    return model, out, time.perf_counter() - start, X_test


def load_on_cpu_only(model, X_test):
    """Predictions of ``model`` pickled and loaded in a process without CUDA."""
    with tempfile.TemporaryDirectory() as folder:
        path, result = os.path.join(folder, "fit.pkl"), os.path.join(folder, "out.npy")
        with open(path, "wb") as f:
            pickle.dump((model, X_test), f)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        subprocess.run(
            [sys.executable, "-c", LOAD_AND_PREDICT, path, result], env=env, check=True
        )
        return np.load(result)


def main():
    if not torch.cuda.is_available():
        print(
            "No CUDA GPU is available here (torch.cuda.is_available() is False): "
            "nothing to check. Run this script on a machine with one."
        )
        return 0
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"n = {N_TRAIN} training, {N_TEST} test points")
    header = f"{'case':44s} {'dtype':8s} {'GPU/CPU time':>12s} {'max|GPU-CPU|':>13s}"
    print(header + f" {'max|CPU-only load - GPU|':>25s}")
    for name, kind, params in CASES:
        for dtype in ("float32", "float64"):
            _, cpu, cpu_seconds, _ = fit_predict(kind, params, dtype, "cpu")
            model, gpu, gpu_seconds, X_test = fit_predict(kind, params, dtype, "cuda")
            loaded = load_on_cpu_only(model, X_test)
            print(
                f"{name:44s} {dtype:8s} {gpu_seconds / cpu_seconds:12.3f} "
                f"{np.abs(gpu - cpu).max():13.3g} {np.abs(loaded - gpu).max():25.3g}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
