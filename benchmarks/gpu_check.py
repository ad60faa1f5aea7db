"""One command for a machine with a GPU: build, test, sanitize and measure, with every stage's
output kept even when a later stage hangs (docs/gpu-check.md).

    python -m benchmarks.gpu_check --out DIR            # the whole check (a few minutes)
    python -m benchmarks.gpu_check --out DIR --dry-run  # the stages, commands and time limits
    python -m benchmarks.gpu_check --out DIR --stages build,tests --timeout-scale 2

Stages, in order, each a process with its own time limit (``gpu_stages``): ``build`` (the
extension in place for the local GPU's arch), ``build_info``, ``tests`` (the CUDA-marked tests),
``memcheck`` / ``racecheck`` / ``synccheck`` (compute-sanitizer over ``gpu_driver``, which
launches every CUDA op once), ``cifar_step`` (``gpu_cifar_step``: the reference CIFAR-10
ResidualFlow's training step, fast path against autograd VJPs) and ``bench``
(``resflow-bench --device cuda --quick``). DIR gets ``<stage>.log``, ``summary.json`` and
``summary.md`` (rewritten after every stage), ``cifar_step.json`` and ``bench/``.

Optional imports of the tests (normflows, the installed ``resflow_cuda.benchmarks``) are probed
first: a wheel of a missing pure-Python package found in ``wheels/`` goes on PYTHONPATH, and test
modules that import a package still missing at module level are passed to pytest as ``--ignore``
(listed in the summary), so one missing package cannot stop the collection of the CUDA tests.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from . import build_flags
from .gpu_stages import FAILED, NOT_AVAILABLE, OK, Stage, dry_run, parse_pytest, run_stages

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "wheels"  # ignored by git; pure-Python wheels for a machine without network

# Default time limits in seconds (scaled by --timeout-scale). All but the build together: 270 s.
TIMEOUTS = {"build": 240, "build_info": 15, "tests": 50, "memcheck": 45, "racecheck": 40, "synccheck": 30,
            "cifar_step": 45, "bench": 45}
SANITIZERS = ("memcheck", "racecheck", "synccheck")
STAGES = ("build", "build_info", "tests", *SANITIZERS, "cifar_step", "bench")

# Cases whose eager reference is normflows: the runner computes the eager reference outside its
# N/A guard, so without normflows the bench runs the other cases only.
NORMFLOWS_EAGER_CASES = ("iresblock", "model_step")
CASES_WITHOUT_NORMFLOWS = ("lipswish", "update_lipschitz", "family_step")

# compute-sanitizer checks only our kernels (mangled names contain the namespace resflow_cuda).
KERNEL_FILTER = "kns=resflow_cuda"
DRIVER_START, DRIVER_OK = "gpu_driver: start", "gpu_driver: OK"
REFUSALS = ("not supported", "unable to", "no cuda-capable device", "cannot be run", "internal sanitizer error")

_PROBE = r"""
import importlib.util, json, os, sys, types
info = {"imports": {}}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability="%d.%d" % (p.major, p.minor))
    from torch.utils import cpp_extension
    info["cuda_home"] = cpp_extension.CUDA_HOME
except Exception as exc:
    info["torch_error"] = "%s: %s" % (type(exc).__name__, exc)
# resflow_cuda's submodules without running its __init__ (which needs the built extension)
pkg = types.ModuleType("resflow_cuda"); pkg.__path__ = [os.path.join(os.getcwd(), "resflow_cuda")]
sys.modules["resflow_cuda"] = pkg
for name in json.loads(sys.argv[1]):
    try:
        info["imports"][name] = importlib.util.find_spec(name) is not None
    except Exception:
        info["imports"][name] = False
print(json.dumps(info))
"""


def _python_path(extra: list[str]) -> dict[str, str]:
    if not extra:
        return {}
    return {"PYTHONPATH": os.pathsep.join(extra + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}


def probe(python: str, modules: list[str], extra_path: list[str] | None = None) -> dict:
    """Torch, the GPU and which of ``modules`` import, asked of ``python`` in a fresh process (so
    this process never initialises CUDA); ``{"probe_error": ...}`` when that process fails."""
    env = {**os.environ, **_python_path(extra_path or [])}
    try:
        out = subprocess.run([python, "-c", _PROBE, json.dumps(modules)], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {"probe_error": f"{type(exc).__name__}: {exc}", "imports": {}}


def module_imports(path: Path) -> list[str]:
    """The modules a Python file imports at module level (not inside functions or classes)."""
    names = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


def _in_tree(name: str) -> bool:
    """Whether a dotted module name is a file or package of the source tree (``resflow_cuda.nn``,
    ``benchmarks.gpu_stages``, ``build_flags``)."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def optional_imports(tests: Path = ROOT / "tests") -> dict[str, list[str]]:
    """Per test module, its module-level imports that are neither in the source tree nor in
    ``tests/``, the standard library, torch, numpy or pytest: the ones a GPU image may lack
    (normflows; ``resflow_cuda.benchmarks``, which only an installed package maps)."""
    base = set(sys.stdlib_module_names) | {p.stem for p in tests.glob("*.py")} | {"torch", "numpy", "pytest"}
    found = {}
    for path in sorted(tests.glob("test_*.py")):
        names = [n for n in module_imports(path) if n.split(".")[0] not in base and not _in_tree(n)]
        if names:
            found[path.name] = names
    return found


