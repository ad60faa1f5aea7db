#!/usr/bin/env python3
"""Mutation check: each one-line mutant listed in .ci/mutants.json must be killed by its tests.

For every mutant the runner copies the tree (tracked and untracked-not-ignored files plus the
built extension resflow_cuda/_C*.so) into a fresh temporary folder, checks that the original line
occurs there exactly once, replaces it, and runs the mutant's check in that copy; the real tree
is never written to. Checks:

  pytest  ``python -m pytest -x -q <tests>`` in the copy. A Python mutant reuses the copied
          extension. A csrc/ mutant must list only tests/test_emulated.py, whose extension
          (the CUDA kernels under the CPU emulator) the tests compile from the copy's sources:
          the copied _C (built from the unmutated sources) is not rebuilt.
  math    the torch-free C++ math tests (tests/cpp, CMake with RESFLOW_BUILD_LIBRARY=OFF, then
          ctest), built from the copy's csrc/include.

A mutant is killed when its check fails (pytest exit status 1, a failed build or ctest, or a run
past --timeout, whose process group is then killed), survives when it passes, and is an error when
pytest could not run the selection (exit status 2-5). The table gives each check's wall and CPU
seconds (the CPU time of its processes, whatever else the machine runs).
First, unless --no-control, the same checks run on an unmutated copy (the control): all of them
must pass there, or no kill means anything.

Exit status: 0 when every mutant was killed and the control passed; 1 otherwise (a survivor, an
error, a failed control, or an original line that no longer occurs exactly once: then update the
list). Usage:

    python .ci/mutate.py                 # the control and every mutant, 2 at a time
    python .ci/mutate.py --only ID ...   # some mutants
    python .ci/mutate.py --list          # the mutants and where their lines are
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / ".ci" / "mutants.json"
CHECKS = ("pytest", "math")
FIELDS = ("id", "file", "original", "replacement", "check", "tests", "why")
EMULATED_TESTS = "tests/test_emulated.py"
UPDATE_HINT = "update .ci/mutants.json (the mutant's 'original', or drop the mutant if the code is gone)"


class ListError(Exception):
    """The mutant list is malformed or out of date with the sources."""


# ----------------------------------------------------------------------------------------------
# The list
# ----------------------------------------------------------------------------------------------

def load(path: Path = LIST) -> list[dict]:
    """The mutants of ``path``, each checked for its fields (ListError names what is wrong)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ListError(f"{path}: cannot read the mutant list: {e}") from e
    mutants = data.get("mutants") if isinstance(data, dict) else None
    if not isinstance(mutants, list) or not mutants:
        raise ListError(f"{path}: expected an object with a non-empty list 'mutants', got {type(mutants).__name__}")
    seen = set()
    for i, m in enumerate(mutants):
        where = f"{path.name}: mutant {i} ({m.get('id', '?') if isinstance(m, dict) else '?'})"
        if not isinstance(m, dict) or sorted(m) != sorted(FIELDS):
            got = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise ListError(f"{where}: expected exactly the fields {sorted(FIELDS)}, got {got}")
        for key in ("id", "file", "original", "replacement", "why"):
            if not isinstance(m[key], str) or not m[key].strip():
                raise ListError(f"{where}: expected '{key}' to be a non-empty string, got {m[key]!r}")
        if m["id"] in seen:
            raise ListError(f"{where}: the id {m['id']!r} is used twice")
        seen.add(m["id"])
        if "\n" in m["original"] or "\n" in m["replacement"]:
            raise ListError(f"{where}: 'original' and 'replacement' must be single lines")
        if m["original"].strip() == m["replacement"].strip():
            raise ListError(f"{where}: the replacement equals the original line")
        if m["check"] not in CHECKS:
            raise ListError(f"{where}: expected 'check' to be one of {CHECKS}, got {m['check']!r}")
        tests = m["tests"]
        if not isinstance(tests, list) or not all(isinstance(t, str) and t for t in tests):
            raise ListError(f"{where}: expected 'tests' to be a list of strings, got {tests!r}")
        if m["check"] == "pytest":
            if not tests:
                raise ListError(f"{where}: a pytest check needs at least one test")
            for t in tests:
                if t.startswith("-") or not t.startswith("tests/"):
                    raise ListError(f"{where}: expected pytest node ids under tests/ (no options), got {t!r}")
            if m["file"].startswith("csrc/") and any(t.split("::")[0] != EMULATED_TESTS for t in tests):
                raise ListError(f"{where}: a csrc/ mutant checked by pytest must list only {EMULATED_TESTS} "
                                f"(the only tests that compile csrc/ in the copy), got {tests}")
        elif tests:
            raise ListError(f"{where}: the math check runs ctest; expected 'tests' to be [], got {tests}")
        if m["check"] == "math" and not m["file"].startswith("csrc/include/"):
            raise ListError(f"{where}: the math check builds only csrc/include; got file {m['file']!r}")
    return mutants


