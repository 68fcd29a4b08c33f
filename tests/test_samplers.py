"""DDPM and DDIM steps against diffusers' schedulers, for every option the DESIGN names."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from minisd.diffusion import NoiseSchedule
from minisd.errors import MinisdError
from minisd.samplers import (
    TIMESTEP_SPACINGS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    make_sampler,
    sample,
)

PREDICTIONS = ["epsilon", "v_prediction", "sample"]


def ddim_reference(n, spacing, prediction_type, schedule="scaled_linear"):
    name = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}[schedule]
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule=name, beta_start=0.00085, beta_end=0.012,
                        clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                        timestep_spacing=spacing, prediction_type=prediction_type)
    ref.set_timesteps(n)
    return ref


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("n", [1, 7, 10, 50, 333, 1000])
def test_timesteps_equal_diffusers(spacing, n):
    s = NoiseSchedule(1000, "linear")
    ref_ddim = ddim_reference(n, spacing, "epsilon")
    ref_ddpm = DDPMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=0)
    ref_ddpm.set_timesteps(n)
    assert torch.equal(DDIMSampler(s, n, timestep_spacing=spacing).timesteps, ref_ddim.timesteps)
    assert torch.equal(DDPMSampler(s, n, timestep_spacing=spacing).timesteps, ref_ddpm.timesteps)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_ddim_step_matches_diffusers(prediction_type, eta, spacing, schedule):
    n = 20
    ours = DDIMSampler(NoiseSchedule(1000, schedule, 0.00085, 0.012), n, eta=eta,
                       timestep_spacing=spacing, prediction_type=prediction_type)
    ref = ddim_reference(n, spacing, prediction_type, schedule)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=g)
    for t in ours.timesteps.tolist():  # every step of a whole trajectory, model output made up
        model_output = torch.randn(x.shape, generator=g)
        noise = torch.randn(x.shape, generator=g)
        a = ours.step(model_output, t, x, variance_noise=noise)
        b = ref.step(model_output, t, x, eta=eta, variance_noise=noise if eta > 0 else None)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=1e-5, rtol=1e-5)
        x = a.prev_sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [1, 10, 50])
def test_ddim_with_stable_diffusions_scheduler_config_matches_diffusers(prediction_type, n):
    """SD's scheduler_config.json: steps_offset=1 (10 steps visit 901 … 1) and set_alpha_to_one=False
    (the last step's ᾱ_prev is ᾱ_0, not 1)."""
    ours = DDIMSampler(NoiseSchedule(1000, "scaled_linear", 0.00085, 0.012), n, prediction_type=prediction_type,
                       steps_offset=1, set_alpha_to_one=False)
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    ref.set_timesteps(n)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.timesteps[-1] == 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=g)
    for t in ours.timesteps.tolist():
        model_output = torch.randn(x.shape, generator=g)
        a, b = ours.step(model_output, t, x), ref.step(model_output, t, x)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=1e-5, rtol=1e-5)
        x = a.prev_sample
    # the default (set_alpha_to_one=True) lands elsewhere on the last step
    plain = DDIMSampler(NoiseSchedule(1000, "scaled_linear", 0.00085, 0.012), n, steps_offset=1)
    assert not torch.equal(plain.step(model_output, 1, x).prev_sample, ours.step(model_output, 1, x).prev_sample)


def test_ddpm_steps_offset_shifts_the_timesteps_as_diffusers_does():
    ref = DDPMScheduler(num_train_timesteps=1000, steps_offset=1)
    ref.set_timesteps(20)
    assert torch.equal(DDPMSampler(NoiseSchedule(1000), 20, steps_offset=1).timesteps, ref.timesteps)
    with pytest.raises(MinisdError, match="steps_offset -1 is not allowed"):
        DDIMSampler(NoiseSchedule(1000), 10, steps_offset=-1)
    with pytest.raises(MinisdError, match="set_alpha_to_one must be True or False"):
        DDIMSampler(NoiseSchedule(1000), 10, set_alpha_to_one="no")


