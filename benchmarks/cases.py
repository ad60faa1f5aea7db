"""The registry of benchmark cases.

A case names its configurations, builds inputs, lists providers (resflow_cuda, the eager
pure-PyTorch reference, torch.compile of the reference, ...), says how to run one provider in
one mode, how many bytes a configuration must move at least, and which targets it must meet.
The runner (run.py) does the correctness gate, timing, floors and output.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from pathlib import Path
from typing import Callable

import torch

import resflow_cuda
from resflow_cuda import reference

from . import memory

EAGER = "eager"
COMPILE = "torch.compile"
RESFLOW = "resflow_cuda"

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.cache
def cache_bytes(device: str) -> int:
    """The largest cache of the device: the CPU's last-level cache from sysfs (32 MiB when
    unreadable), or the GPU's L2."""
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 << 20))
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=32 << 20)


def rotation(nbytes: int, device: str) -> int:
    """How many copies of inputs of ``nbytes`` a timed loop cycles through so that together they
    are at least twice the largest cache (at most 64): a memory-bound step then reads its inputs
    from memory, as the floor assumes, instead of from a cache that a single buffer would stay in."""
    return max(1, min(64, math.ceil(2 * cache_bytes(device) / max(nbytes, 1))))


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
            "normflows": _NormflowsLipSwish(),
        }

    def make_inputs(self, config: Config, device: str, rotate: bool = True) -> dict:
        """x, β and the upstream gradient; with ``rotate``, as many copies of x and the gradient as
        it takes to exceed the caches (see ``rotation``), cycled through by the step."""
        g = torch.Generator(device="cpu").manual_seed(0)
        dtype = _DTYPES[config.dtype]
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
        n = math.prod(config.shape) * torch.empty((), dtype=_DTYPES[config.dtype]).element_size()
        return 2 * n if config.mode == "fwd" else 5 * n

    def flops(self, config: Config, inputs: dict) -> float:
        """Per element: 6 forward (β·x, exp, +1, reciprocal, ·x, /1.1) and 11 more backward (the
        derivative s(1 + t(1 − s))/1.1 times the gradient: 6; β's gradient term and its sum: 5)."""
        return float(math.prod(config.shape) * (6 if config.mode == "fwd" else 17))

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
            return tuple(m.scale.clone() for m in model)

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


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    block: str  # "toy", "tabular" or "conv"
    mode: str  # "train" or "eval"

    @property
    def label(self) -> str:
        return self.block

    def as_dict(self) -> dict:
        return {"block": self.block, "mode": self.mode}


AUTOGRAD = "resflow_cuda (autograd)"


class IResBlockCase:
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
            return nf.nets.LipschitzMLP(spec["dims"], lipschitz_const=0.9, init_zeros=False)
        net = nf.nets.LipschitzCNN(spec["channels"], spec["kernels"], lipschitz_const=0.9, init_zeros=False)
        with torch.no_grad():
            net(torch.zeros(1, spec["channels"][0], spec["hw"], spec["hw"]))  # lazy u / v sizes
        return net

    def _our_net(self, block: str, state: dict):
        import resflow_cuda.nn as rnn

        spec = self.blocks[block]
        layers = []
        if "dims" in spec:
            for a, b in zip(spec["dims"], spec["dims"][1:]):
                layers += [rnn.LipSwish(), rnn.InducedNormLinear(a, b, coeff=0.9, n_iterations=5)]
        else:
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
            pairs = list(zip(spec["dims"], spec["dims"][1:]))
            flops = 2 * spec["batch"] * sum(a * b for a, b in pairs)
            return flops, 4 * sum(a * b + spec["batch"] * (a + b) for a, b in pairs)
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

    def flops(self, config: BlockConfig, inputs: dict) -> float:
        return float(self._passes(config) * self._pass(config.block)[0])

    def bytes_moved(self, config: BlockConfig, inputs: dict) -> float:
        return float(self._passes(config) * self._pass(config.block)[1])

    def tolerance(self, config) -> dict:
        return dict(atol=2e-5, rtol=2e-4)

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
                        peak = memory.in_subprocess("sweep_peak", provider, "conv", n, gif, device)
                    except RuntimeError as exc:
                        rows.append({"case": self.name, "provider": name, "label": f"n={n}",
                                     "config": {"block": "conv", "mode": "peak memory", "n": n}, "status": "n/a",
                                     "error": str(exc)[:300]})
                        continue
                    log(f"  {self.name} conv n={n} {name}: {peak:.1f} MiB")
                    rows.append({"case": self.name, "provider": name, "label": f"n={n}", "peak_mib": peak,
                                 "config": {"block": "conv", "mode": "peak memory", "n": n}, "status": "ok"})
        return rows

    def targets(self, rows: list[dict], quick: bool) -> list[Target]:
        """Issue #5: >= 5x normflows on the toy block, 1.5x tabular, 1.3x conv (train and eval)."""
        need = {"toy": 5.0, "tabular": 1.5, "conv": 1.3}
        out = []
        for r in rows:
            if r["provider"] == RESFLOW and r["status"] == "ok" and r.get("speedup_vs_eager") is not None:
                out.append(Target(f"{r['label']} {r['config']['mode']}: >= {need[r['label']]}x normflows",
                                  r["speedup_vs_eager"] >= need[r["label"]], f"{r['speedup_vs_eager']:.2f}x"))
        return out


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


