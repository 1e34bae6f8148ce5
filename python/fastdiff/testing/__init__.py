"""Test and benchmark yardsticks: analytic models with exact answers."""

from .gmm import GaussianMixture, solver_error

__all__ = ["GaussianMixture", "solver_error"]
