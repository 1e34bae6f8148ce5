"""Elementwise ops of the sampling loop: the torch reference implementations.

Fused device kernels (Triton, CUDA) implement the same API and are tested against these.
"""

from .lincomb import lincomb, lincomb_

__all__ = ["lincomb", "lincomb_"]
