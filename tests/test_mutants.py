"""The mutation check's list (.ci/mutants.json) stays current with the sources, and its runner
(.ci/mutate.py) applies a mutant exactly and refuses a stale or malformed list. The mutants
themselves run in CI (`python .ci/mutate.py`), not here."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / ".ci" / "mutate.py"

# The sdist carries tests/ but not .ci/: there, nothing to check.
pytestmark = pytest.mark.skipif(not RUNNER.is_file(), reason="needs the source checkout's .ci/ (not in the sdist)")


def _load_runner():
    spec = importlib.util.spec_from_file_location("resflow_mutate", RUNNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


mutate = _load_runner() if RUNNER.is_file() else None
MUTANTS = mutate.load() if mutate else [{"id": "none", "original": "", "tests": []}]


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m["id"] for m in MUTANTS])
def test_every_listed_original_line_occurs_exactly_once(mutant):
    # Raises ListError naming the mutant, the line, where it was found and how to fix the list.
    line = mutate.locate(ROOT, mutant)
    text = (ROOT / mutant["file"]).read_text()
    assert text.splitlines()[line - 1].strip() == mutant["original"].strip()
    mutated = mutate.mutate_text(text, mutant)
    assert mutated != text and mutated.count("\n") == text.count("\n")


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m["id"] for m in MUTANTS])
def test_every_listed_test_exists(mutant):
    # A renamed or deleted test would make the mutant an error in CI; catch it here first.
    for node in mutant["tests"]:
        path, _, rest = node.partition("::")
        assert (ROOT / path).is_file(), f"{mutant['id']}: {path} does not exist"
        name = re.sub(r"\[.*\]$", "", rest)
        assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), \
            f"{mutant['id']}: no test function {name!r} in {path}"


def test_the_list_covers_the_math_headers_the_estimators_and_the_iteration_order():
    files = {m["file"] for m in MUTANTS}
    for header in ("lipswish_math.h", "power_iteration_math.h", "series_math.h"):
        assert f"csrc/include/resflow/{header}" in files, header
    assert "resflow_cuda/estimators.py" in files
    assert any("u_first" in m["original"] for m in MUTANTS)  # the order of the u and v updates


def _write_list(tmp_path, **changes):
    mutant = dict(MUTANTS[0], **changes)
    path = tmp_path / "mutants.json"
    path.write_text(json.dumps({"mutants": [mutant]}))
    return path


def test_mutate_text_keeps_indentation_and_line_endings():
    mutant = {"id": "t", "original": "return a + b;", "replacement": "return a - b;"}
    text = "int f() {\r\n    return a + b;\r\n}\n"
    assert mutate.mutate_text(text, mutant) == "int f() {\r\n    return a - b;\r\n}\n"


@pytest.mark.parametrize("text,count", [("x = 1\n", 0), ("    return a + b\nreturn a + b\n", 2)])
def test_a_line_found_other_than_once_is_refused_with_a_hint(tmp_path, text, count):
    (tmp_path / "m.py").write_text(text)
    mutant = {"id": "demo", "file": "m.py", "original": "return a + b", "replacement": "return a - b"}
    with pytest.raises(mutate.ListError, match=r"demo.*exactly once in m\.py.*update \.ci/mutants\.json"):
        mutate.locate(tmp_path, mutant)
    with pytest.raises(mutate.ListError, match=f"occurs {count} times"):
        mutate.mutate_text(text, mutant)


@pytest.mark.parametrize("changes,pattern", [
    (dict(check="ctest"), r"'check' to be one of"),
    (dict(replacement=MUTANTS[0]["original"]), "equals the original"),
    (dict(file="csrc/include/resflow/series_math.h", check="pytest", tests=["tests/test_lipswish.py"]),
     "must list only tests/test_emulated.py"),
    (dict(file="resflow_cuda/estimators.py", check="pytest", tests=["-k", "unbiased"]), "node ids under tests/"),
    (dict(file="resflow_cuda/estimators.py", check="math", tests=[]), "builds only csrc/include"),
    (dict(why=""), "'why' to be a non-empty string"),
])
def test_a_malformed_list_is_refused(tmp_path, changes, pattern):
    with pytest.raises(mutate.ListError, match=pattern):
        mutate.load(_write_list(tmp_path, **changes))


def test_duplicate_ids_are_refused(tmp_path):
    path = tmp_path / "mutants.json"
    path.write_text(json.dumps({"mutants": [MUTANTS[0], MUTANTS[0]]}))
    with pytest.raises(mutate.ListError, match="used twice"):
        mutate.load(path)
