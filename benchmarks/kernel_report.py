"""What the compiler made of every CUDA kernel, and whether it meets its budget.

    python -m benchmarks.kernel_report [--out build/kernel-report] [--archs 80 90]

Run from the source tree with a CUDA build of torch installed (for its headers) and nvcc on PATH.
Compiles every csrc/cuda/*.cu for each arch to a cubin with the real build's nvcc flags
(build_flags.nvcc_flags plus torch.utils.cpp_extension's) and ``-Xptxas -v``, then reports per
kernel instantiation and arch:

- from ptxas: registers per thread, spill stores/loads, stack frame, static shared memory, barriers;
- from the SASS (``cuobjdump -sass``; the ``nvidia-cuda-cuobjdump`` wheel or a toolkit's): the widths
  of global loads and stores (LDG.E.128 = 128 bits), local-memory instructions (LDL/STL), and the
  instruction count of the innermost loop (the shortest span closed by a backward branch);
- the launch configuration our launchers pick at the benchmark sizes (benchmarks/kernel_plans.cpp,
  built against the same plan functions) and the theoretical occupancy that follows from the
  per-arch limits below.

Writes kernel-report.json and kernel-report.md into --out and exits 1 when a kernel breaks a
budget (BUDGETS), so CI fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from . import build_flags

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


@dataclasses.dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits from the CUDA C++ Programming Guide, "Technical Specifications per Compute
    Capability" (8.0 and 9.0), used for theoretical occupancy."""

    max_threads: int = 2048
    max_blocks: int = 32
    max_warps: int = 64
    registers: int = 65536
    register_unit: int = 256  # registers are allocated per warp in units of 256
    shared_bytes: int = 0  # shared memory per SM
    reserved_shared_per_block: int = 1024  # the system's 1 KB per block (8.x, 9.0)


LIMITS = {"80": ArchLimits(shared_bytes=164 * 1024), "90": ArchLimits(shared_bytes=228 * 1024)}


def occupancy(arch: str, threads: int, registers: int, shared_bytes: int) -> dict:
    """Theoretical occupancy of a block size: resident blocks per SM as limited by threads, warps,
    registers and shared memory, and the fraction of the SM's warps they fill."""
    lim = LIMITS[arch]
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(registers, 1) * 32 / lim.register_unit) * lim.register_unit
    by = {
        "blocks": lim.max_blocks,
        "warps": lim.max_warps // warps,
        "registers": (lim.registers // regs_per_warp) // warps,
        "shared memory": lim.shared_bytes // (shared_bytes + lim.reserved_shared_per_block),
    }
    blocks = min(by.values())
    return {"blocks_per_sm": blocks, "limited_by": min(by, key=by.get), "occupancy": blocks * warps / lim.max_warps}


# --------------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------------

def find_cuobjdump() -> str | None:
    """cuobjdump on PATH, else the one the nvidia-cuda-cuobjdump wheel puts in site-packages (its
    -sass needs nvdisasm: on PATH or beside it, from the nvidia-cuda-nvdisasm wheel)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    for entry in sys.path:
        for candidate in sorted(Path(entry).glob("nvidia/cu*/bin/cuobjdump")) if entry else []:
            if os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def demangle(names: list[str]) -> dict[str, str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def build_nvcc_flags() -> list[str]:
    """The flags torch.utils.cpp_extension's BuildExtension gives nvcc for our .cu files."""
    import torch
    from torch.utils import cpp_extension

    flags = [f for f in build_flags().nvcc_flags() if not f.startswith("--threads")]
    flags += cpp_extension.COMMON_NVCC_FLAGS + ["-std=c++20", "-DTORCH_API_INCLUDE_EXTENSION_H",
                                                "-DTORCH_EXTENSION_NAME=_C",
                                                f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    includes = [str(CSRC / "include"), str(CSRC)] + cpp_extension.include_paths("cpu")
    return flags + [f"-I{p}" for p in includes]


def compile_cubin(source: Path, arch: str, out_dir: Path, flags: list[str]) -> tuple[Path, str]:
    """nvcc -cubin for one arch with ptxas's verbose report; returns the cubin and that report."""
    cubin = out_dir / f"{source.stem}.sm_{arch}.cubin"
    cmd = ["nvcc", "-cubin", f"-arch=sm_{arch}", "-Xptxas=-v", *flags, str(source), "-o", str(cubin)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source.name} for sm_{arch}:\n{result.stderr[-4000:]}")
    return cubin, result.stderr


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)a?'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:.*?, (\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, dict]:
    """ptxas -v lines per entry function (mangled name)."""
    kernels: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = kernels.setdefault(m.group(1), {"registers": 0, "barriers": 0, "static_shared_bytes": 0,
                                                      "stack_frame_bytes": 0, "spill_store_bytes": 0,
                                                      "spill_load_bytes": 0})
        elif current is not None and (m := _PROPS.search(line)):
            current.update(stack_frame_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)),
                           spill_load_bytes=int(m.group(3)))
        elif current is not None and (m := _USED.search(line)):
            current.update(registers=int(m.group(1)), barriers=int(m.group(2) or 0),
                           static_shared_bytes=int(m.group(3) or 0))
    return kernels


