"""GMM solver quality: error of every solver vs the exact ODE solution at N = 3..50 steps.

The error is recorded in each benchmark's extra_info (rel_error, nfe); the timed part is what a
user pays on the host to get a plan: building it and compiling its Program.
bench/report.py turns the JSON into bench/results/solver_quality.{md,png}.
"""

import pytest

from fastdiff import program, solvers
from fastdiff.testing import quality

CHECKED = {("dpmpp_2m", 10), ("unipc_bh2", 5)}  # the cases `make bench-check` compares with bench/baselines
CASES = [
    pytest.param(label, n, id=f"{label}-N{n}", marks=pytest.mark.check if (label, n) in CHECKED else ())
    for label in quality.SOLVER_VARIANTS
    for n in quality.GMM_STEPS
]


@pytest.fixture(scope="module")
def problem():
    return quality.default_problem()


@pytest.mark.parametrize("label, steps", CASES)
def test_gmm_solver_error(benchmark, problem, label, steps):
    row = quality.measure(problem, label, steps)
    if row["rel_error"] is None:
        pytest.skip(row["skipped"])
    name, options = quality.SOLVER_VARIANTS[label]

    def build_plan():
        plan = solvers.build(name, problem.schedule, steps, **options)
        program._compiled.clear()  # time the compile, not the cache
        return program.compile(plan)

    benchmark.group = "gmm-solver-quality"
    benchmark.extra_info.update(
        {
            "label": label,
            "solver": name,
            "options": options,
            "steps": steps,
            "nfe": row["nfe"],
            "rel_error": row["rel_error"],
        }
    )
    compiled = benchmark.pedantic(build_plan, rounds=3, iterations=1)
    benchmark.extra_info.update({"program_rows": compiled.num_rows, "program_error": compiled.max_error})
