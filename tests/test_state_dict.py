"""Checkpoints, param groups and the rest of the torch.optim.Optimizer API
(same state_dict layout, interchangeable checkpoints,
hooks, closures, __setstate__ defaults)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import fused_optim

from harness import (
    P,
    Run,
    assert_optimizer_unchanged,
    assert_runs_close,
    assert_same_state,
    check_step_tensor,
    make_param,
    snapshot_optimizer,
)
from optim_configs import (
    OUR_KEYWORDS,
    SAVED_GROUP_EXTRAS,
    GROUP_OVERRIDES,
    ONE_PER_OPTIMIZER,
    OPTIM_CONFIGS,
    SETSTATE_DEFAULTED_KEYS,
    STATE_NAMES,
)

ALL = pytest.mark.parametrize("cfg", OPTIM_CONFIGS, ids=str)
ONE_EACH = pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)


def _groups(cfg):
    o1, _ = GROUP_OVERRIDES[cfg.name]
    return [({}, [P((7,)), P((4099,)), P((3, 5))]), (o1, [P((9,)), P((1,))])]


def _pair(cfg, device, groups=None, **kw):
    groups = _groups(cfg) if groups is None else groups
    ref = Run(cfg.torch_cls, groups, {**cfg.kwargs, "foreach": False}, device=device, **kw)
    ours = Run(cfg.ours_cls, groups, cfg.kwargs, device=device, **kw)
    return ref, ours


def _step(runs, s, has_grad=None):
    for r in runs:
        if has_grad is None:
            r.set_grads(s)
        else:
            r.set_grads(s, has_grad)
        r.opt.step()


def _save_load(sd):
    """torch.save / torch.load(weights_only=True): a checkpoint of ours must
    contain nothing but tensors and plain Python values."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _fresh(cfg_cls, cfg, device, like: Run):
    kw = {**cfg.kwargs, "foreach": False} if cfg_cls is cfg.torch_cls else cfg.kwargs
    run = Run(cfg_cls, _groups(cfg), kw, device=device)
    run.copy_params_from(like)
    return run


def _assert_layout_like_torch(sd_ours, sd_torch, cfg):
    assert set(sd_ours) == {"state", "param_groups"}
    assert len(sd_ours["param_groups"]) == len(sd_torch["param_groups"])
    for go, gt in zip(sd_ours["param_groups"], sd_torch["param_groups"]):
        assert go["params"] == gt["params"], "param ids of the state_dict differ from torch's"
        # exactly torch's keys with no option of ours set (so
        # torch.distributed.checkpoint loads either into the other with its
        # default planner; set, they are saved too: Note [our options in
        # param groups])
        # (plus, for Lamb, timm's per-group "step": SAVED_GROUP_EXTRAS)
        assert set(go) == set(gt) | SAVED_GROUP_EXTRAS.get(cfg.name, set()), (
            f"param_groups keys: ours {sorted(go)} vs torch {sorted(gt)}"
        )
        for k in gt:
            # The torch reference runs with foreach=False.
            if k not in ("params", "foreach"):
                assert go[k] == gt[k], f"group[{k!r}]: ours {go[k]!r} vs torch {gt[k]!r}"
    assert set(sd_ours["state"]) == set(sd_torch["state"])
    for idx, st in sd_torch["state"].items():
        so = sd_ours["state"][idx]
        assert set(so) <= STATE_NAMES[cfg.name] | set(st)
        assert_same_state(so, st, f"state_dict state[{idx}]")


@ALL
def test_state_dict_round_trips(cfg, device):
    """torch -> ours, ours -> torch and ours -> ours: all continue on the
    trajectory of an uninterrupted torch.optim run."""
    ref, ours = _pair(cfg, device)
    for s in range(4):
        _step((ref, ours), s)
    sd_torch = copy.deepcopy(ref.opt.state_dict())
    sd_ours = ours.opt.state_dict()
    _assert_layout_like_torch(sd_ours, sd_torch, cfg)
    sd_ours = _save_load(sd_ours)

    a = _fresh(cfg.ours_cls, cfg, device, ref)  # torch -> ours
    a.opt.load_state_dict(copy.deepcopy(sd_torch))
    b = _fresh(cfg.torch_cls, cfg, device, ours)  # ours -> torch
    b.opt.load_state_dict(copy.deepcopy(sd_ours))
    c = _fresh(cfg.ours_cls, cfg, device, ours)  # ours -> ours
    c.opt.load_state_dict(copy.deepcopy(sd_ours))
    for name, run in (("torch->ours", a), ("ours->torch", b), ("ours->ours", c)):
        assert_runs_close(run, ref, f"{cfg} {name} right after load")
    for s in range(4, 8):
        _step((ref, ours, a, b, c), s)
        for name, run in (("uninterrupted ours", ours), ("torch->ours", a),
                          ("ours->torch", b), ("ours->ours", c)):
            assert_runs_close(run, ref, f"{cfg} {name} step {s}")


