"""Engine backends: the graph cache (emulated on the CPU, captured on a GPU), the captured
sampling loop, backend choice, the fp16 fallback and out-of-memory errors."""

from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff.engines import OutOfMemoryError, backends
from fastdiff.graphs import CaptureError, GraphCache, StaticCall, signature
from fastdiff.program import compile as compile_program
from tests.conftest import HostToDevice, cuda_syncs_raise, forbid_host_reads, forbid_host_to_device, toy_engine

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (none here)")
PROMPTS = ["a red circle on a blue background", "a green square", "two yellow triangles"]


def affine(x, w):
    return x * w + 1


def test_graph_cache_reuses_static_buffers_and_recaptures_on_any_mismatch():
    cache = GraphCache("t", max_graphs=2, mode="emulate")
    x, w = torch.randn(3, 5), torch.randn(5)
    out1 = cache.run(affine, (x, w))
    assert torch.equal(out1, affine(x, w))
    x2 = torch.randn(3, 5)
    out2 = cache.run(affine, (x2, w))
    assert torch.equal(out2, affine(x2, w)) and torch.equal(out1, affine(x, w))  # copies of the static output
    assert cache.stats() == {"graphs": 1, "captures": 1, "replays": 2, "evictions": 0}
    cache.run(affine, (torch.randn(4, 5), w))  # batch change
    cache.run(affine, (x.double(), w.double()))  # dtype change: evicts the least recently used
    assert cache.stats()["captures"] == 3 and cache.stats()["evictions"] == 1 and len(cache) == 2
    x_t = torch.randn(5, 3).t()  # same shape, other strides
    assert torch.equal(cache.run(affine, (x_t, w)), affine(x_t, w))
    assert cache.stats()["captures"] == 4
    cache.run(affine, (x, w), extra="other")  # same tensors, another key
    assert cache.stats()["captures"] == 5


def test_graph_cache_serves_several_threads():
    """Engines may be called from several threads: one capture per key, and no thread ever gets
    a result computed from another thread's inputs (which the shared static buffers would give
    without the cache's lock: the function sleeps after its inputs were copied in)."""
    import threading
    import time

    def slow_double(x):
        time.sleep(0.002)
        return x * 2

    cache = GraphCache("t", mode="emulate")
    wrong, errors = [], []

    def worker(i):
        try:
            for j in range(15):
                x = torch.full((4, 3), float(100 * i + j))
                if not torch.equal(cache.run(slow_double, (x,)), x * 2):
                    wrong.append((i, j))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong, (errors, wrong[:5])
    assert cache.stats() == {"graphs": 1, "captures": 1, "replays": 60, "evictions": 0}


def test_graph_cache_refuses_bad_arguments():
    with pytest.raises(ValueError, match="max_graphs must be an integer >= 1"):
        GraphCache("t", max_graphs=0, mode="emulate")
    with pytest.raises(ValueError, match="graph mode must be one of"):
        GraphCache("t", mode="fast")
    with pytest.raises(TypeError, match="graph inputs must be tensors; argument 1 is float"):
        GraphCache("t", mode="emulate").run(affine, (torch.ones(2), 2.0))
    with pytest.raises(CaptureError, match="must return a tensor or a tuple of tensors"):
        StaticCall(lambda x: None, (torch.ones(2),), mode="emulate")
    with pytest.raises(CaptureError, match="the inputs are on cpu"):
        StaticCall(affine, (torch.ones(2), torch.ones(2)), mode="cuda")
    assert signature((torch.ones(2, 3),)) == (((2, 3), torch.float32, torch.device("cpu"), (3, 1)),)


def test_auto_and_explicit_backends_on_this_machine():
    assert backends.resolve("auto", "cpu")[0] == "eager"
    assert backends.resolve("eager", "cpu") == ("eager", "requested")
    with pytest.raises(backends.BackendUnavailableError, match="CUDA graphs need a CUDA device"):
        backends.resolve("cuda_graph", "cpu")
    with pytest.raises(ValueError, match="unknown backend 'trt'"):
        backends.resolve("trt", "cpu")
    rows = {name: (ok, detail) for name, ok, detail in backends.report("cpu")}
    assert set(rows) == {"eager", "cuda_graph", "compiled", "tensorrt", "auto"}
    assert rows["eager"][0] and not rows["cuda_graph"][0]
    with pytest.raises(ValueError, match="backend 'cpp' is a loop, not a module backend: use loop='cpp'"):
        backends.resolve("cpp", "cpu")
    assert rows["auto"][1].startswith("-> eager")
    if torch.cuda.is_available():
        assert backends.resolve("auto", "cuda")[0] in ("compiled", "cuda_graph")


