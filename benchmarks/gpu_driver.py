"""Launches every op of resflow_cuda once on small tensors, for compute-sanitizer (gpu_check).

    python -m benchmarks.gpu_driver                 # CUDA: every kernel instantiation once, then "OK"
    python -m benchmarks.gpu_driver --device cpu    # the same calls on the CPU kernels (a smoke test)
    python -m benchmarks.gpu_driver --info          # build_info(), torch, CUDA, the device and the driver

Every dtype (float32, float64, float16, bfloat16) of the elementwise and series ops, each with
inputs whose rows are aligned for the widest vector loads and with misaligned ones (the scalar
kernels); power iteration on small matrices (the single-launch kernel), on a matrix too large for
shared memory (ATen products with the grid-wide dual-map and stopping-test kernels) and on
convolutions, for several p -> q norms with and without a tolerance; the many-matrix update; the
log-det series with narrow (2 columns) and wide rows; the two linearized ops on a small MLP and a
small convolutional branch; one training step of an iResBlock; and the fused dense block's ops (both
estimators, chunked series, more layers than one launch takes). Each output is checked to be
finite. The first line after CUDA is initialised is ``gpu_driver: start``, the last
``gpu_driver: OK``: gpu_check tells a sanitizer that refused the device from a failing kernel by them.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys

import torch

import resflow_cuda
from resflow_cuda import ops

from .gpu_check import DRIVER_OK, DRIVER_START
from .gpu_stages import FACTS_PREFIX

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INF = float("inf")


def _finite(*tensors) -> None:
    for t in tensors:
        if isinstance(t, (list, tuple)):
            _finite(*t)
        elif isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            if not bool(torch.isfinite(t).all()):
                raise RuntimeError(f"non-finite output of shape {list(t.shape)} and dtype {t.dtype}")


def _aligned_and_not(n: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A contiguous vector of n elements (vector loads) and one starting one element later (scalar)."""
    base = torch.randn(n + 1, device=device).to(dtype)
    return {"aligned": base[:n], "misaligned": base[1:]}


def lipswish_ops(device: str, log) -> None:
    """The four LipSwish ops in every dtype, aligned and misaligned; 40000 elements span several
    blocks, so beta's gradient goes through the cross-block sum."""
    for dtype in DTYPES:
        beta = torch.tensor([0.3], device=device, dtype=dtype)
        for layout, x in _aligned_and_not(40000, device, dtype).items():
            grad, gg_x = torch.randn_like(x), torch.randn_like(x)
            y = ops.lipswish(x, beta)
            y2, dydx = ops.lipswish_with_derivative(x, beta)
            gx, gb = ops.lipswish_backward(grad, x, beta)
            dd = ops.lipswish_double_backward(grad, gg_x, torch.ones_like(beta), x, beta)
            _finite(y, y2, dydx, gx, gb, dd)
            log(f"lipswish ops {dtype} {layout}")


def power_iteration_ops(device: str, log) -> None:
    """Dense power iteration on small matrices (one launch) and on a matrix too large for shared
    memory (8192 x 64: ATen products and the grid-wide kernels), a batch, convolutions with stride
    1 and 2, and the many-matrix update, in float32 and float64, for (2, 2), (1, 2), (2, inf) and
    (3, 1.5) norms, with and without a tolerance."""
    for dtype in (torch.float32, torch.float64):
        for m, n in ((24, 40), (8192, 64)):
            w = torch.randn(m, n, device=device, dtype=dtype)
            for domain, codomain in ((2, 2), (1, 2), (2, INF), (3, 1.5)):
                for tol in (None, 1e-4):
                    u, v = torch.randn(m, device=device, dtype=dtype), torch.randn(n, device=device, dtype=dtype)
                    _finite(ops.power_iteration(w, u, v, 8, tol, tol, domain, codomain, u_first=tol is None))
            log(f"power_iteration {dtype} {m}x{n}")
        w = torch.randn(3, 16, 12, device=device, dtype=dtype)
        _finite(ops.power_iteration(w, torch.randn(3, 16, device=device, dtype=dtype),
                                    torch.randn(3, 12, device=device, dtype=dtype), 5, 1e-3, 1e-3))
        for stride in (1, 2):
            w = torch.randn(8, 4, 3, 3, device=device, dtype=dtype)
            size = 8 if stride == 1 else 9  # (size + 2 - 3) divisible by the stride
            out = (size - 1) // stride + 1
            u = torch.randn(8 * out * out, device=device, dtype=dtype)
            v = torch.randn(4 * size * size, device=device, dtype=dtype)
            for domain, codomain in ((2, 2), (3, 1.5)):
                _finite(ops.conv_power_iteration(w, u, v, (size, size), (stride, stride), (1, 1), 6, 1e-4, 1e-4,
                                                 domain, codomain))
            log(f"conv_power_iteration {dtype} stride {stride}")
        shapes = ((16, 8), (5, 33), (4096, 8))
        weights = [torch.randn(m, n, device=device, dtype=dtype) for m, n in shapes]
        us = [torch.randn(m, device=device, dtype=dtype) for m, _ in shapes]
        vs = [torch.randn(n, device=device, dtype=dtype) for _, n in shapes]
        sigmas = [torch.zeros(1, device=device, dtype=dtype) for _ in shapes]
        ops.power_iteration_update_(weights, us, vs, sigmas, 5, 1e-3, 1e-3)
        _finite(us, vs, sigmas)
        log(f"power_iteration_update_ {dtype}")
    w = torch.randn(20, 12, device=device, dtype=torch.float16)
    _finite(ops.power_iteration(w, torch.randn(20, device=device).half(), torch.randn(12, device=device).half(), 5))
    log("power_iteration float16 (computed in float32)")


