"""The extension's build information and loading."""

from __future__ import annotations

import torch

import resflow_cuda


def test_build_info_describes_this_build():
    info = resflow_cuda.build_info()
    assert info["torch_version"] == torch.__version__ == info["torch_runtime"]
    assert info["version"] == resflow_cuda.__version__
    assert info["cuda"] == resflow_cuda.has_cuda_kernels()
    assert info["cpu_capability"] in info["cpu_capabilities"]
    assert info["cpu_capabilities"][0] == "default"
    if info["cuda"]:
        major, minor = (int(v) for v in info["cuda_version"].split("."))
        assert resflow_cuda.ops.cuda_version() == major * 1000 + minor * 10
        assert info["cuda_arch_list"] and info["no_cuda_reason"] == ""
    else:
        assert info["cuda_version"] is None and resflow_cuda.ops.cuda_version() == -1
        assert info["cuda_arch_list"] == [] and info["no_cuda_reason"]


KERNEL_OPS = ["lipswish", "lipswish_with_derivative", "lipswish_backward", "lipswish_double_backward",
              "power_iteration", "conv_power_iteration", "power_iteration_update_"]


def test_every_op_has_cpu_cuda_fake_and_autograd_kernels():
    for name in KERNEL_OPS:
        qualified = f"resflow_cuda::{name}"
        keys = ("CPU", "CUDA", "Meta") + (() if name.endswith("_") else ("Autograd",))  # in-place: no autograd
        for key in keys:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key), (qualified, key)
