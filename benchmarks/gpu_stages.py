"""The stage machinery of ``gpu_check``: run a list of commands, each in its own process group with
its own time limit, tee its output to ``OUT/<stage>.log``, and keep ``OUT/summary.json`` and
``OUT/summary.md`` up to date after every stage, so that whatever happens later (a stage that
hangs, a lease that ends) the stages already run are on disk.

Nothing here knows about GPUs or this project: ``gpu_check`` builds the stage list.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

# A line ``gpu-check-facts: {json}`` in a stage's output adds its keys to the stage's facts.
FACTS_PREFIX = "gpu-check-facts: "

OK, FAILED, TIMEOUT, SKIPPED, NOT_AVAILABLE = "ok", "failed", "timeout", "skipped", "not available"


@dataclasses.dataclass
class Stage:
    """One step of the check.

    Args:
        name: short name; the log is ``<name>.log``.
        command: the argv to run (None with ``unavailable``).
        timeout: seconds before the process group is killed and the stage recorded as ``timeout``.
        env: variables set on top of the parent's environment.
        needs: stages that must have ended ``ok`` (when they are part of the same run) for this one to run.
        classify: ``(returncode, output) -> (status, reason)`` for stages whose return code alone does
            not tell (the sanitizers: a device the tool refuses is ``not available``, not ``failed``).
        facts: ``(output) -> dict`` of key facts beyond the ``gpu-check-facts:`` lines.
        unavailable: when set, the stage is recorded as ``not available`` with this reason, unrun.
        note: one line for the dry run and the Markdown (what the stage is for).
    """

    name: str
    command: list[str] | None
    timeout: float
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    needs: tuple[str, ...] = ()
    classify: Callable[[int, str], tuple[str, str | None]] | None = None
    facts: Callable[[str], dict] | None = None
    unavailable: str | None = None
    note: str = ""

    def command_line(self) -> str:
        """The command as a shell line, with the stage's own environment variables in front."""
        if self.command is None:
            return f"(no command: {self.unavailable})"
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.command)


def collect_facts(output: str) -> dict:
    """The keys of every ``gpu-check-facts: {json}`` line in ``output`` (later lines win)."""
    facts: dict = {}
    for line in output.splitlines():
        if line.startswith(FACTS_PREFIX):
            try:
                facts.update(json.loads(line[len(FACTS_PREFIX):]))
            except (json.JSONDecodeError, TypeError):
                facts.setdefault("unparsed_facts", []).append(line[len(FACTS_PREFIX):][:200])
    return facts


def _kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM to the stage's process group, SIGKILL after ``grace`` seconds if it is still there."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tee(stream, log, echo: bool, lines: list[str]) -> None:
    for raw in iter(stream.readline, b""):
        text = raw.decode("utf-8", errors="replace")
        log.write(text)
        log.flush()
        lines.append(text)
        if echo:
            sys.stdout.write(text)
            sys.stdout.flush()


