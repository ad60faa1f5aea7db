"""Markdown from a results.json of the runner, and nothing else (so old runs re-render).

    python -m benchmarks.report bench-results/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def render(data: dict) -> str:
    meta = data["meta"]
    build = meta["resflow_cuda"]
    lines = [
        "# resflow_cuda benchmark results",
        "",
        f"- {meta['timestamp']}, git {meta['git_revision']}, `{' '.join(Path(a).name if i == 0 else a for i, a in enumerate(meta['argv']))}`",
        f"- device: {meta['device']}" + (f" ({meta['gpu']})" if "gpu" in meta else ""),
        f"- CPU: {meta['cpu_model']}, {meta['cpu_count']} logical cores, torch threads: {meta['torch_threads']}",
        f"- torch {meta['torch_version']}; resflow_cuda {build['version']} (CPU kernels: {build['cpu_capability']},"
        f" CUDA kernels: {'yes, ' + build['cuda_version'] if build['cuda'] else 'no'})",
        f"- timing: torch.utils.benchmark blocked autorange, {data['min_run_time_s']} s per measurement;"
        f" median and interquartile range; allocator: {meta['allocator']}",
        "- memory floor: the bytes the configuration must move at the bandwidth of `x.clone()` measured"
        " on the same shape in the same run; matmul floor: the FLOPs of the configuration at the rate of a"
        " 1024² float32 matmul measured in the same run; `/ floor` is time over that floor",
        "",
    ]
    for case, title in data["cases"].items():
        lines += [f"## {case}: {title}", ""]
        rows = [r for r in data["results"] if r["case"] == case and "peak_mib" not in r and
                r["config"]["mode"] != "peak memory"]
        memory = [r for r in data["results"] if r["case"] == case and r["config"]["mode"] == "peak memory"]
        modes = list(dict.fromkeys(r["config"]["mode"] for r in rows))
        for mode in modes:
            lines += [f"### {mode}", "",
                      "| config | provider | median µs | IQR µs | GB/s | GFLOP/s | × eager | × compile | / floor | status |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
            for r in (r for r in rows if r["config"]["mode"] == mode):
                status = r["status"]
                if r.get("compile_s") is not None:
                    status += f" (compile {r['compile_s']:.1f} s)"
                if r.get("error"):
                    status += f": {r['error']}"
                lines.append(
                    f"| {r['label']} | {r['provider']} | {_fmt(r.get('median_us'), '.1f')} | "
                    f"{_fmt(r.get('iqr_us'), '.1f')} | {_fmt(r.get('gbps'), '.1f')} | {_fmt(r.get('gflops'), '.1f')} | "
                    f"{_fmt(r.get('speedup_vs_eager'), '.2f', '×')} | {_fmt(r.get('speedup_vs_compile'), '.2f', '×')} | "
                    f"{_fmt(r.get('vs_floor'), '.2f', '×')} | {status} |")
            lines.append("")
        if memory:
            terms = list(dict.fromkeys(r["label"] for r in memory))
            providers = list(dict.fromkeys(r["provider"] for r in memory))
            lines += ["### peak memory of one training step (MiB above the state before it)", "",
                      "| provider | " + " | ".join(terms) + " |", "|---|" + "---:|" * len(terms)]
            for p in providers:
                cells = {r["label"]: (_fmt(r.get("peak_mib"), ".1f") if r["status"] == "ok" else r["status"])
                         for r in memory if r["provider"] == p}
                lines.append(f"| {p} | " + " | ".join(cells.get(t, "–") for t in terms) + " |")
            lines.append("")
        targets = [t for t in data["targets"] if t["case"] == case]
        if targets:
            lines += ["Targets:", ""]
            lines += [f"- {'met' if t['met'] else '**not met**'}: {t['text']} ({t['detail']})" for t in targets]
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.report RESULTS.json", file=sys.stderr)
        return 2
    print(render(json.loads(Path(argv[0]).read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
