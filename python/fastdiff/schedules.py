"""Noise schedules: α_t, σ_t, λ_t of discrete VP schedules built from diffusers scheduler configs.

Data are noised as x_t = α_t·x_0 + σ_t·ε with α_t² = ᾱ_t (the cumulative product of 1 − β) and
σ_t² = 1 − ᾱ_t. The log-SNR is λ_t = log(α_t / σ_t), and diffusers' "sigmas" (the VE, or
k-diffusion, noise level) are σ_t / α_t = exp(−λ_t).

The betas and ᾱ are produced exactly as diffusers produces them (float32 torch ops, bit for
bit): those float32 values are the noise levels the model was trained with. Everything derived
from them (α, σ, λ, solver coefficients) is float64. Continuous times interpolate λ linearly between the integer
training timesteps, which is the same rule as diffusers' ``_sigma_to_t`` (log-sigma
interpolation), so ``t_of_lambda`` inverts it exactly. Where diffusers defines a grid by its own
float32 tables (Karras sigmas, lambda clipping), ``diffusers_float32_tables`` and
``t_of_ve_sigma_f32`` reproduce them.

The module-level functions relate the quantities of one latent: VE sigma to (α, σ), log-SNR,
and the prediction-type conversions between a model's raw output, x̂_0 and ε̂.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Scheduler configs of well-known models, as their scheduler_config.json files ship them.
PRESETS = {
    "sd15": {
        "num_train_timesteps": 1000,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
    },
    "sd21": {
        "num_train_timesteps": 1000,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "prediction_type": "v_prediction",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
    },
}

# diffusers' defaults for the keys the schedule itself reads (ConfigMixin fills them the same way)
_SCHEDULE_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
}


class ScheduleError(ValueError):
    """A scheduler config or a time/noise-level query that the schedule cannot serve."""


def _cosine_alpha_bar(t: float) -> float:
    # Nichol & Dhariwal 2021, eq. 17 with s = 0.008 (diffusers' "squaredcos_cap_v2")
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def diffusers_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Any = None,
) -> np.ndarray:
    """The float32 betas diffusers builds for this config, bit for bit (returned as float32)."""
    import torch

    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        values = []
        for i in range(num_train_timesteps):
            ratio = _cosine_alpha_bar((i + 1) / num_train_timesteps) / _cosine_alpha_bar(i / num_train_timesteps)
            values.append(min(1 - ratio, 0.999))
        betas = torch.tensor(values, dtype=torch.float32)
    else:
        raise ScheduleError(
            f"unknown beta_schedule {beta_schedule!r}: expected one of {', '.join(BETA_SCHEDULES)} "
            "(or pass trained_betas)"
        )
    return betas.numpy()


def diffusers_alphas_cumprod(betas32: np.ndarray) -> np.ndarray:
    """ᾱ as diffusers computes it: a float32 cumulative product of 1 − β (bit for bit)."""
    import torch

    return torch.cumprod(1.0 - torch.from_numpy(np.asarray(betas32, dtype=np.float32)), dim=0).numpy()


class DiscreteSchedule:
    """A discrete-time VP noise schedule (num_train_timesteps training steps) and its config.

    ``config`` keeps the whole diffusers scheduler config it was built from: solvers read their
    options from it with diffusers' precedence (explicit option > config key > scheduler default).
    """

    def __init__(
        self,
        betas: np.ndarray,
        prediction_type: str = "epsilon",
        config: Mapping | None = None,
        *,
        alphas_cumprod: np.ndarray | None = None,
    ):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 2:
            raise ScheduleError(f"betas must be a 1-D array of at least 2 values, got shape {betas.shape}")
        if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas >= 1):
            bad = int(np.flatnonzero(~((betas > 0) & (betas < 1)))[0])
            raise ScheduleError(f"betas must lie in (0, 1); betas[{bad}] = {betas[bad]!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ScheduleError(
                f"unknown prediction_type {prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}"
            )
        self.betas = betas
        self.betas.setflags(write=False)
        self.prediction_type = prediction_type
        self.config = dict(config or {})
        self.config.setdefault("num_train_timesteps", int(betas.size))
        self.config["prediction_type"] = prediction_type
        if alphas_cumprod is None:
            alphas_cumprod = np.cumprod(1.0 - betas)
        self.alphas_cumprod = np.array(alphas_cumprod, dtype=np.float64)
        if self.alphas_cumprod.shape != betas.shape:
            raise ScheduleError(f"alphas_cumprod has shape {self.alphas_cumprod.shape}, betas {betas.shape}")
        self.alphas_cumprod.setflags(write=False)
        # Tables at the integer training timesteps; λ is strictly decreasing in t.
        self.alpha_table = np.sqrt(self.alphas_cumprod)
        self.sigma_table = np.sqrt(1.0 - self.alphas_cumprod)
        self.lambda_table = np.log(self.alpha_table) - np.log(self.sigma_table)
        self.ve_sigma_table = np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)
        for table in (self.alpha_table, self.sigma_table, self.lambda_table, self.ve_sigma_table):
            table.setflags(write=False)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: Mapping) -> DiscreteSchedule:
        """Build from a diffusers scheduler config dict (any scheduler class's config)."""
        if not isinstance(config, Mapping):
            raise ScheduleError(f"scheduler config must be a mapping, got {type(config).__name__}")
        cfg = {**_SCHEDULE_DEFAULTS, **dict(config)}
        if cfg["trained_betas"] is not None and "num_train_timesteps" not in config:
            cfg["num_train_timesteps"] = len(cfg["trained_betas"])
        n = cfg["num_train_timesteps"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 2:
            raise ScheduleError(f"num_train_timesteps must be an integer >= 2, got {n!r}")
        if cfg.get("rescale_betas_zero_snr"):
            raise ScheduleError(
                "rescale_betas_zero_snr=True gives a zero terminal SNR (infinite noise level at "
                "the last timestep), which fastdiff's schedules do not support yet"
            )
        for key, allowed in (("prediction_type", PREDICTION_TYPES), ("timestep_spacing", TIMESTEP_SPACINGS)):
            if key in cfg and cfg[key] not in allowed:
                raise ScheduleError(f"unknown {key} {cfg[key]!r}: expected one of {', '.join(allowed)}")
        if cfg["trained_betas"] is None and cfg["beta_schedule"] not in BETA_SCHEDULES:
            raise ScheduleError(
                f"unknown beta_schedule {cfg['beta_schedule']!r}: expected one of "
                f"{', '.join(BETA_SCHEDULES)} (or pass trained_betas)"
            )
        if cfg["trained_betas"] is not None and len(cfg["trained_betas"]) != n:
            raise ScheduleError(f"trained_betas has {len(cfg['trained_betas'])} values but num_train_timesteps is {n}")
        betas32 = diffusers_betas(n, cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"], cfg["trained_betas"])
        return cls(
            betas32.astype(np.float64),
            cfg["prediction_type"],
            cfg,
            alphas_cumprod=diffusers_alphas_cumprod(betas32).astype(np.float64),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> DiscreteSchedule:
        """Build from a diffusers ``scheduler_config.json`` (or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            for candidate in (path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"):
                if candidate.is_file():
                    path = candidate
                    break
            else:
                raise ScheduleError(f"no scheduler_config.json in {path} or {path / 'scheduler'}")
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ScheduleError(f"cannot read scheduler config {path}: {exc}") from exc
        return cls.from_config(config)

    # ---------------------------------------------------------------- identity
    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.size)

    @property
    def fingerprint(self) -> str:
        """Identifies the noise levels (not the prediction type): sha256 of ᾱ in float64."""
        digest = hashlib.sha256(self.alphas_cumprod.astype("<f8").tobytes()).hexdigest()
        return f"sha256:{digest[:16]}"

    def option(self, key: str, default: Any) -> Any:
        """A config value with diffusers' precedence: the config's key if present, else default."""
        return self.config.get(key, default)

    def __repr__(self) -> str:
        kind = "trained_betas" if self.config.get("trained_betas") is not None else self.config.get("beta_schedule")
        return (
            f"DiscreteSchedule({kind}, T={self.num_train_timesteps}, "
            f"prediction_type={self.prediction_type!r}, {self.fingerprint})"
        )

    # ---------------------------------------------------------------- diffusers' float32 tables
    @cached_property
    def diffusers_float32_tables(self) -> dict[str, np.ndarray]:
        """diffusers' float32 ᾱ, VE sigmas and log-SNR (read-only; computed once per schedule),
        for the places where its grids (Karras sigmas, lambda clipping) are defined by them."""
        import torch

        ac = torch.from_numpy(self.alphas_cumprod.astype(np.float32))
        ve = ((1 - ac) / ac) ** 0.5
        lam = torch.log(torch.sqrt(ac)) - torch.log(torch.sqrt(1 - ac))
        tables = {"alphas_cumprod": ac.numpy(), "ve_sigmas": ve.numpy(), "lambdas": lam.numpy()}
        for table in tables.values():
            table.setflags(write=False)
        return tables

    # ---------------------------------------------------------------- continuous time
    def _check_t(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        bad = ~np.isfinite(t) | (t < 0) | (t > self.num_train_timesteps - 1)
        if np.any(bad):
            raise ScheduleError(
                f"time {t[bad].flat[0]!r} is outside the schedule's range [0, {self.num_train_timesteps - 1}]"
            )
        return t

    def lambda_(self, t) -> np.ndarray:
        """Log-SNR λ_t = log(α_t/σ_t); linear in t between integer timesteps."""
        t = self._check_t(t)
        return np.interp(t, np.arange(self.num_train_timesteps), self.lambda_table)

    def alpha(self, t) -> np.ndarray:
        """α_t = sqrt(ᾱ_t) = sqrt(sigmoid(2λ_t))."""
        lam = self.lambda_(t)
        return np.sqrt(1.0 / (1.0 + np.exp(-2.0 * lam)))

    def sigma(self, t) -> np.ndarray:
        """σ_t = sqrt(1 − ᾱ_t) = sqrt(sigmoid(−2λ_t))."""
        lam = self.lambda_(t)
        return np.sqrt(1.0 / (1.0 + np.exp(2.0 * lam)))

    def ve_sigma(self, t) -> np.ndarray:
        """diffusers' "sigma" σ_t/α_t = exp(−λ_t)."""
        return np.exp(-self.lambda_(t))

    def t_of_lambda(self, lam) -> np.ndarray:
        """Inverse of ``lambda_``: the (continuous) time at which the log-SNR equals lam."""
        lam = np.asarray(lam, dtype=np.float64)
        lo, hi = self.lambda_table[-1], self.lambda_table[0]
        bad = ~np.isfinite(lam) | (lam < lo) | (lam > hi)
        if np.any(bad):
            raise ScheduleError(f"log-SNR {lam[bad].flat[0]!r} is outside the schedule's range [{lo!r}, {hi!r}]")
        # np.interp needs increasing x: λ decreases with t, so interpolate on the reversed table.
        return np.interp(lam, self.lambda_table[::-1], np.arange(self.num_train_timesteps)[::-1])

    def t_of_ve_sigma(self, ve_sigma) -> np.ndarray:
        """Inverse of ``ve_sigma`` (diffusers' ``_sigma_to_t``)."""
        return self.t_of_lambda(-np.log(np.asarray(ve_sigma, dtype=np.float64)))

    def t_of_ve_sigma_f32(self, ve_sigma) -> np.ndarray:
        """``t_of_ve_sigma`` as diffusers computes it: log-sigma interpolation over its float32
        table of VE sigmas (diffusers' ``_sigma_to_t``), for grids diffusers defines that way."""
        log_table = np.log(self.diffusers_float32_tables["ve_sigmas"])
        log_sigma = np.log(np.maximum(np.asarray(ve_sigma, dtype=np.float64), 1e-10))
        dists = log_sigma - log_table[:, None]
        low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_table.shape[0] - 2)
        lo_val, hi_val = log_table[low], log_table[low + 1]
        w = np.clip((lo_val - log_sigma) / (lo_val - hi_val), 0, 1)
        return (1 - w) * low + w * (low + 1)

    def t_of_alpha(self, alpha) -> np.ndarray:
        """Inverse of ``alpha``."""
        a2 = np.asarray(alpha, dtype=np.float64) ** 2
        return self.t_of_lambda(0.5 * np.log(a2 / (1.0 - a2)))

    def t_of_sigma(self, sigma) -> np.ndarray:
        """Inverse of ``sigma``."""
        s2 = np.asarray(sigma, dtype=np.float64) ** 2
        return self.t_of_lambda(0.5 * np.log((1.0 - s2) / s2))


# -------------------------------------------------------------------- one latent's quantities
def vp_from_ve(ve_sigma: float) -> tuple[float, float]:
    """(α, σ) of the VP latent whose diffusers "sigma" (σ/α) is ve_sigma."""
    alpha = 1.0 / np.sqrt(ve_sigma**2 + 1.0)
    return float(alpha), float(ve_sigma * alpha)


def log_snr(alpha: float, sigma: float) -> float:
    """λ = log α − log σ (+inf at σ = 0, the clean end of a plan)."""
    with np.errstate(divide="ignore"):
        return float(np.log(alpha) - np.log(sigma))


def data_prediction(raw, x, alpha: float, sigma: float, prediction_type: str):
    """x̂_0 from the raw output at latent x with x = α·x_0 + σ·ε (v = α·ε − σ·x_0)."""
    if prediction_type == "epsilon":
        return (x - sigma * raw) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma * raw
    return raw


def noise_prediction(raw, x, alpha: float, sigma: float, prediction_type: str):
    """ε̂ from the raw output at latent x."""
    if prediction_type == "epsilon":
        return raw
    if prediction_type == "v_prediction":
        return alpha * raw + sigma * x
    return (x - alpha * raw) / sigma