def plan_imports(python: str) -> tuple[dict, list[str], dict[str, str]]:
    """Probes torch, the GPU and the tests' optional imports. Returns ``(probe, wheel_paths,
    ignored)``: wheels put on PYTHONPATH for packages missing here, and the test modules to
    ``--ignore`` with the first missing import of each."""
    needs = optional_imports()
    modules = sorted({n for names in needs.values() for n in names} | {"normflows"})
    info = probe(python, modules)
    missing_roots = {n.split(".")[0] for n, ok in info["imports"].items() if not ok}
    wheels = [str(w) for root in sorted(missing_roots) for w in sorted(WHEELS.glob(f"{root}-*.whl"))[-1:]]
    if wheels:
        info = probe(python, modules, wheels)
        info["wheels"] = wheels
    ignored = {}
    for name, imports in needs.items():
        gone = [n for n in imports if not info["imports"].get(n, False)]
        if gone:
            ignored[name] = gone[0]
    return info, wheels, ignored


def find_sanitizer(info: dict) -> str | None:
    """compute-sanitizer on PATH, else in the CUDA toolkit torch found, else under /usr/local/cuda."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in filter(None, (os.environ.get("CUDA_HOME"), info.get("cuda_home"), "/usr/local/cuda")):
        for sub in ("bin", "compute-sanitizer"):
            path = Path(home) / sub / "compute-sanitizer"
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    return None


def arch_list(info: dict) -> tuple[str, str]:
    """TORCH_CUDA_ARCH_LIST for the build and where it comes from: the local GPU's capability, or
    (no GPU visible, e.g. in a dry run) the build's default."""
    if info.get("capability"):
        return info["capability"], f"the capability of {info.get('gpu')}"
    return build_flags().DEFAULT_ARCH_LIST, "no GPU visible here: the build's default (build_flags.DEFAULT_ARCH_LIST)"


def classify_sanitizer(returncode: int, output: str) -> tuple[str, str | None]:
    """ok when the driver finished and the tool found nothing; ``not available`` when the tool
    refused (exit code non-zero, a refusal in its output, before the driver had a CUDA context);
    otherwise failed."""
    started = DRIVER_START in output
    if returncode == 0 and DRIVER_OK in output:
        return OK, None
    if returncode != 0 and not started:
        refusal = next((ln.strip() for ln in output.splitlines() if any(r in ln.lower() for r in REFUSALS)), None)
        if refusal:
            return NOT_AVAILABLE, refusal[:300]
    where = "after the driver started" if started else "before the driver started"
    return FAILED, f"exit code {returncode} {where}"


def classify_pytest(returncode: int, output: str) -> tuple[str, str | None]:
    """ok on exit code 0; pytest's 5 (nothing selected) is a failure with its likely cause."""
    if returncode == 0:
        return OK, None
    if returncode == 5:
        return FAILED, "no CUDA test selected (no GPU visible to torch, or a build without the CUDA kernels)"
    return FAILED, f"exit code {returncode}"


def sanitizer_facts(output: str) -> dict:
    """Error and hazard counts from compute-sanitizer's summary lines."""
    facts = {}
    if m := re.search(r"ERROR SUMMARY: (\d+) error", output):
        facts["errors"] = int(m.group(1))
    if m := re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", output):
        facts.update(hazards=int(m.group(1)), errors=int(m.group(2)), warnings=int(m.group(3)))
    return facts


def bench_facts(out: Path):
    """A facts function for the bench stage: row counts by status from its results.json."""
    def facts(output: str) -> dict:
        try:
            data = json.loads((out / "results.json").read_text())
        except (OSError, ValueError):
            return {"results_json": "missing"}
        counts: dict[str, int] = {}
        for row in data["results"]:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        bad = [f"{r['case']} {r['label']} {r['provider']}" for r in data["results"] if r["status"] == "failed"]
        return {"rows": counts, **({"failed_rows": bad[:10]} if bad else {})}
    return facts


