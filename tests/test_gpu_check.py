"""benchmarks.gpu_check without a GPU: the dry run's stage list, the stage machinery (a stage that
hangs is killed and recorded, the next one still runs, the summary survives), the sanitizer
verdicts, and CPU smoke runs of the sanitizer driver and the CIFAR-10 training-step module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The source tree's benchmarks package (python -m benchmarks.gpu_check), found through a sys.path entry
# that is taken away again: left there, it would hand the source tree's resflow_cuda to the processes
# later tests spawn, while this process runs an installed one.
sys.path.insert(0, str(ROOT))
try:
    from benchmarks import gpu_check, gpu_cifar_step, gpu_driver, gpu_stages
    from benchmarks.gpu_stages import Stage
finally:
    sys.path.remove(str(ROOT))


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    stages, meta = gpu_check.plan(tmp_path_factory.mktemp("plan") / "out")
    return {s.name: s for s in stages}, meta


def test_dry_run_prints_every_stage_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    positions = [text.index(f"{name}: limit ") for name in gpu_check.STAGES]
    assert positions == sorted(positions)
    for piece in ("setup.py build_ext --inplace", "RESFLOW_CUDA=1", "TORCH_CUDA_ARCH_LIST=", "MAX_JOBS=",
                  "pytest -m cuda", "-p no:cacheprovider", "benchmarks.gpu_driver --info",
                  "benchmarks.gpu_cifar_step --device cuda", "benchmarks.run --device cuda --quick"):
        assert piece in text, piece
    assert "time limits: build 240 s + the other stages 270 s" in text
    assert not out.exists()  # nothing ran, nothing written


def test_stage_commands_and_time_budget(planned):
    stages, meta = planned
    assert list(stages) == list(gpu_check.STAGES)
    assert sum(s.timeout for name, s in stages.items() if name != "build") <= 270
    assert stages["build"].env["RESFLOW_CUDA"] == "1" and stages["build"].env["TORCH_CUDA_ARCH_LIST"]
    for tool in gpu_check.SANITIZERS:
        command = stages[tool].command
        assert command[command.index("--tool") + 1] == tool
        assert command[-3:] == [sys.executable, "-m", "benchmarks.gpu_driver"]
        assert "--error-exitcode" in command and stages[tool].needs == ("build",)
    assert stages["memcheck"].env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"
    tests = stages["tests"].command
    assert tests[tests.index("-m", 3) + 1] == "cuda"
    # a test module is ignored exactly when one of its module-level imports is missing here
    for name in meta["ignored_test_modules"]:
        assert f"--ignore=tests/{name}" in tests
    scaled, _ = gpu_check.plan(Path("unused"), scale=2.0)
    assert [s.timeout for s in scaled] == [2 * s.timeout for s in stages.values()]


def test_optional_imports_of_the_tests_are_found():
    found = gpu_check.optional_imports()
    assert "normflows" in found["test_iresblock.py"]
    assert "resflow_cuda.benchmarks" in found["test_bench.py"]
    assert "test_lipswish.py" not in found  # stdlib, torch, pytest and the tests' own helpers only


def test_a_stage_that_hangs_is_killed_and_the_next_still_runs(tmp_path):
    py = sys.executable
    hang = "import subprocess, time; subprocess.Popen(['sleep', '60']); print('started', flush=True); time.sleep(60)"
    stages = [Stage("hangs", [py, "-c", hang], timeout=1.0),
              Stage("after", [py, "-c", "print('gpu-check-facts: {\"answer\": 42}')"], timeout=30),
              Stage("needs_hang", [py, "-c", "pass"], timeout=30, needs=("hangs",)),
              Stage("no_tool", None, timeout=30, unavailable="tool not found"),
              Stage("fails", [py, "-c", "import sys; sys.exit(3)"], timeout=30),
              Stage("missing", [str(tmp_path / "no-such-program")], timeout=30)]
    summary = gpu_stages.run_stages(stages, tmp_path, tmp_path, echo=False)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary, default=str))
    by_name = {s["name"]: s for s in on_disk["stages"]}
    assert by_name["hangs"]["status"] == "timeout" and by_name["hangs"]["seconds"] < 20
    assert "started" in (tmp_path / "hangs.log").read_text()
    assert by_name["after"]["status"] == "ok" and by_name["after"]["facts"] == {"answer": 42}
    assert by_name["needs_hang"]["status"] == "skipped"
    assert by_name["no_tool"]["status"] == "not available" and by_name["no_tool"]["reason"] == "tool not found"
    assert by_name["fails"]["status"] == "failed" and by_name["fails"]["returncode"] == 3
    assert by_name["missing"]["status"] == "failed" and "could not start" in by_name["missing"]["reason"]
    assert on_disk["finished"]
    md = (tmp_path / "summary.md").read_text()
    assert "| hangs | **timeout** |" in md and "| after | ok |" in md and "started" in md


def test_sanitizer_verdicts():
    classify = gpu_check.classify_sanitizer
    refused = "========= COMPUTE-SANITIZER\n========= Error: Device not supported\n"
    assert classify(1, refused) == ("not available", "========= Error: Device not supported")
    assert classify(0, f"{gpu_check.DRIVER_START} on cuda\n{gpu_check.DRIVER_OK}\nERROR SUMMARY: 0 errors")[0] == "ok"
    found = f"{gpu_check.DRIVER_START} on cuda\nInvalid __global__ read of size 4\nERROR SUMMARY: 1 error\n"
    assert classify(1, found)[0] == "failed"
    assert classify(1, "ImportError: no module named torch\n")[0] == "failed"
    assert gpu_check.sanitizer_facts("RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)") == \
        {"hazards": 2, "errors": 1, "warnings": 1}
    assert gpu_stages.parse_pytest("..\n12 passed, 3 skipped, 400 deselected in 5.21s\n") == \
        {"passed": 12, "skipped": 3, "deselected": 400}


def test_driver_runs_every_op_group_on_the_cpu():

    assert gpu_driver.run("cpu") >= 30


def test_cifar_step_smoke_on_the_cpu(tmp_path):

    out = tmp_path / "cifar_step.json"
    result = gpu_cifar_step.run("cpu", batch=2, steps=1, warmup=1, n_blocks=(1, 1, 1), idim=32,
                                providers=["fast", "autograd"], out=out)
    assert json.loads(out.read_text())["providers"].keys() == {"fast", "autograd"}
    assert result["speedup_fast_vs_autograd"] > 0
    assert result["first_loss_rel_diff"] < 1e-4  # same state, same draws: the same loss on both paths