def matching_lines(text: str, original: str) -> list[int]:
    """1-based numbers of the lines of ``text`` equal to ``original`` (both stripped)."""
    want = original.strip()
    return [n for n, line in enumerate(text.splitlines(), 1) if line.strip() == want]


def locate(root: Path, mutant: dict) -> int:
    """The line number of the mutant's original line in its file under ``root``; ListError unless
    it occurs exactly once."""
    path = root / mutant["file"]
    if not path.is_file():
        raise ListError(f"mutant {mutant['id']}: {mutant['file']} does not exist; {UPDATE_HINT}")
    lines = matching_lines(path.read_text(), mutant["original"])
    if len(lines) != 1:
        found = f"at lines {lines}" if lines else "nowhere"
        raise ListError(f"mutant {mutant['id']}: the original line {mutant['original'].strip()!r} must occur "
                        f"exactly once in {mutant['file']}, found {found}; {UPDATE_HINT}")
    return lines[0]


def mutate_text(text: str, mutant: dict) -> str:
    """``text`` with the mutant's original line replaced (its indentation kept)."""
    found = matching_lines(text, mutant["original"])
    if len(found) != 1:
        raise ListError(f"mutant {mutant['id']}: the original line occurs {len(found)} times, not once; {UPDATE_HINT}")
    lines = text.splitlines(keepends=True)
    line = lines[found[0] - 1]
    indent = line[: len(line) - len(line.lstrip())]
    ending = line[len(line.rstrip("\r\n")):]
    lines[found[0] - 1] = indent + mutant["replacement"].strip() + ending
    return "".join(lines)


# ----------------------------------------------------------------------------------------------
# Copies and checks
# ----------------------------------------------------------------------------------------------

def tree_files(root: Path = ROOT) -> list[str]:
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout
    return [f for f in out.decode().split("\0") if f]


def extensions(root: Path = ROOT) -> list[Path]:
    found = sorted((root / "resflow_cuda").glob("_C*.so"))
    if not found:
        raise SystemExit("mutate.py: no built extension resflow_cuda/_C*.so in the tree: build it first "
                         "(pip install --no-build-isolation -e . or python setup.py build_ext --inplace)")
    return found


def copy_tree(dest: Path, files: list[str], built: list[Path]) -> None:
    for f in files:
        src = ROOT / f
        if src.is_file():  # a tracked file deleted in the work tree is not copied
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    for so in built:
        shutil.copy2(so, dest / so.relative_to(ROOT))


