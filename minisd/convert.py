"""Stable Diffusion 1.x / 2.x weights (diffusers folders) → minisd's own U-Net, VAE and text encoder.

The classes the course trains from scratch can express Stable Diffusion's configuration exactly;
what differs is only the *names* of the tensors. Loading a component takes three steps:

1. read diffusers' (or transformers') `config.json` and build the minisd config that has the same
   architecture — refusing, with a clear error, any option minisd does not implement;
2. rename every tensor with a table of rules, e.g. `down_blocks.{i}.resnets.{j}` → `down.{i}.res.{j}`;
3. check that every tensor found a place and every place got a tensor of the right shape.

    unet = load_unet("stable-diffusion-v1-5/unet")               # → minisd.unet.UNet
    vae = load_vae("stable-diffusion-v1-5/vae")                  # → minisd.vae.VAE
    text_encoder = load_text_encoder("stable-diffusion-v1-5/text_encoder")  # → minisd.clip.TextEncoder

Weights are read from safetensors only, never from pickles (`.bin`, `.ckpt`), so loading a
downloaded file cannot run code. `load_stable_diffusion` loads a whole Stable Diffusion folder
(the three models, the tokenizer and the scheduler's noise schedule) as minisd's `StableDiffusion`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from minisd.clip import TextEncoder, TextEncoderConfig
from minisd.diffusion import NoiseSchedule
from minisd.errors import MinisdError, read_json_object
from minisd.unet import UNet, UNetConfig
from minisd.vae import VAE, VAEConfig

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")

# --- renaming tensors -------------------------------------------------------------------------
# A rule (source, target) renames a run of dot-separated parts of a key wherever it occurs;
# `{i}` and `{j}` stand for one number each and carry over. The rules of a table apply in order.

UNET_RULES = [
    ("time_embedding.linear_1", "time.mlp.0"),  # the time MLP: Linear → SiLU → Linear
    ("time_embedding.linear_2", "time.mlp.2"),
    ("down_blocks.{i}.resnets.{j}", "down.{i}.res.{j}"),  # diffusers' blocks are minisd's levels
    ("down_blocks.{i}.attentions.{j}", "down.{i}.attn.{j}"),
    ("down_blocks.{i}.downsamplers.0", "downsample.{i}"),
    ("mid_block.resnets.0", "mid1"),
    ("mid_block.attentions.0", "mid_attn"),
    ("mid_block.resnets.1", "mid2"),
    ("up_blocks.{i}.resnets.{j}", "up.{i}.res.{j}"),
    ("up_blocks.{i}.attentions.{j}", "up.{i}.attn.{j}"),
    ("up_blocks.{i}.upsamplers.0", "upsample.{i}"),
    ("conv_norm_out", "norm_out"),
    # inside a residual block
    ("time_emb_proj", "time"),
    ("conv_shortcut", "shortcut"),
    # inside a transformer: one block per SpatialTransformer
    ("transformer_blocks.0", "block"),
    ("to_out.0", "to_out"),  # diffusers' to_out is Sequential(Linear, Dropout)
    ("ff.net.0.proj", "ff.proj"),  # the GEGLU's input projection (value and gate halves)
    ("ff.net.2", "ff.out"),
]

VAE_INNER_RULES = [  # inside the VAE's blocks; its block names come from `vae_rules`
    ("conv_shortcut", "shortcut"),
    ("group_norm", "norm"),  # the middle attention
    ("to_q", "attn.to_q"),
    ("to_k", "attn.to_k"),
    ("to_v", "attn.to_v"),
    ("to_out.0", "attn.to_out"),
    ("query", "attn.to_q"),  # the same four under the names of diffusers' older files
    ("key", "attn.to_k"),
    ("value", "attn.to_v"),
    ("proj_attn", "attn.to_out"),
]

TEXT_RULES = [  # the names below `text_model.`, which transformers < 5 puts before every name and 5.x leaves out
    ("embeddings.token_embedding", "token_embedding"),
    ("embeddings.position_embedding.weight", "position_embedding"),
    ("encoder.layers.{i}", "blocks.{i}"),
    ("final_layer_norm", "final_norm"),
    ("layer_norm1", "norm1"),  # pre-LN block: norm1 → attention, norm3 → MLP (minisd's norm2 is cross attention's)
    ("self_attn.q_proj", "attn1.to_q"),
    ("self_attn.k_proj", "attn1.to_k"),
    ("self_attn.v_proj", "attn1.to_v"),
    ("self_attn.out_proj", "attn1.to_out"),
    ("layer_norm2", "norm3"),
    ("mlp.fc1", "ff.fc1"),
    ("mlp.fc2", "ff.fc2"),
]
TEXT_IGNORED = ("embeddings.position_ids",)  # a constant 0 … L−1 that older files store


def vae_rules(c: VAEConfig) -> list[tuple[str, str]]:
    """diffusers' AutoencoderKL block names → minisd's. minisd's encoder and decoder run a flat
    `nn.Sequential` (`body`), so this table numbers their layers in the order they run."""
    rules = []
    if c.middle == "res":
        mid = ["mid_block.resnets.0"]
    else:  # "res-attn-res"
        mid = ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]
    levels = len(c.channels)

    n = 0  # encoder: each level's residual blocks and its halving conv, then the middle
    for i in range(levels):
        for j in range(c.blocks_per_level):
            rules.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.body.{n}"))
            n += 1
        if i < levels - 1:
            rules.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.body.{n}"))
            n += 1
    for name in mid:
        rules.append((f"encoder.{name}", f"encoder.body.{n}"))
        n += 1

    n = 0  # decoder: the middle, then each level's residual blocks and its (upsample, conv) pair
    for name in mid:
        rules.append((f"decoder.{name}", f"decoder.body.{n}"))
        n += 1
    for i in range(levels):
        for j in range(c.decoder_blocks):
            rules.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.body.{n}"))
            n += 1
        if i < levels - 1:
            rules.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.body.{n + 1}"))
            n += 2  # nn.Upsample has no weights
    rules += [("encoder.conv_norm_out", "encoder.norm_out"), ("decoder.conv_norm_out", "decoder.norm_out")]
    return rules + VAE_INNER_RULES


def _numbers(pattern: list[str], parts: list[str]) -> dict[str, str] | None:
    """{'i': …, 'j': …} if the parts match the pattern's parts ({i}, {j}: any number), else None."""
    numbers = {}
    for p, q in zip(pattern, parts):
        if p in ("{i}", "{j}") and q.isdigit():
            numbers[p[1]] = q
        elif p != q:
            return None
    return numbers


