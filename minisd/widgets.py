"""Interactive explorers (ipywidgets). The logic lives in plain functions that return arrays or
figures, so it is tested without a browser; the widgets only wire sliders to them."""

from __future__ import annotations

import base64
import io
import math

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


class _SnapshotBox(widgets.VBox):
    """A VBox that also offers a PNG of its current picture. A live Jupyter front end draws the widget
    (it prefers the widget's own MIME type); a static view of a saved notebook, which cannot run
    widgets (GitHub, nbconvert to HTML), shows the picture instead of `VBox(children=…)`."""

    snapshot_png: bytes | None = None

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        if self.snapshot_png is not None:
            bundle["image/png"] = base64.b64encode(self.snapshot_png).decode("ascii")
        return bundle


def noising_explorer(images: torch.Tensor, num_train_timesteps: int = 1000, seed: int = 0):
    """A slider over t and a schedule choice; shows x_t for each image, the signal/noise mix, and
    where t sits on the schedule's log-SNR curve.

    Returns the widget box; its `.t_slider`, `.schedule_choice` and `.update()` let a test drive it,
    `.schedules` holds the three schedules it shows (`NoiseSchedule.standard`), `.last_images` the
    images on show and `.snapshot_png` the picture as PNG bytes (the static fallback) and `.last_figure` its figure.
    """
    # each with its own β range: scaled_linear is Stable Diffusion's 0.00085 → 0.012, not linear's range
    schedules = {name: NoiseSchedule.standard(name, num_train_timesteps) for name in BETA_SCHEDULES}
    t_slider = widgets.IntSlider(value=0, min=0, max=num_train_timesteps - 1, step=1,
                                 description="t", continuous_update=False,
                                 layout=widgets.Layout(width="520px"))
    schedule_choice = widgets.Dropdown(options=list(BETA_SCHEDULES), value="linear",
                                       description="schedule")
    out = widgets.Output()
    box = _SnapshotBox([widgets.HBox([t_slider, schedule_choice]), out])

    def update(*_):
        s = schedules[schedule_choice.value]
        t = t_slider.value
        shown = noised_images(images, t, s, seed)
        abar = s.alphas_cumprod[t].item()
        box.last_images = shown
        arr = to_numpy_images(shown)
        fig, axes = plt.subplots(1, len(arr) + 1, figsize=(1.6 * len(arr) + 2.6, 2.2), squeeze=False,
                                 gridspec_kw={"width_ratios": [1] * len(arr) + [1.6]})
        for ax, im in zip(axes[0], arr):
            ax.imshow(im, interpolation="nearest")
            ax.axis("off")
        curve = axes[0, -1]
        for name, other in schedules.items():
            curve.plot(other.snr().log(), lw=1.5 if name == s.beta_schedule else 0.8,
                       alpha=1.0 if name == s.beta_schedule else 0.35, label=name)
        curve.plot([t], [math.log(abar / (1 - abar))], "ko", ms=5)
        curve.axhline(0, color="gray", lw=0.5)
        curve.set_xlabel("t", fontsize=7)
        curve.set_ylabel("log SNR", fontsize=7)
        curve.tick_params(labelsize=6)
        curve.legend(fontsize=5, loc="upper right")
        fig.suptitle(f"{s.beta_schedule}, t = {t}:  x_t = {abar ** 0.5:.3f}·x0 + "
                     f"{(1 - abar) ** 0.5:.3f}·ε   (SNR {abar / (1 - abar):.3g})", fontsize=9)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=80)
        box.snapshot_png, box.last_figure = png.getvalue(), fig
        with out:
            out.clear_output(wait=True)
            plt.show()
        plt.close(fig)

    t_slider.observe(update, names="value")
    schedule_choice.observe(update, names="value")
    box.t_slider, box.schedule_choice, box.update, box.schedules = t_slider, schedule_choice, update, schedules
    update()
    return box


# --- the denoising explorer (chapter 8) ---------------------------------------------------------

def prompt_notes(tokenizer, prompt: str) -> list[str]:
    """What the model will not read of `prompt`: words outside a word-level vocabulary (read as
    <unk>), and anything beyond max_length − 2 tokens (cut). CLIP's byte-pair tokenizer has no
    unknown words: any text is some sequence of its byte-level tokens."""
    from minisd.tokenizer import BPETokenizer, split_words

    if isinstance(tokenizer, BPETokenizer):
        unknown, count, unit = [], len(tokenizer.encode(prompt)), "tokens"
    else:
        words = split_words(prompt)
        unknown, count, unit = [w for w in words if w not in tokenizer.ids], len(words), "words"
    notes = []
    if unknown:
        notes.append(f"not in the model's vocabulary, read as <unk>: {', '.join(dict.fromkeys(unknown))}")
    if count > tokenizer.max_length - 2:
        notes.append(f"the prompt was cut to its first {tokenizer.max_length - 2} {unit} (it has {count})")
    return notes


