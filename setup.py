"""Build of resflow_cuda: one extension, ``resflow_cuda._C``, with torch.utils.cpp_extension + ninja.

Install with ``pip install --no-build-isolation -e .`` (torch must already be installed: the
extension is built against the torch you run; without the flag pip builds in an isolated
environment that cannot see it, and this script stops with a message that says so).

Environment:
  RESFLOW_CUDA=auto|1|0   auto (default): build the CUDA kernels when torch is a CUDA build and a
                          CUDA toolkit (nvcc) is found, with or without a visible GPU; 1: the same
                          but fail if either is missing; 0: CPU only.
  CUDA_HOME / CUDA_PATH   the toolkit; otherwise the one behind the nvcc on PATH, then /usr/local/cuda.
  TORCH_CUDA_ARCH_LIST    GPU architectures, e.g. "8.0;9.0"; overrides RESFLOW_CUDA_ARCH.
  RESFLOW_CUDA_ARCH       without TORCH_CUDA_ARCH_LIST: dist (default) builds the distributable list
                          build_flags.DEFAULT_ARCH_LIST (7.5 to 9.0, PTX of 9.0 for newer GPUs); native
                          builds only the visible GPUs' archs (fast; falls back to dist with no GPU).
  DEBUG=1                 -O0 -g host code and -G device code.
  MAX_JOBS                parallel compile jobs (ninja); defaults to the CPU count.
"""

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
# The version is written once, in resflow_cuda/version.py; read here without importing the package.
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "resflow_cuda" / "version.py").read_text(), re.M).group(1)
sys.path.insert(0, str(ROOT))
from build_flags import DEFAULT_ARCH_LIST  # noqa: E402
from build_flags import nvcc_flags  # noqa: E402

# Per-capability CPU kernel builds (csrc/cpu/vec/*.cpp), mirroring ATen's DEFAULT/AVX2/AVX512 sets.
X86_CAPABILITY_FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}


def log(msg):
    print(f"[resflow_cuda setup] {msg}", flush=True)


# Commands that need only the metadata and the file list, not a compiler or torch: an sdist, and the
# metadata steps a PEP 517 frontend runs before it builds a wheel.
METADATA_COMMANDS = {"sdist", "egg_info", "dist_info", "check", "clean", "--name", "--version"}
BUILD_COMMANDS = {"build", "build_ext", "build_py", "bdist", "bdist_wheel", "bdist_egg", "install", "develop",
                  "editable_wheel"}


def torch_outside_isolation():
    """The torch version that this Python sees without the isolated build environment's PYTHONPATH
    (pip's build isolation hides site-packages that way), or None."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], env=env,
                             capture_output=True, text=True, timeout=120, cwd=os.path.expanduser("~"))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def no_torch_message():
    installed = torch_outside_isolation()
    if installed:
        where = [f"  torch {installed} is installed for {sys.executable}, but pip's isolated build",
                 "  environment (the default) cannot see it. Build without isolation:"]
        commands = []
    else:
        where = ["  Either torch is not installed, or pip's isolated build environment (the default) hides",
                 "  it. Install torch first (the README says which wheel: CPU-only or CUDA), then build",
                 "  without isolation:"]
        commands = ["      pip install torch"]
    return "\n".join([
        "",
        "resflow_cuda: cannot build: torch is not importable in this build environment.",
        "  The extension is compiled against the torch you will run (its C++ ABI and CUDA version must",
        "  match), so it is built with the torch already installed, not in an isolated environment.",
        *where,
        *commands,
        '      pip install "setuptools>=77" wheel ninja     # the build\'s tools, if not there yet',
        "      pip install --no-build-isolation .           # -e . for development; or the sdist's path",
        "",
    ])


def import_torch():
    """torch, or None for the metadata-only commands (an sdist needs no torch); any other command
    without torch stops with one message that names --no-build-isolation and why."""
    try:
        import torch
    except ImportError:
        args = set(sys.argv[1:])
        if args & METADATA_COMMANDS and not args & BUILD_COMMANDS:
            return None
        sys.exit(no_torch_message())
    return torch


def nvcc_top(nvcc):
    """The toolkit root nvcc itself uses; sees through wrapper scripts on PATH."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out, re.M)
    return str(Path(m.group(1).strip()).resolve()) if m else None


