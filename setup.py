"""Build of fused_optim's C++ (and, when available, CUDA) extension.

Options come from the environment, never from sys.argv:
  FUSED_OPTIM_CPU_ONLY=1   build the CPU kernels only, even if CUDA is present
  FORCE_CUDA=1             build the CUDA kernels or fail loudly trying
  TORCH_CUDA_ARCH_LIST     CUDA architectures (torch's variable), e.g. "8.0;9.0"
  MAX_JOBS                 parallel compile jobs (torch's variable)

Install with `pip install --no-build-isolation .`: a torch extension must be
compiled against the torch that will import it, so the build uses the torch
already installed rather than one pip would fetch into an isolated build env.
"""

import glob
import os
import subprocess
import sys

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    """Decide whether to build the CUDA kernels, failing loudly when forced."""
    if _flag("FUSED_OPTIM_CPU_ONLY"):
        if _flag("FORCE_CUDA"):
            sys.exit("fused_optim: FORCE_CUDA=1 and FUSED_OPTIM_CPU_ONLY=1 contradict each other")
        return False, "FUSED_OPTIM_CPU_ONLY=1"
    import torch

    have_nvcc = cpp_extension.CUDA_HOME is not None
    have_cuda_torch = torch.version.cuda is not None
    if have_nvcc and have_cuda_torch:
        return True, f"nvcc at {cpp_extension.CUDA_HOME}, torch built with CUDA {torch.version.cuda}"
    why = []
    if not have_nvcc:
        why.append("torch found no CUDA toolkit (set CUDA_HOME to one with nvcc)")
    if not have_cuda_torch:
        why.append(f"torch {torch.__version__} is a CPU-only build")
    if _flag("FORCE_CUDA"):
        sys.exit("fused_optim: FORCE_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(why))
    return False, "; ".join(why)


def _extension():
    cxx_flags = [
        "-O3",
        # Let GCC vectorize sqrt (it cannot set errno from SIMD code) and
        # if-convert selects around FP operations (it may not speculate an op
        # that could raise an FP exception flag). Neither changes a result:
        # no FP exception is ever enabled or read, errno is never read.
        "-fno-math-errno",
        "-fno-trapping-math",
        # No FMA contraction, even in the AVX-512 loops (AVX-512F implies FMA):
        # `a * b + c` must round twice, as in torch.optim and in our other
        # code paths, or an element's result would depend on whether it fell
        # in a vector body or a scalar tail, i.e. on the thread count.
        "-ffp-contract=off",
    ]
    if not any(f.startswith("-g") and f != "-g0" for f in os.environ.get("CFLAGS", "").split()):
        # No debug info unless CFLAGS asks for it (CFLAGS=-g, as
        # scripts/gpu_check.sh does for its crash backtraces). Python's own
        # CFLAGS carry -g, which made the extension 136 MB (120 MB of it
        # DWARF) and each file's compile ~40% slower.
        cxx_flags.append("-g0")
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is a header template whose OpenMP body only exists
        # when WE compile with -fopenmp; without it every "parallel" loop runs
        # on one thread. The libgomp this links is the one torch has already
        # loaded (same soname), so there is one OpenMP runtime, and
        # torch.set_num_threads governs our loops too.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    build_cuda, reason = _want_cuda()
    if build_cuda:
        sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
        # --fmad=false: no contraction of a * b + c into one FMA, so the CUDA
        # kernels round exactly like the CPU kernels (same update rules, IEEE
        # div/sqrt on both): fp32/fp64 results agree bit for bit across
        # devices. The kernels are memory-bound; the extra instructions are
        # free. scripts/check_cuda_kernels.sh uses the same flags.
        nvcc_flags = ["-O3", "-std=c++17", "-lineinfo", "--fmad=false"]
        ext = cpp_extension.CUDAExtension(
            "fused_optim._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("FUSED_OPTIM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            "fused_optim._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    print(f"fused_optim: building CPU kernels{' and CUDA kernels' if build_cuda else ''} "
          f"({'CUDA: ' + reason if build_cuda else 'CPU only: ' + reason})", flush=True)
    for s in sources:
        print(f"fused_optim:   {s}", flush=True)
    return ext, build_cuda


_EXT, _BUILD_CUDA = _extension()


def _git(*args):
    """git's output in ROOT, or None without git or outside a checkout (an sdist)."""
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _write_build_info():
    # The commit goes into the build so that an installed copy, far from any
    # checkout, can still say what it was built from (the benchmark reports).
    # (setup.py itself must be tracked: an unpacked sdist inside some other
    # checkout is not that checkout's code.)
    tracked = _git("ls-files", "--error-unmatch", "setup.py") is not None
    commit = _git("rev-parse", "--short", "HEAD") if tracked else None
    dirty = None if commit is None else bool(_git("status", "--porcelain", "--untracked-files=no"))
    path = os.path.join(ROOT, "fused_optim", "_build_info.py")
    text = (
        '"""Written by setup.py: what this build contains."""\n\n'
        f"CUDA_BUILT = {_BUILD_CUDA}\n"
        f"GIT_COMMIT = {commit!r}  # None: built without git or outside a checkout\n"
        f"GIT_DIRTY = {dirty!r}  # tracked files differed from GIT_COMMIT\n"
    )
    with open(path, "w") as f:
        f.write(text)


_write_build_info()

setup(
    ext_modules=[_EXT],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
