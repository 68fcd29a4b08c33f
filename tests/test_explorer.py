"""The denoising explorer (chapter 8) without a browser: the recorded trajectory against the
pipeline and closed forms, attention maps against a hand computation, and the widget driven
through its controls, asserted on the pictures it produces."""

import base64
import html
import math

import matplotlib
import numpy as np
import pytest
import torch
from einops import rearrange
from PIL import Image

from minisd import MinisdError, StableDiffusion
from minisd.trajectory import (
    cross_attention_layers,
    record_trajectory,
    render_frame,
    save_animation,
)
from minisd.widgets import denoising_explorer

matplotlib.use("Agg")
PROMPT = "a large red circle in the center"


def said(ex) -> str:
    return html.unescape(ex.message.value)


@pytest.fixture(scope="module")
def sd():
    return StableDiffusion.from_pretrained("shapes-cpu")


@pytest.fixture(scope="module")
def traj(sd):
    return record_trajectory(sd, PROMPT, seed=3, num_inference_steps=8, guidance_scale=4.0, sampler="ddim")


def test_trajectory_is_the_pipelines_run_step_by_step(sd, traj):
    ref = sd(PROMPT, num_inference_steps=8, guidance_scale=4.0, sampler="ddim", seed=3)
    # written-out attention in place of the fused kernel: equal up to float rounding
    torch.testing.assert_close(traj.images[-1:], ref.images, atol=1e-4, rtol=0)
    torch.testing.assert_close(traj.latents[0:1], torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3)))
    assert traj.latents.shape == (9, 4, 8, 8) and traj.images.shape == (9, 3, 32, 32)
    assert traj.pred_images.shape == (8, 3, 32, 32) and traj.num_frames == 9
    assert traj.timesteps == sd.make_sampler("ddim", 8).timesteps.tolist()
    # ẑ_0 = (z_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t at every step (DDIM's prediction, closed form)
    abar = sd.schedule.alphas_cumprod[traj.timesteps].view(-1, 1, 1, 1)
    expected = (traj.latents[:-1] - (1 - abar).sqrt() * traj.noise_pred) / abar.sqrt()
    torch.testing.assert_close(traj.pred_original, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(traj.pred_images, sd.decode(traj.pred_original), atol=1e-5, rtol=0)
    # sampling left the model as it was: fused attention, no stored weights
    assert all(not m.store_weights and m.last_weights is None for m in cross_attention_layers(sd.unet, 8).values())


def test_attention_maps_equal_a_hand_computation(sd, traj):
    layers = cross_attention_layers(sd.unet, 8)
    assert list(layers) == ["down 8x8", "down 4x4", "mid 4x4", "up 4x4 #1", "up 4x4 #2", "up 8x8 #1", "up 8x8 #2"]
    assert traj.tokens == ["<start>", "a", "large", "red", "circle", "in", "the", "center", "<end>"]
    name, step = "up 8x8 #2", 5
    seen = []
    m = layers[name]
    handle = m.register_forward_hook(lambda mod, args, out: seen.append(args))
    try:
        record_trajectory(sd, PROMPT, seed=3, num_inference_steps=8, guidance_scale=4.0, sampler="ddim",
                          attention=False)
    finally:
        handle.remove()
    x, context, mask = seen[step]  # the step's call: conditional image first, then unconditional
    q = rearrange(m.to_q(x[:1]), "b l (h d) -> b h l d", h=m.heads)
    k = rearrange(m.to_k(context[:1]), "b l (h d) -> b h l d", h=m.heads)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask[:1, None, None, :], -math.inf)
    by_hand = scores.softmax(-1)[0].mean(0)  # (64 pixels, 16 tokens)
    assert torch.all(by_hand[:, len(traj.tokens):] == 0)  # padding gets nothing
    expected = by_hand[:, : len(traj.tokens)].T.reshape(-1, 8, 8)
    torch.testing.assert_close(traj.attention[name][step], expected, atol=1e-5, rtol=1e-4)
    # each pixel's attention sums to 1 over the tokens, in every layer and in the mean
    for a in traj.attention.values():
        torch.testing.assert_close(a.sum(1), torch.ones(a.shape[0], *a.shape[2:]), atol=1e-5, rtol=0)
    mean = traj.attention_map(step)
    torch.testing.assert_close(mean.sum(0), torch.ones(8, 8), atol=1e-5, rtol=0)
    mid = traj.attention["mid 4x4"][step]
    torch.testing.assert_close(traj.attention_map(step, "mid 4x4")[:, 2:4, 6:8], mid[:, 1:2, 3:4].expand(-1, 2, 2))
    with pytest.raises(MinisdError, match="'up 2x2'"):
        traj.attention_map(step, "up 2x2")


