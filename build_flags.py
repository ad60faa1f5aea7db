"""Compiler settings shared by setup.py and benchmarks/kernel_report.py, which compiles the same
CUDA sources with the same nvcc flags to report what ptxas made of every kernel."""

# Ampere and Hopper SASS plus PTX for newer GPUs to JIT: two arches keep a 2-core build near a minute.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def nvcc_flags(debug: bool = False) -> list[str]:
    """Our nvcc flags (torch.utils.cpp_extension adds its COMMON_NVCC_FLAGS and the arch flags)."""
    flags = ["-O0", "-G"] if debug else ["-O3"]
    # -lineinfo maps profiler output to source lines; --threads compiles the arches in parallel.
    flags += ["-lineinfo", "--threads=2", "-DRESFLOW_WITH_CUDA"]
    return flags
