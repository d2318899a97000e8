"""Params on a device without fused kernels (Note [params on a device
without kernels] in fused_optim/_base.py): with fused=None, a group holding
such a param is stepped by torch.optim's own code, as torch.optim's default
steps it, with a warning (none for meta); where the fused step is asked for
(fused=True, our precision options, max_grad_norm, a class torch.optim
lacks) the step raises before writing (tests/test_errors.py).

This machine has no device besides the CPU and meta, so the tests for a
device with numbers (mps, xpu, CUDA in a CPU-only build) deny the CPU its
kernels (`cpu_without_kernels`): the groups then take the path such a
device takes, and the numbers must be torch.optim's, bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

import fused_optim
from fused_optim import _base, _build
from harness import assert_optimizer_unchanged, snapshot_optimizer
from optim_configs import GROUP_OVERRIDES, HAS_FUSED, NOT_IN_TORCH, OPTIMIZER_NAMES, torch_class

# The classes with a torch.optim twin, whose code steps such groups.
TWINS = [name for name in OPTIMIZER_NAMES if name not in NOT_IN_TORCH]
KWARGS = {"SGD": {"lr": 0.1, "momentum": 0.9}}


def _layout(state: dict) -> dict:
    """Each state entry's type, and a tensor's shape, dtype and device."""
    return {k: (tuple(v.shape), v.dtype, v.device.type) if torch.is_tensor(v) else type(v)
            for k, v in state.items()}


def _meta_model():
    with torch.device("meta"):
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def test_which_devices_have_kernels():
    assert _build.has_kernels(torch.device("cpu"))
    assert not _build.has_kernels(torch.device("meta"))
    assert _build.has_kernels(torch.device("cuda")) == fused_optim.cuda_built()
    assert _build.kernel_devices() == (["cpu", "cuda"] if fused_optim.cuda_built() else ["cpu"])


@pytest.mark.parametrize("name", TWINS)
def test_meta_model_steps_as_torchs(name):
    # A model planned on meta (the state's shapes; DCP's _init_optim_state
    # steps it): our state has torch's layout, the step counters where
    # torch's code keeps them (on the CPU), and nothing warns.
    layouts = []
    for cls in (getattr(fused_optim, name), torch_class(name)):
        model = _meta_model()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt = cls(model.parameters(), **KWARGS.get(name, {}))
            made = [_layout(opt.state[p]) for p in model.parameters()]  # (Adagrad's, at construction)
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            opt.step()
            opt.step()
        layouts.append((made, [_layout(opt.state[p]) for p in model.parameters()],
                        sorted(opt.state_dict()["state"])))
    assert layouts[0] == layouts[1]


@pytest.mark.parametrize("fused", [None, False], ids=["fused_None", "fused_False"])
@pytest.mark.parametrize("name", TWINS)
def test_meta_model_steps_after_a_checkpoint_as_torchs(name, fused):
    # A checkpoint loaded into a group torch.optim's code steps leaves the
    # step counters where torch's load leaves them (the CPU), which that
    # code reads with .item() (a counter moved to meta fails there); a
    # number saved as the counter becomes a CPU counter, as torch's
    # __setstate__ makes it. Where torch's own resumed step fails (NAdam:
    # its load moves mu_product to meta, which its step reads with
    # .item()), ours fails with torch's error.
    kwargs = {**KWARGS.get(name, {}), **({"fused": fused} if name in HAS_FUSED else {})}
    outcomes = []
    for cls in (getattr(fused_optim, name), torch_class(name)):
        model = _meta_model()
        opt = cls(model.parameters(), **kwargs)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        saved = opt.state_dict()
        if "step" in saved["state"].get(0, {}):
            saved["state"][0]["step"] = 3
        resumed = cls(model.parameters(), **kwargs)
        resumed.load_state_dict(saved)
        try:
            resumed.step()
        except RuntimeError as error:
            outcomes.append(str(error))
        else:
            outcomes.append([_layout(resumed.state[p]) for p in model.parameters()])
    assert outcomes[0] == outcomes[1]
    assert name == "NAdam" or isinstance(outcomes[0], list)


@pytest.mark.parametrize("name", TWINS)
def test_checkpoint_template_of_a_meta_model(name):
    # torch.distributed.checkpoint's get_optimizer_state_dict on a fresh
    # optimizer makes its state with a step on zero gradients.
    templates = []
    for cls in (getattr(fused_optim, name), torch_class(name)):
        model = _meta_model()
        sd = get_optimizer_state_dict(model, cls(model.parameters(), **KWARGS.get(name, {})))
        templates.append({key: _layout(state) for key, state in sd["state"].items()})
    assert templates[0] == templates[1]


def test_a_meta_param_takes_its_group_not_the_others():
    # Group 0 holds a CPU and a meta param: torch's code steps it (the CPU
    # param's numbers are torch's, bit for bit); group 1 stays fused
    # (torch's to assert_close's tolerance).
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(n, generator=gen) for n in (7, 4099)]
    runs = []
    for cls in (fused_optim.AdamW, torch.optim.AdamW):
        cpu = [torch.nn.Parameter(t.clone()) for t in start]
        meta = torch.nn.Parameter(torch.empty(5, device="meta"))
        opt = cls([{"params": [cpu[0], meta]}, {"params": [cpu[1]], "lr": 0.01}],
                  lr=0.1, weight_decay=0.1)
        grads = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in cpu:
                p.grad = torch.randn(p.shape, generator=grads)
            meta.grad = torch.ones_like(meta)
            opt.step()
        runs.append((cpu, opt))
    (ours, ours_opt), (theirs, theirs_opt) = runs
    assert ours_opt._unfused(ours_opt.param_groups[0])
    assert not ours_opt._unfused(ours_opt.param_groups[1])
    assert torch.equal(ours[0], theirs[0])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(ours_opt.state[ours[0]][key], theirs_opt.state[theirs[0]][key])
    torch.testing.assert_close(ours[1], theirs[1])


@pytest.fixture
def cpu_without_kernels(monkeypatch):
    """The CPU as a device this build has no kernels for (as mps, xpu, or
    CUDA in a CPU-only build are)."""
    def has_kernels(device):
        return False

    monkeypatch.setattr(_base, "has_kernels", has_kernels)
    monkeypatch.setattr(_build, "has_kernels", has_kernels)


def _two_groups(name: str, start: list) -> tuple[list, list]:
    params = [torch.nn.Parameter(t.clone()) for t in start]
    half = len(params) // 2
    overrides = GROUP_OVERRIDES[name][1]
    return params, [{"params": params[:half]}, {"params": params[half:], **overrides}]


@pytest.mark.parametrize("name", TWINS)
def test_group_on_a_device_without_kernels_is_torchs_step(name, cpu_without_kernels):
    # Every group is stepped by torch.optim's code: params and state equal
    # torch.optim's (its default, foreach=None) bit for bit, step after
    # step, and one warning says so, whatever the number of steps.
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(n, generator=gen) for n in (1, 9, 4099, 33)]
    ours, ours_groups = _two_groups(name, start)
    theirs, their_groups = _two_groups(name, start)
    kwargs = KWARGS.get(name, {})
    with pytest.warns(UserWarning) as caught:
        ours_opt = getattr(fused_optim, name)(ours_groups, **kwargs)
        theirs_opt = torch_class(name)(their_groups, **kwargs)
        for step in range(5):
            for p, q in zip(ours, theirs):
                p.grad = torch.randn(p.shape, generator=gen)
                q.grad = p.grad.clone()
            ours_opt.step()
            theirs_opt.step()
            for i, (p, q) in enumerate(zip(ours, theirs)):
                assert torch.equal(p, q), f"step {step} param {i}"
                assert _layout(ours_opt.state[p]) == _layout(theirs_opt.state[q])
                for key, value in theirs_opt.state[q].items():
                    assert torch.equal(ours_opt.state[p][key], value), f"step {step} {key}"
    ours_warnings = [w for w in caught if "fused_optim" in str(w.message)]
    assert len(ours_warnings) == 1, [str(w.message) for w in caught]
    message = str(ours_warnings[0].message)
    assert message.startswith(f"fused_optim.{name}: this build has no fused kernels for "
                              "cpu params"), message
    # (the way out where the class has one: RMSprop, RAdam and NAdam, as
    # torch's, take no fused keyword)
    assert ("pass fused=False" in message) == (name in HAS_FUSED), message
    assert ours_warnings[0].filename == __file__  # (the user's line)


def test_fused_false_says_it_and_does_not_warn(cpu_without_kernels):
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_optim.Adam([p], fused=False).step()


@pytest.mark.parametrize("kwargs", [{"fused": True}, {"master_weights": True},
                                    {"max_grad_norm": 1.0}],
                         ids=["fused_True", "master_weights", "max_grad_norm"])
def test_asking_for_the_fused_step_raises_where_it_has_no_kernels(kwargs, cpu_without_kernels):
    # One group asks for the fused step, the other does not: the step
    # raises for the first, before the second (torch's code) is stepped.
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (5, 6)]
    opt = fused_optim.AdamW([{"params": params[:1]}, {"params": params[1:], **kwargs}])
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    before = snapshot_optimizer(opt)
    with pytest.warns(UserWarning, match="no fused kernels for cpu"):
        with pytest.raises(RuntimeError, match="supported devices: .* but torch.float32 and cpu "
                                               r"\(fused_optim's fused step, asked for by"):
            opt.step()
    assert_optimizer_unchanged(opt, before, f"{kwargs} where the CPU has no kernels")