_FUNCTION = re.compile(r"^\s*Function : (\S+)")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_WIDTH = {"8": 8, "U8": 8, "S8": 8, "16": 16, "U16": 16, "S16": 16, "64": 64, "128": 128}


def _access_width(opcode: str) -> int:
    """Bits of an LDG/STG: LDG.E = 32, LDG.E.64, LDG.E.128, LDG.E.U16 ... (other modifiers ignored)."""
    widths = [_WIDTH[part] for part in opcode.split(".")[1:] if part in _WIDTH]
    return widths[0] if widths else 32


def parse_sass(text: str) -> dict[str, dict]:
    """Per function of a ``cuobjdump -sass`` listing: global load/store widths (bits), local
    memory instructions, and the innermost loop's instruction count (None without a loop)."""
    functions: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in text.splitlines():
        if m := _FUNCTION.match(line):
            current = functions.setdefault(m.group(1), [])
        elif current is not None and (m := _INSTRUCTION.match(line)):
            current.append((int(m.group(1), 16), m.group(2)))
    facts = {}
    for name, code in functions.items():
        loads, stores, local, loops = set(), set(), 0, []
        for address, text_ in code:
            body = re.sub(r"^@!?U?P\w+\s+", "", text_)
            opcode = body.split()[0] if body else ""
            if opcode.startswith("LDG"):
                loads.add(_access_width(opcode))
            elif opcode.startswith("STG"):
                stores.add(_access_width(opcode))
            elif opcode.startswith(("LDL", "STL")):
                local += 1
            if opcode == "BRA" and (target := re.search(r"0x([0-9a-f]+)", body)):
                target_address = int(target.group(1), 16)
                if target_address < address:  # a backward branch closes a loop
                    loops.append(sum(1 for a, _ in code if target_address <= a <= address))
        facts[name] = {"global_load_bits": sorted(loads), "global_store_bits": sorted(stores),
                       "local_memory_instructions": local, "loops": len(loops),
                       "inner_loop_instructions": min(loops) if loops else None}
    return facts


# --------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Budget:
    text: str
    applies: object  # kernel record -> bool
    holds: object  # kernel record -> bool


def _base(k: dict) -> str:
    return k["name"].split("<")[0].split("(")[0].split("::")[-1]


def _template_args(k: dict) -> list[str]:
    inner = k["name"][k["name"].find("<") + 1:k["name"].rfind(">")] if "<" in k["name"] else ""
    return [a.strip() for a in inner.split(",")]


def _wide(k: dict) -> bool:
    """An instantiation with 16-byte packs: VEC (the third template argument) * sizeof(scalar) = 16."""
    args = _template_args(k)
    size = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2}.get(args[0]) if args else None
    return len(args) >= 3 and size is not None and args[2].isdigit() and int(args[2]) * size == 16


_ELEMENTWISE = ("lipswish_forward_kernel", "lipswish_backward_kernel", "lipswish_double_backward_kernel")