def run_stage(stage: Stage, out: Path, cwd: Path, echo: bool = True) -> dict:
    """Runs one stage and returns its record (name, command, timeout_s, status, returncode,
    seconds, log, reason, facts). The output of the command (stdout and stderr together) goes to
    ``out/<name>.log`` as it comes, and to this process's stdout when ``echo``."""
    record = {"name": stage.name, "command": stage.command_line(), "timeout_s": stage.timeout, "note": stage.note,
              "status": None, "returncode": None, "seconds": 0.0, "log": f"{stage.name}.log", "reason": None,
              "facts": {}}
    log_path = out / record["log"]
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"# stage {stage.name}: {record['command']}\n# cwd {cwd}, time limit {stage.timeout:.0f} s\n")
        log.flush()
        try:
            proc = subprocess.Popen(stage.command, cwd=cwd, env={**os.environ, **stage.env}, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:  # the program is missing: the stage fails, the check goes on
            log.write(f"# could not start: {exc}\n")
            return {**record, "status": FAILED, "reason": f"could not start: {exc}"}
        lines: list[str] = []
        reader = threading.Thread(target=_tee, args=(proc.stdout, log, echo, lines), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=stage.timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        reader.join(timeout=10)  # a grandchild outside the group could hold the pipe open
        seconds = time.monotonic() - start
        output = "".join(lines)
        record.update(returncode=proc.returncode, seconds=round(seconds, 2))
        if timed_out:
            record.update(status=TIMEOUT, reason=f"killed after {stage.timeout:.0f} s")
        elif stage.classify is not None:
            status, reason = stage.classify(proc.returncode, output)
            record.update(status=status, reason=reason)
        else:
            record["status"] = OK if proc.returncode == 0 else FAILED
            if proc.returncode != 0:
                record["reason"] = f"exit code {proc.returncode}"
        record["facts"] = {**collect_facts(output), **(stage.facts(output) if stage.facts else {})}
        log.write(f"\n# stage {stage.name}: {record['status']} after {seconds:.1f} s "
                  f"(exit code {proc.returncode})\n")
    return record


def _pending(stage: Stage) -> dict:
    return {"name": stage.name, "command": stage.command_line(), "timeout_s": stage.timeout, "note": stage.note,
            "status": "pending", "returncode": None, "seconds": 0.0, "log": None, "reason": None, "facts": {}}


def run_stages(stages: list[Stage], out: Path, cwd: Path, meta: dict | None = None, echo: bool = True) -> dict:
    """Runs ``stages`` in order and returns the summary. ``out/summary.json`` and ``out/summary.md``
    are written before the first stage (every stage ``pending``), when a stage starts (``running``)
    and after each stage. A stage whose ``needs`` include a stage of this run that did not end
    ``ok`` is ``skipped``; one with ``unavailable`` set is ``not available``; a timeout kills the
    stage's process group and the next stage runs."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {"meta": {"started": _now(), "argv": sys.argv, "host": platform.node(),
                        "python": sys.executable, **(meta or {})},
               "finished": None, "stages": [_pending(s) for s in stages]}
    write_summary(summary, out)
    names = {s.name for s in stages}
    status: dict[str, str] = {}
    for i, stage in enumerate(stages):
        blocked = [n for n in stage.needs if n in names and status.get(n) != OK]
        if blocked:
            record = {**_pending(stage), "status": SKIPPED,
                      "reason": f"needs {', '.join(blocked)}, which did not succeed"}
        elif stage.unavailable is not None:
            record = {**_pending(stage), "status": NOT_AVAILABLE, "reason": stage.unavailable}
        else:
            summary["stages"][i]["status"] = "running"
            write_summary(summary, out)
            if echo:
                print(f"\n=== gpu_check stage {stage.name} (limit {stage.timeout:.0f} s): {stage.command_line()}",
                      flush=True)
            record = run_stage(stage, out, cwd, echo)
        summary["stages"][i] = record
        status[stage.name] = record["status"]
        write_summary(summary, out)
        if echo:
            print(f"=== gpu_check stage {stage.name}: {record['status']} ({record['seconds']:.1f} s)"
                  + (f": {record['reason']}" if record["reason"] else ""), flush=True)
    summary["finished"] = _now()
    write_summary(summary, out)
    return summary


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a file


def write_summary(summary: dict, out: Path) -> None:
    """Writes ``summary.json`` and ``summary.md`` into ``out`` (each replaced atomically)."""
    _write(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    _write(out / "summary.md", markdown(summary, out))


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _fact_text(facts: dict, limit: int = 300) -> str:
    text = "; ".join(f"{k}: {v}" for k, v in facts.items() if not isinstance(v, (dict, list)) or len(str(v)) < 120)
    return (text[:limit] + " …") if len(text) > limit else text


def markdown(summary: dict, out: Path, tail_lines: int = 25) -> str:
    """The summary as Markdown: one table row per stage (status, seconds against the limit, key
    facts), then, for every stage that did not end ``ok``, its command, the reason and the last
    ``tail_lines`` lines of its log."""
    meta = summary["meta"]
    lines = ["# gpu_check summary", "",
             f"- started {meta.get('started')}, " + (f"finished {summary['finished']}" if summary["finished"]
                                                      else "**not finished** (a stage is running or was cut off)"),
             *[f"- {k}: {v}" for k, v in meta.items() if k not in ("started", "argv")],
             "", "| stage | status | seconds / limit | facts |", "|---|---|---:|---|"]
    for s in summary["stages"]:
        status = s["status"] if s["status"] == OK else f"**{s['status']}**"
        facts = _fact_text(s["facts"]) or (s["reason"] or "")
        lines.append(f"| {s['name']} | {status} | {s['seconds']:.0f} / {s['timeout_s']:.0f} | "
                     f"{facts.replace('|', '/')} |")
    for s in summary["stages"]:
        if s["status"] in (OK, "pending"):
            continue
        lines += ["", f"## {s['name']}: {s['status']}", "", f"`{s['command']}`", ""]
        if s["reason"]:
            lines += [f"reason: {s['reason']}", ""]
        if s["log"]:
            tail = _tail(out / s["log"], tail_lines)
            lines += [f"last lines of `{s['log']}`:", "", "```", tail, "```"]
    return "\n".join(lines) + "\n"


def dry_run(stages: list[Stage]) -> str:
    """The stage list as text: name, time limit, what it needs, the command and the note."""
    lines = []
    for s in stages:
        needs = f" (needs {', '.join(s.needs)})" if s.needs else ""
        lines.append(f"{s.name}: limit {s.timeout:.0f} s{needs}")
        lines.append(f"    {s.command_line()}")
        if s.unavailable and s.command is not None:
            lines.append(f"    not available here: {s.unavailable}")
        if s.note:
            lines.append(f"    {s.note}")
    return "\n".join(lines)


def parse_pytest(output: str) -> dict:
    """Counts from pytest's last summary line (``3 passed, 1 skipped in 2.0s``)."""
    for line in reversed(output.splitlines()):
        counts = dict((word, int(n)) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|"
                                                                 r"deselected|xfailed|xpassed|warnings?)", line))
        if counts and re.search(r" in [\d.]+s", line):
            return counts
    return {}
