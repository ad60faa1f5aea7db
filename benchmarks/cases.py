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




@dataclasses.dataclass(frozen=True)
class StackConfig:
    stack: str  # "mlp" or "conv<resolution>"
    mode: str  # "5 iterations" or "tol 1e-3"

    @property
    def label(self) -> str:
        return self.stack

    def as_dict(self) -> dict:
        return {"stack": self.stack, "mode": self.mode}


class UpdateLipschitzCase:
    """update_lipschitz after an optimiser step on stacks shaped like the reference models: the toy
    MLP (2-128-128-128-128-2, InducedNormLinear) and one scale of the CIFAR-10 model's residual
    branch (C->512 3x3, 512->512 1x1, 512->C 3x3 InducedNormConv2d; C = 3, 12, 48 at 32, 16, 8)."""

    name = "update_lipschitz"
    title = "power iteration on every Lipschitz layer of a model"
    stacks = {"mlp": None, "conv32": (3, 32), "conv16": (12, 16), "conv8": (48, 8)}
    quick_stacks = ["mlp", "conv8"]
    modes = ["5 iterations", "tol 1e-3"]

    def configs(self, quick: bool) -> list[StackConfig]:
        return [StackConfig(s, m) for s in (self.quick_stacks if quick else self.stacks) for m in self.modes]

    def _build(self, stack: str, mode: str, linear, conv):
        settings = dict(n_iterations=5) if mode == "5 iterations" else dict(atol=1e-3, rtol=1e-3)
        if stack == "mlp":
            dims = [2, 128, 128, 128, 128, 2]
            return torch.nn.Sequential(*[linear(a, b, coeff=0.9, **settings) for a, b in zip(dims, dims[1:])])
        c, _ = self.stacks[stack]
        return torch.nn.Sequential(conv(c, 512, 3, 1, 1, coeff=0.98, **settings),
                                   conv(512, 512, 1, 1, 0, coeff=0.98, **settings),
                                   conv(512, c, 3, 1, 1, coeff=0.98, **settings))

    def make_inputs(self, config: StackConfig, device: str) -> dict:
        """Our layers after construction and a first forward, then a small "optimiser step"."""
        import resflow_cuda.nn as rnn

        torch.manual_seed(0)
        model = self._build(config.stack, config.mode, rnn.InducedNormLinear, rnn.InducedNormConv2d).to(device)
        if config.stack == "mlp":
            model(torch.zeros(1, 2, device=device))
        else:
            c, hw = self.stacks[config.stack]
            x = torch.zeros(1, c, hw, hw, device=device)
            for layer in model:
                x = layer(x)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-2 * torch.randn_like(p) * p.abs().mean())
        return {"state": model.state_dict(), "config": config}

    def providers(self) -> dict[str, Callable]:
        return {RESFLOW: "resflow", EAGER: "eager", "normflows": "normflows"}

    def runner(self, provider: str, inputs: dict, config: StackConfig) -> Callable[[], tuple]:
        import resflow_cuda
        import resflow_cuda.nn as rnn

        state = inputs["state"]
        if provider == "normflows":
            from normflows.nets.lipschitz import InducedNormConv2d, InducedNormLinear
            from normflows.utils.optim import update_lipschitz as nf_update

            model = self._build(config.stack, config.mode, InducedNormLinear, InducedNormConv2d)
            if config.stack != "mlp":  # normflows sizes u and v at the first forward: a dummy one first
                c, hw = self.stacks[config.stack]
                x = torch.zeros(1, c, hw, hw)
                with torch.no_grad():
                    for layer in model:
                        x = layer(x)
            update = (lambda: nf_update(model, None)) if config.mode == "tol 1e-3" else (lambda: nf_update(model, 5))
        else:
            model = self._build(config.stack, config.mode, rnn.InducedNormLinear, rnn.InducedNormConv2d)
            update = (lambda: resflow_cuda.update_lipschitz(model)) if provider == "resflow" else \
                (lambda: _reference_update(model))
        model = model.to(next(iter(state.values())).device)
        model.load_state_dict(state)
        live = list(model.state_dict().values())
        snapshot = [t.clone() for t in live]

        def step():
            with torch.no_grad():
                torch._foreach_copy_(live, snapshot)  # every call starts from the same state
            update()
            return tuple(m.scale.clone() for m in model)

        return step

    def bytes_moved(self, config) -> None:
        return None

    def tolerance(self, config) -> dict:
        return dict(atol=1e-6, rtol=1e-5)  # equal sigma up to float rounding

    def targets(self, rows: list[dict], quick: bool) -> list[Target]:
        """Issue #4: >= 3x the reference on the MLP stack and >= 1.5x on the conv stacks."""
        out = []
        for r in rows:
            if r["provider"] == RESFLOW and r["status"] == "ok" and r.get("speedup_vs_eager") is not None:
                need = 3.0 if r["label"] == "mlp" else 1.5
                out.append(Target(f"{r['label']} {r['config']['mode']}: >= {need}x the reference",
                                  r["speedup_vs_eager"] >= need, f"{r['speedup_vs_eager']:.2f}x"))
        return out


def _reference_update(model) -> None:
    """The reference's update_lipschitz in pure PyTorch: each layer's Python power-iteration loop."""
    for m in model.modules():
        if not hasattr(m, "compute_domain_codomain"):
            continue
        n_iterations, atol, rtol, max_iterations = m._iteration_settings(None, None, None, 200)
        tol = n_iterations is None
        domain, codomain = m.compute_domain_codomain()
        weight = m.weight.detach()
        matvec = rmatvec = None  # InducedNormLinear, or a 1x1 convolution as a matrix
        if weight.dim() == 4 and m._pointwise:
            weight = m._matrix(weight)
        elif weight.dim() == 4:
            matvec, rmatvec = reference.conv_operator(weight, m._input_hw, m.stride, m.padding)
        u, v, sigma, _ = reference.power_iteration(weight, m.u, m.v, max_iterations, atol if tol else None,
                                                   rtol if tol else None, domain, codomain, True, matvec, rmatvec)
        m.u.copy_(u)
        m.v.copy_(v)
        m.scale.copy_(sigma)


CASES = {case.name: case for case in (LipSwishCase(), UpdateLipschitzCase())}
