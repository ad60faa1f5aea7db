"""Kernel-like ops and host syncs per step, counted with torch.profiler; the checked-in budgets.

For small flows the step time is (ops per step) x (cost per op) + (host syncs) x (pipeline drain)
(docs/benchmarks-overhead.md). Both counts are deterministic: the same code and configuration give
the same numbers on any machine, so a rise is caught like a failing test.

Counting rules (``count_ops``): the function runs once as a warm-up (lazy initialisation, caches),
then once under ``torch.profiler.profile(activities=[CPU])``. An event of the profiler's tree is
*kernel-like* when its name starts with ``aten::`` or ``resflow_cuda::`` (or is one of Inductor's
CPU kernels, ``graph_<n>_cpp_...``, for torch.compile rows) and its op is not in ``METADATA_OPS``
(views, allocations, no-op conversions: no kernel on a GPU). An op is counted when it is
kernel-like and no event below it is: the leaves of the tree once metadata ops are taken out.
So ``linear`` -> ``t`` + ``addmm`` counts 1 (addmm), ``mm`` -> ``resolve_conj`` counts 1 (mm), and
our ``lipswish_backward`` -> ``empty`` counts 1. (Taking only the events with no children at all
would drop every ``mm``, whose ``resolve_conj`` children make it a parent.) An op that does work
and also calls another op counts once (``sum`` -> ``fill_``: 1). Host syncs are the
``aten::_local_scalar_dense`` events (``.item()``, ``float(t)``, ``if t:``), each also an op.

Threads: with more than one thread some of ATen's CPU reductions call ``copy_`` inside (a parallel
``sum``: iresblock's tabular training step counted 6 more on 2 threads than on 1), so every count runs with
one torch thread (``COUNT_THREADS``), whatever the run times with; then the counts are the same run
to run, on any thread count and under ATEN_CPU_CAPABILITY=avx2 (docs/benchmarks-overhead.md). They
are the CPU build's; the CUDA build dispatches the same ATen and resflow_cuda ops where its kernels
mirror the CPU ones. ATen's decompositions can change between torch versions: budgets.json names
the torch it was recorded with.

    python -m benchmarks.counts --check            # CI: every --quick configuration within its budget
    python -m benchmarks.counts --check --full     # every configuration
    python -m benchmarks.counts --update-budgets   # write today's counts as the budgets
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import re
import sys
from pathlib import Path

import torch

from .cases.base import BUDGETS, load_budgets

# The issue's list: ops that only make a view, allocate or look at metadata (no kernel on a GPU).
ISSUE_METADATA = ("view", "t", "detach", "as_strided", "expand", "expand_as", "view_as", "empty", "empty_like",
                  "empty_strided", "transpose", "reshape", "_reshape_alias", "_unsafe_view", "unsqueeze", "squeeze",
                  "select", "slice", "narrow", "split", "unbind", "permute", "alias", "resolve_conj", "resolve_neg",
                  "lift_fresh", "result_type", "contiguous")
# Added here, each for the same reason: it launches nothing itself; where it does work, that work
# is an op below it that is counted (a real conversion's copy_, a contiguous copy's copy_).
ADDED_METADATA = ("to", "type_as",  # a no-op conversion is a leaf; a real one has _to_copy -> copy_ below it
                  "new_empty", "new_empty_strided", "resize_", "resize_as_",  # allocation, like empty
                  "detach_", "t_", "transpose_", "squeeze_", "unsqueeze_", "as_strided_", "set_",  # in place
                  "_nnpack_available", "is_same_size",  # queries: they answer from metadata
                  "flatten", "unflatten", "chunk", "split_with_sizes", "tensor_split", "movedim", "swapaxes",
                  "broadcast_to", "broadcast_tensors", "view_as_real", "view_as_complex")  # view composites
METADATA_OPS = frozenset(ISSUE_METADATA + ADDED_METADATA)
SYNC_OP = "aten::_local_scalar_dense"
_INDUCTOR_KERNEL = re.compile(r"graph_\d+_cpp_")  # torch._inductor.config.cpp.enable_kernel_profile's records

# Predicted GPU time per step (labelled "predicted" everywhere): ops x LAUNCH_US + syncs x SYNC_US
# + the step's roofline floor on that GPU (roofline.py). Assumptions, not measurements: a small
# kernel costs about 5 µs of host time to dispatch and launch from eager PyTorch (dispatcher,
# autograd bookkeeping and cudaLaunchKernel; launches take "on the order of microseconds", Modal's
# GPU glossary on CUDA graphs; JuliaGPU's docs time 5 small kernels at ~50 µs eager vs 16 µs as one
# graph), and its GPU time is hidden under the next launch; a host sync drains the queue and costs
# about 15 µs (the device-to-host copy's round trip plus the GPU idling while the host catches up).
LAUNCH_US = 5.0
SYNC_US = 15.0

# ATen's CPU kernels decompose differently with more threads (a parallel sum adds copy_ calls), so
# every count runs with one thread, whatever the run times with.
COUNT_THREADS = 1
COUNT_KEYS = ("ops_per_step", "syncs_per_step", "ops_update_lipschitz", "syncs_update_lipschitz")


def kernel_like(name: str) -> bool:
    """Whether a profiler event's name is a counted op (before the leaf rule)."""
    if name.startswith(("aten::", "resflow_cuda::")):
        return name.split("::", 1)[1] not in METADATA_OPS
    return _INDUCTOR_KERNEL.match(name) is not None


