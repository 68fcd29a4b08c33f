"""Stable Diffusion's weights in minisd's own classes: tiny random diffusers/transformers models,
saved by their own save_pretrained, loaded by minisd.convert, must compute the same numbers."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from minisd import MinisdError
from minisd.clip import TextEncoder, TextEncoderConfig
from minisd.convert import (
    TEXT_IGNORED,
    TEXT_RULES,
    UNET_RULES,
    convert_state_dict,
    load_text_encoder,
    load_unet,
    load_vae,
    rename,
    text_encoder_config_from_transformers,
    unet_config_from_diffusers,
    vae_config_from_diffusers,
    vae_rules,
)
from minisd.unet import UNet, UNetConfig
from minisd.vae import VAE, VAEConfig

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


UNET_CONFIGS = {
    # SD 1.x's layout: conv projections, the same number of heads everywhere, 2 blocks per level
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=24,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4),
    # SD 2.x's: linear projections and heads per level (the middle block uses the last level's 8)
    "sd2": dict(block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=24,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=(2, 4, 8), use_linear_projection=True, upcast_attention=True),
}
VAE_CONFIGS = {
    "sd": dict(block_out_channels=(32, 64), layers_per_block=2, latent_channels=4),
    "three-levels": dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=3),
}
TEXT_CONFIGS = {
    "quick_gelu": dict(hidden_act="quick_gelu", intermediate_size=48),  # OpenAI CLIP (SD 1.x)
    "gelu": dict(hidden_act="gelu", intermediate_size=128),  # OpenCLIP (SD 2.x)
}


@torch.no_grad()
def randomise(model, seed):
    """Add noise to every weight, so zero or one initialisations cannot hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        scale = p[0].numel() ** -0.5 if p.ndim > 1 else 0.1
        p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def unet_reference(name):
    torch.manual_seed(0)
    config = dict(sample_size=16, in_channels=4, out_channels=4, norm_num_groups=8, **UNET_CONFIGS[name])
    return randomise(diffusers.UNet2DConditionModel(**config), 1)


def vae_reference(name):
    torch.manual_seed(0)
    n = len(VAE_CONFIGS[name]["block_out_channels"])
    return randomise(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, norm_num_groups=8, sample_size=16, **VAE_CONFIGS[name]), 2)


def text_reference(name):
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                         max_position_embeddings=16, **TEXT_CONFIGS[name])
    return randomise(transformers.CLIPTextModel(config), 3)


@pytest.fixture(scope="module")
def sd1_unet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    ref = unet_reference("sd1")
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


@pytest.mark.parametrize("name", UNET_CONFIGS)
def test_unet_computes_what_diffusers_computes(name, tmp_path):
    ref = unet_reference(name)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_unet(tmp_path)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 24, generator=g)
    t = torch.tensor([10, 987])
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
    err = (got - expected).abs().max().item()
    print(f"U-Net {name}: max abs error {err:.2e} (output std {expected.std():.2f})")
    assert err <= TOL
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("name", VAE_CONFIGS)
def test_vae_encodes_and_decodes_as_diffusers_does(name, tmp_path):
    ref = vae_reference(name)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_vae(tmp_path)
    assert ours.config.scale_factor == ref.config.scaling_factor == 0.18215
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        expected, got = ref.encode(x).latent_dist, ours.encode(x)
        z = expected.mean
        decoded = ref.decode(z).sample
        errs = {"mean": (got.mean - expected.mean).abs().max().item(),
                "logvar": (got.logvar - expected.logvar).abs().max().item(),
                "decode": (ours.decode(z) - decoded).abs().max().item()}
    print(f"VAE {name}: max abs errors {errs}")
    assert max(errs.values()) <= TOL, errs


@pytest.mark.parametrize("name", TEXT_CONFIGS)
def test_text_encoder_states_equal_transformers(name, tmp_path):
    ref = text_reference(name)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        last = (load_text_encoder(tmp_path)(ids, mask).last_hidden_state - out.last_hidden_state).abs().max().item()
        # diffusers' clip_skip=1: the penultimate block's states through the final LayerNorm
        penultimate = getattr(ref, "text_model", ref).final_layer_norm(out.hidden_states[-2])  # transformers 5: no text_model
        skip = (load_text_encoder(tmp_path, clip_skip=1)(ids, mask).last_hidden_state - penultimate).abs().max().item()
    print(f"text encoder {name}: max abs error {last:.2e} (last), {skip:.2e} (penultimate)")
    assert last <= TOL and skip <= TOL