def series_ops(device: str, log) -> None:
    """logdet_series_accumulate_ in every dtype, with and without the Neumann accumulator, and with a
    scale (w scaled in place): narrow rows (2 columns), wide rows (vector loads) and a channels_last
    batch of 75 elements per sample (rows no vector width divides: the scalar kernels)."""
    for dtype in DTYPES:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        cases = {"narrow": torch.randn(64, 2, device=device).to(dtype),
                 "wide": torch.randn(8, 4096, device=device).to(dtype),
                 "channels_last": torch.randn(4, 3, 5, 5, device=device).to(dtype)
                 .contiguous(memory_format=torch.channels_last)}
        for layout, w in cases.items():
            eps = torch.randn_like(w)
            logdet = torch.zeros(w.shape[0], device=device, dtype=acc)
            ops.logdet_series_accumulate_(w, eps, logdet, None, 0.5, 0.0)
            neumann = torch.zeros_like(w)
            ops.logdet_series_accumulate_(w, eps, logdet, neumann, -0.25, 1.0)
            scaled = w.clone()
            ops.logdet_series_accumulate_(scaled, eps, logdet, neumann, 0.5, -1.0, eps)
            torch.testing.assert_close(scaled, w * eps)  # one rounding of the same product
            _finite(logdet, neumann)
            log(f"logdet_series_accumulate_ {dtype} {layout}")


def _branches(device: str) -> dict:
    from torch import nn

    from resflow_cuda.nn import InducedNormConv2d, InducedNormLinear, LipSwish

    torch.manual_seed(0)
    mlp = nn.Sequential(LipSwish(), InducedNormLinear(4, 16, coeff=0.9, n_iterations=5), LipSwish(),
                        InducedNormLinear(16, 4, coeff=0.9, n_iterations=5))
    conv = nn.Sequential(LipSwish(), InducedNormConv2d(3, 8, 3, 1, 1, coeff=0.9, n_iterations=5), LipSwish(),
                         InducedNormConv2d(8, 3, 3, 1, 1, coeff=0.9, n_iterations=5))
    return {"mlp": (mlp.to(device), torch.randn(6, 4, device=device)),
            "conv": (conv.to(device), torch.randn(2, 3, 6, 6, device=device))}


def linearized_ops(device: str, log) -> None:
    """linearized_logdet_series (with and without the surrogate) and linearized_neumann_gradient
    on a small LipSwish MLP and a small convolutional branch, then one training step of an
    iResBlock (Neumann estimator, backward-in-forward) and update_lipschitz."""
    from resflow_cuda.linearize import linearize
    from resflow_cuda.nn import iResBlock

    branches = _branches(device)
    for name, (net, x) in branches.items():
        _, source = linearize(net)(x)
        eps = torch.randn_like(x)
        with torch.no_grad():
            for surrogate in (True, False):
                _finite(ops.linearized_logdet_series(eps, source._weights, source._strides, source._paddings,
                                                     source.cache.slopes, [1.0, -0.5, 0.25], [1.0, 1.0, 0.5],
                                                     surrogate))
            _finite(ops.linearized_neumann_gradient(torch.randn_like(x), eps, *source._gradient_args()))
        log(f"linearized ops {name}")
    net, x = branches["mlp"]
    block = iResBlock(net, n_dist="poisson", n_exact_terms=2, grad_in_forward=True, logdet_estimate=True).to(device)
    y, logp = block(x.requires_grad_(), torch.zeros(x.shape[0], 1, device=device))
    (-logp.mean() + y.square().mean()).backward()
    resflow_cuda.update_lipschitz(block)
    _finite(y, logp, x.grad, [p.grad for p in block.parameters() if p.grad is not None])
    log("iResBlock training step")


