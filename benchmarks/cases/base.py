"""What every case shares: the provider names, the configuration and target types, the ``Case`` base
class with its defaults, the cache-rotation helpers and the model-level training step.

A case names its configurations, builds inputs, lists providers (resflow_cuda, the eager
pure-PyTorch reference, torch.compile of the reference, ...), says how to run one provider in
one mode, how many bytes a configuration must move at least, and which targets it must meet.
The runner (run.py) does the correctness gate, timing, floors and output.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Callable

import torch

import resflow_cuda

EAGER = "eager"
COMPILE = "torch.compile"
RESFLOW = "resflow_cuda"
AUTOGRAD = "resflow_cuda (autograd)"

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


class CaseConfig:
    """A case's configuration is a frozen dataclass with a ``label`` (the table row) and a ``mode``
    (the table); ``as_dict`` is its fields, as results.json records them."""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Config(CaseConfig):
    """An elementwise op on a tensor of ``shape``."""

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


class Case:
    """A benchmark case (benchmarks/README.md, "Adding a case"). A subclass sets ``name`` and
    ``title`` and defines ``configs``, ``providers``, ``make_inputs`` and ``runner``; either
    ``counts`` or both ``flops`` and ``bytes_moved``; and overrides the gate's tolerance
    (``atol``, ``rtol`` or ``tolerance``) and ``targets`` where the defaults do not fit."""

    name: str
    title: str
    atol = 1e-4  # the correctness gate's tolerance against eager (torch.testing.assert_close)
    rtol = 1e-3

    def configs(self, quick: bool) -> list:
        raise NotImplementedError

    def providers(self) -> dict:
        raise NotImplementedError

    def make_inputs(self, config, device: str, rotate: bool = True) -> dict:
        raise NotImplementedError

    def runner(self, provider, inputs: dict, config) -> Callable[[], tuple]:
        raise NotImplementedError

    def counts(self, config) -> tuple[float, float]:
        """(FLOPs, bytes) of a configuration, for a case whose counts do not depend on its inputs."""
        raise NotImplementedError

    def flops(self, config, inputs: dict) -> float:
        return self.counts(config)[0]

    def bytes_moved(self, config, inputs: dict) -> float:
        return self.counts(config)[1]

    def tolerance(self, config) -> dict:
        return dict(atol=self.atol, rtol=self.rtol)

    def targets(self, rows: list[dict], quick: bool) -> list[Target]:
        """No speed targets: the rows are reported."""
        return []


def speedup_targets(rows: list[dict], need: Callable[[str], float], reference: str) -> list[Target]:
    """One target per timed resflow_cuda row: at least ``need(label)`` times the speed of eager
    (named ``reference`` in the target's text)."""
    out = []
    for r in rows:
        if r["provider"] == RESFLOW and r["status"] == "ok" and r.get("speedup_vs_eager") is not None:
            want = need(r["label"])
            out.append(Target(f"{r['label']} {r['config']['mode']}: >= {want}x {reference}",
                              r["speedup_vs_eager"] >= want, f"{r['speedup_vs_eager']:.2f}x"))
    return out


BUDGETS = Path(__file__).resolve().parent.parent / "budgets.json"


def load_budgets(path: Path = BUDGETS) -> dict:
    """budgets.json (benchmarks/counts.py writes it): ``budgets`` and ``baseline["counts"]``, per case and
    configuration key (``f"{label} {mode}"``); empty where the file is not there (an installed copy)."""
    if Path(path).exists():
        return json.loads(Path(path).read_text())
    return {"budgets": {}, "baseline": {"counts": {}}}


def overhead_targets(rows: list[dict], reference: str, time_factor: float | None, ops_fraction: float = 1 / 5,
                     syncs: int | None = 0, what: str = "ops per step", shown: str | None = None) -> list[Target]:
    """The overhead goals of a resflow_cuda row against the ``reference`` provider's row of the same
    configuration (named ``shown`` in the text): ops per step at most ``ops_fraction`` of the
    reference's, host syncs per step at most ``syncs`` (None: not asked), time at least
    ``time_factor`` x faster (None: not asked)."""
    out = []
    shown = shown or reference
    for r in rows:
        if r["provider"] != RESFLOW or r["status"] != "ok":
            continue
        ref = next((x for x in rows if x["provider"] == reference and x["config"] == r["config"]
                    and x["status"] == "ok"), None)
        name = f"{r['label']} {r['config']['mode']}"
        if ref is None:
            out.append(Target(f"{name}: compared with {shown}", False, f"{shown} did not run"))
            continue
        limit = ref["ops_per_step"] * ops_fraction
        out.append(Target(f"{name}: {what} <= 1/{round(1 / ops_fraction)} of {shown} ({limit:.0f})",
                          r["ops_per_step"] <= limit, f"{r['ops_per_step']} vs {ref['ops_per_step']}"))
        if syncs is not None:
            text = "no host syncs per step" if syncs == 0 else f"host syncs per step <= {syncs}"
            out.append(Target(f"{name}: {text}", r["syncs_per_step"] <= syncs,
                              f"{r['syncs_per_step']} ({shown}: {ref['syncs_per_step']})"))
        if time_factor is not None:
            ratio = ref["median_us"] / r["median_us"]
            out.append(Target(f"{name}: >= {time_factor}x {shown} (CPU time)", ratio >= time_factor,
                              f"{ratio:.2f}x"))
    return out


def baseline_targets(case: str, rows: list[dict], labels, fraction: float = 1 / 3) -> list[Target]:
    """Per resflow_cuda row whose label is in ``labels``: ops per step at most ``fraction`` of the
    count recorded in budgets.json's ``baseline`` (with its date and commit)."""
    out = []
    baseline = load_budgets().get("baseline", {})
    recorded = baseline.get("counts", {}).get(case, {})
    for r in rows:
        if r["provider"] != RESFLOW or r["status"] != "ok" or r["label"] not in labels:
            continue
        key = f"{r['label']} {r['config']['mode']}"
        base = recorded.get(key)
        if base is None:
            out.append(Target(f"{key}: ops per step <= 1/{round(1 / fraction)} of the baseline", False,
                              "no baseline in benchmarks/budgets.json"))
            continue
        limit = base["ops_per_step"] * fraction
        out.append(Target(f"{key}: ops per step <= 1/{round(1 / fraction)} of the baseline ({base['ops_per_step']} ops on"
                          f" {baseline['date']}, {baseline['commit']}): <= {limit:.0f}", r["ops_per_step"] <= limit,
                          f"{r['ops_per_step']}"))
    return out


def model_batch(data: str) -> torch.Tensor:
    """The batch of the model-level cases, seeded: 512 toy points, or 64 images of 1×8×8 in (0.05, 0.95)."""
    g = torch.Generator().manual_seed(0)
    if data == "toy":
        return torch.randn(512, 2, generator=g) * 1.5
    return torch.rand(64, 1, 8, 8, generator=g) * 0.9 + 0.05


def digits_flow(intermediate_dim: int, block_type: str = "resblock"):
    """A ResidualFlow on 1×8×8 images, 2 scales × 4 blocks, with the CIFAR-10 settings of the
    reference's train_img.py (Poisson roulette, Neumann gradient with backward-in-forward), batch 64."""
    from resflow_cuda import models
    from resflow_cuda.nn import LogitTransform

    return models.ResidualFlow((64, 1, 8, 8), n_blocks=[4, 4], intermediate_dim=intermediate_dim, factor_out=False,
                               actnorm=True, init_layer=LogitTransform(0.05), fc_end=False, vnorms="2222",
                               activation_fn="swish", preact=True, first_resblock=True, coeff=0.98,
                               n_lipschitz_iters=5, n_power_series=None, n_dist="poisson", n_exact_terms=2,
                               grad_in_forward=True, block_type=block_type)


def _update_lipschitz(model: torch.nn.Module) -> Callable[[], None]:
    def update():
        resflow_cuda.update_lipschitz(model, n_iterations=5)

    return update


def gradient_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor],
                  update: Callable[[], None] | None = None) -> Callable[[], tuple]:
    """The forward and one ``backward()`` of ``model`` as a benchmark step: gradients cleared
    (set to None, no op), seeded draws, ``loss_fn().backward()``; returns the loss and the
    gradients. Parameters are not changed, so every call starts from the same state. The step
    carries ``step.update_lipschitz``, which the runner counts separately (benchmarks/counts.py):
    ``update`` (default: resflow_cuda.update_lipschitz with 5 iterations; a model of another
    library passes its own)."""
    import numpy as np

    params = list(model.parameters())

    def step():
        for p in params:
            p.grad = None
        np.random.seed(0)
        torch.manual_seed(0)
        loss = loss_fn()
        loss.backward()
        return (loss.detach(), *[p.grad for p in params if p.grad is not None])

    step.update_lipschitz = update or _update_lipschitz(model)
    return step


