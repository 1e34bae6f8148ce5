"""Calibration: fit StepPlans to a model from teacher trajectories (OLSS)."""

from .lstsq import CalibrationError
from .trajectories import EngineSource, FunctionSource, Source, Trajectories, teacher_trajectories

__all__ = ["CalibrationError", "EngineSource", "FunctionSource", "Source", "Trajectories", "teacher_trajectories"]