def plan(out: Path, python: str = sys.executable, scale: float = 1.0) -> tuple[list[Stage], dict]:
    """The stages of a full check writing into ``out``, and the facts they were planned from
    (probe of torch and the GPU, arch list, wheels, ignored test modules, sanitizer path)."""
    info, wheels, ignored = plan_imports(python)
    arch, arch_source = arch_list(info)
    sanitizer = find_sanitizer(info)
    env = _python_path(wheels)
    limit = {k: v * scale for k, v in TIMEOUTS.items()}
    needs = ("build",)
    has_normflows = info["imports"].get("normflows", False)
    ignores = [f"--ignore=tests/{name}" for name in ignored]
    pytest = [python, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
              "--continue-on-collection-errors", *ignores]
    cases = [] if has_normflows else ["--cases", *CASES_WITHOUT_NORMFLOWS]
    bench = [python, "-m", "benchmarks.run", "--device", "cuda", "--quick", "--min-run-time", "0.05",
             "--out", str(out / "bench"), *cases]
    build_env = {"RESFLOW_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 1)}
    stages = [
        Stage("build", [python, "setup.py", "build_ext", "--inplace"], limit["build"], env=build_env,
              note=f"the extension in place, CUDA kernels for {arch} ({arch_source})"),
        Stage("build_info", [python, "-m", "benchmarks.gpu_driver", "--info"], limit["build_info"], env=env,
              needs=needs, note="resflow_cuda.build_info(), the device, torch, CUDA and the driver"),
        Stage("tests", pytest, limit["tests"], env=env, needs=needs, classify=classify_pytest,
              facts=lambda output: {**parse_pytest(output), **({"ignored": ignored} if ignored else {})},
              note="the CUDA-marked tests" + (f"; ignored for missing imports: {ignored}" if ignored else "")),
    ]
    missing = None if sanitizer else "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda)"
    for tool in SANITIZERS:
        tool_env = {**env, **({"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} if tool == "memcheck" else {})}
        command = [sanitizer or "compute-sanitizer", "--tool", tool, "--error-exitcode", "1", "--report-api-errors",
                   "no", "--kernel-name", KERNEL_FILTER, python, "-m", "benchmarks.gpu_driver"]
        stages.append(Stage(tool, command, limit[tool], env=tool_env, needs=needs, classify=classify_sanitizer,
                            facts=sanitizer_facts, unavailable=missing,
                            note=f"compute-sanitizer {tool} over every CUDA op, our kernels only"))
    without = "" if has_normflows else f" (no normflows: without {', '.join(NORMFLOWS_EAGER_CASES)})"
    stages += [
        Stage("cifar_step", [python, "-m", "benchmarks.gpu_cifar_step", "--device", "cuda", "--out",
                             str(out / "cifar_step.json")], limit["cifar_step"], env=env, needs=needs,
              note="reference CIFAR-10 ResidualFlow, batch 64: training step, fast path vs autograd VJPs"),
        Stage("bench", bench, limit["bench"], env=env, needs=needs, facts=bench_facts(out / "bench"),
              note="resflow-bench --quick on the GPU" + without),
    ]
    meta = {"torch": info.get("torch"), "torch_cuda": info.get("cuda"), "gpu": info.get("gpu"),
            "TORCH_CUDA_ARCH_LIST": f"{arch} ({arch_source})", "compute_sanitizer": sanitizer,
            "normflows": "importable" if has_normflows else "missing", "wheels_on_pythonpath": wheels,
            "ignored_test_modules": ignored,
            **{k: info[k] for k in ("probe_error", "torch_error") if k in info}}
    return stages, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for the logs, summary.json/.md and results")
    parser.add_argument("--stages", default=None, help=f"comma-separated subset of: {','.join(STAGES)}")
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every stage's time limit")
    parser.add_argument("--dry-run", action="store_true", help="print the stages and exit without running any")
    args = parser.parse_args(argv)
    if args.timeout_scale <= 0:
        parser.error("--timeout-scale must be positive")
    out = Path(args.out).resolve()
    stages, meta = plan(out, scale=args.timeout_scale)
    if args.stages:
        wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = sorted(set(wanted) - set(STAGES))
        if unknown:
            parser.error(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
        stages = [s for s in stages if s.name in wanted]
    if args.dry_run:
        print(dry_run(stages))
        rest = sum(s.timeout for s in stages if s.name != "build")
        build = sum(s.timeout for s in stages if s.name == "build")
        print(f"time limits: build {build:.0f} s + the other stages {rest:.0f} s = {build + rest:.0f} s")
        for key, value in meta.items():
            print(f"{key}: {value}")
        return 0
    summary = run_stages(stages, out, ROOT, meta)
    bad = [s["name"] for s in summary["stages"] if s["status"] not in (OK, NOT_AVAILABLE)]
    print(f"\ngpu_check: {out / 'summary.md'}" + (f"; not ok: {', '.join(bad)}" if bad else "; every stage ok"))
    return 1 if any(s["status"] == FAILED or s["status"] == "timeout" for s in summary["stages"]) else 0


if __name__ == "__main__":
    sys.exit(main())
