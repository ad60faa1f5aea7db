"""Packaging: an sdist made without torch (or CUDA) carries every file a build needs, and a build that
cannot import torch (pip's default isolated build) stops with one message naming --no-build-isolation."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import resflow_cuda

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").is_file(), reason="needs the source tree (setup.py)")

# What a CUDA build from the sdist needs beyond what setuptools would find by itself.
NEEDED = ["setup.py", "pyproject.toml", "build_flags.py", "CMakeLists.txt", "MANIFEST.in", "LICENSE", "README.md",
          "CHANGELOG.md", "CITATION.cff", "resflow_cuda/version.py", "resflow_cuda/py.typed",
          "csrc/registration.cpp", "csrc/cpu/vec/lipswish_vec.cpp", "csrc/include/resflow/lipswish_math.h",
          "tests/data/reference_resflow_small.pt", "benchmarks/kernel_plans.cpp"]


def _source_copy(dest: Path) -> Path:
    """The tracked source tree (or, outside a git checkout, the tree less build outputs) in ``dest``,
    so that a build's egg-info and outputs stay out of the real tree."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode == 0 and tracked.stdout:
        for name in tracked.stdout.split("\0"):
            if name and (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
        for name in NEEDED:  # new files not yet added to git
            if (ROOT / name).is_file() and not (dest / name).exists():
                shutil.copy2(ROOT / name, dest / name)
    else:
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", "build", "dist", ".venv*", "*.so", "__pycache__", "*.egg-info", "bench-results"))
    return dest


def _without_torch(tmp_path: Path) -> dict:
    """An environment whose Python cannot import torch, as in pip's isolated build environment."""
    shim = tmp_path / "no-torch"
    (shim / "torch").mkdir(parents=True)
    (shim / "torch" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\")\n")
    return dict(os.environ, PYTHONPATH=str(shim))


def test_sdist_made_without_torch_has_every_source(tmp_path):
    src = _source_copy(tmp_path / "src")
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                            env=_without_torch(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (sdist,) = (tmp_path / "dist").glob("resflow_cuda-*.tar.gz")
    assert sdist.name == f"resflow_cuda-{resflow_cuda.__version__}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = [n for n in NEEDED if n not in names]
    cuda = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cu", ".cuh", ".h"))
    missing += [n for n in cuda if n not in names]
    assert not missing, f"missing from the sdist: {missing}"
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]
    with tarfile.open(sdist) as tar:
        pkg_info = tar.extractfile(f"{sdist.name[:-7]}/PKG-INFO").read().decode()
    assert "License-Expression: MIT" in pkg_info and f"Version: {resflow_cuda.__version__}" in pkg_info
    assert "Provides-Extra: kernel-report" in pkg_info


def test_a_build_without_torch_stops_with_one_clear_message(tmp_path):
    src = _source_copy(tmp_path / "src")
    result = subprocess.run([sys.executable, "setup.py", "build_ext"], cwd=src, env=_without_torch(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    message = result.stderr
    assert "torch is not importable" in message and "pip install --no-build-isolation ." in message, message
    assert "compiled against the torch you will run" in message
    assert "Traceback" not in message and "ModuleNotFoundError" not in message
    # the shim hides torch from this process only: the message names the torch that is installed
    assert re.search(rf"torch {re.escape(__import__('torch').__version__)} is installed for", message), message


def test_plain_pip_install_names_no_build_isolation(tmp_path):
    """`pip install .` without --no-build-isolation: pip builds in an isolated environment without torch."""
    src = _source_copy(tmp_path / "src")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--target",
                             str(tmp_path / "target"), "."], cwd=src, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    if "Could not find a version that satisfies the requirement setuptools" in output:
        pytest.skip("pip cannot fetch setuptools for its isolated build environment here (offline)")
    assert result.returncode != 0
    assert "resflow_cuda: cannot build: torch is not importable" in output, output
    assert "pip install --no-build-isolation ." in output
    assert "ModuleNotFoundError" not in output
