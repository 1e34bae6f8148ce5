"""The AdaptiveDiffusion gate: GateSpec (settings, validation, what the API and C++ accept), the
rule (third-order difference, warm-up, the consecutive-skip cap, per-sample decisions, float32
statistics), and the rule identical across its torch, Triton and C++ implementations."""

import numpy as np
import pytest
import torch

from fastdiff.gate import GateSpec
from fastdiff.loops import cpp
from fastdiff.ops import triton_step

needs_triton = pytest.mark.skipif(not triton_step.available(), reason=str(triton_step.why_unavailable()))
needs_cpp = pytest.mark.skipif(cpp.why_unavailable() is not None, reason=f"C++ loop: {cpp.why_unavailable()}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def torch_decisions(gate: GateSpec, stats: torch.Tensor) -> torch.Tensor:
    """GateSpec.decide over statistics [K, G] (row k: after call k, deciding call k + 1)."""
    d1 = torch.zeros(stats.shape[1])
    d2 = torch.zeros_like(d1)
    run = torch.zeros(stats.shape[1], dtype=torch.int32)
    flags = []
    for k in range(stats.shape[0]):
        skip, d1, d2, run = gate.decide(k + 1, stats[k].float(), d1, d2, run)
        flags.append(skip)
    return torch.stack(flags)


def decisions(gate: GateSpec, trajectory) -> torch.Tensor:
    """[batch, steps] flags for a latent trajectory x_0, x_1, ...: call 0 always runs, call k is
    decided from d_k = mean|x_k − x_{k−1}| (float32) per sample."""
    x = [t.float() for t in trajectory]
    stats = torch.stack([(x[k] - x[k - 1]).abs().reshape(len(x[k]), -1).mean(1) for k in range(1, len(x))])
    flags = torch_decisions(gate, stats)
    return torch.cat([torch.zeros(1, flags.shape[1], dtype=torch.bool), flags]).T


def test_a_straight_trajectory_is_skipped_after_warm_up_up_to_the_cap():
    v = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    straight = [k * v for k in range(12)]  # d_k constant: third difference 0
    flags = decisions(GateSpec(delta=0.01, max_skips=2, warmup=3, reuse="copy"), straight)[0].tolist()
    # calls 0-2 warm up; then at most 2 skips in a row, each run followed by a computed call
    assert flags == [False] * 3 + [True, True, False] * 3
    # extrapolated reuse: each run of skips follows two computed calls (GateSpec.refresh)
    flags = decisions(GateSpec(delta=0.01, max_skips=2, warmup=3), straight)[0].tolist()
    assert flags == [False] * 3 + [True, True, False, False] * 2 + [True]
    assert [GateSpec(reuse=r).refresh for r in ("extrapolate", "copy")] == [2, 1]


def test_the_rule_needs_three_steps_whatever_the_warm_up():
    v = torch.ones(2, 3)
    flags = decisions(GateSpec(delta=0.5, max_skips=9, warmup=0), [k * v for k in range(5)])
    assert not flags[:, :3].any() and flags[:, 3:].all()
    assert [GateSpec(warmup=w).active(c) for w in (0, 5) for c in (2, 3, 5)] == [False, True, True] + [False] * 2 + [
        True
    ]


def test_a_bending_trajectory_is_not_skipped():
    v = torch.ones(1, 8)
    bending = [(k**3) * v for k in range(10)]  # d_k grows quadratically: the third difference is large
    assert not decisions(GateSpec(delta=0.01, max_skips=4, warmup=3), bending).any()


def test_each_sample_decides_for_itself():
    v = torch.ones(8)
    trajectory = [torch.stack([k * v, (k**3) * v, k * v]) for k in range(8)]  # batch 3
    flags = decisions(GateSpec(delta=0.01, max_skips=8, warmup=3), trajectory)
    assert flags[0, 3:].all() and flags[2, 3:].all() and not flags[1].any()


def test_threshold_matches_the_formula_in_float64():
    g = torch.Generator().manual_seed(1)
    trajectory = [torch.randn(3, 4, 9, generator=g, dtype=torch.float64) * (1 + 0.05 * k) for k in range(8)]
    delta = 0.3
    flags = decisions(GateSpec(delta=delta, max_skips=100, warmup=0), trajectory)
    d = [None] + [(trajectory[k] - trajectory[k - 1]).abs().mean(dim=(1, 2)) for k in range(1, 8)]
    for k in range(3, 8):
        expected = (d[k] - 2 * d[k - 1] + d[k - 2]).abs() <= 2 * delta * d[k - 1]
        assert torch.equal(flags[:, k], expected), k


def test_max_skips_zero_never_skips():
    v = torch.ones(1, 4)
    assert not decisions(GateSpec(delta=1.0, max_skips=0, warmup=0), [k * v for k in range(8)]).any()


def test_decide_reads_nothing_back_and_keeps_float32_state():
    gate = GateSpec(delta=0.2)
    d = torch.full((3,), 1.0, dtype=torch.float16)
    made_two = torch.full((3,), -2, dtype=torch.int32)  # the state after two computed calls
    skip, d1, d2, run = gate.decide(4, d, torch.ones(3), torch.ones(3), made_two)
    assert skip.dtype == torch.bool and d1.dtype == torch.float32 and run.dtype == torch.int32
    assert d1 is not d and skip.all() and run.tolist() == [1, 1, 1]


# ---------------------------------------------------------------- one rule, three implementations
def statistics(calls: int, groups: int, seed: int) -> torch.Tensor:
    """d_k of slowly varying trajectories, some groups noisy enough to fail the rule now and then."""
    g = torch.Generator().manual_seed(seed)
    base = 1.0 + 0.03 * torch.arange(calls, dtype=torch.float32)[:, None]
    noise = torch.rand(calls, groups, generator=g) * torch.linspace(0.0, 0.4, groups)
    return (base + noise).float()


GATES = [
    GateSpec(delta=0.2, max_skips=2, warmup=3),
    GateSpec(delta=0.05, max_skips=4, warmup=0),
    GateSpec(delta=0.5, max_skips=1, warmup=6),
    GateSpec(delta=0.0, max_skips=3, warmup=3),
    GateSpec(delta=0.5, max_skips=2, warmup=3, reuse="copy"),
    GateSpec(delta=0.05, max_skips=1, warmup=0, reuse="copy"),
]


@pytest.mark.parametrize("gate", GATES, ids=lambda g: f"d{g.delta}-m{g.max_skips}-w{g.warmup}-{g.reuse}")
@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), pytest.param("cpp", marks=needs_cpp)])
def test_the_rule_is_identical_in_torch_triton_and_cpp(gate, impl):
    stats = statistics(14, 5, seed=3)
    want = torch_decisions(gate, stats)
    if impl == "cpp":
        from fastdiff import _C

        got = torch.from_numpy(_C.gate_decisions(stats.numpy(), gate.to_dict()).astype(bool))
    else:
        d1, d2 = torch.zeros(5, device=DEVICE), torch.zeros(5, device=DEVICE)
        run = torch.zeros(5, dtype=torch.int32, device=DEVICE)
        rows = []
        for k in range(stats.shape[0]):  # one block of one element per group: the kernel sums d itself
            flags = torch.empty(5, dtype=torch.int8, device=DEVICE)
            triton_step.gate_decide(
                stats[k].reshape(5, 1).to(DEVICE), 1, d1, d2, run, flags,
                active=gate.active(k + 1), delta=gate.delta, max_skips=gate.max_skips, refresh=gate.refresh,
            )  # fmt: skip
            rows.append(flags.cpu().bool())
        got = torch.stack(rows)
    assert torch.equal(got, want)
    assert want.any() and not want.all()  # the statistics exercise both outcomes
    assert not want[:2].any()  # calls 1 and 2 always run