@ONE_EACH
def test_load_keeps_the_dicts_tensors_where_torch_does(cfg, device):
    """torch.optim's load_state_dict keeps a loaded tensor itself (no copy)
    where its dtype and device already fit, so two optimizers loaded from
    one live dict in one process (DCP's set_optimizer_state_dict given
    get_optimizer_state_dict's result) share those tensors. Ours keeps the
    same entries, so such a run continues as torch's does."""
    ref, ours = _pair(cfg, device)
    for s in range(3):
        _step((ref, ours), s)
    sd = ref.opt.state_dict()
    loaded = [_fresh(cls, cfg, device, ref) for cls in (cfg.torch_cls, cfg.ours_cls)]
    for run in loaded:
        run.opt.load_state_dict(sd)
    for i, (p_torch, p_ours) in enumerate(zip(*(run.params for run in loaded))):
        for name, value in sd["state"].get(i, {}).items():
            if isinstance(value, torch.Tensor):
                kept_by_torch = loaded[0].opt.state[p_torch][name] is value
                kept_by_ours = loaded[1].opt.state[p_ours][name] is value
                assert kept_by_ours == kept_by_torch, (
                    f"state[{i}][{name!r}]: torch keeps the loaded tensor: {kept_by_torch}, ours: {kept_by_ours}"
                )


@ALL
def test_load_into_a_warm_optimizer(cfg, device):
    """load_state_dict into an optimizer that has already stepped (on a
    different trajectory): the loaded state is used, not cached tensors."""
    ref = Run(cfg.torch_cls, _groups(cfg), {**cfg.kwargs, "foreach": False}, device=device)
    ours = Run(cfg.ours_cls, _groups(cfg), cfg.kwargs, device=device, grad_seed=7)
    for s in range(3):
        _step((ref, ours), s)  # different grads: different state
    ours.opt.load_state_dict(copy.deepcopy(ref.opt.state_dict()))
    ours.copy_params_from(ref)
    ours.grad_seed = 0
    assert_runs_close(ours, ref, f"{cfg} after load")
    for s in range(3, 7):
        _step((ref, ours), s)
        assert_runs_close(ours, ref, f"{cfg} step {s}")


def _rebind_then_continue(cfg, device, rebind):
    ref, ours = _pair(cfg, device)
    for s in range(3):
        _step((ref, ours), s)
    for run in (ref, ours):
        with torch.no_grad():
            rebind(run)
    for s in range(3, 7):
        _step((ref, ours), s)
        assert_runs_close(ours, ref, f"{cfg} step {s}")


def _rebind_param_data(run):
    for p in run.params[::2]:
        p.data = p.data.clone()


def _replace_state_tensors(run):
    for p in run.params[1::2]:
        st = run.opt.state[p]
        for k in list(st):
            if k != "step":
                st[k] = st[k].clone()


@ALL
def test_param_data_rebound(cfg, device):
    """`p.data = new_tensor` (done by users, FSDP, AMP master weights, ...):
    the next step updates the new storage, as torch.optim does."""
    _rebind_then_continue(cfg, device, _rebind_param_data)


@ALL
def test_state_tensors_replaced(cfg, device):
    """`opt.state[p][name] = new_tensor` (state surgery, resets): torch.optim
    reads the state dict every step, so the new tensor is the one used and
    updated; a cached bucket must not keep the old one."""
    _rebind_then_continue(cfg, device, _replace_state_tensors)


@ALL
def test_param_appended_to_group(cfg, device):
    """Appending a tensor to group["params"] directly (torch.optim reads the
    list every step) makes it part of the next step."""
    ref, ours = _pair(cfg, device, groups=[({}, [P((7,)), P((4099,))])])
    for s in range(2):
        _step((ref, ours), s)
    for run in (ref, ours):
        p = make_param(P((9,)), 12345, torch.float32, device)
        run.params.append(p)
        run.specs.append(P((9,)))
        run.opt.param_groups[0]["params"].append(p)
    for s in range(2, 5):
        _step((ref, ours), s)
        assert_runs_close(ours, ref, f"{cfg} step {s}")


