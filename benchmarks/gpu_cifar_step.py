"""A training step of the reference CIFAR-10 ResidualFlow, fast path against autograd VJPs.

    python -m benchmarks.gpu_cifar_step --out cifar_step.json                  # CUDA, batch 64
    python -m benchmarks.gpu_cifar_step --device cpu --steps 1 --batch 2       # a smoke test on the CPU
    python -m benchmarks.gpu_cifar_step --device cpu --steps 1 --batch 2 --nblocks 1-1-1 --idim 32

The model is ``resflow_cuda.models.ResidualFlow`` with the arguments of the reference
``train_img.py`` for CIFAR-10 (3×32×32, three scales of 16 blocks, idim 512, LipSwish, Poisson
roulette with 2 exact terms, Neumann gradient with backward-in-forward, coeff 0.98 with power
iterations to a 1e-3 tolerance, LogitTransform(0.05), ActNorm, 4 FC blocks at the end), float32.
A step is the reference's: seeded draws, bits/dim of the dequantised batch, backward, gradient
clipping at 1, Adam (betas 0.9 and 0.99, the learning rate ramped up to 1e-3 over 1000 steps:
these are the first steps of a run) and ``update_lipschitz``. Both providers start
from the same state (ActNorm initialised on the batch) and take the same draws per step; the
second runs with ``fast_path=False`` on every block (autograd VJPs, the reference's algorithm).
Per provider: the time of each step (CUDA events on the GPU, wall time on the CPU) after warm-up
steps and its median, the largest memory allocated since the provider started
(``torch.cuda.max_memory_allocated``, reset between providers) and the peak of one step above the
state before it (``peak.peak_mib``, as the benchmark runner's ``peak MiB``). The JSON is written
after each provider, so a run cut short keeps the first.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import resflow_cuda

from .gpu_stages import FACTS_PREFIX
from .peak import peak_mib

PROVIDERS = {"fast": True, "autograd": False}


def reference_config(n_blocks=(16, 16, 16), idim: int = 512) -> dict:
    """ResidualFlow's keyword arguments as train_img.py sets them for CIFAR-10 (its defaults)."""
    return dict(n_blocks=list(n_blocks), intermediate_dim=idim, factor_out=False, quadratic=False, actnorm=True,
                fc_actnorm=False, batchnorm=False, dropout=0, fc=False, coeff=0.98, vnorms="2222",
                n_lipschitz_iters=None, sn_atol=1e-3, sn_rtol=1e-3, n_power_series=None, n_dist="poisson",
                n_samples=1, kernels="3-1-3", activation_fn="swish", fc_end=True, fc_idim=128, n_exact_terms=2,
                preact=True, neumann_grad=True, grad_in_forward=True, first_resblock=True, learn_p=False)


def build(batch: int, config: dict, device: str):
    """The model (seeded) on ``device`` and a batch of images in [0, 1] with 256 levels."""
    from resflow_cuda import models
    from resflow_cuda.nn import LogitTransform

    torch.manual_seed(0)
    model = models.ResidualFlow((batch, 3, 32, 32), init_layer=LogitTransform(0.05), **config).to(device)
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (batch, 3, 32, 32), generator=g).float() / 255).to(device)
    return model, x


def set_fast_path(model: torch.nn.Module, enabled: bool) -> None:
    for m in model.modules():
        if isinstance(m, resflow_cuda.nn.iResBlock):
            m.fast_path = enabled


