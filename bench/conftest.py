"""Benchmarks run with pytest-benchmark: `make bench` (CPU suites) writes JSON to bench/out/;
`make bench-check` runs the subset marked `check` against bench/baselines (bench/check.py).

Every run records its machine class (machine_info["machine_class"]) and, under "run_conditions",
how many cores other processes kept busy on average meanwhile (other_processes_cores: timings
from a busy machine are not comparable; bench/check.py says so). BENCH_SLOWDOWN=N runs the
reference sampling loop (fastdiff.loops.reference.run: the engines' loop on the CPU and the
"python" runtime of test_runtime_cpu.py) N times per call, returning the last result: a
deliberate N-fold slowdown with unchanged outputs, to show that `make bench-check` catches one.
The run's conditions say so (bench_slowdown), and such a run cannot become a baseline.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch


def _check_module():
    spec = importlib.util.spec_from_file_location("fastdiff_bench_check", Path(__file__).with_name("check.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


check = _check_module()
_START = check.cpu_usage()


def _slowdown() -> int | None:
    value = os.environ.get("BENCH_SLOWDOWN")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"BENCH_SLOWDOWN={value!r}: expected a whole number >= 1 (runs of each sampling loop)")
    return int(value)


def pytest_configure(config):
    times = _slowdown()
    if times and times > 1:
        from fastdiff.loops import reference

        reference.run = check.slowed_down(reference.run, times)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["machine_class"] = check.machine_class()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    conditions = {"other_processes_cores": check.busy_cores(_START, check.cpu_usage())}
    if _slowdown():
        conditions["bench_slowdown"] = _slowdown()
    output_json["run_conditions"] = conditions


@pytest.fixture(autouse=True)
def _relative_time(request):
    """For the benchmarks marked `check`: the yardstick (check.yardstick_seconds) right before and
    right after the benchmark, and extra_info relative_time = the benchmark's fastest round / the
    faster yardstick: its time side by side with a fixed workload in the same minute."""
    if request.node.get_closest_marker("check") is None or "benchmark" not in request.fixturenames:
        yield
        return
    bench = request.getfixturevalue("benchmark")  # set up before this fixture: torn down after it
    before = check.yardstick_seconds()
    yield
    stats = getattr(bench, "stats", None)
    if stats is None:  # skipped or failed before timing
        return
    yardstick = min(before, check.yardstick_seconds())
    bench.extra_info.update({"yardstick_s": yardstick, "relative_time": stats.stats.min / yardstick})


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