def count_events(events, top: int = 15) -> dict:
    """Counts over profiler events (objects with ``name`` and ``cpu_children``): ``ops``, ``syncs``
    and ``by_op``, the ``top`` most frequent counted ops (name -> count)."""
    below: dict[int, bool] = {}

    def has_kernel_below(e) -> bool:  # memoised by event
        if id(e) not in below:
            below[id(e)] = any(kernel_like(c.name) or has_kernel_below(c) for c in e.cpu_children)
        return below[id(e)]

    ops = collections.Counter(e.name for e in events if kernel_like(e.name) and not has_kernel_below(e))
    syncs = sum(e.name == SYNC_OP for e in events)
    return {"ops": sum(ops.values()), "syncs": syncs, "by_op": dict(ops.most_common(top))}


def describe() -> dict:
    """The counting rules and the prediction's constants, as results.json records them."""
    return {"rules": "leaf aten:: / resflow_cuda:: ops of torch.profiler once metadata-only ops are taken out;"
                     " syncs: aten::_local_scalar_dense (benchmarks/counts.py)",
            "launch_us": LAUNCH_US, "sync_us": SYNC_US, "metadata_ops": sorted(METADATA_OPS)}


def count_ops(fn, warmup: bool = True, setup=None, top: int = 15) -> dict:
    """Runs ``fn`` once as a warm-up (unless ``warmup`` is False: it already ran), then once under
    the CPU profiler, and counts that call (``count_events``), both with ``COUNT_THREADS`` torch
    threads (restored after). ``setup()``, where given, runs before each call, outside the profiler
    (a step's return to its initial state)."""
    from torch.profiler import ProfilerActivity, profile

    threads = torch.get_num_threads()
    torch.set_num_threads(COUNT_THREADS)
    try:
        if warmup:
            if setup is not None:
                setup()
            fn()
        if setup is not None:
            setup()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        torch.set_num_threads(threads)
    return count_events(prof.events(), top)


def count_step(step, warm: bool = False) -> dict:
    """The count columns of a row for a case's step: ``ops_per_step``, ``syncs_per_step`` and
    ``ops_by_op`` of ``step.counted`` where the step carries one (a narrower function than the timed
    step: model_step counts forward + backward), else of the step itself; ``ops_update_lipschitz``,
    ``syncs_update_lipschitz`` where it carries ``update_lipschitz``. ``warm``: the step already ran
    (the runner times it first), so it needs no warm-up."""
    counted = getattr(step, "counted", step)
    c = count_ops(counted, warmup=not (warm and counted is step), setup=getattr(counted, "reset", None))
    out = {"ops_per_step": c["ops"], "syncs_per_step": c["syncs"], "ops_by_op": c["by_op"]}
    update = getattr(step, "update_lipschitz", None)
    if update is not None:
        u = count_ops(update)
        out.update(ops_update_lipschitz=u["ops"], syncs_update_lipschitz=u["syncs"])
    return out


