"""scripts/torch_optim_tests.py: test files run by it see fused_optim's
classes wherever torch's tests look for torch.optim's (the import, the
module, optim_db), and fused_optim still runs torch's own code for
fused=False; with --baseline they see torch's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "torch_optim_tests.py")

# What a torch test file does: import the classes, read the test database.
_TEST_FILE = '''
import inspect
import sys

import pytest
import torch
import fused_optim
from torch.optim import SGD, Adam, AdamW, Adagrad, RMSprop, NAdam, RAdam
from torch.testing._internal.common_optimizers import optim_db

CLASSES = [SGD, Adam, AdamW, Adagrad, RMSprop, NAdam, RAdam]


def test_sees_fused_optims_classes():
    assert all(cls.__module__.startswith("fused_optim.") for cls in CLASSES)
    assert sys.modules["torch.optim.adamw"].AdamW is fused_optim.AdamW
    names = {cls.__name__ for cls in CLASSES}
    assert {info.optim_cls for info in optim_db if info.optim_cls.__name__ in names} == set(CLASSES)


@pytest.mark.parametrize("keywords", [dict(fused=False), {}])
def test_steps_as_torch(keywords):
    # (fused=False runs torch's own code: it must be torch's class there,
    # not ours again)
    keywords = dict(keywords, weight_decay=0.01)  # (AdamW's default; torch's Adam runs it)
    for ours in CLASSES:
        if "fused" in keywords and "fused" not in inspect.signature(ours).parameters:
            continue  # (RMSprop, NAdam, RAdam: torch has no fused keyword)
        theirs = ours._torch_class
        assert not theirs.__module__.startswith("fused_optim")
        p, q = (torch.nn.Parameter(torch.linspace(-1, 1, 5)) for _ in range(2))
        for param in (p, q):
            param.grad = torch.linspace(0.5, -0.5, 5)
        ours([p], lr=0.1, **keywords).step()
        torch_keywords = dict(keywords, decoupled_weight_decay=True) if ours is AdamW else keywords
        theirs([q], lr=0.1, **torch_keywords).step()
        torch.testing.assert_close(p, q)
'''


@pytest.fixture
def test_file(tmp_path):
    path = tmp_path / "test_like_torchs.py"
    path.write_text(_TEST_FILE)
    return path


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args, "-q"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def test_torch_tests_see_fused_optim(test_file):
    run = _run(str(test_file))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 passed" in run.stdout


def test_baseline_leaves_torchs_classes(test_file):
    run = _run(str(test_file), "--baseline", "-k", "sees_fused_optims_classes")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 failed" in run.stdout
