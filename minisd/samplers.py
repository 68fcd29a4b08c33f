"""The learned reverse process p(x_{t-1} | x_t): DDPM and DDIM steps, and one sampling loop.

A sampler walks a list of timesteps from noisy to clean. At each one the network's output is
turned into a guess of the clean sample, pred_x0, and of the noise, pred_eps, and the sampler
moves x_t to an earlier timestep x_prev. The two samplers differ only in that move:

    DDPM (Ho et al. 2020, eqs. 6–7): sample the Gaussian posterior q(x_prev | x_t, pred_x0)
        mean = sqrt(ᾱ_prev) β̃ / (1 − ᾱ_t) · pred_x0 + sqrt(α̃) (1 − ᾱ_prev) / (1 − ᾱ_t) · x_t
        where α̃ = ᾱ_t / ᾱ_prev and β̃ = 1 − α̃; variance 'fixed_small' = (1 − ᾱ_prev)/(1 − ᾱ_t) · β̃,
        'fixed_large' = β̃.
    DDIM (Song et al. 2021, eq. 12):
        x_prev = sqrt(ᾱ_prev) pred_x0 + sqrt(1 − ᾱ_prev − σ²) pred_eps + σ z,
        σ = η · sqrt((1 − ᾱ_prev)/(1 − ᾱ_t)) · sqrt(1 − ᾱ_t/ᾱ_prev); η = 0 is deterministic.

Numerics and timesteps equal diffusers' DDPMScheduler and DDIMScheduler (clip_sample=False), tested.
As there, the previous timestep is t − T // num_inference_steps, and ᾱ_prev = 1 once that falls
below 0. Two options exist for Stable Diffusion's scheduler configs: `steps_offset` shifts the
'leading' timesteps up (SD: 1, so 10 steps visit 901, 801, …, 1), and DDIM's `set_alpha_to_one=False`
takes ᾱ_0 instead of 1 as the ᾱ_prev of the last step (SD's setting). The defaults, 0 and True,
are the DDIM paper's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from minisd.diffusion import PREDICTION_TYPES, NoiseSchedule
from minisd.errors import MinisdError, check_choice

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_large")


@dataclass
class SamplerOutput:
    prev_sample: torch.Tensor  # x at the previous (less noisy) timestep
    pred_original_sample: torch.Tensor  # the model's current guess of x0


def make_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str,
                   steps_offset: int = 0) -> torch.Tensor:
    """The descending timesteps a sampler visits (the same lists as diffusers).

    'leading':  0, k, 2k, … with k = T // n, reversed, each + steps_offset
                (DDPM/DDIM papers: offset 0, never visits T−1; Stable Diffusion: offset 1)
    'trailing': T−1, T−1−T/n, … rounded                 (starts at pure noise; Lin et al. 2024)
    'linspace': n points evenly from T−1 down to 0, rounded
    """
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    T, n = num_train_timesteps, num_inference_steps
    if isinstance(n, bool) or int(n) != n or not 1 <= n <= T:
        raise MinisdError(f"num_inference_steps {n!r} is not allowed; use an integer from 1 to {T}")
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, (int, np.integer)) or not 0 <= steps_offset < T:
        raise MinisdError(f"steps_offset {steps_offset!r} is not allowed; use an integer from 0 to {T - 1}")
    n = int(n)
    if spacing == "leading":  # the offset applies to this spacing only, as in diffusers
        ts = (np.arange(0, n) * (T // n)).round()[::-1] + int(steps_offset)
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        ts = np.linspace(0, T - 1, n).round()[::-1]
    return torch.from_numpy(ts.astype(np.int64).copy())


class _Sampler:
    """What DDPM and DDIM share: the timestep list and the step's bookkeeping."""

    def __init__(self, schedule: NoiseSchedule, num_inference_steps: int | None,
                 timestep_spacing: str, prediction_type: str, steps_offset: int = 0):
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        T = schedule.num_train_timesteps
        self.num_inference_steps = T if num_inference_steps is None else num_inference_steps
        self.timesteps = make_timesteps(T, self.num_inference_steps, timestep_spacing, steps_offset)
        self.num_inference_steps = len(self.timesteps)
        self.final_alpha_cumprod = torch.tensor(1.0)  # ᾱ_prev once the previous timestep is below 0

    def previous_timestep(self, t: int) -> int:
        return t - self.schedule.num_train_timesteps // self.num_inference_steps

    def begin(self, index: int = 0) -> None:
        """Prepare to visit `timesteps[index:]` (a stateless sampler has nothing to prepare)."""

    def _alphas(self, t: int):
        t = int(self.schedule.check_timesteps(torch.as_tensor(t)))
        ac = self.schedule.alphas_cumprod
        prev = self.previous_timestep(t)
        alpha_prod_t = ac[t]
        alpha_prod_prev = ac[prev] if prev >= 0 else self.final_alpha_cumprod
        return t, alpha_prod_t, alpha_prod_prev

    def _pred_x0_eps(self, model_output, x_t, t):
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long)
        return self.schedule.predict_x0_and_eps(model_output, x_t, tt, self.prediction_type)