def reference_step(model: torch.nn.Module, x: torch.Tensor, lr: float = 1e-3, warmup_iters: int = 1000):
    """``step(i)``: iteration i of train_img.py's loop (learning rate ramped up linearly over its
    first ``warmup_iters`` iterations, as there) with the draws of seed i; returns the loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))

    def step(i: int) -> torch.Tensor:
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (i + 1) / warmup_iters)
        np.random.seed(i)
        torch.manual_seed(i)
        loss = model.bits_per_dim(x).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        resflow_cuda.update_lipschitz(model)
        return loss.detach()

    return step


def time_steps(step, first: int, count: int, device: str) -> tuple[list[float], list[float]]:
    """Seconds of steps ``first .. first + count - 1`` (CUDA events on the GPU) and their losses."""
    times, losses = [], []
    for i in range(first, first + count):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            loss = step(i)
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return times, losses


def measure(model, x, state: dict, provider: str, warmup: int, steps: int, device: str) -> dict:
    """One provider from ``state``: warm-up, timed steps, memory."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model.load_state_dict(state)
    set_fast_path(model, PROVIDERS[provider])
    step = reference_step(model, x)
    warm_times, warm_losses = time_steps(step, 0, warmup, device)
    times, losses = time_steps(step, warmup, steps, device)
    row = {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3,
           "times_ms": [round(t * 1e3, 3) for t in times], "warmup_ms": [round(t * 1e3, 3) for t in warm_times],
           "losses": warm_losses + losses}
    if device == "cuda":
        row["max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    row["peak_step_mib"] = peak_mib(lambda: step(warmup + steps), device)
    return row


def run(device: str, batch: int, steps: int, warmup: int, n_blocks, idim: int, providers, out: Path | None) -> dict:
    """Measures ``providers`` and writes the result to ``out`` after each one; returns it."""
    config = reference_config(n_blocks, idim)
    t0 = time.perf_counter()
    model, x = build(batch, config, device)
    with torch.no_grad():
        model(x)  # ActNorm's data initialisation and the convolutions' first power iterations
    state = copy.deepcopy(model.state_dict())
    result = {"model": "ResidualFlow, train_img.py CIFAR-10 configuration", "input": [batch, 3, 32, 32],
              "dtype": "float32", "config": config, "device": device, "warmup": warmup, "steps": steps,
              "parameters": sum(p.numel() for p in model.parameters()), "setup_s": time.perf_counter() - t0,
              "torch": torch.__version__, "build_info": resflow_cuda.build_info(), "providers": {}}
    if device == "cuda":
        result.update(gpu=torch.cuda.get_device_name(), cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                      matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    for provider in providers:
        row = measure(model, x, state, provider, warmup, steps, device)
        result["providers"][provider] = row
        print(f"{provider}: median {row['median_ms']:.1f} ms per step, peak of a step {row['peak_step_mib']:.0f} MiB"
              + (f", max allocated {row['max_allocated_mib']:.0f} MiB" if "max_allocated_mib" in row else ""),
              flush=True)
        fast, slow = result["providers"].get("fast"), result["providers"].get("autograd")
        if fast and slow:
            result["speedup_fast_vs_autograd"] = slow["median_ms"] / fast["median_ms"]
            result["first_loss_rel_diff"] = abs(fast["losses"][0] - slow["losses"][0]) / abs(slow["losses"][0])
        if out is not None:
            out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per provider (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--nblocks", default="16-16-16", help="blocks per scale (the reference: 16-16-16)")
    parser.add_argument("--idim", type=int, default=512, help="width of the residual branches (the reference: 512)")
    parser.add_argument("--providers", default="fast,autograd", help="comma-separated: fast, autograd")
    parser.add_argument("--out", default=None, help="JSON file to write (rewritten after each provider)")
    args = parser.parse_args(argv)
    providers = [p for p in args.providers.split(",") if p]
    if unknown := set(providers) - set(PROVIDERS):
        parser.error(f"unknown providers {sorted(unknown)}")
    n_blocks = [int(n) for n in args.nblocks.split("-")]
    out = Path(args.out) if args.out else None
    result = run(args.device, args.batch, args.steps, args.warmup, n_blocks, args.idim, providers, out)
    facts = {f"{p}_ms": round(r["median_ms"], 1) for p, r in result["providers"].items()}
    facts.update({f"{p}_peak_mib": round(r["peak_step_mib"]) for p, r in result["providers"].items()})
    if "speedup_fast_vs_autograd" in result:
        facts["speedup"] = round(result["speedup_fast_vs_autograd"], 2)
    print(FACTS_PREFIX + json.dumps(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
