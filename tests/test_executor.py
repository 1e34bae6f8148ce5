"""The sampling loop: memory held, no host sync, dtypes, callbacks, bad model outputs."""

import contextlib
import gc
import weakref

import pytest
import torch

from fastdiff import solvers
from fastdiff.executor import ModelOutputError, run
from fastdiff.testing import GaussianMixture
from tests.conftest import odd_latents, rel_rms


def gmm_model(schedule):
    return GaussianMixture.random(3 * 5 * 7, 3, seed=2).denoiser(schedule)


def test_dpmpp_2m_20_steps_holds_at_most_four_latents(sd_schedule):
    plan = solvers.build("dpmpp_2m", sd_schedule, 20)
    model = gmm_model(sd_schedule)
    seen: list[weakref.ref] = []
    alive_at_call = []

    def counting_model(x, t):
        gc.collect()
        refs = seen + [weakref.ref(x)]
        alive = {id(r()) for r in refs if r() is not None}
        alive_at_call.append(len(alive) + 1)  # + the output about to be created
        out = model(x, t)
        seen.extend([weakref.ref(x), weakref.ref(out)])
        return out

    x_T = odd_latents()
    run(plan, counting_model, x_T)
    # x_T itself is the caller's; everything counted was produced for or by the loop.
    assert max(alive_at_call) <= 4, alive_at_call
    assert max(alive_at_call) == plan.recurrent().peak_latents


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def cuda_syncs_raise():
    """Inside, any device->host synchronisation on CUDA raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def forbid_host_reads(monkeypatch) -> None:
    """Make every Tensor method that reads device data back to the host raise HostSync."""
    for method in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):

        def refuse(self, *args, _name=method, **kwargs):
            raise HostSync(f"the loop called Tensor.{_name}()")

        monkeypatch.setattr(torch.Tensor, method, refuse)


def test_the_loop_never_reads_device_data_back(sd_schedule, monkeypatch):
    plan = solvers.build("unipc", sd_schedule, 8, solver_order=3)
    model = gmm_model(sd_schedule)
    x_T = odd_latents()
    expected = run(plan, model, x_T)  # warm: compiles the recurrent form
    forbid_host_reads(monkeypatch)
    result = run(plan, model, x_T)
    monkeypatch.undo()
    assert torch.equal(result, expected)


@pytest.mark.gpu
def test_no_synchronisation_on_cuda(sd_schedule):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    plan = solvers.build("dpmpp_2m", sd_schedule, 10)
    model = gmm_model(sd_schedule)
    x_T = odd_latents().cuda()
    run(plan, model, x_T)  # warm-up (plan compile, CUDA init)
    with cuda_syncs_raise():
        run(plan, model, x_T)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_low_precision_latents_track_float64(sd_schedule, dtype, tol):
    plan = solvers.build("dpmpp_2m", sd_schedule, 10)
    model = gmm_model(sd_schedule)
    x_T = odd_latents()
    exact = run(plan, model, x_T.double())
    result = run(plan, model, x_T.to(dtype))
    assert result.dtype == dtype
    assert rel_rms(result, exact) < tol


def test_x_T_is_not_modified(sd_schedule):
    x_T = odd_latents()
    before = x_T.clone()
    run(solvers.build("ddim", sd_schedule, 5), gmm_model(sd_schedule), x_T)
    assert torch.equal(x_T, before)


def test_model_receives_batch_times_on_the_latents_device(sd_schedule):
    plan = solvers.build("euler", sd_schedule, 6)
    seen = []
    model = gmm_model(sd_schedule)

    def recording(x, t):
        seen.append(t.clone())
        return model(x, t)

    run(plan, recording, odd_latents())
    assert all(t.shape == (3,) and t.dtype == torch.float32 for t in seen)
    assert [float(t[0]) for t in seen] == [float(torch.tensor(v, dtype=torch.float32)) for v in plan.times]


def test_callback_sees_every_next_input_and_the_result(sd_schedule):
    plan = solvers.build("dpmpp_2m", sd_schedule, 6)
    inputs, steps = [], []
    model = gmm_model(sd_schedule)

    def recording(x, t):
        inputs.append(x.clone())
        return model(x, t)

    def callback(k, t, x):
        steps.append((k, x.clone()))

    result = run(plan, recording, odd_latents(), callback=callback)
    assert [k for k, _ in steps] == list(range(6))
    for (_, x), nxt in zip(steps, inputs[1:]):
        assert torch.equal(x, nxt)
    assert torch.equal(steps[-1][1], result)


def test_identity_model_output_aliasing_the_input_is_copied(sd_schedule):
    plan = solvers.build("dpmpp_2m", sd_schedule, 5)
    x_T = odd_latents().double()
    result = run(plan, lambda x, t: x, x_T)
    # same plan with a model that returns a fresh copy: aliasing must not change anything
    assert torch.equal(result, run(plan, lambda x, t: x.clone(), x_T))


def test_views_returned_by_the_model_are_not_written(sd_schedule):
    plan = solvers.build("dpmpp_2m", sd_schedule, 5)
    model = gmm_model(sd_schedule)
    kept = []

    def chunked(x, t):
        both = torch.cat([model(x, t), model(x, t)])  # like a CFG batch
        kept.append((both, both.clone()))
        return both.chunk(2)[0]

    run(plan, chunked, odd_latents())
    assert all(torch.equal(a, b) for a, b in kept)


def test_bad_model_outputs_name_the_problem(sd_schedule):
    plan = solvers.build("ddim", sd_schedule, 4)
    x_T = odd_latents()
    with pytest.raises(
        ModelOutputError, match=r"model call 0 returned shape \(3, 3, 5\) for an input of shape \(3, 3, 5, 7\)"
    ):
        run(plan, lambda x, t: x[..., 0], x_T)
    with pytest.raises(ModelOutputError, match="returned tuple, expected a torch.Tensor"):
        run(plan, lambda x, t: (x,), x_T)
    with pytest.raises(TypeError, match="plan must be a StepPlan"):
        run("ddim", lambda x, t: x, x_T)
    with pytest.raises(ValueError, match="x_T must be a floating-point tensor"):
        run(plan, lambda x, t: x, torch.zeros(3, 4, dtype=torch.int64))


def test_model_output_dtype_is_converted_to_the_latents(sd_schedule):
    plan = solvers.build("ddim", sd_schedule, 4)
    model = gmm_model(sd_schedule)
    result = run(plan, lambda x, t: model(x, t).half(), odd_latents())
    assert result.dtype == torch.float32
