"""What ``verbose`` shows: the stages of a fit or prediction, through ``logging``.

The layers below mark their stages (:mod:`._stages`); :class:`StageLogger` is the
estimators' observer of them. On the logger ``"sklearn_fntk"``:

- each stage's end at INFO: ``"FiniteNTKRegressor.fit: solve (iterations=57,
  residual=8.1e-07) in 1.234 s"``, indented by its nesting; the record carries
  ``stage``, ``seconds``, ``depth`` and ``details`` as attributes;
- each stage's start, and every tenth step of a loop (CG and Lanczos iterations,
  Newton steps), at DEBUG.

``verbose=0`` changes no logging configuration: the records are emitted (and cost a
line each) only where the user's configuration lets INFO or DEBUG through, so a
script that configures nothing sees nothing. ``verbose >= 1`` lowers the package
logger's level to INFO (``verbose >= 2``: DEBUG) for the duration of the call, and
where no handler would receive the records (none on the logger or its ancestors)
attaches one writing to stderr, for the call only. With tqdm installed (the
``progress`` extra) and ``verbose >= 1``, a stage whose step count is known (an upper
bound for CG: ``max_iter``) shows a bar on stderr.
"""

import importlib.util
import logging
import threading
from contextlib import contextmanager

from ._stages import NO_STAGES, Stages

__all__ = ["LOGGER", "stages_for"]

LOGGER = logging.getLogger("sklearn_fntk")
_HAS_TQDM = importlib.util.find_spec("tqdm") is not None
# DEBUG line period of a loop's steps
_EVERY = 10

# The logger's level and handler set by verbose calls; restored by the last to end.
_LOCK = threading.Lock()
_active = {"count": 0, "level": None, "handler": None}


def _format(details):
    parts = []
    for key, value in details.items():
        if isinstance(value, float):
            value = f"{value:.3g}"
        parts.append(f"{key}={value}")
    return f" ({', '.join(parts)})" if parts else ""


class StageLogger:
    """Observer of :class:`~._stages.Stages` writing to the package logger.

    Parameters
    ----------
    caller : str
        Prefix of every line, for example ``"FiniteNTKRegressor.fit"``.
    bars : bool
        Show a tqdm bar for stages with a known step total.
    """

    def __init__(self, caller, bars):
        self.caller, self.bars = caller, bars and _HAS_TQDM
        self._bars = {}

    def _extra(self, stage):
        return {
            "stage": stage.name,
            "depth": stage.depth,
            "seconds": stage.seconds,
            "details": dict(stage.details),
        }

    def start(self, stage):
        indent = "  " * stage.depth
        LOGGER.debug(
            "%s: %s%s ...", self.caller, indent, stage.name, extra=self._extra(stage)
        )
        if self.bars and stage.total is not None:
            from tqdm.auto import tqdm

            self._bars[id(stage)] = tqdm(
                total=stage.total,
                desc=f"{self.caller}: {stage.name}",
                leave=False,
                position=stage.depth,
            )

    def step(self, stage, values):
        bar = self._bars.get(id(stage))
        if bar is not None:
            bar.update(1)
            if values:
                bar.set_postfix_str(_format(values).strip(" ()"), refresh=False)
        elif stage.n_steps == 1 or stage.n_steps % _EVERY == 0:
            total = "" if stage.total is None else f"/{stage.total}"
            LOGGER.debug(
                "%s: %s%s step %d%s%s",
                self.caller,
                "  " * stage.depth,
                stage.name,
                stage.n_steps,
                total,
                _format(values),
            )

    def end(self, stage, failed):
        bar = self._bars.pop(id(stage), None)
        if bar is not None:
            bar.close()
        LOGGER.info(
            "%s: %s%s%s %s %.3f s",
            self.caller,
            "  " * stage.depth,
            stage.name,
            _format(stage.details),
            "failed after" if failed else "in",
            stage.seconds,
            extra=self._extra(stage),
        )


@contextmanager
def _verbose_logging(verbose):
    """The package logger set up for ``verbose`` (see the module docstring)."""
    if not verbose:
        yield
        return
    level = logging.DEBUG if verbose > 1 else logging.INFO
    with _LOCK:
        if _active["count"] == 0:
            _active["level"] = LOGGER.level
            if LOGGER.getEffectiveLevel() > level:
                LOGGER.setLevel(level)
            if not LOGGER.hasHandlers():
                handler = logging.StreamHandler()
                handler.setFormatter(logging.Formatter("%(message)s"))
                LOGGER.addHandler(handler)
                _active["handler"] = handler
        _active["count"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _active["count"] -= 1
            if _active["count"] == 0:
                LOGGER.setLevel(_active["level"])
                if _active["handler"] is not None:
                    LOGGER.removeHandler(_active["handler"])
                    _active["handler"] = None


@contextmanager
def stages_for(caller, verbose):
    """The :class:`~._stages.Stages` of one call (``caller``, for example
    ``"FiniteNTKRegressor.fit"``), logged as ``verbose`` and the logging
    configuration say; reported to nobody when neither lets INFO through."""
    with _verbose_logging(verbose):
        if not (verbose or LOGGER.isEnabledFor(logging.INFO)):
            yield NO_STAGES
            return
        yield Stages(StageLogger(caller, bars=bool(verbose)))
