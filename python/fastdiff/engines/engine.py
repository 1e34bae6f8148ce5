"""Engine: conditioner + UNet (through a backend) + decoder + a loop + plan cache, behind `sample`.

`Engine.sample` = resolve the request (prompts, size, plan, gate) -> encode the prompts -> run
the loop chosen at construction on the plan's Program -> decode. The backend decides how the
modules execute (eager, CUDA graphs, torch.compile); the loop how the Program runs
(`fastdiff.loops`: reference, graph, cpp).
"""

from __future__ import annotations

import math
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import loops, solvers
from ..denoisers import GuidedDenoiser
from ..dtypes import dtype_name
from ..gate import GateSpec
from ..loops.contract import LoopResult, check_gate_for
from ..plan import StepPlan
from ..program import compile as compile_program
from ..schedules import DiscreteSchedule
from . import backends as _backends
from .backends import Runner
from .components import TextConditioner, VaeDecoder, to_pil

# samplers whose plans are fitted to a model and shipped with it, best first ("distilled": the plan a
# progressively distilled student was trained for, "distilled_stochastic" the paper's stochastic
# sampler on twice its steps; fastdiff.distill.progressive)
CALIBRATED = ("distilled", "distilled_stochastic", "usf", "olss")
AUTO = "auto"  # the best plan the model has for the step count: a shipped CALIBRATED one, else FALLBACK
FALLBACK = "dpmpp_2m"


def shipped_steps(plans_dir: Path | None, kind: str) -> list[int]:
    """Step counts N with a plans_dir/<kind>-N.json (a model's shipped "usf" or "olss" plans)."""
    if plans_dir is None or not plans_dir.is_dir():
        return []
    names = (p.stem.rpartition("-") for p in plans_dir.glob(f"{kind}-*.json"))
    return sorted(int(n) for head, _, n in names if head == kind and n.isdigit())


def _stamp(path: Path) -> tuple:
    """What changes when a file does: an engine rereads shipped settings only then."""
    stat = path.stat()
    return (str(path), stat.st_mtime_ns, stat.st_size)


class NonFiniteError(FloatingPointError):
    """Sampling produced NaN or infinite latents."""


class OutOfMemoryError(torch.OutOfMemoryError):
    """The device ran out of memory while sampling; the message names what was needed."""


@dataclass
class SampleOutput:
    images: list  # PIL images
    latents: torch.Tensor  # the plan's result, before decoding
    nfe: list[int]  # UNet calls made for each sample (a guided call on the 2x batch counts once)
    timings: dict[str, float]  # seconds: encode, denoise, decode, total
    prompts: list[str]
    seed: int
    plan: StepPlan
    random_weights: bool = False  # True: the model has random weights (speed benchmarks only)
    notes: list[str] = field(default_factory=list)
    unet_calls: int = 0  # batched UNet invocations (a compacted batch counts once)
    skipped: list[list[int]] = field(default_factory=list)  # per sample, the calls the gate skipped
    shallow_calls: int = 0  # of unet_calls, those that reused the deep features (feature_cache)


@dataclass
class _Request:
    """A sample call's arguments, checked and resolved."""

    prompts: list[str]  # one per image
    negatives: list[str] | None
    guidance: float | torch.Tensor  # one weight, or one per image
    seed: int
    height: int
    width: int
    plan: StepPlan
    gate: GateSpec | None


