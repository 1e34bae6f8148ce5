"""fastdiff: fast diffusion sampling.

One data representation for every sampler (``fastdiff.plan.StepPlan``), solvers that produce
it (``fastdiff.solvers``), one compiled form (``fastdiff.program``), loops that run it behind
one contract (``fastdiff.loops``), and engines that put a model behind it::

    import fastdiff
    engine = fastdiff.build_engine("tiny-shapes")
    out = engine.sample("a red circle on a blue background", steps=5)
    out.images[0].save("out.png")
"""

from ._version import __version__

__all__ = ["ModelLoadError", "ModelNotFoundError", "__version__", "build_engine"]


def build_engine(model, **kwargs):
    """An Engine for a named model ("tiny-shapes", "digits", "sd21") or a diffusers model
    directory; see ``fastdiff.models.registry.build_engine`` for the options."""
    from .models.registry import build_engine as _build

    return _build(model, **kwargs)


def __getattr__(name):
    # The model errors, imported on first use (importing fastdiff does not import torch).
    if name in ("ModelLoadError", "ModelNotFoundError"):
        from .models import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")
