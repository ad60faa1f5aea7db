"""Makes ImpFlow's ``lib`` importable on current PyTorch, for the fixture generators: its code is
from the PyTorch 1.4 era, so ``torch._six.container_abcs`` and ``termcolor`` are provided as stand-ins
(collections.abc, and a colored() that returns its text); nothing of ImpFlow is changed."""

import collections.abc
import sys
import types


def install(impflow_dir):
    """Stand-ins in sys.modules and IMPFLOW_DIR (holding ``lib/``) on sys.path."""
    six = types.ModuleType("torch._six")
    six.container_abcs = collections.abc
    sys.modules["torch._six"] = six
    termcolor = types.ModuleType("termcolor")
    termcolor.colored = lambda text, *args, **kwargs: text
    sys.modules["termcolor"] = termcolor
    sys.path.insert(0, impflow_dir)
