"""NoiseSchedule against diffusers' DDPMScheduler, and the forward process against its own math."""

import pytest
import torch
from diffusers import DDPMScheduler

from minisd.diffusion import (
    BETA_SCHEDULES,
    NoiseSchedule,
    diffusion_loss,
    training_target,
)
from minisd.errors import MinisdError

DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
SETTINGS = [(1000, 1e-4, 0.02), (1000, 0.00085, 0.012), (250, 1e-4, 0.03)]


def reference(schedule, T, beta_start, beta_end):
    return DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[schedule],
                         beta_start=beta_start, beta_end=beta_end, clip_sample=False)


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("T,beta_start,beta_end", SETTINGS)
def test_betas_and_alphas_cumprod_match_diffusers(schedule, T, beta_start, beta_end):
    ours = NoiseSchedule(T, schedule, beta_start, beta_end)
    ref = reference(schedule, T, beta_start, beta_end)
    assert ours.betas.dtype == torch.float32 and ours.betas.shape == (T,)
    torch.testing.assert_close(ours.betas, ref.betas, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=1e-6, rtol=0)


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
def test_add_noise_and_velocity_match_diffusers(schedule):
    ours, ref = NoiseSchedule(1000, schedule), reference(schedule, 1000, 1e-4, 0.02)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 3, 5, 7, generator=g)
    noise = torch.randn(8, 3, 5, 7, generator=g)
    t = torch.tensor([0, 1, 10, 250, 500, 900, 998, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.velocity(x0, noise, t), ref.get_velocity(x0, noise, t), atol=1e-6, rtol=0)


def test_cosine_schedule_follows_its_formula():
    # ᾱ_t of squaredcos_cap_v2 is f(t+1)/f(0) with f(u) = cos²((u/T + s)/(1 + s)·π/2), while no β is capped
    T, s = 1000, 0.008
    u = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((u + s) / (1 + s) * torch.pi / 2) ** 2
    expected = (f[1:] / f[0]).float()
    ours = NoiseSchedule(T, "cosine")
    uncapped = ours.betas < 0.999
    assert uncapped[:-5].all()
    torch.testing.assert_close(ours.alphas_cumprod[:-5], expected[:-5], atol=1e-5, rtol=0)


def test_snr_is_alpha_bar_over_one_minus_alpha_bar_and_decreases():
    s = NoiseSchedule(1000, "linear")
    snr = s.snr()
    torch.testing.assert_close(snr, s.alphas_cumprod / (1 - s.alphas_cumprod))
    assert (snr[1:] < snr[:-1]).all()
    torch.testing.assert_close(s.snr(torch.tensor([3])), snr[3:4])


def test_iterative_and_closed_form_forward_processes_agree_in_mean_and_variance():
    """Many chains of single steps q(x_t|x_{t-1}) from one x0 must have the closed form's moments:
    mean sqrt(ᾱ_t)·x0 and variance 1 − ᾱ_t. With N = 20,000 chains the standard error of the mean
    is sqrt((1−ᾱ)/N) ≤ 0.0071 and of the variance ≈ (1−ᾱ)·sqrt(2/N) ≤ 0.01; we allow 5 of each."""
    s = NoiseSchedule(1000, "linear")
    g = torch.Generator().manual_seed(1)
    N = 20_000
    x0 = torch.tensor([1.0, -0.5, 0.25])
    for t in (0, 49, 299):
        chains = s.q_sample_iterative(x0.expand(N, 3).clone(), t, generator=g)
        abar = s.alphas_cumprod[t]
        se_mean, se_var = ((1 - abar) / N).sqrt(), (1 - abar) * (2 / N) ** 0.5
        torch.testing.assert_close(chains.mean(0), abar.sqrt() * x0, atol=5 * se_mean.item(), rtol=0)
        torch.testing.assert_close(chains.var(0), (1 - abar).expand(3), atol=5 * se_var.item(), rtol=0)


def test_training_targets():
    s = NoiseSchedule(100, "cosine")
    x0, noise, t = torch.randn(4, 2), torch.randn(4, 2), torch.tensor([0, 5, 50, 99])
    assert torch.equal(training_target(s, x0, noise, t, "epsilon"), noise)
    assert torch.equal(training_target(s, x0, noise, t, "sample"), x0)
    torch.testing.assert_close(training_target(s, x0, noise, t, "v_prediction"), s.velocity(x0, noise, t))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_and_eps_inverts_each_target(prediction_type):
    s = NoiseSchedule(1000, "scaled_linear", 0.00085, 0.012)
    x0, noise = torch.randn(6, 4), torch.randn(6, 4)
    t = torch.tensor([0, 10, 100, 500, 900, 999])
    x_t = s.add_noise(x0, noise, t)
    target = training_target(s, x0, noise, t, prediction_type)
    pred_x0, pred_eps = s.predict_x0_and_eps(target, x_t, t, prediction_type)
    torch.testing.assert_close(pred_x0, x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(pred_eps, noise, atol=2e-3, rtol=1e-3)


def test_loss_is_zero_for_a_perfect_model_and_positive_otherwise():
    s = NoiseSchedule(1000, "linear")
    x0 = torch.randn(16, 2)

    class Oracle(torch.nn.Module):  # knows x0, so can compute the true noise from x_t
        def forward(self, x_t, t):
            a = s.alphas_cumprod[t].unsqueeze(1)
            return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    g = torch.Generator().manual_seed(0)
    assert diffusion_loss(Oracle(), s, x0, generator=g).item() < 1e-8
    assert diffusion_loss(lambda x, t: torch.zeros_like(x), s, x0, generator=g).item() > 0.5


def test_bad_input_names_the_value_and_what_is_allowed():
    with pytest.raises(MinisdError, match=r"'quadratic'.*'linear', 'scaled_linear', 'cosine'"):
        NoiseSchedule(1000, "quadratic")
    s = NoiseSchedule(1000)
    x = torch.zeros(2, 3)
    with pytest.raises(MinisdError, match=r"timestep 1000 is out of range; allowed: 0 … 999"):
        s.add_noise(x, x, torch.tensor([0, 1000]))
    with pytest.raises(MinisdError, match=r"timestep -1 is out of range"):
        s.velocity(x, x, torch.tensor([-1, 3]))
    with pytest.raises(MinisdError, match=r"'x0'.*'epsilon', 'v_prediction', 'sample'"):
        training_target(s, x, x, torch.tensor([1, 2]), "x0")
    with pytest.raises(MinisdError, match="beta_start"):
        NoiseSchedule(1000, "linear", beta_start=0.1, beta_end=0.01)
