"""Guided distillation (Meng et al. 2023): stage 1 (`guided`) folds classifier-free guidance into
one UNet call with the guidance weight as an input; stage 2 (`progressive`) halves the steps.

Students are model directories (`student`): `build_engine(model, weights=DIR)` samples them.
Training runs are resumable (`train`).
"""

from .guided import distill_guided
from .student import Student, export_student, make_student, save_student
from .train import DistillError, TrainingRun

__all__ = [
    "DistillError",
    "Student",
    "TrainingRun",
    "distill_guided",
    "export_student",
    "make_student",
    "save_student",
]