class DDPMSampler(_Sampler):
    """Ancestral sampling (Ho et al. 2020). With num_inference_steps=None it visits all T steps.
    steps_offset: added to 'leading' timesteps (see `make_timesteps`)."""

    def __init__(self, schedule: NoiseSchedule, num_inference_steps: int | None = None,
                 variance_type: str = "fixed_small", timestep_spacing: str = "leading",
                 prediction_type: str = "epsilon", steps_offset: int = 0):
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        super().__init__(schedule, num_inference_steps, timestep_spacing, prediction_type, steps_offset)
        self.variance_type = variance_type

    def step(self, model_output: torch.Tensor, t: int, x_t: torch.Tensor,
             generator: torch.Generator | None = None) -> SamplerOutput:
        t, alpha_prod_t, alpha_prod_prev = self._alphas(t)
        alpha_t = alpha_prod_t / alpha_prod_prev  # α̃: the α of this (possibly strided) step
        beta_t = 1 - alpha_t
        pred_x0, _ = self._pred_x0_eps(model_output, x_t, t)
        # Mean of the posterior q(x_prev | x_t, x0) (Ho et al. eq. 7)
        coef_x0 = alpha_prod_prev.sqrt() * beta_t / (1 - alpha_prod_t)
        coef_xt = alpha_t.sqrt() * (1 - alpha_prod_prev) / (1 - alpha_prod_t)
        prev = coef_x0 * pred_x0 + coef_xt * x_t
        if t > 0:
            if self.variance_type == "fixed_small":  # β̃_t of the posterior
                var = ((1 - alpha_prod_prev) / (1 - alpha_prod_t) * beta_t).clamp(min=1e-20)
            else:  # β_t: the forward step's own variance
                var = beta_t
            z = torch.randn(model_output.shape, generator=generator, dtype=model_output.dtype)
            prev = prev + var.sqrt() * z.to(model_output.device)
        return SamplerOutput(prev, pred_x0)


class DDIMSampler(_Sampler):
    """DDIM (Song et al. 2021): eta = 0 is deterministic; eta = 1 matches DDPM's variance.

    steps_offset: added to 'leading' timesteps (see `make_timesteps`; Stable Diffusion: 1).
    set_alpha_to_one: the ᾱ_prev of the last step, whose previous timestep lies below 0, is 1
    (True: the step lands on clean data) or ᾱ_0 (False: Stable Diffusion's scheduler configs).
    """

    def __init__(self, schedule: NoiseSchedule, num_inference_steps: int = 50, eta: float = 0.0,
                 timestep_spacing: str = "leading", prediction_type: str = "epsilon",
                 steps_offset: int = 0, set_alpha_to_one: bool = True):
        if not 0.0 <= eta <= 1.0:
            raise MinisdError(f"eta {eta!r} is out of range; allowed: 0.0 … 1.0")
        if not isinstance(set_alpha_to_one, bool):
            raise MinisdError(f"set_alpha_to_one must be True or False, got {set_alpha_to_one!r}")
        super().__init__(schedule, num_inference_steps, timestep_spacing, prediction_type, steps_offset)
        self.eta, self.set_alpha_to_one = eta, set_alpha_to_one
        if not set_alpha_to_one:
            self.final_alpha_cumprod = schedule.alphas_cumprod[0]

    def step(self, model_output: torch.Tensor, t: int, x_t: torch.Tensor,
             generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None) -> SamplerOutput:
        t, alpha_prod_t, alpha_prod_prev = self._alphas(t)
        pred_x0, pred_eps = self._pred_x0_eps(model_output, x_t, t)
        variance = (1 - alpha_prod_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)
        sigma = self.eta * variance.sqrt()
        # DDIM eq. 12: the "predicted x0" part plus the "direction pointing to x_t" part
        prev = alpha_prod_prev.sqrt() * pred_x0 + (1 - alpha_prod_prev - sigma**2).sqrt() * pred_eps
        if self.eta > 0:
            if variance_noise is None:
                variance_noise = torch.randn(model_output.shape, generator=generator,
                                             dtype=model_output.dtype).to(model_output.device)
            prev = prev + sigma * variance_noise
        return SamplerOutput(prev, pred_x0)


