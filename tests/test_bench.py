"""resflow-bench end to end in quick mode: JSON (schema), Markdown, PNG charts and --compare."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import pytest
import torch

from resflow_cuda.benchmarks import report, run


def _first_of_each_stack(case_type):
    """``case_type.configs`` limited to the first configuration of each stack (mlp, conv8): the end-to-end
    runs below then take half the time, with both kinds of row still there."""
    configs = case_type.configs

    def first_of_each(self, quick):
        every = configs(self, quick)
        return [c for i, c in enumerate(every) if all(c.stack != d.stack for d in every[:i])]

    return first_of_each


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from resflow_cuda.benchmarks.cases.update_lipschitz import UpdateLipschitzCase

    out = tmp_path_factory.mktemp("bench")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), pytest.MonkeyPatch.context() as mp:
        mp.setattr(UpdateLipschitzCase, "configs", _first_of_each_stack(UpdateLipschitzCase))
        code = run.main(["--quick", "--cases", "update_lipschitz", "--min-run-time", "0.01", "--out", str(out)])
    (out / "stdout.txt").write_text(stdout.getvalue())
    (out / "stderr.txt").write_text(stderr.getvalue())
    return code, out, json.loads((out / "results.json").read_text())


def test_quick_run_ends_with_a_summary_and_shows_progress(quick_run):
    _, out, data = quick_run
    lines = (out / "stdout.txt").read_text().rstrip("\n").splitlines()
    # the last lines: a header, one line per configuration, the count of targets met
    configs = [r for r in data["results"] if r["provider"] == "resflow_cuda"]
    start = next(i for i, line in enumerate(lines) if line.startswith("resflow-bench summary (cpu)"))
    body = lines[start + 2:]
    assert len(body) == len(configs) + 1, lines[start:]
    for r, line in zip(configs, body):
        assert line.split()[:1] == ["update_lipschitz"] and f"{r['label']} {r['config']['mode']}" in line
        assert f"{r['speedup_vs_eager']:.2f}×" in line and f"{r['speedup_vs_compile']:.2f}×" in line
        targets = report._targets_of(r, data["targets"])
        assert len(targets) == 1 and line.endswith("met") == targets[0]["met"], (line, targets)
    met = sum(t["met"] for t in data["targets"])
    assert body[-1].startswith(f"targets: {met} of {len(data['targets'])} met") and str(out / "results.md") in body[-1]
    first = configs[0]  # --quick measures peak memory on the first configuration: the ratio is shown
    eager = next(r for r in data["results"] if r["provider"] == "eager" and r["label"] == first["label"]
                 and r["config"] == first["config"])
    ratio = f"{first['peak_mib'] / eager['peak_mib']:.2f}×" if eager["peak_mib"] > 0 else "–"
    assert f" {ratio} " in body[0]
    progress = [line for line in (out / "stderr.txt").read_text().splitlines() if "configurations done" in line]
    assert progress[0].startswith(f"[resflow-bench] 1/{len(configs)} configurations done") and "left" in progress[0]
    assert progress[-1].startswith(f"[resflow-bench] {len(configs)}/{len(configs)} configurations done")


def test_quick_run_writes_json_markdown_and_charts(quick_run):
    code, out, data = quick_run
    assert code == 0
    assert report.schema_problems(data) == []
    ours = [r for r in data["results"] if r["provider"] == "resflow_cuda"]
    assert ours and all(r["status"] == "ok" and r["median_us"] > 0 and r["noise"] >= 0 for r in ours)
    assert {r["config"]["stack"] for r in ours} == {"mlp", "conv8"}
    # every provider of the reference is there; torch.compile reports its (cold) compile time
    compiled = [r for r in data["results"] if r["provider"] == "torch.compile"]
    assert compiled and all(r["status"] == "ok" and r["compile_s"] > 0 for r in compiled)
    assert {r["provider"] for r in data["results"]} >= {"resflow_cuda", "eager", "normflows", "memory floor",
                                                       "matmul floor"}
    # floors from the run's ceilings: the larger floor is 1x, every timed row is measured against it
    assert data["ceilings"]["bandwidth_gbps"] > 0 and data["ceilings"]["matmul_gflops"] > 0
    for r in ours:
        floor = max(r["bytes_moved"] / data["ceilings"]["bandwidth_gbps"] / 1e3,
                    r["flops"] / data["ceilings"]["matmul_gflops"] / 1e3)
        assert r["vs_floor"] == pytest.approx(r["median_us"] / floor)
    # --quick measures peak memory on the first configuration of the case, for every timed provider
    first = [r for r in data["results"] if r["label"] == "mlp" and r["config"]["mode"] == "5 iterations"
             and r["status"] == "ok" and "floor" not in r["provider"]]
    assert len(first) == 4 and all(r["peak_mib"] >= 0 for r in first)
    markdown = (out / "results.md").read_text()
    assert markdown == report.render(data) and "| mlp | resflow_cuda |" in markdown
    assert (out / "speedup-update_lipschitz.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "ops-update_lipschitz.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_counts_ops_and_syncs_of_every_timed_row(quick_run):
    from resflow_cuda.benchmarks import counts

    _, out, data = quick_run
    timed = [r for r in data["results"] if r["status"] == "ok" and "runs" in r]
    assert timed and all(r["ops_per_step"] > 0 and r["syncs_per_step"] >= 0 for r in timed)
    for r in timed:  # the predicted GPU time: launches, syncs and the floor, one per datasheet GPU
        assert set(r["predicted_gpu_us"]) == {g["name"] for g in data["gpu_floors"]}
        assert min(r["predicted_gpu_us"].values()) >= r["ops_per_step"] * data["counting"]["launch_us"]
    compiled = [r for r in timed if r["provider"] == "torch.compile"]
    assert compiled and all(isinstance(r["graph_breaks"], int) for r in compiled)
    assert "| ops | syncs |" in (out / "results.md").read_text()
    # the runner's counts are the budget check's (the same rules, one thread for both)
    budgets = counts.load_budgets(Path(__file__).resolve().parents[1] / "benchmarks" / "budgets.json")
    if budgets["budgets_recorded"]["torch"] == torch.__version__:
        for r in (r for r in timed if r["provider"] == "resflow_cuda"):
            budget = budgets["budgets"]["update_lipschitz"][f"{r['label']} {r['config']['mode']}"]
            assert (r["ops_per_step"], r["syncs_per_step"]) == (budget["ops_per_step"], budget["syncs_per_step"])


def test_compare_flags_regressions_beyond_the_noise_band(quick_run, tmp_path, capsys, monkeypatch):
    _, out, data = quick_run
    old, new = copy.deepcopy(data), copy.deepcopy(data)
    for r in old["results"] + new["results"]:
        if r["provider"] == "resflow_cuda":
            r["noise"] = 0.01  # a fixed noise band: the measured one depends on the machine's load
    for r in old["results"]:
        if r["provider"] == "resflow_cuda":
            r["median_us"] /= 3  # the old run was 3x faster: every row is a regression now
    table = report.compare(old, new)
    rows = [line for line in table.splitlines() if line.startswith("| update_lipschitz")]
    ours = [line for line in rows if "| resflow_cuda |" in line]
    assert ours and all("**regression**" in line and "3.00×" in line for line in ours)
    assert f"{len(ours)} regression(s)" in table
    same = report.compare(data, data)
    assert "0 regression(s)" in same and "within noise" in same
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(old))
    # the command line's --compare: a run of the first configuration with resflow_cuda and its reference only
    # (torch.compile's cold compiles would take most of the time), compared with the old run's rows
    from resflow_cuda.benchmarks.cases.base import EAGER, RESFLOW
    from resflow_cuda.benchmarks.cases.update_lipschitz import UpdateLipschitzCase

    providers, first_of_each = UpdateLipschitzCase.providers, _first_of_each_stack(UpdateLipschitzCase)
    monkeypatch.setattr(UpdateLipschitzCase, "configs", lambda self, quick: first_of_each(self, quick)[:1])
    monkeypatch.setattr(UpdateLipschitzCase, "providers",
                        lambda self: {k: v for k, v in providers(self).items() if k in (RESFLOW, EAGER)})
    assert run.main(["--quick", "--cases", "update_lipschitz", "--min-run-time", "0.01", "--out", str(tmp_path / "new"),
                     "--compare", str(old_path)]) == 0
    printed = capsys.readouterr().out
    assert "regression(s) beyond the noise band" in printed
    assert "| update_lipschitz | mlp 5 iterations | resflow_cuda |" in printed  # the row both runs have


def test_schema_problems_are_named(quick_run):
    data = copy.deepcopy(quick_run[2])
    del data["meta"]["torch_threads"]
    del data["results"][0]["provider"]
    data["results"][1]["case"] = "nope"
    problems = report.schema_problems(data)
    assert "meta lacks 'torch_threads'" in problems
    assert "results[0] lacks 'provider'" in problems
    assert "results[1] names an unknown case 'nope'" in problems
    assert report.schema_problems({"meta": {}}) == [f"missing or mistyped '{k}'" for k in
                                                    ("quick", "min_run_time_s", "ceilings", "cases", "results",
                                                     "targets")]


def test_peak_memory_sees_a_steps_allocations():
    from resflow_cuda.benchmarks import memory

    held = torch.ones(1 << 20)  # allocated before the step: not counted
    step_mib = memory.peak_mib(lambda: torch.ones(16 << 20).add_(held.sum()), "cpu")
    assert 60 <= step_mib <= 96  # the step's 64 MiB tensor
    assert memory.peak_mib(lambda: held.sum(), "cpu") < 8


def test_memory_probe_runs_in_a_fresh_process_and_reports_failures():
    from resflow_cuda.benchmarks import memory

    peak = memory.in_subprocess("step_peak", "lipswish", True, 2, "resflow_cuda", "cpu")  # 256x1024 fwd+bwd
    assert 2 <= peak <= 64  # y, grad_x: 1 MiB each, plus allocator and thread-pool pages (seen up to 16)
    with pytest.raises(RuntimeError, match="KeyError"):
        memory.in_subprocess("step_peak", "no such case", True, 0, "resflow_cuda", "cpu")


def test_rotated_inputs_start_with_the_first_copy_and_cycle():
    from resflow_cuda.benchmarks import cases

    case = cases.LipSwishCase()
    config = cases.Config((256, 1024), "fwd")
    inputs = case.make_inputs(config, "cpu")
    k = inputs["rotation"]
    assert k == cases.rotation(2 * 256 * 1024 * 4, "cpu") and len(inputs["x"]) == k
    assert k * 2 * 256 * 1024 * 4 >= 2 * cases.cache_bytes("cpu") or k == 64
    seen = []
    step = case.runner(lambda x, beta: seen.append(x) or x, inputs, config)
    for _ in range(k + 1):
        step()
    assert [s is x for s, x in zip(seen, inputs["x"] + inputs["x"][:1])] == [True] * (k + 1)
    assert case.make_inputs(config, "cpu", rotate=False)["rotation"] == 1


# -- the correctness gate ----------------------------------------------------------------------
# These import the runner and the cases from the source tree (benchmarks/), which is the code under test here
# (an editable install may map resflow_cuda.benchmarks to another checkout).


@pytest.fixture
def gate(monkeypatch):
    """benchmarks.run with timing, op counting and the memory probe replaced by stubs that record which
    steps they were given; returns (run module, the list of timed steps' provider names)."""
    from benchmarks import run as tree_run
    from benchmarks.timing import Timing

    timed = []

    def fake_measure(step, min_run_time, device="cpu"):
        timed.append(step.provider)
        return Timing(median_s=1e-6, iqr_s=0.0, runs=1)

    monkeypatch.setattr(tree_run, "measure", fake_measure)
    monkeypatch.setattr(tree_run.counts, "count_step", lambda step, warm=True: {"ops_per_step": 1, "syncs_per_step": 0})
    monkeypatch.setattr(tree_run.memory, "in_subprocess", lambda *args: 0.0)
    return tree_run, timed


LIMITS = {"bandwidth_gbps": 1.0, "matmul_gflops": 1.0}


def _gate_case():
    from benchmarks.cases import EAGER, RESFLOW, Case, Config

    def right(x):
        return x * 2, x + 1

    def wrong(x):  # the second output off by 0.5: far outside atol 1e-4 + rtol 1e-3 * |x + 1|
        return x * 2, x + 1.5

    def short(x):  # the first output right, the second missing
        return (x * 2,)

    def also_right(x):  # another function: the runner tells providers apart by function
        return right(x)

    class GateCase(Case):
        name, title = "gate", "the correctness gate"

        def configs(self, quick):
            return [Config((4,), "fwd")]

        def providers(self):
            return {EAGER: right, RESFLOW: short, "wrong": wrong, "right too": also_right}

        def make_inputs(self, config, device, rotate=True):
            return {"x": torch.arange(4.0)}

        def runner(self, provider, inputs, config):
            def step():
                return provider(inputs["x"])

            step.provider = next(name for name, fn in self.providers().items() if fn is provider)
            return step

        def counts(self, config):
            return 1.0, 1.0

    return GateCase()


def test_gate_marks_wrong_values_and_short_outputs_failed_and_times_neither(gate):
    tree_run, timed = gate
    rows = tree_run.run_case(_gate_case(), "cpu", True, 0.01, LIMITS, lambda msg: None)
    by_provider = {r["provider"]: r for r in rows}
    short, wrong = by_provider["resflow_cuda"], by_provider["wrong"]
    assert short["status"] == "failed" and short["error"] == "returned 1 outputs, eager returns 2", short
    assert wrong["status"] == "failed" and wrong["error"].startswith("output 1 differs from eager"), wrong
    for r in (short, wrong):
        assert "median_us" not in r and "ops_per_step" not in r  # not timed, not counted
    assert by_provider["right too"]["status"] == "ok" and by_provider["right too"]["max_abs_err"] == 0
    # only the providers that passed were timed: "eager" and "right too" once each (the noise band's repeat
    # is resflow_cuda's, which failed)
    assert sorted(timed) == ["eager", "right too"]


def test_gate_check_compares_lengths_before_values():
    from benchmarks import run as tree_run

    a, b = torch.ones(3), torch.zeros(3)
    tol = dict(atol=1e-4, rtol=1e-3)
    assert tree_run._check((a, b), (a, b), tol) is None
    assert tree_run._check((a,), (a, b), tol) == "returned 1 outputs, eager returns 2"
    assert tree_run._check((a, b, b), (a, b), tol) == "returned 3 outputs, eager returns 2"
    assert tree_run._check((), (a,), tol) == "returned 0 outputs, eager returns 1"
    assert tree_run._check((a, a), (a, b), tol).startswith("output 1 differs from eager")


def _stale_update_lipschitz_case(stale: str):
    """update_lipschitz's case on the MLP stack, 5 iterations, with two more providers: our update with every
    layer's ``stale`` buffer ("u" or "v") put back to the value before the update (right sigma, wrong vector)."""
    from benchmarks.cases import EAGER, RESFLOW, StackConfig, UpdateLipschitzCase

    class Stale(UpdateLipschitzCase):
        def configs(self, quick):
            return [StackConfig("mlp", "5 iterations")]

        def providers(self):
            return {RESFLOW: "resflow", EAGER: "eager", f"stale {stale}": "stale"}

        def runner(self, provider, inputs, config):
            names = {v: k for k, v in self.providers().items()}
            inner = super().runner("resflow" if provider == "stale" else provider, inputs, config)
            before = [t for k, t in inputs["state"].items() if k.endswith("." + stale)]
            which = {"u": 1, "v": 2}[stale]  # outputs per layer: (sigma, u, v)

            def step():
                out = list(inner())
                if provider == "stale":
                    for layer, old in enumerate(before):
                        out[3 * layer + which] = old.clone()
                return tuple(out)

            step.provider = names[provider]
            return step

    return Stale()


@pytest.mark.parametrize("stale", ["u", "v"])
def test_update_lipschitz_gate_checks_u_and_v(gate, stale):
    tree_run, timed = gate
    case = _stale_update_lipschitz_case(stale)
    rows = {r["provider"]: r for r in tree_run.run_case(case, "cpu", True, 0.01, LIMITS, lambda msg: None)}
    assert rows["resflow_cuda"]["status"] == "ok", rows["resflow_cuda"]  # the real update passes the gate
    bad = rows[f"stale {stale}"]
    first = {"u": 1, "v": 2}[stale]  # the first layer's u or v is the first output that differs
    assert bad["status"] == "failed" and bad["error"].startswith(f"output {first} differs from eager"), bad
    assert "median_us" not in bad and f"stale {stale}" not in timed
    # every layer's sigma, u and v is an output (5 layers): the gate sees all three
    config = case.configs(True)[0]
    inputs = case.make_inputs(config, "cpu")
    assert len(case.runner("eager", inputs, config)()) == 3 * 5


def test_a_case_whose_eager_reference_cannot_run_is_not_available_not_a_crash(gate):
    """Where the reference cannot run (normflows not installed, say), nothing can be gated: every
    provider of that configuration is N/A with the reason, none is timed, and the run goes on."""
    tree_run, timed = gate
    case = _gate_case()

    def no_reference(config, device, rotate=True):
        raise ModuleNotFoundError("No module named 'normflows'")

    case.make_inputs = no_reference
    logged = []
    rows = tree_run.run_case(case, "cpu", True, 0.01, LIMITS, logged.append)
    assert sorted(r["provider"] for r in rows) == sorted(case.providers())
    for r in rows:
        assert r["status"] == "n/a" and "No module named 'normflows'" in r["error"] and "median_us" not in r, r
    assert timed == [] and any("N/A" in line for line in logged)

