"""Stable Diffusion, assembled (Rombach et al. 2022): text → latents → image.

    prompt ─tokenizer─▶ ids ─text encoder (chapter 5, frozen)─▶ context (B, L, D)
    z_T ~ N(0, I) ─[ U-Net (chapters 3–4) twice: with the prompt and with "" → guided ε̂ → sampler step
                   (chapter 2) ] × N steps ─▶ z_0 ─VAE decoder (chapter 6)─▶ image

Classifier-free guidance (Ho & Salimans 2022): one network learns both p(z | text) and p(z) by
seeing the empty caption 10% of the time in training; sampling pushes away from the
unconditional prediction,

    ε̂ = ε̂(z_t, "") + w · (ε̂(z_t, text) − ε̂(z_t, "")),

so w = 1 is the plain conditional model, w = 0 the unconditional one, and w > 1 trades
diversity for fidelity to the prompt. A negative prompt takes the place of "": the sample is
pushed away from what it describes.

`StableDiffusion.from_pretrained` also reads a diffusers-format Stable Diffusion 1.x/2.x folder
(`model_index.json`, unet/, vae/, text_encoder/, tokenizer/, scheduler/) through `minisd.convert`,
and then gives the images of diffusers' `StableDiffusionPipeline` for the same starting latents.

Training the U-Net (`train_unet`): every training image is encoded to latents once (cached), the
text tower stays frozen, and the U-Net learns ε on the latents with fresh (paraphrased,
sometimes dropped) captions each step; its exponential moving average is what samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minisd.diffusion import PREDICTION_TYPES, STANDARD_BETAS, NoiseSchedule
from minisd.distributed import rows
from minisd.errors import MinisdError, check_choice, check_count
from minisd.samplers import SAMPLERS
from minisd.unet import UNet, UNetConfig

SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
            **STANDARD_BETAS["scaled_linear"]}  # Stable Diffusion's
UNCOND_PROBABILITY = 0.1  # how often a training caption is replaced by "" (for guidance)


# --- the U-Net stage -------------------------------------------------------------------------

def unet_presets():
    """preset → (UNetConfig without the widths that come from the VAE and text encoder,
    TrainConfig, number of training images)."""
    from minisd.train import TrainConfig

    return {
        "tiny": (UNetConfig(base_channels=16, channel_mults=(1, 2), blocks_per_level=1, attention_levels=(1,),
                            heads=2, fused_attention=True),
                 TrainConfig(steps=40, batch_size=32, lr=2e-3, warmup_steps=10, ema_decay=0.99,
                             desc="U-Net (tiny)"), 512),
        "cpu": (UNetConfig(base_channels=32, channel_mults=(1, 2), blocks_per_level=1, attention_levels=(0, 1),
                           heads=4, fused_attention=True),
                TrainConfig(steps=600, batch_size=128, lr=2e-3, warmup_steps=100, ema_decay=0.999,
                            desc="U-Net (cpu)"), 20_000),
        # gpu: 3.8 GFLOP per image (a quarter of the earlier base-128 U-Net, whose step took 59 ms of GPU
        # work on an H200), so an estimated 60–125 s for 4,000 steps; not yet trained on a GPU (issue 15)
        "gpu": (UNetConfig(base_channels=64, channel_mults=(1, 2), blocks_per_level=2, attention_levels=(0, 1),
                           heads=4, fused_attention=True),
                TrainConfig(steps=4000, batch_size=256, lr=1.5e-3, warmup_steps=200, ema_decay=0.999,
                            desc="U-Net (gpu)"), 50_000),
    }


def file_digest(path) -> str:
    """sha256 of a file's bytes: what a cache is keyed on."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, seed: int = 0, batch_size: int = 500,
                   progress: bool = False) -> torch.Tensor:
    """uint8 images (N, C, S, S) → scaled latents (N, c, h, w): one posterior sample each, drawn
    with a generator seeded per batch, so the same images give the same latents."""
    from minisd.data import normalize

    device = next(vae.parameters()).device
    out = []
    for lo in tqdm(range(0, len(images), batch_size), desc="encoding latents", disable=not progress, leave=False):
        g = torch.Generator().manual_seed(seed * 1_000_003 + lo)
        z = vae.encode_latents(normalize(images[lo: lo + batch_size]).to(device), generator=g)
        out.append(z.cpu())
    return torch.cat(out)


