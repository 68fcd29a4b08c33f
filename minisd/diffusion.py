"""The forward (noising) process q and the training objective of a diffusion model.

A noise schedule fixes β_1 … β_T. One forward step adds a little Gaussian noise
(DDPM, Ho et al. 2020, eq. 2):

    q(x_t | x_{t-1}) = N( sqrt(1 − β_t) · x_{t-1},  β_t · I )

and, with α_t = 1 − β_t and ᾱ_t = ∏_{s≤t} α_s, any step can be reached in one jump (eq. 4):

    q(x_t | x_0) = N( sqrt(ᾱ_t) · x_0,  (1 − ᾱ_t) · I ),   i.e.  x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε.

Nothing here is learned. Timesteps are 0-based, t = 0 … T−1, as in diffusers: index t holds
β_{t+1} of the paper. Betas, `alphas_cumprod`, `add_noise` and `velocity` equal diffusers'
`DDPMScheduler` for the same settings (tested).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minisd.distributed import draw_device, rows
from minisd.errors import MinisdError, cheap_to_read, check_choice

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Each schedule with the β range it is known by (chapter 1's table): DDPM's linear 10⁻⁴ → 0.02, Stable
# Diffusion's scaled_linear 0.00085 → 0.012 (its scheduler config), Improved DDPM's cosine (no range).
STANDARD_BETAS = {"linear": {"beta_start": 1e-4, "beta_end": 0.02},
                  "scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012},
                  "cosine": {}}


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021, eq. 17), 'squaredcos_cap_v2'.

    ᾱ(t) = cos²((t/T + s) / (1 + s) · π/2) with s = 0.008, and β_t = 1 − ᾱ(t+1)/ᾱ(t),
    capped at `max_beta` so the last steps do not become singular.
    """

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


