"""Reference linear combination of latents: Σ_j c_j·src_j, the update of every StepPlan step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

_EXACT_DTYPES = (torch.float32, torch.float64)


def lincomb(srcs: Sequence[torch.Tensor], coefs: Sequence[float]) -> torch.Tensor:
    """A new tensor Σ coefs[j]·srcs[j]; half/bfloat16 inputs accumulate in float32."""
    if len(srcs) != len(coefs) or not srcs:
        raise ValueError(f"lincomb needs matching non-empty srcs and coefs, got {len(srcs)} and {len(coefs)}")
    return lincomb_(torch.empty_like(srcs[0]), srcs, coefs)


def lincomb_(dst: torch.Tensor, srcs: Sequence[torch.Tensor], coefs: Sequence[float]) -> torch.Tensor:
    """dst ← Σ coefs[j]·srcs[j] in place; dst may be one of srcs (elementwise, so well defined).

    float32/float64 run as in-place multiply-adds in the tensor's dtype (the rounding of a
    step-by-step scheduler); half and bfloat16 accumulate in float32 and round once.
    Coefficients are host floats: nothing here reads device memory back to the host.
    """
    if len(srcs) != len(coefs) or not srcs:
        raise ValueError(f"lincomb needs matching non-empty srcs and coefs, got {len(srcs)} and {len(coefs)}")
    for j, s in enumerate(srcs):
        if s.shape != dst.shape:
            raise ValueError(f"lincomb: srcs[{j}] has shape {tuple(s.shape)} but dst has {tuple(dst.shape)}")
    if dst.dtype not in _EXACT_DTYPES:
        acc = sum(float(c) * s.float() for s, c in zip(srcs, coefs))
        return dst.copy_(acc)
    # Put dst's own term first so that it is scaled before anything else is added to it.
    order = sorted(range(len(srcs)), key=lambda j: srcs[j] is not dst)
    first = order[0]
    if srcs[first] is dst:
        dst.mul_(float(coefs[first]))
    else:
        torch.mul(srcs[first], float(coefs[first]), out=dst)
    for j in order[1:]:
        if srcs[j] is dst:
            raise ValueError("lincomb: dst appears twice among srcs")
        dst.add_(srcs[j], alpha=float(coefs[j]))
    return dst
