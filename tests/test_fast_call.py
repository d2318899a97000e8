"""The classes call the ops through fused_optim._C (Note [fast op call] in
csrc/python_module.cpp), below the autograd dispatch keys. These tests hold
that entry to the public one: same results as torch.ops.fused_optim, and the
version counters of written tensors bumped, as any in-place op does (else
autograd could not detect a param modified after it was saved), and only
those: gradients only when AMP's unscale writes them."""

import pytest
import torch

import fused_optim
from fused_optim import _C


def _adam_args(seed):
    torch.manual_seed(seed)
    sizes = [1, 7, 4099]
    # params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs (the last two
    # non-negative, as second moments are)
    tensors = [[torch.randn(n) for n in sizes] for _ in range(3)]
    tensors += [[torch.rand(n) for n in sizes] for _ in range(2)]
    steps = [torch.tensor(3.0) for _ in sizes]
    hyper = [[1e-2, 1e-3], [0.9, 0.8], [0.999, 0.99], [1e-8, 1e-6], [0.1, 0.0]]
    # (no master weights; lr_tensors, grad_scale, found_inf: none)
    return tensors + [[], steps, [0, 1, 0]] + hyper + [[], None, None]


def test_fast_call_equals_torch_ops():
    a, b = _adam_args(0), _adam_args(0)
    _C.adam_(*a, True, False, True, False)
    torch.ops.fused_optim.adam_(*b, amsgrad=True, decoupled_weight_decay=False, maximize=True,
                                stochastic_rounding=False)
    for list_a, list_b in zip(a[:7], b[:7]):
        for x, y in zip(list_a, list_b):
            assert not x.isnan().any()
            assert torch.equal(x, y)


@pytest.mark.parametrize("amp", [False, True])
def test_fast_call_bumps_versions_of_written_lists(amp):
    args = _adam_args(1)
    if amp:  # grad_scale given: the op writes the unscaled gradients
        args[-2] = torch.tensor(4.0)
    before = [[t._version for t in lst] for lst in args[:7]]
    _C.adam_(*args, True, True, False, False)
    after = [[t._version for t in lst] for lst in args[:7]]
    # params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params,
    # state_steps: grads only when AMP writes them back, as torch.optim
    written = [True, amp, True, True, True, True, True]
    for lst_before, lst_after, is_written in zip(before, after, written):
        for v0, v1 in zip(lst_before, lst_after):
            assert v1 == v0 + (1 if is_written else 0)


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"])
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


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"])
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
