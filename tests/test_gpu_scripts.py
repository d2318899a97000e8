"""The GPU session's tools that run without a GPU: scripts/toolchain_probe.py
(a toolchain whose extension crashes or garbles on its first error message
is refused) and scripts/gpu_check.sh's stage runner (a test process that
dies of a signal leaves its native stack; the results fit the device tool's
8 files)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(ROOT, "scripts", "toolchain_probe.py")
GPU_CHECK = os.path.join(ROOT, "scripts", "gpu_check.sh")

needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")


def _probe(env_changes, tmp_path):
    env_out = tmp_path / "toolchain.env"
    env = {**os.environ, **env_changes}
    run = subprocess.run([sys.executable, PROBE, "--env-out", str(env_out)], env=env,
                         capture_output=True, text=True, timeout=300)
    return run, env_out


@needs_compiler
def test_toolchain_probe_accepts_the_configured_toolchain(tmp_path):
    run, env_out = _probe({}, tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "as configured: raises cleanly" in run.stdout
    assert env_out.read_text().startswith("# as configured")


@needs_compiler
def test_toolchain_probe_refuses_a_private_libstdcxx(tmp_path):
    # -static-libstdc++ puts a second libstdc++ into the extension: its
    # stream code does not share the process's locale (what the H200
    # image's compiler did), so the message comes out garbled or the
    # process dies. The probe must refuse every candidate built that way.
    ldshared = f"{sysconfig.get_config_var('CC') or 'cc'} -shared -static-libstdc++"
    run, env_out = _probe({"LDSHARED": ldshared}, tmp_path)
    if "build failed" in run.stdout:
        pytest.skip("this toolchain cannot link libstdc++ statically")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "raises cleanly" not in run.stdout
    assert not env_out.exists()


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="no C compiler for the crash handler")
def test_gpu_check_stage_keeps_the_native_stack_of_a_crash(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    crash = f"{sys.executable} -c 'import ctypes; ctypes.string_at(0)'"
    script = f"""
        source {GPU_CHECK}
        : > "$OUT/summary.txt"
        crash_handler
        stage crash 30 "${{PYTEST[@]:0:2}}" {crash}
        stage fine 30 true
        finish
    """
    run = subprocess.run(["bash", "-c", script], env={**os.environ, "OUT": str(out)},
                         capture_output=True, text=True, timeout=120)
    summary = (out / "summary.txt").read_text()
    assert "crash        FAILED    rc=139" in summary, run.stdout + run.stderr
    assert "native stack in crash.stack" in summary
    assert "fine         ok" in summary
    assert sorted(os.listdir(out)) == ["logs.tar.gz", "summary.txt"]
    with tarfile.open(out / "logs.tar.gz") as logs:
        assert sorted(logs.getnames()) == ["crash.log", "crash.stack", "fine.log"]
        stack = logs.extractfile("crash.stack").read().decode()
    assert "native stack (crash_backtrace.c), signal Segmentation fault" in stack
