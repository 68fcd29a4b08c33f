"""The assembled Stable Diffusion: sampling, guidance, determinism, saving and loading, bad input,
and training that resumes exactly after being killed."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file

from minisd import MinisdError
from minisd.cli import main
from minisd.pipeline import StableDiffusion
from minisd.samplers import DDIMSampler

PROMPT = "a large red circle in the center"


@pytest.fixture(scope="module")
def sd(tiny_run):
    return StableDiffusion.from_pretrained(tiny_run)


def test_same_seed_gives_bit_identical_images_and_another_seed_does_not(sd):
    for sampler in ("ddim", "ddpm", "dpmsolver++"):
        a = sd(PROMPT, num_images=2, num_inference_steps=5, sampler=sampler, seed=7)
        b = sd(PROMPT, num_images=2, num_inference_steps=5, sampler=sampler, seed=7)
        c = sd(PROMPT, num_images=2, num_inference_steps=5, sampler=sampler, seed=8)
        assert torch.equal(a.images, b.images) and torch.equal(a.latents, b.latents), sampler
        assert not torch.equal(a.images, c.images), sampler
        assert a.images.shape == (2, 3, 32, 32) and a.images.min() >= 0 and a.images.max() <= 1
        assert not torch.equal(a.images[0], a.images[1])  # two different noises


def test_samplers_differ_and_images_are_grouped_per_prompt(sd):
    outs = {s: sd(PROMPT, num_inference_steps=5, sampler=s, seed=0).latents for s in ("ddim", "ddpm", "dpmsolver++")}
    assert not torch.equal(outs["ddim"], outs["ddpm"]) and not torch.equal(outs["ddim"], outs["dpmsolver++"])
    res = sd(["a red circle", "a blue square"], num_images=3, num_inference_steps=2, seed=0)
    assert res.prompts == ["a red circle"] * 3 + ["a blue square"] * 3 and len(res.images) == 6


def test_guidance_is_uncond_plus_w_times_the_difference(sd):
    z = torch.randn(3, *sd.latent_shape, generator=torch.Generator().manual_seed(0))
    ctx, mask = sd.encode_prompt(["a red circle", "a small blue square", PROMPT])
    unc, umask = sd.encode_prompt([""] * 3)
    t = torch.full((3,), 500)
    with torch.no_grad():
        cond, uncond = sd.unet(z, t, ctx, mask), sd.unet(z, t, unc, umask)
    for w in (0.0, 1.0, 2.5, 8.0):
        guided = sd.predict_noise(z, 500, ctx, mask, unc, umask, w)
        torch.testing.assert_close(guided, uncond + w * (cond - uncond), rtol=1e-4, atol=1e-5)
    assert torch.equal(sd.predict_noise(z, 500, ctx, mask, unc, umask, 1.0), cond)


def test_a_hand_written_guided_ddim_loop_matches_the_pipeline_and_the_callback_sees_every_step(sd):
    seen = []
    res = sd(PROMPT, num_inference_steps=6, guidance_scale=3.0, sampler="ddim", seed=4, callback=seen.append)
    z = torch.randn(1, *sd.latent_shape, generator=torch.Generator().manual_seed(4))
    sampler = DDIMSampler(sd.schedule, 6)
    ctx, mask = sd.encode_prompt(PROMPT)
    unc, umask = sd.encode_prompt("")
    for i, t in enumerate(sampler.timesteps.tolist()):
        with torch.no_grad():
            tt = torch.full((1,), t)
            cond, uncond = sd.unet(z, tt, ctx, mask), sd.unet(z, tt, unc, umask)
        eps = uncond + 3.0 * (cond - uncond)
        out = sampler.step(eps, t, z)
        assert seen[i].step == i and seen[i].t == t
        torch.testing.assert_close(seen[i].latents, z)
        torch.testing.assert_close(seen[i].pred_original, out.pred_original_sample, rtol=1e-4, atol=1e-5)
        z = out.prev_sample
    assert len(seen) == 6 and torch.equal(seen[-1].next_latents, res.latents)
    torch.testing.assert_close(res.latents, z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.images, sd.decode(z), rtol=1e-4, atol=1e-5)


def test_img2img_keeps_the_image_at_low_strength_and_starts_part_way(sd):
    from minisd.data import Shapes

    image = Shapes("test", 1, seed=0).images[0].float() / 255
    seen = []
    low = sd.img2img(image, PROMPT, strength=0.02, num_inference_steps=50, seed=0, callback=seen.append)
    assert len(seen) == 1  # round(0.02 · 50) = 1 step: only the last one
    recon = sd.decode(sd.vae.encode_latents(image[None] * 2 - 1, sample=False))
    assert (low.images - recon).abs().mean() < 0.05
    for sampler in ("ddim", "dpmsolver++"):
        seen = []
        sd.img2img(image, [PROMPT, "a blue square"], strength=0.5, num_inference_steps=10, sampler=sampler,
                   callback=seen.append)
        assert [s.step for s in seen] == list(range(5, 10))
    with pytest.raises(MinisdError, match="strength"):
        sd.img2img(image, PROMPT, strength=1.5)
    with pytest.raises(MinisdError, match="image of shape"):
        sd.img2img(torch.zeros(3, 16, 16), PROMPT)


def test_inpaint_keeps_what_the_mask_keeps_and_repaints_the_rest(sd):
    from minisd.data import Shapes

    images = Shapes("test", 2, seed=0).images
    z0 = sd.encode(images)
    S = sd.image_size
    # nothing to repaint: the latents come back as the image's own, exactly
    kept = sd.inpaint(images, torch.zeros(S, S, dtype=torch.bool), PROMPT, num_inference_steps=5)
    assert torch.equal(kept.latents, z0)
    # everything repainted: the text-to-image sample of the same seed, exactly
    full = sd.inpaint(images[0], torch.ones(S, S), PROMPT, num_inference_steps=5, seed=3)
    assert torch.equal(full.latents, sd(PROMPT, num_inference_steps=5, seed=3).latents)
    # the right half repainted, for two prompts: the left half's latents are the image's, the right half's not
    mask = torch.zeros(S, S)
    mask[:, S // 2:] = 1
    seen = []
    half = sd.inpaint(images, mask, [PROMPT, "a blue square"], num_inference_steps=5, callback=seen.append,
                      negative_prompt="a green triangle")
    w = z0.shape[-1]
    assert len(seen) == 5 and half.latents.shape == (4, *z0.shape[1:])
    assert torch.equal(half.latents[..., : w // 2], z0.repeat(2, 1, 1, 1)[..., : w // 2])
    assert (half.latents[..., w // 2:] - z0.repeat(2, 1, 1, 1)[..., w // 2:]).abs().mean() > 0.1
    # one pixel of the mask repaints the whole latent pixel that covers it
    one = torch.zeros(S, S)
    one[0, 0] = 1
    corner = sd.inpaint(images[0], one, PROMPT, num_inference_steps=5)
    changed = (corner.latents != sd.encode(images[:1])).any(1)[0]  # the same batch of one, to the bit
    assert changed[0, 0] and changed.sum() == 1
    with pytest.raises(MinisdError, match="mask of shape"):
        sd.inpaint(images, torch.ones(S // 2, S // 2), PROMPT)
    with pytest.raises(MinisdError, match="0 \\(keep\\) or 1"):
        sd.inpaint(images, torch.full((S, S), 0.5), PROMPT)
    with pytest.raises(MinisdError, match="mask must be a tensor"):
        sd.inpaint(images, [[1]], PROMPT)


@pytest.mark.parametrize("kwargs,match", [
    ({"guidance_scale": -1.0}, "guidance scale -1.0"),
    ({"guidance_scale": math.nan}, "guidance scale nan"),
    ({"guidance_scale": math.inf}, "guidance scale inf"),
    ({"num_inference_steps": 0}, "num_inference_steps 0"),
    ({"num_inference_steps": -3}, "num_inference_steps -3"),
    ({"num_inference_steps": 1001}, "num_inference_steps 1001 .*from 1 to 1000"),
    ({"num_inference_steps": 1000, "sampler": "dpmsolver++"}, "num_inference_steps 1000 .*from 1 to 999"),
    ({"num_images": 0}, "num_images 0"),
    ({"num_images": -2}, "num_images -2"),
    ({"sampler": "euler"}, "unknown sampler 'euler'; allowed: 'ddpm', 'ddim', 'dpmsolver\\+\\+'"),
])
def test_bad_sampling_arguments_are_clear_errors(sd, kwargs, match):
    with pytest.raises(MinisdError, match=match):
        sd(PROMPT, **kwargs)


@pytest.mark.parametrize("prompts", [123, None, [PROMPT, 5], []])
def test_a_prompt_that_is_not_a_string_is_a_clear_error(sd, prompts):
    with pytest.raises(MinisdError, match="prompt"):
        sd(prompts)


def test_a_prompt_longer_than_the_context_is_cut_with_a_warning(sd):
    long = " ".join(["a large red circle"] * 10)
    with pytest.warns(UserWarning, match="cut to"):
        res = sd(long, num_inference_steps=2)
    assert res.images.shape == (1, 3, 32, 32)


def test_save_and_load_give_the_same_images(sd, tmp_path):
    sd.save_pretrained(tmp_path / "copy")
    again = StableDiffusion.from_pretrained(tmp_path / "copy")
    a = sd(PROMPT, num_images=2, num_inference_steps=4, seed=1)
    b = again(PROMPT, num_images=2, num_inference_steps=4, seed=1)
    assert torch.equal(a.images, b.images)
    assert not list((tmp_path / "copy").rglob(".*"))  # no temporary files left behind


def test_pipeline_options_are_saved_and_old_configs_load_with_the_defaults(sd, tmp_path):
    options = dict(mask_padding=False, steps_offset=1, set_alpha_to_one=False)
    changed = StableDiffusion(sd.vae, sd.text_encoder, sd.tokenizer, sd.unet, sd.schedule, sd.image_size, **options)
    changed.save_pretrained(tmp_path / "changed")
    again = StableDiffusion.from_pretrained(tmp_path / "changed")
    assert {k: getattr(again, k) for k in options} == options and again.prediction_type == "epsilon"
    a = changed(PROMPT, num_inference_steps=4, seed=1)
    assert torch.equal(again(PROMPT, num_inference_steps=4, seed=1).images, a.images)
    assert not torch.equal(sd(PROMPT, num_inference_steps=4, seed=1).images, a.images)
    # a config.json written before these options existed
    config_file = tmp_path / "changed" / "config.json"
    config = json.loads(config_file.read_text())
    for key in ("mask_padding", "steps_offset", "set_alpha_to_one", "prediction_type"):
        del config["pipeline"][key]
    config_file.write_text(json.dumps(config))
    old = StableDiffusion.from_pretrained(tmp_path / "changed")
    assert (old.mask_padding, old.steps_offset, old.set_alpha_to_one, old.prediction_type) == (True, 0, True, "epsilon")
    assert torch.equal(old(PROMPT, num_inference_steps=4, seed=1).images,
                       sd(PROMPT, num_inference_steps=4, seed=1).images)


def test_a_negative_prompt_replaces_the_empty_prompt(sd):
    default = sd(PROMPT, num_images=2, num_inference_steps=3, seed=0).images
    assert torch.equal(sd(PROMPT, num_images=2, num_inference_steps=3, seed=0, negative_prompt="").images, default)
    negative = sd(PROMPT, num_images=2, num_inference_steps=3, seed=0, negative_prompt="a blue square").images
    assert not torch.equal(negative, default)
    with pytest.raises(MinisdError, match="2 negative prompts for 1 prompts"):
        sd(PROMPT, negative_prompt=["", ""])


def test_loading_a_missing_incomplete_corrupt_or_mismatched_run_is_a_clear_error(tiny_run, tmp_path):
    from minisd.unet import UNet

    with pytest.raises(MinisdError, match="not found"):
        StableDiffusion.from_pretrained(tmp_path / "nothing")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "unet")
    with pytest.raises(MinisdError, match="incomplete .*no unet.*--resume"):
        StableDiffusion.from_pretrained(run)
    shutil.copytree(tiny_run / "unet", run / "unet")
    weights = run / "unet" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])  # truncated
    with pytest.raises(MinisdError, match="could not be read"):
        StableDiffusion.from_pretrained(run)
    # a U-Net whose cross attention expects a wider text than this text encoder gives
    config = json.loads((tiny_run / "unet" / "config.json").read_text())
    import dataclasses

    from minisd.unet import UNetConfig

    UNet(UNetConfig(**{**config, "context_dim": 48})).save_pretrained(run / "unet")
    with pytest.raises(MinisdError, match="context width 48"):
        StableDiffusion.from_pretrained(run)
    UNet(dataclasses.replace(UNetConfig(**config), in_channels=3, out_channels=3)).save_pretrained(run / "unet")
    with pytest.raises(MinisdError, match="takes 3 channels"):
        StableDiffusion.from_pretrained(run)


# --- the command ---------------------------------------------------------------------------

def test_sample_writes_a_captioned_grid(tiny_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--run", str(tiny_run), "--prompt", PROMPT, "--prompt", "a small blue square",
                 "-n", "2", "--steps", "3", "--sampler", "dpmsolver++", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 3000
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    (["--sampler", "euler"], "error: unknown sampler 'euler'"),
    (["--guidance", "-1"], "error: guidance scale -1.0 is not allowed"),
    (["--guidance", "nan"], "error: guidance scale nan is not allowed"),
    (["--guidance", "inf"], "error: guidance scale inf is not allowed"),
    (["--steps", "0"], "error: num_inference_steps 0 is not allowed"),
    (["--steps", "-5"], "error: num_inference_steps -5 is not allowed"),
    (["--steps", "5000"], "error: num_inference_steps 5000 is not allowed"),
    (["-n", "0"], "error: -n 0 is not allowed"),
    (["-n", "-1"], "error: -n -1 is not allowed"),
    (["--seed", "-1"], "error: seed -1 is not allowed"),
    (["--seed", str(2**64)], f"error: seed {2**64} is not allowed"),
    (["--out", "OUT/missing/grid.png"], "error: folder"),
    (["--run", "OUT/nothing"], "error: run folder"),
])
def test_sample_rejects_bad_input(tiny_run, tmp_path, capsys, extra, message):
    args = ["sample", "--run", str(tiny_run), "--prompt", PROMPT, "--out", str(tmp_path / "grid.png")]
    for i in range(0, len(extra), 2):
        flag, value = extra[i], extra[i + 1].replace("OUT", str(tmp_path))
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_sample_to_an_unwritable_place_is_a_clear_error(tiny_run, tmp_path, capsys):
    if os.geteuid() == 0:
        target = "/proc/minisd-grid.png"  # not even root can create files there
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "grid.png")
    assert main(["sample", "--run", str(tiny_run), "--prompt", PROMPT, "--out", target]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") and err.count("\n") == 1, err


def test_resume_with_nothing_to_resume_is_a_clear_error(tiny_run, tmp_path, capsys):
    assert main(["train", "--resume", "--out", str(tmp_path / "fresh")]) == 2
    assert capsys.readouterr().err.startswith("error: no saved state in")
    assert not (tmp_path / "fresh").exists()
    run = tmp_path / "done"
    shutil.copytree(tiny_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", "--resume", "--out", str(run)]) == 2
    assert "is complete" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--stages", "vae", "--out", str(run)]) == 2
    assert "would leave the trained unet" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--stages", "unet", "--out", str(tmp_path / "new")]) == 2
    assert "needs a trained clip and vae" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_a_run_killed_mid_stage_resumes_to_the_same_weights(tiny_run, tmp_path):
    """SIGKILL during the U-Net stage, then --resume: every component equals the uninterrupted
    run's, bit for bit (CPU, same seed), and the files already there stayed loadable throughout."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "minisd", "train", "--preset", "tiny", "--out", str(out),
                             "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state = out / "train_state" / "unet.safetensors"
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists(), "the run ended before the U-Net stage saved a state"
    config = json.loads((out / "config.json").read_text())
    assert set(config["stages"]) == {"vae", "clip"}  # killed in the middle of the U-Net stage
    for part in ("vae", "text_encoder", "clip"):  # finished components are intact and equal
        a, b = _weights(tiny_run / part), _weights(out / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    r = subprocess.run([sys.executable, "-m", "minisd", "train", "--resume", "--out", str(out), "--device", "cpu"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "unet: resuming from" in r.stdout
    a, b = _weights(tiny_run / "unet"), _weights(out / "unet")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["unet"]["resumed_from"] > 0
    assert not (out / "train_state").exists()  # removed once the stage finished


# --- resume and EMA in the training loop itself ------------------------------------------------

def _toy(seed=0):
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))


def _toy_loss(model, batch, generator):
    x, y = batch
    noise = 0.1 * torch.randn(x.shape, generator=generator)
    return ((model(x + noise) - y) ** 2).mean()


class _Stop(Exception):
    pass


def test_train_interrupted_and_resumed_from_its_state_file_ends_where_an_uninterrupted_run_does(tmp_path):
    from minisd.train import TrainConfig, train

    x = torch.randn(256, 3, generator=torch.Generator().manual_seed(1))
    data = (x, x.sum(1, keepdim=True).sin())
    config = TrainConfig(steps=30, batch_size=16, lr=1e-2, warmup_steps=5, ema_decay=0.9, save_every=4,
                         progress=False, device="cpu")
    whole = _toy()
    full = train(whole, _toy_loss, data, config)

    state = tmp_path / "state.safetensors"
    part = _toy()

    def stop_at_step_13(step, loss):
        if step == 13:
            raise _Stop
    with pytest.raises(_Stop):
        train(part, _toy_loss, data, config, hook=stop_at_step_13, state_file=state)
    resumed_model = _toy(seed=99)  # other initial weights: all of it must come from the state
    resumed = train(resumed_model, _toy_loss, data, config, state_file=state)
    assert resumed.resumed_from == 12  # the last state saved before the stop
    for a, b in zip(whole.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.losses == full.losses
    with pytest.raises(MinisdError, match="other settings \\(lr\\)"):
        import dataclasses

        train(_toy(), _toy_loss, data, dataclasses.replace(config, lr=0.5), state_file=state)


def test_a_failed_state_write_leaves_the_previous_state_loadable(tmp_path, monkeypatch):
    import safetensors.torch

    from minisd.checkpoint import load_train_state, save_train_state
    from minisd.train import EMA, TrainConfig

    model = _toy()
    opt = torch.optim.AdamW(model.parameters())
    g = torch.Generator().manual_seed(0)
    config = dataclasses_asdict(TrainConfig())
    path = tmp_path / "state.safetensors"
    save_train_state(path, 5, [1.0, 0.5], 2.0, model, opt, EMA(model, 0.9), g, config)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_train_state(path, 9, [1.0], 3.0, model, opt, None, g, config)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]
    assert load_train_state(path, _toy(), torch.optim.AdamW(_toy().parameters()), None, g, config)[0] == 5


def dataclasses_asdict(x):
    import dataclasses

    return dataclasses.asdict(x)


def test_ema_follows_its_formula():
    from torch import nn

    from minisd.train import EMA

    model = nn.Linear(2, 1)
    ema = EMA(model, decay=0.9)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(20):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update(model, step)
        d = min(0.9, (1 + step) / (10 + step))
        expected = {k: d * expected[k] + (1 - d) * v for k, v in model.state_dict().items()}
    for k, v in ema.model.state_dict().items():
        torch.testing.assert_close(v, expected[k])
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_unet_training_loss_is_the_epsilon_objective_on_the_frozen_text_tower(sd):
    """The stage's loss equals one built by hand: captions, 10% emptied, context, ε-MSE."""
    from minisd.data import describe, sample_labels
    from minisd.diffusion import diffusion_loss
    from minisd.pipeline import UNCOND_PROBABILITY, encode_prompts, unet_loss_fn

    labels = sample_labels(64)
    z0 = torch.randn(64, *sd.latent_shape)
    loss = unet_loss_fn(sd.text_encoder, sd.tokenizer, sd.schedule)(sd.unet, (z0, labels), torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    captions, _ = describe(labels, g, paraphrase=0.5, drop=0.1)
    empty = torch.rand(64, generator=g) < UNCOND_PROBABILITY
    captions = ["" if e else c for c, e in zip(captions, empty.tolist())]
    assert 0 < empty.sum() < 20
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        context, mask = encode_prompts(sd.text_encoder, sd.tokenizer, captions)
    expected = diffusion_loss(sd.unet, sd.schedule, z0, generator=g, context=context, context_mask=mask)
    assert torch.equal(loss, expected)


def test_sample_from_a_truncated_unet_is_a_clear_error_and_damages_nothing(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    weights = run / "unet" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["sample", "--run", str(run), "--prompt", PROMPT, "--out", str(tmp_path / "grid.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unet/model.safetensors could not be read" in err and err.count("\n") == 1
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "grid.png").exists()


def test_a_stage_being_retrained_counts_as_unfinished_until_it_is_done(tiny_run, tmp_path, monkeypatch):
    """Interrupted while retraining the U-Net, a run must not claim its old U-Net is current:
    --resume has to train it (never pair, say, a new VAE with a U-Net trained on the old one)."""
    import minisd.runs
    from minisd.runs import _plan, train_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(minisd.runs, "_train_stage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_run(run, "tiny", stages=["unet"], progress=False, log=lambda *a: None)
    config = json.loads((run / "config.json").read_text())
    assert set(config["stages"]) == {"vae", "clip"}
    assert _plan(config, run, ("vae", "clip", "unet"), resume=True) == ["unet"]