def dense_block_ops(device: str, log) -> None:
    """The fused dense block's ops in float32 and float64: its forward with 40 terms (two launches of the
    chunked series kernel) and both backward seeds (the Neumann surrogate's and the basic estimator's),
    a 300-sample batch (several blocks of the thread-per-sample kernels), the normalization of 18 layers
    (two launches of 16) and its backward; then one training step of an iResBlock on the basic
    estimator."""
    from resflow_cuda import dense_ops
    from resflow_cuda.nn import iResBlock

    for dtype in (torch.float32, torch.float64):
        def randn(*shape):
            return torch.randn(*shape, device=device, dtype=dtype)

        x, eps = randn(300, 3), randn(300, 3)
        weights = [0.3 * randn(16, 3), 0.3 * randn(16, 16), 0.3 * randn(3, 16)]
        biases, betas = [randn(16), None, randn(3)], [randn(1), randn(1), None]
        coeffs = [(-1) ** k / (k + 1) for k in range(40)]
        out = dense_ops.dense_jacobian_forward(x, eps, weights, biases, betas, coeffs, coeffs)
        seed = torch.cat([out[0], out[3]])
        _finite(out, dense_ops.dense_jacobian_backward(seed, weights, biases, betas, *out[4:]))
        basic = dense_ops.dense_jacobian_forward(x, eps, weights, biases, betas, coeffs, [])
        seed = dense_ops.jacobian_series_backward(basic[5][-1], eps, coeffs, randn(300), randn(300, 3))
        _finite(basic, seed, dense_ops.dense_jacobian_backward(seed, weights, biases, betas, *basic[4:]))
        layers = [randn(5 + i, 7) for i in range(18)]
        us, vs = [randn(w.shape[0]) for w in layers], [randn(7) for _ in layers]
        scales = [torch.zeros((), device=device, dtype=dtype) for _ in layers]
        normalized, sigmas = dense_ops.lipschitz_normalize_(layers, us, vs, scales, [0.5] * 18)
        _finite(normalized, sigmas, dense_ops.lipschitz_normalize_backward(
            [torch.ones_like(w) for w in layers], layers, us, vs, sigmas, [0.5] * 18, [False, True] * 9))
        log(f"fused dense block ops {dtype}")
    net, x = _branches(device)["mlp"]
    block = iResBlock(net, neumann_grad=False, grad_in_forward=False).to(device)
    y, logp = block(x.requires_grad_(), torch.zeros(x.shape[0], 1, device=device))
    (-logp.mean() + y.square().mean()).backward()
    _finite(y, logp, x.grad, [p.grad for p in block.parameters() if p.grad is not None])
    log("iResBlock training step (basic estimator, fused dense block)")


def run(device: str) -> int:
    """Every group of ops once on ``device``; returns the number of groups run."""
    steps = []

    def log(text: str) -> None:
        steps.append(text)
        print(f"  {text}", flush=True)

    for group in (lipswish_ops, power_iteration_ops, series_ops, linearized_ops, dense_block_ops):
        group(device, log)
    if device == "cuda":
        torch.cuda.synchronize()
    return len(steps)


def _driver_version() -> dict:
    info = {}
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            info["driver_cuda_version"] = f"{version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if smi.returncode == 0 and smi.stdout.strip():
            info["driver"] = smi.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def info() -> dict:
    """build_info(), torch and CUDA versions, and (with a GPU) the device and the driver."""
    facts = {"build_info": resflow_cuda.build_info(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "cuda_available": torch.cuda.is_available(), "has_cuda_kernels": resflow_cuda.has_cuda_kernels()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                     memory_gib=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count(),
                     cuda_runtime=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    facts.update(_driver_version())
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--info", action="store_true", help="print build_info() and the device, launch nothing")
    args = parser.parse_args(argv)
    if args.info:
        facts = info()
        print(json.dumps(facts, indent=2))
        print(FACTS_PREFIX + json.dumps({k: v for k, v in facts.items() if k != "build_info"}))
        return 0
    if args.device == "cuda":
        if not (torch.cuda.is_available() and resflow_cuda.has_cuda_kernels()):
            print(f"gpu_driver: needs a GPU and the CUDA kernels (cuda available: {torch.cuda.is_available()}, "
                  f"build_info: {resflow_cuda.build_info()})", flush=True)
            return 2
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()  # the CUDA context exists: a sanitizer that refuses the device has said so
    print(f"{DRIVER_START} on {args.device}", flush=True)
    steps = run(args.device)
    print(FACTS_PREFIX + json.dumps({"op_groups": steps}))
    print(f"{DRIVER_OK} ({steps} op groups on {args.device})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
