import json

import numpy as np
import pytest

from fastdiff.schedules import PRESETS, DiscreteSchedule, ScheduleError
from tests.conftest import SD_CONFIG

BETA_CONFIGS = [
    {"beta_schedule": "linear"},
    {"beta_schedule": "linear", "beta_start": 0.0002, "beta_end": 0.03, "num_train_timesteps": 777},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"trained_betas": list(np.linspace(1e-4, 0.02, 50)), "num_train_timesteps": 50},
]


def test_trained_betas_set_the_number_of_training_steps():
    assert DiscreteSchedule.from_config({"trained_betas": [0.01, 0.02, 0.03]}).num_train_timesteps == 3


@pytest.mark.parametrize("config", BETA_CONFIGS)
def test_betas_and_alphas_cumprod_match_diffusers_bit_for_bit(config, diffusers):
    ref = diffusers.DDPMScheduler(**config)
    sched = DiscreteSchedule.from_config(config)
    assert np.array_equal(sched.betas.astype(np.float32), ref.betas.numpy())
    assert np.array_equal(sched.betas, ref.betas.numpy().astype(np.float64))
    assert np.array_equal(sched.alphas_cumprod, ref.alphas_cumprod.numpy().astype(np.float64))


@pytest.mark.parametrize("config", BETA_CONFIGS)
def test_diffusers_float32_tables_match_diffusers_bit_for_bit(config, diffusers):
    tables = DiscreteSchedule.from_config(config).diffusers_float32_tables
    ddpm = diffusers.DDPMScheduler(**config)
    dpm = diffusers.DPMSolverMultistepScheduler(**config)
    for name, ref in (
        ("alphas_cumprod", ddpm.alphas_cumprod),
        ("ve_sigmas", dpm.sigmas),
        ("lambdas", dpm.lambda_t),
    ):
        assert tables[name].dtype == np.float32, name
        assert np.array_equal(tables[name], ref.numpy()), name


def test_diffusers_float32_tables_are_computed_once_and_read_only(sd_schedule):
    tables = sd_schedule.diffusers_float32_tables
    assert sd_schedule.diffusers_float32_tables is tables
    for name, table in tables.items():
        assert not table.flags.writeable, name


def test_t_of_ve_sigma_f32_is_diffusers_sigma_to_t(sd_schedule, diffusers):
    ref = diffusers.DPMSolverMultistepScheduler.from_config(SD_CONFIG)
    log_sigmas = np.log(ref.sigmas.numpy())
    sigmas = np.exp(np.linspace(np.log(0.03), np.log(14.0), 37))
    assert np.array_equal(sd_schedule.t_of_ve_sigma_f32(sigmas), ref._sigma_to_t(sigmas, log_sigmas))


def test_tables_are_consistent_vp_quantities(sd_schedule):
    s = sd_schedule
    assert np.allclose(s.alpha_table**2 + s.sigma_table**2, 1.0, atol=1e-15)
    assert np.allclose(s.lambda_table, np.log(s.alpha_table / s.sigma_table), atol=1e-12)
    assert np.allclose(s.ve_sigma_table, s.sigma_table / s.alpha_table, rtol=1e-13)
    assert np.all(np.diff(s.lambda_table) < 0), "log-SNR must decrease with t"


def test_continuous_time_agrees_with_tables_at_integers(sd_schedule):
    t = np.arange(sd_schedule.num_train_timesteps)
    assert np.allclose(sd_schedule.alpha(t), sd_schedule.alpha_table, rtol=1e-13)
    assert np.allclose(sd_schedule.sigma(t), sd_schedule.sigma_table, rtol=1e-13)
    assert np.allclose(sd_schedule.ve_sigma(t), sd_schedule.ve_sigma_table, rtol=1e-13)


def test_inverses_round_trip_at_fractional_times(sd_schedule):
    t = np.array([0.0, 0.25, 17.5, 499.999, 998.5, 999.0])
    s = sd_schedule
    assert np.allclose(s.t_of_lambda(s.lambda_(t)), t, atol=1e-9)
    assert np.allclose(s.t_of_ve_sigma(s.ve_sigma(t)), t, atol=1e-9)
    assert np.allclose(s.t_of_alpha(s.alpha(t)), t, atol=1e-6)
    assert np.allclose(s.t_of_sigma(s.sigma(t)), t, atol=1e-6)


def test_lambda_is_linear_between_training_steps(sd_schedule):
    lam = sd_schedule.lambda_table
    assert sd_schedule.lambda_(10.25) == pytest.approx(0.75 * lam[10] + 0.25 * lam[11], rel=1e-14)


def test_times_outside_the_schedule_are_refused(sd_schedule):
    with pytest.raises(ScheduleError, match=r"outside the schedule's range \[0, 999\]"):
        sd_schedule.alpha(1000.0)
    with pytest.raises(ScheduleError, match="outside"):
        sd_schedule.lambda_(np.nan)
    with pytest.raises(ScheduleError, match="log-SNR"):
        sd_schedule.t_of_lambda(100.0)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"beta_schedule": "cosine"}, "unknown beta_schedule 'cosine': expected one of linear, scaled_linear"),
        ({"prediction_type": "eps"}, "unknown prediction_type 'eps'"),
        ({"timestep_spacing": "uniform"}, "unknown timestep_spacing 'uniform'"),
        ({"num_train_timesteps": 1}, "num_train_timesteps must be an integer >= 2"),
        (
            {"trained_betas": [0.1, 0.2], "num_train_timesteps": 3},
            "trained_betas has 2 values but num_train_timesteps is 3",
        ),
        ({"trained_betas": [0.1, 1.5]}, r"betas must lie in \(0, 1\); betas\[1\]"),
        ({"rescale_betas_zero_snr": True}, "zero terminal SNR"),
    ],
)
def test_bad_configs_name_the_problem(config, message):
    with pytest.raises(ScheduleError, match=message):
        DiscreteSchedule.from_config(config)


def test_from_file_reads_a_diffusers_scheduler_directory(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**SD_CONFIG, "_class_name": "PNDMScheduler"})
    )
    sched = DiscreteSchedule.from_file(tmp_path)
    assert sched.fingerprint == DiscreteSchedule.from_config(SD_CONFIG).fingerprint
    assert sched.option("steps_offset", 0) == 1


def test_from_file_errors_name_the_path(tmp_path):
    with pytest.raises(ScheduleError, match="no scheduler_config.json"):
        DiscreteSchedule.from_file(tmp_path)
    bad = tmp_path / "scheduler_config.json"
    bad.write_text("{not json")
    with pytest.raises(ScheduleError, match="cannot read scheduler config"):
        DiscreteSchedule.from_file(bad)


def test_fingerprint_identifies_noise_levels_not_prediction_type():
    eps = DiscreteSchedule.from_config(PRESETS["sd15"])
    v = DiscreteSchedule.from_config(PRESETS["sd21"])
    linear = DiscreteSchedule.from_config({"beta_schedule": "linear"})
    assert eps.fingerprint == v.fingerprint
    assert eps.fingerprint != linear.fingerprint
    assert eps.fingerprint.startswith("sha256:")
