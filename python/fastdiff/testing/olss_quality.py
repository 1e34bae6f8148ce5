"""OLSS against the built-in solvers, side by side (bench/test_olss_quality.py and its report).

A study holds a calibration set and a held-out set of the same model:

- GMM: the exact Gaussian-mixture denoiser of `quality.default_problem` (64-d); calibration x_T
  from another seed; the reference is the exact probability-flow ODE solution.
- tiny-shapes / digits: a shipped engine; calibration prompts from the model's grammar
  (`registry.calibration_prompts`, seed 0), held-out prompts from another seed (tiny-shapes) or
  the ten classes with held-out noise (digits); the reference is a 1000-step run of the same
  model from the same x_T, ending at the plan's own final noise level (DPM-Solver++(2M) to
  σ = 0, DDIM to the schedule's first training level σ(0)).

Error: relative RMS of the final latents over the held-out set, ||x − x_ref|| / ||x_ref||
(latents for tiny-shapes, pixels for digits).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import solvers
from ..calibration import olss
from ..calibration.trajectories import FunctionSource, Source, Trajectories, teacher_trajectories
from ..loops import reference
from ..plan import StepPlan
from ..program import compile as compile_program

# label -> (path kind, closed loop)
OLSS_VARIANTS = {
    "olss_uniform_closed": ("uniform", True),
    "olss_uniform_open": ("uniform", False),
    "olss_planned_closed": ("planned", True),
    "olss_planned_open": ("planned", False),
}
BASELINES = ("ddim", "dpmpp_2m", "unipc_bh2", "deis")
# the search's labels (bench/test_search_quality.py): GITS's tuned times with a solver's steps,
# a search run here ("usf_search", the GMM) and the model's shipped searched plans
GITS = {"gits_dpmpp_2m": "dpmpp_2m", "gits_unipc_bh2": "unipc_bh2"}
SEARCH_TEACHER = "dpmpp_2m:100"
STEPS = (3, 4, 5, 6, 7, 8, 9, 10, 20)
REFERENCE_STEPS = 1000
# the reference solver for each end level a plan can have: (out_sigma == 0, out_sigma > 0)
REFERENCE_SOLVERS = {True: "dpmpp_2m", False: "ddim"}


@dataclass
class Study:
    name: str
    calibration: Source
    held_out: Source
    teacher: str
    exact: object = None  # a callable plan -> exact result (GMM); None: a 1000-step reference run
    engine: object = None  # the model's engine: label "olss_shipped" is its shipped plan
    references: dict = field(default_factory=dict)  # out_sigma -> reference result
    _traj: Trajectories | None = None
    _gram: object = None
    _paths: dict = field(default_factory=dict)
    _search_traj: Trajectories | None = None
    searches: dict = field(default_factory=dict)  # nfe -> SearchResult of "usf_search"
    search_budget: int = 200

    @property
    def schedule(self):
        return self.calibration.schedule

    def run(self, plan: StepPlan) -> torch.Tensor:
        ids = np.arange(self.held_out.num_samples)
        out = reference.run(compile_program(plan), self.held_out.model(ids), self.held_out.x_T).latents
        return out.reshape(out.shape[0], -1).double().cpu()

    def reference(self, plan: StepPlan) -> torch.Tensor:
        out_sigma = float(plan.metadata.get("out_sigma", 0.0))
        if out_sigma not in self.references:
            if self.exact is not None:
                self.references[out_sigma] = self.exact(plan)
            else:
                solver = REFERENCE_SOLVERS[out_sigma == 0.0]
                ref_plan = solvers.build_variant(solver, self.schedule, REFERENCE_STEPS)
                if float(ref_plan.metadata.get("out_sigma", 0.0)) != out_sigma:
                    raise ValueError(f"no {REFERENCE_STEPS}-step reference ends at σ = {out_sigma:g}")
                self.references[out_sigma] = self.run(ref_plan)
        return self.references[out_sigma]

    def error(self, plan: StepPlan) -> float:
        result, ref = self.run(plan), self.reference(plan)
        return float(torch.linalg.vector_norm(result - ref) / torch.linalg.vector_norm(ref))

    def trajectories(self) -> Trajectories:
        if self._traj is None:
            self._traj = teacher_trajectories(self.calibration, self.teacher, progress=False)
            self._gram = olss.teacher_gram(self._traj, 5)
        return self._traj

    def search_trajectories(self) -> Trajectories:
        """The search's teacher (its grid is the candidates' times) on the calibration set."""
        if self._search_traj is None:
            self._search_traj = teacher_trajectories(self.calibration, SEARCH_TEACHER, progress=False)
        return self._search_traj

    def searched(self, steps: int):
        """`calibration.search` on the calibration set (cached per NFE), as the shipped plans are
        made: the search scores 3/4 of the samples, the last 1/4 chooses between its plan and the
        OLSS refit on its times (the result's `best_plan`)."""
        from ..calibration import search as S

        if steps not in self.searches:
            self.searches[steps] = S.search(
                self.calibration,
                None,
                steps,
                teacher=SEARCH_TEACHER,
                budget=self.search_budget,
                samples=self.calibration.num_samples * 3 // 4,
                refit="olss",
                progress=False,
            )
        return self.searches[steps]

    def olss_plan(self, label: str, steps: int) -> StepPlan:
        kind, closed = OLSS_VARIANTS[label]
        traj = self.trajectories()
        if kind == "uniform":
            path = olss.uniform_path(traj.num_teacher_steps, steps)
        else:
            if steps not in self._paths:
                self._paths[steps] = olss.plan_path(traj, steps, gram=self._gram)[0]
            path = self._paths[steps]
        fit = olss.fit(traj, path, closed_loop=closed, source=self.calibration, gram=self._gram)
        return fit.plan

    def plan(self, label: str, steps: int) -> StepPlan:
        if label in OLSS_VARIANTS:
            return self.olss_plan(label, steps)
        if label == "teacher":
            return self.trajectories().teacher
        if label in ("olss_shipped", "usf_shipped"):
            kind = label.partition("_")[0]
            if self.engine is None or steps not in self.engine.shipped_plans(kind):
                raise LookupError(f"{self.name} ships no {kind} plan for {steps} steps")
            return self.engine.plan_for(kind, steps)
        if label == "auto":  # what engine.sample(prompt, steps=N) runs
            if self.engine is None:
                raise LookupError(f"{self.name} has no engine: no sampler='auto'")
            return self.engine.plan_for("auto", steps)
        if label in GITS:
            from ..calibration.search import gits_strategy

            return gits_strategy(self.search_trajectories(), self.schedule, steps, GITS[label]).compile(self.schedule)
        if label == "usf_search":
            return self.searched(steps).best_plan
        return solvers.build_variant(label, self.schedule, steps)

    def measure(self, label: str, steps: int) -> tuple[dict, StepPlan]:
        """({study, label, steps, nfe, rel_error[, path]}, the plan measured)."""
        plan = self.plan(label, steps)
        row = {"study": self.name, "label": label, "steps": steps, "nfe": plan.nfe, "rel_error": self.error(plan)}
        if "calibration" in plan.metadata:
            row["path"] = plan.metadata["calibration"]["path"]
        return row, plan


_STUDIES: dict = {}


def cached_study(name: str, cpu_engine) -> Study:
    """The benches' study of `name` ("gmm", or a model built by `cpu_engine(name)`), made once per
    process on 2 threads (bench/test_olss_quality.py and bench/test_search_quality.py share it)."""
    if name not in _STUDIES:
        torch.set_num_threads(2)
        _STUDIES[name] = gmm_study() if name == "gmm" else engine_study(cpu_engine(name))
    return _STUDIES[name]


def gmm_study(calibration_samples: int = 128, teacher: str = "ddim:1000", dim: int = 64) -> Study:
    """The GMM of the solver-quality table (held-out x_T are its 64 samples)."""
    from .gmm import exact_result
    from .quality import default_problem

    problem = default_problem(dim=dim)
    denoiser = problem.mixture.denoiser(problem.schedule)
    x_cal = torch.randn(calibration_samples, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def exact(plan):
        return exact_result(plan, problem.mixture, problem.schedule, problem.x_T, problem.reference).double()

    return Study(
        "gmm",
        FunctionSource(denoiser, problem.schedule, x_cal, name="gmm-calibration"),
        FunctionSource(denoiser, problem.schedule, problem.x_T, name="gmm-held-out"),
        teacher,
        exact=exact,
    )


def engine_study(engine, calibration_samples: int = 64, held_out: int = 32, teacher: str = "ddim:100") -> Study:
    """tiny-shapes or digits: calibration prompts from seed 0, held-out prompts and noise from seed 1."""
    from ..calibration.trajectories import EngineSource
    from ..models.registry import calibration_prompts

    cal = calibration_prompts(engine.name, calibration_samples, seed=0)
    if engine.name == "digits":
        test = [str(i % 10) for i in range(held_out)]  # ten classes only: the noise is what is held out
    else:
        test = calibration_prompts(engine.name, held_out, seed=1)
    return Study(
        engine.name, EngineSource(engine, cal, seed=0), EngineSource(engine, test, seed=1), teacher, engine=engine
    )
