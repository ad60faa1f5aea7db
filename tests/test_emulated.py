"""Every CUDA kernel of csrc/cuda, executed on the CPU under the emulation of the CUDA execution
model, against the CPU ops; and the emulator's own semantics and error reports.

The emulated ops go through the same tensor bindings, launch plans and launchers as the CUDA ops
(csrc/cuda/*_binding.h, *.cuh); only the SM count is chosen by the test, to shape the grid.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import resflow_cuda
from resflow_cuda import dense_ops, flow_ops, step_ops
from resflow_cuda import ops as cpu_ops

import emulation
from conftest import TOLERANCES

pytestmark = pytest.mark.emulated

THREADS = 256  # kElementwiseThreads


@pytest.fixture(scope="module")
def emu():
    return emulation.ops()


@pytest.fixture(autouse=True)
def _own_launches(emu):
    """The emulator records launches per process (the kernels launched, the launch count): cleared before
    every test, so that a test's "was launched" check sees only its own launches, not an earlier test's."""
    emu.reset_launches()


def _plan(emu, x, sms, aligned=True):
    return dict(zip(("vec", "blocks", "threads"), emu.elementwise_plan(x.numel(), sms, aligned, x.element_size())))


# ----------------------------------------------------------------------------------------------
# Launch configurations: each covers one situation of the grid-stride pack loop
# ----------------------------------------------------------------------------------------------

# (name, number of elements, SM count, storage offset): with 4 (6 for float32) blocks per SM, 256 threads.
CONFIGS = [
    ("partial-warp", 7, 4, 0),                 # one block, most threads idle, a partial last warp of data
    ("partial-last-block", 3 * 256 * 4 + 37, 8, 0),  # several blocks, the last one partly used
    ("grid-stride-tail", 9 * 1024 * 4 + 5, 1, 0),    # 4-6 blocks loop over many packs, ragged tail
    ("several-blocks", 20_011, 132, 0),         # many blocks, one pass
    ("misaligned", 4099, 2, 1),                 # storage offset 1: 16-byte packs impossible, VEC = 1
    ("empty", 0, 2, 0),                         # nothing to do; grad_beta must still be 0
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_SHORT = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}


def _inputs(n, offset, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    base = (3 * torch.randn(n + offset, generator=g, dtype=torch.float64)).to(dtype)
    return base[offset:]


@pytest.mark.parametrize("dtype", DTYPES, ids=[_SHORT[d] for d in DTYPES])
@pytest.mark.parametrize("name,n,sms,offset", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_lipswish_kernels_match_the_cpu_op(emu, name, n, sms, offset, dtype):
    x = _inputs(n, offset, dtype, 1)
    grad, gg_x = _inputs(n, offset, dtype, 2), _inputs(n, offset, dtype, 3)
    beta = torch.tensor([0.3], dtype=dtype)
    gg_beta = torch.tensor([-0.6], dtype=dtype)

    plan = _plan(emu, x, sms, aligned=x.data_ptr() % 16 == 0)
    packs = -(-n // plan["vec"])
    assert plan["threads"] == THREADS
    if name == "misaligned":
        assert plan["vec"] == 1
    else:
        assert plan["vec"] == 16 // x.element_size()
    if name == "grid-stride-tail":
        assert packs > plan["blocks"] * THREADS, "the configuration must make threads loop"
    if name in ("partial-last-block", "several-blocks"):
        assert plan["blocks"] > 1 and packs <= plan["blocks"] * THREADS and packs % THREADS != 0

    tol = TOLERANCES[dtype]
    assert_close(emu.lipswish(x, beta, sms), cpu_ops.lipswish(x, beta), **tol)
    for a, b in zip(emu.lipswish_with_derivative(x, beta, sms), cpu_ops.lipswish_with_derivative(x, beta)):
        assert_close(a, b, **tol)
    gx, gb = emu.lipswish_backward(grad, x, beta, sms)
    ex, eb = cpu_ops.lipswish_backward(grad, x, beta)
    assert_close(gx, ex, **tol)
    # grad_beta: block sums vs chunk sums add in different orders. scale >= sum|grad * dy/dbeta| (|dy/dbeta| <= x^2),
    # so rtol * scale bounds the worst case n*2^-53*sum|terms| for float64 (n < 4e4).
    scale = float(grad.double().abs().sum() * x.double().abs().max() ** 2) if n else 0.0
    assert_close(gb, eb, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * scale)
    got = emu.lipswish_double_backward(grad, gg_x, gg_beta, x, beta, sms)
    expected = cpu_ops.lipswish_double_backward(grad, gg_x, gg_beta, x, beta)
    assert_close(got[0], expected[0], **tol)
    assert_close(got[1], expected[1], **tol)
    assert_close(got[2], expected[2], rtol=tol["rtol"], atol=tol["atol"] + 4 * tol["rtol"] * scale)
    if n == 0:
        assert gb.item() == 0 and got[2].item() == 0


def test_lipswish_layouts_follow_the_cpu_op(emu):
    x = torch.randn(2, 6, 5, 3).contiguous(memory_format=torch.channels_last)
    beta = torch.tensor([0.5])
    y = emu.lipswish(x, beta, 2)
    assert y.stride() == cpu_ops.lipswish(x, beta).stride() == x.stride()
    xt = torch.randn(33, 17).t()
    assert_close(emu.lipswish(xt, beta, 2), cpu_ops.lipswish(xt, beta))


def test_lipswish_emulated_refuses_what_the_op_refuses(emu):
    with pytest.raises(RuntimeError, match=r"expected beta to have shape \[1\]"):
        emu.lipswish(torch.randn(3), torch.zeros(2), 2)


# ----------------------------------------------------------------------------------------------
# Power iteration: the single-launch dense kernel, its ATen fallback, and the convolution loop
# ----------------------------------------------------------------------------------------------

INF = float("inf")
PI_SHAPES = [(1, 1), (7, 33), (300, 5), (6, 300)]  # partial warps, rows > warps, columns > threads
PI_NORMS = [(2, 2), (1, 2), (2, INF), (3, 1.5), (2, 1)]


def _pi_start(shape, p, q, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    u = resflow_cuda.reference.normalize_u(torch.randn(shape[-2], generator=g, dtype=torch.float64), q)
    v = resflow_cuda.reference.normalize_v(torch.randn(shape[-1], generator=g, dtype=torch.float64), p)
    return w.to(dtype), u.to(dtype), v.to(dtype)


def _assert_power_iteration_close(got, expected, dtype):
    tol = dict(TOLERANCES[dtype])
    # components near 0 of unit vectors: Hoelder powers 0.5 (p = 3, q = 1.5) turn a rounding d of a component c (of
    # the max) into ~d / (2 sqrt c); float64 d <= 300*2^-53 per step of <= 300-term sums: 1e-9 holds for c >= 1e-9.
    tol["atol"] = max(tol["atol"], 10 * tol["rtol"])
    for a, b in zip(got[:3], expected[:3]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_close(a, b, **tol)
    assert torch.equal(got[3], expected[3])


@pytest.mark.parametrize("dtype", DTYPES, ids=[_SHORT[d] for d in DTYPES])
@pytest.mark.parametrize("p,q", PI_NORMS, ids=[f"{p}->{q}" for p, q in PI_NORMS])
@pytest.mark.parametrize("shape", PI_SHAPES, ids=["x".join(map(str, s)) for s in PI_SHAPES])
def test_power_iteration_kernel_matches_the_cpu_op(emu, shape, p, q, dtype):
    w, u, v = _pi_start(shape, p, q, dtype)
    # 10 iterations: enough for the tolerance to stop some runs early, few enough for the TSan job.
    for u_first, (atol, rtol) in [(True, (None, None)), (False, (1e-2, 1e-2))]:
        expected = cpu_ops.power_iteration(w, u, v, 10, atol, rtol, p, q, u_first)
        got = emu.power_iteration(w, u, v, 10, atol, rtol, p, q, u_first, 48 * 1024)
        _assert_power_iteration_close(got, expected, dtype)


def test_power_iteration_kernel_runs_a_batch_with_independent_stopping(emu):
    w, u, v = _pi_start((5, 40, 24), 2, 2, torch.float32, seed=1)
    w[2] *= 0.0
    u, v = u.expand(5, 40).contiguous(), v.expand(5, 24).contiguous()
    got = emu.power_iteration(w, u, v, 200, 1e-4, 1e-4, 2.0, 2.0, True, 48 * 1024)
    expected = cpu_ops.power_iteration(w, u, v, 200, 1e-4, 1e-4)
    _assert_power_iteration_close(got, expected, torch.float32)
    assert len(set(got[3].tolist())) > 1


def test_power_iteration_without_room_in_shared_memory_takes_the_device_loop(emu):
    # 0 bytes of shared memory: W v with ATen and the grid-wide dual-map kernels, the stopping test
    # and its device flag; against the pure-PyTorch reference, with equal iteration counts.
    w, u, v = _pi_start((33, 17), 3, 1.5, torch.float32, seed=2)
    for args in [(40, 1e-3, 1e-3, 3.0, 1.5, True), (10, None, None, 1.0, 2.0, False), (10, None, None, 2.0, INF, True)]:
        got = emu.power_iteration(w, u, v, *args, 0)
        expected = resflow_cuda.reference.power_iteration(w, u, v, *args)
        _assert_power_iteration_close(got, [*expected[:3], torch.tensor(expected[3])], torch.float32)
    # Converging between two of the host's reads of the stop flag (iterations 1, 2, 4, 8, ...): the
    # iterations queued after the flag was set change neither u, v nor the count.
    got = emu.power_iteration(w, u, v, 100, 1e-6, 1e-6, 2.0, 2.0, True, 0)
    expected = resflow_cuda.reference.power_iteration(w, u, v, 100, 1e-6, 1e-6)
    assert 16 < expected[3] < 100 and expected[3] & (expected[3] - 1) != 0
    _assert_power_iteration_close(got, [*expected[:3], torch.tensor(expected[3])], torch.float32)


def test_power_iteration_plan_counts_static_shared_memory_and_size(emu):
    static_bound, fused_max_bytes = emu.power_iteration_limits()
    # [blocks, threads, dynamic bytes, fits]; one SM, so that only the shared-memory rule decides.
    assert emu.power_iteration_plan(1, 4000, 4000, 48 * 1024, 1, 4) == [1, 256, 48000, 1]
    # u, v and the product alone fit 48 KiB (3 * 4096 * 4 bytes), but not with the kernel's static
    # reduction arrays: such a launch fails on a GPU ("invalid argument").
    for m, n, size in [(4096, 4096, 4), (4081, 4081, 4), (2048, 2048, 8), (2037, 2037, 8), (3072, 4608, 4)]:
        assert 3 * max(m, n) * size > 48 * 1024 - static_bound
        assert emu.power_iteration_plan(1, m, n, 48 * 1024, 1, size)[3] == 0, (m, n, size)
    # A large W on one block only when the batch fills the GPU; small ones always.
    side = int((fused_max_bytes // 4) ** 0.5)
    assert emu.power_iteration_plan(1, side, side, 48 * 1024, 132, 4)[3] == 1
    assert emu.power_iteration_plan(1, side + 1, side + 1, 48 * 1024, 132, 4)[3] == 0
    assert emu.power_iteration_plan(132, side + 1, side + 1, 48 * 1024, 132, 4)[3] == 1
    assert emu.power_iteration_plan(131, side + 1, side + 1, 48 * 1024, 132, 4)[3] == 0


def test_power_iteration_kernel_static_shared_memory_is_within_the_planned_bound(emu):
    # The emulator counts the static arrays a launch reaches: p = 1 and q = inf (argmax
    # reductions) with a tolerance (sum and max reductions) reach all of them.
    static_bound = emu.power_iteration_limits()[0]
    for dtype in (torch.float32, torch.float64):
        w, u, v = _pi_start((7, 33), 1, INF, dtype)
        emu.power_iteration(w, u, v, 2, 1e-3, 1e-3, 1.0, INF, True, 48 * 1024)
        assert 0 < emu.last_static_shared_bytes() <= static_bound


def test_power_iteration_near_the_shared_memory_limit_leaves_room_for_static_arrays(emu):
    # (6110 + 25 + 6110) * 4 = 48980 bytes of vectors: below 48 KiB, but not with the kernel's
    # static arrays; the plan sends it to the ATen loop instead of a launch a GPU refuses.
    w, u, v = _pi_start((6110, 25), 1, INF, torch.float32, seed=4)
    got = emu.power_iteration(w, u, v, 3, 1e-6, 1e-6, 1.0, INF, True, 48 * 1024)
    expected = cpu_ops.power_iteration(w, u, v, 3, 1e-6, 1e-6, 1.0, INF)
    _assert_power_iteration_close(got, expected, torch.float32)


def _update_both_ways(emu, starts, sigma_dtypes=None, **kwargs):
    results = []
    for run in (emu.power_iteration_update_, cpu_ops.power_iteration_update_):
        us = [u.clone() for _, u, _ in starts]
        vs = [v.clone() for _, _, v in starts]
        sigmas = [torch.zeros((), dtype=d) for d in (sigma_dtypes or [w.dtype for w, _, _ in starts])]
        run([w for w, _, _ in starts], us, vs, sigmas, 30, 1e-5, 1e-5, 2.0, 2.0, True, **kwargs)
        results.append((us, vs, sigmas))
    return results


def test_power_iteration_update_writes_every_layer_in_one_launch(emu):
    shapes = [(8, 5), (3, 40), (8, 5)]
    starts = [_pi_start(s, 2, 2, torch.float32, seed=i) for i, s in enumerate(shapes)]
    before = emu.launch_count()
    ours, theirs = _update_both_ways(emu, starts)
    assert emu.launch_count() - before == 1  # every layer in one listed launch, u, v, sigma in place
    for a, b in zip(ours, theirs):
        for x, y in zip(a, b):
            assert_close(x, y, atol=1e-6, rtol=1e-5)
    # More layers than one launch's parameters hold (48): a second launch.
    starts = [_pi_start((4 + i % 3, 3), 2, 2, torch.float32, seed=i) for i in range(50)]
    before = emu.launch_count()
    ours, theirs = _update_both_ways(emu, starts)
    assert emu.launch_count() - before == 2
    for a, b in zip(ours, theirs):
        for x, y in zip(a, b):
            assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_power_iteration_update_takes_the_other_paths_where_the_listed_kernel_cannot(emu):
    # One launch for the float32 ones; float64 and half types, a sigma of another dtype, a
    # non-contiguous u and a matrix too long for shared memory go one by one, with the same results.
    starts = [_pi_start((8, 5), 2, 2, torch.float32, seed=1), _pi_start((6, 7), 2, 2, torch.float64, seed=2),
              _pi_start((4, 9), 2, 2, torch.float16, seed=3), _pi_start((5, 5), 2, 2, torch.float32, seed=4),
              _pi_start((6200, 10), 2, 2, torch.float32, seed=5), _pi_start((7, 3), 2, 2, torch.float64, seed=6)]
    w, u, v = starts[3]
    starts[3] = (w, torch.stack([u, u], 1)[:, 0], v)  # non-contiguous u
    sigma_dtypes = [torch.float32, torch.float64, torch.float16, torch.float32, torch.float32, torch.float32]
    ours, theirs = _update_both_ways(emu, starts, sigma_dtypes)
    for a, b in zip(ours, theirs):
        for x, y in zip(a, b):
            tol = dict(TOLERANCES[x.dtype])
            tol["atol"] = max(tol["atol"], 10 * tol["rtol"])  # components near 0 of unit vectors
            assert_close(x, y, **tol)


def test_conv_power_iteration_device_loop_matches_the_cpu_op(emu):
    # The grid-wide kernels with a small SM count: several blocks per vector.
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 3, 3, 3, generator=g)
    u = resflow_cuda.reference.normalize_u(torch.randn(6 * 8 * 7, generator=g), 2)
    v = resflow_cuda.reference.normalize_v(torch.randn(3 * 8 * 7, generator=g), 2)
    # A fixed count, then two runs that the tolerance stops (after 31 iterations each); every iteration
    # launches the same kernels, so the fixed run needs few of them (each costs seconds under TSan).
    for steps, tol, norms in [(12, (None, None), (2.0, 2.0)), (70, (1e-4, 1e-4), (2.0, 2.0)),
                              (70, (1e-3, 1e-3), (3.0, 1.5))]:
        got = emu.conv_power_iteration(w, u, v, [8, 7], [1, 1], [1, 1], steps, *tol, *norms, True)
        expected = cpu_ops.conv_power_iteration(w, u, v, (8, 7), (1, 1), (1, 1), steps, *tol, *norms)
        _assert_power_iteration_close(got, expected, torch.float32)


# ----------------------------------------------------------------------------------------------
# The log-det series step: a block (wide samples) or a warp (narrow ones) per sample, grid-stride
# ----------------------------------------------------------------------------------------------

# (name, rows, cols, SM count, storage offset)
SERIES_CONFIGS = [
    ("one-row-partial-warp", 1, 7, 2, 0),         # a warp per row: one warp of eight busy, 7 of 32 lanes
    ("toy-warp-rows", 500, 2, 2, 0),              # the toy flows' rows: 64 warps loop over 500 rows
    ("warp-rows-packs", 19, 100, 2, 0),           # 16-byte packs, 25 of a warp's lanes, rows % 8 != 0
    ("warp-rows-limit", 3, 512, 4, 0),            # the widest warp row (float32: 128 packs, 4 per lane)
    ("block-rows-limit", 3, 516, 4, 0),           # one pack more: a block per row
    ("rows-over-blocks", 37, 1030, 2, 0),         # 8 blocks loop over 37 samples; odd cols: VEC = 1
    ("wide-packs", 5, 2048, 132, 0),              # one block per sample, 16-byte packs, several per thread
    ("misaligned", 3, 64, 4, 1),                  # storage offset 1: VEC = 1
    ("empty-rows", 0, 8, 2, 0),
    ("empty-cols", 4, 0, 2, 0),
]


def _series_inputs(rows, cols, offset, dtype, seed):
    return [_inputs(rows * cols, offset, dtype, seed + i).view(rows, cols) for i in range(3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=[_SHORT[d] for d in DTYPES])
@pytest.mark.parametrize("name,rows,cols,sms,offset", SERIES_CONFIGS, ids=[c[0] for c in SERIES_CONFIGS])
@pytest.mark.parametrize("with_neumann", [True, False], ids=["neumann", "logdet-only"])
def test_logdet_series_kernel_matches_the_cpu_op(emu, name, rows, cols, sms, offset, dtype, with_neumann):
    w, eps, neumann = _series_inputs(rows, cols, offset, dtype, 10)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logdet = torch.linspace(-1, 1, rows, dtype=acc)
    outs = []
    for run in (cpu_ops.logdet_series_accumulate_, lambda *a: emu.logdet_series_accumulate_(*a, sms)):
        l, n = logdet.clone(), neumann.clone() if with_neumann else None
        run(w, eps, l, n, 0.75, -1.25)
        outs.append((l, n))
    # Sums of up to 2048 products in another order (per-thread then tree vs per-lane then lanes). float64: at worst
    # ~(n/4)*2^-53*sum|terms| (>= 4 lanes), at most 0.4 of 1e-10 (1 + |logdet|) on every row here.
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-5)
    assert_close(outs[1][0], outs[0][0], **tol)
    if with_neumann:  # elementwise; the host compiler may fuse the multiply-add: one rounding apart
        assert_close(outs[1][1], outs[0][1], **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name,rows,cols,sms,offset", SERIES_CONFIGS, ids=[c[0] for c in SERIES_CONFIGS])
def test_logdet_series_kernel_with_scale_matches_the_cpu_op(emu, name, rows, cols, sms, offset, dtype):
    # the instantiations that scale w in place (with the Neumann vector; the scale's loads are the same packs)
    w, eps, neumann = _series_inputs(rows, cols, offset, dtype, 20)
    scale = _series_inputs(rows, cols, offset, dtype, 30)[0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    outs = []
    for run in (cpu_ops.logdet_series_accumulate_, lambda *a: emu.logdet_series_accumulate_(*a[:6], sms, a[6])):
        scaled, l, n = w.clone(), torch.linspace(-1, 1, rows, dtype=acc), neumann.clone()
        run(scaled, eps, l, n, 0.75, -1.25, scale)
        outs.append((scaled, l, n))
    # the product w * scale: one rounding on both sides (equal up to the host compiler's contraction of the
    # multiply-add that follows); the sums as in the test above
    assert_close(outs[1][0], outs[0][0], **TOLERANCES[dtype])
    assert_close(outs[1][1], outs[0][1], atol=1e-4, rtol=1e-5)
    assert_close(outs[1][2], outs[0][2], **TOLERANCES[dtype])


def test_elementwise_plan_fills_the_blocks_the_kernels_are_compiled_for(emu):
    # __launch_bounds__(256, elementwise_min_blocks): 6 resident blocks per SM for float32, 4 for
    # double and the half types; a large input gets exactly that many per SM.
    for element_size, per_sm in [(4, 6), (8, 4), (2, 4)]:
        assert emu.elementwise_plan(1 << 26, 132, True, element_size) == [16 // element_size, 132 * per_sm, 256]


def test_logdet_series_plan(emu):
    # [vec, blocks, warp per row]
    assert emu.series_plan(37, 1030, 2, True, 4) == [1, 8, 0]  # cols * 4 bytes not a multiple of 16
    assert emu.series_plan(5, 2048, 132, True, 4) == [4, 5, 0]
    assert emu.series_plan(5, 2048, 132, False, 2) == [1, 5, 0]
    assert emu.series_plan(5, 2048, 132, True, 2) == [8, 5, 0]
    # Narrow rows: a warp each, eight rows per block (the toy case: 500 rows of 2 values, 63 blocks).
    assert emu.series_plan(500, 2, 132, True, 4) == [1, 63, 1]
    assert emu.series_plan(3, 512, 132, True, 4) == [4, 1, 1]    # 128 packs: still a warp
    assert emu.series_plan(3, 516, 132, True, 4) == [4, 3, 0]    # 129 packs: a block
    assert emu.series_plan(10_000, 64, 2, True, 8) == [2, 8, 1]  # capped at 4 blocks per SM


def test_logdet_series_layouts_follow_the_cpu_op(emu):
    w, eps, neumann = (t.view(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
                       for t in _series_inputs(2, 60, 0, torch.float32, 3))
    outs = []
    for run in (cpu_ops.logdet_series_accumulate_, lambda *a: emu.logdet_series_accumulate_(*a, 2)):
        l, n = torch.zeros(6)[::3], neumann.transpose(1, 2)
        before = n.clone()
        run(w.transpose(1, 2), eps.transpose(1, 2), l, n, 1.0, 2.0)
        assert_close(n, before + 2 * w.transpose(1, 2))
        outs.append(l)
    assert_close(outs[1], outs[0])
    # a scaled w of another layout: updated through a contiguous copy, written back
    scale = eps.abs()
    for run in (cpu_ops.logdet_series_accumulate_, lambda *a: emu.logdet_series_accumulate_(*a[:6], 2, a[6])):
        scaled = w.clone().transpose(1, 2)
        run(scaled, eps.transpose(1, 2), torch.zeros(2), None, 1.0, 0.0, scale.transpose(1, 2))
        assert_close(scaled, (w * scale).transpose(1, 2))


def test_logdet_series_emulated_refuses_what_the_op_refuses(emu):
    w = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"expected logdet to have shape \[3\]"):
        emu.logdet_series_accumulate_(w, w.clone(), torch.zeros(2), None, 1.0, 0.0, 2)


# ----------------------------------------------------------------------------------------------
# Registry: every kernel in csrc/cuda runs in this suite
# ----------------------------------------------------------------------------------------------


def _run_lipswish_forward(emu):
    x = torch.randn(100)
    emu.lipswish(x, torch.tensor([0.5]), 2)
    emu.lipswish_with_derivative(x, torch.tensor([0.5]), 2)


def _run_lipswish_backward(emu):
    x = torch.randn(100)
    emu.lipswish_backward(torch.randn(100), x, torch.tensor([0.5]), 2)


def _run_lipswish_double_backward(emu):
    x = torch.randn(100)
    emu.lipswish_double_backward(torch.randn(100), torch.randn(100), torch.tensor([1.0]), x, torch.tensor([0.5]), 2)


def _run_power_iteration(emu):
    w, u, v = _pi_start((8, 5), 2, 2, torch.float32)
    emu.power_iteration(w, u, v, 3, None, None, 2.0, 2.0, True, 48 * 1024)


def _run_power_iteration_update(emu):
    w, u, v = _pi_start((8, 5), 2, 2, torch.float32)
    emu.power_iteration_update_([w], [u.clone()], [v.clone()], [torch.zeros(())], 3, None, None, 2.0, 2.0, True)


def _run_power_iteration_device_loop(emu):
    w, u, v = _pi_start((8, 5), 3, 1.5, torch.float32)
    emu.power_iteration(w, u, v, 3, 1e-3, 1e-3, 3.0, 1.5, True, 0)  # Hoelder: both stats passes


def _run_logdet_series(emu):
    w = torch.randn(3, 8)
    emu.logdet_series_accumulate_(w, torch.randn(3, 8), torch.zeros(3), torch.zeros(3, 8), 1.0, 1.0, 2)


# The moments kernel (one block of 256 threads) against the CPU op: fewer elements than threads, one
# pass, several passes with a ragged tail, non-contiguous x (made contiguous by the binding), and none.
MOMENT_SIZES = [("one", (1,)), ("under-a-block", (37,)), ("passes", (3, 1001)), ("strided", (40, 9)), ("empty", (0,))]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64], ids=["f32-buffers", "f64-buffers"])
@pytest.mark.parametrize("dtype", DTYPES, ids=[_SHORT[d] for d in DTYPES])
@pytest.mark.parametrize("name,shape", MOMENT_SIZES, ids=[c[0] for c in MOMENT_SIZES])
def test_moments_kernel_matches_the_cpu_op(emu, name, shape, dtype, out_dtype):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(40), dtype=torch.float64) * 3 + 1).to(dtype)
    if name == "strided":
        x = x.t()
    outs = []
    for run in (step_ops.moments_, emu.moments_):
        mean, square = torch.zeros(1, dtype=out_dtype), torch.zeros(1, dtype=out_dtype)
        run(x, mean, square)
        outs.append(torch.cat([mean, square]))
    # Both sum in float64, in another order (per thread, then a tree; against the CPU's one run): apart by at
    # most ~n 2^-53 sum|x| / |sum x| (n <= 3003, sum|x| / |sum x| ~ 3 here: 1e-12 relative), far below the
    # rounding to x's dtype that follows, which then gives the same value or, next to a rounding boundary,
    # its neighbour: one ulp of x's dtype (float64 x: the 1e-12 itself).
    rtol = 1e-12 if dtype == torch.float64 else torch.finfo(dtype).eps
    tol = dict(atol=0.0, rtol=rtol)
    assert_close(outs[1], outs[0], equal_nan=True, **tol)
    assert outs[0].isnan().all() == (x.numel() == 0)


def test_moments_emulated_refuses_what_the_op_refuses(emu):
    x = torch.randn(6)
    with pytest.raises(RuntimeError, match="expected mean to have one element"):
        emu.moments_(x, torch.zeros(2), torch.zeros(1))
    with pytest.raises(RuntimeError, match="expected mean not to share memory with x"):
        emu.moments_(x, x[:1], torch.zeros(1))


# foreach_add_scaled's kernel (a block of blocks per pair, up to 24 pairs per launch) against the CPU op:
# (name, pair sizes, SMs): grid-stride over a pair longer than the grid, 30 pairs (two launches) with empty
# ones among them, a pair of one element.
ADD_SCALED_CONFIGS = [("grid-stride", [5000, 3, 1], 1), ("two-launches", [k % 9 for k in range(30)], 2),
                      ("one", [1], 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=[_SHORT[d] for d in DTYPES])
@pytest.mark.parametrize("name,sizes,sms", ADD_SCALED_CONFIGS, ids=[c[0] for c in ADD_SCALED_CONFIGS])
def test_add_scaled_kernel_matches_the_cpu_op(emu, name, sizes, sms, dtype):
    a = [_inputs(n, 0, dtype, 50 + i) for i, n in enumerate(sizes)]
    b = [_inputs(n, 0, dtype, 90 + i) for i, n in enumerate(sizes)]
    scale = torch.tensor([0.625], dtype=torch.float64).to(dtype)
    expected = step_ops.foreach_add_scaled(a, b, scale)
    got = emu.foreach_add_scaled(a, b, scale, sms)
    assert [t.shape for t in got] == [t.shape for t in expected]
    for g, e, bi in zip(got, expected, b):
        # One multiply-add in the compute type each, fused into one rounding or not (a compiler may contract it):
        # apart by at most one rounding of the product, then (half types) one of the result to the half type: one
        # ulp of |b s| plus one of |out|.
        bound = torch.finfo(dtype).eps * ((bi.double() * 0.625).abs() + e.double().abs())
        assert ((g.double() - e.double()).abs() <= bound).all()


# The ActNorm kernels against the CPU ops: (name, x's shape, SMs). The forward gives a row of S positions
# min(S, 256) threads, grid-stride over rows when the grid is capped (1 SM: 6 blocks), with the log-density in
# the same launch; the backward a block per channel. "1d": 2800 rows of one position, 256 per block, 6 blocks:
# the channel steps by 1536 mod 7 = 3 rows at a time.
ACTNORM_CONFIGS = [("grid-stride", (16, 3, 8, 8), 1), ("1d", (400, 7), 1), ("one-channel", (3, 1, 5, 7), 4),
                   ("wide-rows", (2, 3, 20, 20), 2), ("empty-batch", (0, 3, 2, 2), 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=[_SHORT[d] for d in DTYPES])
@pytest.mark.parametrize("name,shape,sms", ACTNORM_CONFIGS, ids=[c[0] for c in ACTNORM_CONFIGS])
def test_actnorm_kernels_match_the_cpu_ops(emu, name, shape, sms, dtype):
    numel = 1
    for d in shape:
        numel *= d
    x = _inputs(numel, 0, dtype, 60).view(shape)
    weight, bias = _inputs(shape[1], 0, dtype, 61) / 6, _inputs(shape[1], 0, dtype, 62)
    logp, grad_logp = _inputs(shape[0], 0, dtype, 63).view(-1, 1), _inputs(shape[0], 0, dtype, 64).view(-1, 1)
    grad_y = _inputs(numel, 0, dtype, 65).view(shape)
    for sign in (-1, 1):
        # The same arithmetic per element in the same compute type (float32 for the half types): equal but for
        # exp's last bit where the host's expf and the kernel's differ, one ulp of dtype
        for got, expected in zip(emu.actnorm(x, weight, bias, logp, sign, sms),
                                 flow_ops.actnorm(x, weight, bias, logp, sign)):
            assert_close(got, expected, rtol=torch.finfo(dtype).eps, atol=0.0)
        # The per-channel sums in float64 in another order (per thread, then a tree): apart by up to n 2^-53 sum|t|
        # for n <= 1024 terms t of O(10) (1e-12 absolute), then rounded to dtype: one ulp of dtype, or (float64,
        # no rounding after the sum) that 1e-12.
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=torch.finfo(dtype).eps, atol=0.0)
        for got, expected in zip(emu.actnorm_backward(grad_y, grad_logp, x, weight, bias, sign),
                                 flow_ops.actnorm_backward(grad_y, grad_logp, x, weight, bias, sign)):
            assert_close(got, expected, **tol)


def _run_actnorm(emu):
    x, w, b = torch.randn(4, 3, 2, 2), torch.randn(3), torch.randn(3)
    emu.actnorm(x, w, b, torch.randn(4, 1), -1, 2)
    emu.actnorm_backward(torch.randn(4, 3, 2, 2), torch.randn(4, 1), x, w, b, -1)


def _run_add_scaled(emu):
    emu.foreach_add_scaled([torch.randn(300)], [torch.randn(300)], torch.tensor([0.5]), 2)


def _run_moments(emu):
    emu.moments_(torch.randn(300), torch.zeros(1), torch.zeros(1))


# ----------------------------------------------------------------------------------------------
# The fused dense block's kernels (csrc/cuda/dense_jacobian_kernels.cuh) against the CPU ops
# ----------------------------------------------------------------------------------------------

# Same arithmetic in the same order per element as the CPU ops, but the beta gradient and sigma sum in
# another order (block sums), and nvcc-style contraction may differ: 1e-5 float32 / 1e-12 float64 relative.
DENSE_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _dense_close(got, expected, dtype, scale=1.0):
    # atol scaled by the magnitude of the terms a result sums, for entries that cancel to near zero
    assert_close(got, expected, rtol=DENSE_RTOL[dtype], atol=DENSE_RTOL[dtype] * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,width,blocks,sms,keep", [(5, 7, 4, 1, True), (300, 64, 3, 2, False),
                                                      (300, 64, 3, 2, True), (1, 1, 2, 4, True), (0, 3, 0, 1, True)])
def test_jacobian_lipswish_kernels_match_the_cpu_ops(emu, dtype, batch, width, blocks, sms, keep):
    g = torch.Generator().manual_seed(0)
    z = (2 * torch.randn(blocks * batch, width, generator=g, dtype=torch.float64)).to(dtype)
    bias = torch.randn(width, generator=g, dtype=torch.float64).to(dtype)
    beta = torch.tensor([0.7], dtype=dtype)
    got = emu.jacobian_lipswish(z, bias, beta, batch, keep, sms)
    expected = dense_ops._OPS.jacobian_lipswish(z, bias, beta, batch, keep)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        _dense_close(a, b, dtype)
    grad = torch.randn(blocks * batch, width, generator=g, dtype=torch.float64).to(dtype)
    h, t = z[:batch], z[batch:]  # every further block is a tangent
    got = emu.jacobian_lipswish_backward(grad, h, t, beta, sms)
    expected = dense_ops._OPS.jacobian_lipswish_backward(grad, h, t, beta)
    _dense_close(got[0], expected[0], dtype)
    _dense_close(got[1], expected[1], dtype, scale=max(batch * width, 1))  # beta's gradient: batch x width terms


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,dim,terms,sms", [(7, 2, 5, 1), (600, 6, 3, 2), (3, 16, 70, 1), (1, 1, 0, 1)])
@pytest.mark.parametrize("neumann", [True, False])
def test_jacobian_series_kernel_matches_the_cpu_op(emu, dtype, batch, dim, terms, sms, neumann):
    # 70 terms: three launches of 32-term chunks carrying w, w~ and the log-det between them.
    g = torch.Generator().manual_seed(1)
    z = (0.3 * torch.randn((2 + dim) * batch, dim, generator=g, dtype=torch.float64)).to(dtype)
    eps = torch.randn(batch, dim, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(dim, generator=g, dtype=torch.float64).to(dtype)
    logdet_coeffs = [(-1) ** k / (k + 1) for k in range(terms)]
    neumann_coeffs = [(-1) ** (k + 1) * 0.9 for k in range(terms)] if neumann else []
    got = emu.jacobian_series(z, bias, eps, logdet_coeffs, neumann_coeffs, sms)
    expected = dense_ops._OPS.jacobian_series(z, bias, eps, logdet_coeffs, neumann_coeffs)
    for a, b in zip(got, expected):
        _dense_close(a, b, dtype, scale=10.0)  # up to 70 terms of powers of |J| ~ 1: partial sums up to ~10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,dim,terms,sms", [(7, 2, 5, 1), (300, 6, 3, 2), (3, 16, 40, 1), (1, 1, 1, 1)])
def test_jacobian_series_backward_kernel_matches_the_cpu_op(emu, dtype, batch, dim, terms, sms):
    g = torch.Generator().manual_seed(3)
    z = (0.3 * torch.randn((2 + dim) * batch, dim, generator=g, dtype=torch.float64)).to(dtype)
    eps, grad_g = (torch.randn(batch, dim, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    grad_logdet = torch.randn(batch, generator=g, dtype=torch.float64).to(dtype)
    coeffs = [(-1) ** k / (k + 1) for k in range(terms)]
    got = emu.jacobian_series_backward(z, eps, coeffs, grad_logdet, grad_g, sms)
    expected = dense_ops.jacobian_series_backward(z, eps, coeffs, grad_logdet, grad_g)
    _dense_close(got, expected, dtype, scale=10.0)  # sums of O(terms) products of powers, |.| <= ~10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layers", [3, 17])  # 17: two launches of 16 layers
def test_lipschitz_normalize_kernels_match_the_cpu_ops(emu, dtype, layers):
    g = torch.Generator().manual_seed(2)
    shapes = [(1 + (5 * i) % 40, 1 + (3 * i) % 33) for i in range(layers)]
    weights = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    us = [torch.randn(s[0], generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    vs = [torch.randn(s[1], generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    coeffs = [0.5 + (i % 3) for i in range(layers)]
    outs = []
    for run in ("emulated", "cpu"):
        out = [torch.empty_like(w) for w in weights]
        sigmas = weights[0].new_empty(layers)
        scales = [torch.zeros((), dtype=dtype) for _ in weights]
        if run == "emulated":
            emu.lipschitz_normalize_(weights, us, vs, coeffs, out, sigmas, scales)
        else:
            cpu_ops._OPS.lipschitz_normalize_(weights, us, vs, coeffs, out, sigmas, scales)
        grads = [torch.ones_like(w) * (i + 1) for i, w in enumerate(weights)]
        detach = [i % 2 == 0 for i in range(layers)]
        back = (emu.lipschitz_normalize_backward if run == "emulated" else
                cpu_ops._OPS.lipschitz_normalize_backward)(grads, weights, us, vs, sigmas, coeffs, detach)
        outs.append([*out, sigmas, *scales, *back])
    for a, b in zip(*outs):
        _dense_close(a, b, dtype, scale=100.0)  # grads up to 17 x |<G, W>| u v^T: entries up to ~100


def _run_jacobian_lipswish(emu):
    emu.jacobian_lipswish(torch.randn(12, 5), None, torch.tensor([0.5]), 3, True, 2)


def _run_jacobian_lipswish_backward(emu):
    emu.jacobian_lipswish_backward(torch.randn(6, 5), torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0.5]), 2)


def _run_jacobian_series(emu):
    emu.jacobian_series(torch.randn(8, 2), None, torch.randn(2, 2), [0.5, -0.25], [0.5, 0.5], 1)


def _run_jacobian_series_backward(emu):
    emu.jacobian_series_backward(torch.randn(8, 2), torch.randn(2, 2), [0.5, -0.25], torch.ones(2), torch.ones(2, 2),
                                 1)


def _run_lipschitz_normalize(emu):
    w, u, v = torch.randn(4, 3), torch.randn(4), torch.randn(3)
    out, sigmas = [torch.empty(4, 3)], torch.empty(1)
    emu.lipschitz_normalize_([w], [u], [v], [0.5], out, sigmas, [torch.zeros(())])
    emu.lipschitz_normalize_backward([torch.ones(4, 3)], [w], [u], [v], sigmas, [0.5], [False])


# Kernel name -> a small launch of it; the tests above check the values.
REGISTRY = {
    "power_iteration_kernel": _run_power_iteration,
    "power_iteration_list_kernel": _run_power_iteration_update,
    "dual_stats_kernel": _run_power_iteration_device_loop,
    "dual_apply_kernel": _run_power_iteration_device_loop,
    "convergence_kernel": _run_power_iteration_device_loop,
    "lipswish_forward_kernel": _run_lipswish_forward,
    "lipswish_backward_kernel": _run_lipswish_backward,
    "lipswish_double_backward_kernel": _run_lipswish_double_backward,
    "finish_sum_kernel": _run_lipswish_backward,
    "logdet_series_kernel": _run_logdet_series,
    "moments_kernel": _run_moments,
    "add_scaled_kernel": _run_add_scaled,
    "actnorm_kernel": _run_actnorm,
    "actnorm_backward_kernel": _run_actnorm,
    "jacobian_lipswish_kernel": _run_jacobian_lipswish,
    "jacobian_lipswish_backward_kernel": _run_jacobian_lipswish_backward,
    "jacobian_series_kernel": _run_jacobian_series,
    "jacobian_series_backward_kernel": _run_jacobian_series_backward,
    "lipschitz_normalize_kernel": _run_lipschitz_normalize,
    "lipschitz_normalize_backward_kernel": _run_lipschitz_normalize,
}


def test_every_cuda_kernel_is_in_the_emulated_registry():
    in_sources = emulation.source_kernels()
    assert in_sources, "no __global__ functions found in csrc/cuda"
    missing = in_sources - set(REGISTRY)
    assert not missing, f"CUDA kernels without an emulated test (add them to REGISTRY): {sorted(missing)}"
    stale = set(REGISTRY) - in_sources
    assert not stale, f"REGISTRY names kernels that are not in csrc/cuda: {sorted(stale)}"


@pytest.mark.parametrize("kernel", sorted(REGISTRY))
def test_registered_kernel_runs_under_the_emulator(emu, kernel):
    assert emu.launched_kernels() == [] and emu.launch_count() == 0  # _own_launches cleared the record
    REGISTRY[kernel](emu)
    assert kernel in emu.launched_kernels()


_LAUNCHED_BEFORE = []  # what the first of the two tests below launched, for the second


@pytest.mark.same_process
def test_launch_record_sees_this_tests_launch(emu):
    _run_logdet_series(emu)
    assert emu.launched_kernels() == ["logdet_series_kernel"] and emu.launch_count() == 1
    _LAUNCHED_BEFORE.append("logdet_series_kernel")


@pytest.mark.same_process
def test_launch_record_is_cleared_between_tests(emu):
    """Runs after the test above (definition order): its launch is not seen here."""
    if not _LAUNCHED_BEFORE:
        pytest.skip("needs test_launch_record_sees_this_tests_launch to run first in this process")
    assert emu.launched_kernels() == [] and emu.launch_count() == 0
    _run_lipswish_forward(emu)
    assert "lipswish_forward_kernel" in emu.launched_kernels()
    assert "logdet_series_kernel" not in emu.launched_kernels()


# ----------------------------------------------------------------------------------------------
# The emulator itself: intrinsic semantics and the errors it must report
# ----------------------------------------------------------------------------------------------


def _expected_intrinsics(threads: int, width: int) -> torch.Tensor:
    out = torch.empty(threads, 10, dtype=torch.int32)
    odd = sum(t % 2 for t in range(threads))
    for t in range(threads):
        lane = t % 32
        group, in_group = lane // width, lane % width
        src_xor = lane ^ 5
        ballot = sum(1 << i for i in range(32) if i % 3 == 0)
        out[t] = torch.tensor([
            (group * width + 3 % width) * 10,
            lane - 2 if in_group >= 2 else lane,
            lane + 3 if in_group + 3 < width else lane,
            lane if src_xor // width > group else src_xor,
            ballot - (1 << 32) if ballot >= 1 << 31 else ballot,
            1,
            0,
            odd,
            1 + 2,
            sum(range(16)) if lane < 16 else sum(range(16, 32)),
        ])
    return out


@pytest.mark.parametrize("width", [32, 16, 8, 4])
def test_warp_and_block_intrinsics(emu, width):
    got = emu.probe("intrinsics", 2, 96, width).view(96, 10)
    assert torch.equal(got, _expected_intrinsics(96, width))


def test_atomics(emu):
    blocks, threads = 3, 70
    n = blocks * threads
    got = emu.probe("atomics", blocks, threads, 32)
    expected = torch.tensor([n, n - 1, -(n - 1), -2 * n, (1 << 31) - 1, 7, 3 * n, 0.5 * n, 0.25 * n],
                            dtype=torch.float64)
    assert torch.equal(got, expected)


def test_dynamic_shared_memory_is_poisoned_per_block_and_shared(emu):
    got = emu.probe("dynamic_shared", 3, 96, 32)
    assert torch.equal(got, torch.full_like(got, 3))


def test_static_and_dynamic_shared_memory_share_the_block_limit(emu):
    got = emu.probe("static_shared_fits", 2, 64, 32)
    assert torch.equal(got.view(2, 64), ((torch.arange(64, dtype=torch.int32) + 1) % 64).expand(2, 64))
    assert emu.last_static_shared_bytes() == 1024
    with pytest.raises(RuntimeError, match=r"1024 bytes of static and 48132 bytes of dynamic shared memory at "
                                           r"emulated_ops.cpp:\d+ exceed the 49152"):
        emu.probe("static_shared_overflow", 2, 64, 32)


@pytest.mark.parametrize("probe,threads,pattern", [
    ("divergent_barrier", 64,
     r"divergent barrier.*\n  threads 0-39: wait at __syncthreads probe_kernels.cuh:\d+\n"
     r"  threads 40-63: wait at __syncthreads probe_kernels.cuh:\d+"),
    ("warp_facing_barrier", 64,
     r"a warp collective faces __syncthreads.*\n"
     r"  threads 0-15: wait at __shfl_down_sync \(mask 0xffffffff\) probe_kernels.cuh:\d+\n"
     r"  threads 16-63: wait at __syncthreads probe_kernels.cuh:\d+"),
    ("absent_lane", 40, r"__shfl_down_sync at probe_kernels.cuh:\d+: mask 0xffffffff names lane 8 of warp 1, "
                        r"which does not exist \(the block has 40 threads\)"),
    ("exited_lane", 64, r"mask 0xffffffff names lane 0 \(thread 0\), which has exited"),
])
def test_synchronisation_errors_are_reported_not_hung(emu, probe, threads, pattern):
    with pytest.raises(RuntimeError, match=pattern) as info:
        emu.probe(probe, 2, threads, 32)
    assert "in block (0,0,0) of the launch at emulated_ops.cpp:" in str(info.value)
    # The emulator is usable again after an error.
    _run_lipswish_forward(emu)


def test_extension_is_built_with_the_requested_sanitizer(emu):
    assert emu.sanitizer() == emulation.sanitizer()


def test_every_kernel_header_is_compiled_by_nvcc():
    # The emulated suite runs the .cuh files that the CUDA build compiles: each must be reached
    # from a .cu file through #include.
    cuda_dir = emulation.CSRC / "cuda"
    reached, frontier = set(), [p.name for p in cuda_dir.glob("*.cu")]
    while frontier:
        name = frontier.pop()
        if name in reached or not (cuda_dir / name).exists():
            continue
        reached.add(name)
        frontier += re.findall(r'#include "(?:\.\./cuda/)?([\w.]+)"', (cuda_dir / name).read_text())
    headers = {p.name for p in cuda_dir.glob("*.cuh")}
    assert headers and headers <= reached, f"kernel headers no .cu includes: {sorted(headers - reached)}"


def test_invalid_launch_configuration_is_reported(emu):
    with pytest.raises(RuntimeError, match=r"invalid launch configuration .* block \(1025,1,1\)"):
        emu.probe("intrinsics", 1, 1025, 32)


def test_planted_race_gives_wrong_values_under_the_emulator(emu):
    x = torch.arange(256, dtype=torch.float32)
    expected = x.view(2, 128).flip(1).reshape(-1)
    assert torch.equal(emu.shared_reverse(x, True), expected)
    assert not torch.equal(emu.shared_reverse(x, False), expected)


# ----------------------------------------------------------------------------------------------
# ThreadSanitizer catches the planted missing __syncthreads (and nothing in the correct twin)
# ----------------------------------------------------------------------------------------------


def _compile_planted_race(tmp_path: Path, flags: list[str]) -> Path:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    exe = tmp_path / "planted_race"
    subprocess.run([cxx, "-std=c++17", "-O1", "-g", *flags, "-Wno-unknown-pragmas", "-Wno-unused-function",
                    f"-I{emulation.CSRC / 'include'}", f"-I{emulation.CSRC}", f"-I{emulation.EMULATED}",
                    str(emulation.EMULATED / "planted_race_main.cpp"), "-o", str(exe)], check=True)
    return exe


def test_thread_sanitizer_reports_the_planted_race(tmp_path):
    exe = _compile_planted_race(tmp_path, ["-fsanitize=thread"])
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["TSAN_OPTIONS"] = "halt_on_error=0 exitcode=66"
    race = subprocess.run([str(exe), "race"], capture_output=True, text=True, env=env)
    assert race.returncode == 66, race.stdout + race.stderr
    assert "WARNING: ThreadSanitizer: data race" in race.stderr
    assert "shared_reverse_kernel<false>" in race.stderr and "probe_kernels.cuh" in race.stderr
    fixed = subprocess.run([str(exe), "fixed"], capture_output=True, text=True, env=env)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "ThreadSanitizer" not in fixed.stderr
