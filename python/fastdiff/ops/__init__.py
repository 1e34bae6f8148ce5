"""The fused sampling step (guidance + the Program's rows + the gate statistic in one pass) with
a torch reference and a Triton kernel behind one API."""

from .step import fused_step, fused_step_reference, guide, resolve_impl

__all__ = ["fused_step", "fused_step_reference", "guide", "resolve_impl"]
