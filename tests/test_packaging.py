"""What `pip install .` installs: every Python package of the source tree
(a folder of fused_optim/ with an __init__.py) is listed in pyproject.toml,
so that an installed (non-editable) fused_optim has all its modules."""

from __future__ import annotations

import pathlib

import pytest

tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_package_of_the_tree_is_installed():
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    in_tree = sorted(
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "fused_optim").rglob("__init__.py")
    )
    assert sorted(listed) == in_tree
