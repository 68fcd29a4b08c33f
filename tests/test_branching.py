"""Continuing a run from the middle (`minisd.trajectory.continue_from`, chapter 8.3's branching
test): against the recorded run it continues, against a whole pipeline run, and DDPM against
DDIM with η = 1, which the DDIM paper shows to be the same process."""

import pytest
import torch

from minisd import MinisdError, StableDiffusion
from minisd.trajectory import continue_from, record_trajectory

PROMPT = "a small green square in the top left"
N = 8


@pytest.fixture(scope="module")
def sd():
    return StableDiffusion.from_pretrained("shapes-cpu")


@pytest.fixture(scope="module")
def traj(sd):
    return record_trajectory(sd, PROMPT, seed=5, num_inference_steps=N, guidance_scale=4.0, sampler="ddim",
                             attention=False)


@pytest.mark.parametrize("k", [0, 3, N - 1])
def test_deterministic_continuation_reproduces_the_recorded_run(sd, traj, k):
    out = continue_from(sd, traj.latents[k:k + 1], k, PROMPT, num_inference_steps=N, guidance_scale=4.0,
                        sampler="ddim", seed=123)  # η = 0 draws no noise: the seed must not matter
    torch.testing.assert_close(out.latents.cpu(), traj.latents[N:], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.images.cpu(), traj.images[N:], atol=1e-4, rtol=0)
    # starting one step off the schedule (z_{t_k} treated as z_{t_{k+1}}) ends elsewhere: the test can fail
    off = continue_from(sd, traj.latents[k:k + 1], k + 1, PROMPT, num_inference_steps=N, guidance_scale=4.0,
                        sampler="ddim")
    assert (off.latents.cpu() - traj.latents[N:]).abs().max() > 1e-2


def test_step_n_is_the_end_and_step_0_is_a_whole_run(sd, traj):
    end = continue_from(sd, traj.latents[N:], N, PROMPT, num_inference_steps=N, sampler="ddpm", seed=1)
    assert torch.equal(end.latents.cpu(), traj.latents[N:])
    z_T = torch.randn((2, *sd.latent_shape), generator=torch.Generator().manual_seed(9))
    whole = sd(PROMPT, num_images=2, latents=z_T, num_inference_steps=N, guidance_scale=4.0, sampler="ddpm", seed=4)
    ours = continue_from(sd, z_T, 0, PROMPT, num_inference_steps=N, guidance_scale=4.0, sampler="ddpm", seed=4)
    torch.testing.assert_close(ours.latents, whole.latents, atol=1e-6, rtol=0)


def test_fresh_noise_branches_the_run(sd, traj):
    k = 2
    z = traj.latents[k:k + 1].repeat(4, 1, 1, 1)  # one state, four times
    kw = dict(num_inference_steps=N, guidance_scale=4.0, sampler="ddim", eta=1.0)
    a = continue_from(sd, z, k, PROMPT, seed=1, **kw).latents
    again = continue_from(sd, z, k, PROMPT, seed=1, **kw).latents
    b = continue_from(sd, z, k, PROMPT, seed=2, **kw).latents
    assert torch.equal(a, again)  # seeded: the same call, the same branches
    assert (a - b).abs().amax((1, 2, 3)).min() > 1e-2  # another seed: every branch elsewhere
    assert (a[1:] - a[:1]).abs().amax((1, 2, 3)).min() > 1e-2  # the rows of one call: independent branches
    # DDPM's posterior step equals DDIM's at η = 1 (Song et al. 2021 §4.1), noise draw for noise draw
    ddpm = continue_from(sd, z, k, PROMPT, num_inference_steps=N, guidance_scale=4.0, sampler="ddpm", seed=1)
    torch.testing.assert_close(ddpm.latents, a, atol=1e-4, rtol=0)


def test_bad_arguments_are_named(sd, traj):
    z = traj.latents[:1]
    with pytest.raises(MinisdError, match=r"step 9 is not allowed; use an integer from 0 to 8"):
        continue_from(sd, z, 9, PROMPT, num_inference_steps=N)
    with pytest.raises(MinisdError, match=r"sampler"):
        continue_from(sd, z, 0, PROMPT, num_inference_steps=N, sampler="dpmsolver++")
    with pytest.raises(MinisdError, match=r"eta 1.0 is for sampler='ddim'"):
        continue_from(sd, z, 0, PROMPT, num_inference_steps=N, sampler="ddpm", eta=1.0)
    with pytest.raises(MinisdError, match=r"2 prompts for 1 latents"):
        continue_from(sd, z, 0, [PROMPT, ""], num_inference_steps=N)
    with pytest.raises(MinisdError, match=r"latents \(4, 8, 8\) given"):
        continue_from(sd, z[0], 0, PROMPT, num_inference_steps=N)