def graph_breaks() -> dict:
    """After a fresh torch.compile's first call (``torch._dynamo.utils.counters`` cleared before it):
    ``graph_breaks``, the graph breaks dynamo took (the sum of ``counters["graph_break"]``, one per
    break taken, keyed by reason), and up to three reasons, first line each."""
    from torch._dynamo.utils import counters

    reasons = counters["graph_break"]
    return {"graph_breaks": int(sum(reasons.values())),
            "graph_break_reasons": [r.splitlines()[0][:160] for r, _ in reasons.most_common(3)]}


def predicted_gpu_us(gpu, ops: int, syncs: int, bytes_moved: float, flops: float) -> float:
    """Predicted time of a step on ``gpu`` (a roofline.Gpu): launches, syncs and the roofline floor."""
    from . import roofline

    return ops * LAUNCH_US + syncs * SYNC_US + roofline.predicted_seconds(gpu, bytes_moved, flops) * 1e6


def config_key(config) -> str:
    """A configuration's key in budgets.json: its label and mode."""
    return f"{config.label} {config.mode}"


def measure(case, config, provider: str | None = None, device: str = "cpu") -> dict:
    """The count columns (``count_step``) of one provider (default resflow_cuda) on a configuration,
    without timing it: inputs, the case's step, a warm-up and one profiled call."""
    from .cases import RESFLOW

    provider = provider or RESFLOW
    step = case.runner(case.providers()[provider], case.make_inputs(config, device, rotate=False), config)
    return count_step(step)


def budget_problems(measured: dict, budgets: dict) -> tuple[list[str], list[str]]:
    """(problems, notes) of counts ``{case: {key: {column: n}}}`` against ``budgets["budgets"]``: a
    problem where a count is above its budget or a configuration has no budget; a note where a
    count is below its budget (tighten it with --update-budgets)."""
    problems, notes = [], []
    for case, configs in measured.items():
        for key, counts in configs.items():
            budget = budgets.get("budgets", {}).get(case, {}).get(key)
            if budget is None:
                problems.append(f"{case} / {key}: no budget in budgets.json (run python -m benchmarks.counts"
                                " --update-budgets and commit it)")
                continue
            for column in COUNT_KEYS:
                if column not in counts:
                    continue
                have, allowed = counts[column], budget.get(column)
                if allowed is None or have > allowed:
                    problems.append(f"{case} / {key}: {column} = {have}, budget {allowed}")
                elif have < allowed:
                    notes.append(f"{case} / {key}: {column} = {have}, below its budget {allowed}")
    return problems, notes


def _measure_all(cases: list[str], full: bool, log) -> dict:
    from .cases import CASES

    measured: dict = {}
    for name in cases:
        case = CASES[name]
        configs = list(dict.fromkeys(case.configs(True) + (case.configs(False) if full else [])))
        for config in configs:
            counts = measure(case, config)
            measured.setdefault(name, {})[config_key(config)] = {k: counts[k] for k in COUNT_KEYS if k in counts}
            log(f"  {name} / {config_key(config)}: " + ", ".join(f"{k} {counts[k]}" for k in COUNT_KEYS
                                                                  if k in counts))
    return measured


def _revision() -> str:
    from .timing import _git_revision

    return _git_revision()


