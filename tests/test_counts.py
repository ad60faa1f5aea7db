"""benchmarks/counts.py: the op and host-sync counting rules, the budget check and its CLI."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from resflow_cuda.benchmarks import counts, roofline
from resflow_cuda.benchmarks.cases import CASES


def _event(name, *children):
    return SimpleNamespace(name=name, cpu_children=list(children))


def test_views_and_transposes_are_not_counted():
    a, b = torch.randn(8, 4), torch.randn(3, 4)
    c = counts.count_ops(lambda: torch.mm(a, b.t()).view(-1))
    assert (c["ops"], c["syncs"]) == (1, 0)
    assert c["by_op"] == {"aten::mm": 1}  # mm's resolve_conj children are metadata: mm is the leaf
    assert {"view", "t", "resolve_conj", "empty", "contiguous"} <= counts.METADATA_OPS


def test_item_is_one_host_sync():
    a = torch.randn(8, 4)
    c = counts.count_ops(lambda: a.sum().item())
    assert c["syncs"] == 1
    assert c["by_op"].get("aten::_local_scalar_dense") == 1 and c["ops"] == 2  # sum (its fill_) and the read


def test_a_leaf_inside_a_parent_op_is_counted_once():
    x, w, b = torch.randn(8, 4), torch.randn(3, 4), torch.randn(3)
    assert counts.count_ops(lambda: torch.nn.functional.linear(x, w))["by_op"] == {"aten::mm": 1}  # linear > matmul > mm
    assert counts.count_ops(lambda: torch.nn.functional.linear(x, w, b))["ops"] == 1  # addmm (> copy_ of the bias)
    # on a synthetic tree: parents with a counted op below them are not counted, metadata never
    tree = [_event("aten::linear", _event("aten::t", _event("aten::transpose")), _event("aten::addmm")),
            _event("autograd::engine::evaluate_function: X", _event("aten::mm", _event("aten::resolve_conj"))),
            _event("aten::item", _event("aten::_local_scalar_dense")), _event("aten::flatten", _event("aten::view")),
            _event("resflow_cuda::lipswish_backward", _event("aten::empty")), _event("profiler_step")]
    events = [tree[0], *tree[0].cpu_children, tree[0].cpu_children[0].cpu_children[0], tree[1], tree[1].cpu_children[0],
              tree[2], tree[2].cpu_children[0], tree[3], tree[3].cpu_children[0], tree[4], tree[5]]
    c = counts.count_events(events)
    assert c["by_op"] == {"aten::addmm": 1, "aten::mm": 1, "aten::_local_scalar_dense": 1,
                          "resflow_cuda::lipswish_backward": 1}
    assert (c["ops"], c["syncs"]) == (4, 1)


def test_counts_are_the_same_every_time():
    x, w = torch.randn(16, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)

    def step():
        x.grad = w.grad = None
        torch.nn.functional.linear(torch.sigmoid(x), w).square().sum().backward()

    first = counts.count_ops(step)
    assert first == counts.count_ops(step) and first["ops"] > 5


def test_a_steps_counted_function_and_update_lipschitz_are_counted_apart():
    a = torch.randn(4, 4)

    def step():  # the timed step: three ops
        return a + 1, a * 2, a.sum().item()

    step.counted = lambda: a + 1  # what the case counts: one op
    step.update_lipschitz = lambda: (a.sum().item(), a.sum().item())
    c = counts.count_step(step)
    assert (c["ops_per_step"], c["syncs_per_step"]) == (1, 0)
    assert (c["ops_update_lipschitz"], c["syncs_update_lipschitz"]) == (4, 2)
    plain = counts.count_step(lambda: a + 1)
    assert plain["ops_per_step"] == 1 and "ops_update_lipschitz" not in plain


def test_predicted_gpu_time_is_launches_syncs_and_the_floor():
    gpu = roofline.GPUS[0]
    floor_us = roofline.predicted_seconds(gpu, 1e9, 1e9) * 1e6
    assert counts.predicted_gpu_us(gpu, 100, 2, 1e9, 1e9) == pytest.approx(
        100 * counts.LAUNCH_US + 2 * counts.SYNC_US + floor_us)


def test_the_budget_check_fails_when_a_count_exceeds_its_budget():
    budgets = {"budgets": {"c": {"k train": {"ops_per_step": 10, "syncs_per_step": 0}}}}
    over = {"c": {"k train": {"ops_per_step": 11, "syncs_per_step": 0}}}
    problems, _ = counts.budget_problems(over, budgets)
    assert problems == ["c / k train: ops_per_step = 11, budget 10"]
    assert counts.budget_problems({"c": {"k train": {"ops_per_step": 10, "syncs_per_step": 0}}}, budgets) == ([], [])
    problems, notes = counts.budget_problems({"c": {"k train": {"ops_per_step": 9, "syncs_per_step": 0}}}, budgets)
    assert not problems and notes == ["c / k train: ops_per_step = 9, below its budget 10"]
    problems, _ = counts.budget_problems({"c": {"new eval": {"ops_per_step": 1}}}, budgets)
    assert problems and "no budget" in problems[0]


def test_the_check_command_exits_nonzero_over_a_fake_budget(tmp_path):
    fake = tmp_path / "budgets.json"
    key = counts.config_key(CASES["small_step"].configs(True)[0])
    fake.write_text(json.dumps({"budgets": {"small_step": {key: {"ops_per_step": 1, "syncs_per_step": 0}}}}))
    assert counts.main(["--check", "--cases", "small_step", "--budgets", str(fake)]) == 1


def test_every_quick_configuration_has_a_budget():
    budgets = counts.load_budgets(Path(__file__).resolve().parents[1] / "benchmarks" / "budgets.json")
    missing = [f"{name} / {counts.config_key(c)}" for name, case in CASES.items() for c in case.configs(True)
               if counts.config_key(c) not in budgets["budgets"].get(name, {})]
    assert not missing, f"no budget in benchmarks/budgets.json: {missing} (python -m benchmarks.counts --update-budgets)"
    for case, key in (("iresblock", "conv train"), ("model_step", "digits train step")):
        assert budgets["baseline"]["counts"][case][key]["ops_per_step"] > 0
    assert budgets["baseline"]["date"] and budgets["baseline"]["commit"]
