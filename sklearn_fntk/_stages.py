"""Named, timed stages of a computation, reported to an observer.

Every layer marks its long stages the same way::

    with stages("preconditioner") as stage:
        ...
        stage.note(rank=r)

and a loop reports its steps (``stage.step(residual=...)``) against a total known in
advance where there is one (``stages("solve", total=max_iter)``: an upper bound for
CG). A stage measures its own wall time. What becomes of the reports (log lines, a
progress bar) is the observer's business: the numerical layers report, the
estimators log (``_progress``). This module sits below every layer and imports the
standard library only.
"""

import time
from contextlib import contextmanager

__all__ = ["NO_STAGES", "Stage", "Stages"]


class Stage:
    """One stage: its name, its step total, what it noted and, once ended, its time.

    Attributes
    ----------
    name : str
    total : int or None
        Steps expected (an upper bound), or None when unknown.
    details : dict
        What the stage noted (``note``): sizes, ranks, iterations, residuals.
    depth : int
        How many stages enclose this one (0 for a top-level stage).
    n_steps : int
        Steps reported so far.
    seconds : float or None
        Wall time, once the stage has ended.
    """

    __slots__ = ("name", "total", "details", "depth", "n_steps", "seconds", "_observer")

    def __init__(self, name, total, details, depth, observer):
        self.name, self.total, self.details, self.depth = name, total, details, depth
        self.n_steps, self.seconds, self._observer = 0, None, observer

    def note(self, **details):
        """Record ``details`` (reported when the stage ends)."""
        self.details.update(details)

    def step(self, **values):
        """Report one step, with ``values`` (for example the current residual)."""
        self.n_steps += 1
        if self._observer is not None:
            self._observer.step(self, values)


class Stages:
    """Marks stages, times them and reports them to ``observer``.

    Parameters
    ----------
    observer : object or None, default=None
        With methods ``start(stage)``, ``step(stage, values)`` and
        ``end(stage, failed)``; None reports to nobody (the stages are still timed).

    Calling the instance, ``stages(name, total=None, **details)``, is a context
    manager yielding the :class:`Stage`. Stages nest. One instance serves one
    computation (one fit, one prediction): it is not shared between threads.
    """

    def __init__(self, observer=None):
        self.observer = observer
        self._depth = 0

    @contextmanager
    def __call__(self, name, total=None, **details):
        stage = Stage(name, total, details, self._depth, self.observer)
        if self.observer is not None:
            self.observer.start(stage)
        self._depth += 1
        start = time.perf_counter()
        failed = True
        try:
            yield stage
            failed = False
        finally:
            stage.seconds = time.perf_counter() - start
            self._depth -= 1
            if self.observer is not None:
                self.observer.end(stage, failed)


class _Unobserved(Stages):
    """Stages reported to nobody; safe to share between threads (no depth kept)."""

    @contextmanager
    def __call__(self, name, total=None, **details):
        yield Stage(name, total, details, 0, None)


NO_STAGES = _Unobserved()
