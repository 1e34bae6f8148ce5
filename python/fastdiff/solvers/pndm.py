"""PNDM (Liu et al. 2022): pseudo Runge-Kutta warm-up then pseudo linear multistep (PLMS),
as diffusers' PNDMScheduler runs it, including its call order and warm-up quirks."""

from __future__ import annotations

import numpy as np

from ..schedules import DiscreteSchedule
from .common import SolverError, Trace, check_grid, check_steps, n_point_timesteps, refuse, resolve_options

DEFAULTS = {
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "set_alpha_to_one": False,
    "skip_prk_steps": False,
}

# Adams-Bashforth weights over the newest-first history of noise predictions (PNDM eq. 12)
_PLMS_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _call_grid(num_train: int, steps: int, opts: dict) -> tuple[np.ndarray, np.ndarray]:
    """(prk call times, plms call times) in call order."""
    ascending = n_point_timesteps(num_train, steps, opts["timestep_spacing"], opts["steps_offset"])[::-1]
    if opts["skip_prk_steps"]:
        # The first PLMS step is a two-call Heun-like step, so the second grid point repeats.
        plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        return np.zeros(0, dtype=np.int64), plms.astype(np.int64)
    half = num_train // steps // 2
    prk = np.asarray(ascending[-4:]).repeat(2) + np.tile(np.array([0, half]), 4)
    prk = prk[:-1].repeat(2)[1:-1][::-1]
    return prk.astype(np.int64), ascending[:-3][::-1].astype(np.int64)


def build(schedule: DiscreteSchedule, steps: int, **options):
    """PNDM: 4-stage pseudo Runge-Kutta warm-up (3 steps, 12 calls) then 4th-order PLMS;
    with skip_prk_steps=True, a Heun-like 2-call first step then PLMS."""
    steps = check_steps("pndm", steps, schedule)
    opts = resolve_options("pndm", schedule, options, DEFAULTS)
    refuse("pndm", opts, {"skip_prk_steps": ((True, False), "expected a boolean")})
    num_train = schedule.num_train_timesteps
    skip_prk = bool(opts["skip_prk_steps"])
    if not skip_prk and steps < 4:
        raise SolverError(
            f"pndm: the pseudo Runge-Kutta warm-up needs steps >= 4 (got {steps}); "
            "pass skip_prk_steps=True for fewer steps"
        )
    prk_times, plms_times = _call_grid(num_train, steps, opts)
    call_times = np.concatenate([prk_times, plms_times]).astype(np.int64)
    check_grid("pndm", call_times, schedule)

    ac = schedule.alphas_cumprod
    final_ac = 1.0 if opts["set_alpha_to_one"] else ac[0]
    v_pred = schedule.prediction_type == "v_prediction"
    if schedule.prediction_type == "sample":
        raise SolverError("pndm: diffusers' PNDMScheduler supports epsilon and v_prediction models only")
    stride = num_train // steps
    half = stride // 2
    last_ac = [final_ac]

    def transfer(sample, t, t_prev, eps):
        """PNDM's transfer x_t -> x_{t_prev} (eq. 11) for a noise prediction eps."""
        a_t = ac[t]
        a_prev = ac[t_prev] if t_prev >= 0 else final_ac
        last_ac[0] = a_prev
        if v_pred:
            eps = np.sqrt(a_t) * eps + np.sqrt(1 - a_t) * sample
        denom = a_t * np.sqrt(1 - a_prev) + np.sqrt(a_t * (1 - a_t) * a_prev)
        return np.sqrt(a_prev / a_t) * sample - (a_prev - a_t) * eps / denom

    trace = Trace(len(call_times))
    x = trace.x_T()
    history: list[np.ndarray] = []  # noise predictions that PLMS extrapolates, oldest first
    rk_sum = 0.0
    rk_start = None  # latent the current Runge-Kutta step starts from
    counter = 0
    for t in call_times:
        out = trace.call(x, t)
        if counter < len(prk_times):
            stage = counter % 4
            t_prev = t - (0 if counter % 2 else half)
            t_from = prk_times[counter // 4 * 4]
            if stage == 0:
                rk_sum = out / 6
                history.append(out)
                rk_start = x
                eps = out
            elif stage in (1, 2):
                rk_sum = rk_sum + out / 3
                eps = out
            else:
                eps = rk_sum + out / 6
            x = transfer(rk_start, t_from, t_prev, eps)
        else:
            t_from, t_prev = t, t - stride
            if counter == 1:  # second call of the Heun-like first step (skip_prk_steps only)
                t_from, t_prev = t + stride, t
                eps = (out + history[-1]) / 2
                x = transfer(rk_start, t_from, t_prev, eps)
            else:
                history = history[-3:] + [out]
                weights = _PLMS_WEIGHTS[len(history)]
                eps = sum(w * e for w, e in zip(weights, history[::-1]))
                if counter == 0:
                    rk_start = x
                x = transfer(x, t_from, t_prev, eps)
        counter += 1
    return trace.finish(
        x,
        schedule,
        solver="pndm",
        steps=steps,
        options=opts,
        out_sigma=float(np.sqrt((1 - last_ac[0]) / last_ac[0])),
        diffusers_class="PNDMScheduler",
    )