class DPMSolverSampler(_Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", algorithm 2): a multistep solver of the
    diffusion ODE that reaches DDIM-50 quality in 10–20 steps.

    In terms of σ_t = sqrt((1 − ᾱ_t)/ᾱ_t), α_t = sqrt(ᾱ_t), σ'_t = σ_t α_t and the log-SNR
    λ_t = log(α_t / σ'_t), one step from s to t with h = λ_t − λ_s and the x0 predictions D:

        first order (= DDIM):  x_t = (σ'_t/σ'_s) x_s − α_t (e^{−h} − 1) D_s
        second order:          the same with D_s + ½ (D_s − D_prev) · h / h_prev   ('midpoint')

    It remembers the previous step's D, so steps must be taken in order (a call at the first
    timestep starts afresh). The first step is first order (no history yet) and so is the last,
    which goes to σ = 0 and returns the x0 prediction. Timesteps, numerics and these rules equal
    diffusers' DPMSolverMultistepScheduler (solver_order=2, algorithm 'dpmsolver++', 'midpoint',
    final_sigmas_type 'zero'), whose default spacing is 'linspace' over n + 1 points.
    """

    def __init__(self, schedule: NoiseSchedule, num_inference_steps: int = 20,
                 timestep_spacing: str = "linspace", prediction_type: str = "epsilon"):
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        T, n = schedule.num_train_timesteps, num_inference_steps
        if isinstance(n, bool) or int(n) != n or not 1 <= n < T:
            raise MinisdError(f"num_inference_steps {n!r} is not allowed; use an integer from 1 to {T - 1}")
        self.schedule, self.prediction_type, self.timestep_spacing = schedule, prediction_type, timestep_spacing
        n = int(n)
        if timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
        elif timestep_spacing == "leading":
            ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1]
        else:
            ts = np.arange(T, 0, -T / n).round() - 1
        self.timesteps = torch.from_numpy(ts.astype(np.int64).copy())
        self.num_inference_steps = len(self.timesteps)
        ac = schedule.alphas_cumprod
        all_sigmas = ((1 - ac) / ac).sqrt().numpy()
        sigmas = np.interp(self.timesteps.numpy(), np.arange(T), all_sigmas)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # σ = 0 at the end
        self._i, self._prev_x0 = 0, None

    def begin(self, index: int = 0) -> None:
        """Start afresh at `timesteps[index]` (image-to-image starts part-way), with no history."""
        self._i, self._prev_x0 = index, None

    def _alpha_sigma(self, i: int):
        sigma = self.sigmas[i]
        alpha = 1 / (sigma**2 + 1).sqrt()
        return alpha, sigma * alpha  # α_t and σ'_t

    def step(self, model_output: torch.Tensor, t: int, x_t: torch.Tensor,
             generator: torch.Generator | None = None) -> SamplerOutput:
        if t == int(self.timesteps[0]):
            self._i, self._prev_x0 = 0, None
        i = self._i
        if i >= len(self.timesteps) or int(self.timesteps[i]) != t:
            raise MinisdError(f"DPM-Solver visits its timesteps in order; expected "
                              f"{int(self.timesteps[min(i, len(self.timesteps) - 1)])}, got {t}")
        alpha_s, sigma_s = self._alpha_sigma(i)
        if self.prediction_type == "epsilon":
            pred_x0 = (x_t - sigma_s * model_output) / alpha_s
        elif self.prediction_type == "v_prediction":
            pred_x0 = alpha_s * x_t - sigma_s * model_output
        else:
            pred_x0 = model_output
        alpha_t, sigma_t = self._alpha_sigma(i + 1)
        lambda_s, lambda_t = alpha_s.log() - sigma_s.log(), alpha_t.log() - sigma_t.log()
        h = lambda_t - lambda_s
        prev = (sigma_t / sigma_s) * x_t - (alpha_t * (torch.exp(-h) - 1.0)) * pred_x0  # first order
        last = i == len(self.timesteps) - 1
        if self._prev_x0 is not None and not last:  # second order from the last two x0 predictions
            alpha_p, sigma_p = self._alpha_sigma(i - 1)
            r = (lambda_s - (alpha_p.log() - sigma_p.log())) / h  # h_prev / h
            d1 = (1.0 / r) * (pred_x0 - self._prev_x0)
            prev = prev - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
        self._i, self._prev_x0 = i + 1, pred_x0
        return SamplerOutput(prev, pred_x0)


SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler, "dpmsolver++": DPMSolverSampler}


def make_sampler(name: str, schedule: NoiseSchedule, **kwargs) -> _Sampler:
    """A sampler by name: 'ddpm', 'ddim' or 'dpmsolver++' (DPM-Solver++(2M))."""
    check_choice("sampler", name, SAMPLERS)
    return SAMPLERS[name](schedule, **kwargs)


@torch.no_grad()
def sample(model: Callable, sampler: _Sampler, shape: tuple[int, ...], *,
           generator: torch.Generator | None = None, device: str | torch.device = "cpu",
           x_T: torch.Tensor | None = None, callback: Callable[[dict], None] | None = None,
           progress: bool = True) -> torch.Tensor:
    """Run the reverse process from pure noise to a sample.

    model(x_t, t) → output of the sampler's prediction type, with t a LongTensor (B,).
    callback({'x': x_t, 'i': step index, 't': timestep, 'denoised': pred_x0}) after each step,
    as in k-diffusion, so figures and widgets can watch every step.
    Returns x_0, shaped like `shape`.
    """
    x = torch.randn(shape, generator=generator) if x_T is None else x_T.clone()
    x = x.to(device)
    for i, t in enumerate(tqdm(sampler.timesteps.tolist(), desc="sampling", disable=not progress,
                               leave=False)):
        tt = torch.full((shape[0],), t, dtype=torch.long, device=device)
        out = sampler.step(model(x, tt), t, x, generator=generator)
        x = out.prev_sample
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": out.pred_original_sample})
    return x