def cached_latents(cache_file, vae_file, vae, num_images: int, seed: int = 0,
                   progress: bool = False, image_size: int = 32, dataset=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, labels) of `num_images` Shapes training images of side `image_size`, encoded by
    `vae` and cached in `cache_file`, keyed on the VAE weights' digest: a retrained VAE re-encodes.
    dataset: a `minisd.data.CaptionedImages` to encode instead (labels are then its caption ids)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    from minisd.checkpoint import atomic_write
    from minisd.data import Shapes

    key = {"vae_sha256": file_digest(vae_file), "num_images": str(num_images), "seed": str(seed),
           "image_size": str(image_size), "dataset": "shapes" if dataset is None else dataset.name}
    cache_file = Path(cache_file)
    if cache_file.is_file():
        try:
            with safe_open(str(cache_file), framework="pt") as f:
                if f.metadata() == key:
                    return f.get_tensor("latents"), f.get_tensor("labels")
        except (SafetensorError, OSError):
            pass  # a damaged cache is simply rebuilt
    if dataset is None:
        ds = Shapes("train", num_images, image_size=image_size, seed=seed)
        images, labels = ds.images, ds.labels
    else:
        images, labels = dataset.images[:num_images], dataset.caption_ids[:num_images]
    latents = encode_dataset(vae, images, seed, progress=progress)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache_file, lambda tmp: save_file({"latents": latents.contiguous(), "labels": labels.contiguous()},
                                                   tmp, metadata=key))
    return latents, labels


