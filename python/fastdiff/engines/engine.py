"""Engine: conditioner + denoiser backend + decoder + StepPlan, behind one ``sample`` call."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import solvers
from ..denoisers import GuidedDenoiser
from ..executor import run, run_fused
from ..gate import AdaptiveGate
from ..plan import StepPlan
from ..schedules import DiscreteSchedule

BACKENDS = ("eager",)
CALIBRATED = ("olss",)  # samplers whose plans are fitted to a model and shipped with it


class NonFiniteError(FloatingPointError):
    """Sampling produced NaN or infinite latents."""


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


def _gate(skip) -> AdaptiveGate | None:
    if skip is None or isinstance(skip, AdaptiveGate):
        return skip
    if skip == "adaptive":
        return AdaptiveGate()
    raise ValueError(f"skip must be None, 'adaptive' or an AdaptiveGate, got {skip!r}")


class TextConditioner:
    """CLIP tokenizer + text encoder, as diffusers' Stable Diffusion pipelines use them."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder

    def encode(self, prompts: list[str], device, dtype) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        with torch.no_grad():
            embeddings = self.text_encoder(ids)[0]
        return {"encoder_hidden_states": embeddings.to(dtype)}


class ClassConditioner:
    """Class labels from prompts naming a class ("7", "digit 7"); the empty prompt is the
    unconditional (null) class used for guidance."""

    def __init__(self, class_names: list[str], null_class: int):
        self.class_names = class_names
        self.null_class = null_class

    def label(self, prompt: str) -> int:
        text = prompt.strip().lower()
        if text == "":
            return self.null_class
        word = text.split()[-1]
        if word in self.class_names:
            return self.class_names.index(word)
        raise ValueError(f"prompt {prompt!r} names no class: expected one of {', '.join(self.class_names)} (or '')")

    def encode(self, prompts: list[str], device, dtype) -> dict[str, torch.Tensor]:
        labels = torch.tensor([self.label(p) for p in prompts], dtype=torch.long, device=device)
        return {"class_labels": labels}


class VaeDecoder:
    """Latents -> images through an AutoencoderKL (latents / scaling_factor, then decode)."""

    def __init__(self, vae):
        self.vae = vae
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.channels = vae.config.latent_channels

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample


class PixelDecoder:
    """Pixel-space models: the latent is the image."""

    factor = 1

    def __init__(self, channels: int):
        self.channels = channels

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


