"""The registry of benchmark cases.

A case names its configurations, builds inputs, lists providers (resflow_cuda, the eager
pure-PyTorch reference, torch.compile of the reference, ...), says how to run one provider in
one mode, how many bytes a configuration must move at least, and which targets it must meet.
The runner (run.py) does the correctness gate, timing, floors and output.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

import resflow_cuda
from resflow_cuda import reference

EAGER = "eager"
COMPILE = "torch.compile"
RESFLOW = "resflow_cuda"

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Config:
    shape: tuple
    mode: str  # "fwd" or "fwd+bwd"
    dtype: str = "float32"

    @property
    def label(self) -> str:
        return "×".join(str(s) for s in self.shape)

    def as_dict(self) -> dict:
        return {"shape": list(self.shape), "mode": self.mode, "dtype": self.dtype}


@dataclasses.dataclass
class Target:
    text: str
    met: bool
    detail: str


class LipSwishCase:
    name = "lipswish"
    title = "LipSwish y = x·σ(softplus(β)·x)/1.1"
    shapes = [(256, 1024), (64, 64, 32, 32), (4096, 4096)]
    quick_shapes = [(256, 1024), (64, 64, 32, 32)]
    modes = ["fwd", "fwd+bwd"]

    def configs(self, quick: bool) -> list[Config]:
        return [Config(s, m) for s in (self.quick_shapes if quick else self.shapes) for m in self.modes]

    def providers(self) -> dict[str, Callable]:
        return {
            RESFLOW: resflow_cuda.ops.lipswish,
            EAGER: reference.lipswish,
            COMPILE: torch.compile(reference.lipswish, dynamic=False),
        }

    def make_inputs(self, config: Config, device: str) -> dict:
        g = torch.Generator(device="cpu").manual_seed(0)
        dtype = _DTYPES[config.dtype]
        x = torch.randn(config.shape, generator=g).to(device=device, dtype=dtype)
        return {
            "x": x,
            "beta": torch.tensor([0.5], device=device, dtype=dtype),
            "grad": torch.randn(config.shape, generator=g).to(device=device, dtype=dtype),
        }

    def runner(self, fn: Callable, inputs: dict, config: Config) -> Callable[[], tuple]:
        """A no-argument callable doing one step of the mode and returning its outputs."""
        x, beta, grad = inputs["x"], inputs["beta"], inputs["grad"]
        if config.mode == "fwd":

            def step():
                with torch.no_grad():
                    return (fn(x, beta),)

            return step
        xg = x.detach().clone().requires_grad_(True)
        bg = beta.detach().clone().requires_grad_(True)

        def step():
            y = fn(xg, bg)
            gx, gb = torch.autograd.grad(y, (xg, bg), grad)
            return y, gx, gb

        return step

    def floor_runner(self, inputs: dict) -> tuple[Callable[[], object], int]:
        """The memory-bandwidth floor: a clone of x, and the bytes it moves."""
        x = inputs["x"]
        return (lambda: x.clone()), 2 * x.numel() * x.element_size()

    def bytes_moved(self, config: Config) -> int:
        """Least traffic: forward reads x, writes y; backward reads grad and x, writes grad_x."""
        n = math.prod(config.shape) * torch.empty((), dtype=_DTYPES[config.dtype]).element_size()
        return 2 * n if config.mode == "fwd" else 5 * n

    def tolerance(self, config: Config) -> dict:
        return dict(atol=1e-5, rtol=1e-4) if config.dtype == "float32" else dict(atol=1e-2, rtol=1e-2)

    def targets(self, rows: list[dict], quick: bool) -> list[Target]:
        """Issue #2: fused fwd+bwd ≥ 4× eager and ≥ 1× torch.compile on every shape, and within
        2× of the memory floor on the largest shape."""
        out = []
        timed = [r for r in rows if r["provider"] == RESFLOW and r["config"]["mode"] == "fwd+bwd" and r["status"] == "ok"]
        for r in timed:
            label = r["label"]
            if r.get("speedup_vs_eager") is not None:
                out.append(Target(f"fwd+bwd {label}: ≥ 4× eager", r["speedup_vs_eager"] >= 4.0,
                                  f"{r['speedup_vs_eager']:.2f}×"))
            if r.get("speedup_vs_compile") is not None:
                out.append(Target(f"fwd+bwd {label}: ≥ 1× torch.compile", r["speedup_vs_compile"] >= 1.0,
                                  f"{r['speedup_vs_compile']:.2f}×"))
        largest = max(self.shapes, key=math.prod)
        for r in timed:
            if tuple(r["config"]["shape"]) == largest and r.get("vs_floor") is not None:
                out.append(Target(f"fwd+bwd {r['label']}: within 2× of the memory floor", r["vs_floor"] <= 2.0,
                                  f"{r['vs_floor']:.2f}× the floor"))
        return out


CASES = {case.name: case for case in (LipSwishCase(),)}
