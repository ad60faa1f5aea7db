"""One iResBlock's training step and eval log-det, and its peak memory against the series length."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import resflow_cuda

from .. import peak
from .base import AUTOGRAD, COMPILE, EAGER, RESFLOW, Case, CaseConfig, Target, baseline_targets, speedup_targets


@dataclasses.dataclass(frozen=True)
class BlockConfig(CaseConfig):
    block: str  # "toy", "tabular" or "conv"
    mode: str  # "train" or "eval"

    @property
    def label(self) -> str:
        return self.block


def normflows_mlp(dims, coeff: float = 0.9):
    """normflows' LipschitzMLP over ``dims`` ((Swish, InducedNormLinear) per layer, 5 iterations), not
    zero-initialised (the caller seeds)."""
    import normflows as nf

    return nf.nets.LipschitzMLP(list(dims), lipschitz_const=coeff, max_lipschitz_iter=5, init_zeros=False)


def our_mlp(dims, state: dict, coeff: float = 0.9) -> torch.nn.Sequential:
    """The same MLP of our layers ((LipSwish, InducedNormLinear) per layer, 5 iterations) with the weights
    of a ``normflows_mlp``'s ``state_dict``."""
    import resflow_cuda.nn as rnn

    layers = []
    for a, b in zip(dims, dims[1:]):
        layers += [rnn.LipSwish(), rnn.InducedNormLinear(a, b, coeff=coeff, n_iterations=5)]
    net = torch.nn.Sequential(*layers)
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
    return net


def mlp_pass(dims, batch: int) -> tuple[int, int]:
    """FLOPs and bytes of one pass through an MLP over ``dims`` on ``batch`` rows: the multiply-adds of
    its linear maps (x2); reading every weight and each layer's input and writing its output once
    (float32)."""
    pairs = list(zip(dims, dims[1:]))
    return 2 * batch * sum(a * b for a, b in pairs), 4 * sum(a * b + batch * (a + b) for a, b in pairs)


