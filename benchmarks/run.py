"""resflow-bench: the one benchmark runner.

For every case, configuration and provider: check the provider's outputs against the eager
reference (a provider that disagrees is reported as failing and not timed), time it with
torch.utils.benchmark, and put it beside the eager and torch.compile times and the memory floor
(the bytes the configuration must move at the bandwidth of a clone measured in the same run).
Writes results.json (with environment metadata; schema in benchmarks/README.md), results.md
(rendered from the JSON only) and PNG charts into --out, and prints the Markdown.

    resflow-bench --quick            # seconds to a minute: the CI smoke run
    resflow-bench                    # the full suite
    resflow-bench --compare old/results.json   # ratios against an earlier run, regressions flagged
    python -m benchmarks.run --cases lipswish --out my-results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import report
from .cases import CASES, COMPILE, EAGER, RESFLOW
from .timing import environment, first_call_seconds, measure, steady_state_allocator


def _max_abs_err(outputs, expected) -> float:
    return max(float((a.double() - b.double()).abs().max()) if a.numel() else 0.0 for a, b in zip(outputs, expected))


def _check(outputs, expected, tol) -> str | None:
    for i, (a, b) in enumerate(zip(outputs, expected)):
        try:
            torch.testing.assert_close(a, b, **tol)
        except AssertionError as exc:
            return f"output {i} differs from eager: {str(exc).splitlines()[0]}"
    return None


def run_case(case, device: str, quick: bool, min_run_time: float, log) -> list[dict]:
    rows = []
    for config in case.configs(quick):
        inputs = case.make_inputs(config, device)
        providers = case.providers()
        expected = case.runner(providers[EAGER], inputs, config)()
        bytes_moved = case.bytes_moved(config)
        base = {"case": case.name, "config": config.as_dict(), "label": config.label, "bytes_moved": bytes_moved}
        floor_s = None
        flops = case.flops(config) if hasattr(case, "flops") else None
        if flops is not None:
            rate = _matmul_rate(device, min_run_time)
            floor_s = flops / rate
            base["flops"] = flops
            rows.append({**base, "provider": "matmul floor", "status": "ok", "median_us": floor_s * 1e6,
                         "gflops": rate / 1e9, "vs_floor": 1.0})
        if bytes_moved is not None:
            floor_fn, floor_bytes = case.floor_runner(inputs)
            floor = measure(floor_fn, min_run_time)
            bandwidth = floor_bytes / floor.median_s
            floor_s = bytes_moved / bandwidth
            rows.append({**base, "provider": "memory floor (clone)", "status": "ok", "median_us": floor_s * 1e6,
                         "iqr_us": floor.iqr_s * bytes_moved / floor_bytes * 1e6, "runs": floor.runs,
                         "gbps": bandwidth / 1e9, "vs_floor": 1.0})
        for name, fn in providers.items():
            row = {**base, "provider": name}
            try:
                step = case.runner(fn, inputs, config)
                if name == COMPILE:
                    row["compile_s"] = first_call_seconds(step)
                outputs = step()
            except Exception as exc:  # a provider that cannot run is N/A, not a crash
                rows.append({**row, "status": "n/a", "error": f"{type(exc).__name__}: {exc}"[:300]})
                log(f"  {case.name} {config.label} {config.mode} {name}: N/A ({type(exc).__name__})")
                continue
            row["max_abs_err"] = _max_abs_err(outputs, expected)
            problem = _check(outputs, expected, case.tolerance(config))
            if problem:
                rows.append({**row, "status": "failed", "error": problem})
                log(f"  {case.name} {config.label} {config.mode} {name}: FAILED the correctness gate")
                continue
            t = measure(step, min_run_time)
            if name == RESFLOW:  # the noise band: the same provider measured again, right after
                row["repeat_us"] = measure(step, min_run_time).median_s * 1e6
                row["noise"] = abs(row["repeat_us"] / (t.median_s * 1e6) - 1)
            rows.append({**row, "status": "ok", "median_us": t.median_s * 1e6, "iqr_us": t.iqr_s * 1e6,
                         "runs": t.runs, "gbps": None if bytes_moved is None else bytes_moved / t.median_s / 1e9,
                         "gflops": None if flops is None else flops / t.median_s / 1e9,
                         "vs_floor": None if floor_s is None else t.median_s / floor_s})
            log(f"  {case.name} {config.label} {config.mode} {name}: {t.median_s * 1e6:.1f} µs")
        _add_ratios(rows, base)
    return rows


_MATMUL_RATES: dict = {}


def _matmul_rate(device: str, min_run_time: float) -> float:
    """FLOP/s of a 1024 x 1024 float32 matmul on this device, measured once per run."""
    if device not in _MATMUL_RATES:
        a = torch.randn(1024, 1024, device=device)
        b = torch.randn(1024, 1024, device=device)
        _MATMUL_RATES[device] = 2 * 1024**3 / measure(lambda: a @ b, min_run_time).median_s
    return _MATMUL_RATES[device]


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
    data = {"meta": environment(args.device, allocator), "quick": args.quick, "min_run_time_s": min_run_time,
            "cases": {name: CASES[name].title for name in args.cases}, "results": [], "targets": []}
    for name in args.cases:
        case = CASES[name]
        log(f"[resflow-bench] {name} on {args.device} ({torch.get_num_threads()} threads)")
        rows = run_case(case, args.device, args.quick, min_run_time, log)
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
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
