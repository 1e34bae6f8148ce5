"""Engines: text/class conditioner + denoiser backend + decoder + StepPlan behind ``sample``."""

from .engine import BACKENDS, Engine, NonFiniteError, SampleOutput

__all__ = ["BACKENDS", "Engine", "NonFiniteError", "SampleOutput"]
