"""The benchmark suite (installed as resflow_cuda.benchmarks; run with `resflow-bench`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def build_flags() -> ModuleType:
    """The source tree's ``build_flags.py`` (beside setup.py), loaded from its path.

    Loaded by path rather than by putting the source tree on ``sys.path``: a process that imported
    an installed resflow_cuda would otherwise hand the source tree's (possibly differently built)
    package to every process it spawns.
    """
    path = Path(__file__).resolve().parent.parent / "build_flags.py"
    if not path.is_file():
        raise FileNotFoundError(f"build_flags.py is not beside setup.py at {path.parent}: run from a source tree")
    spec = importlib.util.spec_from_file_location("_resflow_build_flags", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