def test_ddim_eta_one_draws_noise_from_the_generator():
    s = NoiseSchedule(1000, "linear", 0.00085, 0.012)
    ours, ref = DDIMSampler(s, 10, eta=1.0), ddim_reference(10, "leading", "epsilon", "linear")
    x, out = torch.randn(3, 5), torch.randn(3, 5)
    a = ours.step(out, 500, x, generator=torch.Generator().manual_seed(7))
    b = ref.step(out, 500, x, eta=1.0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("n", [None, 50])
def test_ddpm_step_matches_diffusers_with_a_seeded_generator(variance_type, prediction_type, n):
    s = NoiseSchedule(1000, "linear")
    ours = DDPMSampler(s, n, variance_type=variance_type, prediction_type=prediction_type)
    ref = DDPMScheduler(num_train_timesteps=1000, clip_sample=False, variance_type=variance_type,
                        prediction_type=prediction_type)
    if n is not None:
        ref.set_timesteps(n)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 4, generator=g)
    for t in ours.timesteps.tolist()[::7] + [0]:
        model_output = torch.randn(x.shape, generator=g)
        a = ours.step(model_output, t, x, generator=torch.Generator().manual_seed(t))
        b = ref.step(model_output, t, x, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=1e-5, rtol=1e-5)


def test_perfect_model_recovers_the_data_point():
    """With the true noise as model output, deterministic DDIM lands exactly on x0."""
    s = NoiseSchedule(1000, "cosine")
    x0 = torch.tensor([[0.5, -1.0, 0.25]])
    for spacing in TIMESTEP_SPACINGS:
        sampler = DDIMSampler(s, 25, timestep_spacing=spacing)

        def oracle(x_t, t):
            a = s.alphas_cumprod[t].unsqueeze(1)
            return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

        out = sample(oracle, sampler, (1, 3), generator=torch.Generator().manual_seed(0), progress=False)
        torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_sampling_loop_reports_every_step():
    s = NoiseSchedule(1000)
    sampler = make_sampler("ddim", s, num_inference_steps=10)
    seen = []
    out = sample(lambda x, t: torch.zeros_like(x), sampler, (4, 2),
                 generator=torch.Generator().manual_seed(0), progress=False,
                 callback=lambda d: seen.append((d["i"], d["t"], d["x"].shape, d["denoised"].shape)))
    assert [i for i, *_ in seen] == list(range(10))
    assert [t for _, t, *_ in seen] == sampler.timesteps.tolist()
    assert all(xs == (4, 2) and ds == (4, 2) for *_, xs, ds in seen)
    assert out.shape == (4, 2)
    # the loop is reproducible from its seed
    again = sample(lambda x, t: torch.zeros_like(x), sampler, (4, 2),
                   generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(out, again)


def test_bad_input_names_the_value_and_what_is_allowed():
    s = NoiseSchedule(1000)
    with pytest.raises(MinisdError, match=r"num_inference_steps 0 .* from 1 to 1000"):
        DDIMSampler(s, 0)
    with pytest.raises(MinisdError, match=r"num_inference_steps 1001 .* from 1 to 1000"):
        DDPMSampler(s, 1001)
    with pytest.raises(MinisdError, match=r"'middle'.*'leading', 'trailing', 'linspace'"):
        DDIMSampler(s, 10, timestep_spacing="middle")
    with pytest.raises(MinisdError, match=r"'noise'.*'epsilon', 'v_prediction', 'sample'"):
        DDIMSampler(s, 10, prediction_type="noise")
    with pytest.raises(MinisdError, match=r"'learned'.*'fixed_small', 'fixed_large'"):
        DDPMSampler(s, variance_type="learned")
    with pytest.raises(MinisdError, match=r"eta 1.5"):
        DDIMSampler(s, 10, eta=1.5)
    with pytest.raises(MinisdError, match=r"'euler'.*'ddpm', 'ddim'"):
        make_sampler("euler", s)
    with pytest.raises(MinisdError, match=r"timestep 1000 is out of range"):
        DDIMSampler(s, 10).step(torch.zeros(1, 2), 1000, torch.zeros(1, 2))


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("n", [1, 2, 7, 20])
def test_dpm_solver_matches_diffusers(prediction_type, spacing, schedule, n):
    name = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}[schedule]
    ref = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule=name, beta_start=0.00085,
                                      beta_end=0.012, timestep_spacing=spacing, prediction_type=prediction_type)
    ref.set_timesteps(n)
    ours = DPMSolverSampler(NoiseSchedule(1000, schedule, 0.00085, 0.012), n, spacing, prediction_type)
    assert torch.equal(ours.timesteps, ref.timesteps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    weight = torch.randn(3, 3, generator=g) * 0.3
    y = x.clone()
    for t in ours.timesteps.tolist():  # a fixed linear "model" that depends on t
        x = ref.step(torch.einsum("ij,bjhw->bihw", weight, x) * (1 + t / 1000), t, x).prev_sample
        y = ours.step(torch.einsum("ij,bjhw->bihw", weight, y) * (1 + t / 1000), t, y).prev_sample
    assert ((x - y).abs().max() / x.abs().max()).item() < 1e-4


def test_dpm_solver_is_closer_to_the_exact_ode_solution_than_ddim():
    """For data x0 ~ N(0, s² I) the ideal noise predictor is known in closed form,
    ε*(x_t) = sqrt(1 − ᾱ) x_t / (ᾱ s² + 1 − ᾱ), and the probability-flow ODE carries x_T along
    x_t = x_T · sqrt(ᾱ_t s² + 1 − ᾱ_t) / sqrt(ᾱ_T s² + 1 − ᾱ_T). Both samplers visit the same
    timesteps; at the last one before the final jump to t = 0 (a first-order step in both), the
    second-order solver must be much closer to the exact solution than DDIM."""
    schedule, s2 = NoiseSchedule(1000, "scaled_linear", 0.00085, 0.012), 0.25

    def ideal_eps(x_t, t):
        a = schedule.alphas_cumprod[t].view(-1, 1)
        return (1 - a).sqrt() * x_t / (a * s2 + 1 - a)

    def std(t):
        a = schedule.alphas_cumprod[t]
        return (a * s2 + 1 - a).sqrt()

    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    errors = {}
    for name, sampler in [("ddim", DDIMSampler(schedule, 10, timestep_spacing="trailing")),
                          ("dpm", DPMSolverSampler(schedule, 10, timestep_spacing="trailing"))]:
        ts = sampler.timesteps.tolist()
        seen = []
        sample(ideal_eps, sampler, x_T.shape, x_T=x_T, progress=False, callback=lambda d, seen=seen: seen.append(d["x"]))
        exact = x_T * std(ts[-1]) / std(ts[0])
        errors[name] = (seen[len(ts) - 2] - exact).abs().mean().item() / exact.abs().mean().item()
    assert errors["dpm"] < 0.25 * errors["ddim"], errors
    assert errors["dpm"] < 0.01, errors


def test_dpm_solver_restarts_at_its_first_timestep_and_refuses_out_of_order_steps():
    schedule = NoiseSchedule(1000, "linear")
    sampler = DPMSolverSampler(schedule, 5)
    x_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))

    def model(x, t):
        return 0.5 * x

    first = sample(model, sampler, x_T.shape, x_T=x_T, progress=False)
    assert torch.equal(sample(model, sampler, x_T.shape, x_T=x_T, progress=False), first)  # same again
    sampler.step(model(x_T, None), int(sampler.timesteps[0]), x_T)
    with pytest.raises(MinisdError, match="in order"):
        sampler.step(model(x_T, None), int(sampler.timesteps[2]), x_T)
    assert isinstance(make_sampler("dpmsolver++", schedule, num_inference_steps=10), DPMSolverSampler)
