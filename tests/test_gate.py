"""The AdaptiveDiffusion gate reference: the third-order rule, warm-up, the consecutive-skip cap,
per-sample decisions, float32 statistics, reset, and bad input."""

import pytest
import torch

from fastdiff.gate import AdaptiveGate


def _decisions(gate, trajectory):
    return torch.stack([gate.observe(x) for x in trajectory]).T  # [batch, steps]


def test_a_straight_trajectory_is_skipped_after_warm_up_up_to_the_cap():
    v = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    straight = [k * v for k in range(12)]  # d_k constant: third difference 0
    flags = _decisions(AdaptiveGate(delta=0.01, max_skips=2, warmup=3), straight)[0].tolist()
    # calls 0-2 warm up; then at most 2 skips in a row, each run followed by a computed call
    assert flags == [False] * 3 + [True, True, False] * 3


def test_the_rule_needs_three_steps_whatever_the_warm_up():
    v = torch.ones(2, 3)
    flags = _decisions(AdaptiveGate(delta=0.5, max_skips=9, warmup=0), [k * v for k in range(5)])
    assert flags[:, :3].any().item() is False and flags[:, 3:].all().item() is True


def test_a_bending_trajectory_is_not_skipped():
    v = torch.ones(1, 8)
    bending = [(k**3) * v for k in range(10)]  # d_k grows quadratically: the third difference is large
    assert not _decisions(AdaptiveGate(delta=0.01, max_skips=4, warmup=3), bending).any()


def test_each_sample_decides_for_itself():
    v = torch.ones(8)
    trajectory = [torch.stack([k * v, (k**3) * v, k * v]) for k in range(8)]  # batch 3
    flags = _decisions(AdaptiveGate(delta=0.01, max_skips=8, warmup=3), trajectory)
    assert flags[0, 3:].all() and flags[2, 3:].all() and not flags[1].any()


def test_threshold_matches_the_formula_in_float64():
    g = torch.Generator().manual_seed(1)
    trajectory = [torch.randn(3, 4, 9, generator=g, dtype=torch.float64) * (1 + 0.05 * k) for k in range(8)]
    delta = 0.3
    flags = _decisions(AdaptiveGate(delta=delta, max_skips=100, warmup=0), trajectory)
    d = [None] + [(trajectory[k] - trajectory[k - 1]).abs().mean(dim=(1, 2)) for k in range(1, 8)]
    for k in range(3, 8):
        expected = (d[k] - 2 * d[k - 1] + d[k - 2]).abs() <= 2 * delta * d[k - 1]
        assert torch.equal(flags[:, k], expected), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_latents_get_float32_statistics_and_the_float64_decisions(dtype):
    g = torch.Generator().manual_seed(2)
    trajectory = [(torch.randn(3, 4, 33, generator=g) * (1 + 0.05 * k)).to(dtype) for k in range(8)]
    gate = AdaptiveGate(delta=0.3, max_skips=100, warmup=0)
    flags = _decisions(gate, trajectory)
    assert gate._d1.dtype == torch.float32 and flags.dtype == torch.bool
    exact = [x.double() for x in trajectory]  # the rounded inputs, differenced in float64
    d = [None] + [(exact[k] - exact[k - 1]).abs().mean(dim=(1, 2)) for k in range(1, 8)]
    for k in range(3, 8):
        assert torch.equal(flags[:, k], (d[k] - 2 * d[k - 1] + d[k - 2]).abs() <= 0.6 * d[k - 1]), k


def test_reset_starts_a_new_trajectory_and_shapes_must_not_change_without_it():
    v = torch.ones(2, 5)
    gate = AdaptiveGate(delta=0.01, max_skips=3, warmup=3)
    assert _decisions(gate, [k * v for k in range(6)])[:, 3:].all()
    with pytest.raises(ValueError, match=r"call reset\(\) before a new sampling call"):
        gate.observe(torch.ones(3, 5))
    gate.reset()
    assert gate.calls == 0
    assert not _decisions(gate, [k * torch.ones(3, 5) for k in range(3)]).any()  # warm-up again


def test_bad_settings_and_input_are_named():
    with pytest.raises(ValueError, match="delta must be a number >= 0, got -0.1"):
        AdaptiveGate(delta=-0.1)
    with pytest.raises(ValueError, match="max_skips must be an integer >= 0, got -1"):
        AdaptiveGate(max_skips=-1)
    with pytest.raises(ValueError, match="warmup must be an integer >= 0, got 1.5"):
        AdaptiveGate(warmup=1.5)
    with pytest.raises(ValueError, match="expected a floating-point latent tensor"):
        AdaptiveGate().observe(torch.ones(2, 3, dtype=torch.int64))
    assert repr(AdaptiveGate(0.004, 6, 3)) == "AdaptiveGate(delta=0.004, max_skips=6, warmup=3, per_sample=True)"
    with pytest.raises(RuntimeError, match=r"call start\(batch, device\) first"):
        AdaptiveGate().observe_stat(torch.ones(3))
    gate = AdaptiveGate()
    gate.start(3, "cpu")
    with pytest.raises(ValueError, match=r"statistic \(2,\) on cpu for a batch of \(3,\)"):
        gate.observe_stat(torch.ones(2))


def test_statistics_from_the_fused_step_give_the_same_decisions_as_latents():
    g = torch.Generator().manual_seed(4)
    trajectory = [torch.randn(3, 2, 11, generator=g) * (1 + 0.03 * k) + k for k in range(10)]
    from_latents = _decisions(AdaptiveGate(delta=0.3, max_skips=2), trajectory)
    gate = AdaptiveGate(delta=0.3, max_skips=2)
    gate.start(3, "cpu")
    stat = torch.empty(3)
    flags = [torch.zeros(3, dtype=torch.bool)]
    for k in range(1, 10):
        stat.copy_((trajectory[k] - trajectory[k - 1]).abs().reshape(3, -1).mean(1))  # one reused buffer
        flags.append(gate.observe_stat(stat))
    assert torch.equal(torch.stack(flags).T, from_latents) and from_latents.any()


def test_max_skips_zero_never_skips():
    v = torch.ones(1, 4)
    assert not _decisions(AdaptiveGate(delta=1.0, max_skips=0, warmup=0), [k * v for k in range(8)]).any()
