"""Elementwise ops of the sampling loop: torch reference implementations, and the fused step
(`fused_step`: guidance + basis update + next input + gate statistic in one pass) with a torch
reference and a Triton kernel behind one API.
"""

from .lincomb import lincomb, lincomb_
from .step import DeviceTables, StepTableError, StepTables, fused_step, fused_step_reference, step_tables

__all__ = [
    "DeviceTables",
    "StepTableError",
    "StepTables",
    "fused_step",
    "fused_step_reference",
    "lincomb",
    "lincomb_",
    "step_tables",
]
