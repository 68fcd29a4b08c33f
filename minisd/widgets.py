"""Interactive explorers (ipywidgets). The logic lives in plain functions that return arrays or
figures, so it is tested without a browser; the widgets only wire sliders to them."""

from __future__ import annotations

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch

from minisd.data import denormalize, normalize
from minisd.diffusion import BETA_SCHEDULES, NoiseSchedule
from minisd.viz import to_numpy_images


def noised_images(images: torch.Tensor, t: int, schedule: NoiseSchedule, seed: int = 0) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) for a batch of uint8 images (N, 3, H, W), returned in [0, 1] for display.

    The same seed gives the same ε at every t, so moving a slider shows one noise pattern
    growing rather than a new random pattern each time.
    """
    x0 = normalize(images)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    x_t = schedule.add_noise(x0, noise, torch.full((len(x0),), int(t), dtype=torch.long))
    return denormalize(x_t)


def noising_explorer(images: torch.Tensor, num_train_timesteps: int = 1000, seed: int = 0):
    """A slider over t and a schedule choice; shows x_t for each image and the signal/noise mix.

    Returns the widget box; its `.t_slider`, `.schedule_choice` and `.update()` let a test drive it.
    """
    schedules = {name: NoiseSchedule(num_train_timesteps, name) for name in BETA_SCHEDULES}
    t_slider = widgets.IntSlider(value=0, min=0, max=num_train_timesteps - 1, step=1,
                                 description="t", continuous_update=False,
                                 layout=widgets.Layout(width="520px"))
    schedule_choice = widgets.Dropdown(options=list(BETA_SCHEDULES), value="linear",
                                       description="schedule")
    out = widgets.Output()
    box = widgets.VBox([widgets.HBox([t_slider, schedule_choice]), out])

    def update(*_):
        s = schedules[schedule_choice.value]
        t = t_slider.value
        shown = noised_images(images, t, s, seed)
        abar = s.alphas_cumprod[t].item()
        box.last_images = shown
        with out:
            out.clear_output(wait=True)
            arr = to_numpy_images(shown)
            fig, axes = plt.subplots(1, len(arr), figsize=(1.6 * len(arr), 2.0), squeeze=False)
            for ax, im in zip(axes[0], arr):
                ax.imshow(im, interpolation="nearest")
                ax.axis("off")
            fig.suptitle(f"{s.beta_schedule}, t = {t}:  x_t = {abar ** 0.5:.3f}·x0 + "
                         f"{(1 - abar) ** 0.5:.3f}·ε   (SNR {abar / (1 - abar):.3g})", fontsize=9)
            plt.show()

    t_slider.observe(update, names="value")
    schedule_choice.observe(update, names="value")
    box.t_slider, box.schedule_choice, box.update = t_slider, schedule_choice, update
    update()
    return box