@ALL
def test_state_layout_matches_torch(cfg, device):
    ref, ours = _pair(cfg, device)
    # Adagrad creates its state in the constructor (torch does too).
    for i in range(len(ref.params)):
        assert_same_state(ours.state_of(i), ref.state_of(i), f"{cfg} before any step, param {i}",
                          close=False)
    _step((ref, ours), 0)
    for i in range(len(ref.params)):
        st = ours.state_of(i)
        assert_same_state(st, ref.state_of(i), f"{cfg} param {i}")
        # (in torch's order too: code may zip a state dict's values)
        assert list(st) == list(ref.state_of(i)), f"{cfg} param {i}: key order"
        for k, v in st.items():
            if k != "step":
                assert v.data_ptr() != ours.params[i].data_ptr()
        if "step" in st:
            check_step_tensor(st["step"], ref.state_of(i)["step"], f"{cfg} param {i}")
            assert st["step"].device.type == "cpu"


@ALL
def test_param_group_keys_and_defaults_match_torch(cfg):
    # Built with torch.optim's arguments (ours at their unset values, or
    # left out): exactly torch's keys and values, live and saved (Note [our
    # options in param groups]).
    t = cfg.torch_cls([torch.zeros(3, requires_grad=True)], **cfg.kwargs)
    unset = {k: v for k, v in OUR_KEYWORDS.items() if k not in t.defaults}
    for kwargs in (cfg.kwargs, {**cfg.kwargs, **unset}):
        o = cfg.ours_cls([torch.zeros(3, requires_grad=True)], **kwargs)
        for name, ours_d, torch_d in (
            ("param_groups[0]", o.param_groups[0], t.param_groups[0]),
            ("defaults", o.defaults, t.defaults),
            ("state_dict()['param_groups'][0]", o.state_dict()["param_groups"][0],
             t.state_dict()["param_groups"][0]),
        ):
            assert set(ours_d) == set(torch_d), (
                f"{name} keys: ours {sorted(ours_d)} vs torch {sorted(torch_d)}"
            )
            for k in torch_d:
                if k not in ("params",):
                    assert ours_d[k] == torch_d[k], f"{name}[{k!r}]: {ours_d[k]!r} vs {torch_d[k]!r}"


@ALL
@pytest.mark.parametrize("options", [
    {"master_weights": True, "state_dtype": torch.float32, "max_grad_norm": 2.0},
    {"stochastic_rounding": True, "state_dtype": torch.bfloat16},
], ids=["master_clip", "rounding"])
def test_our_options_are_group_keys_when_set(cfg, options):
    # Set, they are in the defaults and every group, live and saved (the
    # saved groups have the live ones' keys, as torch's flattened DCP
    # loader needs: Note [our options in param groups]).
    if cfg.unfused and set(options) != {"max_grad_norm"}:
        pytest.skip("the plain step refuses the precision options (test_caution.py)")
    t = cfg.torch_cls([torch.zeros(3, requires_grad=True)], **cfg.kwargs)
    o = cfg.ours_cls([torch.zeros(3, requires_grad=True)], **{**cfg.kwargs, **options})
    o.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    saved = o.state_dict()["param_groups"]
    torch_keys = set(t.defaults)
    for name, ours_d, expected in (
        ("defaults", o.defaults, options),
        *((f"param_groups[{i}]", g, options) for i, g in enumerate(o.param_groups)),
        # (state_dtype by name: torch's state-dict tools take no dtype object)
        *((f"state_dict()['param_groups'][{i}]", g, {**options, **(
            {"state_dtype": str(options["state_dtype"])} if "state_dtype" in options else {})})
          for i, g in enumerate(saved)),
    ):
        params = set() if name == "defaults" else {"params"}
        assert set(ours_d) == torch_keys | params | set(expected), name
        for k, value in expected.items():
            assert ours_d[k] == value, f"{name}[{k!r}]: {ours_d[k]!r}, expected {value!r}"


@pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)
def test_an_older_pickle_loses_our_unset_options(cfg):
    # Pickled by an older version, whose groups held every option of ours
    # (at its unset value too): unpickled, the groups have torch's keys.
    t = cfg.torch_cls([torch.zeros(3, requires_grad=True)], **cfg.kwargs)
    o = cfg.ours_cls([torch.zeros(3, requires_grad=True)], **cfg.kwargs)
    for d in (o.defaults, *o.param_groups):
        for k, v in OUR_KEYWORDS.items():
            d.setdefault(k, v)
    # (both unpickled: torch's __setstate__ adds "differentiable" to the defaults)
    o, t = pickle.loads(pickle.dumps(o)), pickle.loads(pickle.dumps(t))
    assert set(o.defaults) == set(t.defaults)
    assert set(o.param_groups[0]) == set(t.param_groups[0])
    assert set(o.state_dict()["param_groups"][0]) == set(t.state_dict()["param_groups"][0])


@pytest.mark.parametrize("saved_with, loaded_into", [
    ({"stochastic_rounding": True, "state_dtype": torch.bfloat16}, {"master_weights": True}),
    ({"master_weights": True}, {"fused": False}),
    ({"state_dtype": torch.bfloat16}, {}),
    ({}, {"state_dtype": torch.bfloat16, "stochastic_rounding": True}),
], ids=["rounding_into_master", "master_into_unfused", "bf16_state_into_plain", "plain_into_rounding"])
def test_loading_keeps_the_loaders_precision_options(saved_with, loaded_into):
    # Whatever options the saving optimizer had, the loader keeps its own
    # (Note [our options in param groups]) and steps: no mix of the two.
    params = [torch.randn(5, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    saver = fused_optim.AdamW(params, lr=0.01, **saved_with)
    for p in params:
        p.grad = torch.randn_like(p)
    saver.step()
    loader = fused_optim.AdamW(params, lr=0.01, **loaded_into)
    groups_before = [{k: v for k, v in g.items() if k != "params"} for g in loader.param_groups]
    loader.load_state_dict(copy.deepcopy(saver.state_dict()))
    assert [{k: v for k, v in g.items() if k != "params"} for g in loader.param_groups] == groups_before
    loader.step()
    if loaded_into.get("fused") is not False:
        dtype = loaded_into.get("state_dtype", torch.float32 if "master_weights" in loaded_into
                                else torch.bfloat16)
        assert all(loader.state[p]["exp_avg"].dtype == dtype for p in params)


@ALL
def test_add_param_group_after_steps(cfg, device):
    o1, o2 = GROUP_OVERRIDES[cfg.name]
    ref, ours = _pair(cfg, device, groups=[({}, [P((7,)), P((4099,))])])
    for s in range(3):
        _step((ref, ours), s)
        assert_runs_close(ours, ref, f"{cfg} step {s}")
    for run in (ref, ours):
        run.add_group(o1, [P((9,)), P((3, 5))])
    for s in range(3, 6):
        _step((ref, ours), s)
        assert_runs_close(ours, ref, f"{cfg} step {s} (2 groups)")
    for run in (ref, ours):
        run.add_group(o2, [P((1031,))])
    for s in range(6, 9):
        _step((ref, ours), s)
        assert_runs_close(ours, ref, f"{cfg} step {s} (3 groups)")


@ALL
def test_old_checkpoint_missing_group_keys(cfg, device):
    """A checkpoint lacking the group keys that torch's __setstate__ fills in
    (older torch versions) and with float `step`s loads into ours like into
    torch."""
    ref, ours = _pair(cfg, device)
    for s in range(3):
        _step((ref, ours), s)
    sd = copy.deepcopy(ref.opt.state_dict())
    for g in sd["param_groups"]:
        for k in SETSTATE_DEFAULTED_KEYS[cfg.name]:
            g.pop(k, None)
    for st in sd["state"].values():
        if "step" in st:
            st["step"] = float(st["step"])
    a = _fresh(cfg.torch_cls, cfg, device, ref)
    a.opt.load_state_dict(copy.deepcopy(sd))
    b = _fresh(cfg.ours_cls, cfg, device, ref)
    b.opt.load_state_dict(copy.deepcopy(sd))
    for s in range(3, 6):
        _step((a, b), s)
        assert_runs_close(b, a, f"{cfg} step {s}")
    for gb, ga in zip(b.opt.param_groups, a.opt.param_groups):
        for k in SETSTATE_DEFAULTED_KEYS[cfg.name]:
            if k in ("foreach", "fused", "capturable", "differentiable"):
                # Note [implementation keywords on load]: ours are kept
                assert gb[k] == cfg.kwargs.get(k, None if k in ("foreach", "fused") else False)
                continue
            assert gb[k] == ga[k], f"group[{k!r}] defaulted to {gb[k]!r}, torch {ga[k]!r}"


def _torch1_sgd_checkpoint(device):
    """An SGD checkpoint as torch 1.x saved it for momentum=0: a
    ``momentum_buffer: None`` per stepped param."""
    groups = [({}, [P((7,)), P((4099,)), P((3, 5))]), ({"maximize": True}, [P((9,))])]
    run = Run(torch.optim.SGD, groups, {"lr": 0.1, "foreach": False}, device=device)
    for s in range(2):
        run.set_grads(s)
        run.opt.step()
    sd = copy.deepcopy(run.opt.state_dict())
    sd["state"] = {i: {"momentum_buffer": None} for i in range(len(run.params))}
    return groups, run, sd


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_torch1_sgd_checkpoint_with_none_momentum_buffers(momentum, device):
    """torch counts a state tensor saved as None as missing: resumed with
    momentum, the first step makes the buffer (from the gradient); without,
    the None stays, and is saved again."""
    groups, saved, sd = _torch1_sgd_checkpoint(device)
    runs = []
    for cls, kw in ((torch.optim.SGD, {"foreach": False}), (fused_optim.SGD, {})):
        run = Run(cls, groups, {"lr": 0.1, "momentum": momentum, **kw}, device=device)
        run.copy_params_from(saved)
        run.opt.load_state_dict(copy.deepcopy(sd))
        for g in run.opt.param_groups:
            g["momentum"] = momentum  # (the checkpoint's groups say 0)
        runs.append(run)
    ref, ours = runs
    for s in range(2, 6):
        _step((ref, ours), s)
        assert_runs_close(ours, ref, f"momentum {momentum} step {s}")
    buffers = [st.get("momentum_buffer", "absent") for st in ours.opt.state_dict()["state"].values()]
    if momentum:
        assert all(isinstance(b, torch.Tensor) for b in buffers)
    else:
        assert buffers == [None] * len(ours.params)


def test_failed_first_step_keeps_a_none_momentum_buffer(device):
    """A step that raises after the None buffers were to be replaced puts the
    Nones back (Note [validate before mutating])."""
    groups, saved, sd = _torch1_sgd_checkpoint(device)
    ours = Run(fused_optim.SGD, groups, {"lr": 0.1, "momentum": 0.9}, device=device)
    ours.copy_params_from(saved)
    ours.opt.load_state_dict(sd)
    for g in ours.opt.param_groups:
        g["momentum"] = 0.9
    last = ours.params[-1]  # (in the second group: the second op call)
    ours.opt.state[last]["momentum_buffer"] = torch.zeros(3, device=device)
    ours.set_grads(2)
    snap = snapshot_optimizer(ours.opt)
    with pytest.raises(RuntimeError, match="shape"):
        ours.opt.step()
    assert_optimizer_unchanged(ours.opt, snap, "failed step")
    assert ours.opt.state[ours.params[0]]["momentum_buffer"] is None


# ---------------------------------------------------------------------------
# zero_grad, closure, hooks
# ---------------------------------------------------------------------------


@ONE_EACH
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(cfg, set_to_none, device):
    ref, ours = _pair(cfg, device)
    for s in range(2):
        _step((ref, ours), s)
    for run in (ref, ours):
        grads = [p.grad for p in run.params]
        run.opt.zero_grad(set_to_none=set_to_none)
        for p, g in zip(run.params, grads):
            if set_to_none:
                assert p.grad is None
            else:
                assert p.grad is g and torch.count_nonzero(p.grad) == 0
        # Accumulate into the zeroed grads (what backward does), then step.
        zeroed = [p.grad for p in run.params]
        run.set_grads(2)
        for p, z in zip(run.params, zeroed):
            if z is not None:
                z.add_(p.grad)
                p.grad = z
        run.opt.step()
    assert_runs_close(ours, ref, f"{cfg} after zero_grad(set_to_none={set_to_none})")


@ONE_EACH
def test_step_with_closure(cfg, device):
    ref, ours = _pair(cfg, device)
    weights = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(device)
               for i, p in enumerate(ref.params)]
    for s in range(3):
        for run in (ref, ours):
            calls = []

            def closure(run=run, calls=calls):
                run.opt.zero_grad()
                loss = sum(((p * w) ** 2).sum() + (p * w).sum() for p, w in zip(run.params, weights))
                loss.backward()
                calls.append(loss)
                return loss

            # torch runs the closure with grad enabled even inside no_grad.
            with torch.no_grad():
                loss = run.opt.step(closure)
            assert len(calls) == 1, f"closure called {len(calls)} times"
            assert loss is calls[0], "step(closure) must return the closure's loss"
        assert_runs_close(ours, ref, f"{cfg} closure step {s}")
    ours.set_grads(3)
    assert ours.opt.step() is None


@ONE_EACH
def test_step_hooks(cfg, device):
    ref, ours = _pair(cfg, device)
    events = []
    before = []

    def pre(opt, args, kwargs):
        events.append("pre")
        before.append([p.detach().clone() for p in ours.params])

    def post(opt, args, kwargs):
        events.append("post")
        assert any(not torch.equal(p, b) for p, b in zip(ours.params, before[-1]))

    def global_pre(opt, args, kwargs):
        events.append("global_pre")

    h1 = ours.opt.register_step_pre_hook(pre)
    h2 = ours.opt.register_step_post_hook(post)
    h3 = register_optimizer_step_pre_hook(global_pre)
    try:
        ours.set_grads(0)
        ours.opt.step()
        assert events == ["global_pre", "pre", "post"], events
    finally:
        h1.remove()
        h2.remove()
        h3.remove()
    ours.set_grads(1)
    ours.opt.step()
    assert events == ["global_pre", "pre", "post"], "removed hooks still fire"


@ONE_EACH
def test_state_dict_hooks(cfg, device):
    _, ours = _pair(cfg, device)
    ours.set_grads(0)
    ours.opt.step()
    seen = []
    ours.opt.register_state_dict_pre_hook(lambda opt: seen.append("sd_pre"))

    def sd_post(opt, sd):
        seen.append("sd_post")
        sd["extra"] = 1
        return sd

    ours.opt.register_state_dict_post_hook(sd_post)
    ours.opt.register_load_state_dict_pre_hook(lambda opt, sd: seen.append("load_pre"))
    ours.opt.register_load_state_dict_post_hook(lambda opt: seen.append("load_post"))
    sd = ours.opt.state_dict()
    assert sd.get("extra") == 1 and seen == ["sd_pre", "sd_post"]
    sd.pop("extra")
    ours.opt.load_state_dict(sd)
    assert seen == ["sd_pre", "sd_post", "load_pre", "load_post"], seen


# ---------------------------------------------------------------------------
# deepcopy / pickle
# ---------------------------------------------------------------------------


def _clone_run(run: Run, opt_copy):
    twin = Run.__new__(Run)
    twin.__dict__.update(run.__dict__)
    twin.opt = opt_copy
    twin.params = [p for g in opt_copy.param_groups for p in g["params"]]
    return twin


@ONE_EACH
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_is_independent(cfg, how, device):
    """A deepcopy/pickle round trip of the optimizer is a working optimizer
    over the copied params; neither copy writes the other's tensors (no
    bucket cache shared or pointing at the old storage)."""
    ref, ours = _pair(cfg, device)
    for s in range(3):
        _step((ref, ours), s)
    opt2 = copy.deepcopy(ours.opt) if how == "deepcopy" else pickle.loads(pickle.dumps(ours.opt))
    twin = _clone_run(ours, opt2)
    for p, q in zip(twin.params, ours.params):
        assert p is not q and p.data_ptr() != q.data_ptr()
    assert_runs_close(twin, ref, f"{cfg} {how} copy")

    snap = snapshot_optimizer(ours.opt)
    _step((twin,), 3)
    assert_optimizer_unchanged(ours.opt, snap, f"stepping the {how} copy changed the original")
    _step((ref,), 3)
    assert_runs_close(twin, ref, f"{cfg} {how} copy stepped")

    snap = snapshot_optimizer(twin.opt)
    _step((ours,), 3)
    assert_optimizer_unchanged(twin.opt, snap, f"stepping the original changed the {how} copy")
    assert_runs_close(ours, ref, f"{cfg} original stepped")
    for s in range(4, 6):
        _step((twin, ours, ref), s)
        assert_runs_close(twin, ref, f"{cfg} {how} copy step {s}")
        assert_runs_close(ours, ref, f"{cfg} original step {s}")


@ONE_EACH
def test_load_casts_state_to_param_dtype(cfg, device):
    """torch.optim.load_state_dict casts floating state to the param's dtype
    (an fp32 checkpoint loaded into an fp64 model); ours must too, and
    continue like torch."""
    src = Run(cfg.torch_cls, _groups(cfg), {**cfg.kwargs, "foreach": False}, device=device)
    for s in range(3):
        _step((src,), s)
    sd = src.opt.state_dict()
    runs = []
    for cls, kw in ((cfg.torch_cls, {**cfg.kwargs, "foreach": False}), (cfg.ours_cls, cfg.kwargs)):
        run = Run(cls, _groups(cfg), kw, dtype=torch.float64, device=device)
        run.copy_params_from(src)
        run.opt.load_state_dict(copy.deepcopy(sd))
        runs.append(run)
    ref, ours = runs
    assert_runs_close(ours, ref, f"{cfg} after load")
    for s in range(3, 6):
        _step((ref, ours), s)
        assert_runs_close(ours, ref, f"{cfg} step {s}")


@ONE_EACH
def test_loaded_state_with_other_strides_than_param(cfg, device):
    """State saved for contiguous params, loaded for transposed params of
    the same shape: state and param strides differ; the update is still
    elementwise by index."""
    groups_src = [({}, [P((33, 65)), P((8, 9))])]
    groups_dst = [({}, [P((33, 65), layout="transposed"), P((8, 9), layout="strided")])]
    src = Run(cfg.torch_cls, groups_src, {**cfg.kwargs, "foreach": False}, device=device)
    for s in range(3):
        _step((src,), s)
    sd = src.opt.state_dict()
    runs = []
    for cls, kw in ((cfg.torch_cls, {**cfg.kwargs, "foreach": False}), (cfg.ours_cls, cfg.kwargs)):
        run = Run(cls, groups_dst, kw, device=device)
        run.copy_params_from(src)
        run.opt.load_state_dict(copy.deepcopy(sd))
        runs.append(run)
    ref, ours = runs
    for s in range(3, 7):
        _step((ref, ours), s)
        assert_runs_close(ours, ref, f"{cfg} step {s}")


@ONE_EACH
def test_step_hooks_rewrite_arguments_and_global_post_hook_runs(cfg, device):
    # Note [lean step wrapper]: with any hook registered, torch's own wrapper
    # runs, so a pre-hook may replace the step's arguments as in torch.optim.
    from torch.optim.optimizer import register_optimizer_step_post_hook

    _, ours = _pair(cfg, device)
    calls = []

    def closure():
        calls.append("closure")
        return torch.tensor(1.0)

    h1 = ours.opt.register_step_pre_hook(lambda opt, args, kwargs: (args, {"closure": closure}))
    h2 = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(("post", kwargs)))
    try:
        ours.set_grads(0)
        loss = ours.opt.step()
        assert loss is not None and calls[0] == "closure", calls
        assert calls[1] == ("post", {"closure": closure}), calls
    finally:
        h1.remove()
        h2.remove()


