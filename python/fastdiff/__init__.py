"""fastdiff: fast diffusion sampling.

One data representation for every sampler (``fastdiff.plan.StepPlan``), solvers that compile
to it (``fastdiff.solvers``), and one sync-free loop that runs it (``fastdiff.executor``).
"""

from ._version import __version__

__all__ = ["__version__"]
