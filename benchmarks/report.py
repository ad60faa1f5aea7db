"""Markdown from a results.json of the runner, and nothing else (so old runs re-render).

    python -m benchmarks.report bench-results/results.json
"""

from __future__ import annotations

import json
import sys
import time
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
        f"- ceilings measured in this run: {data['ceilings']['bandwidth_gbps']:.1f} GB/s memory bandwidth,"
        f" {data['ceilings']['matmul_gflops']:.1f} GFLOP/s float32 matmul ({data['ceilings']['how']})",
        "- floors: `memory floor` is the least bytes the configuration must move at that bandwidth, `matmul floor`"
        " its FLOPs at that rate; `/ floor` is a row's time over the larger of the two (below 1× where caches"
        " served part of the traffic, e.g. an output buffer the allocator hands back hot); `repeat`: how much a second"
        " measurement of the same provider differed (the noise band `--compare` uses); `peak MiB`: peak memory of"
        " one step above the state before it, each in a fresh process (CPU: resident-set high-water mark; CUDA:"
        " max_memory_allocated)",
    ]
    if data.get("gpu_floors"):
        lines.append("- GPU floors (predicted, not measured): the same bytes and FLOPs at datasheet rates, FP32 on CUDA"
                     " cores (the cases are float32 and checked to ~1e-4, which TF32 does not meet): "
                     + "; ".join(f"{g['name']}: {g['bandwidth_gbps']:.0f} GB/s, {g['fp32_tflops']} TFLOPS"
                                 f" ({g['source']})" for g in data["gpu_floors"]))
    counting = data.get("counting")
    if counting:
        lines.append(f"- ops, syncs: kernel-like ops and host syncs per step ({counting['rules']}); `predicted <GPU> µs`"
                     f" (predicted, not measured) = ops × {counting['launch_us']} µs + syncs × {counting['sync_us']} µs"
                     " + the step's roofline floor on that GPU")
    lines.append("")
    for case, title in data["cases"].items():
        lines += [f"## {case}: {title}", ""]
        rows = [r for r in data["results"] if r["case"] == case and r["config"]["mode"] != "peak memory"]
        memory = [r for r in data["results"] if r["case"] == case and r["config"]["mode"] == "peak memory"]
        modes = list(dict.fromkeys(r["config"]["mode"] for r in rows))
        gpu_column = any("vs_gpu_floor" in r for r in rows)
        for mode in modes:
            lines += [f"### {mode}", "",
                      "| config | provider | median µs | IQR µs | repeat | GB/s | GFLOP/s | × eager | × compile"
                      " | / floor | " + ("/ GPU floor | " if gpu_column else "") + "peak MiB | ops | syncs | status |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu_column else "")
                      + "---:|---:|---:|---|"]
            for r in (r for r in rows if r["config"]["mode"] == mode):
                status = "predicted" if r.get("predicted") else r["status"]
                if r.get("compile_s") is not None:
                    status += f" (compile {r['compile_s']:.1f} s)"
                if r.get("error"):
                    status += f": {r['error']}"
                if r.get("peak_error"):
                    status += f" (peak memory: {r['peak_error']})"
                lines.append(
                    f"| {r['label']} | {r['provider']} | {_fmt(r.get('median_us'), '.1f')} | "
                    f"{_fmt(r.get('iqr_us'), '.1f')} | {_fmt(r.get('noise'), '.0%')} | "
                    f"{_fmt(r.get('gbps'), '.1f')} | {_fmt(r.get('gflops'), '.1f')} | "
                    f"{_fmt(r.get('speedup_vs_eager'), '.2f', '×')} | {_fmt(r.get('speedup_vs_compile'), '.2f', '×')} | "
                    f"{_fmt(r.get('vs_floor'), '.2f', '×')} | "
                    + (f"{_fmt(r.get('vs_gpu_floor'), '.2f', '×')} | " if gpu_column else "")
                    + f"{_fmt(r.get('peak_mib'), '.1f')} | {_fmt(r.get('ops_per_step'), 'd')} | "
                    f"{_fmt(r.get('syncs_per_step'), 'd')} | {status} |")
            rotated = {r["label"]: r["rotation"] for r in rows if r["config"]["mode"] == mode and "rotation" in r}
            if rotated:
                lines += ["", "Inputs rotated over " + ", ".join(f"{k} cop{'y' if k == 1 else 'ies'} ({label})" for label, k in rotated.items())
                          + " so that they come from memory, not from the cache."]
            lines.append("")
            lines += counts_table([r for r in rows if r["config"]["mode"] == mode], data.get("gpu_floors", []))
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


