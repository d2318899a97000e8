"""Which C++ toolchain builds a torch extension whose errors can be raised?

A torch extension formats its error messages (TORCH_CHECK) with the C++
standard library's streams. If the toolchain puts a private copy of parts of
libstdc++ into the extension (a devtoolset-style compiler links the parts of
its libstdc++ that are newer than the system's statically), and the link binds
the extension's calls to that copy (-Bsymbolic-functions, which Debian's and
Ubuntu's Pythons put in LDSHARED), the copy's locale facets do not match the
process's libstdc++: the first integer formatted into a message crashes the
process (SIGSEGV in std::codecvt, pytorch/pytorch#109923) instead of raising.
The GPU machines' image has such a compiler (gpu_check.sh found it).

This script builds a one-function extension the way setup.py links
fused_optim._C (sysconfig's LDSHARED, CXX) under each candidate toolchain,
calls it after `import torch` in a fresh process, and reports which raise
the error cleanly. With --env-out it writes the environment of the first that
does (shell `export` lines) for the build to source; it exits 1 when none does.

    python scripts/toolchain_probe.py [--env-out FILE]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile

PROBE_SOURCE = r"""
#include <c10/util/Exception.h>
#include <cstring>

extern "C" int fused_optim_toolchain_probe() {
  try {
    TORCH_CHECK(false, "probe: group_index[", 5, "] = ", 7L, " is out of range for ", 3u);
  } catch (const c10::Error& e) {
    return std::strstr(e.what(), "group_index[5] = 7 is out of range for 3") ? 0 : 2;
  }
  return 3;
}
"""

CALL = """
import ctypes, sys
import torch  # (first, as when fused_optim is imported)
sys.exit(ctypes.CDLL(sys.argv[1]).fused_optim_toolchain_probe())
"""


def _cxx(env=os.environ) -> str:
    """The C++ compiler a build under ``env`` uses (torch's default: c++)."""
    return env.get("CXX") or "c++"


def _ldshared(env=os.environ) -> list[str]:
    """The link command a build under ``env`` uses (setuptools': LDSHARED
    from the environment, else Python's own)."""
    return shlex.split(env.get("LDSHARED") or sysconfig.get_config_var("LDSHARED") or "cc -shared")


def candidates() -> list[tuple[str, dict[str, str]]]:
    """(name, environment for the build) of each toolchain worth trying, in
    order of preference: as configured; without -Bsymbolic-functions; the
    system's compiler (/usr/bin), when it is another one."""
    cxx = _cxx()
    ldshared = _ldshared()
    out = [("as configured", {})]
    if any("Bsymbolic" in a for a in ldshared):
        kept = [a for a in ldshared if a not in ("-Wl,-Bsymbolic-functions", "-Wl,-Bsymbolic")]
        out.append(("without -Bsymbolic-functions", {"LDSHARED": shlex.join(kept)}))
    system_cc, system_cxx = "/usr/bin/gcc", "/usr/bin/g++"
    same = shutil.which(cxx) and os.path.realpath(shutil.which(cxx)) == os.path.realpath(system_cxx)
    if os.path.exists(system_cc) and os.path.exists(system_cxx) and not same:
        out.append(("system compiler (/usr/bin/g++)",
                    {"CC": system_cc, "CXX": system_cxx,
                     "LDSHARED": shlex.join([system_cxx] + ldshared[1:])}))
    return out


def build_probe(env: dict[str, str], workdir: str) -> str:
    """The probe extension built under `env` (as setup.py's build would:
    compiled by CXX, linked by LDSHARED with CXX in place of its driver)."""
    from torch.utils import cpp_extension
    import torch

    merged = {**os.environ, **env}
    cxx, ldshared = _cxx(merged), _ldshared(merged)
    src = os.path.join(workdir, "probe.cpp")
    obj = os.path.join(workdir, "probe.o")
    lib = os.path.join(workdir, "probe.so")
    with open(src, "w") as f:
        f.write(PROBE_SOURCE)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    subprocess.run([cxx, "-std=c++17", "-fPIC", "-O2", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                    *includes, "-c", src, "-o", obj], check=True, env=merged)
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    subprocess.run([cxx, *ldshared[1:], obj, f"-L{torch_lib}", "-lc10", f"-Wl,-rpath,{torch_lib}",
                    "-o", lib], check=True, env=merged)
    return lib


def probe(name: str, env: dict[str, str]) -> bool:
    with tempfile.TemporaryDirectory() as workdir:
        try:
            lib = build_probe(env, workdir)
        except (subprocess.CalledProcessError, OSError) as e:
            print(f"{name}: build failed ({e})")
            return False
        rc = subprocess.run([sys.executable, "-c", CALL, lib]).returncode
    verdict = {0: "raises cleanly", 2: "raises, with a garbled message",
               3: "did not raise"}.get(rc, f"died (signal {-rc})" if rc < 0 else f"exit {rc}")
    print(f"{name}: {verdict}  {' '.join(f'{k}={v!r}' for k, v in env.items())}")
    return rc == 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-out", help="write the first good toolchain's `export` lines here")
    args = parser.parse_args(argv)
    print(f"CXX={_cxx()!r} LDSHARED={shlex.join(_ldshared())!r}")
    for name, env in candidates():
        if probe(name, env):
            if args.env_out:
                with open(args.env_out, "w") as f:
                    f.write(f"# {name} (scripts/toolchain_probe.py)\n")
                    for key, value in env.items():
                        f.write(f"export {key}={shlex.quote(value)}\n")
            return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
