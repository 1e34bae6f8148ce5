"""Analytic Gaussian-mixture data model: exact ε(x, t) and the exact probability-flow ODE solution.

Data x_0 ~ Σ_i w_i·N(μ_i, diag(s_i²)). In the VE variables x̃ = x/α and σ̃ = σ/α of a VP
schedule, x̃ = x_0 + σ̃·ε, so x̃ ~ Σ_i w_i·N(μ_i, diag(s_i² + σ̃²)) and the exact noise
prediction (ε̂ = −σ̃·∇ log p(x̃)) is

    ε̂(x̃, σ̃) = Σ_i γ_i(x̃)·σ̃·(x̃ − μ_i)/(s_i² + σ̃²),   γ_i ∝ w_i·N(x̃; μ_i, s_i² + σ̃²).

The probability-flow ODE in these variables is dx̃/dσ̃ = ε̂(x̃, σ̃) (Karras et al. 2022, eq. 4
with σ(t) = t). For one Gaussian it has the closed form
x̃(σ̃) = μ + (x̃(σ̃_0) − μ)·√(s² + σ̃²)/√(s² + σ̃_0²); for mixtures an adaptive 8th-order
Runge-Kutta (DOP853) integration gives the reference solution.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..schedules import DiscreteSchedule


class GaussianMixture:
    """A mixture of diagonal Gaussians in D dimensions (latents of any shape with D elements)."""

    def __init__(self, weights, means, variances):
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        mu = torch.as_tensor(np.asarray(means, dtype=np.float64))
        var = torch.as_tensor(np.asarray(variances, dtype=np.float64))
        if mu.dim() != 2:
            raise ValueError(f"means must be [components, dim], got shape {tuple(mu.shape)}")
        if var.shape != mu.shape:
            raise ValueError(f"variances must match means' shape {tuple(mu.shape)}, got {tuple(var.shape)}")
        if w.shape != (mu.shape[0],):
            raise ValueError(f"weights must have shape ({mu.shape[0]},), got {tuple(w.shape)}")
        if torch.any(w <= 0) or torch.any(var <= 0):
            raise ValueError("weights and variances must be positive")
        self.weights = w / w.sum()
        self.means = mu
        self.variances = var

    @classmethod
    def random(
        cls,
        dim: int,
        num_components: int = 4,
        *,
        seed: int = 0,
        spread: float = 1.0,
        std_range: tuple[float, float] = (0.1, 0.5),
    ) -> GaussianMixture:
        """Random means ~ N(0, spread²), stds uniform in std_range, weights uniform in [0.5, 1]."""
        rng = np.random.default_rng(seed)
        means = rng.normal(0.0, spread, size=(num_components, dim))
        stds = rng.uniform(*std_range, size=(num_components, dim))
        weights = rng.uniform(0.5, 1.0, size=num_components)
        return cls(weights, means, stds**2)

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples of x_0, float64 [n, D]."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[comp] + noise * self.variances[comp].sqrt()

    # ---------------------------------------------------------------- exact predictions
    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"latents have {flat.shape[1]} elements per sample, the mixture has dim {self.dim}")
        return flat

    def log_prob_ve(self, x_ve: torch.Tensor, ve_sigma) -> torch.Tensor:
        """log p(x̃) at noise level σ̃ (x̃ = x_0 + σ̃·ε), float64 [B]."""
        x = self._flat(x_ve).to(torch.float64)
        s2 = torch.as_tensor(ve_sigma, dtype=torch.float64, device=x.device).reshape(-1, 1, 1) ** 2
        var = self.variances.to(x.device)[None] + s2  # [B|1, K, D]
        diff = x[:, None, :] - self.means.to(x.device)[None]
        log_comp = -0.5 * (torch.log(2 * math.pi * var) + diff**2 / var).sum(-1)
        return torch.logsumexp(torch.log(self.weights.to(x.device))[None] + log_comp, dim=1)

    def eps_ve(self, x_ve: torch.Tensor, ve_sigma) -> torch.Tensor:
        """Exact ε̂(x̃, σ̃) in float64, shape [B, D]; ve_sigma a scalar or [B] (may be 0)."""
        x = self._flat(x_ve).to(torch.float64)
        sig = torch.as_tensor(ve_sigma, dtype=torch.float64, device=x.device).reshape(-1, 1, 1)
        var = self.variances.to(x.device)[None] + sig**2
        diff = x[:, None, :] - self.means.to(x.device)[None]
        log_comp = -0.5 * (torch.log(2 * math.pi * var) + diff**2 / var).sum(-1)
        gamma = torch.softmax(torch.log(self.weights.to(x.device))[None] + log_comp, dim=1)
        return (gamma[..., None] * sig * diff / var).sum(1)

    def denoiser(self, schedule: DiscreteSchedule, prediction_type: str | None = None):
        """model_fn(x, t) -> the exact raw output (ε, v or x_0) for VP latents x at model time t.

        t may be fractional; α_t, σ_t come from the schedule's log-SNR interpolation, computed
        on x's device with torch ops (the model itself never syncs with the host).
        """
        pred = prediction_type or schedule.prediction_type
        lambdas = torch.tensor(np.array(schedule.lambda_table))
        t_max = schedule.num_train_timesteps - 1

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            table = lambdas.to(x.device)
            t64 = t.to(torch.float64).clamp(0, t_max)
            low = t64.floor().clamp(max=t_max - 1)
            frac = t64 - low
            low = low.long()
            lam = (1 - frac) * table[low] + frac * table[low + 1]
            alpha = torch.sigmoid(2 * lam).sqrt()[:, None]
            sigma = torch.sigmoid(-2 * lam).sqrt()[:, None]
            x_ve = x.reshape(x.shape[0], -1).to(torch.float64) / alpha
            eps = self.eps_ve(x_ve, sigma / alpha)
            if pred == "epsilon":
                out = eps
            else:
                x0 = x_ve - (sigma / alpha) * eps
                out = x0 if pred == "sample" else alpha * eps - sigma * x0
            return out.reshape(x.shape).to(x.dtype)

        return model_fn

    # ---------------------------------------------------------------- exact ODE solutions
    def ode_solution(
        self,
        x_ve: torch.Tensor,
        sigma_start: float,
        sigma_end: float | list[float],
        *,
        rtol: float = 1e-11,
        atol: float = 1e-11,
    ):
        """x̃ at sigma_end on the probability-flow ODE through x̃ = x_ve at sigma_start.

        sigma_end may be a list (returns a list). Integrated in float64 by DOP853 to rtol/atol;
        the test suite checks the result against the closed form for a single Gaussian.
        """
        from scipy.integrate import solve_ivp

        ends = [sigma_end] if np.isscalar(sigma_end) else list(sigma_end)
        shape = x_ve.shape
        y0 = self._flat(x_ve).to(torch.float64).cpu().numpy().ravel()
        batch = shape[0]

        def rhs(s, y):
            x = torch.from_numpy(y.reshape(batch, self.dim))
            return self.eps_ve(x, s).numpy().ravel()

        order = sorted(set(ends), reverse=True)
        result = solve_ivp(rhs, (sigma_start, min(order)), y0, method="DOP853", rtol=rtol, atol=atol, t_eval=order)
        if not result.success:
            raise RuntimeError(f"reference ODE integration failed: {result.message}")
        by_sigma = {s: result.y[:, i] for i, s in enumerate(result.t)}
        outs = [torch.from_numpy(by_sigma[s]).reshape(shape).to(torch.float64) for s in ends]
        return outs[0] if np.isscalar(sigma_end) else outs

    def gaussian_ode_solution(self, x_ve: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor:
        """Closed-form ODE solution; only for a single component."""
        if self.num_components != 1:
            raise ValueError("the closed form exists for a single Gaussian only")
        x = self._flat(x_ve).to(torch.float64)
        mu, var = self.means[0], self.variances[0]
        ratio = torch.sqrt((var + sigma_end**2) / (var + sigma_start**2))
        return (mu + (x - mu) * ratio).reshape(x_ve.shape)


def exact_result(plan, mixture: GaussianMixture, schedule: DiscreteSchedule, x_T: torch.Tensor, reference=None):
    """The exact probability-flow ODE solution from x_T (the VP latent at the schedule's noisiest
    training time T−1) to the plan's own end noise level (metadata out_sigma/out_alpha; 0 and 1
    for a clean result), float64. `reference` may hold {out_sigma: exact x̃} to reuse
    integrations across plans."""
    t_max = schedule.num_train_timesteps - 1
    alpha_T = float(schedule.alpha_table[t_max])
    sigma_T = float(schedule.ve_sigma_table[t_max])
    out_sigma = float(plan.metadata.get("out_sigma", 0.0))
    out_alpha = float(plan.metadata.get("out_alpha", 1.0))
    if reference is not None and out_sigma in reference:
        exact_ve = reference[out_sigma]
    else:
        exact_ve = mixture.ode_solution(x_T.to(torch.float64) / alpha_T, sigma_T, out_sigma)
        if reference is not None:
            reference[out_sigma] = exact_ve
    return out_alpha * exact_ve


def solver_error(plan, mixture: GaussianMixture, schedule: DiscreteSchedule, x_T: torch.Tensor, reference=None):
    """Relative RMS error of a plan's result against the exact ODE solution from the same x_T
    (`exact_result`; plans should start at T−1, e.g. timestep_spacing="trailing").
    Returns (error, result)."""
    from ..denoisers import Unguided
    from ..loops import reference as reference_loop
    from ..program import compile as compile_program

    model = Unguided(mixture.denoiser(schedule))
    result = reference_loop.run(compile_program(plan), model, x_T).latents.to(torch.float64)
    exact = exact_result(plan, mixture, schedule, x_T, reference)
    error = torch.linalg.vector_norm(result - exact) / torch.linalg.vector_norm(exact)
    return float(error), result
