"""Small flows, whose step time is overhead (ops dispatched, host syncs), not FLOPs: a toy-sized and a
tabular-sized stack of iResBlocks, forward and one backward (issue "Small flows are bound by
overhead, not FLOPs"; docs/benchmarks-overhead.md)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .base import EAGER, RESFLOW, Case, CaseConfig, Target, gradient_step, overhead_targets
from .iresblock import mlp_pass, normflows_mlp, our_mlp
from .model_step import nll, normflows_nll, normflows_update

NORMFLOWS = "normflows"


@dataclasses.dataclass(frozen=True)
class FlowConfig(CaseConfig):
    model: str  # "toy" (small_step) or "tabular" (tabular_small)
    dim: int
    hidden: tuple
    blocks: int
    batch: int
    mode: str = "fwd+bwd"

    @property
    def label(self) -> str:
        return self.model

    @property
    def dims(self) -> list[int]:
        return [self.dim, *self.hidden, self.dim]

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "hidden": list(self.hidden)}


class SmallStepCase(Case):
    """The forward and one ``backward()`` of a small flow, from the same state every call (the
    optimiser and update_lipschitz are not part of the timed or counted step; update_lipschitz is
    counted separately): 8 iResBlocks over pre-activation LipSwish MLPs 2-64-64-2, InducedNormLinear
    with coeff 0.97 and 5 power iterations, batch 256, the Neumann gradient with backward-in-forward
    (normflows' ``Residual`` default), loss = the standard-normal negative log-likelihood.

    Providers: resflow_cuda (our blocks, fast path), eager (the same model on autograd VJPs,
    ``fast_path=False``, the gate's reference) and normflows (normflows 1.7.3's ``Residual`` over its
    ``LipschitzMLP``, the reference code), all with normflows' initial weights (not zero-initialised,
    so that the gate compares something) and the same seeded roulette draws and probes.
    Targets: ops per step at most 1/5 of normflows', no host syncs, CPU time >= 5x normflows."""

    name = "small_step"
    title = "a small flow's forward + backward: 8 iResBlocks over 2-64-64-2 MLPs, batch 256 (ops, syncs)"
    config = FlowConfig("toy", dim=2, hidden=(64, 64), blocks=8, batch=256)
    coeff = 0.97
    time_factor = 5.0

    def configs(self, quick: bool) -> list[FlowConfig]:
        return [self.config]

    def providers(self) -> dict[str, str]:
        return {RESFLOW: "fast", EAGER: "autograd", NORMFLOWS: "normflows"}

    def make_inputs(self, config: FlowConfig, device: str, rotate: bool = True) -> dict:
        """The batch and normflows' initial weights of every block. Not rotated: a step makes many
        passes over one small batch."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(config.batch, config.dim, generator=g)
        torch.manual_seed(0)
        return {"x": x.to(device), "states": [normflows_mlp(config.dims, self.coeff).state_dict()
                                             for _ in range(config.blocks)]}

    def build(self, provider: str, config: FlowConfig, states: list[dict], device: str) -> torch.nn.Module:
        """The stack of a provider with the shared weights: a ModuleList of normflows' ``Residual``
        flows, or our ``SequentialFlow`` of ``iResBlock``s."""
        if provider == "normflows":
            import normflows as nf

            flows = []
            for state in states:
                net = normflows_mlp(config.dims, self.coeff)
                net.load_state_dict(state)
                flows.append(nf.flows.Residual(net, reverse=False))  # reduce_memory: Neumann, backward-in-forward
            return torch.nn.ModuleList(flows).to(device)
        from resflow_cuda.nn import SequentialFlow, iResBlock

        return SequentialFlow([iResBlock(our_mlp(config.dims, state, self.coeff), neumann_grad=True,
                                         grad_in_forward=True, fast_path=provider == "fast")
                               for state in states]).to(device)

    def runner(self, provider: str, inputs: dict, config: FlowConfig) -> Callable[[], tuple]:
        model = self.build(provider, config, inputs["states"], inputs["x"].device)
        if provider == "normflows":
            return gradient_step(model, normflows_nll(model, inputs["x"]), normflows_update(model))
        return gradient_step(model, nll(model, inputs["x"]))

    def terms(self, config: FlowConfig) -> list[int]:
        """The series length of each block (the draws after ``np.random.seed(0)``, one per block in
        order, plus the 2 exact terms)."""
        import numpy as np

        np.random.seed(0)
        return [int(np.random.geometric(0.5, 1).max()) + 2 for _ in range(config.blocks)]

    def counts(self, config: FlowConfig) -> tuple[float, float]:
        """(FLOPs, bytes) of a step: per block, the passes of its branch counted as for IResBlockCase's
        training step (forward, one per series term, the surrogate's VJP, the Neumann gradient's 5 and
        g's backward 2), each pass as ``mlp_pass``."""
        flops, nbytes = mlp_pass(config.dims, config.batch)
        passes = sum(1 + n + 1 + 5 + 2 for n in self.terms(config))
        return float(passes * flops), float(passes * nbytes)

    def targets(self, rows: list[dict], quick: bool) -> list[Target]:
        """ops per step at most 1/5 of normflows', 0 host syncs, CPU time >= ``time_factor`` x normflows."""
        return overhead_targets(rows, NORMFLOWS, self.time_factor)


class TabularSmallCase(SmallStepCase):
    """As ``small_step`` at the size of the POWER / GAS experiments: D = 6, 3 hidden layers of 64, 10
    blocks, batch 1000. (Not the ``iresblock`` case's 64-512-512-64 ``tabular`` block.) Targets: ops
    per step at most 1/5 of normflows', 0 host syncs, CPU time >= 3x normflows."""

    name = "tabular_small"
    title = "a tabular flow's forward + backward: 10 iResBlocks over 6-64-64-64-6 MLPs, batch 1000 (ops, syncs)"
    config = FlowConfig("tabular", dim=6, hidden=(64, 64, 64), blocks=10, batch=1000)
    time_factor = 3.0
