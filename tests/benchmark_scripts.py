"""What the tests of the scripts in benchmarks/ share: the folder on
sys.path (import this module first, then the script), and the check that a
script's command line refuses a value as argparse does."""

from __future__ import annotations

import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def assert_refused(main, argv: list) -> None:
    """``main(argv)`` stops with argparse's usage error (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
