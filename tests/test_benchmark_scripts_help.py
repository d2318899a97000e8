"""Every script in benchmarks/ says in its --help how long its default run
takes, as the bench package's CLI does (test_bench.py): a user should know
before starting it whether it is seconds or minutes."""

from __future__ import annotations

import importlib
import re

import pytest

from benchmark_scripts import BENCHMARKS

SCRIPTS = sorted(path.stem for path in BENCHMARKS.glob("*.py") if "def main(" in path.read_text())


def test_the_scripts_are_found():
    assert {"first_step", "step_breakdown", "gpu_kernel_timing"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_gives_the_run_time_of_the_defaults(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(script).main(["--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert re.search(r"Run time with the defaults: (a few seconds|about [\w ]+ minutes?"
                     r"|not measured yet)", help_text)
