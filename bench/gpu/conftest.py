"""What the GPU benchmarks run on: the sd21 architecture (random weights, float16, 768²) on a CUDA
device, or, with FASTDIFF_BENCH_GPU_TINY=1, the shipped tiny-shapes model on the CPU (a smoke test
of the code paths for CI: its numbers mean nothing). Without either every test is skipped.

Fixtures: `target` (the setting), `engine(backend)` (built once per session), `diffusers_pipe`
(an unmodified diffusers StableDiffusionPipeline of the same architecture with DPM-Solver++(2M))
and `record` (puts the setting and nvidia-ml-py telemetry into benchmark.extra_info).
"""

from __future__ import annotations

import functools
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

TINY_ENV = "FASTDIFF_BENCH_GPU_TINY"


@dataclass(frozen=True)
class Target:
    """The model and device the suite measures, and how many rounds each kind of benchmark gets."""

    tiny: bool
    device: torch.device
    dtype: torch.dtype
    model: str
    skipped_backends: dict[str, str] = field(default_factory=dict)  # backend -> why it is not measured
    rounds: dict[str, int] = field(default_factory=dict)  # benchmark kind -> timed rounds
    warmup_rounds: int = 1

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({cpu_name()})"


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def tiny_requested() -> bool:
    return os.environ.get(TINY_ENV, "") == "1"


def gpu_target() -> Target:
    return Target(
        tiny=False,
        device=torch.device("cuda", torch.cuda.current_device()),
        dtype=torch.float16,
        model="sd21",
        rounds={"unet": 20, "text": 20, "vae": 10, "e2e": 10, "diffusers": 10, "diffusers_long": 5},
        warmup_rounds=2,
    )


def tiny_target() -> Target:
    torch.set_num_threads(2)  # like the CI machine (bench/conftest.py)
    return Target(
        tiny=True,
        device=torch.device("cpu"),
        dtype=torch.float32,
        model="tiny-shapes",
        skipped_backends={
            "cuda_graph": "CUDA graphs need a CUDA device (tiny CPU run)",
            "compiled": "torch.compile on the CPU takes minutes per shape: not part of the tiny CPU run",
        },
        rounds={"unet": 2, "text": 2, "vae": 2, "e2e": 2, "diffusers": 2, "diffusers_long": 1},
        warmup_rounds=0,
    )


@pytest.fixture(scope="session")
def target() -> Target:
    if tiny_requested():
        return tiny_target()
    if torch.cuda.is_available():
        return gpu_target()
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    pytest.skip(
        f"no CUDA device (torch {torch.__version__}, {build}): the GPU benchmarks need one; "
        f"{TINY_ENV}=1 runs them on the CPU with tiny-shapes as a smoke test"
    )


@pytest.fixture(autouse=True)
def _needs_target(target):
    """Every test here needs the setting: without CUDA or the tiny switch, all are skipped."""


@pytest.fixture(scope="session")
def engine(target):
    """engine(backend): the target model's engine with that backend (built once), or a skip
    naming why the backend is not measured here."""
    import fastdiff
    from fastdiff.engines import BackendUnavailableError

    engines = {}

    def build(backend: str):
        if backend in target.skipped_backends:
            pytest.skip(target.skipped_backends[backend])
        if backend not in engines:
            weights = None if target.tiny else "random"
            try:
                engines[backend] = fastdiff.build_engine(
                    target.model, weights=weights, device=target.device, dtype=target.dtype, backend=backend
                )
            except BackendUnavailableError as exc:
                pytest.skip(str(exc))
        return engines[backend]

    return build


@pytest.fixture(scope="session")
def diffusers_pipe(target):
    """diffusers' StableDiffusionPipeline over the target's architecture, eager, with the 2M
    solver the engines' default plan (dpmpp_2m) uses."""
    diffusers = pytest.importorskip("diffusers")
    solver = diffusers.DPMSolverMultistepScheduler
    if target.tiny:
        from fastdiff.models.loading import engines_dir, load_sd_pipeline

        pipe = load_sd_pipeline(engines_dir() / "tiny-shapes", target.device, target.dtype)
        pipe.scheduler = solver.from_config(pipe.scheduler.config)
    else:
        from fastdiff.models.sd21 import build_random_components, config_dir

        tokenizer, text_encoder, unet, vae = build_random_components(target.device, target.dtype)
        config = json.loads((config_dir() / "scheduler" / "scheduler_config.json").read_text())
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=solver.from_config(config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def telemetry(device: torch.device) -> dict:
    """GPU name, memory used (MiB, the whole device as nvidia-smi shows it), power (W) and SM
    clock (MHz) from nvidia-ml-py, and the driver version; when it cannot read them,
    `telemetry_unavailable` says why and the values are None."""
    info = {"gpu_name": None, "memory_used_mib": None, "power_w": None, "sm_clock_mhz": None, "driver": None}
    if device.type != "cuda":
        return {**info, "telemetry_unavailable": f"no GPU: the run is on {device}"}
    info["gpu_name"] = torch.cuda.get_device_name(device)
    try:
        import pynvml
    except ImportError:
        return {**info, "telemetry_unavailable": "nvidia-ml-py is not installed (pip install nvidia-ml-py)"}
    try:
        # torch maps the CUDA device to its NVML index (CUDA_VISIBLE_DEVICES, UUIDs) and reads NVML
        info["memory_used_mib"] = torch.cuda.device_memory_used(device) / 2**20
        info["power_w"] = torch.cuda.power_draw(device) / 1e3
        info["sm_clock_mhz"] = torch.cuda.clock_rate(device)
        driver = pynvml.nvmlSystemGetDriverVersion()
        info["driver"] = driver.decode() if isinstance(driver, bytes) else driver
    except Exception as exc:  # NVMLError subclasses differ between driver versions
        return {**info, "telemetry_unavailable": f"nvidia-ml-py could not read the GPU: {type(exc).__name__}: {exc}"}
    return info


@pytest.fixture
def record(benchmark, target):
    """record(**fields): the setting, the fields and telemetry read right after the timed rounds
    (power and clock are NVML's averages over its last sample period) into extra_info."""

    if target.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target.device)

    def write(**fields) -> None:
        benchmark.extra_info.update(
            {
                "device": target.device_name,
                "tiny": target.tiny,
                "model": target.model,
                "dtype": str(target.dtype).removeprefix("torch."),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                **fields,
                **telemetry(target.device),
            }
        )
        if target.device.type == "cuda":
            benchmark.extra_info["max_allocated_mib"] = torch.cuda.max_memory_allocated(target.device) / 2**20

    return write
