"""resflow-bench end to end in quick mode: JSON (schema), Markdown, PNG charts and --compare."""

from __future__ import annotations

import copy
import json

import pytest

from resflow_cuda.benchmarks import report, run


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = run.main(["--quick", "--cases", "update_lipschitz", "--min-run-time", "0.01", "--out", str(out)])
    return code, out, json.loads((out / "results.json").read_text())


def test_quick_run_writes_json_markdown_and_charts(quick_run):
    code, out, data = quick_run
    assert code == 0
    assert report.schema_problems(data) == []
    ours = [r for r in data["results"] if r["provider"] == "resflow_cuda"]
    assert ours and all(r["status"] == "ok" and r["median_us"] > 0 and r["noise"] >= 0 for r in ours)
    assert {r["config"]["stack"] for r in ours} == {"mlp", "conv8"}
    markdown = (out / "results.md").read_text()
    assert markdown == report.render(data) and "| mlp | resflow_cuda |" in markdown
    assert (out / "speedup-update_lipschitz.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_flags_regressions_beyond_the_noise_band(quick_run, tmp_path, capsys):
    _, out, data = quick_run
    old = copy.deepcopy(data)
    for r in old["results"]:
        if r["provider"] == "resflow_cuda":
            r["median_us"] /= 3  # the old run was 3x faster: every row is a regression now
            r["noise"] = 0.01
    table = report.compare(old, data)
    rows = [line for line in table.splitlines() if line.startswith("| update_lipschitz")]
    ours = [line for line in rows if "| resflow_cuda |" in line]
    assert ours and all("**regression**" in line and "3.00×" in line for line in ours)
    assert f"{len(ours)} regression(s)" in table
    same = report.compare(data, data)
    assert "0 regression(s)" in same and "within noise" in same
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(old))
    assert run.main(["--quick", "--cases", "update_lipschitz", "--min-run-time", "0.01", "--out", str(tmp_path / "new"),
                     "--compare", str(old_path)]) == 0
    assert "regression(s) beyond the noise band" in capsys.readouterr().out


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
                                                    ("quick", "min_run_time_s", "cases", "results", "targets")]
