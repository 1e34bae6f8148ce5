"""Parity with diffusers, recorded: every case of tests/test_solver_parity.py (a plan on the
reference loop against the diffusers scheduler's own loop, float32, GMM model, latents
3x3x5x7), its largest model-input and final-latent difference (relative RMS) in extra_info;
the timed part is one plan's whole comparison. bench/report.py writes bench/results/parity.md.
"""

import pytest

from fastdiff.testing import parity

pytest.importorskip("diffusers", reason="parity needs diffusers")


@pytest.mark.parametrize("case", list(parity.cases()), ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}-{c[4]}")
def test_parity_with_diffusers(benchmark, case):
    benchmark.group = "solver-parity"
    row = benchmark.pedantic(parity.compare, args=case, rounds=1, iterations=1)
    name, options, pred, spacing, steps, f64 = case
    benchmark.extra_info.update(
        {
            "solver": name,
            "options": options,
            "prediction_type": pred,
            "spacing": spacing,
            "steps": steps,
            "float64_reference": f64,
            **row,
        }
    )
