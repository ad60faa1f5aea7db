"""Builds and loads the emulated test extension (tests/emulated), and names the CUDA kernels.

The extension compiles the kernel headers of csrc/cuda with the host compiler against the CPU
emulation of the CUDA execution model. ``RESFLOW_EMU_SANITIZE=thread`` or ``=address`` builds it
with ThreadSanitizer or AddressSanitizer + UBSan (the process must then be started with the
sanitizer runtime in LD_PRELOAD; see docs/cuda.md, "Emulated CUDA suite").
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import torch
import torch.utils.cpp_extension

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
EMULATED = Path(__file__).resolve().parent / "emulated"

SANITIZER_FLAGS = {
    "": ["-O2", "-g0"],
    "thread": ["-O1", "-g", "-fsanitize=thread"],
    "address": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                "-fno-sanitize-recover=undefined"],
}


def sanitizer() -> str:
    value = os.environ.get("RESFLOW_EMU_SANITIZE", "")
    if value not in SANITIZER_FLAGS:
        raise ValueError(f"RESFLOW_EMU_SANITIZE must be one of {sorted(SANITIZER_FLAGS)}, got {value!r}")
    return value


@functools.cache
def ops():
    """torch.ops.resflow_emulated, building the extension on first use (cached in build/emulated)."""
    san = sanitizer()
    name = "resflow_emulated" + (f"_{san}" if san else "")
    build_dir = ROOT / "build" / "emulated" / (san or "plain")
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = SANITIZER_FLAGS[san]
    # The sanitizer runtime preloaded into this process must not be preloaded into the compiler.
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        torch.utils.cpp_extension.load(
            name=name,
            sources=[str(EMULATED / "emulated_ops.cpp")],
            extra_include_paths=[str(CSRC / "include"), str(CSRC), str(EMULATED)],
            extra_cflags=flags + ["-Wno-unknown-pragmas"],
            extra_ldflags=[f for f in flags if f.startswith("-fsanitize")],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    return torch.ops.resflow_emulated


_KERNEL_RE = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)\s*)?(\w+)\s*\(")


def source_kernels() -> set[str]:
    """Names of every __global__ function in the library's CUDA sources (csrc/cuda)."""
    names = set()
    for path in list((CSRC / "cuda").glob("*.cuh")) + list((CSRC / "cuda").glob("*.cu")):
        names.update(_KERNEL_RE.findall(path.read_text()))
    return names
