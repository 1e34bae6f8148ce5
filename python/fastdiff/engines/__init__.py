"""Engines: conditioner + UNet (through a module backend) + decoder + a loop, behind ``sample``."""

from .backends import BACKENDS, BackendUnavailableError
from .engine import Engine, NonFiniteError, OutOfMemoryError, SampleOutput

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "Engine",
    "NonFiniteError",
    "OutOfMemoryError",
    "SampleOutput",
]
