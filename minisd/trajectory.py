"""One sampling run, kept step by step: what the denoising explorer (`minisd.widgets`) shows.

`record_trajectory` runs the pipeline once and keeps, for every step k of N:

    latents[k]        z_t, the latents the step starts from (latents[N] is the final z_0)
    pred_original[k]  the model's guess of the clean latents at that step, ẑ_0
    noise_pred[k]     the guided noise prediction ε̂
    attention[layer]  each prompt token's cross-attention map in every U-Net layer
                      (the conditional pass, averaged over heads)

and the decoded images of z_t and ẑ_0. `render_frame` turns one step into a picture (a plain
uint8 array, so tests can check it and the widget can show it in a few milliseconds), and
`save_animation` writes a whole run as a GIF or a self-contained HTML page for slides.

`continue_from` finishes a run from its state z_{t_k} at step k. With a sampler that adds fresh
noise (DDPM, or DDIM with η = 1) it branches the run: several continuations from the same z_{t_k}
show what that state has already fixed and what is still open (chapter 8.3).
"""

from __future__ import annotations

import base64
import html
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minisd.attention import MultiHeadAttention
from minisd.errors import MinisdError

MEAN_LAYER = "mean of all layers"
PADDING = "({} padding)"  # the name of the padding positions' summed attention
ANIMATION_SUFFIXES = (".gif", ".html")


