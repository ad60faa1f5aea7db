"""What only a GPU shows: the ops on a side stream and on a second GPU, index math past 2**31 elements,
the user's TF32 settings, CUDA graph capture, and the list op's single launch. Every test takes the
``cuda`` fixture (marked cuda): a visible skip where CUDA cannot be used."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from resflow_cuda import dense_ops, ops
from conftest import TOLERANCES, cudnn_deterministic
from test_power_iteration import _conv_start, _start

CONV = dict(input_size=(6, 5), stride=(1, 1), padding=(1, 1))
LARGE = 2**31 + 5  # elements: past int32 indices


def _workload(dtype):
    """Inputs of every op family, drawn on the CPU."""
    g = torch.Generator().manual_seed(11)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    x = 3 * randn(3 * 2**14 + 5)  # several blocks and a ragged tail
    dense = _start((40, 24), 2, 2, 12, dtype)
    conv = _conv_start(4, 3, 3, CONV["input_size"], CONV["stride"], CONV["padding"], 2, 2, 7, dtype)
    listed = [_start(shape, 2, 2, 13 + i, dtype) for i, shape in enumerate([(8, 5), (3, 17)])]
    return dict(x=x, beta=torch.tensor([0.4], dtype=dtype), grad=randn(x.numel()),
                w=randn(6, 500), eps=randn(6, 500), logdet=randn(6).to(torch.promote_types(dtype, torch.float32)),
                neumann=randn(6, 500), dense_w=dense[0], dense_u=dense[1], dense_v=dense[2], conv_w=conv[0],
                conv_u=conv[1], conv_v=conv[2], list_w0=listed[0][0], list_u0=listed[0][1], list_v0=listed[0][2],
                list_w1=listed[1][0], list_u1=listed[1][1], list_v1=listed[1][2],
                chain_w1=0.3 * randn(16, 6), chain_w2=0.3 * randn(6, 16), chain_slope=randn(5, 16).sigmoid(),
                chain_eps=randn(5, 6), block_x=randn(7, 3), block_eps=randn(7, 3), block_w1=0.3 * randn(12, 3),
                block_w2=0.3 * randn(3, 12), block_b1=randn(12), block_beta=randn(1))


def _run_all(t):
    """Every op family on the current stream, tolerances set (the conv op's stop flag is polled); the results."""
    y = ops.lipswish(t["x"], t["beta"])
    grad_x, grad_beta = ops.lipswish_backward(t["grad"], t["x"], t["beta"])
    dense = ops.power_iteration(t["dense_w"], t["dense_u"], t["dense_v"], 60, 1e-4, 1e-4)
    conv = ops.conv_power_iteration(t["conv_w"], t["conv_u"], t["conv_v"], *CONV.values(), 200, 1e-4, 1e-4)
    logdet, neumann = t["logdet"].clone(), t["neumann"].clone()
    ops.logdet_series_accumulate_(t["w"], t["eps"], logdet, neumann, 0.5, -1.5)
    us, vs = [t["list_u0"].clone(), t["list_u1"].clone()], [t["list_v0"].clone(), t["list_v1"].clone()]
    sigmas = [t["list_u0"].new_zeros(()), t["list_u1"].new_zeros(())]
    ops.power_iteration_update_([t["list_w0"], t["list_w1"]], us, vs, sigmas, 30, 1e-5, 1e-5)
    chain = ops.linearized_logdet_series(t["chain_eps"], [t["chain_w1"], t["chain_w2"]], [1] * 4, [0] * 4,
                                         [None, t["chain_slope"]], [1.0, -0.5, 1 / 3], [-1.0, 0.5, -1 / 3])
    weights, betas = [t["block_w1"], t["block_w2"]], [t["block_beta"], t["block_beta"]]
    block = dense_ops.dense_jacobian_forward(t["block_x"], t["block_eps"], weights, [t["block_b1"], None], betas,
                                             [1.0, -0.5, 1 / 3], [-1.0, 0.5, -1 / 3])
    seed = dense_ops.jacobian_series_backward(block[5][-1], t["block_eps"], [1.0, -0.5, 1 / 3],
                                              block[1].to(block[0].dtype), block[0])
    block_grads = dense_ops.dense_jacobian_backward(seed, weights, [t["block_b1"], None], betas, *block[4:])
    normalized, block_sigmas = dense_ops.lipschitz_normalize_(weights, [t["block_b1"], t["block_x"][0]],
                                                              [t["block_x"][1], t["block_b1"]], [0.5, 0.5],
                                                              [t["block_beta"][0].clone(), t["block_beta"][0].clone()])
    return [y, grad_x, grad_beta, *dense, *conv, logdet, neumann, *us, *vs, *sigmas, *chain, *block[:4],
            block_grads[0], *block_grads[1], *block_grads[3], *normalized, block_sigmas]


def test_ops_on_a_side_stream_match_the_default_stream(cuda):
    """Every op launched on the current stream: on a side stream kept busy (torch.cuda._sleep) before its
    inputs are written, an op that ran on another stream would read the NaNs they held before."""
    with cudnn_deterministic():  # the conv op's two runs sum in the same order
        source = {k: v.to(cuda) for k, v in _workload(torch.float32).items()}
        expected = [t.cpu() for t in _run_all(source)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            staged = {k: torch.full_like(v, float("nan")) for k, v in source.items()}
            torch.cuda._sleep(100_000_000)  # ~50 ms of the side stream
            for k, v in staged.items():
                v.copy_(source[k])
            results = _run_all(staged)
        side.synchronize()
    for i, (a, b) in enumerate(zip(results, expected)):
        # the same kernels on the same device and grid: equal
        assert torch.equal(a.cpu(), b), f"output {i}"


def test_ops_on_a_second_gpu_stay_there_and_match_the_first(cuda):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (torch.cuda.device_count() < 2)")
    inputs = _workload(torch.float64)
    with torch.cuda.device(0), cudnn_deterministic():  # on cuda:1 the ops must switch devices themselves
        first = _run_all({k: v.to("cuda:0") for k, v in inputs.items()})
        second = _run_all({k: v.to("cuda:1") for k, v in inputs.items()})
    for i, (a, b) in enumerate(zip(second, first)):
        assert a.device == torch.device("cuda:1"), f"output {i}"
        # equal on two GPUs of one model; another model may size the grids differently and so sum
        # grad_beta's blocks in another order: float64 rounding
        assert_close(a.cpu(), b.cpu(), **TOLERANCES[torch.float64], msg=lambda m: f"output {i}: {m}")


@pytest.mark.slow
def test_lipswish_past_two_to_the_31_elements(cuda):
    """Index math beyond int32: 2**31 + 5 float16 elements forward and backward, against the CPU op on
    slices at the start, across the middle (2**30) and across 2**31 to the end."""
    free, _ = torch.cuda.mem_get_info()
    if free < 20 * 2**30:
        pytest.skip(f"needs ~20 GiB of free GPU memory (three 4 GiB tensors and a 2 GiB mask at once), "
                    f"{free / 2**30:.1f} GiB free")
    n = LARGE
    slices = [(0, 2048), (n // 2 - 1024, n // 2 + 1024), (n - 2048, n)]
    x = torch.empty(n, dtype=torch.float16, device=cuda)
    x.uniform_(-8, 8, generator=torch.Generator(device=cuda).manual_seed(1))  # drawn there: 4 GiB
    beta = torch.tensor([0.3], dtype=torch.float16, device=cuda)
    half = TOLERANCES[torch.float16]  # both compute in float32 and round to float16 once: an ulp apart at most
    y = ops.lipswish(x, beta)
    assert torch.isfinite(y).all()
    for a, b in slices:
        assert_close(y[a:b].cpu(), ops.lipswish(x[a:b].cpu(), beta.cpu()), **half)
    del y
    # the upstream gradient is 0 outside the slices, so grad_beta sums over the slices only
    g = torch.Generator().manual_seed(2)
    grad = torch.zeros_like(x)
    for a, b in slices:
        grad[a:b] = torch.randn(b - a, generator=g).to(torch.float16)
    grad_x, grad_beta = ops.lipswish_backward(grad, x, beta)
    assert torch.isfinite(grad_x).all() and torch.isfinite(grad_beta).all()
    assert int(torch.count_nonzero(grad_x)) <= sum(b - a for a, b in slices)
    expected_beta = 0.0
    for a, b in slices:
        cpu_x, cpu_grad = x[a:b].cpu(), grad[a:b].cpu()
        assert_close(grad_x[a:b].cpu(), ops.lipswish_backward(cpu_grad, cpu_x, beta.cpu())[0], **half)
        expected_beta += float(ops.lipswish_backward(cpu_grad.float(), cpu_x.float(), beta.cpu().float())[1])
    # float16's rounding of the total (half an ulp, 2^-11 relative) dominates; the float32 terms, summed in
    # double on the GPU and per slice in float32 here, differ by < 1e-4
    assert_close(grad_beta.cpu().double(), torch.tensor([expected_beta], dtype=torch.float64), rtol=2**-10, atol=1e-3)


def test_conv_power_iteration_turns_tf32_off_inside(cuda):
    """With TF32 allowed globally, the float32 conv power iteration still runs in float32: its sigma and
    vectors equal the float64 CPU op's to float32 rounding (TF32's 10-bit mantissa would move the vectors
    by ~1e-3 of their largest entry), and the global settings are left as they were."""
    w, u, v = _conv_start(64, 64, 3, (16, 16), (1, 1), (1, 1), 2, 2, 21, torch.float64)
    geometry = ((16, 16), (1, 1), (1, 1), 30)
    expected = ops.conv_power_iteration(w, u, v, *geometry)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        got = ops.conv_power_iteration(*(t.float().to(cuda) for t in (w, u, v)), *geometry)
        torch.cuda.synchronize()
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    # float32 rounding: sigma a few 2^-24 off, the vectors a few 2^-24 of their largest entry (TF32: ~2^-11)
    assert_close(got[2].cpu().double(), expected[2], rtol=1e-5, atol=0)
    for a, b in zip(got[:2], expected[:2]):
        assert_close(a.cpu().double(), b, rtol=0, atol=1e-5 * float(b.abs().max()))


def test_conv_power_iteration_under_cuda_graph_capture_replays_the_eager_result(cuda):
    """With a tolerance the op polls a device flag on the host, which a capture cannot: while capturing it
    runs to the iteration limit, and the flag freezes u and v on the device once the test has passed, so
    a replay gives the eager result, also after new weights are copied into the captured input."""
    w, u, v = (t.to(cuda) for t in _conv_start(4, 3, 3, CONV["input_size"], CONV["stride"], CONV["padding"], 2, 2,
                                               7))
    args = (*CONV.values(), 200, 1e-4, 1e-4)
    with cudnn_deterministic():  # eager and captured convolutions sum in the same order
        eager = ops.conv_power_iteration(w, u, v, *args)
        assert 0 < int(eager[3]) < 200  # the tolerance ends it early
        side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graph's documentation asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                ops.conv_power_iteration(w, u, v, *args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = ops.conv_power_iteration(w, u, v, *args)
        for scale in (1.0, 1.5):
            with torch.no_grad():
                w.mul_(scale)
            graph.replay()
            torch.cuda.synchronize()
            expected = eager if scale == 1.0 else ops.conv_power_iteration(w, u, v, *args)
            for i, (a, b) in enumerate(zip(captured, expected)):
                assert torch.equal(a, b), f"scale {scale}, output {i}"


def test_power_iteration_update_runs_a_list_in_one_launch_and_matches_the_cpu(cuda):
    """update_lipschitz's op on small float32 matrices of several shapes: one launch of the single-block
    kernel for all of them (counted by the profiler where it sees kernels), the CPU op's results."""
    starts = [_start(shape, 2, 2, 30 + i) for i, shape in enumerate([(8, 5), (3, 40), (16, 16), (1, 7), (33, 2)])]

    def run(device):
        us = [u.to(device) for _, u, _ in starts]
        vs = [v.to(device) for _, _, v in starts]
        sigmas = [torch.zeros((), device=device) for _ in starts]
        ops.power_iteration_update_([w.to(device) for w, _, _ in starts], us, vs, sigmas, 25)
        return us, vs, sigmas

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        got = run(cuda)
        torch.cuda.synchronize()
    kernels = [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if kernels:  # no kernel events where the profiler cannot trace the GPU (CUPTI missing)
        assert sum("power_iteration_list_kernel" in k for k in kernels) == 1, kernels
        assert not any("power_iteration_kernel" in k for k in kernels), kernels  # the batch kernel: one per layer
    for ours, theirs in zip(got, run("cpu")):
        for a, b in zip(ours, theirs):
            # 25 fixed steps (no stopping test to tip over) in float32 on both sides: two roundings apart;
            # atol 10 rtol for unit-vector components near 0, which rounding moves most
            tol = dict(TOLERANCES[torch.float32])
            tol["atol"] = 10 * tol["rtol"]
            assert_close(a.cpu(), b, **tol)


def test_fused_dense_block_step_on_cuda_matches_the_cpu(cuda, probes_drawn_on_cpu):
    """A small iResBlock's training step on the fused dense block (normalize, forward-mode stack, series,
    backward) on the GPU against the same step on the CPU, with the same draws."""
    import copy

    import numpy as np

    from resflow_cuda.nn import InducedNormLinear, LipSwish, iResBlock

    net = torch.nn.Sequential(LipSwish(), InducedNormLinear(2, 32, coeff=0.9, n_iterations=2), LipSwish(),
                              InducedNormLinear(32, 2, coeff=0.9, n_iterations=2))
    blocks = {"cpu": iResBlock(net, neumann_grad=True, grad_in_forward=True).double()}
    blocks[cuda] = copy.deepcopy(blocks["cpu"]).to(cuda)
    x = torch.randn(300, 2, dtype=torch.float64)
    results = {}
    for device, block in blocks.items():
        np.random.seed(0)
        torch.manual_seed(1)
        x_in = x.to(device).requires_grad_(True)
        y, logp = block(x_in, torch.zeros(300, 1, dtype=torch.float64, device=device))
        (y.square().sum() + logp.sum()).backward()
        results[device] = [t.detach().cpu() for t in (y, logp, x_in.grad, *[p.grad for p in block.nnet.parameters()],
                                                      *block.nnet.buffers())]
    for a, b in zip(results[cuda], results["cpu"]):
        assert_close(a, b, rtol=1e-10, atol=1e-12)  # float64: summation order only