@ONE_EACH
def test_profiler_sees_the_step(cfg, device):
    # The step shows in a profile under torch.optim's name, as torch's do;
    # without a profiler (or hooks) the span is skipped (Note [lean step
    # wrapper]).
    _, ours = _pair(cfg, device)
    ours.set_grads(0)
    ours.opt.step()
    with torch.profiler.profile() as prof:
        ours.set_grads(1)
        ours.opt.step()
    name = f"Optimizer.step#{type(ours.opt).__name__}.step"
    assert any(e.name == name for e in prof.events()), sorted({e.name for e in prof.events()})[:20]


@ONE_EACH
@pytest.mark.parametrize("set_to_none", [True, False], ids=["to_none", "to_zero"])
def test_zero_grad_as_torchs(cfg, device, set_to_none):
    # Our zero_grad skips torch's profiler span when no profiler records
    # (Note [lean step wrapper], zero_grad); what it does to the gradients
    # is torch's: dropped, or zeroed in place (the same tensors, detached),
    # and a param without a gradient left without one.
    runs = _pair(cfg, device)
    for run in runs:
        run.set_grads(0)
        run.params[1].grad = None
        run.params[0].grad.requires_grad_(True)  # (torch's zeroing detaches it)
    before = [[p.grad for p in run.params] for run in runs]
    for run in runs:
        run.opt.zero_grad(set_to_none=set_to_none)
    for run, grads in zip(runs, before):
        for p, g in zip(run.params, grads):
            if set_to_none or g is None:
                assert p.grad is None
            else:
                assert p.grad is g and not g.requires_grad and not g.any()
    ref, ours = runs
    assert [p.grad is None for p in ours.params] == [p.grad is None for p in ref.params]


