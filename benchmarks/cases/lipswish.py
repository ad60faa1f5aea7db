"""LipSwish forward and forward+backward on activations of several shapes."""

from __future__ import annotations

import itertools
import math
from typing import Callable

import torch

import resflow_cuda
from resflow_cuda import reference

from .base import COMPILE, DTYPES, EAGER, RESFLOW, Case, Config, Target, rotation


class LipSwishCase(Case):
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
            "normflows": _NormflowsLipSwish(),
        }

    def make_inputs(self, config: Config, device: str, rotate: bool = True) -> dict:
        """x, β and the upstream gradient; with ``rotate``, as many copies of x and the gradient as
        it takes to exceed the caches (see ``rotation``), cycled through by the step."""
        g = torch.Generator(device="cpu").manual_seed(0)
        dtype = DTYPES[config.dtype]
        x = torch.randn(config.shape, generator=g).to(device=device, dtype=dtype)
        grad = torch.randn(config.shape, generator=g).to(device=device, dtype=dtype)
        copies = rotation(2 * x.numel() * x.element_size(), device) if rotate else 1
        train = config.mode == "fwd+bwd"
        return {
            "x": [x.clone().requires_grad_(train) for _ in range(copies)],
            "beta": torch.tensor([0.5], device=device, dtype=dtype, requires_grad=train),
            "grad": [grad.clone() for _ in range(copies)],
            "rotation": copies,
        }

    def runner(self, fn: Callable, inputs: dict, config: Config) -> Callable[[], tuple]:
        """A no-argument callable doing one step of the mode on the next copy of the inputs and
        returning its outputs (the first call uses the first copy, for every provider)."""
        xs, beta, grads = inputs["x"], inputs["beta"], inputs["grad"]
        turn = itertools.count()
        if config.mode == "fwd":

            def step():
                with torch.no_grad():
                    return (fn(xs[next(turn) % len(xs)], beta),)

            return step

        def step():
            i = next(turn) % len(xs)
            y = fn(xs[i], beta)
            gx, gb = torch.autograd.grad(y, (xs[i], beta), grads[i])
            return y, gx, gb

        return step

    def bytes_moved(self, config: Config, inputs: dict) -> int:
        """Least traffic: forward reads x, writes y; backward reads grad and x, writes grad_x."""
        n = math.prod(config.shape) * torch.empty((), dtype=DTYPES[config.dtype]).element_size()
        return 2 * n if config.mode == "fwd" else 5 * n

    def flops(self, config: Config, inputs: dict) -> float:
        """Per element: 6 forward (β·x, exp, +1, reciprocal, ·x, /1.1) and 11 more backward (the
        derivative s(1 + t(1 − s))/1.1 times the gradient: 6; β's gradient term and its sum: 5)."""
        return float(math.prod(config.shape) * (6 if config.mode == "fwd" else 17))

    def tolerance(self, config: Config) -> dict:
        return dict(atol=1e-5, rtol=1e-4) if config.dtype == "float32" else dict(atol=1e-2, rtol=1e-2)

    def targets(self, rows: list[dict], quick: bool) -> list[Target]:
        """Fused fwd+bwd ≥ 4× eager and ≥ 1× torch.compile on every shape, and within 2× of the
        memory floor on the largest shape."""
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


class _NormflowsLipSwish:
    """normflows' LipSwish (``normflows.nets.lipschitz.Swish``) called with the case's β: one
    module whose ``beta`` parameter is replaced by that tensor (built at the first call, so that a
    missing normflows makes the provider N/A)."""

    module = None

    def __call__(self, x, beta):
        if self.module is None:
            from normflows.nets.lipschitz import Swish

            self.module = Swish()
            del self.module.beta
        self.module.beta = beta
        return self.module(x)
