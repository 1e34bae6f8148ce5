"""What sampler="auto" runs: the shipped plan that does best on validation samples.

A model can ship several calibrated plans for one step count (a searched `usf-N.json`, an
`olss-N.json`), and neither is better everywhere: on tiny-shapes the searched 5-call plan is
behind the OLSS one, on digits ahead. `choose_default` measures every shipped plan for each step
count, and DPM-Solver++(2M), on validation prompts and noise that no calibration or search used
(seed 3 by default; calibration uses 0, the benches' held-out sets 1 and 2), against a many-step
reference run from the same x_T, and records the winner with the plans' hashes in
`plans/auto.json`. `Engine.resolve_sampler` reads it; an entry whose plan has changed since is
not used (the order usf, olss, dpmpp_2m applies), and a corrupt file is an error that names it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..engines.choice import FORMAT, VERSION, ChoiceError, load_choice, save_choice  # noqa: F401


def choose_default(
    engine,
    steps=None,
    *,
    samples: int = 32,
    seed: int = 3,
    reference: str = "dpmpp_2m:500",
    batch_size: int = 32,
    progress: bool = True,
) -> dict:
    """Measure the engine's shipped plans (and DPM-Solver++(2M)) for each step count in `steps`
    (default: every count with a shipped usf or olss plan) on `samples` validation prompts with
    noise from `seed`; the document `save_choice` writes."""
    from ..engines.engine import CALIBRATED, FALLBACK
    from ..models.registry import calibration_prompts
    from .search import plan_error
    from .trajectories import make_source, teacher_trajectories

    shipped = {kind: engine.shipped_plans(kind) for kind in CALIBRATED}
    if steps is None:
        steps = sorted({n for counts in shipped.values() for n in counts})
    steps = [int(n) for n in steps]
    if not steps:
        raise ValueError(
            f"{engine.name} ships no calibrated plans (plans/usf-N.json, plans/olss-N.json) to choose from"
        )
    prompts = calibration_prompts(engine.name, samples, seed=seed)
    source = make_source(engine, prompts, seed=seed)
    traj = teacher_trajectories(source, reference, progress=progress)
    ids = np.arange(source.num_samples)
    target = torch.from_numpy(np.asarray(traj.latents[:, -1], dtype=np.float64)).reshape(ids.size, -1)
    choices = {}
    from tqdm.auto import tqdm

    for n in tqdm(steps, desc="choose", unit="steps", disable=not progress):
        candidates = [kind for kind in CALIBRATED if n in shipped[kind]] + [FALLBACK]
        plans = {kind: engine.plan_for(kind, n) for kind in candidates}
        errors = {kind: plan_error(source, ids, target, plan, batch_size) for kind, plan in plans.items()}
        best = min(candidates, key=lambda kind: (errors[kind], candidates.index(kind)))
        choices[str(n)] = {
            "sampler": best,
            "errors": errors,
            "hashes": {kind: plan.hash() for kind, plan in plans.items()},
        }
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": engine.name,
        "validation": {"samples": samples, "seed": seed, "reference": reference, "metric": "relative RMS error"},
        "choices": choices,
    }