def training_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor],
                  update: Callable[[], None] | None = None) -> Callable[[], tuple]:
    """One training step of ``model`` as a benchmark step: back to the initial state (parameters,
    buffers, a fresh Adam), seeded draws, ``loss_fn()``, backward, Adam (lr 1e-3, every parameter but
    the roulette's ``geom_p`` / ``lamb``) and ``update()`` (as in ``gradient_step``); returns the loss
    and the gradients. The step carries what the runner counts: ``step.counted``, the forward and
    one backward (``gradient_step``; ``step.counted.reset`` returns to the initial state outside the
    count), and ``step.update_lipschitz``."""
    import numpy as np

    roulette = ("geom_p", "lamb")
    params = [p for n, p in model.named_parameters() if not n.endswith(roulette)]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    # The roulette's parameters get no gradient and nothing writes them, so they are not restored:
    # a write would bump their version counter and make the next forward read them from the device
    # again (a host sync per block that training does not have).
    live = [t for n, t in model.state_dict().items() if not n.endswith(roulette)]
    snapshot = [t.clone() for t in live]
    update = update or _update_lipschitz(model)

    def reset():
        with torch.no_grad():
            torch._foreach_copy_(live, snapshot)  # every call starts from the same state

    def step():
        reset()
        optimizer.state.clear()
        np.random.seed(0)
        torch.manual_seed(0)
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad.detach().clone() for p in params if p.grad is not None]
        optimizer.step()
        update()
        return (loss.detach(), *grads)

    step.counted = gradient_step(model, loss_fn, update)
    step.counted.reset = reset
    step.update_lipschitz = update
    return step
