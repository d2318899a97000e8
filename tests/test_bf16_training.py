"""bf16 training with AdamW where round-to-nearest stalls (issue 4).

On the linear regression of benchmarks/bf16_training.py (imported, so that
the test and the plotted benchmark cannot drift apart), AdamW with lr 1.5e-3
stops moving a bf16 weight once its magnitude reaches 0.5: the update is below
half a bf16 ulp and rounds away. With `stochastic_rounding=True` or
`master_weights=True` the bf16 run must end where the fp32 run ends, the
noise floor of the regression. The losses are computed in fp32 on the bf16
parameters upcast (never on the master copy).
"""

from __future__ import annotations

import functools
import pathlib
import sys

import pytest
import torch

import fused_optim

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bf16_training  # noqa: E402

# Why 1500: fp32 reaches the noise floor at about step 1300 (its loss at
# step 1500 equals that at step 3000 to 4 digits), so the comparison below is
# between converged runs, not between two points on a steep descent.
STEPS = 1500

# Plain bf16 must end at least this many times above fp32. Its weights stop at
# |w| = 0.5 while the targets are in [1, 1.5): the expected loss there is
# 64 * E[(|w*| - 0.5)^2] = 64 * 0.58 ~ 37, 150 times the floor (~0.23), so a
# factor 2 is far from marginal; it fails only if small updates are not lost.
STALL_RATIO = 2.0

# Why 5%: at the floor a bf16 run pays for its bf16 weights. Rounding the fp32
# optimum to bf16 adds about (65 weights per output) * ulp^2 / 12 with ulp =
# 2^-7 for |w| in [1, 2): 3.3e-4, 0.14% of the floor. Stochastic rounding
# leaves each weight on one of its two bf16 neighbours, at most ulp^2 / 4 of
# variance per weight: 1.0e-3, 0.4%. Measured (bca22ec, CPU): master weights
# +0.30%, stochastic rounding +0.40% at step 1500 and +0.4% to +0.8% from
# step 1500 to 3000 (a Python emulation with torch.optim gave the same).
# 5% is several times the expected gap and a hundred times below the gap of
# a stalled run (+15000%), so it separates "trains like fp32" from "does
# not" with room on both sides.
RELATIVE_TOLERANCE = 0.05

# The least-squares floor must be reached by fp32 within this fraction: it
# checks that STEPS is enough for the comparison above to be at the floor.
FP32_FLOOR_TOLERANCE = 0.02


@functools.lru_cache(maxsize=None)
def problem() -> bf16_training.Problem:
    return bf16_training.make_problem()


@functools.lru_cache(maxsize=None)
def final_loss(config: str) -> float:
    return bf16_training.train(config, STEPS, problem()).losses[-1]


def least_squares_loss() -> float:
    p = problem()
    x = torch.cat([p.x, torch.ones(p.x.shape[0], 1)], dim=1).double()
    solution = torch.linalg.lstsq(x, p.y.double()).solution
    return (x @ solution - p.y.double()).square().mean().item()


def test_fp32_reaches_the_least_squares_floor():
    floor = least_squares_loss()
    assert final_loss("fp32") <= floor * (1 + FP32_FLOOR_TOLERANCE), (final_loss("fp32"), floor)


def test_plain_bf16_stalls():
    fp32, bf16 = final_loss("fp32"), final_loss("bf16")
    assert bf16 > STALL_RATIO * fp32, f"bf16 {bf16:.6g} vs fp32 {fp32:.6g}: no stall"


@pytest.mark.parametrize("config", ["bf16 + stochastic_rounding", "bf16 + master_weights"])
def test_bf16_trains_like_fp32(config):
    fp32, ours = final_loss("fp32"), final_loss(config)
    relative = ours / fp32 - 1
    assert abs(relative) <= RELATIVE_TOLERANCE, (
        f"{config}: final loss {ours:.6g}, fp32 {fp32:.6g} ({relative:+.2%})"
    )


def test_stochastic_rounding_is_deterministic():
    steps = 200
    first = bf16_training.train("bf16 + stochastic_rounding", steps, problem())
    second = bf16_training.train("bf16 + stochastic_rounding", steps, problem())
    nearest = bf16_training.train("bf16", steps, problem())
    for a, b, n in [(first.weight, second.weight, nearest.weight),
                    (first.bias, second.bias, nearest.bias)]:
        assert a.dtype == torch.bfloat16
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
        # Not vacuous: the stochastic rounding did round differently.
        assert not torch.equal(a.view(torch.int16), n.view(torch.int16))
    assert first.losses == second.losses


def test_stochastic_rounding_bits_do_not_depend_on_threads():
    # 1_000_003 elements: about 30 work units of the CPU loop's 32K grain,
    # shared between the threads, and odd, so a tail follows the vector body;
    # the 9-element tensor shares the call (the rounding key is per tensor).
    def run(threads: int) -> list[torch.Tensor]:
        torch.set_num_threads(threads)
        g = torch.Generator().manual_seed(3)
        params = [torch.randn(n, generator=g).to(torch.bfloat16).requires_grad_()
                  for n in (1_000_003, 9)]
        optimizer = fused_optim.AdamW(params, lr=1e-4, stochastic_rounding=True)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
            optimizer.step()
        return [p.detach().view(torch.int16) for p in params]

    for a, b in zip(run(1), run(2)):
        assert torch.equal(a, b)