@ONE_EACH
def test_profiler_and_make_fx_see_zero_grad(cfg, device):
    # Where the span is seen, zero_grad records it under torch.optim's
    # name, as torch's does (in a profile, and in make_fx's graph).
    from torch.fx.experimental.proxy_tensor import make_fx

    _, ours = _pair(cfg, device)
    name = f"Optimizer.zero_grad#{type(ours.opt).__name__}.zero_grad"
    ours.set_grads(0)
    with torch.profiler.profile() as prof:
        ours.opt.zero_grad()
    assert any(e.name == name for e in prof.events()), sorted({e.name for e in prof.events()})[:20]
    assert all(p.grad is None for p in ours.params)
    ours.set_grads(1)

    def zero_then_identity(x):
        ours.opt.zero_grad()
        return x

    code = make_fx(zero_then_identity)(torch.ones(1)).code
    assert f"_record_function_enter_new.default('{name}')" in code, code
    assert all(p.grad is None for p in ours.params)


def _stepping(opt):
    def step_then_identity(x):
        opt.step()
        return x

    return step_then_identity


@ONE_EACH
def test_traced_step_records_the_span_as_torchs(cfg):
    # make_fx's graph of a step has the profiler span, as torch.optim's has
    # (a dispatch mode is active: Note [lean step wrapper]). (torch's SGD is
    # the reference: its other classes read step counters on the host,
    # which make_fx cannot trace.)
    from torch.fx.experimental.proxy_tensor import make_fx

    def traced(cls, kwargs):
        param = torch.randn(4, requires_grad=True)
        param.grad = torch.ones(4)
        opt = cls([param], **kwargs)
        opt.step()
        return make_fx(_stepping(opt))(torch.ones(1)).code

    for cls, kwargs, name in ((torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, "SGD"),
                              (cfg.ours_cls, cfg.kwargs, cfg.name)):
        code = traced(cls, kwargs)
        assert f"_record_function_enter_new.default('Optimizer.step#{name}.step')" in code, code