class UNetCall:
    """The UNet as GuidedDenoiser calls it, unet(x, t, **cond, return_dict=False) -> (out,),
    run through the engine's backend (inner=True: without graphs, for a captured loop). Inputs
    are cast to the UNet's dtype when it differs from the latents' (after an fp16 fallback)."""

    def __init__(self, call, keys: tuple[str, ...], *, inner: bool = False):
        self.call = call
        self.keys = keys
        self.inner = inner

    @property
    def dtype(self) -> torch.dtype:
        return self.call.dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor, return_dict: bool = False, **cond):
        if set(cond) != set(self.keys):
            raise TypeError(f"the UNet takes conditioning {self.keys}, got {tuple(cond)}")
        values = [cond[k] for k in self.keys]
        dtype = self.call.dtype
        if x.dtype != dtype:
            x = x.to(dtype)
            values = [v.to(dtype) if v.is_floating_point() else v for v in values]
        fn = self.call.inner if self.inner else self.call
        return (fn(x, t, *values),)


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def device_memory(device) -> str:
    """'the GPU has X GiB, Y GiB free' for a CUDA device (for memory errors)."""
    if torch.device(device).type != "cuda":
        return f"{device} memory is the host's"
    free, total = torch.cuda.mem_get_info(device)
    return f"the GPU has {_gib(total)}, {_gib(free)} free"


