"""USF search quality (issue 20): the searched strategies against OLSS, DPM-Solver++(2M), UniPC,
iPNDM and GITS's tuned times at NFE 3-10, on samples held out from the search.

- gmm: the exact 64-d Gaussian mixture; reference = the exact ODE solution; "usf_search" is
  `calibration.search` run here on the 128 calibration x_T (teacher DPM-Solver++(2M)-100,
  budget 200, 96 x_T scored, the other 32 choose between the searched plan and the OLSS refit on
  its times, as for the shipped plans), "olss_uniform_closed" OLSS (its best variant on the GMM)
  on the same x_T.
- tiny-shapes, digits: the shipped plans (engines/<model>/plans: usf-N.json searched — the
  searched plan or the OLSS refit on its times, whichever did better on held-out calibration
  samples —, olss-N.json calibrated), and "auto": what engine.sample(prompt, steps=N) runs
  (plans/auto.json's choice, made on validation samples of seed 3); reference = a 1000-step run
  from the same x_T; 32 held-out prompts and noise (seed 1). Plus prompt adherence of 64
  held-out prompts (tiny-shapes), classifier accuracy and feature Fréchet distance of 200
  samples (digits, 20 per class, held-out noise).
- test_predictor_savings: the search with and without the ranking predictor, same seed and
  budget: model calls the predictor run needs to reach the plain run's final result.

bench/report.py renders bench/results/search_quality.{md,png}.
"""

import numpy as np
import pytest

from fastdiff.testing import digits_accuracy, digits_fd, shapes_score
from fastdiff.testing import olss_quality as oq

NFES = (3, 4, 5, 6, 7, 8, 9, 10)
BASE = ("dpmpp_2m", "unipc_bh2", "ipndm", *oq.GITS)
LABELS = {
    "gmm": (*BASE, "olss_uniform_closed", "usf_search"),
    "tiny-shapes": (*BASE, "olss_shipped", "usf_shipped", "auto"),
    "digits": (*BASE, "olss_shipped", "usf_shipped", "auto"),
}
CASES = [(s, label, n) for s, labels in LABELS.items() for label in labels for n in NFES]
CASES += [(s, "dpmpp_2m", 20) for s in LABELS]  # the 20-call line the 5-call plans aim at
_study = oq.cached_study


def _images_quality(study: oq.Study, plan) -> dict:
    engine = study.engine
    if engine.name == "digits":
        labels = [d for d in range(10) for _ in range(20)]
        out = engine.sample([str(d) for d in labels], plan=plan, seed=1)
        return {"accuracy": digits_accuracy(out.images, labels), "fd": digits_fd(out.images)}
    from fastdiff.models.registry import calibration_prompts

    prompts = calibration_prompts(engine.name, 64, seed=2)
    out = engine.sample(prompts, plan=plan, seed=2)
    return {"adherence": shapes_score(out.images, prompts)["adherence"]}


@pytest.mark.parametrize("study, label, nfe", CASES, ids=lambda v: str(v))
def test_search_quality(benchmark, cpu_engine, study, label, nfe):
    s = _study(study, cpu_engine)
    if label.endswith("_shipped") and (s.engine is None or nfe not in s.engine.shipped_plans(label.split("_")[0])):
        pytest.skip(f"{study} ships no {label.split('_')[0]} plan for {nfe} calls")
    row, plan = s.measure(label, nfe)
    if "search" in plan.metadata:
        info = plan.metadata["search"]
        row.update(
            search_calls=info["model_calls"],
            search_seconds=info.get("wall_seconds"),
            proxy_error=info["proxy_error"],
            rank_correlation=info["rank_correlation"],
            chosen=(info.get("validation") or {}).get("chosen"),
        )
        if label == "usf_search":
            row["search_seconds"] = s.searched(nfe).seconds
    if s.engine is not None:
        row.update(_images_quality(s, plan))
    benchmark.group = f"search-quality-{study}"
    benchmark.extra_info.update(row)
    benchmark.pedantic(s.run, args=(plan,), rounds=1, iterations=1)


def _calls_to_reach(result, target: float) -> int | None:
    for calls, best in result.best_so_far():
        if best <= target:
            return calls
    return None


@pytest.mark.parametrize("study", ["gmm", "digits"])
def test_predictor_savings(benchmark, cpu_engine, study):
    """Search NFE 5 with and without the predictor (3 seeds on the GMM, 1 on digits, budget 200)."""
    from fastdiff.calibration import search as S

    s = _study(study, cpu_engine)
    seeds = (0, 1, 2) if study == "gmm" else (0,)
    rows = []

    def run():
        for seed in seeds:
            runs = {
                flag: S.search(
                    s.calibration,
                    None,
                    5,
                    teacher=oq.SEARCH_TEACHER,
                    budget=200,
                    seed=seed,
                    predictor=flag,
                    progress=False,
                )
                for flag in (True, False)
            }
            plain, with_pred = runs[False], runs[True]
            reach = _calls_to_reach(with_pred, plain.error)
            rows.append(
                {
                    "seed": seed,
                    "plain_error": plain.error,
                    "predictor_error": with_pred.error,
                    "plain_calls": plain.calls,
                    "predictor_calls_to_match": reach,
                    "saved": None if reach is None else 1 - reach / plain.calls,
                    "rank_correlation": with_pred.rank_correlation,
                    "rank_correlation_plain": plain.rank_correlation,
                    "held_out_plain": s.error(plain.plan),
                    "held_out_predictor": s.error(with_pred.plan),
                }
            )

    benchmark.group = "search-predictor"
    benchmark.pedantic(run, rounds=1, iterations=1)
    saved = [r["saved"] for r in rows]
    benchmark.extra_info.update(
        {
            "study": study,
            "runs": rows,
            "saved_mean": None if None in saved else float(np.mean(saved)),
            "rank_correlation_mean": float(np.mean([r["rank_correlation"] for r in rows])),
        }
    )