def test_float16_loading_gives_float16_weights_that_compute_nearly_the_same(sd1_unet):
    ref, folder = sd1_unet
    half = load_unet(folder, dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    full = load_unet(folder)
    g = torch.Generator().manual_seed(0)
    x, context, t = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 7, 24, generator=g), torch.tensor([500])
    with torch.no_grad():
        a, b = full(x, t, context), half(x.half(), t, context.half())
    assert b.dtype == torch.float16
    assert (a - b.float()).abs().max() < 0.05 * a.abs().max()
    with pytest.raises(MinisdError, match="dtype"):
        load_unet(folder, dtype=torch.int8)


def test_every_part_loads_in_float16(tmp_path):
    vae_reference("three-levels").save_pretrained(tmp_path / "vae", safe_serialization=True)
    text_reference("gelu").save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
    vae = load_vae(tmp_path / "vae", dtype=torch.float16)
    text_encoder = load_text_encoder(tmp_path / "text_encoder", dtype=torch.bfloat16)
    assert {p.dtype for p in vae.parameters()} == {torch.float16}
    assert {p.dtype for p in text_encoder.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert vae.decode(torch.randn(1, 3, 4, 4, dtype=torch.float16)).dtype == torch.float16


def test_converted_models_save_and_load_as_minisd_models(tmp_path):
    unet_reference("sd2").save_pretrained(tmp_path / "diffusers", safe_serialization=True)
    unet = load_unet(tmp_path / "diffusers")
    assert unet.config.heads == (2, 4, 8) and unet.config.projection == "linear"
    unet.save_pretrained(tmp_path / "minisd")
    again = UNet.from_pretrained(tmp_path / "minisd")
    assert again.config == unet.config
    x, t, context = torch.randn(1, 4, 16, 16), torch.tensor([3]), torch.randn(1, 5, 24)
    with torch.no_grad():
        assert torch.equal(again(x, t, context), unet(x, t, context))


def test_key_table_reads_like_the_names_it_maps():
    assert rename("down_blocks.1.resnets.0.conv1.weight", UNET_RULES) == "down.1.res.0.conv1.weight"
    assert rename("up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_out.0.bias", UNET_RULES) == \
        "up.2.attn.1.block.attn2.to_out.bias"
    assert rename("mid_block.resnets.1.time_emb_proj.weight", UNET_RULES) == "mid2.time.weight"
    assert rename("conv_in.weight", UNET_RULES) == "conv_in.weight"
    vae = vae_rules(vae_config_from_diffusers({"block_out_channels": [32, 64], "layers_per_block": 2}))
    assert rename("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", vae) == "encoder.body.3.shortcut.weight"
    assert rename("decoder.up_blocks.0.upsamplers.0.conv.bias", vae) == "decoder.body.7.bias"
    # the middle attention under its current names and under those of older diffusers files
    assert rename("encoder.mid_block.attentions.0.to_out.0.weight", vae) == "encoder.body.6.attn.to_out.weight"
    assert rename("encoder.mid_block.attentions.0.proj_attn.weight", vae) == "encoder.body.6.attn.to_out.weight"


def _copy_with(folder, dest, change):
    import shutil

    shutil.copytree(folder, dest)
    weights = dest / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    change(tensors)
    save_file(tensors, str(weights))
    return dest


def test_every_tensor_must_be_accounted_for(sd1_unet, tmp_path):
    _, folder = sd1_unet
    missing = _copy_with(folder, tmp_path / "missing", lambda t: t.pop("down_blocks.0.resnets.1.conv2.bias"))
    with pytest.raises(MinisdError, match=r"lacks 1 tensor.*down\.0\.res\.1\.conv2\.bias"):
        load_unet(missing)
    extra = _copy_with(folder, tmp_path / "extra", lambda t: t.update({"add_embedding.linear_1.weight": torch.zeros(2)}))
    with pytest.raises(MinisdError, match=r"1 tensor\(s\) that this UNet has no place for: add_embedding"):
        load_unet(extra)
    wrong = _copy_with(folder, tmp_path / "wrong", lambda t: t.update({"conv_in.weight": torch.zeros(32, 4, 1, 1)}))
    with pytest.raises(MinisdError, match=r"wrong shape: conv_in\.weight \(32, 4, 1, 1\) \(expected \(32, 4, 3, 3\)\)"):
        load_unet(wrong)


def test_broken_files_and_folders_get_one_line_errors(sd1_unet, tmp_path):
    import shutil

    _, folder = sd1_unet
    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    weights = truncated / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(MinisdError, match="truncated or corrupt") as e:
        load_unet(truncated)
    assert "\n" not in str(e.value)

    (tmp_path / "empty").mkdir()
    with pytest.raises(MinisdError, match="not a diffusers model folder"):
        load_unet(tmp_path / "empty")
    with pytest.raises(MinisdError, match="is not a folder"):
        load_vae(tmp_path / "nowhere")
    with pytest.raises(MinisdError, match="describes a 'UNet2DConditionModel', not a VAE"):
        load_vae(folder)
    with pytest.raises(MinisdError, match="no weights.*diffusion_pytorch_model.fp16.safetensors"):
        load_unet(folder, variant="fp16")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(MinisdError, match="pickle"):
        load_text_encoder(pickled)
    (pickled / "config.json").write_text("{not json")
    with pytest.raises(MinisdError, match="not valid JSON"):
        load_text_encoder(pickled)


def test_options_minisd_does_not_implement_are_refused():
    with pytest.raises(MinisdError, match="transformer_layers_per_block=2"):
        unet_config_from_diffusers({"transformer_layers_per_block": 2})
    with pytest.raises(MinisdError, match="class_embed_type='timestep'.*supported: None"):
        unet_config_from_diffusers({"class_embed_type": "timestep"})
    with pytest.raises(MinisdError, match="do not mirror"):
        unet_config_from_diffusers({"block_out_channels": [32, 64],
                                    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                                    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]})