@dataclass
class Trajectory:
    prompt: str
    seed: int
    sampler: str
    num_inference_steps: int
    guidance_scale: float
    timesteps: list[int]  # the t each step starts from
    latents: torch.Tensor  # (N + 1, c, h, w): z_t before each step, then the final z_0
    pred_original: torch.Tensor  # (N, c, h, w)
    noise_pred: torch.Tensor  # (N, c, h, w), the guided ε̂
    images: torch.Tensor  # (N + 1, 3, H, W) in [0, 1]: the latents decoded
    pred_images: torch.Tensor  # (N, 3, H, W) in [0, 1]: the predicted clean latents decoded
    # the tokens the conditional pass attends to, <start> … <end>; a model that reads the padding too
    # (Stable Diffusion: mask_padding=False) has one more entry, PADDING.format(n), for the n padding positions
    tokens: list[str]
    attention: dict[str, torch.Tensor]  # layer → (N, tokens, h_layer, w_layer); each pixel's row sums to 1

    @property
    def num_frames(self) -> int:
        return len(self.latents)

    def label(self) -> str:
        return (f"{self.sampler}, {self.num_inference_steps} steps, guidance {self.guidance_scale:g}, "
                f"seed {self.seed}")

    def attention_map(self, step: int, layer: str = MEAN_LAYER) -> torch.Tensor:
        """(tokens, h, w) at the latent resolution: one layer, or the mean over all layers with
        every map brought to the latent size first (each pixel repeated, no smoothing)."""
        if layer != MEAN_LAYER:
            if layer not in self.attention:
                raise MinisdError(f"layer {layer!r} is not one of {[MEAN_LAYER, *self.attention]}")
            maps = [self.attention[layer][step]]
        else:
            maps = list(a[step] for a in self.attention.values())
        h = self.latents.shape[-1]
        return torch.stack([m.repeat_interleave(h // m.shape[-1], -1).repeat_interleave(h // m.shape[-2], -2)
                            for m in maps]).mean(0)


def cross_attention_layers(unet, latent_size: int) -> dict[str, MultiHeadAttention]:
    """The U-Net's cross-attention modules in the order they run, with readable names such as
    'down 8x8', 'mid 4x4', 'up 8x8 #2' (the size of the feature map each one sees)."""
    levels = len(unet.config.channel_mults)
    groups: dict[tuple[str, int], list[MultiHeadAttention]] = {}
    for name, m in unet.named_modules():
        if name.endswith("attn2"):  # down.<i>.attn.<k>.block.attn2, mid_attn.block.attn2, up.<j>.attn.<k>…
            part, *rest = name.split(".")
            if part == "mid_attn":
                part, level = "mid", levels - 1
            else:  # the up path starts at the deepest level
                level = int(rest[0]) if part == "down" else levels - 1 - int(rest[0])
            groups.setdefault((part, level), []).append(m)
    order = [("down", i) for i in range(levels)] + [("mid", levels - 1)] + \
            [("up", i) for i in reversed(range(levels))]
    layers = {}
    for part, level in order:
        found = groups.get((part, level), [])
        size = latent_size >> level
        for k, m in enumerate(found):
            layers[f"{part} {size}x{size}" + (f" #{k + 1}" if len(found) > 1 else "")] = m
    return layers


@torch.no_grad()
def record_trajectory(sd, prompt: str, *, seed: int = 0, num_inference_steps: int = 50,
                      guidance_scale: float = 4.0, sampler: str = "ddim", attention: bool = True) -> Trajectory:
    """Run `sd(prompt, ...)` once (one image) and keep every step; see the module docstring.

    With `attention`, the cross-attention layers use the written-out attention for the run
    (`store_weights`), so the images agree with `sd(...)`'s fused attention to float rounding.
    With guidance w = 0 only the unconditional pass runs; its tokens are those of the empty prompt.
    """
    if not isinstance(prompt, str):
        raise MinisdError(f"prompt must be one string, got {type(prompt).__name__}")
    layers = cross_attention_layers(sd.unet, sd.latent_shape[-1]) if attention else {}
    saved = {name: m.store_weights for name, m in layers.items()}
    steps: list = []
    maps: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def keep(info):
        steps.append(info)
        for name, m in layers.items():
            w = m.last_weights[0].float().mean(0)  # the first (conditional) image, mean over heads: (HW, L)
            size = int(round(w.shape[0] ** 0.5))
            maps[name].append(w.T.reshape(w.shape[1], size, size).cpu())

    try:
        for m in layers.values():
            m.store_weights = True
        out = sd(prompt, num_images=1, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                 sampler=sampler, seed=seed, callback=keep)
    finally:
        for name, m in layers.items():
            m.store_weights, m.last_weights = saved[name], None

    attended = prompt if float(guidance_scale) != 0.0 else ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a cut caption was already reported by the sampling run
        tokens = sd.tokenizer.tokens(attended)
    n, padding = len(tokens), sd.tokenizer.max_length - len(tokens)
    # a U-Net that also read the padding: its positions' attention summed into one map, so rows still sum to 1
    # (with the padding masked, it got none)
    read_padding = not sd.mask_padding and padding > 0
    if read_padding:
        tokens.append(PADDING.format(padding))

    def kept(a):  # (N, L, h, w) → (N, tokens, h, w)
        return torch.cat([a[:, :n], a[:, n:].sum(1, keepdim=True)], 1) if read_padding else a[:, :n]
    latents = torch.cat([torch.cat([s.latents for s in steps]), out.latents]).float().cpu()
    pred = torch.cat([s.pred_original for s in steps]).float().cpu()
    return Trajectory(
        prompt=prompt, seed=int(seed), sampler=sampler, num_inference_steps=len(steps),
        guidance_scale=float(guidance_scale), timesteps=[int(s.t) for s in steps], latents=latents,
        pred_original=pred, noise_pred=torch.cat([s.noise_pred for s in steps]).float().cpu(),
        images=sd.decode(latents).cpu(), pred_images=sd.decode(pred).cpu(), tokens=tokens,
        attention={name: kept(torch.stack(v)) for name, v in maps.items()},
    )


BRANCH_SAMPLERS = ("ddpm", "ddim")


@torch.no_grad()
def continue_from(sd, latents: torch.Tensor, step: int, prompts, *, num_inference_steps: int = 50,
                  guidance_scale: float = 4.0, sampler: str = "ddpm", eta: float | None = None, seed: int = 0,
                  callback=None, progress: bool = False):
    """Finish a run from the middle: start from z_{t_k} and take steps k, k + 1, …, N − 1 of the
    same N-step timestep list that `sd(..., num_inference_steps=N, sampler=sampler)` visits.

    latents: (B, c, h, w), the latents step k starts from, e.g. `traj.latents[k:k + 1]`; step: k,
    from 0 (z_T: a whole run) to N (nothing left to do: `latents` come back decoded).
    prompts: one string for all B latents, or a list of B strings. sampler: 'ddpm' (ancestral:
    fresh noise in every step; the same as DDIM with η = 1, Song et al. 2021 §4.1) or 'ddim' with
    `eta` (default 0: deterministic). seed: the CPU generator of that fresh noise, as in `sd(...)`;
    each of the B rows draws its own noise, so repeating one z_{t_k} B times branches the run into
    B independent continuations. Returns `SDOutput` (images (B, 3, H, W) in [0, 1], latents (B, c, h, w)).

        z = traj.latents[k:k + 1].repeat(8, 1, 1, 1)     # (8, c, h, w): one state, 8 times
        out = continue_from(sd, z, k, traj.prompt, num_inference_steps=traj.num_inference_steps,
                            guidance_scale=traj.guidance_scale, sampler="ddpm", seed=1)
    """
    from minisd.clip import check_prompts
    from minisd.errors import check_choice, check_count
    from minisd.pipeline import SDOutput, check_guidance, check_seed

    check_choice("sampler", sampler, BRANCH_SAMPLERS)
    if sampler == "ddpm" and eta is not None:
        raise MinisdError(f"eta {eta!r} is for sampler='ddim'; 'ddpm' always adds the posterior's noise (η = 1)")
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or tuple(latents.shape[1:]) != sd.latent_shape:
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise MinisdError(f"latents {got} given; this model needs (B, {', '.join(map(str, sd.latent_shape))})")
    prompts = check_prompts(prompts)
    if len(prompts) == 1:
        prompts = prompts * len(latents)
    if len(prompts) != len(latents):
        raise MinisdError(f"{len(prompts)} prompts for {len(latents)} latents; give one prompt or one per latent")
    guidance_scale = check_guidance(guidance_scale)
    # the model's own sampler settings (prediction type, steps_offset, set_alpha_to_one), as sd(...) uses
    s = sd.make_sampler(sampler, num_inference_steps, eta=(0.0 if eta is None else eta) if sampler == "ddim" else None)
    check_count("step", step, 0, s.num_inference_steps)
    generator = torch.Generator().manual_seed(check_seed(seed))
    texts = (*sd.encode_prompt(prompts), *sd.encode_prompt([""] * len(prompts)))
    z = sd._denoise(latents.to(sd.device), s, step, texts, guidance_scale, generator, callback, progress)
    return SDOutput(sd.decode(z), z, prompts)


# --- drawing a frame ---------------------------------------------------------------------------

PANEL = 128  # pixels of a large panel
TOKEN = 84  # pixels of an attention panel
PAD = 6
_BG = (255, 255, 255)
_INK = (20, 20, 20)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # an old Pillow or one without FreeType: the bitmap font
        return ImageFont.load_default()


def _upscale(img: np.ndarray, size: int) -> np.ndarray:
    """(h, w, 3) → (size, size, 3), each pixel repeated (no smoothing: the pixels are the data)."""
    h, w = img.shape[:2]
    rows = (np.arange(size) * h) // size
    cols = (np.arange(size) * w) // size
    return img[rows][:, cols]


def _rgb(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] → (H, W, 3) floats."""
    return image.clamp(0, 1).permute(1, 2, 0).numpy()


def _colormap(values: np.ndarray, name: str, low: float, high: float) -> np.ndarray:
    from matplotlib import colormaps

    x = np.clip((values - low) / (high - low + 1e-12), 0, 1)
    return colormaps[name](x)[..., :3]


def noise_panel(noise: torch.Tensor, size: int = PANEL) -> np.ndarray:
    """The latent noise prediction (c, h, w) as a mosaic of its channels (2 × 2 for 4 channels),
    blue = negative, red = positive, clipped at ±3 (ε is a standard normal)."""
    c = noise.shape[0]
    cols = int(np.ceil(np.sqrt(c)))
    rows = int(np.ceil(c / cols))
    cell = size // cols
    out = np.ones((rows * cell, cols * cell, 3))
    for i in range(c):
        tile = _colormap(noise[i].numpy(), "RdBu_r", -3, 3)
        r, k = divmod(i, cols)
        out[r * cell:(r + 1) * cell - 2, k * cell:(k + 1) * cell - 2] = _upscale(tile, cell)[:-2, :-2]
    return out


def attention_panels(traj: Trajectory, frame: int, layer: str = MEAN_LAYER, size: int = TOKEN):
    """One heat map per token over the image of the predicted-image panel at `frame` (the final
    image at the last frame, whose maps are the last step's): each token's map is stretched from
    its own minimum to its maximum (where it looks; bright = more) and labelled with its share of
    all attention (how much)."""
    n = traj.num_inference_steps
    maps = traj.attention_map(min(frame, n - 1), layer)  # (T, h, w)
    share = maps.flatten(1).mean(1)  # each pixel's weights sum to 1 over the tokens
    under = traj.images[n] if frame == n else traj.pred_images[frame]
    edge = object_outline(_upscale(_rgb(under), size))
    panels = []
    for tok, m, s in zip(traj.tokens, maps, share):
        heat = _colormap(_upscale(m.numpy()[..., None], size)[..., 0], "magma", float(m.min()), float(m.max()))
        heat[edge] = OUTLINE
        panels.append((f"{tok} {100 * float(s):.0f}%", heat))
    return panels


OUTLINE = (0.0, 0.9, 1.0)  # cyan: absent from the magma colour map, so the outline never blends into a map


def object_outline(image: np.ndarray, threshold: float = 0.3, width: int = 2) -> np.ndarray:
    """(H, W) bool: the rim, `width` pixels wide, of the object in an (H, W, 3) image in [0, 1] — the
    pixels whose brightest channel exceeds `threshold` (the background is black) next to one that does not.
    An image that is bright over more than half its area has no dark background (a photograph, not a
    Shapes image): no outline."""
    inside = image.max(-1) > threshold
    if inside.mean() > 0.5:
        return np.zeros_like(inside)
    inner = inside.copy()
    for _ in range(width):  # erode by one pixel (4-neighbourhood), `width` times
        p = np.pad(inner, 1, constant_values=False)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return inside & ~inner


def render_frame(traj: Trajectory, frame: int, layer: str = MEAN_LAYER, max_width: int = 920) -> np.ndarray:
    """Frame k of a trajectory as an (H, W, 3) uint8 picture: z_t decoded, the predicted clean
    image, the predicted noise, and one cross-attention heat map per token. Frame N (the last)
    shows the final image; its noise panel is empty and its attention that of the last step."""
    from PIL import Image, ImageDraw

    n = traj.num_inference_steps
    if not 0 <= frame <= n:
        raise MinisdError(f"frame {frame} is out of range; this trajectory has frames 0 … {n}")
    t = traj.timesteps[frame] if frame < n else 0
    last = frame == n
    pred = traj.images[n] if last else traj.pred_images[frame]
    big = [(f"z_t decoded (t = {t})" if not last else "final image", _upscale(_rgb(traj.images[frame]), PANEL)),
           ("predicted clean image", _upscale(_rgb(pred), PANEL)),
           (f"predicted noise, channels 1-{traj.noise_pred.shape[1]}" if not last else "(no more noise)",
            noise_panel(traj.noise_pred[frame]) if not last else np.full((PANEL, PANEL, 3), 0.92))]
    small = attention_panels(traj, frame, layer) if traj.attention else []

    font, bold = _font(11), _font(13)
    title_h, label_h = 40, 16
    per_row = max(1, (max_width - PAD) // (TOKEN + PAD))
    token_rows = (len(small) + per_row - 1) // per_row
    width = max(3 * (PANEL + PAD) + PAD, min(len(small), per_row) * (TOKEN + PAD) + PAD, 480)
    height = title_h + label_h + PANEL + PAD + (label_h + 14 + token_rows * (TOKEN + label_h + PAD) if small else 0)
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 4), f"{traj.prompt!r}" if traj.prompt else "'' (no prompt)", font=bold, fill=_INK)
    draw.text((PAD, 22), f"step {frame} of {n}   ·   {traj.label()}", font=font, fill=_INK)
    y = title_h
    for i, (label, img) in enumerate(big):
        x = PAD + i * (PANEL + PAD)
        draw.text((x, y), label, font=font, fill=_INK)
        canvas.paste(Image.fromarray((img * 255).round().astype(np.uint8)), (x, y + label_h))
    if not last:  # number the noise mosaic's tiles: latent channel 1, 2, … row by row, as in noise_panel
        c = traj.noise_pred.shape[1]
        cols = int(np.ceil(np.sqrt(c)))
        cell, x = PANEL // cols, PAD + 2 * (PANEL + PAD)
        for i in range(c):
            r, k = divmod(i, cols)
            draw.text((x + k * cell + 3, y + label_h + r * cell + 1), str(i + 1), font=font,
                      fill=_INK, stroke_width=2, stroke_fill=_BG)  # outlined: legible on red and blue
    if small:
        y += label_h + PANEL + PAD
        where = "mean of all layers" if layer == MEAN_LAYER else f"layer {layer}"
        outlined = object_outline(_rgb(pred)).any()
        draw.text((PAD, y), f"cross attention of each token ({where}, mean over heads; share of all attention"
                  + ("; cyan: the object in the predicted image)" if outlined else ")"),
                  font=font, fill=_INK)
        y += 14
        for i, (label, img) in enumerate(small):
            r, k = divmod(i, per_row)
            x, yy = PAD + k * (TOKEN + PAD), y + r * (TOKEN + label_h + PAD)
            draw.text((x, yy), label, font=font, fill=_INK)
            canvas.paste(Image.fromarray((img * 255).round().astype(np.uint8)), (x, yy + label_h))
    return np.asarray(canvas)


def frame_for(traj: Trajectory, position: int, positions: int) -> int:
    """The frame of `traj` at `position` of 0 … `positions` when runs of different lengths are
    shown side by side: the same fraction of the way through."""
    return round(position * traj.num_inference_steps / positions) if positions else 0


def render_side_by_side(trajs: list[Trajectory], position: int, layer: str = MEAN_LAYER) -> np.ndarray:
    """Several trajectories at the same fraction of their runs, one above the other."""
    positions = max(t.num_inference_steps for t in trajs)
    frames = [render_frame(t, frame_for(t, position, positions), layer) for t in trajs]
    width = max(f.shape[1] for f in frames)
    rows = []
    for f in frames:
        rows.append(np.pad(f, ((0, 8), (0, width - f.shape[1]), (0, 0)), constant_values=255))
        rows[-1][-4:-3] = 160  # a thin rule between the runs
    return np.concatenate(rows)[:-8]


def png_bytes(frame: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="png", compress_level=1)
    return buf.getvalue()


# --- animations --------------------------------------------------------------------------------

def animation_frames(trajs: Trajectory | list[Trajectory], layer: str = MEAN_LAYER) -> list[np.ndarray]:
    trajs = [trajs] if isinstance(trajs, Trajectory) else list(trajs)
    if not trajs:
        raise MinisdError("no trajectory to animate; run the explorer first")
    positions = max(t.num_inference_steps for t in trajs)
    frames = [render_side_by_side(trajs, p, layer) for p in range(positions + 1)]
    h, w = max(f.shape[0] for f in frames), max(f.shape[1] for f in frames)
    return [np.pad(f, ((0, h - f.shape[0]), (0, w - f.shape[1]), (0, 0)), constant_values=255) for f in frames]


def save_animation(trajs: Trajectory | list[Trajectory], path, layer: str = MEAN_LAYER, fps: float = 8) -> Path:
    """Write every frame as an animation for slides: `.gif` (loops; the last frame held for a
    second) or `.html` (one self-contained page with a play button and a step slider)."""
    from PIL import Image

    from minisd.checkpoint import atomic_write
    from minisd.errors import check_choice

    path = Path(path)
    check_choice("animation file type", path.suffix.lower(), ANIMATION_SUFFIXES)
    if not path.parent.exists():
        raise MinisdError(f"folder {str(path.parent)!r} does not exist; create it first")
    if path.is_dir():
        raise MinisdError(f"{str(path)!r} is a folder; give a file name ending in .gif or .html")
    if not (isinstance(fps, (int, float)) and 0 < fps <= 60):
        raise MinisdError(f"fps {fps!r} is not allowed; use a number in (0, 60]")
    trajs = [trajs] if isinstance(trajs, Trajectory) else list(trajs)
    frames = animation_frames(trajs, layer)
    ms = int(round(1000 / fps))
    if path.suffix.lower() == ".gif":
        images = [Image.fromarray(f) for f in frames]
        durations = [ms] * (len(images) - 1) + [max(ms, 1000)]

        def write(tmp):
            images[0].save(tmp, format="gif", save_all=True, append_images=images[1:], duration=durations,
                           loop=0, optimize=False)
    else:
        uris = [f"data:image/png;base64,{base64.b64encode(png_bytes(f)).decode()}" for f in frames]
        title = html.escape(" | ".join(t.label() for t in trajs))
        page = _HTML.replace("__TITLE__", title).replace("__FRAMES__", json.dumps(uris)) \
            .replace("__LAST__", str(len(uris) - 1)).replace("__MS__", str(ms))

        def write(tmp):
            Path(tmp).write_text(page, encoding="utf-8")
    atomic_write(path, write)
    return path


_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>minisd denoising: __TITLE__</title>
<style>body{font-family:sans-serif;margin:1em} img{image-rendering:pixelated;max-width:100%}</style></head>
<body>
<div><button id="play">play</button> <input id="step" type="range" min="0" max="__LAST__" value="0"
 style="width:60%"> <span id="label"></span></div>
<img id="frame" alt="denoising step">
<script>
const frames = __FRAMES__;
const img = document.getElementById("frame"), slider = document.getElementById("step");
const label = document.getElementById("label"), button = document.getElementById("play");
let timer = null;
function show(i) { slider.value = i; img.src = frames[i]; label.textContent = "frame " + i + " of __LAST__"; }
slider.oninput = () => show(+slider.value);
button.onclick = () => {
  if (timer) { clearInterval(timer); timer = null; button.textContent = "play"; return; }
  button.textContent = "pause";
  timer = setInterval(() => show((+slider.value + 1) % frames.length), __MS__);
};
show(0);
</script></body></html>
"""