def to_pil(images: torch.Tensor) -> list:
    """[-1, 1] NCHW tensors -> PIL images (RGB, or L for one channel)."""
    from PIL import Image

    arr = ((images.float().cpu() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0], "L") if a.shape[-1] == 1 else Image.fromarray(a, "RGB") for a in arr]


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
        sampler: str = "dpmpp_2m",
        guidance_scale: float = 7.5,
        backend: str = "eager",
        random_weights: bool = False,
        plans_dir=None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"unknown or unavailable backend {backend!r}: this build has {', '.join(BACKENDS)}")
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
        self.backend = backend
        self.random_weights = random_weights
        self.plans_dir = Path(plans_dir) if plans_dir is not None else None
        self._plans: dict[tuple[str, int], StepPlan] = {}

    def __repr__(self) -> str:
        flag = ", RANDOM WEIGHTS" if self.random_weights else ""
        return f"Engine({self.name}, {self.device}, {str(self.dtype).replace('torch.', '')}, {self.backend}{flag})"

    @property
    def image_size(self) -> int:
        return self.sample_size * self.decoder.factor

    def plan_for(self, sampler: str, steps: int) -> StepPlan:
        """The plan of sampler at steps on this model's schedule (cached per (sampler, steps)).

        Calibrated samplers ("olss") use the plans shipped with the model (plans/olss-N.json).
        """
        key = (sampler, steps)
        if key not in self._plans:
            if sampler in CALIBRATED:
                self._plans[key] = self._shipped_plan(sampler, steps)
            else:
                self._plans[key] = solvers.build_variant(sampler, self.schedule, steps)
        return self._plans[key]

    def shipped_plans(self, kind: str = "olss") -> list[int]:
        """Step counts with a shipped `kind` plan."""
        if self.plans_dir is None or not self.plans_dir.is_dir():
            return []
        steps = (p.stem.rpartition("-")[2] for p in self.plans_dir.glob(f"{kind}-*.json"))
        return sorted(int(n) for n in steps if n.isdigit())

    def _shipped_plan(self, kind: str, steps: int) -> StepPlan:
        path = self.plans_dir / f"{kind}-{steps}.json" if self.plans_dir is not None else None
        if path is None or not path.is_file():
            have = ", ".join(map(str, self.shipped_plans(kind))) or "none"
            raise ValueError(
                f"{self.name} ships no {kind} plan for {steps} steps (shipped: {have}); calibrate one with "
                f"`fastdiff calibrate --model {self.name} --steps {steps} --out plan.json` and pass plan=<that file>"
            )
        plan = StepPlan.load(path)
        plan.check_schedule(self.schedule)
        return plan

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
        guidance_scale: float | None = None,
        negative_prompts: list[str] | None = None,
    ) -> GuidedDenoiser:
        """model_fn(x, t) for a batch of prompts: encoded once, classifier-free guidance fused in
        (one UNet call on the 2x batch when guidance_scale > 1)."""
        guidance = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        negatives = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        cond = self.conditioner.encode(list(prompts), self.device, self.dtype)
        uncond = self.conditioner.encode(negatives, self.device, self.dtype) if guidance > 1 else None
        return GuidedDenoiser(self.unet, cond, uncond, guidance)

    def initial_noise(self, batch: int, *, seed: int, height: int | None = None, width: int | None = None):
        """x_T as diffusers draws it: a CPU generator seeded with `seed`, in the model's dtype."""
        height, width = self._size(height, width)
        f = self.decoder.factor
        shape = (batch, self.decoder.channels, height // f, width // f)
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        return torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

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
        skip: str | AdaptiveGate | None = None,
        fused: bool | None = None,
    ) -> SampleOutput:
        """Sample images. A list of prompts is one batch; each prompt gets num_images images.

        skip: "adaptive" (AdaptiveGate() defaults) or an AdaptiveGate: skip UNet calls where the
        latent trajectory is locally smooth (AdaptiveDiffusion), reusing the previous output;
        ``out.nfe`` then tells the calls made per sample. fused: run the non-UNet work of every
        step as one fused op (`fastdiff.ops.fused_step`: Triton on a GPU, the torch reference on
        the CPU); None = only when skipping (which needs it).

        guidance_scale defaults to the model's; plan (a StepPlan or a plan file) overrides
        sampler/steps. The initial noise
        is drawn like diffusers does (CPU generator seeded with `seed`, in the model's dtype),
        so a diffusers pipeline with a PlanScheduler reproduces the same images.
        """
        start = time.perf_counter()
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
        if plan is None:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
            plan = self.plan_for(sampler or self.sampler, steps)
        plan.check_schedule(self.schedule)
        gate = _gate(skip)
        fused = gate is not None if fused is None else bool(fused)
        if gate is not None and not fused:
            raise ValueError("skip= needs the fused step (fused=True or None)")
        guidance = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        seed = random.randrange(2**31) if seed is None else int(seed)

        batch_prompts = [p for p in prompts for _ in range(num_images)]
        if negative_prompt is None:
            negatives = None
        else:
            negs = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negs) != len(prompts):
                raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
            negatives = [n for n in negs for _ in range(num_images)]
        denoiser = self.denoiser(batch_prompts, guidance_scale=guidance, negative_prompts=negatives)
        self._sync()
        encoded = time.perf_counter()

        x_T = self.initial_noise(len(batch_prompts), seed=seed, height=height, width=width)
        with torch.no_grad():
            if fused:
                result = run_fused(
                    plan,
                    denoiser.raw,
                    x_T,
                    guidance=denoiser.weights(len(x_T), x_T.device),
                    gate=gate,
                    callback=callback,
                )
                latents, nfe, unet_calls, skipped = result.latents, result.nfe, result.unet_calls, result.skipped
            else:
                latents = run(plan, denoiser, x_T, callback=callback)
                nfe, unet_calls, skipped = [denoiser.calls] * len(x_T), denoiser.calls, [[] for _ in x_T]
        self._sync()
        denoised = time.perf_counter()
        if not bool(torch.isfinite(latents).all()):
            raise NonFiniteError(
                f"sampling produced NaN/inf latents with {self.name} in {str(self.dtype).replace('torch.', '')}"
                + (
                    ": float16 overflow in the UNet is the usual cause; use dtype=torch.bfloat16 or torch.float32"
                    if self.dtype == torch.float16
                    else ": check the model weights and the plan"
                )
            )
        images = self.decoder(latents)
        self._sync()
        done = time.perf_counter()
        notes = ["random weights: outputs are noise, for speed benchmarks only"] if self.random_weights else []
        return SampleOutput(
            images=to_pil(images),
            latents=latents,
            nfe=nfe,
            unet_calls=unet_calls,
            skipped=skipped,
            timings={
                "encode": encoded - start,
                "denoise": denoised - encoded,
                "decode": done - denoised,
                "total": done - start,
            },
            prompts=batch_prompts,
            seed=seed,
            plan=plan,
            random_weights=self.random_weights,
            notes=notes,
        )

    @classmethod
    def from_pipeline(
        cls,
        pipe,
        *,
        name: str = "pipeline",
        sampler: str = "dpmpp_2m",
        guidance_scale: float = 7.5,
        backend: str = "eager",
        random_weights: bool = False,
        plans_dir=None,
    ) -> Engine:
        """An engine over the components of a loaded diffusers Stable Diffusion pipeline."""
        if type(pipe.scheduler).__name__ == "PlanScheduler":
            raise ValueError(
                "pipe.scheduler is a fastdiff PlanScheduler, which holds a plan but not the model's noise "
                "schedule: build the engine from the pipeline with its own scheduler (before swapping it)"
            )
        unet = pipe.unet
        return cls(
            name=name,
            unet=unet,
            conditioner=TextConditioner(pipe.tokenizer, pipe.text_encoder),
            decoder=VaeDecoder(pipe.vae),
            schedule=DiscreteSchedule.from_config(dict(pipe.scheduler.config)),
            sample_size=unet.config.sample_size,
            device=unet.device,
            dtype=unet.dtype,
            sampler=sampler,
            guidance_scale=guidance_scale,
            backend=backend,
            random_weights=random_weights,
            plans_dir=plans_dir,
        )
