"""Compiler settings shared by setup.py and benchmarks/kernel_report.py, which compiles the same
CUDA sources with the same nvcc flags to report what ptxas made of every kernel."""

# A distributable build (setup.py's default when TORCH_CUDA_ARCH_LIST is unset): SASS for Turing (7.5,
# the oldest arch CUDA 13 compiles: T4), Ampere (8.0 A100, 8.6 RTX 30xx / A10 / A40), Ada (8.9 L4 / L40 /
# RTX 40xx) and Hopper (9.0), plus PTX of 9.0 that newer GPUs JIT-compile. For a quick local build set
# TORCH_CUDA_ARCH_LIST to your GPU's arch (or RESFLOW_CUDA_ARCH=native).
DEFAULT_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0+PTX"


def nvcc_flags(debug: bool = False) -> list[str]:
    """Our nvcc flags (torch.utils.cpp_extension adds its COMMON_NVCC_FLAGS and the arch flags)."""
    flags = ["-O0", "-G"] if debug else ["-O3"]
    # -lineinfo maps profiler output to source lines; --threads compiles the arches in parallel.
    flags += ["-lineinfo", "--threads=2", "-DRESFLOW_WITH_CUDA"]
    return flags
