"""Peak memory of a call, and a probe that runs one in a fresh interpreter.

CPU: the resident-set high-water mark (VmHWM), reset (Linux clear_refs 5) just before the step,
above the resident set at that moment; freed heap is returned to the system first (malloc_trim),
so that the step's allocations are new pages. CUDA: torch.cuda.max_memory_allocated above the
allocated bytes before the step. A fresh process per measurement keeps one provider's cached
buffers from hiding another's allocations.
"""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys

import torch


def in_subprocess(module: str, function: str, *args) -> float:
    """Runs ``function(*args)`` of ``module`` in a fresh interpreter and returns its number;
    raises RuntimeError with the child's last error line when it fails."""
    code = f"import json, {module} as m; print(json.dumps(m.{function}(*{args!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"memory probe exited with {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}: peak memory needs Linux")


def peak_mib(fn, device: str) -> float:
    """MiB of memory fn() takes at its peak above the state before the call (see the module doc)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        del result
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_mib("VmRSS")
    result = fn()
    del result
    return _status_mib("VmHWM") - base