class DenoisingExplorer(_SnapshotBox):
    """Type a prompt, press Run, scrub through the denoising. See `denoising_explorer`.

    The controls are attributes (`prompt`, `seed`, `steps`, `guidance`, `sampler`, `run_button`,
    `compare`, `sampler_b`, `steps_b`, `guidance_b`, `step_slider`, `play`, `layer`,
    `export_name`, `export_button`), so a test or a teacher's script can drive it; `trajectories`
    holds the recorded runs, `frame` the picture on show (an (H, W, 3) uint8 array; `snapshot_png`
    the same as PNG, which a saved notebook shows where widgets cannot run) and `message` what went
    wrong, if anything.
    """

    def __init__(self, sd, prompt: str = "a large red circle in the center", seed: int = 0, steps: int = 50,
                 guidance: float = 4.0, sampler: str = "ddim", compare: bool = False,
                 sampler_b: str = "dpmsolver++", steps_b: int = 10, guidance_b: float = 4.0, run: bool = True):
        from minisd.pipeline import SAMPLER_NAMES
        from minisd.trajectory import MEAN_LAYER, cross_attention_layers

        self.sd = sd
        self.trajectories: list = []
        self.frame = None
        self._ran = None  # the settings of the run on show
        w = widgets.Layout
        self.prompt = widgets.Text(prompt, description="prompt", continuous_update=False,
                                   placeholder="e.g. a small blue square in the top left", layout=w(width="430px"))
        self.seed = widgets.IntText(seed, description="seed", layout=w(width="140px"))
        self.steps = widgets.IntText(steps, description="steps", layout=w(width="140px"))
        self.guidance = widgets.FloatText(guidance, description="guidance", layout=w(width="160px"))
        self.sampler = widgets.Dropdown(options=SAMPLER_NAMES, value=sampler, description="sampler",
                                        layout=w(width="210px"))
        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play",
                                         layout=w(width="90px"))
        self.compare = widgets.Checkbox(compare, description="side by side, same seed, with:", indent=False,
                                        layout=w(width="230px"))
        self.sampler_b = widgets.Dropdown(options=SAMPLER_NAMES, value=sampler_b, description="sampler",
                                          layout=w(width="210px"))
        self.steps_b = widgets.IntText(steps_b, description="steps", layout=w(width="140px"))
        self.guidance_b = widgets.FloatText(guidance_b, description="guidance", layout=w(width="160px"))
        self.step_slider = widgets.IntSlider(0, min=0, max=1, description="step", continuous_update=True,
                                             layout=w(width="520px"))
        self.play = widgets.Play(0, min=0, max=1, interval=150, description="play")
        widgets.jslink((self.play, "value"), (self.step_slider, "value"))
        layers = cross_attention_layers(sd.unet, sd.latent_shape[-1])
        self.layer = widgets.Dropdown(options=[MEAN_LAYER, *layers], value=MEAN_LAYER,
                                      description="attention", layout=w(width="280px"))
        self.message = widgets.HTML()
        self.image = widgets.Image(format="png", layout=w(max_width="100%"))
        self.export_name = widgets.Text("denoising.gif", description="export to", layout=w(width="320px"))
        self.export_button = widgets.Button(description="Export GIF/HTML", icon="download",
                                            layout=w(width="150px"))
        self.image.add_class("minisd-explorer-frame")
        self.run_button.add_class("minisd-explorer-run")
        self.prompt.add_class("minisd-explorer-prompt")
        self.step_slider.add_class("minisd-explorer-step")
        self.steps.add_class("minisd-explorer-steps")
        self.message.add_class("minisd-explorer-message")
        self.add_class("minisd-explorer")

        compare_row = widgets.HBox([self.compare, self.sampler_b, self.steps_b, self.guidance_b])
        super().__init__([
            widgets.HBox([self.prompt, self.run_button]),
            widgets.HBox([self.seed, self.steps, self.guidance, self.sampler]),
            compare_row,
            widgets.HBox([self.play, self.step_slider, self.layer]),
            self.message, self.image,
            widgets.HBox([self.export_name, self.export_button]),
        ])
        self.run_button.on_click(lambda _: self.run())
        self.export_button.on_click(lambda _: self.export())
        for control in (self.prompt, self.seed, self.steps, self.guidance, self.sampler, self.compare,
                        self.sampler_b, self.steps_b, self.guidance_b):
            control.observe(lambda _: self.run(), names="value")
        self.step_slider.observe(lambda _: self.redraw(), names="value")
        self.layer.observe(lambda _: self.redraw(), names="value")
        if run:
            self.run()

    # --- what the buttons do ---
    def settings(self) -> list[dict]:
        runs = [dict(prompt=self.prompt.value, seed=self.seed.value, num_inference_steps=self.steps.value,
                     guidance_scale=self.guidance.value, sampler=self.sampler.value)]
        if self.compare.value:
            runs.append({**runs[0], "num_inference_steps": self.steps_b.value,
                         "guidance_scale": self.guidance_b.value, "sampler": self.sampler_b.value})
        return runs

    def _say(self, text: str, kind: str = "error") -> None:
        import html

        color = {"error": "#b00020", "note": "#555"}[kind]
        self.message.value = f'<span style="color:{color}">{html.escape(text)}</span>' if text else ""

    def run(self, force: bool = False) -> bool:
        """Record the trajectories for the current settings and show the final step (unless they
        are on show already and not `force`d). Bad input leaves the last run on show and explains
        itself in `message`; returns whether the settings ran."""
        from minisd.errors import MinisdError
        from minisd.trajectory import record_trajectory

        runs = self.settings()
        if runs == self._ran and not force:
            return True
        prompt = runs[0]["prompt"]
        if not prompt.strip():
            self._say("Type a prompt first, e.g. 'a small blue square in the top left' (the empty prompt is "
                      "what guidance pushes away from; set guidance to 0 to see it).")
            return False
        self.run_button.disabled = True
        try:
            trajs = [record_trajectory(self.sd, **r) for r in runs]
        except MinisdError as e:
            self._say(str(e).replace("num_inference_steps", "steps"))  # the name on the control
            return False
        except Exception as e:  # noqa: BLE001 — a widget shows a message, never a traceback
            self._say(f"unexpected error ({type(e).__name__}): {e}")
            return False
        finally:
            self.run_button.disabled = False
        self.trajectories, self._ran = trajs, runs
        self._say("; ".join(prompt_notes(self.sd.tokenizer, prompt)), "note")
        last = max(t.num_inference_steps for t in trajs)
        with self.step_slider.hold_trait_notifications():
            self.step_slider.max = self.play.max = last
        if self.step_slider.value != last:
            self.step_slider.value = last  # redraws
        else:
            self.redraw()
        return True

    def redraw(self) -> None:
        from minisd.trajectory import png_bytes, render_side_by_side

        if not self.trajectories:
            return
        try:
            self.frame = render_side_by_side(self.trajectories, self.step_slider.value, self.layer.value)
            self.image.value = self.snapshot_png = png_bytes(self.frame)  # (a saved notebook shows the snapshot)
        except Exception as e:  # noqa: BLE001
            self._say(f"could not draw this step ({type(e).__name__}): {e}")

    def export(self):
        """Write the run on show as an animation (`export_name`, .gif or .html); returns its path."""
        from minisd.errors import MinisdError
        from minisd.trajectory import save_animation

        try:
            path = save_animation(self.trajectories, self.export_name.value, self.layer.value)
        except MinisdError as e:
            self._say(str(e))
            return None
        except OSError as e:
            self._say(f"could not write {self.export_name.value!r}: {e.strerror or e}")
            return None
        self._say(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB, {self.step_slider.max + 1} frames)", "note")
        return path


def denoising_explorer(sd, prompt: str = "a large red circle in the center", **settings) -> DenoisingExplorer:
    """The chapter-8 explorer for a `StableDiffusion` model: a prompt box, seed, steps, guidance
    and sampler, a Run button; a step slider with a play button over the stored run; panels for
    z_t decoded, the predicted clean image, the predicted noise and each token's cross attention
    (the mean over layers, or one layer); a side-by-side mode (the same seed under a second
    sampler, step count or guidance); export of the run as a GIF or an HTML page.

        from minisd import StableDiffusion
        denoising_explorer(StableDiffusion.from_pretrained("shapes-cpu"))
    """
    return DenoisingExplorer(sd, prompt, **settings)