# ----- lazy modules: loaded before the dry run ---------------------------------------------


def _lazy_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.LazyLinear(5), torch.nn.Tanh(), torch.nn.LazyLinear(1))


def _lazy_resume(cls, kwargs, x):
    """((model, optimizer) after an uninterrupted run of 4 steps, and after
    3 steps and a resume whose optimizer loads its state while the model's
    params are still uninitialized: before the dry run, as a script that
    builds the model and the optimizer and loads both checkpoints before
    training)."""
    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    model = _lazy_model(0)
    model(x)  # (the dry run: shapes from x)
    opt = cls(model.parameters(), **kwargs)
    train(model, opt, 3)
    saved_opt, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    train(model, opt, 1)
    resumed = _lazy_model(1)
    resumed_opt = cls(resumed.parameters(), **kwargs)
    resumed_opt.load_state_dict(saved_opt)
    resumed(x)
    resumed.load_state_dict(saved_model)
    train(resumed, resumed_opt, 1)
    return (model, opt), (resumed, resumed_opt)


@ONE_EACH
def test_state_loaded_into_lazy_params_resumes(cfg):
    # torch's load takes state for a param that has no shape yet (the op
    # checks the shapes once it has them: test_errors); ours refused to
    # read the shape (PyG's Linear(-1, ...), torch's LazyLinear).
    if cfg.name == "Adagrad":
        pytest.skip("Adagrad makes state at construction, from the params (torch's too)")
    x = torch.randn(8, 7, generator=torch.Generator().manual_seed(2))
    (model, opt), (resumed, resumed_opt) = _lazy_resume(cfg.ours_cls, cfg.kwargs, x)
    for i, (p, q) in enumerate(zip(model.parameters(), resumed.parameters())):
        assert torch.equal(p, q), f"{cfg} param {i}"
        assert opt.state[p].keys() == resumed_opt.state[q].keys(), f"{cfg} param {i}"
        for key, value in opt.state[p].items():
            assert torch.equal(torch.as_tensor(resumed_opt.state[q][key]), torch.as_tensor(value)), \
                f"{cfg} param {i} {key}"
    if cfg.torch_cls.__module__.startswith("torch.optim"):
        (reference, _), _ = _lazy_resume(cfg.torch_cls, cfg.kwargs, x)
        for p, r in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, r)
