"""Training steps of the other family members beside the residual models they are compared with:
ImplicitBlock against two iResBlocks, coupling against residual."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch

from .base import EAGER, RESFLOW, Case, CaseConfig, digits_flow, model_batch, training_step


@dataclasses.dataclass(frozen=True)
class FamilyConfig(CaseConfig):
    data: str  # "toy" or "digits"
    model: str  # "implicit", "2 iresblocks", "coupling", "residual"
    mode: str = "train step"

    @property
    def label(self) -> str:
        return f"{self.data} {self.model}"


class FamilyStepCase(Case):
    """Training steps (loss, backward into every parameter, Adam, update_lipschitz) of the other
    members of the family beside the residual model they are compared with, from the same state
    and draws every call:

    - ``implicit`` vs ``2 iresblocks``: one ImplicitBlock against two iResBlocks with branches of
      the same width (toy: LipSwish MLPs 2-128-128-2, batch 512; digits: LipSwish CNNs 1-32-32-1 with
      3×3, 1×1, 3×3 kernels on 1×8×8, batch 64), Neumann gradient with backward-in-forward;
    - ``coupling`` vs ``residual`` at (nearly) equal parameter count: toy: two affine coupling
      blocks (the reference's CouplingBlock over 1-128-128-2 MLPs, 33.8k parameters) against the two
      iResBlocks above (34.3k); digits: ``ResidualFlow(block_type='coupling')`` against the residual one, 2 scales ×
      4 blocks, idim 64, batch 64.

    Providers: resflow_cuda (fast path) and eager = the same model on autograd VJPs (the reference's
    algorithm). Coupling models have no series, so both providers run the same code there."""

    name = "family_step"
    title = "ImplicitBlock vs two iResBlocks, coupling vs residual: training steps (eager = autograd VJPs)"
    configs_all = [FamilyConfig("toy", m) for m in ("implicit", "2 iresblocks", "coupling")] + \
        [FamilyConfig("digits", m) for m in ("implicit", "2 iresblocks", "coupling", "residual")]

    def configs(self, quick: bool) -> list[FamilyConfig]:
        return self.configs_all[:1] if quick else self.configs_all

    def providers(self) -> dict[str, str]:
        return {RESFLOW: "fast", EAGER: "autograd"}

    @staticmethod
    def _mlp(dims):
        from resflow_cuda.nn import LipSwish, get_linear

        layers = []
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            layers += [LipSwish()] if i else []
            layers.append(get_linear(a, b, coeff=0.9, n_iterations=5, domain=2, codomain=2))
        return torch.nn.Sequential(*layers)

    @staticmethod
    def _cnn(channels=(1, 32, 32, 1), kernels=(3, 1, 3)):
        from resflow_cuda.nn import LipSwish, get_conv2d

        layers = []
        for i, (a, b, k) in enumerate(zip(channels, channels[1:], kernels)):
            layers += [LipSwish()] if i else []
            layers.append(get_conv2d(a, b, k, 1, k // 2, coeff=0.9, n_iterations=5, domain=2, codomain=2))
        return torch.nn.Sequential(*layers)

    def build(self, config: FamilyConfig):
        from resflow_cuda.nn import ImplicitBlock, SequentialFlow, iResBlock

        torch.manual_seed(0)
        branch = (lambda: self._mlp([2, 128, 128, 2])) if config.data == "toy" else self._cnn
        if config.model == "implicit":
            return ImplicitBlock(branch(), branch())
        if config.model == "coupling" and config.data == "toy":
            from resflow_cuda.nn import CouplingBlock

            nets = [torch.nn.Sequential(torch.nn.Linear(1, 128), torch.nn.ELU(), torch.nn.Linear(128, 128),
                                        torch.nn.ELU(), torch.nn.Linear(128, 2)) for _ in range(2)]
            return SequentialFlow([CouplingBlock(2, net, swap=i % 2 == 1) for i, net in enumerate(nets)])
        if config.model == "2 iresblocks":
            return SequentialFlow([iResBlock(branch(), grad_in_forward=True) for _ in range(2)])
        return digits_flow(intermediate_dim=64, block_type="resblock" if config.model == "residual" else "coupling")

    def make_inputs(self, config: FamilyConfig, device: str, rotate: bool = True) -> dict:
        """The batch and the initial state. Not rotated: a step makes many passes over one batch."""
        x = model_batch(config.data)
        model = self.build(config)
        with torch.no_grad():
            model(x[:16], torch.zeros(16, 1))  # ActNorm's data initialisation and the convolutions' u / v
        return {"x": x.to(device), "state": model.state_dict()}

    def runner(self, provider: str, inputs: dict, config: FamilyConfig) -> Callable[[], tuple]:
        from resflow_cuda import models

        x = inputs["x"]
        model = self.build(config).to(x.device)
        model.load_state_dict(inputs["state"])
        for m in model.modules():
            if hasattr(m, "fast_path"):
                m.fast_path = provider == "fast"

        def loss_fn():
            z, delta = model(x, x.new_zeros(x.shape[0], 1))
            return -(models.standard_normal_logprob(z).flatten(1).sum(1) - delta.view(-1)).mean()

        return training_step(model, loss_fn)

    @functools.lru_cache(maxsize=None)
    def counts(self, config: FamilyConfig) -> tuple[float, float]:
        """Counted, not modelled: one step of the autograd provider (every product an ATen op, none
        hidden in our fused ops) under :class:`_OperandCounter`; the implicit block's solver steps
        vary with the weights, so they are counted as they run."""
        inputs = self.make_inputs(config, "cpu")
        counter = _OperandCounter().count(self.runner("autograd", inputs, config))
        return float(counter.flops), float(counter.bytes)


class _OperandCounter:
    """FLOPs and operand bytes of the matrix products and convolutions one call runs: FLOPs by the
    formulas of torch.utils.flop_counter (its FlopCounterMode cannot be used: its module hooks break
    the autograd.grad calls inside an implicit block's backward), bytes as every input and output of
    those ops read or written once (elementwise work is left out, so both are floors)."""

    def __init__(self) -> None:
        self.flops = 0.0
        self.bytes = 0.0

    def count(self, fn: Callable[[], object]) -> "_OperandCounter":
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        counter = self

        class Counting(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = flop_registry.get(func._overloadpacket)
                if formula is not None:
                    counter.flops += formula(*args, **kwargs, out_val=out)
                    results = out if isinstance(out, (tuple, list)) else (out,)
                    counter.bytes += sum(t.numel() * t.element_size() for t in (*args, *results)
                                         if isinstance(t, torch.Tensor))
                return out

        with Counting():
            fn()
        return self