def _targets_of(row: dict, targets: list[dict]) -> list[dict]:
    """The targets about one configuration: their text starts with its label and mode, in either
    order, before the colon (as the cases write them)."""
    label, mode = row["label"], row["config"].get("mode", "")
    names = {f"{label} {mode}".strip(), f"{mode} {label}".strip()}
    return [t for t in targets if t["case"] == row["case"] and t["text"].split(":")[0].strip() in names]


def summary(data: dict) -> list[str]:
    """One line per case and configuration: resflow_cuda's speed-up over the eager reference and
    over torch.compile, its peak memory over the reference's, and whether the configuration's
    targets are met; then the count of targets met."""
    ours = [r for r in data["results"] if r["provider"] == "resflow_cuda" and r["config"].get("mode") != "peak memory"]
    peaks = {(r["case"], r["label"], r["config"].get("mode")): r.get("peak_mib") for r in data["results"]
             if r["provider"] == "eager" and r["status"] == "ok"}
    case_w = max([len(r["case"]) for r in ours] + [4])
    config_w = max([len(f"{r['label']} {r['config'].get('mode', '')}") for r in ours] + [6])
    lines = ["", f"resflow-bench summary ({data['meta']['device']}): resflow_cuda against the eager reference "
                 "(× = speed-up; peak = its peak memory / the reference's)",
             f"  {'case'.ljust(case_w)}  {'config'.ljust(config_w)}  {'× reference':>11}  {'× compile':>9}  "
             f"{'peak':>6}  targets"]
    for r in ours:
        name = f"{r['case'].ljust(case_w)}  {(r['label'] + ' ' + r['config'].get('mode', '')).ljust(config_w)}"
        if r["status"] != "ok":
            lines.append(f"  {name}  {r['status']}: {r.get('error', '')}"[:160])
            continue
        ref_peak = peaks.get((r["case"], r["label"], r["config"].get("mode")))
        peak = (f"{r['peak_mib'] / ref_peak:.2f}×" if r.get("peak_mib") is not None and ref_peak else "–")
        targets = _targets_of(r, data["targets"])
        missed = [t for t in targets if not t["met"]]
        verdict = ("–" if not targets else "met" if not missed
                   else "NOT met: " + "; ".join(f"{t['text'].split(':', 1)[1].strip()} ({t['detail']})" for t in missed))
        lines.append(f"  {name}  {_fmt(r.get('speedup_vs_eager'), '.2f', '×'):>11}  "
                     f"{_fmt(r.get('speedup_vs_compile'), '.2f', '×'):>9}  {peak:>6}  {verdict}")
    met = sum(t["met"] for t in data["targets"])
    lines.append(f"targets: {met} of {len(data['targets'])} met")
    return lines


def print_summary(data: dict, results_md: str | Path | None = None) -> None:
    """The summary as the last lines of the run's output (stdout)."""
    lines = summary(data)
    if results_md is not None:
        lines[-1] += f"; every row, floor and note: {results_md}"
    print("\n".join(lines), flush=True)


