"""What the example scripts share: their parser and its common flags, seeding, and PNG output.

The scripts find this module beside them (they put their folder on ``sys.path``, so that it is found
when they are run as ``python examples/<script>.py`` and under ``runpy.run_path`` alike).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the script's docstring; ``add_common`` adds the
    flags every script has after the script's own."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


def add_common(parser: argparse.ArgumentParser, out: str) -> None:
    """--out (default ``out``), --device and --seed."""
    parser.add_argument("--out", default=out, help="directory for the PNGs")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)


def seed(value: int) -> None:
    """Seeds torch and NumPy's global RNG (the Russian roulette draws from NumPy's, as the reference's)."""
    import numpy as np
    import torch

    torch.manual_seed(value)
    np.random.seed(value)


def pyplot():
    """matplotlib.pyplot on the Agg backend: the scripts write files and open no window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, dpi: int) -> Path:
    """Writes ``fig`` to ``path`` (making its folder) and closes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