def unet_loss_fn(text_encoder, tokenizer, schedule: NoiseSchedule, paraphrase: float = 0.5, drop: float = 0.1,
                 uncond_probability: float = UNCOND_PROBABILITY, texts: list[str] | None = None):
    """loss_fn(unet, (latents, labels), generator) for `minisd.train.train`: captions for the
    batch (paraphrased, an attribute sometimes left out, the whole caption replaced by "" with
    `uncond_probability`), the frozen text tower's token states as context, and the ε loss.
    With `texts` (a dataset with fixed captions), labels (B,) index them instead."""
    from minisd.captions import FixedCaptions, ShapesCaptions
    from minisd.diffusion import diffusion_loss
    from minisd.distributed import draw_device

    # every caption tokenised once; each step only indexes (see minisd.captions)
    captions = ShapesCaptions(tokenizer, paraphrase, drop) if texts is None else FixedCaptions(tokenizer, texts)

    def loss_fn(unet, batch, generator):
        z0, labels = batch
        if texts is None:
            ids, _, _ = captions.draw(labels, generator)
        else:
            ids, _ = captions.ids(labels.to(z0.device))
        where = draw_device(generator)
        unconditional = rows(lambda m: torch.rand(m, generator=generator, device=where), len(ids)) < uncond_probability
        ids, mask = captions.unconditional(ids.to(z0.device), unconditional.to(z0.device))  # "" for those rows
        with torch.no_grad():  # the text tower is frozen
            context = text_encoder(ids, mask).last_hidden_state
        return diffusion_loss(unet, schedule, z0, generator=generator, context=context, context_mask=mask)

    return loss_fn


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str], device=None):
    """Prompts → (context (B, L, D), mask (B, L)): the text tower's state for every token."""
    from minisd.clip import check_token_ids

    ids, mask = tokenizer(prompts)
    check_token_ids(ids, text_encoder.config.vocab_size)  # here, on the CPU, before they go to a GPU
    device = device or next(text_encoder.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    return text_encoder(ids, mask).last_hidden_state, mask


def train_unet(preset: str, vae, text_encoder, tokenizer, *, latents: torch.Tensor | None = None,
               labels: torch.Tensor | None = None, steps: int | None = None, seed: int = 0,
               device: str = "auto", progress: bool = True, state_file=None,
               config: UNetConfig | None = None, uncond_probability: float = UNCOND_PROBABILITY,
               train_options: dict | None = None, texts: list[str] | None = None):
    """Train the conditional latent U-Net of `preset` against a frozen text tower.

    latents, labels: the scaled training latents (N, c, h, w) and their Shapes labels (N, 4); by
    default the preset's number of training images, encoded here (see `cached_latents` for a
    cached version). The U-Net's input channels and context width are taken from the VAE and
    the text encoder. uncond_probability: how often a caption is emptied (0 ablates guidance).
    train_options: other `TrainConfig` fields, e.g. {"compile": True, "channels_last": True}.
    texts: for a dataset with fixed captions, the captions that `labels` (N,) index.
    Returns (U-Net to sample with = the EMA weights, TrainResult).
    """
    from minisd.data import Shapes
    from minisd.train import IMAGE_SIZES, PRESETS, pick_device, train

    check_choice("preset", preset, PRESETS)
    unet_config, train_config, num_images = unet_presets()[preset]
    latent_channels = vae.config.latent_channels
    unet_config = dataclasses.replace(config or unet_config, in_channels=latent_channels,
                                      out_channels=latent_channels, context_dim=text_encoder.config.width)
    train_config = dataclasses.replace(train_config, seed=seed, device=device, progress=progress,
                                       **({} if steps is None else {"steps": steps}), **(train_options or {}))
    if latents is None:
        ds = Shapes("train", num_images, image_size=IMAGE_SIZES[preset], seed=seed)
        latents, labels = encode_dataset(vae, ds.images, seed), ds.labels
    if labels is None or len(labels) != len(latents):
        raise MinisdError("train_unet needs one label row per latent")
    text_encoder = text_encoder.to(pick_device(device)).eval().requires_grad_(False)
    torch.manual_seed(seed)  # the initial weights
    unet = UNet(unet_config)
    loss_fn = unet_loss_fn(text_encoder, tokenizer, NoiseSchedule(**SCHEDULE), uncond_probability=uncond_probability,
                           texts=texts)
    result = train(unet, loss_fn, (latents, labels), train_config, state_file=state_file)
    return result.ema.eval(), result


# --- the pipeline ----------------------------------------------------------------------------

SAMPLER_NAMES = tuple(SAMPLERS)  # ddpm, ddim, dpmsolver++
# `StableDiffusion` options saved in a run's config.json (see the class's docstring)
PIPELINE_OPTIONS = ("prediction_type", "mask_padding", "steps_offset", "set_alpha_to_one")
# Models shipped with the course, loadable by name (see minisd/pretrained/README.md).
PRETRAINED = {"shapes-cpu": Path(__file__).resolve().parent / "pretrained" / "shapes-cpu"}


@dataclass
class StepInfo:
    """What a sampling callback sees after each step."""
    step: int  # 0 … num_inference_steps − 1
    t: int  # the timestep this step started from
    latents: torch.Tensor  # z_t, the latents the step started from (N, c, h, w)
    pred_original: torch.Tensor  # the model's guess of the clean latents z_0 at this step
    noise_pred: torch.Tensor  # the guided ε̂
    next_latents: torch.Tensor  # the latents after the step


@dataclass
class SDOutput:
    images: torch.Tensor  # (N, 3, H, W) floats in [0, 1]
    latents: torch.Tensor  # (N, c, h, w) the final latents
    prompts: list[str]  # one per image


def check_seed(seed) -> int:
    """A seed for `torch.Generator.manual_seed`: an integer from 0 to 2**63 − 1."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise MinisdError(f"seed {seed!r} is not allowed; use an integer from 0 to 2**63 − 1")
    return int(seed)


def check_guidance(w) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise MinisdError(f"guidance scale {w!r} is not allowed; use a finite number ≥ 0 "
                          "(0: unconditional, 1: no guidance, 2–8: typical)")
    return float(w)


class StableDiffusion:
    """The assembled text-to-image model: VAE + frozen CLIP text tower + conditional U-Net.

        sd = StableDiffusion.from_pretrained("runs/cpu")
        res = sd("a small red circle in the top left", num_images=4, guidance_scale=4.0, seed=0)
        res.images   # (4, 3, 32, 32) in [0, 1]

    Options that a Stable Diffusion folder sets differently from minisd's own runs (all saved in
    the run's config.json):
        prediction_type: what the U-Net outputs, 'epsilon' (minisd, SD 1.x, SD 2.x base) or
            'v_prediction' (SD 2.x at 768 px); the samplers turn either into a step.
        mask_padding: True (minisd) hides the padding tokens from the U-Net's cross attention;
            Stable Diffusion attends to all 77 positions, padding included (False).
        steps_offset, set_alpha_to_one: DDIM's (and, for steps_offset, DDPM's) timestep settings,
            see `minisd.samplers.DDIMSampler`; minisd's runs use 0 and True, SD folders 1 and False.
    """

    def __init__(self, vae, text_encoder, tokenizer, unet: UNet, schedule: NoiseSchedule | None = None,
                 image_size: int = 32, prediction_type: str = "epsilon", mask_padding: bool = True,
                 steps_offset: int = 0, set_alpha_to_one: bool = True):
        c = unet.config
        if c.in_channels != vae.config.latent_channels or c.out_channels != vae.config.latent_channels:
            raise MinisdError(f"the U-Net takes {c.in_channels} channels but the VAE's latents have "
                              f"{vae.config.latent_channels}; the components come from different models")
        if c.context_dim != text_encoder.config.width:
            raise MinisdError(f"the U-Net's cross attention expects context width {c.context_dim} but the text "
                              f"encoder gives {text_encoder.config.width}; the components come from different models")
        if tokenizer.max_length != text_encoder.config.max_length or len(tokenizer) > text_encoder.config.vocab_size:
            raise MinisdError(f"the tokenizer ({len(tokenizer)} words, max_length {tokenizer.max_length}) does not fit "
                              f"the text encoder (vocab_size {text_encoder.config.vocab_size}, max_length "
                              f"{text_encoder.config.max_length})")
        if image_size % (vae.config.downsampling_factor * c.downsampling_factor):
            raise MinisdError(f"image size {image_size} does not fit the VAE and U-Net down-sampling")
        self.vae, self.text_encoder, self.tokenizer, self.unet = vae.eval(), text_encoder.eval(), tokenizer, unet.eval()
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if not isinstance(mask_padding, bool) or not isinstance(set_alpha_to_one, bool):
            raise MinisdError(f"mask_padding and set_alpha_to_one must be True or False, got {mask_padding!r} "
                              f"and {set_alpha_to_one!r}")
        self.schedule = schedule or NoiseSchedule(**SCHEDULE)
        self.image_size = image_size
        self.prediction_type, self.mask_padding = prediction_type, mask_padding
        self.steps_offset, self.set_alpha_to_one = check_count("steps_offset", steps_offset, 0), set_alpha_to_one

    # --- loading and saving ---
    @classmethod
    def from_pretrained(cls, path, device: str = "cpu", dtype: torch.dtype | None = None) -> StableDiffusion:
        """Load a run folder written by `minisd train` (or by `save_pretrained`), a model shipped
        with the course by its name: 'shapes-cpu' (the `cpu` preset, see `PRETRAINED`), or a
        diffusers-format Stable Diffusion folder (one with `model_index.json`, see
        `minisd.convert.load_stable_diffusion`). dtype: e.g. torch.float16 for the weights
        (default: float32 as saved)."""
        from minisd.clip import TextEncoder
        from minisd.tokenizer import BPETokenizer, Tokenizer
        from minisd.train import pick_device
        from minisd.vae import VAE

        if isinstance(path, str) and path in PRETRAINED and not Path(path).exists():
            path = PRETRAINED[path]
        path = Path(path)
        if not path.is_dir():
            raise MinisdError(f"run folder {str(path)!r} not found; train one with `minisd train --out {path}`, "
                              f"or load a shipped model: {', '.join(map(repr, PRETRAINED))}")
        if (path / "model_index.json").is_file():
            from minisd.convert import load_stable_diffusion

            return load_stable_diffusion(path, dtype=dtype or torch.float32, device=pick_device(device))
        missing = [p for p in ("config.json", "vae", "text_encoder", "unet") if not (path / p).exists()]
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer").is_dir():
            missing.insert(1, "tokenizer.json")
        if missing:
            raise MinisdError(f"run folder {str(path)!r} is incomplete (no {', '.join(missing)}); finish it with "
                              f"`minisd train --out {path} --resume`")
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
            pipe = config["pipeline"]
            schedule = NoiseSchedule(**pipe["schedule"])
            image_size = int(pipe["image_size"])
            # options added later: a config without them has the defaults they had before
            options = {key: pipe[key] for key in PIPELINE_OPTIONS if key in pipe}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise MinisdError(f"{path / 'config.json'} is not a minisd run config ({e})") from None
        # minisd's word-level tokenizer (tokenizer.json), or CLIP's byte-pair one as a tokenizer/ folder
        # (a Stable Diffusion model exported with `minisd export`)
        tokenizer = Tokenizer.load(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else \
            BPETokenizer.from_folder(path / "tokenizer")
        sd = cls(VAE.from_pretrained(path / "vae"), TextEncoder.from_pretrained(path / "text_encoder"), tokenizer,
                 UNet.from_pretrained(path / "unet"), schedule, image_size, **options)
        return sd.to(pick_device(device), dtype)

    def pipeline_config(self) -> dict:
        return {"schedule": self.schedule.config(), "image_size": self.image_size,
                **{key: getattr(self, key) for key in PIPELINE_OPTIONS}}

    def save_pretrained(self, path) -> None:
        """Write the model as a run folder: config.json, vae/, text_encoder/, unet/ and the
        tokenizer — tokenizer.json for minisd's word-level one, a tokenizer/ folder (vocab.json,
        merges.txt) for CLIP's byte-pair one."""
        from minisd.runs import write_json
        from minisd.tokenizer import BPETokenizer

        path = Path(path)
        if path.exists() and not path.is_dir():
            raise MinisdError(f"{str(path)!r} is a file, not a folder")
        if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
            raise MinisdError(f"{str(path)!r} exists and is not a minisd run folder; choose an empty or new folder")
        if not path.parent.exists():
            raise MinisdError(f"folder {str(path.parent)!r} does not exist; create it first")
        path.mkdir(exist_ok=True)
        self.vae.save_pretrained(path / "vae")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.unet.save_pretrained(path / "unet")
        self.tokenizer.save(path / ("tokenizer" if isinstance(self.tokenizer, BPETokenizer) else "tokenizer.json"))
        write_json(path / "config.json", {"pipeline": self.pipeline_config(),
                                          "stages": {"vae": asdict(self.vae.config),
                                                     "unet": asdict(self.unet.config)}})

    def to(self, device, dtype: torch.dtype | None = None) -> StableDiffusion:
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise MinisdError(f"dtype must be a floating-point torch.dtype such as torch.float16, got {dtype!r}")
        for m in (self.vae, self.text_encoder, self.unet):
            m.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.vae.latent_shape(self.image_size)

    # --- the parts of a sampling run ---
    def encode_prompt(self, prompts) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts → (context (B, L, D), the U-Net's cross-attention mask (B, L)): True for real
        tokens, or None with mask_padding=False (Stable Diffusion's U-Net reads every position,
        padding included)."""
        from minisd.clip import check_prompts

        context, mask = encode_prompts(self.text_encoder, self.tokenizer, check_prompts(prompts), self.device)
        return context, mask if self.mask_padding else None

    @torch.no_grad()
    def predict_noise(self, latents, t: int, context, mask, uncond_context, uncond_mask, guidance_scale: float):
        """The guided ε̂ at timestep t: ε̂_u + w (ε̂_c − ε̂_u). One U-Net call on the doubled batch;
        w = 1 needs only the conditional half and w = 0 only the unconditional one. (For a
        v_prediction model the same combination of the two v̂.) Masks of None: attend to every
        position, padding included."""
        n = len(latents)
        tt = torch.full((n,), t, dtype=torch.long, device=latents.device)
        if guidance_scale == 1.0:
            return self.unet(latents, tt, context, mask)
        if guidance_scale == 0.0:
            return self.unet(latents, tt, uncond_context, uncond_mask)
        both_masks = None if mask is None else torch.cat([mask, uncond_mask])
        eps = self.unet(torch.cat([latents, latents]), torch.cat([tt, tt]), torch.cat([context, uncond_context]),
                        both_masks)
        cond, uncond = eps.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """Images (N, 3, H, W), uint8 or floats in [0, 1] → scaled latents (N, c, h, w): the
        posterior mean (or, with `sample`, a draw), times the VAE's scale factor."""
        from minisd.data import normalize

        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.encode_latents(normalize(images).to(self.device, vae_dtype), generator=generator,
                                       sample=sample)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images (N, 3, H, W) in [0, 1]."""
        from minisd.data import denormalize

        vae_dtype = next(self.vae.parameters()).dtype
        return denormalize(self.vae.decode_latents(latents.to(self.device, vae_dtype)).float())

    def make_sampler(self, sampler: str, num_inference_steps: int, eta: float | None = None):
        """A sampler by name on this model's schedule and prediction type; it checks the name and
        the step count. DDPM takes the steps_offset, DDIM also set_alpha_to_one and `eta`
        (None: the sampler's default, 0)."""
        from minisd.samplers import make_sampler

        ddim = {"steps_offset": self.steps_offset, "set_alpha_to_one": self.set_alpha_to_one}
        options = {"ddpm": {"steps_offset": self.steps_offset},
                   "ddim": ddim if eta is None else {**ddim, "eta": eta}}
        return make_sampler(sampler, self.schedule, num_inference_steps=num_inference_steps,
                            prediction_type=self.prediction_type, **options.get(sampler, {}))

    def _prepare(self, prompts, num_images, guidance_scale, num_inference_steps, sampler, negative_prompt=None):
        from minisd.clip import check_prompts

        prompts = check_prompts(prompts)
        check_count("num_images", num_images, 1)
        guidance_scale = check_guidance(guidance_scale)
        if negative_prompt is None or isinstance(negative_prompt, str):
            negative = [negative_prompt or ""] * len(prompts)
        else:
            negative = check_prompts(negative_prompt)
            if len(negative) != len(prompts):
                raise MinisdError(f"{len(negative)} negative prompts for {len(prompts)} prompts; give one string "
                                  f"for all or one per prompt")
        s = self.make_sampler(sampler, num_inference_steps)
        prompts = [p for p in prompts for _ in range(num_images)]
        negative = [p for p in negative for _ in range(num_images)]
        texts = (*self.encode_prompt(prompts), *self.encode_prompt(negative))  # the negative prompt replaces ""
        return prompts, guidance_scale, s, texts

    @torch.no_grad()
    def _denoise(self, latents, sampler, start: int, texts, guidance_scale, generator, callback, progress,
                 after_step=None):
        """Steps start … N − 1 from `latents`; after_step(i, latents) → latents, if given, edits the
        latents each step leaves (inpainting puts the kept part of the image back there)."""
        timesteps = sampler.timesteps.tolist()[start:]
        sampler.begin(start)
        for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False), start):
            eps = self.predict_noise(latents, t, *texts, guidance_scale)
            out = sampler.step(eps, t, latents, generator=generator)
            if callback is not None:
                callback(StepInfo(i, t, latents, out.pred_original_sample, eps, out.prev_sample))
            latents = out.prev_sample if after_step is None else after_step(i, out.prev_sample)
        return latents

    def __call__(self, prompts, num_images: int = 1, num_inference_steps: int = 50, guidance_scale: float = 4.0,
                 sampler: str = "ddim", seed: int = 0, callback: Callable[[StepInfo], None] | None = None,
                 latents: torch.Tensor | None = None, progress: bool = False,
                 negative_prompt: str | list[str] | None = None) -> SDOutput:
        """Generate `num_images` images for each prompt (a string or a list of strings).

        seed: the starting noise (and DDPM's per-step noise) comes from a CPU generator with this
        seed, so the same call gives the same images. latents: start from these instead.
        callback(StepInfo) runs after every step. negative_prompt: what to steer away from, one
        string for all prompts or one per prompt; it replaces guidance's empty prompt (None: "").
        """
        prompts, guidance_scale, s, texts = self._prepare(prompts, num_images, guidance_scale,
                                                          num_inference_steps, sampler, negative_prompt)
        generator = torch.Generator().manual_seed(check_seed(seed))
        shape = (len(prompts), *self.latent_shape)
        if latents is None:
            latents = torch.randn(shape, generator=generator)
        elif tuple(latents.shape) != shape:
            raise MinisdError(f"latents of shape {tuple(latents.shape)} given; this model needs {shape}")
        z = self._denoise(latents.to(self.device, self.dtype), s, 0, texts, guidance_scale, generator, callback,
                          progress)
        return SDOutput(self.decode(z), z, prompts)

    def _check_image(self, image) -> torch.Tensor:
        """An image (3, H, W) or a batch (N, 3, H, W) of this model's size → the batch."""
        if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
            raise MinisdError("image must be a tensor (3, H, W) or (N, 3, H, W)")
        image = image[None] if image.ndim == 3 else image
        if tuple(image.shape[1:]) != (3, self.image_size, self.image_size):
            raise MinisdError(f"image of shape {tuple(image.shape[1:])}; this model makes "
                              f"(3, {self.image_size}, {self.image_size})")
        return image

    def img2img(self, image: torch.Tensor, prompts, strength: float = 0.6, num_inference_steps: int = 50,
                guidance_scale: float = 4.0, sampler: str = "ddim", seed: int = 0,
                callback: Callable[[StepInfo], None] | None = None, progress: bool = False,
                negative_prompt: str | list[str] | None = None) -> SDOutput:
        """SDEdit (Meng et al. 2022): noise the image's latents to the timestep `strength` of the way
        to pure noise, then denoise with the prompt. strength 0 keeps the image, 1 ignores it.
        image: (3, H, W) or (N, 3, H, W), uint8 or floats in [0, 1]; one output per image and prompt.
        negative_prompt: as in `__call__`, one string or one per prompt."""

        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise MinisdError(f"strength {strength!r} is not allowed; use a number in (0, 1]")
        image = self._check_image(image)
        prompts, guidance_scale, s, texts = self._prepare(prompts, len(image), guidance_scale, num_inference_steps,
                                                          sampler, negative_prompt)  # each prompt per image
        z0 = self.encode(image).repeat(len(prompts) // len(image), 1, 1, 1)
        start = len(s.timesteps) - max(1, round(strength * len(s.timesteps)))
        t0 = int(s.timesteps[start])
        generator = torch.Generator().manual_seed(check_seed(seed))
        noise = torch.randn(z0.shape, generator=generator).to(self.device, z0.dtype)
        z = self.schedule.add_noise(z0, noise, torch.full((len(z0),), t0, dtype=torch.long))
        z = self._denoise(z, s, start, texts, guidance_scale, generator, callback, progress)
        return SDOutput(self.decode(z), z, prompts)

    def inpaint(self, image: torch.Tensor, mask: torch.Tensor, prompts, num_inference_steps: int = 50,
                guidance_scale: float = 4.0, sampler: str = "ddim", seed: int = 0,
                callback: Callable[[StepInfo], None] | None = None, progress: bool = False,
                negative_prompt: str | list[str] | None = None) -> SDOutput:
        """Repaint the masked part of `image` to fit the prompt and keep the rest, by latent blending
        (the inpainting of Stable Diffusion's own scripts with a text-to-image model; RePaint,
        Lugmayr et al. 2022, without its resampling): sampling starts from pure noise, and after
        every step the latents outside the mask are replaced by the image's latents noised to the
        timestep that step reached — after the last step, by the image's latents themselves.

        image: (3, H, W) or (N, 3, H, W), uint8 or floats in [0, 1]. mask: (H, W), (N, H, W) or
        (N, 1, H, W), True (or 1) where the image is to be repainted. A latent pixel is repainted
        when any image pixel it covers is. The kept part comes back through the VAE (its
        reconstruction of the image), not pasted pixel for pixel. Other arguments as in `__call__`;
        one output per image and prompt, and the same seed gives `__call__`'s image where the
        mask covers everything.
        """
        image = self._check_image(image)
        if not isinstance(mask, torch.Tensor):
            raise MinisdError(f"mask must be a tensor (H, W), (N, H, W) or (N, 1, H, W), got {type(mask).__name__}")
        m = mask.float()
        m = m.reshape(1, 1, *m.shape) if m.ndim == 2 else m[:, None] if m.ndim == 3 else m
        if m.ndim != 4 or m.shape[1] != 1 or tuple(m.shape[2:]) != tuple(image.shape[2:]) or \
                m.shape[0] not in (1, len(image)):
            raise MinisdError(f"mask of shape {tuple(mask.shape)} does not fit images of shape "
                              f"{tuple(image.shape)}; give (H, W), (N, H, W) or (N, 1, H, W) with H, W "
                              f"= {tuple(image.shape[2:])}")
        if ((m != 0) & (m != 1)).any():
            raise MinisdError("mask values must be 0 (keep) or 1 (repaint), or False and True")
        prompts, guidance_scale, s, texts = self._prepare(prompts, len(image), guidance_scale, num_inference_steps,
                                                          sampler, negative_prompt)
        rounds = len(prompts) // len(image)  # _prepare's rows: every image for the first prompt, then the next
        z0 = self.encode(image).repeat(rounds, 1, 1, 1)
        repaint = F.adaptive_max_pool2d(m.to(z0.device), z0.shape[-2:]).expand(len(image), -1, -1, -1)
        repaint = repaint.repeat(rounds, 1, 1, 1).to(z0.dtype)  # (B, 1, h, w) at the latent size
        generator = torch.Generator().manual_seed(check_seed(seed))
        noise = torch.randn(z0.shape, generator=generator).to(self.device, z0.dtype)  # as __call__ draws it
        timesteps = s.timesteps.tolist()

        def keep(i, z):
            if i + 1 == len(timesteps):
                known = z0  # the last step reaches the clean image
            else:
                known = self.schedule.add_noise(z0, noise, torch.full((len(z0),), timesteps[i + 1], dtype=torch.long))
            return repaint * z + (1 - repaint) * known

        z = keep(-1, noise)  # the kept part starts at the first step's noise level
        z = self._denoise(z, s, 0, texts, guidance_scale, generator, callback, progress, after_step=keep)
        return SDOutput(self.decode(z), z, prompts)