def test_without_guidance_text_the_tokens_are_the_empty_prompts(sd):
    t = record_trajectory(sd, PROMPT, num_inference_steps=3, guidance_scale=0.0)
    assert t.tokens == ["<start>", "<end>"] and t.attention["mid 4x4"].shape == (3, 2, 4, 4)


def test_a_frame_shows_the_stored_images(traj):
    frame = render_frame(traj, 4)
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
    # the first big panel is z_t decoded, each pixel drawn as a 4 × 4 block, below a 40 + 16 px header
    panel = frame[56:56 + 128, 6:6 + 128].astype(float) / 255
    expected = (traj.images[4].permute(1, 2, 0).numpy().repeat(4, 0).repeat(4, 1) * 255).round() / 255
    np.testing.assert_allclose(panel, expected, atol=1 / 255)
    assert not np.array_equal(render_frame(traj, 0), render_frame(traj, 8))
    with pytest.raises(MinisdError, match="frames 0 … 8"):
        render_frame(traj, 9)


def test_slider_run_sampler_guidance_and_layer_change_the_picture(sd):
    ex = denoising_explorer(sd, PROMPT, steps=6, seed=1)
    assert len(ex.trajectories) == 1 and ex.step_slider.max == 6 and ex.step_slider.value == 6
    final = ex.frame.copy()
    np.testing.assert_array_equal(final, render_frame(ex.trajectories[0], 6))
    assert ex.image.value[:8] == b"\x89PNG\r\n\x1a\n"  # what the browser gets
    bundle = ex._repr_mimebundle_()  # a live front end draws the widget, a saved notebook the same picture
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert base64.b64decode(bundle["image/png"]) == ex.image.value == ex.snapshot_png
    ex.step_slider.value = 2
    np.testing.assert_array_equal(ex.frame, render_frame(ex.trajectories[0], 2))
    assert not np.array_equal(ex.frame, final)

    first = ex.trajectories[0]
    ex.prompt.value = "a small blue square in the top left"
    ex.run_button.click()
    blue = ex.trajectories[0]
    assert blue.prompt == "a small blue square in the top left" and ex.step_slider.value == 6
    rgb = blue.images[-1].flatten(1).mean(1)
    assert rgb[2] > rgb[0]  # it is blue now; the red circle was red
    torch.testing.assert_close(blue.latents[0], first.latents[0])  # same seed, same starting noise

    ex.sampler.value = "dpmsolver++"
    dpm = ex.trajectories[0]
    assert dpm.sampler == "dpmsolver++" and not torch.equal(dpm.images[-1], blue.images[-1])
    ex.guidance.value = 1.0
    assert ex.trajectories[0].guidance_scale == 1.0 and not torch.equal(ex.trajectories[0].images[-1], dpm.images[-1])

    before = ex.frame.copy()
    ex.layer.value = "mid 4x4"
    assert ex.frame.shape == before.shape
    np.testing.assert_array_equal(ex.frame[:184], before[:184])  # the image panels stay
    assert not np.array_equal(ex.frame[210:], before[210:])  # the attention maps change
    assert said(ex) == ""


def test_side_by_side_shares_the_starting_noise(sd):
    ex = denoising_explorer(sd, PROMPT, steps=6, compare=True, sampler_b="ddpm", steps_b=3, guidance_b=2.0)
    a, b = ex.trajectories
    assert (a.num_inference_steps, b.num_inference_steps, b.sampler, b.guidance_scale) == (6, 3, "ddpm", 2.0)
    torch.testing.assert_close(a.latents[0], b.latents[0])
    assert ex.step_slider.max == 6
    single = render_frame(a, 6)
    assert ex.frame.shape[0] > 2 * single.shape[0] - 10
    np.testing.assert_array_equal(ex.frame[: single.shape[0]], single)
    ex.step_slider.value = 4  # two thirds of the way: frame 4 of 6 above, frame 2 of 3 below
    np.testing.assert_array_equal(ex.frame[-single.shape[0]:], render_frame(b, 2))


