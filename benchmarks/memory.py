"""Peak memory of one benchmark step, each measurement in a fresh interpreter.

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


def in_subprocess(function: str, *args) -> float:
    """Runs ``function(*args)`` of this module in a fresh interpreter and returns its number;
    raises RuntimeError with the child's last error line when it fails."""
    code = f"import json, {__name__} as m; print(json.dumps(m.{function}(*{args!r})))"
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


def step_peak(case_name: str, quick: bool, index: int, provider: str, device: str) -> float:
    """Peak of one step of a provider on configuration ``index`` of a case, after one warm-up step
    (lazy initialisation and torch.compile's compilation are not part of a step)."""
    from .cases import CASES

    case = CASES[case_name]
    config = case.configs(quick)[index]
    inputs = case.make_inputs(config, device, rotate=False)
    step = case.runner(case.providers()[provider], inputs, config)
    step()
    return peak_mib(step, device)


def sweep_peak(provider: str, block: str, n: int, grad_in_forward: bool, device: str) -> float:
    """Peak of the first training step of an iResBlock case block with n series terms (the
    truncated series), backward-in-forward on or off (IResBlockCase.memory)."""
    import numpy as np

    from .cases import BlockConfig, IResBlockCase

    case = IResBlockCase()
    inputs = case.make_inputs(BlockConfig(block, "train"), device)
    model = case.build(provider, block, inputs["state"], device, n_power_series=n, grad_in_forward=grad_in_forward)
    x = inputs["x"]
    params = [p for p in model.nnet.parameters() if p.requires_grad]
    zero = torch.zeros(x.shape[0], 1, device=x.device)

    def step():
        np.random.seed(0)
        y, logp = model(x, zero)
        return torch.autograd.grad(0.5 * y.square().flatten(1).sum(1).mean() - logp.mean(), params)

    return peak_mib(step, device)
