"""diffusers interop: a StepPlan as a drop-in ``pipe.scheduler`` for unmodified pipelines.

    pipe.scheduler = PlanScheduler.from_plan(plan)
    image = pipe(prompt, num_inference_steps=plan.nfe, generator=torch.Generator().manual_seed(0)).images[0]

The pipeline's latents are the plan's model inputs: ``init_noise_sigma`` is coef[0][0],
``scale_model_input`` is the identity, and ``step`` hands the model output to the reference
loop (`fastdiff.loops.reference.steps`, the loop as a generator) and returns the next model
input, so the images equal ``Engine.sample`` with the same plan, prompt and seed.
The plan is part of the scheduler config, so ``save_pretrained`` / ``from_pretrained`` keep it.
A stochastic plan draws its fresh noise from the pipeline's ``generator`` (passed to ``step``, as
diffusers does for its stochastic schedulers), after the initial latents, as ``Engine.sample``
draws it from its seed's generator.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from .loops import reference
from .plan import StepPlan
from .program import compile as compile_program


class PlanScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that runs a fastdiff StepPlan."""

    order = 1

    @register_to_config
    def __init__(self, plan: dict | None = None, num_train_timesteps: int = 1000):
        if plan is None:
            raise ValueError("PlanScheduler needs a plan: use PlanScheduler.from_plan(plan)")
        self.plan = StepPlan.from_dict(plan)
        self.program = compile_program(self.plan)
        self.init_noise_sigma = float(self.plan.coef[0, 0])
        self.num_inference_steps = self.plan.nfe
        self.timesteps = torch.tensor(self.plan.times, dtype=torch.float32)
        self._loop = None  # the reference loop of the pipeline run in progress
        self._pending = None  # the model call it waits for
        self._generator = None  # the pipeline's generator, for a stochastic plan's noise

    @classmethod
    def from_plan(cls, plan: StepPlan) -> PlanScheduler:
        return cls(plan=plan.to_dict(), num_train_timesteps=plan.num_train_timesteps or 1000)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, **kwargs) -> None:
        if num_inference_steps is not None and num_inference_steps != self.plan.nfe:
            raise ValueError(
                f"this PlanScheduler runs a {self.plan.nfe}-call plan: pass num_inference_steps={self.plan.nfe} "
                f"(got {num_inference_steps}); build another plan for another step count"
            )
        given = [k for k in ("timesteps", "sigmas") if kwargs.get(k) is not None]
        if given:
            raise ValueError(f"PlanScheduler takes its times from the plan; {given[0]} cannot be set")
        self.timesteps = torch.tensor(self.plan.times, dtype=torch.float32, device=device)
        self._loop = self._pending = None

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def _noise(self, k: int, x: torch.Tensor) -> torch.Tensor:
        generator = self._generator
        device = generator.device if isinstance(generator, torch.Generator) else x.device
        return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        **kwargs,
    ):
        self._generator = generator  # a stochastic plan's noise after this call comes from it
        if self._loop is None:  # the first call: the loop starts from the pipeline's latents
            self._loop = reference.steps(self.program, sample, noise=self._noise)
            self._pending = next(self._loop)
        elif self._pending is None:
            raise RuntimeError(
                f"step called {self.plan.nfe + 1} times for a {self.plan.nfe}-call plan; call set_timesteps first"
            )
        with torch.no_grad():
            # The pipeline's latents are this call's model input (a callback may have changed them).
            self._pending.x.copy_(sample)
            try:
                self._pending = self._loop.send(model_output)
                prev_sample = self._pending.x.clone()
            except StopIteration as done:
                self._pending = None
                prev_sample = done.value.latents
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
