"""Latent and weight dtypes by name: what users pass (``"float16"``) and what messages print."""

from __future__ import annotations

NAMES = ("float32", "float16", "bfloat16")  # the dtypes engines run in


def dtype_name(dtype) -> str:
    """The name of a dtype, e.g. "float16" for torch.float16 (any str(dtype) of the form "torch.<name>")."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(dtype):
    """A torch dtype from a name in NAMES or a torch dtype; ValueError names the choices."""
    import torch

    if isinstance(dtype, str):
        if dtype not in NAMES:
            raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(NAMES)}")
        return getattr(torch, dtype)
    if dtype not in tuple(getattr(torch, n) for n in NAMES):
        raise ValueError(f"unsupported dtype {dtype}: expected one of {', '.join(NAMES)}")
    return dtype


def compute_dtype(dtype):
    """The dtype the loops compute in for latents of `dtype` (coefficient tables, guidance weights,
    the fused step's arithmetic): float64 for float64 latents, float32 for every other."""
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32