def find_cuda_home():
    """CUDA_HOME, CUDA_PATH, the toolkit behind `nvcc` on PATH, /usr/local/cuda: the first that has
    both bin/nvcc and include/cuda_runtime.h (a wrapper script's prefix has no headers)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(nvcc_top(nvcc))
    candidates.append("/usr/local/cuda")
    for cand in candidates:
        if cand and (Path(cand) / "bin" / "nvcc").is_file() and (Path(cand) / "include" / "cuda_runtime.h").is_file():
            return str(Path(cand).resolve())
    return None


def nvcc_version(cuda_home):
    try:
        out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def decide_cuda():
    """Returns (build_cuda, cuda_home, reason). Must run before torch.utils.cpp_extension is
    imported, because that module reads CUDA_HOME at import time."""
    mode = os.environ.get("RESFLOW_CUDA", "auto").strip().lower()
    if mode not in ("auto", "1", "0"):
        sys.exit(f"RESFLOW_CUDA must be auto, 1 or 0, got {mode!r}")
    if mode == "0":
        return False, None, "built with RESFLOW_CUDA=0"
    problem = None
    cuda_home = None
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)"
    else:
        cuda_home = find_cuda_home()
        if cuda_home is None:
            problem = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
        else:
            version = nvcc_version(cuda_home)
            torch_major = int(torch.version.cuda.split(".")[0])
            if version is None:
                problem = f"{cuda_home}/bin/nvcc --version failed"
            elif version[0] != torch_major:
                problem = (f"nvcc {version[0]}.{version[1]} in {cuda_home} vs torch's CUDA {torch.version.cuda}: "
                           "major versions differ")
    if problem is None:
        return True, cuda_home, ""
    if mode == "1":
        sys.exit(f"RESFLOW_CUDA=1 but the CUDA kernels cannot be built: {problem}")
    return False, None, problem


def cuda_arch_list():
    """TORCH_CUDA_ARCH_LIST when set; else RESFLOW_CUDA_ARCH: dist (default), the distributable
    DEFAULT_ARCH_LIST, or native, the visible GPUs' archs (dist when none is visible). torch's own
    fallback would be every arch it knows, slow to compile."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    mode = os.environ.get("RESFLOW_CUDA_ARCH", "dist").strip().lower()
    if mode not in ("dist", "native"):
        sys.exit(f"RESFLOW_CUDA_ARCH must be dist or native, got {mode!r}")
    if mode == "native" and torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return ";".join(sorted({"{}.{}".format(*torch.cuda.get_device_capability(i))
                                for i in range(torch.cuda.device_count())}))
    if mode == "native":
        log("RESFLOW_CUDA_ARCH=native but no GPU is visible: building the distributable arch list")
    return DEFAULT_ARCH_LIST


torch = import_torch()
if torch is None:  # sdist or metadata without torch: no extension to describe
    BUILD_CUDA, CUDA_HOME, NO_CUDA_REASON = False, None, "torch is not importable"
else:
    BUILD_CUDA, CUDA_HOME, NO_CUDA_REASON = decide_cuda()
    if BUILD_CUDA:
        os.environ["CUDA_HOME"] = CUDA_HOME
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
    # after decide_cuda: torch.utils.cpp_extension reads CUDA_HOME at import time
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

DEBUG = os.environ.get("DEBUG", "0") == "1"
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")
ARCH_LIST = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if BUILD_CUDA else ""


