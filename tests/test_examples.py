"""The example scripts run and check what they claim (each asserts its own results)."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_lipswish_drop_in(capsys):
    runpy.run_path(str(EXAMPLES / "lipswish_drop_in.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "swapped 3 Swish modules" in out and "every parameter gradient agree" in out


def test_toy2d_trains_and_writes_its_png(tmp_path):
    toy2d = runpy.run_path(str(EXAMPLES / "toy2d.py"))
    result = toy2d["main"](["--data", "8gaussians", "--niters", "150", "--nblocks", "6", "--dims", "64-64",
                            "--log-every", "75", "--test-size", "2000", "--out", str(tmp_path)])
    (start, nll_0), (mid, _), (_, nll_150) = result["history"]
    assert (start, mid) == (0, 75) and nll_150 < nll_0 - 0.15  # it learns: the exact test NLL goes down
    assert result["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_toy_densities_have_the_expected_shapes():
    import numpy as np

    toy2d = runpy.run_path(str(EXAMPLES / "toy2d.py"))
    rng = np.random.default_rng(0)
    for name in toy2d["DATASETS"]:
        x = toy2d["sample_data"](name, 1000, rng)
        assert x.shape == (1000, 2) and x.dtype == np.float32 and np.abs(x).max() < 6, name
    radius = np.linalg.norm(toy2d["sample_data"]("8gaussians", 4000, rng), axis=1)
    assert abs(np.median(radius) - 4 / np.sqrt(2)) < 0.2  # eight modes on a circle of radius 4/sqrt(2)


def test_digits_learns_and_writes_samples(tmp_path):
    digits = runpy.run_path(str(EXAMPLES / "digits.py"))
    result = digits["main"](["--epochs", "1", "--nblocks", "1-1", "--idim", "16", "--out", str(tmp_path)])
    (start, before), (epoch, after) = result["history"]
    assert (start, epoch) == (0, 1) and after < before - 1.0  # held-out bits/dim fall within one epoch
    assert 0 < after < 8  # the dequantised 17-level data: log2(17) = 4.09 bits for a uniform model
    assert result["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_impflow_1d_implicit_block_fits_a_slope_two_residual_blocks_cannot(tmp_path):
    impflow = runpy.run_path(str(EXAMPLES / "impflow_1d.py"))
    result = impflow["main"](["--niters", "400", "--log-every", "200", "--out", str(tmp_path)])
    implicit, residual = result["summary"]["implicit"], result["summary"]["residual"]
    bound = (1 + impflow["LIP"]) ** 2
    assert residual["max_slope"] <= bound  # the Lipschitz layers keep two residual blocks below (1 + L)^2
    assert implicit["max_slope"] > bound and implicit["mse"] < residual["mse"] / 3
    assert result["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_coupling_vs_residual_trains_both_with_equal_parameter_counts(tmp_path):
    compare = runpy.run_path(str(EXAMPLES / "coupling_vs_residual.py"))
    result = compare["main"](["--epochs", "1", "--out", str(tmp_path)])
    residual, coupling = result["results"]["residual"], result["results"]["coupling"]
    assert abs(coupling["parameters"] / residual["parameters"] - 1) < 0.05
    for r in (residual, coupling):
        (_, before), (_, after) = r["history"]
        assert after < before - 1.0 and 0 < after < 8  # both learn within one epoch
    assert result["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_toy2d_trains_implicit_blocks(tmp_path):
    toy2d = runpy.run_path(str(EXAMPLES / "toy2d.py"))
    result = toy2d["main"](["--data", "8gaussians", "--arch", "implicit", "--niters", "400", "--nblocks", "3",
                            "--dims", "64-64", "--log-every", "400", "--test-size", "2000", "--out", str(tmp_path)])
    (_, nll_0), (_, nll_400) = result["history"]
    assert nll_400 < nll_0 - 0.5  # the exact test NLL of a stack of ImplicitBlocks goes down (4.25 -> 3.29 here)
    assert result["png"].name == "toy2d-8gaussians-implicit.png" and result["png"].read_bytes()[:4] == b"\x89PNG"
