"""The example scripts run and check what they claim (each asserts its own results)."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_lipswish_drop_in(capsys):
    runpy.run_path(str(EXAMPLES / "lipswish_drop_in.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "swapped 3 Swish modules" in out and "every parameter gradient agree" in out