class Progress:
    """Configurations done out of all, with the time left estimated from the time per
    configuration so far (the cases' configurations differ in cost, so it is a rough guide)."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.monotonic()

    def step(self) -> str:
        self.done += 1
        elapsed = time.monotonic() - self.start
        left = elapsed / self.done * (self.total - self.done)
        return (f"{self.done}/{self.total} configurations done, {_duration(elapsed)} so far"
                + (f", ~{_duration(left)} left" if self.done < self.total else ""))


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def counts_table(rows: list[dict], gpus: list[dict]) -> list[str]:
    """Markdown lines: ops and host syncs per step, update_lipschitz's, graph breaks and the predicted
    GPU time of every counted row, then resflow_cuda's most frequent ops (none where nothing was counted)."""
    counted = [r for r in rows if r.get("ops_per_step") is not None]
    if not counted:
        return []
    names = [g["name"] for g in gpus]
    lines = ["ops and host syncs per step (counted, deterministic), with the predicted GPU time:", "",
             "| config | provider | ops / step | syncs / step | update_lipschitz ops | update_lipschitz syncs"
             " | graph breaks |" + "".join(f" predicted {n} µs |" for n in names),
             "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(names)]
    for r in counted:
        predicted = r.get("predicted_gpu_us", {})
        lines.append(f"| {r['label']} | {r['provider']} | {r['ops_per_step']} | {r['syncs_per_step']} | "
                     f"{_fmt(r.get('ops_update_lipschitz'), 'd')} | {_fmt(r.get('syncs_update_lipschitz'), 'd')} | "
                     f"{_fmt(r.get('graph_breaks'), 'd')} |" + "".join(f" {_fmt(predicted.get(n), '.0f')} |" for n in names))
    for r in counted:
        if r["provider"] == "resflow_cuda" and r.get("ops_by_op"):
            top = ", ".join(f"{name.split('::', 1)[-1]} {n}" for name, n in list(r["ops_by_op"].items())[:10])
            lines.append(f"\nresflow_cuda's most frequent ops ({r['label']}): {top}")
    lines.append("")
    return lines


# The keys every results.json has (benchmarks/README.md documents them).
_TOP_KEYS = {"meta": dict, "quick": bool, "min_run_time_s": float, "ceilings": dict, "cases": dict, "results": list,
             "targets": list}
_META_KEYS = ("timestamp", "git_revision", "cpu_model", "cpu_count", "torch_threads", "torch_version",
              "resflow_cuda", "device")
_ROW_KEYS = ("case", "config", "label", "provider", "status")
_COUNT_KEYS = ("ops_per_step", "syncs_per_step")


def schema_problems(data: dict) -> list[str]:
    """What in a results dict does not follow the schema (empty when it does)."""
    problems = [f"missing or mistyped '{k}'" for k, t in _TOP_KEYS.items()
                if not isinstance(data.get(k), (int, float) if t is float else t)]
    if problems:
        return problems
    problems += [f"meta lacks '{k}'" for k in _META_KEYS if k not in data["meta"]]
    for i, row in enumerate(data["results"]):
        problems += [f"results[{i}] lacks '{k}'" for k in _ROW_KEYS if k not in row]
        if row.get("status") == "ok" and not ("median_us" in row or "peak_mib" in row):
            problems.append(f"results[{i}] is ok but has neither median_us nor peak_mib")
        if row.get("status") == "ok" and "runs" in row:  # a timed row is counted too
            problems += [f"results[{i}] is timed but '{k}' is not an int" for k in _COUNT_KEYS
                         if not isinstance(row.get(k), int)]
            if row.get("compile_s") is not None and not isinstance(row.get("graph_breaks"), int):
                problems.append(f"results[{i}] is a torch.compile row without 'graph_breaks'")
        if row.get("case") not in data["cases"]:
            problems.append(f"results[{i}] names an unknown case {row.get('case')!r}")
    for i, t in enumerate(data["targets"]):
        problems += [f"targets[{i}] lacks '{k}'" for k in ("case", "text", "met", "detail") if k not in t]
    return problems


def _key(row: dict) -> tuple:
    return row["case"], json.dumps(row["config"], sort_keys=True), row["provider"]


def compare(old: dict, new: dict, floor: float = 0.05) -> str:
    """Markdown table of new/old median time per row present in both runs. A row is flagged as a
    regression when it got slower by more than its noise band: the larger relative difference of
    the repeated measurement of the same provider in either run, and at least `floor`."""
    old_rows = {_key(r): r for r in old["results"] if r.get("status") == "ok" and r.get("median_us")}
    lines = [f"# Comparison with {old['meta'].get('git_revision', '?')} ({old['meta'].get('timestamp', '?')})", "",
             "| case | config | provider | old µs | new µs | new / old | noise band | verdict |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    regressions = 0
    for r in new["results"]:
        before = old_rows.get(_key(r)) if r.get("status") == "ok" and r.get("median_us") else None
        if before is None or "floor" in r["provider"]:
            continue
        ratio = r["median_us"] / before["median_us"]
        band = max(floor, r.get("noise") or 0.0, before.get("noise") or 0.0)
        verdict = "**regression**" if ratio > 1 + band else ("faster" if ratio < 1 - band else "within noise")
        regressions += verdict == "**regression**"
        lines.append(f"| {r['case']} | {r['label']} {r['config'].get('mode', '')} | {r['provider']} | "
                     f"{before['median_us']:.1f} | {r['median_us']:.1f} | {ratio:.2f}× | ±{band:.0%} | {verdict} |")
    lines += ["", f"{regressions} regression(s) beyond the noise band."]
    return "\n".join(lines)


def charts(data: dict, out: Path) -> list[str]:
    """PNG charts next to the results: per case, resflow_cuda's speed-up over eager for every
    configuration and every provider's ops per step (``ops-<case>.png``); per case with a memory sweep, peak memory against the number of series terms.
    Returns one log line per file (or why there are none)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["matplotlib is not installed: no charts (pip install matplotlib)"]
    written = []
    for case in data["cases"]:
        rows = [r for r in data["results"] if r["case"] == case and r.get("speedup_vs_eager") is not None
                and r["provider"] == "resflow_cuda"]
        if rows:
            fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 2), 3.2))
            labels = [f"{r['label']}\n{r['config'].get('mode', '')}" for r in rows]
            ax.bar(labels, [r["speedup_vs_eager"] for r in rows], color="tab:blue")
            ax.axhline(1.0, color="gray", lw=1)
            ax.set_ylabel("speed-up over eager (×)")
            ax.set_title(f"{case} ({data['meta']['device']}, {data['meta']['torch_threads']} threads)")
            ax.tick_params(axis="x", labelsize=8)
            fig.tight_layout()
            path = out / f"speedup-{case}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(f"wrote {path}")
        counted = [r for r in data["results"] if r["case"] == case and r.get("ops_per_step") is not None]
        if counted:
            written.append(_ops_chart(plt, data, case, counted, out))
        memory = [r for r in data["results"] if r["case"] == case and r["config"]["mode"] == "peak memory"
                  and r.get("peak_mib") is not None]
        if memory:
            fig, ax = plt.subplots(figsize=(5.5, 3.5))
            for provider in dict.fromkeys(r["provider"] for r in memory):
                points = sorted((r["config"]["n"], r["peak_mib"]) for r in memory if r["provider"] == provider)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("series terms n")
            ax.set_ylabel("peak memory of a step (MiB)")
            ax.set_ylim(bottom=0)
            ax.set_title(f"{case}: peak memory of one training step ({data['meta']['device']})")
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / f"memory-{case}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(f"wrote {path}")
    return written


def _ops_chart(plt, data: dict, case: str, rows: list[dict], out: Path) -> str:
    """Grouped bars: ops per step of every provider, per configuration (host syncs in the labels)."""
    configs = list(dict.fromkeys(f"{r['label']}\n{r['config'].get('mode', '')}" for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(min(12.0, max(4.5, 0.5 * len(configs) * len(providers) + 2)), 3.4))
    for j, provider in enumerate(providers):
        mine = {f"{r['label']}\n{r['config'].get('mode', '')}": r for r in rows if r["provider"] == provider}
        xs = [i + (j - (len(providers) - 1) / 2) * width for i, c in enumerate(configs) if c in mine]
        bars = ax.bar(xs, [mine[c]["ops_per_step"] for c in configs if c in mine], width, label=provider)
        ax.bar_label(bars, [f"{mine[c]['syncs_per_step']} syncs" for c in configs if c in mine], fontsize=6)
    ax.set_xticks(range(len(configs)), configs, fontsize=8)
    ax.set_ylabel("ops per step (counted)")
    ax.set_title(f"{case}: ops per step (bar labels: host syncs per step)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"ops-{case}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.report RESULTS.json", file=sys.stderr)
        return 2
    print(render(json.loads(Path(argv[0]).read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
