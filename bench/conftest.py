"""Benchmarks run with pytest-benchmark: `make bench` (CPU suites) writes JSON to bench/out/."""

import pytest
import torch


@pytest.fixture(scope="session")
def cpu_engine():
    """cpu_engine(name): the shipped model's engine on the CPU with 2 threads like the CI machine
    (built once per session), or a skip when engines/ lacks the model."""
    import fastdiff

    engines = {}

    def build(name: str):
        if name not in engines:
            torch.set_num_threads(2)
            try:
                engines[name] = fastdiff.build_engine(name, device="cpu")
            except FileNotFoundError as exc:
                pytest.skip(str(exc))
        return engines[name]

    return build