def test_info_lists_the_backends_and_the_loops():
    from fastdiff.info import report

    text = report()
    for name in ("eager", "cuda_graph", "compiled", "tensorrt", "auto"):
        assert f"backend {name}:" in text
    for name in ("reference", "graph", "cpp"):
        assert f"loop {name}:" in text


def emulated_engine(**kw):
    """tiny-shapes with the graph cache's buffer semantics (mode "emulate") on the CPU."""
    return fastdiff.build_engine(
        "tiny-shapes", device="cpu", dtype="float32", backend="eager", graph_mode="emulate", **kw
    )


@pytest.fixture(scope="module")
def eager():
    pytest.importorskip("diffusers", reason="engines need diffusers")
    return fastdiff.build_engine("tiny-shapes", device="cpu", backend="eager")


@pytest.fixture(scope="module")
def graphed():
    pytest.importorskip("diffusers", reason="engines need diffusers")
    return emulated_engine()


def close(a, b):
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_captured_loop_matches_eager_and_recaptures_per_plan_batch_and_size(eager, graphed):
    graphed.runner.graphs.clear()
    captures = lambda: graphed.runner.graphs.captures  # noqa: E731
    ref = eager.sample(PROMPTS, steps=6, seed=1)
    out = graphed.sample(PROMPTS, steps=6, seed=1)
    assert close(out.latents, ref.latents) and out.nfe == [6, 6, 6] and out.unet_calls == 6
    # text encoder + loop + VAE decoder: one graph each
    assert captures() == 3
    keys = [key[0][0] for key in graphed.runner.graphs.graphs]
    assert keys == ["text_encoder", "loop", "vae_decoder"]
    again = graphed.sample(PROMPTS, steps=6, seed=2)  # same shapes: replays only
    assert captures() == 3 and close(again.latents, eager.sample(PROMPTS, steps=6, seed=2).latents)
    assert not torch.equal(again.latents, out.latents)  # outputs are copies, not the static buffer
    cases = [
        dict(steps=6, seed=3, num_images=2),  # batch 6: new loop + decoder graphs
        dict(steps=4, seed=3),  # another plan: a new loop graph
        dict(steps=6, seed=3, sampler="euler"),
        dict(steps=6, seed=3, height=48, width=32),  # another size
        dict(steps=6, seed=3, guidance_scale=1.0),  # unguided: another loop function
    ]
    for kw in cases:
        before = captures()
        assert close(graphed.sample(PROMPTS, **kw).latents, eager.sample(PROMPTS, **kw).latents), kw
        assert captures() > before, kw
    assert len(graphed.runner.graphs) <= graphed.runner.graphs.max_graphs


def test_captured_loop_never_reads_the_device_or_copies_to_it(graphed, monkeypatch):
    """What a CUDA graph cannot record: host reads (syncs) anywhere in the loop, and host->device
    copies inside the graph (its inputs are prepared before it). After the capture (warm-up) the
    emulated replays run the same Python as the capture did."""
    graphed.sample(PROMPTS[:2], steps=5, seed=0, sampler="dpmpp_2m")  # captured
    denoiser = graphed.denoiser(PROMPTS[:2])
    x_T = graphed.initial_noise(2, seed=0)
    plan = graphed.plan_for("dpmpp_2m", 5)
    before = graphed.runner.graphs.captures

    replay = graphed.runner.graphs.run

    def guarded_replay(fn, args, **kw):  # inside the graph: no host->device copies either
        with monkeypatch.context() as inside:
            forbid_host_to_device(inside)
            return replay(fn, args, **kw)

    monkeypatch.setattr(graphed.runner.graphs, "run", guarded_replay)
    forbid_host_reads(monkeypatch)
    latents = graphed.loop.run(compile_program(plan), denoiser, x_T, guidance=denoiser.guidance).latents
    monkeypatch.undo()
    assert graphed.runner.graphs.captures == before
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize(
    "copy",
    [
        lambda x: x + torch.tensor(1.0),
        lambda x: x + torch.as_tensor([1.0]),
        lambda x: x + torch.ones(1).to(x.device),
        lambda x: x + torch.ones(1).to(x),
        lambda x: x + torch.tensor([2.0], device=x.device),
        lambda x: x + torch.from_numpy(x.numpy()),
    ],
    ids=["tensor", "as_tensor", "to-device", "to-tensor", "factory-device", "from_numpy"],
)
def test_the_host_to_device_check_catches_every_form(monkeypatch, copy):
    """The check above can fail: each way of copying host data to the device is refused."""
    x = torch.ones(3)
    assert copy(x).shape == (3,)  # fine without the check
    forbid_host_to_device(monkeypatch)
    with pytest.raises(HostToDevice):
        copy(x)
    assert torch.equal(x.to(torch.float64), torch.ones(3, dtype=torch.float64))  # a dtype alone is no copy


