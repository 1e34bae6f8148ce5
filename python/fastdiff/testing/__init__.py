"""Test and benchmark yardsticks: analytic models with exact answers, adherence scorers."""

from .digits import digits_accuracy, digits_fd, frechet_distance
from .gmm import GaussianMixture, solver_error
from .shapes import shapes_score

__all__ = ["GaussianMixture", "digits_accuracy", "digits_fd", "frechet_distance", "shapes_score", "solver_error"]
