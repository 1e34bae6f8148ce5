"""Shared fixtures and helpers: diffusers (skipped cleanly when absent), small awkward latents,
schedules, test models, the canonical-form oracle and the no-host-read guards."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before the
# kernels are defined (at import of fastdiff.ops.triton_step).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastdiff.schedules import DiscreteSchedule
from fastdiff.testing.gmm import GaussianMixture
from fastdiff.testing.parity import SD_CONFIG  # noqa: F401 (the tests' SD schedule config)


@pytest.fixture(scope="session")
def diffusers():
    return pytest.importorskip("diffusers", reason="diffusers is needed for parity tests (pip install diffusers)")


@pytest.fixture
def sd_schedule() -> DiscreteSchedule:
    return DiscreteSchedule.from_config(SD_CONFIG)


def odd_latents(batch: int = 3, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """x_T with an awkward shape: batch 3, 3 channels, 5x7."""
    return torch.randn(batch, 3, 5, 7, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| relative to max |b|."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def gmm_model(schedule):
    """model_fn(x, t) of the exact Gaussian-mixture denoiser for odd_latents' shape."""
    return GaussianMixture.random(3 * 5 * 7, 3, seed=2).denoiser(schedule)


def gmm_raw(schedule):
    """The same model as a raw_fn (x, t, index) -> output (unguided: samples are independent)."""
    model = gmm_model(schedule)
    return lambda x, t, index: model(x, t)


def guided_gmm(schedule):
    """raw_fn with guidance: [uncond; cond] with cond = 1.1·uncond + 0.05; its model_fn(x, t, w)
    applies the guidance as a reference."""
    model = gmm_model(schedule)

    def raw_fn(x, t, index):
        u = model(x, t)
        return torch.cat([u, 1.1 * u + 0.05])

    return raw_fn, lambda x, t, w: model(x, t) + w * (1.1 * model(x, t) + 0.05 - model(x, t))


W_MIX = torch.randn(3, 3, generator=torch.Generator().manual_seed(5)) * 0.4


def linear_raw(x, t, index, guided=True):
    """A linear model with channel mixing and a time dependence; [uncond; cond] when guided."""
    y = torch.einsum("ij,bjhw->bihw", W_MIX.to(x.dtype), x) * (t[:, None, None, None].to(x.dtype) / 1000)
    y = y + 0.05 * torch.tanh(x)
    return torch.cat([y, 0.8 * y + 0.02]) if guided else y


def canonical(plan, model_fn, x_T: torch.Tensor) -> torch.Tensor:
    """The test oracle: the plan's canonical form in float64 — input k = Σ_j coef[k, j]·b_j over
    x_T and every output kept, result Σ_j coef[N, j]·b_j. model_fn(x, t) gets float64 inputs and
    float32 times, as the loops give them."""
    coef = torch.tensor(plan.coef, dtype=torch.float64)
    basis = [x_T.double()]
    for k in range(plan.nfe):
        x = sum(coef[k, j] * basis[j] for j in range(k + 1))
        basis.append(model_fn(x, torch.full((x.shape[0],), float(plan.times[k]), dtype=torch.float32)).double())
    return sum(coef[-1, j] * basis[j] for j in range(plan.nfe + 1))


def run_plan(plan, model_fn, x_T: torch.Tensor, **options) -> torch.Tensor:
    """The result of a plan with model_fn(x, t) on the reference loop (the default loop)."""
    from fastdiff.denoisers import Unguided
    from fastdiff.loops import reference
    from fastdiff.program import compile as compile_program

    return reference.run(compile_program(plan), Unguided(model_fn), x_T, **options).latents


class HostSync(AssertionError):
    pass


def forbid_host_reads(monkeypatch) -> None:
    """Make every Tensor method that reads device data back to the host raise HostSync."""
    for method in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):

        def refuse(self, *args, _name=method, **kwargs):
            raise HostSync(f"the loop called Tensor.{_name}()")

        monkeypatch.setattr(torch.Tensor, method, refuse)


class HostToDevice(AssertionError):
    pass


# Tensor factories that carry host data: with or without device=, on a GPU they copy it there.
# (torch.empty/zeros/full(..., device=) are allocations and fill kernels, which a CUDA graph
# records like any kernel: they are not copies and are allowed.)
_FACTORIES = ("tensor", "as_tensor", "asarray", "from_numpy")


def _names_a_device(args, kwargs) -> bool:
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (str, int, torch.device, torch.Tensor)) and not isinstance(a, bool) for a in args)


def forbid_host_to_device(monkeypatch) -> None:
    """Make what copies host data to the device raise HostToDevice: the factories of host data
    (torch.tensor / as_tensor / asarray / from_numpy, device= or not), Tensor.to(device) /
    .to(other tensor) and Tensor.cuda(). On the CPU every tensor is on the host, so any such call
    in the guarded code is refused: on a GPU it would be a host->device copy."""
    for name in _FACTORIES:

        def refuse(*args, _name=name, **kwargs):
            raise HostToDevice(f"torch.{_name}() (a host->device copy on a GPU)")

        monkeypatch.setattr(torch, name, refuse)
    to = torch.Tensor.to

    def guarded_to(self, *args, **kwargs):
        if _names_a_device(args, kwargs):
            raise HostToDevice(f"Tensor.to({', '.join(map(repr, args))}) names a device (a host->device copy on a GPU)")
        return to(self, *args, **kwargs)

    def refuse_cuda(self, *args, **kwargs):
        raise HostToDevice("Tensor.cuda() (a host->device copy)")

    monkeypatch.setattr(torch.Tensor, "to", guarded_to)
    monkeypatch.setattr(torch.Tensor, "cuda", refuse_cuda)


@contextlib.contextmanager
def cuda_syncs_raise():
    """Inside, any device->host synchronisation on CUDA raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.fixture(scope="session")
def untrained_shapes_dir(tmp_path_factory):
    """A tiny-shapes pipeline directory with freshly initialised (untrained) weights."""
    pytest.importorskip("diffusers", reason="engines need diffusers")
    pytest.importorskip("transformers", reason="engines need transformers")
    from fastdiff.models import tiny_shapes

    out = tmp_path_factory.mktemp("untrained-shapes")
    components = tiny_shapes.build_components(out / "tokenizer", seed=0)
    components.vae.register_to_config(scaling_factor=0.7)
    tiny_shapes.save_pipeline(components, out, info={"default_guidance_scale": 3.0})
    return out


def toy_engine(unet, dtype, **kw):
    """An Engine over a toy class-conditional pixel `unet` (6x6x3) on the SD schedule."""
    from fastdiff.engines import Engine
    from fastdiff.engines.components import ClassConditioner, PixelDecoder

    return Engine(
        name="toy",
        unet=unet.to(dtype),
        conditioner=ClassConditioner(["0", "1"], 2),
        decoder=PixelDecoder(3),
        schedule=DiscreteSchedule.from_config(SD_CONFIG),
        sample_size=6,
        device="cpu",
        dtype=dtype,
        guidance_scale=1.0,
        **kw,
    )