class NoiseSchedule:
    """β_t, α_t, ᾱ_t for t = 0 … T−1, and the closed-form forward process.

    Args:
        num_train_timesteps: T.
        beta_schedule: 'linear' (DDPM: β from beta_start to beta_end), 'scaled_linear'
            (Stable Diffusion: linear in sqrt β), or 'cosine' (Improved DDPM; ignores beta_start/end).
        beta_start, beta_end: the first and last β for the two linear schedules.
    """

    @classmethod
    def standard(cls, beta_schedule: str, num_train_timesteps: int = 1000) -> NoiseSchedule:
        """The schedule as its authors defined it (`STANDARD_BETAS`): e.g. 'scaled_linear' is Stable Diffusion's."""
        check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        return cls(num_train_timesteps, beta_schedule, **STANDARD_BETAS[beta_schedule])

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02):
        check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        if int(num_train_timesteps) != num_train_timesteps or num_train_timesteps < 2:
            raise MinisdError(f"num_train_timesteps must be an integer ≥ 2, got {num_train_timesteps!r}")
        if not 0 < beta_start <= beta_end < 1:
            raise MinisdError(f"need 0 < beta_start ≤ beta_end < 1, got {beta_start} and {beta_end}")
        T = int(num_train_timesteps)
        self.num_train_timesteps, self.beta_schedule = T, beta_schedule
        self.beta_start, self.beta_end = beta_start, beta_end
        if beta_schedule == "linear":
            self.betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            self.betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
        else:
            self.betas = cosine_betas(T)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # ᾱ_t

    def __repr__(self) -> str:
        return (f"NoiseSchedule(num_train_timesteps={self.num_train_timesteps}, "
                f"beta_schedule={self.beta_schedule!r})")

    def config(self) -> dict:
        return {"num_train_timesteps": self.num_train_timesteps, "beta_schedule": self.beta_schedule,
                "beta_start": self.beta_start, "beta_end": self.beta_end}

    # --- helpers -------------------------------------------------------------------------
    def check_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Return `t` as a LongTensor, or raise if any value lies outside 0 … T−1."""
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point:
            raise MinisdError(f"timesteps must be integers, got dtype {t.dtype}")
        t = t.long()
        if t.numel() and cheap_to_read(t) and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            bad = t[(t < 0) | (t >= self.num_train_timesteps)][0].item()
            raise MinisdError(f"timestep {bad} is out of range; allowed: 0 … {self.num_train_timesteps - 1}")
        return t

    def _gather(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] shaped (B, 1, 1, …) to broadcast against `like` (B, …)."""
        t = self.check_timesteps(t).to(values.device)
        out = values[t].to(device=like.device, dtype=like.dtype)
        return out.reshape(out.shape + (1,) * (like.ndim - out.ndim))

    # --- the forward process -------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) in one jump: x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε.  t: (B,)."""
        a = self._gather(self.alphas_cumprod, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def q_step(self, x_prev: torch.Tensor, t: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """One forward step q(x_t | x_{t−1}) = N(sqrt(1 − β_t) x_{t−1}, β_t I).

        Taking it for t = 0, 1, …, k gives the same distribution as `add_noise` at t = k;
        chapter 1 checks that. Here x_prev is the image *before* step t (the data itself for t = 0).
        """
        beta = self._gather(self.betas, t, x_prev)
        noise = torch.randn(x_prev.shape, generator=generator, dtype=x_prev.dtype,
                            device=draw_device(generator)).to(x_prev.device)
        return (1 - beta).sqrt() * x_prev + beta.sqrt() * noise

    def q_sample_iterative(self, x0: torch.Tensor, t: int,
                           generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t reached by t+1 single steps from x0 (slow; for teaching and tests)."""
        x = x0
        for s in range(int(self.check_timesteps(torch.tensor(t))) + 1):
            x = self.q_step(x, torch.full((len(x0),), s, dtype=torch.long), generator)
        return x

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v target (Salimans & Ho 2022): v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x_0."""
        a = self._gather(self.alphas_cumprod, t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def snr(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t), for the given timesteps or all of them."""
        a = self.alphas_cumprod if t is None else self.alphas_cumprod[self.check_timesteps(t)]
        return a / (1 - a)

    # --- from a model's output back to x0 and ε --------------------------------------------
    def predict_x0_and_eps(self, model_output, x_t, t, prediction_type: str = "epsilon"):
        """Turn a model output of any prediction type into (pred_x0, pred_eps)."""
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        a = self._gather(self.alphas_cumprod, t, x_t)
        if prediction_type == "epsilon":
            eps = model_output
            x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        elif prediction_type == "sample":
            x0 = model_output
            eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        else:  # v = sqrt(ā) ε − sqrt(1−ā) x0  ⇒  x0 = sqrt(ā) x_t − sqrt(1−ā) v
            x0 = a.sqrt() * x_t - (1 - a).sqrt() * model_output
            eps = a.sqrt() * model_output + (1 - a).sqrt() * x_t
        return x0, eps


def training_target(schedule: NoiseSchedule, x0, noise, t, prediction_type: str = "epsilon"):
    """What the network should output at x_t: ε, v, or x_0 itself."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return schedule.velocity(x0, noise, t)
    return x0


def diffusion_loss(model, schedule: NoiseSchedule, x0: torch.Tensor, *,
                   prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                   **model_kwargs) -> torch.Tensor:
    """The simplified DDPM objective (Ho et al. 2020, eq. 14), for any prediction type:

        t ~ U{0 … T−1},  ε ~ N(0, I),  x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε,
        L = ‖ model(x_t, t) − target ‖²   (mean over every element)

    `model(x_t, t, **model_kwargs)`; x0: (B, …); returns a scalar.
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    # `rows`: in data-parallel training, this process's rows of a draw for the whole global batch
    B, T = x0.shape[0], schedule.num_train_timesteps
    where = draw_device(generator)  # the generator's device: on a GPU, nothing is drawn on the CPU
    t = rows(lambda m: torch.randint(0, T, (m,), generator=generator, device=where), B).to(x0.device)
    noise = rows(lambda m: torch.randn((m, *x0.shape[1:]), generator=generator, device=where), B).to(x0.device, x0.dtype)
    x_t = schedule.add_noise(x0, noise, t)
    target = training_target(schedule, x0, noise, t, prediction_type)
    return F.mse_loss(model(x_t, t, **model_kwargs), target)