# The real configurations (from the config.json files of the SD 1.5 and SD 2.1 diffusers folders),
# checked on the meta device: full size, no memory, no weights.
SD1_UNET = dict(_class_name="UNet2DConditionModel", act_fn="silu", attention_head_dim=8,
                block_out_channels=[320, 640, 1280, 1280], center_input_sample=False, cross_attention_dim=768,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
                flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
                norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SD2_UNET = dict(SD1_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                upcast_attention=True, dual_cross_attention=False, num_class_embeds=None, only_cross_attention=False,
                resnet_time_scale_shift="default", sample_size=96)
SD_VAE = dict(_class_name="AutoencoderKL", act_fn="silu", block_out_channels=[128, 256, 512, 512],
              down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3, latent_channels=4, layers_per_block=2,
              norm_num_groups=32, out_channels=3, sample_size=512, up_block_types=["UpDecoderBlock2D"] * 4)
SD1_TEXT = dict(hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, vocab_size=49408)  # OpenAI CLIP ViT-L/14
SD2_TEXT = dict(hidden_act="gelu", hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                num_attention_heads=16, max_position_embeddings=77, vocab_size=49408)  # OpenCLIP ViT-H, 23 of 24 blocks


@pytest.mark.parametrize("part, config, millions", [
    ("unet", SD1_UNET, 859.52), ("unet", SD2_UNET, 865.91), ("vae", SD_VAE, 83.65),
    ("text", SD1_TEXT, 123.06), ("text", SD2_TEXT, 340.39)])
def test_stable_diffusion_sized_models_map_every_tensor(part, config, millions):
    kwargs = {k: v for k, v in config.items() if k != "_class_name"}
    with torch.device("meta"):
        if part == "unet":
            ref, ours = diffusers.UNet2DConditionModel(**kwargs), UNet(unet_config_from_diffusers(config))
            rules = UNET_RULES
        elif part == "vae":
            vae_config = vae_config_from_diffusers(config)
            ref, ours, rules = diffusers.AutoencoderKL(**kwargs), VAE(vae_config), vae_rules(vae_config)
        else:
            ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
            ours, rules = TextEncoder(text_encoder_config_from_transformers(config)), TEXT_RULES
    state = {k.removeprefix("text_model."): v for k, v in ref.state_dict().items()}
    converted = convert_state_dict(state, rules, ours, ignored=TEXT_IGNORED)
    assert len(converted) == len(ours.state_dict())
    assert round(sum(t.numel() for t in converted.values()) / 1e6, 2) == millions


@pytest.mark.parametrize("make, message", [
    (lambda: UNetConfig(heads=(2, 2)), r"heads \(2, 2\) must give one count per level \(3 levels\)"),
    (lambda: UNetConfig(projection="dense"), "unknown projection 'dense'; allowed: 'conv', 'linear'"),
    (lambda: VAEConfig(middle="attn"), "unknown middle 'attn'; allowed: 'res', 'res-attn-res'"),
    (lambda: VAEConfig(downsample_padding="before"), "unknown downsample_padding 'before'"),
    (lambda: VAEConfig(decoder_blocks_per_level=0), "decoder_blocks_per_level must be ≥ 1 or None, got 0"),
    (lambda: TextEncoderConfig(feed_forward="relu"), "unknown feed_forward 'relu'; allowed: 'geglu', 'gelu'"),
    (lambda: TextEncoderConfig(layers=2, clip_skip=2), "clip_skip 2 is not allowed with 2 layers; use 0 … 1"),
])
def test_stable_diffusion_options_refuse_bad_values(make, message):
    with pytest.raises(MinisdError, match=message):
        make()
