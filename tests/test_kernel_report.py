"""benchmarks/kernel_report.py: occupancy arithmetic, ptxas / SASS parsing, and the budget check on
kernels compiled here with nvcc (a clean one passes, one with a large local array fails)."""

from __future__ import annotations

import shutil

import pytest

from resflow_cuda.benchmarks import kernel_report as kr


def test_occupancy_follows_the_documented_per_sm_limits():
    # 256 threads = 8 warps; 32 registers = 1024 per warp: 64 warps fit, 8 blocks, full occupancy
    assert kr.occupancy("80", 256, 32, 0) == {"blocks_per_sm": 8, "limited_by": "warps", "occupancy": 1.0}
    # 64 registers = 2048 per warp: 32 warps, 4 blocks of 8 warps, half the SM
    assert kr.occupancy("80", 256, 64, 0) == {"blocks_per_sm": 4, "limited_by": "registers", "occupancy": 0.5}
    # 40 registers round up to 1280 per warp: 51 warps, 6 blocks of 8
    assert kr.occupancy("90", 256, 40, 0)["blocks_per_sm"] == 6
    # 48 KiB + the reserved 1 KiB per block: 3 blocks in sm_80's 164 KiB, 4 in sm_90's 228 KiB
    assert kr.occupancy("80", 256, 32, 48 * 1024) == {"blocks_per_sm": 3, "limited_by": "shared memory",
                                                      "occupancy": 0.375}
    assert kr.occupancy("90", 256, 32, 48 * 1024)["blocks_per_sm"] == 4
    # small blocks hit the 32-blocks-per-SM cap: 32 x 1 warp = half the warps
    assert kr.occupancy("90", 32, 16, 0) == {"blocks_per_sm": 32, "limited_by": "blocks", "occupancy": 0.5}


def test_ptxas_and_sass_parsers_read_the_tool_formats():
    log = """ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'
ptxas info    : Function properties for _Z1kPf
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 372 bytes cmem[0]
ptxas info    : Compiling entry function '_Z1gv' for 'sm_90'
ptxas info    : Function properties for _Z1gv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers, 356 bytes cmem[0]
"""
    facts = kr.parse_ptxas(log)
    assert facts["_Z1kPf"] == {"registers": 40, "barriers": 1, "static_shared_bytes": 2048, "stack_frame_bytes": 16,
                               "spill_store_bytes": 8, "spill_load_bytes": 4}
    assert facts["_Z1gv"]["registers"] == 8 and facts["_Z1gv"]["static_shared_bytes"] == 0
    sass = """		Function : _Z1kPf
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128.CONSTANT R8, [R2.64] ;
        /*0020*/                   LDG.E.U16 R9, [R2.64] ;
        /*0030*/                   STL [R1], R8 ;
        /*0040*/                   STG.E.64 [R4.64], R8 ;
        /*0050*/              @!P0 BRA 0x10 ;
        /*0060*/                   BRA 0x0 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
"""
    assert kr.parse_sass(sass)["_Z1kPf"] == {"global_load_bits": [16, 128], "global_store_bits": [64],
                                             "local_memory_instructions": 1, "loops": 2,
                                             "inner_loop_instructions": 5}


SPILLING = r"""
__global__ void clean_kernel(const float4* __restrict__ x, float4* __restrict__ y, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    float4 v = x[i];
    v.x *= 2.f;
    y[i] = v;
  }
}
// a large per-thread array indexed at run time cannot live in registers: local memory
__global__ void local_array_kernel(const float* __restrict__ x, float* __restrict__ y, int n) {
  float scratch[1024];
  for (int i = 0; i < 1024; ++i) scratch[i] = x[(i * 7 + threadIdx.x) % n];
  float s = 0.f;
  for (int i = 0; i < n; ++i) s += scratch[(i * 13) % 1024];
  y[threadIdx.x] = s;
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None or kr.find_cuobjdump() is None,
                    reason="needs nvcc on PATH and cuobjdump + nvdisasm (the kernel-report extra: "
                           "pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
def test_budget_check_fails_on_a_kernel_with_local_memory(tmp_path):
    source = tmp_path / "probe.cu"
    source.write_text(SPILLING)
    cubin, log = kr.compile_cubin(source, "80", tmp_path, ["-O3"])
    kernels = kr.analyse(cubin, "80", log, kr.find_cuobjdump(), plans=[])
    by_name = {k["name"].split("(")[0]: k for k in kernels}
    assert set(by_name) == {"clean_kernel", "local_array_kernel"}
    bad, good = by_name["local_array_kernel"], by_name["clean_kernel"]
    assert bad["stack_frame_bytes"] >= 4096 and bad["local_memory_instructions"] > 0
    assert good["stack_frame_bytes"] == 0 and good["local_memory_instructions"] == 0
    assert good["global_load_bits"] == [128] and good["global_store_bits"] == [128]
    assert good["inner_loop_instructions"] is not None and good["inner_loop_instructions"] < 30
    failures = kr.check_budgets(kernels)
    assert failures == ["local_array_kernel(float const*, float*, int) (sm_80): no local memory (stack frame 0, "
                        "no LDL/STL)"]
    assert good["budgets"] == {"no register spills": True, "no local memory (stack frame 0, no LDL/STL)": True}


def test_launch_plans_come_from_the_launchers(tmp_path):
    plans = kr.launch_plans(tmp_path)
    by = {(p["arch"], p["kernel"], p["size"]): p for p in plans}
    # elementwise: 16-byte packs of 4 floats, 256 threads, enough blocks for the packs, at most the 6
    # per SM the float32 kernels are compiled for (__launch_bounds__(256, 6))
    p = by[("sm_90", "lipswish_forward_kernel", "256x1024")]
    assert (p["vec"], p["threads"], p["blocks"]) == (4, 256, 256)
    assert by[("sm_80", "lipswish_forward_kernel", "4096x4096")]["blocks"] == 6 * 108
    # the 512x512 and 3072x128 matrices fit the single-launch kernel's shared memory in float32
    assert by[("sm_80", "power_iteration_kernel", "512x512")]["fits"]
    assert by[("sm_80", "power_iteration_kernel", "3072x128")]["dynamic_shared_bytes"] == (3072 + 128 + 3072) * 4