def rename(key: str, rules: list[tuple[str, str]]) -> str:
    """Apply each rule once, at the first place its parts occur as whole parts of `key`:
    rename("down_blocks.1.resnets.0.conv1.weight", UNET_RULES) == "down.1.res.0.conv1.weight"."""
    parts = key.split(".")
    for source, target in rules:
        pattern = source.split(".")
        for start in range(len(parts) - len(pattern) + 1):
            numbers = _numbers(pattern, parts[start:start + len(pattern)])
            if numbers is not None:
                parts[start:start + len(pattern)] = target.format(**numbers).split(".")
                break
    return ".".join(parts)


def _listed(names, n: int = 5) -> str:
    names = sorted(names)
    more = f" … ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def convert_state_dict(tensors: dict[str, torch.Tensor], rules, model: nn.Module, source: str = "the file",
                       ignored: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Rename a diffusers/transformers state dict to `model`'s names. Every tensor must find a
    place and every place must get a tensor of its shape; otherwise `MinisdError` names the keys."""
    wanted = model.state_dict()
    out, origin, unknown = {}, {}, []
    for key, tensor in tensors.items():
        if key in ignored:
            continue
        new = rename(key, rules)
        if new not in wanted or new in out:
            unknown.append(key)
            continue
        out[new], origin[new] = tensor, key
    if unknown:
        raise MinisdError(f"{source} has {len(unknown)} tensor(s) that this {type(model).__name__} has no place "
                          f"for: {_listed(unknown)}; is the config.json the one these weights were saved with?")
    missing = [k for k in wanted if k not in out]
    if missing:
        raise MinisdError(f"{source} lacks {len(missing)} tensor(s) this {type(model).__name__} needs "
                          f"(minisd names): {_listed(missing)}")
    wrong = [f"{origin[k]} {tuple(out[k].shape)} (expected {tuple(wanted[k].shape)})"
             for k in wanted if out[k].shape != wanted[k].shape]
    if wrong:
        raise MinisdError(f"{source} has {len(wrong)} tensor(s) of the wrong shape: {_listed(wrong, 3)}")
    return out


# --- configs -----------------------------------------------------------------------------------

def _require(config: dict, what: str, allowed: dict) -> None:
    """Refuse options minisd does not implement: allowed maps a key to the values minisd supports
    (an absent key means diffusers' default, which is always supported; a per-level list passes
    when each of its values does)."""
    for key, values in allowed.items():
        value = config.get(key, values[0])
        if value not in values and not (isinstance(value, list) and all(v in values for v in value)):
            if key in ("_class_name", "model_type"):
                raise MinisdError(f"this config.json describes a {value!r}, not a {what} ({values[0]!r}); "
                                  f"pass the matching folder of the model (unet/, vae/ or text_encoder/)")
            raise MinisdError(f"this {what} has {key}={config[key]!r}, which minisd does not implement; "
                              f"supported: {', '.join(repr(v) for v in values)}")


def _per_level(name: str, value, levels: int) -> list:
    """A config value given once for all levels or as a list, one per level → the list."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise MinisdError(f"{name} {value} must give one value per level ({levels} levels)")
        return list(value)
    return [value] * levels