@pytest.mark.parametrize("control, value, says", [
    ("prompt", "   ", "Type a prompt"),
    ("steps", 0, "steps 0 is not allowed"),
    ("steps", 10**9, "steps 1000000000 is not allowed"),
    ("guidance", -2.0, "guidance scale -2.0 is not allowed"),
    ("guidance", float("nan"), "guidance scale nan is not allowed"),
    ("steps_b", -5, "steps -5 is not allowed"),
    ("seed", 2**64, f"seed {2**64} is not allowed"),
])
def test_bad_input_shows_a_message_and_keeps_the_last_run(sd, control, value, says):
    ex = denoising_explorer(sd, PROMPT, steps=4, compare=control.endswith("_b"))
    shown, runs = ex.frame.copy(), ex.trajectories
    getattr(ex, control).value = value  # no exception escapes
    assert says in said(ex) and "Traceback" not in said(ex)
    assert ex.trajectories is runs
    np.testing.assert_array_equal(ex.frame, shown)
    ex.run_button.click()
    assert says in said(ex)


def test_unknown_words_run_with_a_note(sd):
    ex = denoising_explorer(sd, "a purple dog in the top left", steps=3)
    assert len(ex.trajectories) == 1 and "dog" in said(ex) and "<unk>" in said(ex)


def test_export_writes_every_frame(sd, traj, tmp_path):
    gif = save_animation(traj, tmp_path / "run.gif")
    with Image.open(gif) as im:
        assert im.n_frames == 9
        im.seek(3)
        assert im.size == render_frame(traj, 3).shape[1::-1]
    page = save_animation(traj, tmp_path / "run.html").read_text()
    assert page.count("data:image/png;base64,") == 9 and "ddim, 8 steps" in page
    with pytest.raises(MinisdError, match=r"'\.mp4'; allowed: '\.gif', '\.html'"):
        save_animation(traj, tmp_path / "run.mp4")
    with pytest.raises(MinisdError, match="does not exist"):
        save_animation(traj, tmp_path / "no" / "run.gif")

    ex = denoising_explorer(sd, PROMPT, steps=3)
    ex.export_name.value = str(tmp_path / "x.mp4")
    ex.export_button.click()
    assert "'.mp4'" in said(ex) and not (tmp_path / "x.mp4").exists()
    ex.export_name.value = str(tmp_path / "slides.gif")
    ex.export_button.click()
    assert "wrote" in said(ex) and (tmp_path / "slides.gif").stat().st_size > 0


def test_bench_command_times_the_explorer_and_writes_json(tmp_path, capsys):
    import json

    from minisd.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "explorer", "--quick", "--repeats", "1", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "press Run: 10 ddim steps, guidance 4" in table and "redraw" in table  # quick: 10 steps, not 50
    result = json.loads(out.read_text())
    rows = result["suites"]["explorer"]
    assert result["machine"]["torch_threads"] >= 1 and len(rows) == 6
    assert all(r["value"] > 0 and r["unit"] == "s" and not r["higher_is_better"] for r in rows)
    for argv, says in ((["bench", "pixels"], "unknown bench suite 'pixels'"),
                       (["bench", "--repeats", "0"], "repeats 0 is not allowed"),
                       (["bench", "--out", str(tmp_path / "no" / "b.json")], "does not exist")):
        assert main(argv) == 2
        assert says in capsys.readouterr().err


def test_object_outline_is_the_rim_of_the_bright_object():
    from minisd.trajectory import object_outline

    image = np.zeros((20, 20, 3))
    image[5:15, 4:14, 0] = 0.8  # a 10×10 red square on black
    rim = object_outline(image, width=2)
    assert rim.sum() == 10 * 10 - 6 * 6  # the square less its 6×6 core
    assert not rim[7:13, 6:12].any() and rim[5, 4:14].all() and rim[5:15, 13].all()
    assert not rim[:5].any() and not rim[:, :4].any()  # nothing outside the object
    assert not object_outline(np.full((8, 8, 3), 0.1)).any()  # nothing bright: no outline
    image[:, :, 1] = 0.5  # bright everywhere (a photograph, not a Shapes image): no object to outline
    assert not object_outline(image).any()