def main(argv=None) -> int:
    from .cases import CASES

    parser = argparse.ArgumentParser(prog="python -m benchmarks.counts",
                                     description="resflow_cuda's ops and host syncs per step against budgets.json")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--check", action="store_true", help="exit 1 when a count of resflow_cuda is over its budget")
    what.add_argument("--update-budgets", action="store_true",
                      help="count every configuration and write the counts as the budgets (keeps the baseline)")
    what.add_argument("--record-baseline", action="store_true",
                      help="also record the counts as today's baseline, with the date and commit")
    parser.add_argument("--full", action="store_true", help="--check every configuration, not only --quick's")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--budgets", default=str(BUDGETS), help="the budget file (default: benchmarks/budgets.json)")
    args = parser.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    path = Path(args.budgets)
    data = load_budgets(path)
    recorded_with = data.get("budgets_recorded", {}).get("torch")
    if recorded_with and recorded_with != torch.__version__:
        log(f"[counts] note: the budgets were recorded with torch {recorded_with}, this is {torch.__version__}"
            " (ATen's decompositions can differ between versions)")
    if args.check:
        measured = _measure_all(args.cases, args.full, log)
        problems, notes = budget_problems(measured, data)
        for line in notes:
            log(f"[counts] note: {line} (tighten: python -m benchmarks.counts --update-budgets)")
        for line in problems:
            log(f"[counts] OVER BUDGET: {line}")
        log(f"[counts] {sum(map(len, measured.values()))} configurations counted, {len(problems)} over budget")
        return 1 if problems else 0
    measured = _measure_all(args.cases, True, log)
    for case, configs in measured.items():
        data.setdefault("budgets", {}).setdefault(case, {}).update(configs)
    stamp = {"date": datetime.date.today().isoformat(), "commit": _revision(), "torch": torch.__version__}
    data["budgets_recorded"] = stamp
    if args.record_baseline:
        data["baseline"] = {**stamp, "counts": measured}
    path.write_text(_dump(data))
    log(f"[counts] wrote {path}")
    return 0


def _dump(data: dict) -> str:
    """The budget file: its explanation first, one line per configuration."""
    def table(counts: dict, indent: str) -> list[str]:
        lines = []
        for i, (case, configs) in enumerate(counts.items()):
            lines.append(f"{indent}{json.dumps(case)}: {{")
            for j, (key, value) in enumerate(configs.items()):
                comma = "," if j < len(configs) - 1 else ""
                lines.append(f"{indent} {json.dumps(key, ensure_ascii=False)}: {json.dumps(value)}{comma}")
            lines.append(f"{indent}}}" + ("," if i < len(counts) - 1 else ""))
        return lines

    baseline = data.get("baseline", {})
    stamp = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in baseline.items() if k != "counts"]
    lines = ["{", ' "about": [', *[f"  {json.dumps(line)}," for line in ABOUT[:-1]], f"  {json.dumps(ABOUT[-1])}",
             " ],", f' "budgets_recorded": {json.dumps(data.get("budgets_recorded", {}))},',
             ' "budgets": {', *table(data.get("budgets", {}), "  "), " },",
             ' "baseline": {', *stamp, '  "counts": {', *table(baseline.get("counts", {}), "   "), "  }", " }", "}"]
    text = "\n".join(lines) + "\n"
    expected = {**data, "about": ABOUT, "baseline": {**baseline, "counts": baseline.get("counts", {})}}
    assert json.loads(text) == expected, "the budget file does not read back as written"
    return text


ABOUT = [
        "Budgets of resflow_cuda's kernel-like ops and host syncs per step (benchmarks/counts.py for the rules),",
        "one entry per case and configuration (label and mode). CI runs `python -m benchmarks.counts --check`,",
        "which fails when a count of a --quick configuration rises above its budget.",
        "When counts change on purpose (fewer ops: tighten; more: say why in the commit), rewrite the budgets",
        "with `python -m benchmarks.counts --update-budgets` and commit this file.",
        "`baseline` is the count on the date and commit it names, kept when budgets are updated: the targets",
        "that ask for a fraction of today's count (iresblock conv, model_step digits) compare against it."]


if __name__ == "__main__":
    raise SystemExit(main())
