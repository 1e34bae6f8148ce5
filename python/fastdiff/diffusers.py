"""diffusers interop: a StepPlan as a drop-in ``pipe.scheduler`` for unmodified pipelines.

    pipe.scheduler = PlanScheduler.from_plan(plan)
    image = pipe(prompt, num_inference_steps=plan.nfe, generator=torch.Generator().manual_seed(0)).images[0]

The pipeline's latents are the plan's model inputs: ``init_noise_sigma`` is coef[0][0],
``scale_model_input`` is the identity, and ``step`` runs one call's part of the recurrent
program, so the images equal ``Engine.sample`` with the same plan, prompt and seed.
The plan is part of the scheduler config, so ``save_pretrained`` / ``from_pretrained`` keep it.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from .executor import apply_op
from .plan import StepPlan


class PlanScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that runs a fastdiff StepPlan."""

    order = 1

    @register_to_config
    def __init__(self, plan: dict | None = None, num_train_timesteps: int = 1000):
        if plan is None:
            raise ValueError("PlanScheduler needs a plan: use PlanScheduler.from_plan(plan)")
        self.plan = StepPlan.from_dict(plan)
        self.program = self.plan.recurrent()
        self.init_noise_sigma = float(self.plan.coef[0, 0])
        self.num_inference_steps = self.plan.nfe
        self.timesteps = torch.tensor(self.plan.times, dtype=torch.float32)
        self._call = 0
        self._slots: list = []

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
        self._call = 0
        self._slots = [None] * self.program.num_slots

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **kwargs):
        if self._call >= self.plan.nfe:
            raise RuntimeError(
                f"step called {self._call + 1} times for a {self.plan.nfe}-call plan; call set_timesteps first"
            )
        if self._call == 0 and not self._slots:
            self._slots = [None] * self.program.num_slots
        program_step = self.program.steps[self._call]
        slots = self._slots
        # The pipeline's latents are this call's model input (a callback may have changed them).
        slots[program_step.input_slot] = sample.clone()
        slots[program_step.output_slot] = model_output.to(sample.dtype).clone()
        for op in program_step.ops:
            apply_op(slots, op)
        for released in program_step.release:
            slots[released] = None
        self._call += 1
        prev_sample = slots[program_step.next_slot]
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
