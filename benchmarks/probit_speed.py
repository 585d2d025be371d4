"""Probit ``predict_proba`` time against the MAP link's, and its error, on the digits
example's fitted classifier.

The set-up is ``examples/digits_domain_shift.py``'s (imported from there): the source
CNN (p = 6090), FiniteNTKClassifier with its defaults fitted on the 200 labelled
target images (``prior="auto"``; a dense function-space fit, n·k = 2000), and the
held-out target images (699). In one process, at one thread, it times
``predict_proba`` with ``link="map"``, with ``link="probit"`` from the low-rank
covariance (built once, at the first probit call: timed apart) and with the exact
probit link (``Policy(probit_error=None)``), and prints the ratios to the MAP link,
the largest probability difference between the low-rank and exact probit links, the
rank kept, and how many test points fell back to their exact covariance. Then, per
``--tail-weights`` (the rule that keeps the low-rank directions; the default
``Policy.probit_tail_weight`` is 1e-3), the same low-rank probit link without the
fallback (``probit_error=1``): its rank, ratio to the MAP link, largest measured
error against the exact probit link, and its guaranteed bound.

Run from the repository root::

    python benchmarks/probit_speed.py
    python benchmarks/probit_speed.py --tail-weights 0.01 0.03
"""

import argparse
import dataclasses
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import digits_domain_shift as example  # noqa: E402

from sklearn_fntk import FiniteNTKClassifier  # noqa: E402
from sklearn_fntk._inference.links import probit_error_bound  # noqa: E402


def timed(call, repeats=3):
    """The best of ``repeats`` wall times of ``call()``, and its result."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - start)
    return best, result


def low_rank_probit(clf, X, **policy):
    """A copy of the fitted ``clf`` whose probit link uses ``policy``'s fields, the
    low-rank covariance rebuilt for them."""
    clone = pickle.loads(pickle.dumps(clf))
    posterior = clone._posterior
    posterior.__dict__.pop("_low_rank", None)
    posterior.policy = dataclasses.replace(posterior.policy, **policy)
    return clone


def error_bound(clf, X):
    """The guaranteed bound on each test point's probit probability error."""
    posterior = clf._posterior
    tensor = torch.as_tensor(X, dtype=posterior.delta.dtype)
    variance, overestimate = posterior.variances(tensor)
    mean = clf._latent_mean(tensor)
    return probit_error_bound(mean, variance, overestimate, len(clf.classes_))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tail-weights", type=float, nargs="*", default=[0.01, 0.03])
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = example.domains(example.translate)
    network = example.source_network(data)
    clf = FiniteNTKClassifier(network, random_state=0)
    clf.fit(data["X_adapt"], data["y_adapt"])
    X = data["X_test"]
    posterior = clf._posterior
    print(
        f"fit: prior_={clf.prior_:.3g}, {clf.space_}-space {clf.solver_}, "
        f"p={clf.n_params_}, {len(X)} test images"
    )
    clf.set_params(link="probit")
    start = time.perf_counter()
    low_rank = posterior.low_rank()
    build = time.perf_counter() - start
    print(
        f"low-rank covariance (first probit call): {build:.2f} s, rank "
        f"{low_rank.rank}, tail weight {low_rank.tail_weight:.2e}"
    )
    probit, fast = timed(lambda: clf.predict_proba(X))
    clf.set_params(link="map")
    map_time, _ = timed(lambda: clf.predict_proba(X))
    clf.set_params(link="probit")
    policy = posterior.policy
    posterior.policy = dataclasses.replace(policy, probit_error=None)
    exact_time, exact = timed(lambda: clf.predict_proba(X), repeats=1)
    posterior.policy = policy
    bound = error_bound(clf, X)
    fallback = int((bound > policy.probit_error).sum())
    print(f"MAP link:           {map_time:.3f} s")
    for name, seconds in (("low-rank", probit), ("exact", exact_time)):
        ratio = seconds / map_time
        print(f"probit, {name + ':':<11} {seconds:.3f} s  ratio to MAP {ratio:.1f}")
    print(
        f"max |low-rank - exact| probability: {np.abs(fast - exact).max():.2e} "
        f"(stated error {policy.probit_error:g}; guaranteed bound max "
        f"{float(bound.max()):.2e}; {fallback} of {len(X)} points fell back to exact)"
    )
    print("\ntail weight   rank  ratio to MAP  max error  bound max   (no fallback)")
    for weight in args.tail_weights:
        other = low_rank_probit(clf, X, probit_tail_weight=weight, probit_error=1.0)
        rank = other._posterior.low_rank().rank
        seconds, proba = timed(lambda other=other: other.predict_proba(X))
        error = np.abs(proba - exact).max()
        print(
            f"{weight:11.0e}  {rank:5d}  {seconds / map_time:12.1f}  {error:9.2e}  "
            f"{float(error_bound(other, X).max()):9.2e}"
        )


if __name__ == "__main__":
    main()