def child_env(copy: Path) -> dict:
    env = dict(os.environ)
    # The copy's package first (not an editable install of the real tree), no bytecode written.
    env["PYTHONPATH"] = os.pathsep.join([str(copy)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    # cmake, ninja and the compilers torch's extension builder finds: the venv's first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@dataclass
class Outcome:
    passed: bool          # the check passed (a mutant survived / the control is sound)
    error: str = ""       # the check could not run as listed (not a kill)
    detail: str = ""      # the first failing test or step
    log: str = ""         # the output's tail, for reports
    cpu: float = 0.0      # CPU seconds of the check's processes and their children


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run_command(cmd: list[str], copy: Path, timeout: float) -> tuple[int | None, str, float]:
    """Runs ``cmd`` in ``copy``: (exit status, or None when it ran past ``timeout`` and its process
    group was killed; stdout and stderr together; CPU seconds of it and the children it waited for,
    which does not depend on what else the machine runs)."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=copy, env=child_env(copy), stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        return (None if timed_out.is_set() else proc.returncode), out.read(), usage.ru_utime + usage.ru_stime


def run_pytest(copy: Path, tests: list[str], timeout: float) -> Outcome:
    status, out, cpu = run_command([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                   copy, timeout)
    if status is None:
        return Outcome(False, detail=f"timed out after {timeout:.0f} s", log=_tail(out), cpu=cpu)
    if status == 0:
        return Outcome(True, log=_tail(out), cpu=cpu)
    if status != 1:
        return Outcome(False, error=f"pytest exit status {status}", log=_tail(out), cpu=cpu)
    first = next((line for line in out.splitlines() if line.startswith(("FAILED ", "ERROR "))), "tests failed")
    return Outcome(False, detail=first.split(" - ")[0], log=_tail(out), cpu=cpu)


def run_math(copy: Path, timeout: float) -> Outcome:
    build = copy / "build" / "math"
    generator = ["-G", "Ninja"] if shutil.which("ninja", path=child_env(copy)["PATH"]) else []
    steps = [
        ("configure", ["cmake", "-S", str(copy), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
                       "-DRESFLOW_BUILD_LIBRARY=OFF"]),
        ("compile", ["cmake", "--build", str(build)]),
        ("ctest", ["ctest", "--test-dir", str(build), "--output-on-failure"]),
    ]
    log, cpu = [], 0.0
    deadline = time.monotonic() + timeout
    for name, cmd in steps:
        status, out, used = run_command(cmd, copy, max(1.0, deadline - time.monotonic()))
        log.append(out)
        cpu += used
        if status is None:
            return Outcome(False, detail=f"{name} timed out", log=_tail("\n".join(log)), cpu=cpu)
        if status != 0:
            if name == "configure":  # the mutant cannot reach CMake's configure step: a broken setup
                return Outcome(False, error="cmake configure failed", log=_tail("\n".join(log)), cpu=cpu)
            fail = next((line for line in out.splitlines() if line.startswith("FAIL")), "")
            return Outcome(False, detail=f"{name} failed" + (f": {fail}" if fail else ""), log=_tail("\n".join(log)),
                           cpu=cpu)
    return Outcome(True, log=_tail("\n".join(log)), cpu=cpu)


def check_import(files: list[str], built: list[Path]) -> None:
    """A copy's tests import the copy's resflow_cuda (not an editable install of the real tree)."""
    copy = Path(tempfile.mkdtemp(prefix="resflow-mutant-"))
    try:
        copy_tree(copy, files, built)
        proc = subprocess.run([sys.executable, "-c", "import resflow_cuda; print(resflow_cuda.__file__)"], cwd=copy,
                              env=child_env(copy), capture_output=True, text=True)
        got = proc.stdout.strip()
        if proc.returncode != 0 or not Path(got).resolve().is_relative_to(copy.resolve()):
            raise SystemExit(f"mutate.py: a copy's tests would not import the copy's resflow_cuda: got {got!r}\n"
                             f"{proc.stderr}")
    finally:
        shutil.rmtree(copy, ignore_errors=True)


@dataclass
class Result:
    mutant: dict
    line: int
    seconds: float
    outcome: Outcome | None = None
    status: str = ""


def run_one(mutant: dict | None, files: list[str], built: list[Path], control_checks: tuple, timeout: float,
            keep: bool) -> Result:
    """One mutant (or, for ``mutant=None``, the control: every listed check on an unmutated copy)."""
    start = time.monotonic()
    copy = Path(tempfile.mkdtemp(prefix="resflow-mutant-"))
    line = 0
    try:
        copy_tree(copy, files, built)
        if mutant is None:
            pytest_tests, with_math = control_checks
            outcome = Outcome(True)
            if with_math:
                outcome = run_math(copy, timeout)
            if outcome.passed and pytest_tests:
                outcome = run_pytest(copy, pytest_tests, timeout)
            status = "passed" if outcome.passed else ("error" if outcome.error else "FAILED")
            ran = "+".join(name for name, on in (("math", with_math), ("pytest", bool(pytest_tests))) if on)
            return Result({"id": "(control)", "file": "-", "check": ran}, 0, time.monotonic() - start, outcome, status)
        line = locate(copy, mutant)
        path = copy / mutant["file"]
        path.write_text(mutate_text(path.read_text(), mutant))
        if mutant["check"] == "math":
            outcome = run_math(copy, timeout)
        else:
            outcome = run_pytest(copy, mutant["tests"], timeout)
        status = "killed" if not outcome.passed and not outcome.error else ("error" if outcome.error else "SURVIVED")
        return Result(mutant, line, time.monotonic() - start, outcome, status)
    finally:
        if keep:
            print(f"kept {copy}", file=sys.stderr)
        else:
            shutil.rmtree(copy, ignore_errors=True)


def control_checks(mutants: list[dict]) -> tuple[list[str], bool]:
    """Every pytest selection of ``mutants`` (once each, in order) and whether the math tests run."""
    tests = []
    for m in mutants:
        for t in m["tests"]:
            if m["check"] == "pytest" and t not in tests:
                tests.append(t)
    return tests, any(m["check"] == "math" for m in mutants)


def _expected_cost(mutant: dict | None) -> int:
    if mutant is None:
        return 3
    return 2 if mutant["file"].startswith("csrc/") and mutant["check"] == "pytest" else int(mutant["check"] == "pytest")


def print_table(results: list[Result], total: float) -> None:
    rows = [("mutant", "where", "check", "result", "wall s", "cpu s", "killed by / why not")]
    for r in results:
        where = f"{r.mutant['file']}:{r.line}" if r.line else r.mutant["file"]
        why = (r.outcome.error or r.outcome.detail) if r.outcome else ""
        cpu = f"{r.outcome.cpu:.1f}" if r.outcome else ""
        rows.append((r.mutant["id"], where, r.mutant["check"], r.status, f"{r.seconds:.1f}", cpu, why))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:6], widths)) + "  " + row[6])
    mutants = [r for r in results if r.line]
    print(f"mutation check: {sum(r.status == 'killed' for r in mutants)} of {len(mutants)} mutants killed in "
          f"{total:.1f} s ({sum(r.outcome.cpu for r in results if r.outcome):.1f} CPU seconds in the checks)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="print the mutants and where their lines are")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the control run (trust that the unmutated tree passes the listed tests)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="mutants run at a time")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per check (a timeout counts as killed)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies (for debugging)")
    parser.add_argument("--file", type=Path, default=LIST, help="the mutant list")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        mutants = load(args.file)
        if args.only:
            unknown = sorted(set(args.only) - {m["id"] for m in mutants})
            if unknown:
                raise ListError(f"--only: no mutants named {unknown}; known: {[m['id'] for m in mutants]}")
            mutants = [m for m in mutants if m["id"] in args.only]
        lines = [locate(ROOT, m) for m in mutants]  # a moved or changed line fails before any work
    except ListError as e:
        print(f"mutate.py: {e}", file=sys.stderr)
        return 1
    if args.list:
        for m, n in zip(mutants, lines):
            print(f"{m['id']:32} {m['check']:6} {m['file']}:{n}  {m['why']}")
        return 0
    files, built = tree_files(), extensions()
    check_import(files, built)
    jobs = ([None] if not args.no_control else []) + mutants
    checks = control_checks(mutants)
    print(f"mutation check: {len(mutants)} mutants{'' if args.no_control else ' and the control'}, "
          f"{max(1, args.jobs)} at a time", flush=True)
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        # The longest first (the control, then the mutants that rebuild the emulated extension), so
        # that the short ones fill the other worker.
        order = sorted(range(len(jobs)), key=lambda i: -_expected_cost(jobs[i]))
        futures = {i: pool.submit(run_one, jobs[i], files, built, checks, args.timeout, args.keep) for i in order}
        for fut in concurrent.futures.as_completed(futures.values()):
            r = fut.result()
            print(f"  {r.mutant['id']}: {r.status} ({r.seconds:.1f} s)", flush=True)
            if r.status in ("SURVIVED", "error", "FAILED") and r.outcome and r.outcome.log:
                print("    " + r.outcome.log.replace("\n", "\n    "), flush=True)
        results = [futures[i].result() for i in range(len(jobs))]
    print()
    print_table(results, time.monotonic() - start)
    bad = [r for r in results if r.status not in ("killed", "passed")]
    if bad:
        print(f"mutation check FAILED: {', '.join(r.mutant['id'] + ' ' + r.status for r in bad)}", file=sys.stderr)
        if any(r.status == "SURVIVED" for r in bad):
            print("A surviving mutant is a change of the code that the listed tests do not notice: strengthen the "
                  "tests (or list tests that do notice it).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
