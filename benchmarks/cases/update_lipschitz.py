"""update_lipschitz (power iteration on every Lipschitz layer of a model) after an optimiser step."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from resflow_cuda import reference

from .base import COMPILE, EAGER, RESFLOW, Case, CaseConfig, Target, speedup_targets


@dataclasses.dataclass(frozen=True)
class StackConfig(CaseConfig):
    stack: str  # "mlp" or "conv<resolution>"
    mode: str  # "5 iterations" or "tol 1e-3"

    @property
    def label(self) -> str:
        return self.stack


class UpdateLipschitzCase(Case):
    """update_lipschitz after an optimiser step on stacks shaped like the reference models: the toy
    MLP (2-128-128-128-128-2, InducedNormLinear) and one scale of the CIFAR-10 model's residual
    branch (C->512 3x3, 512->512 1x1, 512->C 3x3 InducedNormConv2d; C = 3, 12, 48 at 32, 16, 8)."""

    name = "update_lipschitz"
    title = "power iteration on every Lipschitz layer of a model"
    stacks = {"mlp": None, "conv32": (3, 32), "conv16": (12, 16), "conv8": (48, 8)}
    quick_stacks = ["mlp", "conv8"]
    modes = ["5 iterations", "tol 1e-3"]
    # sigma, u and v equal eager's up to float32 rounding: each matrix-vector product rounds at ~1e-7 relative
    # and the iteration contracts towards the top singular pair rather than amplifying it; u and v are unit
    # vectors, so 1e-6 is absolute on entries of at most 1 (a wrong or stale u or v is off by far more)
    atol, rtol = 1e-6, 1e-5

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

    def make_inputs(self, config: StackConfig, device: str, rotate: bool = True) -> dict:
        """Our layers after construction and a first forward, then a small "optimiser step"; and the
        iterations the reference takes on each layer from that state. Not rotated: every step starts
        from this state (a copy of a few MiB at most), as an update after an optimiser step does."""
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
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            iterations = _reference_update(model)
        return {"state": state, "config": config, "iterations": iterations}

    def providers(self) -> dict[str, Callable]:
        return {RESFLOW: "resflow", EAGER: "eager", COMPILE: "compile", "normflows": "normflows"}

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
            if provider == "resflow":
                update = lambda: resflow_cuda.update_lipschitz(model)  # noqa: E731
            else:
                reference_update = torch.compile(_reference_update, dynamic=False) if provider == "compile" \
                    else _reference_update
                update = lambda: reference_update(model)  # noqa: E731
        model = model.to(next(iter(state.values())).device)
        model.load_state_dict(state)
        live = list(model.state_dict().values())
        snapshot = [t.clone() for t in live]

        def step():
            with torch.no_grad():
                torch._foreach_copy_(live, snapshot)  # every call starts from the same state
                update()
            # per layer (sigma, u, v), all three compared with eager's by the gate. u and v are the live
            # buffers, not copies: the gate compares a step's outputs before the next call overwrites them,
            # and the step's op count stays that of the update and the sigma copies (budgets.json)
            return tuple(t for m in model for t in (m.scale.clone(), m.u, m.v))

        return step

    def _operators(self, stack: str) -> list[tuple[int, int]]:
        """Per layer: (FLOPs, bytes) of one application of the operator or its transpose: a
        matrix-vector product for dense and 1×1 layers (the reference treats those as matrices);
        for k×k convolutions a convolution of 1×C×H×W, reading the kernel, the input and the output."""
        if stack == "mlp":
            dims = [2, 128, 128, 128, 128, 2]
            return [(2 * a * b, 4 * (a * b + a + b)) for a, b in zip(dims, dims[1:])]
        c, hw = self.stacks[stack]
        out = []
        for a, b, k in ((c, 512, 3), (512, 512, 1), (512, c, 3)):
            pixels = 1 if k == 1 else hw * hw
            out.append((2 * a * b * k * k * pixels, 4 * (a * b * k * k + (a + b) * pixels)))
        return out

    def bytes_moved(self, config: StackConfig, inputs: dict) -> float:
        """Each iteration applies every operator and its transpose once, plus u^T A v at the end."""
        return float(sum((2 * it + 1) * nbytes for it, (_, nbytes) in
                         zip(inputs["iterations"], self._operators(config.stack))))

    def flops(self, config: StackConfig, inputs: dict) -> float:
        """As bytes_moved, in FLOPs (the normalisations are O(length of u and v): left out)."""
        return float(sum((2 * it + 1) * f for it, (f, _) in zip(inputs["iterations"], self._operators(config.stack))))

    def targets(self, rows: list[dict], quick: bool) -> list[Target]:
        """>= 3x the reference on the MLP stack and >= 1.5x on the conv stacks."""
        return speedup_targets(rows, lambda label: 3.0 if label == "mlp" else 1.5, "the reference")


def _reference_update(model) -> list[int]:
    """The reference's update_lipschitz in pure PyTorch: each layer's Python power-iteration loop.
    Returns the iterations taken per layer."""
    iterations = []
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
        u, v, sigma, taken = reference.power_iteration(weight, m.u, m.v, max_iterations, atol if tol else None,
                                                       rtol if tol else None, domain, codomain, True, matvec, rmatvec)
        m.u.copy_(u)
        m.v.copy_(v)
        m.scale.copy_(sigma)
        iterations.append(int(taken))
    return iterations
