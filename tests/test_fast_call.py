"""The classes call the ops through fused_optim._C (Note [fast op call] in
csrc/python_module.cpp), below the autograd dispatch keys. These tests hold
that entry to the public one: same results as torch.ops.fused_optim, and the
version counters of written tensors bumped, as any in-place op does (else
autograd could not detect a param modified after it was saved), and only
those: gradients only when AMP's unscale writes them."""

import weakref

import pytest
import torch

import fused_optim
from fused_optim import _C, _clip, _ops
from optim_configs import OPTIMIZER_NAMES


ADAM = _ops.SIGNATURES["adam_"]
# The lists the op may write, in schema order (grads only under AMP).
LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params",
         "state_steps")


def _adam_args(seed, tensor_lr=False, grad_scale=None):
    """An amsgrad Adam call over two groups that differ in maximize and in
    decoupled_weight_decay: its arguments by name, and all of them in
    schema order (the fast entry's positional tuple)."""
    torch.manual_seed(seed)
    sizes = [1, 7, 4099]
    # params, grads, exp_avgs; exp_avg_sqs, max_exp_avg_sqs non-negative,
    # as second moments are
    params, grads, exp_avgs = [[torch.randn(n) for n in sizes] for _ in range(3)]
    exp_avg_sqs, max_exp_avg_sqs = [[torch.rand(n) for n in sizes] for _ in range(2)]
    lr = [1e-2, 1e-3]
    named = dict(
        params=params, grads=grads,
        states={"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
                "max_exp_avg_sqs": max_exp_avg_sqs},
        master_params=[], steps=[torch.tensor(3.0) for _ in sizes], group_index=[0, 1, 0],
        lr=[torch.tensor(v) for v in lr] if tensor_lr else lr,
        hyper={"beta1": [0.9, 0.8], "beta2": [0.999, 0.99], "eps": [1e-8, 1e-6],
               "weight_decay": [0.1, 0.05]},
        group_flags={"maximize": [True, False], "decoupled_weight_decay": [False, True]},
        new_state=None, grad_scale=grad_scale, found_inf=None, modes={"amsgrad": True},
        stochastic_rounding=False)
    return named, ADAM.arguments(**named)


def _lists(named):
    states = named["states"]
    return [named["params"], named["grads"], states["exp_avgs"], states["exp_avg_sqs"],
            states["max_exp_avg_sqs"], named["master_params"], named["steps"]]


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
def test_fast_call_equals_torch_ops(tensor_lr):
    (a_named, a), (b_named, b) = _adam_args(0, tensor_lr), _adam_args(0, tensor_lr)
    fast = _C.adam__tensor_lr if tensor_lr else _C.adam_
    fast(*a)
    public = torch.ops.fused_optim.adam_.tensor_lr if tensor_lr else torch.ops.fused_optim.adam_.default
    public(*b[:ADAM.num_positional], **dict(zip(ADAM.keywords, b[ADAM.num_positional:])))
    for name, list_a, list_b in zip(LISTS, _lists(a_named), _lists(b_named)):
        for x, y in zip(list_a, list_b):
            assert not x.isnan().any(), name
            assert torch.equal(x, y), name
    assert a_named["steps"][0].item() == 4.0


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("amp", [False, True])
def test_fast_call_bumps_versions_of_written_lists(amp, tensor_lr):
    # grad_scale given: the op writes the unscaled gradients
    named, args = _adam_args(1, tensor_lr, grad_scale=torch.tensor(4.0) if amp else None)
    read_only = named["lr"] if tensor_lr else []  # lr tensors are read, never written
    before = [[t._version for t in lst] for lst in _lists(named) + [read_only]]
    (_C.adam__tensor_lr if tensor_lr else _C.adam_)(*args)
    after = [[t._version for t in lst] for lst in _lists(named) + [read_only]]
    # params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params,
    # state_steps: grads only when AMP writes them back, as torch.optim;
    # then the lr tensors
    written = [True, amp, True, True, True, True, True, False]
    for name, lst_before, lst_after, is_written in zip(LISTS + ("lr",), before, after, written):
        for v0, v1 in zip(lst_before, lst_after):
            assert v1 == v0 + (1 if is_written else 0), name


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_step_leaves_a_saved_gradient_usable(name):
    # torch.optim never writes a gradient (without GradScaler), so a graph
    # that saved one (e.g. a gradient penalty) still runs backward after a
    # step.
    w = torch.nn.Parameter(torch.randn(4))
    w.grad = torch.randn(4, requires_grad=True)
    penalty = (w.grad * w.grad).sum()  # saves the gradient
    version = w.grad._version
    getattr(fused_optim, name)([w], lr=0.1).step()
    assert w.grad._version == version
    penalty.backward()
    assert w.grad.grad is not None


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_step_on_a_saved_param_is_caught_by_autograd(name):
    # As with torch.optim: stepping a param that a graph saved for backward
    # makes that backward fail instead of silently using the new values.
    w = torch.nn.Parameter(torch.randn(4))
    w.grad = torch.randn(4)
    opt = getattr(fused_optim, name)([w], lr=0.1)
    loss = (w * w).sum()  # saves w
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ----- GradsOf: the gradients read in C++ (Note [gradients read in C++]) -----------------


