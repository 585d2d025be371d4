"""Run every example script small, as the documentation gallery does, and check its plot.

Each example in ``examples/`` runs in a subprocess (its own torch threads and
matplotlib state, and an ``argv`` of its own) in a temporary working directory, with
``SKLEARN_FNTK_EXAMPLE_SMALL=1``, and must exit cleanly and write ``<name>.png``
there. An example that does not read that variable would run at full size, which
this module's time budget (about 90 s on two cores) does not allow: it is skipped,
with the reason.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))
SMALL_VARIABLE = "SKLEARN_FNTK_EXAMPLE_SMALL"
# Seconds allowed per example: several times what the small runs take on two cores.
TIMEOUT = 180


@pytest.mark.parametrize("example", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_runs_and_writes_its_plot(example, tmp_path):
    pytest.importorskip("matplotlib")
    if SMALL_VARIABLE not in example.read_text(encoding="utf-8"):
        pytest.skip(
            f"{example.name} does not read {SMALL_VARIABLE}, so it would run at full "
            "size, beyond this module's time budget"
        )
    environment = {**os.environ, SMALL_VARIABLE: "1", "MPLBACKEND": "Agg"}
    completed = subprocess.run(
        [sys.executable, str(example)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert completed.returncode == 0, (
        f"{example.name} failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}"
    )
    plot = tmp_path / f"{example.stem}.png"
    assert plot.is_file() and plot.stat().st_size > 0, (
        f"{example.name} did not write {plot.name}; it wrote "
        f"{sorted(path.name for path in tmp_path.iterdir())}"
    )
