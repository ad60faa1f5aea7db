"""Predicted best times on GPUs nobody here can time: a case's bytes and FLOPs (the counts the CPU
floor columns use) at the datasheet memory bandwidth and FP32 rate.

The FP32 rate is that of the CUDA cores, not TF32 tensor cores: every case computes in float32
and is checked against float32 results to ~1e-4, which TF32's 10-bit mantissa does not meet (and
PyTorch's matmuls default to full FP32). A row's predicted floor is max(bytes / bandwidth,
FLOPs / rate), a bound no implementation can beat on that GPU at those clocks.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    bandwidth_gbps: float  # HBM, GB/s
    fp32_tflops: float  # non-tensor FP32, dense
    source: str
    match: tuple  # substrings of torch.cuda.get_device_name() that identify it


GPUS = (
    Gpu("H100 SXM", 3350.0, 67.0,
        "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM: 3.35 TB/s HBM3, 67 TFLOPS FP32)",
        ("H100 80GB HBM3", "H100 SXM")),
    Gpu("A100 SXM 80GB", 2039.0, 19.5,
        "NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM: 2,039 GB/s HBM2e, 19.5 TFLOPS FP32)",
        ("A100-SXM4-80GB", "A100 80GB SXM")),
)


def predicted_seconds(gpu: Gpu, bytes_moved: float, flops: float) -> float:
    return max(bytes_moved / (gpu.bandwidth_gbps * 1e9), flops / (gpu.fp32_tflops * 1e12))


def present(device_name: str) -> Gpu | None:
    """The datasheet entry for the GPU this run is on, if it is one of GPUS."""
    return next((g for g in GPUS if any(m in device_name for m in g.match)), None)
