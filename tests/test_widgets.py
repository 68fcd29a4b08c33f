"""The chapter-1 noising explorer, driven without a browser."""

import matplotlib
import torch

from minisd.data import Shapes, normalize
from minisd.diffusion import NoiseSchedule
from minisd.widgets import noised_images, noising_explorer

matplotlib.use("Agg")


def test_noised_images_follow_the_closed_form():
    images = Shapes("test", 3).images
    s = NoiseSchedule(1000, "cosine")
    out = noised_images(images, 0, s, seed=1)
    # at t = 0 almost nothing is added
    assert (out - images.float() / 255).abs().mean() < 0.02
    late = noised_images(images, 999, s, seed=1) * 2 - 1
    noise = torch.randn(normalize(images).shape, generator=torch.Generator().manual_seed(1))
    expected = s.add_noise(normalize(images), noise, torch.full((3,), 999)).clamp(-1, 1)
    torch.testing.assert_close(late, expected, atol=1e-5, rtol=0)


def test_slider_and_schedule_choice_update_the_images():
    box = noising_explorer(Shapes("test", 4).images)
    first = box.last_images.clone()
    box.t_slider.value = 300
    after_t = box.last_images.clone()
    assert not torch.allclose(first, after_t)
    box.schedule_choice.value = "cosine"
    assert not torch.allclose(after_t, box.last_images)  # cosine keeps more signal at t = 300
    assert box.last_images.shape == (4, 3, 32, 32)


def test_the_explorers_schedules_are_the_ones_chapter_1_defines():
    """Each name with its own β range (a bug once gave scaled_linear the linear range 1e-4 → 0.02)."""
    from minisd.diffusion import NoiseSchedule
    from minisd.pipeline import SCHEDULE

    box = noising_explorer(Shapes("test", 2).images)
    want = {"linear": NoiseSchedule(1000, "linear", beta_start=1e-4, beta_end=0.02),
            "scaled_linear": NoiseSchedule(**SCHEDULE),  # Stable Diffusion's, as the pipeline uses it
            "cosine": NoiseSchedule(1000, "cosine")}
    assert set(box.schedules) == set(want)
    for name, s in want.items():
        torch.testing.assert_close(box.schedules[name].betas, s.betas, atol=0, rtol=0)
        torch.testing.assert_close(box.schedules[name].alphas_cumprod, s.alphas_cumprod, atol=0, rtol=0)
    # what chapter 1 says of the last step: about 7 % of the signal left under scaled_linear
    assert round(box.schedules["scaled_linear"].alphas_cumprod[-1].sqrt().item(), 3) == 0.068


def test_the_chosen_t_is_marked_on_its_log_snr_curve_and_a_static_view_gets_a_picture():
    import base64
    import math

    box = noising_explorer(Shapes("test", 2).images)
    box.schedule_choice.value = "scaled_linear"
    box.t_slider.value = 640
    curve = box.last_figure.get_axes()[-1]
    marker = [line for line in curve.get_lines() if line.get_marker() == "o"]
    assert len(marker) == 1
    abar = box.schedules["scaled_linear"].alphas_cumprod[640].item()
    assert marker[0].get_xdata()[0] == 640
    assert math.isclose(marker[0].get_ydata()[0], math.log(abar / (1 - abar)), rel_tol=1e-6)
    bundle = box._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle  # a live front end still draws the widget
    png = base64.b64decode(bundle["image/png"])
    assert png.startswith(b"\x89PNG") and png == box.snapshot_png
    before = box.snapshot_png
    box.t_slider.value = 100
    assert box.snapshot_png != before  # the picture follows the slider


def test_image_table_lays_out_rows_and_columns():
    import pytest

    from minisd.errors import MinisdError
    from minisd.viz import show_image_table

    images = torch.rand(2, 3, 3, 8, 8)
    fig = show_image_table(images, ["a", "b"], ["t=0", "t=1", "t=2"], suptitle="x")
    axes = fig.get_axes()
    assert len(axes) == 6
    assert [ax.get_title() for ax in axes[:3]] == ["t=0", "t=1", "t=2"]
    assert axes[3].get_ylabel() == "b"
    # the image in row 1, column 2 is the one drawn there
    shown = axes[5].get_images()[0].get_array()
    torch.testing.assert_close(torch.from_numpy(shown.data).float(), images[1, 2].permute(1, 2, 0), atol=1e-6, rtol=0)
    with pytest.raises(MinisdError, match=r"\(R, C, ch, H, W\)"):
        show_image_table(torch.rand(3, 3, 8, 8))