def _one_value(name: str, value, levels: int):
    """A config value that minisd needs equal at every level."""
    values = _per_level(name, value, levels)
    if len(set(values)) != 1:
        raise MinisdError(f"{name} {values} differs between levels; minisd supports one value for all")
    return values[0]


UNET_SUPPORTED = {  # UNet2DConditionModel options with the only values minisd implements
    "_class_name": ["UNet2DConditionModel"],
    "center_input_sample": [False], "flip_sin_to_cos": [True], "freq_shift": [0],
    "mid_block_type": ["UNetMidBlock2DCrossAttn"], "only_cross_attention": [False],
    "dual_cross_attention": [False],
    "downsample_padding": [1], "mid_block_scale_factor": [1], "act_fn": ["silu"],
    "encoder_hid_dim": [None], "encoder_hid_dim_type": [None], "class_embed_type": [None],
    "addition_embed_type": [None], "num_class_embeds": [None], "resnet_time_scale_shift": ["default"],
    "resnet_skip_time_act": [False], "resnet_out_scale_factor": [1], "time_embedding_type": ["positional"],
    "time_embedding_dim": [None], "time_embedding_act_fn": [None], "timestep_post_act": [None],
    "time_cond_proj_dim": [None], "conv_in_kernel": [3], "conv_out_kernel": [3],
    "projection_class_embeddings_input_dim": [None], "attention_type": ["default"],
    "class_embeddings_concat": [False], "mid_block_only_cross_attention": [None, False],
    "cross_attention_norm": [None], "addition_time_embed_dim": [None],
    "reverse_transformer_layers_per_block": [None],
    # upcast_attention (SD 2.1) computes attention scores in float32; minisd's float32 path always does
}