def _training_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], tuple]:
    """One training step of ``model`` as a benchmark step: back to the initial state (parameters,
    buffers, a fresh Adam), seeded draws, ``loss_fn()``, backward, Adam (lr 1e-3, every parameter but
    the roulette's ``geom_p`` / ``lamb``) and update_lipschitz; returns the loss and the gradients."""
    import numpy as np

    params = [p for n, p in model.named_parameters() if not n.endswith(("geom_p", "lamb"))]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    live = list(model.state_dict().values())
    snapshot = [t.clone() for t in live]

    def step():
        with torch.no_grad():
            torch._foreach_copy_(live, snapshot)  # every call starts from the same state
        optimizer.state.clear()
        np.random.seed(0)
        torch.manual_seed(0)
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad.detach().clone() for p in params if p.grad is not None]
        optimizer.step()
        resflow_cuda.update_lipschitz(model, n_iterations=5)
        return (loss.detach(), *grads)

    return step


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model: str  # "toy" or "digits"
    mode: str = "train step"

    @property
    def label(self) -> str:
        return self.model

    def as_dict(self) -> dict:
        return {"model": self.model, "mode": self.mode}


class ModelStepCase:
    """One training step of a whole model (loss, backward into every parameter, Adam step and
    update_lipschitz), each call from the same state and with the same roulette draws and probes:

    - ``toy``: the reference toy model, 16 iResBlocks over pre-activation LipSwish MLPs 2-128-128-128-128-2
      (basic estimator, as train_toy.py), batch 512; eager = the same stack of normflows' ``Residual``
      flows (normflows 1.7.3, the reference code) with the same weights;
    - ``digits``: a ResidualFlow on 1×8×8 images, 2 scales × 4 blocks, idim 128, the CIFAR-10 settings
      of train_img.py (Poisson roulette, Neumann gradient with backward-in-forward), batch 64; eager =
      the same model on autograd VJPs (the reference's algorithm; the reference package is not
      installable, so its role is played by our blocks with ``fast_path=False``)."""

    name = "model_step"
    title = "a whole model's training step (forward, backward, Adam, update_lipschitz)"
    quick_models = ["toy"]
    models = ["toy", "digits"]

    def configs(self, quick: bool) -> list[ModelConfig]:
        return [ModelConfig(m) for m in (self.quick_models if quick else self.models)]

    def providers(self) -> dict[str, str]:
        return {RESFLOW: "fast", AUTOGRAD: "autograd", EAGER: "eager"}

    @staticmethod
    def _toy(fast_path: bool):
        from resflow_cuda import models

        torch.manual_seed(0)
        model = models.toy_model(n_blocks=16, dims=(128, 128, 128, 128), vnorms="222222")
        for m in model.modules():
            if isinstance(m, resflow_cuda.nn.iResBlock):
                m.fast_path = fast_path
        return model

    @staticmethod
    def _digits(fast_path: bool):
        from resflow_cuda import models
        from resflow_cuda.nn import LogitTransform

        torch.manual_seed(0)
        model = models.ResidualFlow((64, 1, 8, 8), n_blocks=[4, 4], intermediate_dim=128, factor_out=False,
                                    actnorm=True, init_layer=LogitTransform(0.05), fc_end=False, vnorms="2222",
                                    activation_fn="swish", preact=True, first_resblock=True, coeff=0.98,
                                    n_lipschitz_iters=5, n_power_series=None, n_dist="poisson", n_exact_terms=2,
                                    grad_in_forward=True)
        model(torch.rand(64, 1, 8, 8))  # ActNorm's data initialisation and the convolutions' u / v
        for m in model.modules():
            if isinstance(m, resflow_cuda.nn.iResBlock):
                m.fast_path = fast_path
        return model

    def make_inputs(self, config: ModelConfig, device: str, rotate: bool = True) -> dict:
        """The batch and the initial state. Not rotated: a step makes many passes over one batch."""
        g = torch.Generator().manual_seed(0)
        if config.model == "toy":
            x = torch.randn(512, 2, generator=g) * 1.5
            state = self._toy(True).state_dict()
        else:
            x = torch.rand(64, 1, 8, 8, generator=g) * 0.9 + 0.05
            state = self._digits(True).state_dict()
        return {"x": x.to(device), "state": state}

    def _normflows_toy(self, state: dict):
        import normflows as nf

        flows = []
        for i in range(16):
            net = nf.nets.LipschitzMLP([2, 128, 128, 128, 128, 2], lipschitz_const=0.9, max_lipschitz_iter=5,
                                       init_zeros=True)
            flows.append(nf.flows.Residual(net, reverse=False, reduce_memory=False))
        model = nf.NormalizingFlow(q0=nf.distributions.DiagGaussian(2, trainable=False), flows=flows)
        theirs = {}
        for key, value in state.items():  # chain.{i}.nnet.{k}.* -> flows.{i}.iresblock.nnet.net.{k}.*
            _, i, rest = key.split(".", 2)
            rest = rest.replace("nnet.", "nnet.net.", 1) if rest.startswith("nnet.") else rest
            theirs[f"flows.{i}.iresblock.{rest}"] = value
        model.load_state_dict(theirs, strict=False)
        return model

    def runner(self, provider: str, inputs: dict, config: ModelConfig) -> Callable[[], tuple]:
        from resflow_cuda import models

        x, state = inputs["x"], inputs["state"]
        if provider == "autograd" and config.model == "digits":
            raise RuntimeError("the digits model's eager provider already is our blocks on autograd VJPs")
        if provider == "eager" and config.model == "toy":
            model = self._normflows_toy(state).to(x.device)

            def loss_fn():
                z, log_det = x, torch.zeros(x.shape[0], device=x.device)
                for flow in model.flows:
                    z, ld = flow(z)
                    log_det = log_det + ld
                return -(models.standard_normal_logprob(z).sum(1) + log_det).mean()
        else:
            build = self._toy if config.model == "toy" else self._digits
            model = build(provider == "fast").to(x.device)
            model.load_state_dict(state)

            def loss_fn():
                z, delta = model(x, x.new_zeros(x.shape[0], 1))
                return -(models.standard_normal_logprob(z).sum(1) - delta.squeeze(1)).mean()

        return _training_step(model, loss_fn)

    def _counts(self, config: ModelConfig) -> tuple[float, float]:
        """(FLOPs, bytes) of a step: per block, passes of its branch as in IResBlockCase (forward,
        one per series term, and the backward passes), with the series length of the toy's basic
        estimator (n = the geometric draw after seed 0 plus 2 exact terms: forward, n VJPs made with
        create_graph, two passes each to differentiate them, and g's backward: 3 + 3n), or for the digits
        model the Poisson roulette's mean length (2 + 2 exact terms) and the Neumann gradient's 8 passes
        (1 + 4 + 8)."""
        if config.model == "toy":
            dims = [2, 128, 128, 128, 128, 2]
            per_pass = (2 * 512 * sum(a * b for a, b in zip(dims, dims[1:])),
                        4 * sum(a * b + 512 * (a + b) for a, b in zip(dims, dims[1:])))
            n = IResBlockCase().terms(BlockConfig("toy", "train"))
            passes = 16 * (3 + 3 * n)
        else:
            pixels = 64 * 8 * 8
            layers = [(1, 128, 3), (128, 128, 1), (128, 1, 3), (4, 128, 3), (128, 128, 1), (128, 4, 3)]
            per_scale = [layers[:3], layers[3:]]
            flops = [2 * (pixels if i == 0 else pixels // 4) * sum(a * b * k * k for a, b, k in ls)
                     for i, ls in enumerate(per_scale)]
            nbytes = [4 * sum(a * b * k * k + (pixels if i == 0 else pixels // 4) * (a + b) for a, b, k in ls)
                      for i, ls in enumerate(per_scale)]
            passes = 4 * (1 + 4 + 8)
            return float(passes * sum(flops)), float(passes * sum(nbytes))
        return float(passes * per_pass[0]), float(passes * per_pass[1])

    def flops(self, config: ModelConfig, inputs: dict) -> float:
        return self._counts(config)[0]

    def bytes_moved(self, config: ModelConfig, inputs: dict) -> float:
        return self._counts(config)[1]

    def tolerance(self, config) -> dict:
        return dict(atol=1e-4, rtol=1e-3)

    def targets(self, rows: list[dict], quick: bool) -> list[Target]:
        """Issue #6 sets no speed target for whole models; they are reported."""
        return []


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


@dataclasses.dataclass(frozen=True)
class FamilyConfig:
    data: str  # "toy" or "digits"
    model: str  # "implicit", "2 iresblocks", "coupling", "residual"
    mode: str = "train step"

    @property
    def label(self) -> str:
        return f"{self.data} {self.model}"

    def as_dict(self) -> dict:
        return {"data": self.data, "model": self.model, "mode": self.mode}


class FamilyStepCase:
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
        from resflow_cuda import models
        from resflow_cuda.nn import ImplicitBlock, LogitTransform, SequentialFlow, iResBlock

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
        return models.ResidualFlow((64, 1, 8, 8), n_blocks=[4, 4], intermediate_dim=64, factor_out=False,
                                   actnorm=True, init_layer=LogitTransform(0.05), fc_end=False, vnorms="2222",
                                   activation_fn="swish", preact=True, first_resblock=True, coeff=0.98,
                                   n_lipschitz_iters=5, n_power_series=None, n_dist="poisson", n_exact_terms=2,
                                   grad_in_forward=True, block_type="resblock" if config.model == "residual"
                                   else "coupling")

    def make_inputs(self, config: FamilyConfig, device: str, rotate: bool = True) -> dict:
        """The batch and the initial state. Not rotated: a step makes many passes over one batch."""
        g = torch.Generator().manual_seed(0)
        if config.data == "toy":
            x = torch.randn(512, 2, generator=g) * 1.5
        else:
            x = torch.rand(64, 1, 8, 8, generator=g) * 0.9 + 0.05
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

        return _training_step(model, loss_fn)

    @functools.lru_cache(maxsize=None)
    def _counts(self, config: FamilyConfig) -> tuple[float, float]:
        """Counted, not modelled: one step of the autograd provider (every product an ATen op, none
        hidden in our fused ops) under :class:`_OperandCounter`; the implicit block's solver steps
        vary with the weights, so they are counted as they run."""
        inputs = self.make_inputs(config, "cpu")
        counter = _OperandCounter().count(self.runner("autograd", inputs, config))
        return float(counter.flops), float(counter.bytes)

    def flops(self, config: FamilyConfig, inputs: dict) -> float:
        return self._counts(config)[0]

    def bytes_moved(self, config: FamilyConfig, inputs: dict) -> float:
        return self._counts(config)[1]

    def tolerance(self, config) -> dict:
        return dict(atol=1e-4, rtol=1e-3)

    def targets(self, rows: list[dict], quick: bool) -> list[Target]:
        """Issue #8 sets no speed target; the rows are reported."""
        return []


CASES = {case.name: case for case in (LipSwishCase(), UpdateLipschitzCase(), IResBlockCase(), ModelStepCase(),
                                              FamilyStepCase())}