BUDGETS = (
    Budget("no register spills", lambda k: True, lambda k: k["spill_store_bytes"] == 0 and k["spill_load_bytes"] == 0),
    Budget("no local memory (stack frame 0, no LDL/STL)", lambda k: True,
           lambda k: k["stack_frame_bytes"] == 0 and k["local_memory_instructions"] == 0),
    Budget("128-bit global loads (16-byte packs)",
           lambda k: _base(k) in _ELEMENTWISE + ("logdet_series_kernel",) and _wide(k),
           lambda k: 128 in k["global_load_bits"]),
    Budget("128-bit global stores of the output vectors",
           lambda k: _wide(k) and (_base(k) in _ELEMENTWISE or
                                   (_base(k) == "logdet_series_kernel" and "true" in _template_args(k)[3:5])),
           lambda k: 128 in k["global_store_bits"]),
    Budget(">= 75% theoretical occupancy at the launch block size (float32)",
           lambda k: _base(k) in _ELEMENTWISE and _template_args(k)[0] == "float",
           lambda k: all(p["occupancy"] >= 0.75 for p in k["launches"])),
    Budget(">= 50% theoretical occupancy at the launch block size (double, half, bfloat16)",
           lambda k: _base(k) in _ELEMENTWISE and _template_args(k)[0] != "float",
           lambda k: all(p["occupancy"] >= 0.5 for p in k["launches"])),
    Budget("shared memory fits every power-iteration size the kernel serves (512x512, 3072x128, float32)",
           lambda k: _base(k) in ("power_iteration_kernel", "power_iteration_list_kernel")
           and _template_args(k)[:1] == ["float"],
           lambda k: all(p["fits"] and p["dynamic_shared_bytes"] + k["static_shared_bytes"] <= 48 * 1024
                         for p in k["launches"] if p["size"] in ("512x512", "3072x128"))),
)


