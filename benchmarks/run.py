"""resflow-bench: the one benchmark runner.

For every case, configuration and provider: check the provider's outputs against the eager
reference (a provider that disagrees is reported as failing and not timed), time it with
torch.utils.benchmark, count its kernel-like ops and host syncs per step (counts.py; with a predicted GPU
time from them), measure its peak memory in a fresh process, and put it beside the eager and
torch.compile times and the floors (the bytes the configuration must move at the bandwidth of a
large copy, and its FLOPs at the rate of a large matmul, both measured in the same run).
Writes results.json (with environment metadata; schema in benchmarks/README.md), results.md
(rendered from the JSON only) and PNG charts into --out, prints the Markdown, and ends with a
summary: one line per case and configuration (speed-ups, peak-memory ratio, targets met). Progress
lines on stderr count the configurations done and estimate the time left.

    resflow-bench --quick            # seconds to a minute: the CI smoke run
    resflow-bench                    # the full suite
    resflow-bench --compare old/results.json   # ratios against an earlier run, regressions flagged
    python -m benchmarks.run --cases lipswish --out my-results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import warnings
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

from . import counts, memory, report, roofline
from .cases import CASES, COMPILE, EAGER, RESFLOW
from .timing import environment, first_call_seconds, measure, steady_state_allocator


def _max_abs_err(outputs, expected) -> float:
    """The largest difference over the outputs (0 where there are none); only for outputs that
    passed _check, so the two sequences have the same length and shapes."""
    return max((float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0
                for a, b in zip(outputs, expected)), default=0.0)


def _check(outputs, expected, tol) -> str | None:
    """Why a provider's outputs fail the correctness gate against eager's, or None when they pass:
    the same number of outputs, each within ``tol`` (torch.testing.assert_close)."""
    if len(outputs) != len(expected):
        return f"returned {len(outputs)} outputs, eager returns {len(expected)}"
    for i, (a, b) in enumerate(zip(outputs, expected)):
        try:
            torch.testing.assert_close(a, b, **tol)
        except AssertionError as exc:
            return f"output {i} differs from eager: {str(exc).splitlines()[0]}"
    return None


def ceilings(device: str, min_run_time: float, repeats: int = 3) -> dict:
    """The machine's measured limits, once per run, each the best median of ``repeats``
    measurements (a ceiling is what the machine can do; a shared VM sometimes does less): memory
    bandwidth from copying a 256 MiB float32 tensor (bytes read + written), and the FLOP rate of a
    2048 x 2048 float32 matmul."""
    src = torch.randn(64 << 20, device=device)
    dst = torch.empty_like(src)
    copy = min(measure(lambda: dst.copy_(src), min_run_time, device).median_s for _ in range(repeats))
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)
    matmul = min(measure(lambda: a @ b, min_run_time, device).median_s for _ in range(repeats))
    return {"bandwidth_gbps": 2 * src.numel() * 4 / copy / 1e9, "matmul_gflops": 2 * 2048**3 / matmul / 1e9,
            "how": f"best of {repeats}: dst.copy_(src) of 256 MiB float32 (bytes read + written); "
                   "a 2048 x 2048 float32 matmul (2 n^3 FLOPs)"}


def run_case(case, device: str, quick: bool, min_run_time: float, limits: dict, log, progress=None) -> list[dict]:
    rows = []
    for index, config in enumerate(case.configs(quick)):
        providers = case.providers()
        try:
            inputs = case.make_inputs(config, device)
            expected = case.runner(providers[EAGER], inputs, config)()
        except Exception as exc:  # no reference to gate against (e.g. normflows missing): every provider N/A
            error = f"the eager reference cannot run: {type(exc).__name__}: {exc}"[:300]
            rows += [{"case": case.name, "config": config.as_dict(), "label": config.label, "provider": name,
                      "status": "n/a", "error": error} for name in providers]
            log(f"  {case.name} {config.label} {config.mode}: every provider N/A ({error})")
            continue
        bytes_moved, flops = case.bytes_moved(config, inputs), case.flops(config, inputs)
        base = {"case": case.name, "config": config.as_dict(), "label": config.label,
                "bytes_moved": bytes_moved, "flops": flops}
        if "rotation" in inputs:
            base["rotation"] = inputs["rotation"]
        floors = {"memory floor": bytes_moved / (limits["bandwidth_gbps"] * 1e9),
                  "matmul floor": flops / (limits["matmul_gflops"] * 1e9)}
        floor_s = max(floors.values())
        for name, seconds in floors.items():
            rows.append({**base, "provider": name, "status": "ok", "median_us": seconds * 1e6,
                         "gbps": bytes_moved / seconds / 1e9, "gflops": flops / seconds / 1e9,
                         "vs_floor": seconds / floor_s})
        for gpu in roofline.GPUS:
            seconds = roofline.predicted_seconds(gpu, bytes_moved, flops)
            rows.append({**base, "provider": f"{gpu.name} floor (predicted)", "status": "ok", "predicted": True,
                         "median_us": seconds * 1e6})
        here = roofline.present(torch.cuda.get_device_name()) if device == "cuda" else None
        for name, fn in providers.items():
            row = {**base, "provider": name}
            try:
                if name == COMPILE:  # a cold compile: no recompile limit carried over, no on-disk cache hits;
                    torch._dynamo.reset()  # random ops draw as eager does (same seed, same numbers)
                    inductor_config.force_disable_caches = True
                    inductor_config.fallback_random = True
                    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
                    torch._logging.set_logs(dynamo=logging.ERROR)  # graph breaks in the reference are expected
                    inductor_config.cpp.enable_kernel_profile = True  # Inductor's kernels appear to the op count
                    torch._dynamo.utils.counters.clear()  # the graph breaks of this compile only
                step = case.runner(fn, inputs, config)
                if name == COMPILE:
                    row["compile_s"] = first_call_seconds(step)
                    row.update(counts.graph_breaks())
                outputs = step()
            except Exception as exc:  # a provider that cannot run is N/A, not a crash
                rows.append({**row, "status": "n/a", "error": f"{type(exc).__name__}: {exc}"[:300]})
                log(f"  {case.name} {config.label} {config.mode} {name}: N/A ({type(exc).__name__})")
                continue
            problem = _check(outputs, expected, case.tolerance(config))
            if problem:
                rows.append({**row, "status": "failed", "error": problem})
                log(f"  {case.name} {config.label} {config.mode} {name}: FAILED the correctness gate")
                continue
            row["max_abs_err"] = _max_abs_err(outputs, expected)
            t = measure(step, min_run_time, device)
            if name == RESFLOW:  # the noise band: the same provider measured again, right after
                row["repeat_us"] = measure(step, min_run_time, device).median_s * 1e6
                row["noise"] = abs(row["repeat_us"] / (t.median_s * 1e6) - 1)
            row.update(status="ok", median_us=t.median_s * 1e6, iqr_us=t.iqr_s * 1e6, runs=t.runs,
                       gbps=bytes_moved / t.median_s / 1e9, gflops=flops / t.median_s / 1e9,
                       vs_floor=t.median_s / floor_s)
            if here is not None:
                row["vs_gpu_floor"] = t.median_s / roofline.predicted_seconds(here, bytes_moved, flops)
            row.update(counts.count_step(step, warm=True))  # ops and host syncs: one more call, profiled
            row["predicted_gpu_us"] = {gpu.name: counts.predicted_gpu_us(gpu, row["ops_per_step"], row["syncs_per_step"],
                                                                         bytes_moved, flops) for gpu in roofline.GPUS}
            if index == 0 or not quick:  # --quick measures memory on the first configuration only
                try:
                    row["peak_mib"] = memory.in_subprocess("step_peak", case.name, quick, index, name, device)
                except RuntimeError as exc:
                    row["peak_error"] = str(exc)[:300]
            rows.append(row)
            peak = f", peak {row['peak_mib']:.1f} MiB" if "peak_mib" in row else ""
            log(f"  {case.name} {config.label} {config.mode} {name}: {t.median_s * 1e6:.1f} µs{peak},"
                f" {row['ops_per_step']} ops, {row['syncs_per_step']} syncs")
        _add_ratios(rows, base)
        if progress is not None:
            log(f"[resflow-bench] {progress.step()}")
    return rows


def _add_ratios(rows: list[dict], base: dict) -> None:
    mine = [r for r in rows if r["config"] == base["config"] and r["case"] == base["case"]]
    times = {r["provider"]: r.get("median_us") for r in mine if r["status"] == "ok"}
    for r in mine:
        if r["status"] != "ok" or "floor" in r["provider"]:
            continue
        for key, ref in (("speedup_vs_eager", EAGER), ("speedup_vs_compile", COMPILE)):
            if times.get(ref):
                r[key] = times[ref] / r["median_us"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="resflow-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small configurations and short timing (CI)")
    parser.add_argument("--out", default="bench-results", help="output directory (default: ./bench-results)")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES), help="cases to run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds of timing per measurement (default 0.2 quick, 1.0 full)")
    parser.add_argument("--compare", metavar="OLD.json", default=None,
                        help="print time ratios against an earlier results.json and flag regressions")
    args = parser.parse_args(argv)
    min_run_time = args.min_run_time or (0.2 if args.quick else 1.0)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    allocator = steady_state_allocator()
    limits = ceilings(args.device, min_run_time)
    log(f"[resflow-bench] ceilings on {args.device}: {limits['bandwidth_gbps']:.1f} GB/s, "
        f"{limits['matmul_gflops']:.1f} GFLOP/s")
    data = {"meta": environment(args.device, allocator), "quick": args.quick, "min_run_time_s": min_run_time,
            "ceilings": limits, "gpu_floors": [dataclasses.asdict(g) for g in roofline.GPUS],
            "counting": counts.describe(), "cases": {name: CASES[name].title for name in args.cases}, "results": [],
            "targets": []}
    progress = report.Progress(sum(len(CASES[name].configs(args.quick)) for name in args.cases))
    for name in args.cases:
        case = CASES[name]
        log(f"[resflow-bench] {name} on {args.device} ({torch.get_num_threads()} threads)")
        rows = run_case(case, args.device, args.quick, min_run_time, limits, log, progress)
        if hasattr(case, "memory"):
            rows += case.memory(args.device, args.quick, log)
        data["results"] += rows
        data["targets"] += [dict(case=name, **vars(t)) for t in case.targets(rows, args.quick)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = report.schema_problems(data)
    if problems:
        raise RuntimeError("results do not follow the schema of benchmarks/README.md: " + "; ".join(problems))
    (out / "results.json").write_text(json.dumps(data, indent=1))
    markdown = report.render(data)
    (out / "results.md").write_text(markdown)
    print(markdown)
    log(f"[resflow-bench] wrote {out / 'results.json'} and {out / 'results.md'}")
    for line in report.charts(data, out):
        log(f"[resflow-bench] {line}")
    if args.compare:
        print(report.compare(json.loads(Path(args.compare).read_text()), data))
    broken = [r for r in data["results"] if r["provider"] == RESFLOW and r["status"] != "ok"]
    for r in broken:
        log(f"[resflow-bench] resflow_cuda {r['case']} {r['label']} {r['config']['mode']}: {r['status']}: {r.get('error')}")
    report.print_summary(data, out / "results.md")
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