class IResBlockCase(Case):
    """One residual block's training step (forward, log-det, backward of the loss into every
    parameter; the Neumann estimator with backward-in-forward, as normflows' Residual) and its
    eval-mode log-det (20 exact terms plus the roulette's). Providers: our block on our layers
    (fast path), the same block forced onto autograd VJPs, and normflows' ``iResBlock`` on its own
    layers (the reference code, as ``eager``). Every call draws the same N and probe, so all
    providers compute the same numbers."""

    name = "iresblock"
    title = "iResBlock training step and eval log-det (eager = normflows 1.7.3, the reference code)"
    blocks = {
        "toy": dict(batch=500, dims=[2, 128, 128, 128, 128, 2]),
        "tabular": dict(batch=256, dims=[64, 512, 512, 64]),
        "conv": dict(batch=16, channels=[3, 128, 128, 3], kernels=[3, 1, 3], hw=16),
    }
    quick_blocks = ["toy"]
    modes = ["train", "eval"]
    memory_terms = (2, 8, 32)
    atol, rtol = 2e-5, 2e-4

    def configs(self, quick: bool) -> list[BlockConfig]:
        return [BlockConfig(b, m) for b in (self.quick_blocks if quick else self.blocks) for m in self.modes]

    def providers(self) -> dict[str, str]:
        return {RESFLOW: "fast", AUTOGRAD: "autograd", EAGER: "normflows", COMPILE: "compile"}

    def _input_shape(self, block: str) -> tuple:
        spec = self.blocks[block]
        if "dims" in spec:
            return (spec["batch"], spec["dims"][0])
        return (spec["batch"], spec["channels"][0], spec["hw"], spec["hw"])

    def _normflows_net(self, block: str):
        import normflows as nf

        spec = self.blocks[block]
        torch.manual_seed(0)
        if "dims" in spec:
            return normflows_mlp(spec["dims"])
        net = nf.nets.LipschitzCNN(spec["channels"], spec["kernels"], lipschitz_const=0.9, init_zeros=False)
        with torch.no_grad():
            net(torch.zeros(1, spec["channels"][0], spec["hw"], spec["hw"]))  # lazy u / v sizes
        return net

    def _our_net(self, block: str, state: dict):
        import resflow_cuda.nn as rnn

        spec = self.blocks[block]
        if "dims" in spec:
            return our_mlp(spec["dims"], state)
        layers = []
        for a, b, k in zip(spec["channels"], spec["channels"][1:], spec["kernels"]):
            layers += [rnn.LipSwish(), rnn.InducedNormConv2d(a, b, k, 1, k // 2, coeff=0.9, n_iterations=5)]
        net = torch.nn.Sequential(*layers)
        net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
        return net

    def make_inputs(self, config: BlockConfig, device: str, rotate: bool = True) -> dict:
        """The batch and normflows' initial weights. Not rotated: a step makes 10-30 passes over
        the same batch and weights, so the first read from memory is not what it measures."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self._input_shape(config.block), generator=g)
        return {"x": x.to(device), "state": self._normflows_net(config.block).state_dict()}

    def build(self, provider: str, block: str, state: dict, device: str, grad_in_forward: bool = True, **kwargs):
        """The block of a provider with the shared weights (torch.compile wraps normflows' block)."""
        if provider in ("normflows", "compile"):
            from normflows.flows.residual import iResBlock as NfBlock

            net = self._normflows_net(block)
            net.load_state_dict(state)
            return NfBlock(net, neumann_grad=True, grad_in_forward=grad_in_forward, **kwargs).to(device)
        return resflow_cuda.nn.iResBlock(self._our_net(block, state), neumann_grad=True,
                                         grad_in_forward=grad_in_forward,
                                         fast_path=provider == "fast", **kwargs).to(device)

    def runner(self, provider: str, inputs: dict, config: BlockConfig) -> Callable[[], tuple]:
        import numpy as np

        block = self.build(provider, config.block, inputs["state"], inputs["x"].device).train(config.mode == "train")
        forward = torch.compile(block) if provider == "compile" else block
        x = inputs["x"]
        params = [p for p in block.nnet.parameters() if p.requires_grad]
        zero = torch.zeros(x.shape[0], 1, device=x.device)

        def step():
            np.random.seed(0)
            torch.manual_seed(0)
            if config.mode == "eval":
                with torch.no_grad():
                    y, logp = forward(x, zero)
                return y, logp
            y, logp = forward(x, zero)
            loss = 0.5 * y.square().flatten(1).sum(1).mean() - logp.mean()
            return (y.detach(), logp.detach(), *torch.autograd.grad(loss, params))

        return step

    def terms(self, config: BlockConfig) -> int:
        """The series length every provider runs (the draw after ``np.random.seed(0)``)."""
        import numpy as np

        np.random.seed(0)
        return int(np.random.geometric(0.5, 1).max()) + (2 if config.mode == "train" else 20)

    def _pass(self, block: str) -> tuple[int, int]:
        """FLOPs and bytes of one pass through the branch: the multiply-adds of its linear maps (x2);
        reading every weight and each layer's input and writing its output once (float32)."""
        spec = self.blocks[block]
        if "dims" in spec:
            return mlp_pass(spec["dims"], spec["batch"])
        pixels = spec["batch"] * spec["hw"] ** 2
        triples = list(zip(spec["channels"], spec["channels"][1:], spec["kernels"]))
        flops = 2 * pixels * sum(a * b * k * k for a, b, k in triples)
        return flops, 4 * sum(a * b * k * k + pixels * (a + b) for a, b, k in triples)

    def _passes(self, config: BlockConfig) -> int:
        """Passes of the branch: forward, one per series term; in training also the surrogate's VJP,
        the Neumann gradient (tangents, two VJPs, two weight gradients) and the backward of g (input
        and weight gradients). The toy block's eval is the exact 2-D determinant: forward and one
        VJP per output."""
        if config.block == "toy" and config.mode == "eval":
            return 3
        return 1 + self.terms(config) + (1 + 5 + 2 if config.mode == "train" else 0)

    def counts(self, config: BlockConfig) -> tuple[float, float]:
        passes, (flops, nbytes) = self._passes(config), self._pass(config.block)
        return float(passes * flops), float(passes * nbytes)

    def memory(self, device: str, quick: bool, log) -> list[dict]:
        """Peak memory of one training step of the conv block against the series length n (the
        truncated series, so that n is fixed), each in a fresh subprocess: the CPU RSS high-water
        mark (reset just before the step) above the RSS before it, or CUDA max_memory_allocated."""
        rows = []
        for n in (self.memory_terms[:2] if quick else self.memory_terms):
            for label, provider in self.providers().items():
                if provider == "compile":  # torch.compile cannot run a training step (double backward)
                    continue
                for gif in (True, False):
                    name = f"{label}, grad_in_forward={gif}"
                    try:
                        mib = peak.in_subprocess(__name__, "sweep_peak", provider, "conv", n, gif, device)
                    except RuntimeError as exc:
                        rows.append({"case": self.name, "provider": name, "label": f"n={n}",
                                     "config": {"block": "conv", "mode": "peak memory", "n": n}, "status": "n/a",
                                     "error": str(exc)[:300]})
                        continue
                    log(f"  {self.name} conv n={n} {name}: {mib:.1f} MiB")
                    rows.append({"case": self.name, "provider": name, "label": f"n={n}", "peak_mib": mib,
                                 "config": {"block": "conv", "mode": "peak memory", "n": n}, "status": "ok"})
        return rows

    def targets(self, rows: list[dict], quick: bool) -> list[Target]:
        """>= 1.5x normflows on the tabular block, 1.3x on conv (train and eval); the conv block's ops per
        step at most 1/3 of the count recorded in budgets.json's baseline. The toy block's 5x is retired:
        the overhead targets of ``small_step``, ``tabular_small`` and ``model_step`` (ops, host syncs and
        time against normflows) replace it (issue "Small flows are bound by overhead, not FLOPs")."""
        timed = [r for r in rows if r["label"] != "toy"]
        return (speedup_targets(timed, {"tabular": 1.5, "conv": 1.3}.__getitem__, "normflows")
                + baseline_targets(self.name, rows, ("conv",)))


def sweep_peak(provider: str, block: str, n: int, grad_in_forward: bool, device: str) -> float:
    """Peak of the first training step of an iResBlock case block with n series terms (the
    truncated series), backward-in-forward on or off (IResBlockCase.memory)."""
    import numpy as np

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

    return peak.peak_mib(step, device)
