"""Writes the plan files with compiled programs that csrc/tests/test_sampler.cpp and
csrc/tests/test_cuda_sampler.cu read.

Run from the repository root: python tests/data/programs/make.py (the outputs are committed).
"""

import json
from pathlib import Path

from fastdiff import program, solvers
from fastdiff.schedules import PRESETS, DiscreteSchedule

HERE = Path(__file__).parent


def main() -> None:
    schedule = DiscreteSchedule.from_config(PRESETS["sd21"])
    compiled = program.compile(solvers.build_variant("unipc", schedule, 6))
    program.save(compiled, HERE / "unipc_6.json")
    # a longer plan for the CUDA runner's tests (enough calls for the gate to skip some)
    program.save(program.compile(solvers.build_variant("dpmpp_2m", schedule, 20)), HERE / "dpmpp_2m_20.json")
    doc = json.loads(program.dumps(compiled))
    # bad: one coefficient of the program changed (the program no longer computes the plan)
    bad = json.loads(json.dumps(doc))
    bad["program"]["coef"][2][1][0] += 0.25
    (HERE / "bad_coef.json").write_text(json.dumps(bad))
    # bad: the program of another plan (DDIM at 6 steps) under this plan's coefficients
    other = json.loads(program.dumps(program.compile(solvers.build_variant("ddim", schedule, 6))))
    (HERE / "bad_other_plan.json").write_text(json.dumps({**doc, "program": other["program"]}))
    # bad: a table of the wrong size
    short = json.loads(json.dumps(doc))
    short["program"]["x_row"] = short["program"]["x_row"][:-1]
    (HERE / "bad_size.json").write_text(json.dumps(short))


if __name__ == "__main__":
    main()