def _with_grads_on_params(named):
    """The call's params with its gradients set as their .grad (each param
    then a leaf that requires grad, as a model's)."""
    params = [p.requires_grad_() for p in named["params"]]
    for p, g in zip(params, named["grads"]):
        p.grad = g
    return params


@pytest.mark.parametrize("amp", [False, True])
def test_grads_of_gives_the_call_of_the_gradient_list(amp):
    scale = torch.tensor(4.0) if amp else None
    (a_named, a), (b_named, b) = _adam_args(2, grad_scale=scale), _adam_args(2, grad_scale=scale)
    grads_index = ADAM.index["grads"]
    a_params = _with_grads_on_params(a_named)
    a = list(a)
    a[grads_index] = _C.GradsOf(a_params)
    versions = [g._version for g in a_named["grads"]]
    with torch.no_grad():
        _C.adam_(*a)
        _C.adam_(*b)
    for name, list_a, list_b in zip(LISTS, _lists(a_named), _lists(b_named)):
        for x, y in zip(list_a, list_b):
            assert torch.equal(x, y), name
    # AMP's unscaled gradients written back, and their versions bumped, as
    # for a list
    assert [g._version for g in a_named["grads"]] == [v + amp for v in versions]


@pytest.mark.parametrize("gap", ["missing", "sparse"])
def test_a_call_given_grads_of_with_a_gradient_missing_or_sparse_is_not_made(gap):
    # The fast call and its validate_ twin return False, having written
    # nothing: the kept step then takes the general path.
    named, args = _adam_args(3)
    params = _with_grads_on_params(named)
    params[1].grad = None if gap == "missing" else named["grads"][1].to_sparse()
    args = list(args)
    args[ADAM.index["grads"]] = _C.GradsOf(params)
    before = [[t.clone() for t in lst] for lst in _lists(named)]
    versions = [[t._version for t in lst] for lst in _lists(named)]
    with torch.no_grad():
        assert _C.validate_adam_(*args) is False
        assert _C.adam_(*args) is False
    for name, lst_before, lst in zip(LISTS, before, _lists(named)):
        assert all(torch.equal(x, y) for x, y in zip(lst_before, lst)), name
    assert [[t._version for t in lst] for lst in _lists(named)] == versions
    params[1].grad = named["grads"][1]
    with torch.no_grad():
        assert _C.validate_adam_(*args) is True
        assert _C.adam_(*args) is True


def test_grads_of_refuses_what_is_not_a_tensor():
    _, args = _adam_args(4)
    args = list(args)
    args[ADAM.index["grads"]] = _C.GradsOf([torch.zeros(1), 1.0, torch.zeros(4099)])
    with pytest.raises(TypeError):
        _C.adam_(*args)


def test_grads_of_holds_the_gradients_only_during_the_call():
    named, args = _adam_args(5)
    params = _with_grads_on_params(named)
    args = list(args)
    args[ADAM.index["grads"]] = _C.GradsOf(params)
    with torch.no_grad():
        _C.adam_(*args)
    grads = [weakref.ref(g) for g in named["grads"]]
    named["grads"].clear()
    for p in params:
        p.grad = None
    assert all(g() is None for g in grads)  # (no reference kept)
    assert all(p.grad is None for p in params)


def test_grads_presence_says_what_grads_of_says():
    params = [torch.zeros(3, requires_grad=True) for _ in range(3)]
    assert _C.grads_presence(params) == _C.grads_of(params)[1:] == (False, True)
    for p in params:
        p.grad = torch.ones(3)
    assert _C.grads_presence(params) == _C.grads_of(params)[1:] == (True, True)
    params[2].grad = torch.ones(3).to_sparse()
    assert _C.grads_presence(params) == _C.grads_of(params)[1:] == (True, False)


@pytest.mark.parametrize("amp", [False, True])
def test_sum_of_squares_of_grads_of_is_that_of_the_gradient_list(amp):
    # The clipping norm of the kept step (_clip.norm_of_gradients_of): the
    # same call over the same gradients, so the same bits; None, having
    # summed nothing, with a gradient missing or sparse.
    torch.manual_seed(0)
    scale = torch.tensor(4.0) if amp else None
    params = [torch.randn(n, dtype=dtype, requires_grad=True)
              for n, dtype in ((1, torch.float32), (4099, torch.float32), (33, torch.bfloat16),
                               (70_000, torch.float32))]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    grads_of = _C.GradsOf(params)
    expected = _C.sum_of_squares([p.grad for p in params], scale, False)
    assert torch.equal(_C.sum_of_squares(grads_of, scale, False), expected)
    assert torch.equal(_clip.norm_of_gradients_of(grads_of, torch.device("cpu"), scale),
                       _clip.global_norm([p.grad for p in params], scale))
    for gap in ("missing", "sparse"):
        grad = params[2].grad
        params[2].grad = None if gap == "missing" else grad.to_sparse()
        assert _C.sum_of_squares(grads_of, scale, False) is None, gap
        assert _clip.norm_of_gradients_of(grads_of, torch.device("cpu"), scale) is None, gap
        params[2].grad = grad


def test_on_one_device():
    cpu, meta = torch.zeros(2), torch.zeros(2, device="meta")
    assert _C.on_one_device([]) is True
    assert _C.on_one_device([cpu, torch.ones(3)]) is True
    assert _C.on_one_device([meta, meta]) is True
    assert _C.on_one_device([cpu, meta]) is False
    assert _C.on_one_device([cpu, cpu, meta]) is False