def unet_config_from_diffusers(config: dict) -> UNetConfig:
    """A diffusers `UNet2DConditionModel` config.json (as a dict) → the equal `UNetConfig`."""
    _require(config, "U-Net", UNET_SUPPORTED)
    channels = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(channels)
    down = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = list(config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    if len(down) != levels or len(up) != levels:
        raise MinisdError(f"down_block_types and up_block_types need one entry per level ({levels})")
    for kind in down + up:
        if kind not in ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"):
            raise MinisdError(f"block type {kind!r} is not implemented in minisd; supported: CrossAttnDownBlock2D, "
                              f"DownBlock2D, CrossAttnUpBlock2D, UpBlock2D")
    attention_levels = tuple(i for i, kind in enumerate(down) if kind.startswith("CrossAttn"))
    if tuple(i for i, kind in enumerate(reversed(up)) if kind.startswith("CrossAttn")) != attention_levels:
        raise MinisdError(f"up_block_types {up} do not mirror down_block_types {down}; minisd puts attention "
                          f"at the same levels on both paths")
    base = channels[0]
    if any(c % base for c in channels):
        raise MinisdError(f"block_out_channels {channels} must all be multiples of the first")
    # diffusers' legacy naming: `attention_head_dim` holds the number of heads unless
    # `num_attention_heads` is given (SD 2.x's [5, 10, 20, 20] are heads of 64 channels each)
    heads_key = "num_attention_heads" if config.get("num_attention_heads") is not None else "attention_head_dim"
    heads = _per_level(heads_key, config.get(heads_key, 8), levels)
    layers = _one_value("layers_per_block", config.get("layers_per_block", 2), levels)
    transformer_layers = config.get("transformer_layers_per_block", 1)
    if set(_per_level("transformer_layers_per_block", transformer_layers, levels)) != {1}:
        raise MinisdError(f"transformer_layers_per_block={transformer_layers!r} is not implemented in minisd; "
                          f"supported: 1 (one transformer block per attention, as in SD 1.x/2.x)")
    context_dim = _one_value("cross_attention_dim", config.get("cross_attention_dim", 1280), levels)
    return UNetConfig(
        in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
        base_channels=base, channel_mults=tuple(c // base for c in channels), blocks_per_level=layers,
        attention_levels=attention_levels, heads=heads[0] if len(set(heads)) == 1 else tuple(heads),
        context_dim=context_dim, norm_groups=config.get("norm_num_groups", 32),
        projection="linear" if config.get("use_linear_projection", False) else "conv",
        norm_eps=config.get("norm_eps", 1e-5), attention_norm_eps=1e-6,  # diffusers' Transformer2DModel: 1e-6
        # PyTorch's fused attention: the same numbers, without the (heads, 4096, 4096) matrix of 64×64 latents
        fused_attention=True,
    )


VAE_SUPPORTED = {
    "_class_name": ["AutoencoderKL"], "act_fn": ["silu"], "shift_factor": [None],
    "latents_mean": [None], "latents_std": [None], "mid_block_add_attention": [True],
}


def vae_config_from_diffusers(config: dict) -> VAEConfig:
    """A diffusers `AutoencoderKL` config.json (as a dict) → the equal `VAEConfig`."""
    _require(config, "VAE", VAE_SUPPORTED)
    channels = tuple(config.get("block_out_channels", (64,)))
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        kinds = list(config.get(key, [kind] * len(channels)))
        if kinds != [kind] * len(channels):
            raise MinisdError(f"{key} {kinds} is not supported; minisd implements {kind} at every level "
                              f"({len(channels)} levels, one per block_out_channels)")
    if config.get("out_channels", 3) != config.get("in_channels", 3):
        raise MinisdError(f"this VAE has in_channels {config.get('in_channels', 3)} but out_channels "
                          f"{config['out_channels']}; minisd's VAE decodes to as many channels as it encodes")
    layers = config.get("layers_per_block", 1)
    quant = config.get("use_quant_conv", True)
    if config.get("use_post_quant_conv", True) != quant:
        raise MinisdError("use_quant_conv and use_post_quant_conv differ; minisd has both 1×1 convs or neither")
    return VAEConfig(
        in_channels=config.get("in_channels", 3), latent_channels=config.get("latent_channels", 4),
        channels=channels, blocks_per_level=layers, decoder_blocks_per_level=layers + 1,
        norm_groups=config.get("norm_num_groups", 32), scale_factor=config.get("scaling_factor", 0.18215),
        middle="res-attn-res", downsample_padding="after", quant_conv=quant, norm_eps=1e-6,  # AutoencoderKL's
    )


TEXT_SUPPORTED = {"hidden_act": ["quick_gelu", "gelu"], "model_type": ["clip_text_model"],
                  "architectures": [None, ["CLIPTextModel"]]}


def text_encoder_config_from_transformers(config: dict, clip_skip: int = 0) -> TextEncoderConfig:
    """A transformers `CLIPTextModel` config.json (as a dict) → the equal `TextEncoderConfig`.

    Stable Diffusion 1.x reads the last block's states through the final LayerNorm (clip_skip=0).
    Stable Diffusion 2.x reads OpenCLIP's penultimate block: its diffusers folder expresses this by
    storing only 23 of the 24 blocks (num_hidden_layers 23), so it too loads with clip_skip=0."""
    _require(config, "text encoder", TEXT_SUPPORTED)
    return TextEncoderConfig(
        vocab_size=config.get("vocab_size", 49408), max_length=config.get("max_position_embeddings", 77),
        width=config.get("hidden_size", 512), layers=config.get("num_hidden_layers", 12), heads=config.get("num_attention_heads", 8),
        causal=True, feed_forward=config.get("hidden_act", "quick_gelu"),
        ff_dim=config.get("intermediate_size", 2048), qkv_bias=True,
        norm_eps=config.get("layer_norm_eps", 1e-5), clip_skip=clip_skip,
    )


# --- loading a component folder -----------------------------------------------------------------

def read_component(folder, variant: str | None = None) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """A diffusers component folder → (its config.json as a dict, its tensors, the weights file).
    variant: read e.g. 'diffusion_pytorch_model.fp16.safetensors' (variant='fp16') instead."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MinisdError(f"{str(folder)!r} is not a folder; pass a model folder such as '…/unet'")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise MinisdError(f"{config_file} not found; {str(folder)!r} is not a diffusers model folder "
                          f"(config.json + {' or '.join(WEIGHT_FILES)})")
    config = read_json_object(config_file)
    names = [name.replace(".safetensors", f".{variant}.safetensors") if variant else name for name in WEIGHT_FILES]
    weights = next((folder / name for name in names if (folder / name).is_file()), None)
    if weights is None:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.ckpt"))
        hint = (f"; found only {', '.join(pickles)}, a pickle, which minisd does not load because loading it "
                f"can run code — convert it to safetensors first") if pickles else ""
        raise MinisdError(f"no weights in {str(folder)!r}: expected {' or '.join(names)}{hint}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MinisdError(f"{weights} could not be read ({message}); the file may be truncated or corrupt") from None
    return config, tensors, weights


def _check_dtype(dtype) -> None:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise MinisdError(f"dtype must be a floating-point torch.dtype such as torch.float16, got {dtype!r}")


def _build(cls, config, tensors, rules, weights: Path, dtype, device, ignored=()):
    with torch.device("meta"):  # no memory and no random init for weights that are about to be replaced
        model = cls(config)
    state = convert_state_dict(tensors, rules, model, str(weights), ignored)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers())), "every tensor must be loaded"
    return model.eval()


def load_unet(folder, dtype: torch.dtype = torch.float32, device="cpu", variant: str | None = None) -> UNet:
    """A diffusers `UNet2DConditionModel` folder (e.g. '…/stable-diffusion-v1-5/unet') → minisd `UNet`."""
    _check_dtype(dtype)
    raw, tensors, weights = read_component(folder, variant)
    return _build(UNet, unet_config_from_diffusers(raw), tensors, UNET_RULES, weights, dtype, device)


def load_vae(folder, dtype: torch.dtype = torch.float32, device="cpu", variant: str | None = None) -> VAE:
    """A diffusers `AutoencoderKL` folder (e.g. '…/stable-diffusion-v1-5/vae') → minisd `VAE`,
    with config.scale_factor = the folder's scaling_factor (0.18215 for SD 1.x and 2.x)."""
    _check_dtype(dtype)
    raw, tensors, weights = read_component(folder, variant)
    config = vae_config_from_diffusers(raw)
    return _build(VAE, config, tensors, vae_rules(config), weights, dtype, device)


def load_text_encoder(folder, dtype: torch.dtype = torch.float32, device="cpu", clip_skip: int = 0,
                      variant: str | None = None) -> TextEncoder:
    """A transformers `CLIPTextModel` folder (e.g. '…/stable-diffusion-v1-5/text_encoder') → minisd
    `TextEncoder`. clip_skip: see `TextEncoderConfig` (0 for both SD 1.x and SD 2.x folders)."""
    _check_dtype(dtype)
    raw, tensors, weights = read_component(folder, variant)
    config = text_encoder_config_from_transformers(raw, clip_skip)
    tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    return _build(TextEncoder, config, tensors, TEXT_RULES, weights, dtype, device, TEXT_IGNORED)


# --- a whole Stable Diffusion folder -------------------------------------------------------------

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
BETA_SCHEDULE_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
SCHEDULER_SUPPORTED = {  # scheduler_config.json options with the only values minisd implements
    "trained_betas": [None], "thresholding": [False], "rescale_betas_zero_snr": [False],
    "timestep_spacing": ["leading"], "prediction_type": ["epsilon", "v_prediction", "sample"],
}


def schedule_from_diffusers(config: dict) -> tuple[NoiseSchedule, dict]:
    """A diffusers `scheduler_config.json` (as a dict) → (the `NoiseSchedule`, the pipeline options
    it sets: prediction_type, steps_offset, set_alpha_to_one). The scheduler class it names is
    not used (SD 1.5's is PNDM): minisd samples with its own samplers, chosen by name, on this
    schedule and with these settings.

    steps_offset is 1 whatever the file says: diffusers' `StableDiffusionPipeline` replaces any
    other value as an outdated config, and all SD folders have 1. set_alpha_to_one is read (SD's
    configs say False; a missing key means DDIM's default, True). clip_sample is ignored, as the
    pipeline turns it off too."""
    for key, values in SCHEDULER_SUPPORTED.items():
        value = config.get(key, values[0])
        if value not in values:
            raise MinisdError(f"this scheduler has {key}={value!r}, which minisd does not implement; "
                              f"supported: {', '.join(repr(v) for v in values)}")
    name = config.get("beta_schedule", "linear")
    if name not in BETA_SCHEDULE_NAMES:
        raise MinisdError(f"this scheduler has beta_schedule={name!r}, which minisd does not implement; "
                          f"supported: {', '.join(map(repr, BETA_SCHEDULE_NAMES))}")
    schedule = NoiseSchedule(config.get("num_train_timesteps", 1000), BETA_SCHEDULE_NAMES[name],
                             config.get("beta_start", 0.0001), config.get("beta_end", 0.02))
    options = {"prediction_type": config.get("prediction_type", "epsilon"), "steps_offset": 1,
               "set_alpha_to_one": bool(config.get("set_alpha_to_one", True))}
    return schedule, options


def load_stable_diffusion(folder, dtype: torch.dtype = torch.float32, device="cpu", variant: str | None = None):
    """A diffusers-format Stable Diffusion 1.x/2.x folder (model_index.json, unet/, vae/,
    text_encoder/, tokenizer/, scheduler/) → minisd's `StableDiffusion`, set up to compute what
    diffusers' `StableDiffusionPipeline` computes: the folder's noise schedule and prediction
    type, SD's DDIM timesteps (see `schedule_from_diffusers`), the U-Net reading every context
    position (mask_padding=False), images of side unet sample_size × the VAE's down-sampling.
    Usually reached through `StableDiffusion.from_pretrained(folder)`."""
    from minisd.pipeline import StableDiffusion
    from minisd.tokenizer import BPETokenizer

    folder = Path(folder)
    index = read_json_object(folder / "model_index.json")
    kind = index.get("_class_name")
    if kind != "StableDiffusionPipeline":
        raise MinisdError(f"{folder / 'model_index.json'} describes a {kind!r}; minisd loads "
                          f"'StableDiffusionPipeline' folders (Stable Diffusion 1.x and 2.x, text to image)")
    unlisted = [name for name in SD_COMPONENTS if not index.get(name)]
    absent = [f"{name}/" for name in SD_COMPONENTS if not (folder / name).is_dir()]
    if unlisted or absent:
        parts = ([f"model_index.json lists no {', '.join(unlisted)}"] if unlisted else []) + \
                ([f"the folder has no {', '.join(absent)}"] if absent else [])
        raise MinisdError(f"{str(folder)!r} is not a complete Stable Diffusion folder: {'; '.join(parts)}")
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        raise MinisdError(f"{folder / 'scheduler' / 'scheduler_config.json'} not found")
    schedule, options = schedule_from_diffusers(read_json_object(folder / "scheduler" / "scheduler_config.json"))
    unet = load_unet(folder / "unet", dtype, device, variant)
    vae = load_vae(folder / "vae", dtype, device, variant)
    text_encoder = load_text_encoder(folder / "text_encoder", dtype, device, variant=variant)
    tokenizer = BPETokenizer.from_folder(folder / "tokenizer")
    sample_size = read_json_object(folder / "unet" / "config.json").get("sample_size")
    if not isinstance(sample_size, int):
        raise MinisdError(f"{folder / 'unet' / 'config.json'} gives no integer sample_size (the latent side), "
                          f"got {sample_size!r}")
    image_size = sample_size * vae.config.downsampling_factor
    return StableDiffusion(vae, text_encoder, tokenizer, unet, schedule, image_size, mask_padding=False, **options)