def check_budgets(kernels: list[dict]) -> list[str]:
    """One line per (kernel, budget) that fails; each kernel record gets its budget results."""
    failures = []
    for k in kernels:
        k["budgets"] = {}
        for b in BUDGETS:
            if b.applies(k):
                ok = bool(b.holds(k))
                k["budgets"][b.text] = ok
                if not ok:
                    failures.append(f"{k['name']} (sm_{k['arch']}): {b.text}")
    return failures


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def analyse(cubin: Path, arch: str, ptxas_log: str, cuobjdump: str, plans: list[dict]) -> list[dict]:
    """Kernel records of one cubin: ptxas facts, SASS facts, launches with occupancy."""
    ptxas = parse_ptxas(ptxas_log)
    env = {**os.environ, "PATH": f"{Path(cuobjdump).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    listing = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, env=env)
    if listing.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass {cubin.name} failed: {listing.stderr.strip()}")
    sass = parse_sass(listing.stdout)
    names = demangle(sorted(ptxas))
    records = []
    for mangled, facts in sorted(ptxas.items(), key=lambda kv: names[kv[0]]):
        record = {"name": names[mangled], "mangled": mangled, "arch": arch, "source": cubin.name.split(".")[0],
                  **facts, **sass.get(mangled, {"global_load_bits": [], "global_store_bits": [],
                                                "local_memory_instructions": 0, "loops": 0,
                                                "inner_loop_instructions": None})}
        record["launches"] = [
            {**p, **occupancy(arch, p["threads"], facts["registers"],
                              facts["static_shared_bytes"] + p["dynamic_shared_bytes"])}
            for p in plans if p["arch"] == f"sm_{arch}" and p["kernel"] == _base(record)]
        records.append(record)
    return records


def launch_plans(out_dir: Path) -> list[dict]:
    exe = out_dir / "kernel_plans"
    subprocess.run(["c++", "-std=c++17", "-O1", f"-I{CSRC / 'include'}", f"-I{CSRC}", f"-I{CSRC / 'cuda'}",
                    str(Path(__file__).with_name("kernel_plans.cpp")), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def render_summary(report: dict) -> list[str]:
    """The float32 instantiations, one row per kernel and arch (the widest pack where there are two)."""
    rows = {}
    for k in report["kernels"]:
        args = _template_args(k)
        if args[:1] != ["float"] or (len(args) >= 4 and args[3] == "false" and _base(k) == "lipswish_forward_kernel"):
            continue
        key = (_base(k), k["arch"])
        if key not in rows or _wide(k):
            rows[key] = k
    lines = ["| kernel (float32) | arch | regs | spills | local mem | LDG / STG bits | largest launch at the benchmark sizes"
             " | occupancy | budgets |", "|---|---|---:|---:|---:|---|---|---:|---|"]
    for (base, arch), k in sorted(rows.items()):
        p = max(k["launches"], key=lambda p: p["blocks"] * p["threads"] + p["dynamic_shared_bytes"], default=None)
        launch = "–" if p is None else f"{p['size']}: {p['blocks']}×{p['threads']}" + (
            f" + {p['dynamic_shared_bytes']} B shared" if p["dynamic_shared_bytes"] else "")
        met = sum(k["budgets"].values())
        lines.append(f"| `{base}` | sm_{arch} | {k['registers']} | {k['spill_store_bytes'] + k['spill_load_bytes']} | "
                     f"{k['stack_frame_bytes'] + k['local_memory_instructions']} | "
                     f"{','.join(map(str, k['global_load_bits']))} / {','.join(map(str, k['global_store_bits']))} | "
                     f"{launch} | {'–' if p is None else format(p['occupancy'], '.0%')} | {met}/{len(k['budgets'])} met |")
    return lines


def render(report: dict) -> str:
    lines = ["# CUDA kernel report", "",
             f"nvcc {report['nvcc']}, cuobjdump {report['cuobjdump']}; flags: `{' '.join(report['flags'])}`", "",
             f"{len(report['kernels'])} kernel instantiations, {len(report['failures'])} budget failure(s).", "",
             "## Summary", ""] + render_summary(report) + ["", "## Every instantiation", "",
             "Per kernel instantiation and arch: registers per thread, spill stores/loads and stack frame (bytes),"
             " static shared memory (bytes), barriers; from the SASS the global load/store widths (bits), local"
             " memory instructions and the innermost loop's instruction count; the launch our launcher picks at the"
             " benchmark sizes (A100: 108 SMs for sm_80, H100 SXM: 132 for sm_90) and the theoretical occupancy;"
             " budgets met (✓) or broken (✗).", "",
             "| kernel | arch | regs | spill st/ld | stack | smem | bar | LDG bits | STG bits | local | inner loop"
             " | launches (grid×block, occupancy) | budgets |",
             "|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|---|---|"]
    for k in report["kernels"]:
        launches = "; ".join(f"{p['size']}: {p['blocks']}×{p['threads']}"
                             + (f"+{p['dynamic_shared_bytes']}B" if p["dynamic_shared_bytes"] else "")
                             + ("" if p["fits"] else " (ATen path)") + f", {p['occupancy']:.0%}"
                             for p in k["launches"])
        budgets = " ".join(("✓" if ok else "✗ " + text) for text, ok in k["budgets"].items())
        lines.append(
            f"| `{k['name']}` | sm_{k['arch']} | {k['registers']} | {k['spill_store_bytes']}/{k['spill_load_bytes']} | "
            f"{k['stack_frame_bytes']} | {k['static_shared_bytes']} | {k['barriers']} | "
            f"{','.join(map(str, k['global_load_bits'])) or '–'} | {','.join(map(str, k['global_store_bits'])) or '–'} | "
            f"{k['local_memory_instructions']} | {k['inner_loop_instructions'] if k['inner_loop_instructions'] else '–'} | "
            f"{launches or '–'} | {budgets} |")
    lines += ["", "Budgets:", ""] + [f"- {b.text}" for b in BUDGETS]
    lines += ["", f"{len(report['failures'])} budget failure(s)."] + [f"- ✗ {f}" for f in report["failures"]]
    return "\n".join(lines) + "\n"


def _tool_version(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="build/kernel-report", help="output directory")
    parser.add_argument("--archs", nargs="+", default=["80", "90"], choices=sorted(LIMITS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc processes")
    args = parser.parse_args(argv)
    cuobjdump = find_cuobjdump()
    if shutil.which("nvcc") is None or cuobjdump is None:
        print("kernel_report needs nvcc on PATH and cuobjdump with nvdisasm "
              "(the kernel-report extra: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flags = build_nvcc_flags()
    sources = sorted((CSRC / "cuda").glob("*.cu"))
    plans = launch_plans(out)
    jobs = [(s, a) for s in sources for a in args.archs]
    print(f"[kernel_report] compiling {len(sources)} sources for sm_{', sm_'.join(args.archs)} "
          f"({args.jobs} at a time)", file=sys.stderr, flush=True)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        compiled = list(pool.map(lambda job: (job[1], *compile_cubin(job[0], job[1], out, flags)), jobs))
    kernels = [k for arch, cubin, log in compiled for k in analyse(cubin, arch, log, cuobjdump, plans)]
    failures = check_budgets(kernels)
    report = {"nvcc": _tool_version(["nvcc", "--version"]), "cuobjdump": _tool_version([cuobjdump, "--version"]),
              "flags": [f for f in flags if not f.startswith("-I")], "archs": args.archs, "kernels": kernels,
              "failures": failures, "budgets": [b.text for b in BUDGETS]}
    (out / "kernel-report.json").write_text(json.dumps(report, indent=1))
    (out / "kernel-report.md").write_text(render(report))
    print(render(report))
    print(f"[kernel_report] wrote {out / 'kernel-report.json'} and {out / 'kernel-report.md'}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