def cxx_flags():
    flags = ["-O0", "-g"] if DEBUG else ["-O3", "-g0"]
    # at::parallel_for only runs in parallel when the including TU is compiled with OpenMP.
    flags += ["-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
    flags += [f'-DRESFLOW_BUILD_TORCH_VERSION="{torch.__version__}"',
              f'-DRESFLOW_BUILD_CUDA_ARCH_LIST="{ARCH_LIST}"',
              f'-DRESFLOW_BUILD_NO_CUDA_REASON="{NO_CUDA_REASON}"']
    if IS_X86:
        flags.append("-DRESFLOW_CPU_X86_CAPABILITIES")
    if BUILD_CUDA:
        flags.append("-DRESFLOW_WITH_CUDA")
    return flags


def cpu_capabilities():
    return ["DEFAULT"] + (list(X86_CAPABILITY_FLAGS) if IS_X86 else [])


# without torch (an sdist, metadata) setup() gets no extension and never uses this class
class BuildWithCpuCapabilities(BuildExtension if torch is not None else object):
    """BuildExtension that also compiles csrc/cpu/vec/*.cpp once per CPU capability, each with its
    own -m flags and CPU_CAPABILITY namespace (as ATen does), and links them into the extension.
    The objects come after the extension's own in the link, so wherever an inline function from a
    shared header was emitted in several TUs, the linker keeps the baseline (non-AVX) copy."""

    def build_extension(self, ext):
        vec_sources = sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cpu" / "vec").glob("*.cpp"))
        objects = []
        for cap in cpu_capabilities():
            cap_flags = X86_CAPABILITY_FLAGS.get(cap, []) + [f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"]
            objects += self.compiler.compile(
                vec_sources,
                output_dir=os.path.join(self.build_temp, f"cpu_{cap.lower()}"),
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs={"cxx": ext.extra_compile_args["cxx"] + cap_flags, "nvcc": []},
                depends=ext.depends,
            )
        ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


def extension():
    sources = sorted(str(p.relative_to(ROOT)) for folder in (CSRC, CSRC / "composite", CSRC / "cpu")
                     for p in folder.glob("*.cpp"))
    # setuptools rebuilds only when a source or a `depends` entry is newer than the extension, so
    # list every header and the per-capability sources; ninja then rebuilds what changed.
    depends = sorted(str(p.relative_to(ROOT)) for pattern in ("**/*.h", "**/*.cuh", "cpu/vec/*.cpp")
                     for p in CSRC.glob(pattern))
    kwargs = dict(
        name="resflow_cuda._C",
        sources=sources,
        depends=depends,
        # csrc/include: the torch-free math headers; csrc: checks/, host/, composite/ by folder name.
        include_dirs=[str(CSRC / "include"), str(CSRC)],
        extra_compile_args={"cxx": cxx_flags()},
        extra_link_args=["-fopenmp"],
    )
    if BUILD_CUDA:
        kwargs["sources"] += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cuda").glob("*.cu"))
        kwargs["extra_compile_args"]["nvcc"] = nvcc_flags(DEBUG)
        return CUDAExtension(**kwargs)
    return CppExtension(**kwargs)


def print_config():
    log("build configuration")
    for key, value in [
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda})"),
        ("RESFLOW_CUDA", os.environ.get("RESFLOW_CUDA", "auto")),
        ("CUDA kernels", "yes" if BUILD_CUDA else f"no: {NO_CUDA_REASON}"),
        ("CUDA_HOME", CUDA_HOME or "-"),
        ("TORCH_CUDA_ARCH_LIST", ARCH_LIST or "-"),
        ("CPU capabilities", ", ".join(cpu_capabilities())),
        ("DEBUG", DEBUG),
        ("MAX_JOBS", os.environ.get("MAX_JOBS", f"(default: {os.cpu_count()})")),
    ]:
        log(f"  {key:<22} {value}")


METADATA = dict(
    name="resflow_cuda",
    version=VERSION,
    # benchmarks/ ships as resflow_cuda.benchmarks (the resflow-bench command), subpackages included.
    packages=find_packages(include=["resflow_cuda", "resflow_cuda.*"]) + ["resflow_cuda.benchmarks"]
    + [f"resflow_cuda.benchmarks.{name}" for name in find_packages(str(ROOT / "benchmarks"))],
    package_dir={"resflow_cuda.benchmarks": "benchmarks"},
    # py.typed; the op-count budgets and baseline that resflow-bench's targets read (benchmarks/counts.py)
    package_data={"resflow_cuda": ["py.typed"], "resflow_cuda.benchmarks": ["budgets.json"]},
)

if torch is None:
    log("torch is not importable: metadata and sdist only (building the extension needs torch)")
    setup(**METADATA)
else:
    print_config()
    setup(**METADATA, ext_modules=[extension()], cmdclass={"build_ext": BuildWithCpuCapabilities.with_options(use_ninja=True)})
