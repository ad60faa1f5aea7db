"""Timing and environment metadata for the benchmark runner."""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils import benchmark as tbench


@dataclasses.dataclass
class Timing:
    median_s: float
    iqr_s: float
    runs: int


def measure(fn, min_run_time: float, device: str = "cpu") -> Timing:
    """Median and IQR of fn(). CPU: torch.utils.benchmark's blocked autorange (warm-up excluded)
    with all of torch's threads (Timer defaults to one). CUDA: see measure_cuda."""
    if device == "cuda":
        return measure_cuda(fn, min_run_time)
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return Timing(median_s=m.median, iqr_s=m.iqr, runs=len(m.times))


def measure_cuda(fn, min_run_time: float, warmup: int = 3) -> Timing:
    """CUDA-event timing: after ``warmup`` synchronised calls, blocks of calls each bracketed by a
    pair of events on the current stream (the block size chosen so that a block takes about 10 ms),
    until ``min_run_time`` seconds of GPU time; per-call median and IQR over the blocks."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    per_call = max(start.elapsed_time(end) / 1e3, 1e-7)
    block = max(1, int(0.01 / per_call))
    times, total = [], 0.0
    while total < min_run_time or len(times) < 5:
        start.record()
        for _ in range(block):
            fn()
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
        times.append(seconds / block)
        total += seconds
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return Timing(median_s=q(0.5), iqr_s=q(0.75) - q(0.25), runs=len(times))


def first_call_seconds(fn) -> float:
    """Wall time of one call, synchronised: used for torch.compile's compile time."""
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def steady_state_allocator() -> str:
    """Make glibc serve large CPU buffers from its heap instead of a fresh mmap per allocation.

    By default every allocation over 32 MiB is a new mapping whose pages the kernel faults in and
    zeroes on first touch; at 4096×4096 that costs more than the kernels themselves and varies with
    the process's allocation history. Raising the mmap and trim thresholds (as a caching allocator
    such as jemalloc or PyTorch's CUDA allocator would) measures steady-state compute and memory
    traffic for every provider alike. Returns a description for the metadata."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        if libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1):
            return "glibc malloc, mmap and trim thresholds raised to 1-2 GiB (buffers reused, no page faults)"
    except OSError:
        pass
    return "system default"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str, allocator: str) -> dict:
    import resflow_cuda

    meta = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "git_revision": _git_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "resflow_cuda": resflow_cuda.build_info(),
        "device": device,
        "allocator": allocator,
    }
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
        meta["cuda_runtime"] = torch.version.cuda
    return meta
