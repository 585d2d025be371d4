"""The device paths on a GPU: device="cuda" against device="cpu", float32 and float64,
both estimators, dense and CG solvers, an MLP and a CNN on images (load_digits), and a
CUDA fit pickled then loaded in a CPU-only process (CUDA_VISIBLE_DEVICES="").

    PYTHONPATH=. python benchmarks/gpu_check.py
    PYTHONPATH=. python benchmarks/gpu_check.py --cases classifier CNN   # some cases

Prints, per case, the fit time ratio GPU/CPU and the largest |difference| of the
predictions (mean and std, or probabilities) to the CPU fit's; and for the pickled
fits, the largest |difference| of the CPU-only process's predictions to the CUDA
fit's. The CNN cases show what float32 convolutions on TF32 tensor cores (PyTorch's
default for cuDNN, ``torch.backends.cudnn.allow_tf32``) do to the results. Without a
GPU it says so and exits with status 0.
"""

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from sklearn_fntk import FiniteNTKClassifier, FiniteNTKRegressor

N_TRAIN, N_TEST = 3000, 500
N_TRAIN_CLASSIFIER = 1000  # the dense classifier factors n·k = 3000 rows per Newton step
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
    ("CNN regressor dense, digits, noise/prior auto", "images", dict(solver="dense")),
    (
        "CNN regressor CG, digits",
        "images",
        dict(solver="cg", noise=0.1, prior=1.0, space="parameter"),
    ),
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
    if kind == "images":  # the digit's value from its 8x8 image, as a regression
        digits = load_digits()
        X, y = digits.images[:, None] / 16.0, digits.target / 9.0
        return X[:1400], y[:1400], X[1400:]
    rng = np.random.default_rng(seed)
    n_train = N_TRAIN if kind == "regressor" else N_TRAIN_CLASSIFIER
    X = rng.normal(size=(n_train + N_TEST, 8))
    if kind == "regressor":
        y = np.sin(X[:, 0]) + X[:, 1] * X[:, 2] + 0.1 * rng.normal(size=len(X))
    else:
        y = np.digitize(X[:, 0] + 0.5 * X[:, 1], [-0.7, 0.7])
    return X[:n_train], y[:n_train], X[n_train:]


def network(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "images":  # p = 2,338
        return nn.Sequential(
            nn.Conv2d(1, 8, 3), nn.Tanh(), nn.Conv2d(8, 8, 3), nn.Tanh(),
            nn.Flatten(), nn.Linear(8 * 4 * 4, 1),
        )  # fmt: skip
    n_out = 1 if kind == "regressor" else 3
    return nn.Sequential(
        nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, n_out)
    )


def fit_predict(kind, params, dtype, device):
    X, y, X_test = data(kind)
    cls = FiniteNTKClassifier if kind == "classifier" else FiniteNTKRegressor
    model = cls(network(kind), dtype=dtype, device=device, random_state=0, **params)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.fit(X, y)
    if kind == "classifier":
        out = model.predict_proba(X_test)
    else:
        out = np.concatenate(model.predict(X_test, return_std=True))
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


def main(device="cuda", cases=()):
    if device == "cuda" and not torch.cuda.is_available():
        print(
            "No CUDA GPU is available here (torch.cuda.is_available() is False): "
            "nothing to check. Run this script on a machine with one."
        )
        return 0
    if device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(
        f"MLP cases: n = {N_TRAIN} training ({N_TRAIN_CLASSIFIER} for the "
        f"classifier), {N_TEST} test points; CNN cases: "
        "load_digits, 1400 training, 397 test images. torch.backends.cudnn.allow_tf32 "
        f"= {torch.backends.cudnn.allow_tf32}, float32 matmul precision "
        f"{torch.get_float32_matmul_precision()!r}"
    )
    header = f"{'case':48s} {'dtype':14s} {'GPU/CPU time':>12s} {'max|GPU-CPU|':>13s}"
    print(header + f" {'max|CPU-only load - GPU|':>25s}")
    for name, kind, params in CASES:
        if cases and not any(case in name for case in cases):
            continue
        variants = [("float32", True), ("float64", True)]
        if kind == "images":  # the same without TF32 convolutions
            variants.insert(1, ("float32", False))
        for dtype, tf32 in variants:
            torch.backends.cudnn.allow_tf32 = tf32
            label = dtype if tf32 else f"{dtype}, no TF32"
            try:
                _, cpu, cpu_seconds, _ = fit_predict(kind, params, dtype, "cpu")
                model, gpu, gpu_seconds, X_test = fit_predict(kind, params, dtype, device)
                loaded = load_on_cpu_only(model, X_test)
            except Exception as error:  # report it, and go on to the next case
                print(f"{name:48s} {label:14s} {type(error).__name__}: {error}")
                continue
            print(
                f"{name:48s} {label:14s} {gpu_seconds / cpu_seconds:12.3f} "
                f"{np.abs(gpu - cpu).max():13.3g} {np.abs(loaded - gpu).max():25.3g}",
                flush=True,
            )
        torch.backends.cudnn.allow_tf32 = True
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # cpu: the same checks CPU against CPU, a dry run of this script
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", nargs="*", default=(), help="names containing these")
    args = parser.parse_args()
    sys.exit(main(args.device, args.cases))