# ---------------------------------------------------------------- settings and bad input
def test_gate_specs_are_frozen_values_with_the_cpp_fields():
    gate = GateSpec(delta=0.004, max_skips=6, warmup=3)
    assert gate.to_dict() == {"delta": 0.004, "max_skips": 6, "warmup": 3, "per_sample": True, "reuse": "extrapolate"}
    assert gate == GateSpec(0.004, 6, 3) and hash(gate) == hash(GateSpec(0.004, 6, 3))
    assert repr(gate) == "GateSpec(delta=0.004, max_skips=6, warmup=3, per_sample=True, reuse='extrapolate')"
    with pytest.raises(AttributeError):
        gate.delta = 0.1
    assert GateSpec(delta=1).delta == 1.0 and isinstance(GateSpec(delta=1).delta, float)


def test_skip_arguments_resolve_to_a_gate_spec():
    assert GateSpec.from_skip(None) is None
    assert GateSpec.from_skip("adaptive") == GateSpec()
    spec = GateSpec(delta=0.2)
    assert GateSpec.from_skip(spec) is spec
    with pytest.raises(ValueError, match="skip must be None, 'adaptive' or a GateSpec, got 'always'"):
        GateSpec.from_skip("always")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"delta": -0.1}, "delta must be a finite number >= 0, got -0.1"),
        ({"delta": float("nan")}, "delta must be a finite number >= 0, got nan"),
        ({"delta": True}, "delta must be a finite number >= 0, got True"),
        ({"max_skips": -1}, "max_skips must be an integer >= 0, got -1"),
        ({"warmup": 1.5}, "warmup must be an integer >= 0, got 1.5"),
        ({"per_sample": "yes"}, "per_sample must be True or False, got 'yes'"),
        ({"reuse": "last"}, "reuse must be one of 'extrapolate', 'copy', got 'last'"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=f"GateSpec: {message}"):
        GateSpec(**kwargs)


@needs_cpp
def test_the_cpp_bridge_takes_exactly_the_gate_spec_fields():
    from fastdiff import _C

    stats = np.ones((4, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="unknown gate option 'detla'"):
        _C.gate_decisions(stats, {**GateSpec().to_dict(), "detla": 0.1})
    with pytest.raises(ValueError, match="gate option 'per_sample' is missing"):
        _C.gate_decisions(stats, {"delta": 0.1, "max_skips": 2, "warmup": 3})
    with pytest.raises(ValueError, match="gate option reuse must be 'extrapolate' or 'copy', got 'last'"):
        _C.gate_decisions(stats, {**GateSpec().to_dict(), "reuse": "last"})
    with pytest.raises(TypeError, match=r"gate must be GateSpec.to_dict\(\)"):
        _C.gate_decisions(stats, GateSpec())
