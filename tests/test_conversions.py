"""The CPU kernels convert fp16/bf16 <-> fp32 with their own branch-free code
(csrc/cpu/convert.h, so that the loops vectorize). These tests hold it to
torch's conversions bit for bit: every fp16 and bf16 value, and rounding of
fp32 results (ties, subnormals, overflow) through a real optimizer step."""

import pytest
import torch

import fused_optim

HALF_TYPES = [torch.float16, torch.bfloat16]


def all_values(dtype):
    """Every bit pattern of a 16-bit float type, as that type."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    return bits.view(dtype)


def sgd_step(param, grad, lr):
    p = torch.nn.Parameter(param.clone())
    p.grad = grad.clone()
    fused_optim.SGD([p], lr=lr).step()
    return p.detach()


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_every_value_round_trips(dtype):
    # lr = 0: p + (-0.0) * 1 = p, so the step is load + store of each value.
    values = all_values(dtype)
    out = sgd_step(values, torch.ones_like(values), lr=0.0)
    nan = values.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16), values[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("lr", [1 / 3, 3.0, 1e-3, 0.7])
def test_rounding_matches_torch(dtype, lr):
    # p = 0, so the step computes 0 + (-lr) * g in fp32 and rounds it once;
    # torch computes the same fp32 value and rounds it with .to(dtype).
    # Every finite value of the type as g covers ties, subnormal results and
    # (with lr = 3) overflow to infinity.
    values = all_values(dtype)
    grads = values[values.isfinite()]
    out = sgd_step(torch.zeros_like(grads), grads, lr=lr)
    neg_lr = torch.tensor(-lr, dtype=torch.float32)
    expected = (torch.zeros_like(grads, dtype=torch.float32) + neg_lr * grads.float()).to(dtype)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_nan_result_stays_nan(dtype):
    grads = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    out = sgd_step(torch.tensor([1.0, float("inf"), 0.0], dtype=dtype), grads, lr=1.0)
    # 1 - nan = nan; inf - inf = nan; 0 + inf = inf
    assert out[0].isnan() and out[1].isnan() and out[2] == float("inf")
