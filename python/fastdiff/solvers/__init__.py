"""Solvers: pure functions (schedule, steps, **options) -> StepPlan, one module per family.

Each reproduces a diffusers scheduler loop exactly (same model times and inputs, same result up
to float rounding) for the same scheduler config: options resolve as explicit option > the
schedule's config key > the diffusers scheduler's default.
"""

from __future__ import annotations

from collections.abc import Callable

from ..plan import StepPlan
from ..schedules import DiscreteSchedule
from . import ddim, deis, dpmpp, euler, ipndm, pndm, unipc
from .common import SolverError

_SOLVERS: dict[str, tuple[Callable[..., StepPlan], dict]] = {
    "ddim": (ddim.build, ddim.DEFAULTS),
    "pndm": (pndm.build, pndm.DEFAULTS),
    "euler": (euler.build, euler.DEFAULTS),
    "dpmpp_2m": (dpmpp.build, dpmpp.DEFAULTS),
    "unipc": (unipc.build, unipc.DEFAULTS),
    "deis": (deis.build, deis.DEFAULTS),
    "ipndm": (ipndm.build, ipndm.DEFAULTS),
}

# Named variants: a solver with options, usable wherever a sampler name is accepted.
VARIANTS: dict[str, tuple[str, dict]] = {
    "ddim": ("ddim", {}),
    "pndm": ("pndm", {}),
    "plms": ("pndm", {"skip_prk_steps": True}),
    "euler": ("euler", {}),
    "dpmpp_2m": ("dpmpp_2m", {}),
    "dpmpp_3m": ("dpmpp_2m", {"solver_order": 3}),
    "dpmpp_2m_karras": ("dpmpp_2m", {"use_karras_sigmas": True}),
    "unipc_bh2": ("unipc", {}),
    "unipc_bh2_3": ("unipc", {"solver_order": 3}),
    "unipc_bh1": ("unipc", {"solver_type": "bh1"}),
    "deis": ("deis", {}),
    "deis_3": ("deis", {"solver_order": 3}),
    "ipndm": ("ipndm", {}),
}

__all__ = ["VARIANTS", "SolverError", "build", "build_variant", "describe", "names", "options"]


def names() -> list[str]:
    """Names accepted by ``build``."""
    return list(_SOLVERS)


def _lookup(name: str):
    try:
        return _SOLVERS[name]
    except KeyError:
        raise SolverError(f"unknown solver {name!r}: expected one of {', '.join(_SOLVERS)}") from None


def build(name: str, schedule: DiscreteSchedule, steps: int, **options) -> StepPlan:
    """The StepPlan of solver `name` with `steps` steps on `schedule`.

    Example: ``build("dpmpp_2m", schedule, 20, use_karras_sigmas=True)``.
    """
    if not isinstance(schedule, DiscreteSchedule):
        raise SolverError(f"schedule must be a fastdiff DiscreteSchedule, got {type(schedule).__name__}")
    return _lookup(name)[0](schedule, steps, **options)


def build_variant(name: str, schedule: DiscreteSchedule, steps: int) -> StepPlan:
    """The plan of a solver name or a named variant (see VARIANTS), e.g. "dpmpp_2m_karras"."""
    if name in VARIANTS:
        solver, opts = VARIANTS[name]
        return build(solver, schedule, steps, **opts)
    if name in _SOLVERS:
        return build(name, schedule, steps)
    raise SolverError(
        f"unknown sampler {name!r}: expected a solver ({', '.join(_SOLVERS)}) or a variant ({', '.join(VARIANTS)})"
    )


def options(name: str) -> dict:
    """The options solver `name` accepts, with diffusers' defaults."""
    return dict(_lookup(name)[1])


def describe(name: str) -> str:
    """One line saying what solver `name` is."""
    doc = _lookup(name)[0].__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else name