def _fallback_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 (float32's range) where the device supports it, else float32."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float32
    return torch.bfloat16


class Engine:
    """A diffusion model ready to sample: engine.sample("a red circle on a blue background")."""

    def __init__(
        self,
        *,
        name: str,
        unet: torch.nn.Module,
        conditioner,
        decoder,
        schedule: DiscreteSchedule,
        sample_size: int,
        device: torch.device,
        dtype: torch.dtype,
        sampler: str = AUTO,
        guidance_scale: float = 7.5,
        backend: str = "eager",
        loop: str = "auto",
        random_weights: bool = False,
        plans_dir=None,
        graph_mode: str | None = "default",
        max_graphs: int = 4,
        distilled_steps: int | None = None,
    ):
        """backend: how the modules run, "auto", "eager", "cuda_graph" or "compiled"
        (`fastdiff.engines.backends`; an unavailable one is a BackendUnavailableError naming
        why). loop: how the plan runs, "auto" (graph when the backend captures graphs, else
        reference), "reference", "graph" or "cpp" (`fastdiff.loops`). max_graphs bounds the
        captured graphs kept (each holds a memory pool). graph_mode "emulate" gives the graph
        cache's buffer semantics without CUDA (tests only). distilled_steps: a progressively
        distilled student's step count: it samples only with its plan (plans/distilled-N.json)."""
        self.backend, self.backend_reason = _backends.resolve(backend, device)
        self.name = name
        self.unet = unet
        self.conditioner = conditioner
        self.decoder = decoder
        self.schedule = schedule
        self.sample_size = sample_size  # latent size; image size = sample_size * decoder.factor
        self.device = torch.device(device)
        self.dtype = dtype
        self.sampler = sampler
        self.guidance_scale = guidance_scale
        self.random_weights = random_weights
        self.plans_dir = Path(plans_dir) if plans_dir is not None else None
        self.distilled_steps = distilled_steps
        self._plans: dict[tuple[str, int], StepPlan] = {}
        self._feature_cache = None  # FeatureCache, made on first use
        self._gates: dict[tuple[str, int], tuple] = {}  # (sampler, steps) -> (file stamp, gate_for's answer)
        self._choices: dict[int, tuple] = {}  # steps -> (auto.json's stamp, _measured_choice's answer)
        self._notes: list[str] = []  # things that happened to the engine (fp16 fallbacks, ...)
        self.runner = Runner(self.backend, self.device, graph_mode=graph_mode, max_graphs=max_graphs)
        self.loop = loops.create(loop, device=self.device, dtype=dtype, graphs=self.runner.graphs)
        keys = conditioner.keys

        def unet_fn(x, t, *values):
            return self.unet(x, t, **dict(zip(keys, values)), return_dict=False)[0]

        self._unet_call = self.runner.wrap("unet", unet_fn, unet)
        self._unet = UNetCall(self._unet_call, keys)
        self._unet_inner = UNetCall(self._unet_call, keys, inner=True)
        conditioner.accelerate(self.runner)
        decoder.accelerate(self.runner)

    def __repr__(self) -> str:
        flag = ", RANDOM WEIGHTS" if self.random_weights else ""
        return (
            f"Engine({self.name}, {self.device}, {dtype_name(self.dtype)}, {self.backend}, loop {self.loop.name}{flag})"
        )

    @property
    def image_size(self) -> int:
        return self.sample_size * self.decoder.factor

    @property
    def notes(self) -> list[str]:
        """What happened to the engine (fp16 fallbacks, a loop that could not be captured)."""
        return self._notes + self.loop.notes

    def resolve_sampler(self, sampler: str | None, steps: int) -> str:
        """The sampler a request runs: `sampler` (None: the engine's), with "auto" resolved to the
        best plan the model has for `steps` calls: the one plans/auto.json measured best on
        validation samples, else the first shipped of "usf" (searched), "olss", else DPM-Solver++(2M)."""
        sampler = sampler or self.sampler
        if sampler != AUTO:
            return sampler
        chosen = self._measured_choice(steps)
        if chosen is not None:
            return chosen
        for kind in CALIBRATED:
            if steps in self.shipped_plans(kind):
                return kind
        return FALLBACK

    def _measured_choice(self, steps: int) -> str | None:
        """The sampler plans/auto.json chose for `steps` on validation samples
        (`fastdiff.calibration.choice`), if the plans it compared are still the ones shipped. The
        file is read once and again only when it changes (every "auto" request asks)."""
        path = None if self.plans_dir is None else self.plans_dir / "auto.json"
        if path is None or not path.is_file():
            return None
        stamp = _stamp(path)
        cached = self._choices.get(steps)
        if cached is None or cached[0] != stamp:
            self._choices[steps] = (stamp, self._read_choice(path, steps))
        return self._choices[steps][1]

    def _read_choice(self, path: Path, steps: int) -> str | None:
        from .choice import load_choice

        entry = load_choice(path)["choices"].get(str(steps))
        if entry is None:
            return None
        for kind, digest in entry["hashes"].items():
            # Shipped plans are files: bit-exact. A built solver's coefficients may differ in the last
            # bit between machines (numpy's SIMD exp/log), so its hash is a record, not a check.
            if kind not in CALIBRATED:
                continue
            try:
                if self.plan_for(kind, steps).hash() != digest:
                    return None
            except ValueError:  # a plan it compared is no longer shipped
                return None
        return entry["sampler"]

    def plan_for(self, sampler: str, steps: int) -> StepPlan:
        """The plan of sampler at steps on this model's schedule (cached per (sampler, steps)).

        Calibrated samplers ("usf", "olss") use the plans shipped with the model (plans/usf-N.json,
        plans/olss-N.json); "auto" is the best of those for `steps`, else DPM-Solver++(2M).
        """
        sampler = self.resolve_sampler(sampler, steps)
        key = (sampler, steps)
        if key not in self._plans:
            if sampler in CALIBRATED:
                self._plans[key] = self._shipped_plan(sampler, steps)
            else:
                self._plans[key] = solvers.build_variant(sampler, self.schedule, steps)
        return self._plans[key]

    def shipped_plans(self, kind: str = "olss") -> list[int]:
        """Step counts with a shipped `kind` plan ("usf" or "olss")."""
        return shipped_steps(self.plans_dir, kind)

    def _shipped_plan(self, kind: str, steps: int) -> StepPlan:
        path = self.plans_dir / f"{kind}-{steps}.json" if self.plans_dir is not None else None
        if path is None or not path.is_file():
            have = ", ".join(map(str, self.shipped_plans(kind))) or "none"
            make = {
                "usf": f"fastdiff search --model {self.name} --nfe {steps}",
                "olss": f"fastdiff calibrate --model {self.name} --steps {steps}",
            }.get(kind)
            if make is None:
                raise ValueError(
                    f"{self.name} ships no {kind} plan for {steps} steps (shipped: {have}): a distilled plan comes "
                    f"with a progressively distilled student (fastdiff distill --stage progressive)"
                )
            raise ValueError(
                f"{self.name} ships no {kind} plan for {steps} steps (shipped: {have}); make one with "
                f"`{make} --out plan.json` and pass plan=<that file>"
            )
        plan = StepPlan.load(path)
        plan.check_schedule(self.schedule)
        return plan

    @property
    def gates_dir(self) -> Path | None:
        """Where the model's calibrated gate settings live (gates/ next to plans/)."""
        return None if self.plans_dir is None else self.plans_dir.parent / "gates"

    def gate_for(self, sampler: str, steps: int) -> GateSpec | None:
        """The calibrated gate settings shipped for (sampler, steps), gates/<sampler>-<steps>.json
        (`fastdiff calibrate-gate`), or None when there are none or they were calibrated for
        another plan than this engine makes for (sampler, steps). A file is read once and again
        only when it changes (skip="adaptive" asks on every sample call)."""
        from ..gate import read_settings

        sampler = self.resolve_sampler(sampler, steps)
        path = None if self.gates_dir is None else self.gates_dir / f"{sampler}-{steps}.json"
        if path is None or not path.is_file():
            return None
        stamp = _stamp(path)
        cached = self._gates.get((sampler, steps))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        doc, gate = read_settings(path)
        if doc.get("plan_hash") != self.plan_for(sampler, steps).hash():
            gate = None
        self._gates[sampler, steps] = (stamp, gate)
        return gate

    def _size(self, height: int | None, width: int | None) -> tuple[int, int]:
        f = self.decoder.factor
        height = self.image_size if height is None else height
        width = self.image_size if width is None else width
        for what, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % f:
                raise ValueError(
                    f"{what}={value!r} must be a positive multiple of {f} (the {self.name} autoencoder's downsampling "
                    f"factor); the model's native size is {self.image_size}"
                )
        return height, width

    def denoiser(
        self,
        prompts: list[str],
        *,
        guidance_scale: float | torch.Tensor | None = None,
        negative_prompts: list[str] | None = None,
    ) -> GuidedDenoiser:
        """The raw_fn of a batch of prompts for the loops: encoded once; with guidance_scale > 1
        one UNet call on the 2x batch [uncond; cond], the weights in `.guidance` (guidance_scale:
        a float or one per prompt). A guidance-distilled student (`embeds_guidance`) takes the
        weight as an input instead: one call on the batch, no guidance left for the loop."""
        guidance = self.guidance_scale if guidance_scale is None else guidance_scale
        guidance = guidance if isinstance(guidance, torch.Tensor) else float(guidance)
        negatives = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if getattr(self.conditioner, "embeds_guidance", False):
            if any(n != "" for n in negatives):
                raise ValueError(
                    f"{self.name} is a guidance-distilled student: it learned guidance against the empty prompt and "
                    "takes no negative prompt"
                )
            cond = self.conditioner.encode(list(prompts), self.device, self.dtype, guidance=guidance)
            return GuidedDenoiser(self._unet, cond, capture_unet=self._unet_inner)
        cond = self.conditioner.encode(list(prompts), self.device, self.dtype)
        uncond = (
            self.conditioner.encode(negatives, self.device, self.dtype)
            if bool(torch.any(torch.as_tensor(guidance) > 1))
            else None
        )
        return GuidedDenoiser(self._unet, cond, uncond, guidance, capture_unet=self._unet_inner)

    def initial_noise(self, batch: int, *, seed: int, height: int | None = None, width: int | None = None):
        """x_T as diffusers draws it: a CPU generator seeded with `seed`, in the model's dtype."""
        height, width = self._size(height, width)
        f = self.decoder.factor
        shape = (batch, self.decoder.channels, height // f, width // f)
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        return torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)

    def _fresh_noise(self, seed: int, x_T: torch.Tensor):
        """The noise a stochastic plan adds, as diffusers draws a scheduler's: from the CPU
        generator seeded with `seed`, after x_T (so a seed gives the same images every time)."""
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        torch.randn(x_T.shape, generator=generator, dtype=self.dtype)  # x_T's draw

        def noise(k: int, x: torch.Tensor) -> torch.Tensor:
            return torch.randn(x.shape, generator=generator, dtype=self.dtype).to(x.device)

        return noise

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _fall_back(self, module: torch.nn.Module, call, dtype: torch.dtype) -> str:
        """Move a module that overflowed in float16 to `dtype` for good; returns the note."""
        module.to(dtype)
        call.rebuild()
        note = f"{call.name} overflowed in float16 (NaN/inf outputs); it now runs in {dtype_name(dtype)} on this engine"
        self._notes.append(note)
        warnings.warn(f"fastdiff: {self.name}: {note}", RuntimeWarning, stacklevel=4)
        return note

    def _modules(self) -> list[torch.nn.Module]:
        return [self.unet, *self.conditioner.modules(), *self.decoder.modules()]

    def _out_of_memory(self, exc: BaseException, batch: int, height: int, width: int) -> OutOfMemoryError:
        """A clear OutOfMemoryError; the captured graphs are dropped so the engine stays usable."""
        if self.runner.graphs is not None:
            self.runner.graphs.clear()
        weights = sum(p.numel() * p.element_size() for m in self._modules() for p in m.parameters())
        need = f"batch {batch} at {height}x{width} with {self.name} ({_gib(weights)} of weights"
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.empty_cache()
            need += f", {_gib(peak)} allocated at the peak; {device_memory(self.device)} now)"
        else:
            need += f") on {self.device}"
        return OutOfMemoryError(
            f"out of memory sampling {need}: use a smaller batch (num_images) or size, float16 weights, "
            f"or backend='eager' (captured graphs keep their own memory pools). The engine is still usable. "
            f"Cause: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        )

    def call_unet(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        """One raw UNet call through the backend (what a sampling step costs): x [B, C, h, w],
        t [B], cond the conditioner's tensors (e.g. encoder_hidden_states)."""
        with torch.no_grad():
            return self._unet(x, t, **cond)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] through the backend (the VAE decoder for latent models)."""
        return self.decoder(latents)

    def sample(
        self,
        prompt: str | list[str],
        steps: int = 5,
        *,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        seed: int | None = None,
        num_images: int = 1,
        height: int | None = None,
        width: int | None = None,
        sampler: str | None = None,
        plan: StepPlan | str | Path | None = None,
        callback=None,
        skip: str | GateSpec | None = None,
        feature_cache: int | None = None,
        latents: torch.Tensor | None = None,
    ) -> SampleOutput:
        """Sample images. A list of prompts is one batch; each prompt gets num_images images.

        guidance_scale defaults to the model's; plan (a StepPlan or a plan file) overrides
        sampler/steps. skip: "adaptive" or a GateSpec: skip UNet calls where the latent trajectory
        is locally smooth (AdaptiveDiffusion), predicting the skipped outputs from the previous
        two; "adaptive" uses the model's calibrated settings for (sampler, steps) when it ships
        them (`gate_for`), else GateSpec()'s defaults. ``out.nfe`` then tells the calls made per
        sample. callback(k, t, x) sees each next model
        input. feature_cache: an interval N; of the UNet calls that run, every N-th is full and the
        others reuse the deep features of the last full one (DeepCache-style,
        `fastdiff.engines.feature_cache`; eager backend, per-batch gate decisions only). The
        initial noise is drawn like diffusers does (CPU generator seeded with `seed`,
        in the model's dtype), so a diffusers pipeline with a PlanScheduler reproduces the images.
        guidance_scale may be one weight per prompt; latents (diffusers' convention) replaces the
        initial noise, [prompts x num_images, C, h, w] (`initial_noise`): a server batching requests
        of different seeds draws each request's own.
        """
        start = time.perf_counter()
        request = self._request(
            prompt, steps, guidance_scale, negative_prompt, seed, num_images, height, width, sampler, plan, skip
        )
        x_T = None if latents is None else self._check_latents(latents, request)
        interval = self._check_feature_cache(feature_cache, request.gate)
        notes: list[str] = []
        try:
            self.runner.guard(*self._modules())
            denoiser = self.denoiser(
                request.prompts, guidance_scale=request.guidance, negative_prompts=request.negatives
            )
            self._sync()
            encoded = time.perf_counter()
            if x_T is None:
                x_T = self.initial_noise(
                    len(request.prompts), seed=request.seed, height=request.height, width=request.width
                )
            result, shallow = self._denoise(request, denoiser, x_T, callback, notes, interval)
            self._sync()
            denoised = time.perf_counter()
            images = self._decode(result.latents, notes)
            self._sync()
        except torch.OutOfMemoryError as exc:
            if isinstance(exc, OutOfMemoryError):
                raise
            raise self._out_of_memory(exc, len(request.prompts), request.height, request.width) from exc
        done = time.perf_counter()
        if self.random_weights:
            notes.append("random weights: outputs are noise, for speed benchmarks only")
        timings = {"encode": encoded - start, "denoise": denoised - encoded, "decode": done - denoised}
        return SampleOutput(
            images=to_pil(images),
            latents=result.latents,
            nfe=result.nfe,
            unet_calls=result.unet_calls,
            skipped=result.skipped,
            shallow_calls=shallow,
            timings={**timings, "total": done - start},
            prompts=request.prompts,
            seed=request.seed,
            plan=request.plan,
            random_weights=self.random_weights,
            notes=notes,
        )

    def prepare(
        self,
        prompt: str | list[str],
        steps: int = 5,
        *,
        guidance_scale=None,
        negative_prompt=None,
        seed: int | None = None,
        num_images: int = 1,
        height: int | None = None,
        width: int | None = None,
        sampler: str | None = None,
        skip=None,
    ) -> _Request:
        """sample()'s arguments checked and resolved (the plan, the gate, the seed, the prompts per
        image) without sampling: a server checks a request this way before queueing it.
        ValueError/TypeError name what is wrong."""
        return self._request(
            prompt, steps, guidance_scale, negative_prompt, seed, num_images, height, width, sampler, None, skip
        )

    def _request(
        self, prompt, steps, guidance_scale, negative_prompt, seed, num_images, height, width, sampler, plan, skip
    ) -> _Request:
        """Check and resolve sample()'s arguments; ValueError/TypeError name what is wrong."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is an empty list: give at least one prompt")
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
        height, width = self._size(height, width)
        if isinstance(plan, (str, Path)):
            plan = StepPlan.load(plan)
        gate = GateSpec.from_skip(skip)
        if plan is None:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
            plan = self.plan_for(sampler or self.sampler, steps)
            if skip == "adaptive":
                gate = self.gate_for(sampler or self.sampler, steps) or gate
        plan.check_schedule(self.schedule)
        if self.distilled_steps is not None:
            self._check_distilled(plan)
        check_gate_for(plan, gate)  # the loops' refusal, named before anything runs
        if gate is not None and not gate.active(plan.num_calls - 1):
            raise ValueError(
                f"skip={skip!r}: the gate decides from model call {gate.first_call} on (warm-up), and this plan makes "
                f"{plan.num_calls} calls, so nothing could be skipped; use more steps or skip=None"
            )
        negatives = None
        if negative_prompt is not None:
            negs = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negs) != len(prompts):
                raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
            negatives = [n for n in negs for _ in range(num_images)]
        return _Request(
            prompts=[p for p in prompts for _ in range(num_images)],
            negatives=negatives,
            guidance=self._guidance(guidance_scale, len(prompts), num_images),
            seed=random.randrange(2**31) if seed is None else int(seed),
            height=height,
            width=width,
            plan=plan,
            gate=gate,
        )

    def _guidance(self, guidance_scale, prompts: int, num_images: int) -> float | torch.Tensor:
        """One weight (the model's by default), or a list of one per prompt as a tensor per image."""
        if guidance_scale is None:
            return self.guidance_scale
        if isinstance(guidance_scale, (list, tuple)):
            if len(guidance_scale) != prompts:
                raise ValueError(
                    f"{len(guidance_scale)} guidance weights for {prompts} prompts: give one or one per prompt"
                )
            weights = [float(w) for w in guidance_scale]
            if not all(math.isfinite(w) for w in weights):
                raise ValueError(f"guidance weights must be finite numbers, got {list(guidance_scale)}")
            return torch.tensor([w for w in weights for _ in range(num_images)], dtype=torch.float32)
        value = float(guidance_scale)
        if not math.isfinite(value):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        return value

    def _check_latents(self, latents, request: _Request) -> torch.Tensor:
        """The caller's initial noise, checked against the request and moved to the engine."""
        f = self.decoder.factor
        shape = (len(request.prompts), self.decoder.channels, request.height // f, request.width // f)
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError(f"latents must be a floating-point torch.Tensor of shape {shape}")
        if tuple(latents.shape) != shape:
            raise ValueError(
                f"latents have shape {tuple(latents.shape)}, expected {shape} (prompts x num_images, channels, "
                f"height / {f}, width / {f})"
            )
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("latents hold NaN or inf values")
        return latents.to(device=self.device, dtype=self.dtype)

    def _check_distilled(self, plan: StepPlan) -> None:
        """A progressively distilled student learned one plan's steps (two of its teacher's in each):
        another plan is refused, naming both."""
        own = self.plan_for("distilled", self.distilled_steps)
        twice = 2 * self.distilled_steps
        stochastic = (
            self.plan_for("distilled_stochastic", twice)
            if twice in self.shipped_plans("distilled_stochastic")
            else None
        )
        if plan.hash() not in (own.hash(), stochastic.hash() if stochastic is not None else None):
            also = (
                f", or steps={twice} with sampler 'distilled_stochastic' (plans/distilled_stochastic-{twice}.json)"
                if stochastic is not None
                else ""
            )
            raise ValueError(
                f"this {self.name} student was distilled to sample with {self.distilled_steps} DDIM steps at times "
                f"{[int(t) for t in own.times]} (plans/distilled-{self.distilled_steps}.json); the requested plan "
                f"({plan.metadata.get('solver', 'plan')}, {plan.num_calls} calls at times "
                f"{[round(float(t), 1) for t in plan.times]}) is another schedule: use steps={self.distilled_steps} "
                f"(sampler 'auto' or 'distilled'){also}"
            )

    def _check_feature_cache(self, interval, gate: GateSpec | None) -> int | None:
        """The feature-cache interval of a request (None or 1: off), or ValueError naming why not."""
        if interval is None:
            return None
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"feature_cache must be an integer interval >= 1 or None, got {interval!r}")
        if interval == 1:
            return None
        if self.backend != "eager":
            raise ValueError(
                f"feature_cache needs backend='eager': the {self.backend} backend runs a captured or compiled UNet "
                "that cannot switch between the full and the shallow path per call"
            )
        if gate is not None and gate.per_sample:
            raise ValueError(
                "feature_cache with skipping needs per-batch gate decisions (GateSpec(per_sample=False)): per-sample "
                "decisions change the batch from call to call, and the cached features belong to the whole batch"
            )
        return interval

    def _denoise(self, request: _Request, denoiser, x_T, callback, notes: list, interval) -> tuple[LoopResult, int]:
        """The loop on the plan's Program, and how many of its UNet calls were shallow (the feature
        cache's, with `interval`; None: off); a float16 UNet whose latents come out NaN/inf moves
        to bfloat16 (float32 without it) and runs again."""
        program = compile_program(request.plan)
        if interval is not None and self._feature_cache is None:
            from .feature_cache import FeatureCache

            self._feature_cache = FeatureCache(self.unet)

        def run() -> tuple[LoopResult, int]:
            noise = self._fresh_noise(request.seed, x_T) if program.stochastic else None
            with nullcontext() if interval is None else self._feature_cache.session(interval) as session:
                result = self.loop.run(
                    program,
                    denoiser,
                    x_T,
                    guidance=denoiser.guidance,
                    gate=request.gate,
                    callback=callback,
                    noise=noise,
                )
            return result, 0 if session is None else session.calls - session.full

        result, shallow = run()
        if not _finite(result.latents) and self._unet_call.dtype == torch.float16:
            notes.append(self._fall_back(self.unet, self._unet_call, _fallback_dtype(self.device)))
            result, shallow = run()
        if not _finite(result.latents):
            where = self._first_non_finite_call(program, denoiser, x_T, request)
            raise NonFiniteError(
                f"sampling produced NaN/inf latents with {self.name} (UNet in {dtype_name(self._unet_call.dtype)}): "
                f"{where}; check the model weights and the plan"
            )
        return result, shallow

    def _first_non_finite_call(self, program, denoiser, x_T, request) -> str:
        """Where a failed sample first went non-finite, found by running it again on the reference
        loop with every model output checked (the error path only: it costs one more sample)."""
        from ..loops import reference

        seen: list[tuple[int, float]] = []
        calls = [0]

        def checking(x, t, index):
            out = denoiser(x, t, index)
            if not seen and not _finite(out):
                seen.append((calls[0], float(t[0])))
            calls[0] += 1
            return out

        noise = self._fresh_noise(request.seed, x_T) if program.stochastic else None
        reference.run(program, checking, x_T, guidance=denoiser.guidance, gate=request.gate, noise=noise)
        if seen:  # (x_T is finite: drawn here, or checked by _check_latents)
            k, t = seen[0]
            return f"the UNet's output was first non-finite at model call {k} of {program.num_steps} (t = {t:g})"
        return "every UNet output was finite: the plan's update overflowed"

    def _decode(self, latents: torch.Tensor, notes: list) -> torch.Tensor:
        """Images in [-1, 1]; a float16 VAE whose images overflow moves to float32 (diffusers'
        force_upcast: the SD VAEs overflow in float16 at large sizes); NaN/inf images that remain
        are a NonFiniteError naming the decoder, never images made of them."""
        images = self._decode_images(latents, notes)
        if not _finite(images):
            dtype = dtype_name(self.decoder.vae.dtype) if isinstance(self.decoder, VaeDecoder) else "its dtype"
            raise NonFiniteError(
                f"the {self.name} decoder (VAE in {dtype}) produced NaN/inf images from finite latents: "
                "check its weights"
            )
        return images

    def _decode_images(self, latents: torch.Tensor, notes: list) -> torch.Tensor:
        images = self.decoder(latents)
        if not _finite(images) and isinstance(self.decoder, VaeDecoder) and self.decoder.vae.dtype == torch.float16:
            notes.append(self._fall_back(self.decoder.vae, self.decoder.decode, torch.float32))
            images = self.decoder(latents)
        return images

    @classmethod
    def from_pipeline(cls, pipe, *, name: str = "pipeline", **options) -> Engine:
        """An engine over the components of a loaded diffusers Stable Diffusion pipeline;
        options: Engine's keyword arguments (sampler, guidance_scale, backend, loop, ...;
        conditioner: one wrapping the pipeline's text encoder, e.g. a student's)."""
        if type(pipe.scheduler).__name__ == "PlanScheduler":
            raise ValueError(
                "pipe.scheduler is a fastdiff PlanScheduler, which holds a plan but not the model's noise "
                "schedule: build the engine from the pipeline with its own scheduler (before swapping it)"
            )
        unet = pipe.unet
        conditioner = options.pop("conditioner", None) or TextConditioner(pipe.tokenizer, pipe.text_encoder)
        return cls(
            name=name,
            unet=unet,
            conditioner=conditioner,
            decoder=VaeDecoder(pipe.vae),
            schedule=DiscreteSchedule.from_config(dict(pipe.scheduler.config)),
            sample_size=unet.config.sample_size,
            device=unet.device,
            dtype=unet.dtype,
            **options,
        )
