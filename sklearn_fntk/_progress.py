"""Progress of long conjugate-gradient solves, for ``verbose > 0``.

A tqdm bar when tqdm is installed (the ``progress`` extra), plain log lines otherwise.
"""

import importlib.util

__all__ = ["CGProgress"]

_HAS_TQDM = importlib.util.find_spec("tqdm") is not None


class CGProgress:
    """A ``conjugate_gradient`` callback reporting iterations and residuals.

    Parameters
    ----------
    name : str
        Prefix of every line (the estimator's class name).
    tol : float
        Target relative residual, shown beside the current one.
    every : int, default=10
        Log-line period when tqdm is not installed.
    """

    def __init__(self, name, tol, every=10):
        self.name, self.tol, self.every = name, tol, every
        self._bar = None
        if _HAS_TQDM:
            from tqdm.auto import tqdm

            self._bar = tqdm(desc=f"{name} CG", unit="it")

    def __call__(self, iteration, residuals):
        worst = float(residuals.max())
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(residual=f"{worst:.2e}", tol=f"{self.tol:.0e}")
        elif iteration == 1 or iteration % self.every == 0:
            print(
                f"[{self.name}] CG iteration {iteration}: {residuals.numel()} column(s) "
                f"running, max relative residual {worst:.3e} (tol {self.tol:g})"
            )

    def close(self):
        if self._bar is not None:
            self._bar.close()