def test_gated_and_callback_runs_use_per_call_graphs(eager, graphed):
    ref = eager.sample(PROMPTS, steps=12, seed=4, skip="adaptive")
    out = graphed.sample(PROMPTS, steps=12, seed=4, skip="adaptive")
    assert out.nfe == ref.nfe and out.skipped == ref.skipped and close(out.latents, ref.latents)
    assert any(key[0][0] == "unet" for key in graphed.runner.graphs.graphs)
    seen = []
    out = graphed.sample(PROMPTS, steps=4, seed=4, callback=lambda k, t, x: seen.append(k))
    assert seen == [0, 1, 2, 3] and close(out.latents, eager.sample(PROMPTS, steps=4, seed=4).latents)


def test_what_cannot_be_captured_runs_without_graphs_with_a_warning(eager, monkeypatch):
    from fastdiff import graphs

    engine = emulated_engine()
    real = graphs.StaticCall

    def refuse_loop(fn, example, **kw):
        if fn.__name__ in ("sampling_loop", "_run_text_encoder", "_run_vae_decoder"):
            raise CaptureError(f"{fn.__name__} synchronises")
        return real(fn, example, **kw)

    monkeypatch.setattr(graphs, "StaticCall", refuse_loop)
    with pytest.warns(RuntimeWarning) as record:
        out = engine.sample(PROMPTS, steps=5, seed=0)
    messages = " | ".join(str(w.message) for w in record)
    assert "text_encoder runs without CUDA graphs" in messages and "vae_decoder runs without" in messages
    assert "the sampling loop could not be captured whole" in messages
    assert close(out.latents, eager.sample(PROMPTS, steps=5, seed=0).latents)
    keys = [key[0][0] for key in engine.runner.graphs.graphs]
    assert keys == ["unet"]  # per-call graphs took over
    assert any("captured whole" in n for n in engine.notes)


def test_replaced_weights_drop_the_graphs(graphed):
    graphed.sample(PROMPTS[:1], steps=2, seed=0)
    assert len(graphed.runner.graphs) > 0
    name, param = next(iter(graphed.unet.named_parameters()))
    module = graphed.unet.get_submodule(name.rpartition(".")[0])
    original = param
    setattr(module, name.rpartition(".")[2], torch.nn.Parameter(param.detach() * 2))
    try:
        assert graphed.runner.guard(graphed.unet, *graphed.conditioner.modules(), *graphed.decoder.modules())
        assert len(graphed.runner.graphs) == 0
    finally:
        setattr(module, name.rpartition(".")[2], original)
    graphed.runner.guard(graphed.unet, *graphed.conditioner.modules(), *graphed.decoder.modules())


def test_call_unet_and_decode_go_through_the_backend(eager, graphed):
    x = torch.randn(2, 4, 8, 8)
    t = torch.full((2,), 500.0)
    cond = graphed.denoiser(PROMPTS[:2], guidance_scale=1.0).kwargs
    a = graphed.call_unet(x, t, **cond)
    assert close(a, eager.call_unet(x, t, **cond))
    b = graphed.call_unet(x * 0, t, **cond)
    assert not torch.equal(a, b)  # the first result was a copy
    assert close(graphed.decode(x), eager.decode(x))
    with pytest.raises(TypeError, match="the UNet takes conditioning"):
        graphed.call_unet(x, t, class_labels=torch.zeros(2, dtype=torch.long))


class Overflows(torch.nn.Module):
    """A denoiser whose activations overflow float16 (x·400 squared) but not bfloat16."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(400.0))
        self.dtype_seen = []

    def forward(self, x, t, class_labels=None, return_dict=False):
        self.dtype_seen.append(x.dtype)
        h = (x * self.scale) ** 2
        return (torch.sqrt(h) / self.scale * 0.1,)


def test_float16_overflow_falls_back_to_bfloat16_with_a_warning():
    unet = Overflows()
    engine = toy_engine(unet, torch.float16)
    with pytest.warns(RuntimeWarning, match="unet overflowed in float16.*now runs in bfloat16"):
        out = engine.sample(["0", "1"], steps=3, seed=0)
    assert torch.isfinite(out.latents).all() and out.latents.dtype == torch.float16
    assert unet.dtype_seen[0] == torch.float16 and unet.dtype_seen[-1] == torch.bfloat16
    assert any("bfloat16" in n for n in out.notes) and engine.notes == out.notes
    # The fallback is for good: the next call runs in bfloat16 straight away, without a warning.
    unet.dtype_seen.clear()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.sample(["0"], steps=3, seed=0)
    assert set(unet.dtype_seen) == {torch.bfloat16}
    # float32 engines never fall back (the same model does not overflow there).
    assert torch.isfinite(toy_engine(Overflows(), torch.float32).sample(["0"], steps=3, seed=0).latents).all()


def test_vae_float16_overflow_decodes_in_float32(untrained_shapes_dir, monkeypatch):
    engine = fastdiff.build_engine(untrained_shapes_dir, device="cpu", dtype="float16", backend="eager")
    decode = engine.decoder.vae.decode

    def overflowing(z, *a, **k):
        out = decode(z, *a, **k)
        if z.dtype == torch.float16:
            out.sample = out.sample * torch.tensor(float("inf"), dtype=z.dtype)
        return out

    monkeypatch.setattr(engine.decoder.vae, "decode", overflowing)
    with pytest.warns(RuntimeWarning, match="vae_decoder overflowed in float16.*float32"):
        out = engine.sample("a red circle", steps=2, seed=0)
    assert engine.decoder.vae.dtype == torch.float32 and len(out.images) == 1


def test_out_of_memory_names_the_need_and_leaves_the_engine_usable():
    class Hungry(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))
            self.fail = True

        def forward(self, x, t, class_labels=None, return_dict=False):
            if self.fail and x.shape[0] > 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return (x * self.w * 0.1,)

    engine = toy_engine(Hungry(), torch.float32, graph_mode="emulate")
    with pytest.raises(OutOfMemoryError, match=r"out of memory sampling batch 4 at 6x6 with toy .*smaller batch"):
        engine.sample(["0", "1"], num_images=2, steps=2, seed=0)
    assert len(engine.runner.graphs) == 0
    assert torch.isfinite(engine.sample(["1"], steps=2, seed=0).latents).all()  # still usable


@needs_cuda
def test_cuda_graph_backend_matches_eager_on_the_gpu():
    engine = fastdiff.build_engine("tiny-shapes", device="cuda", dtype=torch.float32, backend="cuda_graph")
    ref = fastdiff.build_engine("tiny-shapes", device="cuda", dtype=torch.float32, backend="eager")
    for kw in (dict(steps=6), dict(steps=6, num_images=2), dict(steps=4, height=48, width=32)):
        a = engine.sample(PROMPTS, seed=0, **kw).latents
        b = ref.sample(PROMPTS, seed=0, **kw).latents
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), kw
    assert all(call.graph is not None for call in engine.runner.graphs.graphs.values())


@needs_cuda
def test_captured_loop_has_no_host_sync_on_the_gpu():
    """Zero device->host synchronisations from the first UNet call to the final latent."""
    engine = fastdiff.build_engine("tiny-shapes", device="cuda", dtype=torch.float32, backend="cuda_graph")
    engine.sample(PROMPTS, steps=5, seed=0, sampler="dpmpp_2m")  # capture
    denoiser = engine.denoiser(PROMPTS)
    x_T = engine.initial_noise(3, seed=0)
    plan = engine.plan_for("dpmpp_2m", 5)
    torch.cuda.synchronize()
    with cuda_syncs_raise():
        latents = engine.loop.run(compile_program(plan), denoiser, x_T, guidance=denoiser.guidance).latents
    assert torch.isfinite(latents).all()
