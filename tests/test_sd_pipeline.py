"""A whole diffusers-format Stable Diffusion folder through minisd's `StableDiffusion`: a tiny random
`StableDiffusionPipeline`, saved by diffusers' own save_pretrained and loaded by minisd, must draw
the same images from the same starting latents, with and without a negative prompt."""

import json
import shutil

import numpy as np
import pytest
import torch
from test_convert import randomise  # the same noise on every weight

from minisd import MinisdError
from minisd.cli import main
from minisd.pipeline import StableDiffusion
from minisd.tokenizer import BPE_END, BPE_START, BPETokenizer, byte_alphabet

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TOL = 1e-3
PROMPTS = ["a red cat", "a dog on a mat"]
NEGATIVE = ["a blurry dog", "red"]
MERGES = [("c", "a"), ("ca", "t</w>"), ("r", "e"), ("re", "d</w>"), ("d", "o"), ("do", "g</w>")]

# Two Stable Diffusion layouts at toy widths (32×32 images, 16×16 latents, 77-token prompts):
CONFIGS = {
    # SD 1.x: conv projections, the same heads everywhere, OpenAI CLIP (quick_gelu), padding with
    # <|endoftext|>, ε-prediction
    "sd1": dict(unet=dict(block_out_channels=(32, 64), layers_per_block=2,
                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4),
                hidden_act="quick_gelu", pad_token=None, prediction_type="epsilon"),
    # SD 2.x: linear projections, heads per level, OpenCLIP (gelu), padding with "!" (id 0), v-prediction
    "sd2": dict(unet=dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                          down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                          attention_head_dim=(2, 4, 8), use_linear_projection=True, upcast_attention=True),
                hidden_act="gelu", pad_token="!", prediction_type="v_prediction"),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_tokenizer(folder, pad_token):
    """A CLIP tokenizer with CLIP's byte alphabet, six merges ("cat", "red", "dog") and the two
    special tokens: 520 tokens, written as vocab.json and merges.txt and read by transformers."""
    alphabet = list(byte_alphabet().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in MERGES] + [BPE_START, BPE_END]
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in MERGES) + "\n")
    extra = {} if pad_token is None else {"pad_token": pad_token}
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                      model_max_length=77, **extra), len(tokens)


def reference_pipeline(name, tmp_path):
    config = CONFIGS[name]
    tokenizer, vocab_size = tiny_tokenizer(tmp_path / "vocab", config["pad_token"])
    torch.manual_seed(0)
    unet = randomise(diffusers.UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, norm_num_groups=8,
                                                    cross_attention_dim=32, **config["unet"]), 1)
    vae = randomise(diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                            down_block_types=("DownEncoderBlock2D",) * 2,
                                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                            latent_channels=4, norm_num_groups=8, sample_size=32), 2)
    text_encoder = randomise(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=77, hidden_act=config["hidden_act"], bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1)), 3)
    # Stable Diffusion's scheduler_config.json
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        prediction_type=config["prediction_type"])
    return diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(diffusers' pipeline, the folder it saved, minisd's StableDiffusion loaded from that folder)."""
    tmp_path = tmp_path_factory.mktemp(request.param)
    ref = reference_pipeline(request.param, tmp_path)
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(tmp_path / "model", safe_serialization=True)
    return ref, tmp_path / "model", StableDiffusion.from_pretrained(tmp_path / "model")


def test_the_folder_loads_with_stable_diffusions_settings(pair):
    ref, _, sd = pair
    assert sd.image_size == 32 and sd.latent_shape == (4, 16, 16)
    assert sd.prediction_type == ref.scheduler.config.prediction_type
    assert (sd.mask_padding, sd.steps_offset, sd.set_alpha_to_one) == (False, 1, False)
    assert sd.vae.config.scale_factor == ref.vae.config.scaling_factor
    torch.testing.assert_close(sd.schedule.alphas_cumprod, ref.scheduler.alphas_cumprod)
    assert isinstance(sd.tokenizer, BPETokenizer)
    ids, _ = sd.tokenizer(PROMPTS + [""])
    expected = ref.tokenizer(PROMPTS + [""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, expected)  # SD 1.x pads with <|endoftext|>, SD 2.x with "!"


@torch.no_grad()
def test_images_equal_diffusers_with_and_without_a_negative_prompt(pair):
    ref, _, sd = pair
    latents = torch.randn(len(PROMPTS), *sd.latent_shape, generator=torch.Generator().manual_seed(0))
    for negative in (None, NEGATIVE):
        expected = ref(PROMPTS, negative_prompt=negative, num_inference_steps=10, guidance_scale=7.5,
                       latents=latents.clone(), output_type="pt").images
        got = sd(PROMPTS, negative_prompt=negative, num_inference_steps=10, guidance_scale=7.5, latents=latents)
        assert got.images.shape == expected.shape and 0 <= expected.min() and expected.max() <= 1  # both in [0, 1]
        assert 0.2 < ((expected > 0) & (expected < 1)).float().mean()  # not all clamped: the test can see errors
        err = (got.images - expected).abs().max().item()
        print(f"{sd.prediction_type}, negative prompt {negative}: max abs difference {err:.2e}")
        assert err <= TOL
    # the negative prompt matters, and "" is the default
    assert not torch.allclose(got.images, sd(PROMPTS, num_inference_steps=10, guidance_scale=7.5,
                                             latents=latents).images, atol=1e-3)


def test_an_empty_negative_prompt_is_the_default_and_a_wrong_count_is_refused(pair):
    _, _, sd = pair
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, seed=1)
    default = sd(PROMPTS, **kwargs).images
    assert torch.equal(sd(PROMPTS, negative_prompt="", **kwargs).images, default)
    assert torch.equal(sd(PROMPTS, negative_prompt=["", ""], **kwargs).images, default)
    with pytest.raises(MinisdError, match="3 negative prompts for 2 prompts"):
        sd(PROMPTS, negative_prompt=["a", "b", "c"], **kwargs)
    with pytest.raises(MinisdError, match="every prompt must be a string"):
        sd(PROMPTS, negative_prompt=["a", 3], **kwargs)


def test_incomplete_or_other_folders_are_refused_with_one_line(pair, tmp_path, capsys):
    _, folder, _ = pair
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(MinisdError, match=r"not a complete Stable Diffusion folder: the folder has no text_encoder/"):
        StableDiffusion.from_pretrained(broken)
    assert main(["sample", "--run", str(broken), "--prompt", "a cat", "--out", str(tmp_path / "grid.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "text_encoder/" in err

    index = json.loads((folder / "model_index.json").read_text())
    index.pop("scheduler")
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(MinisdError, match="model_index.json lists no scheduler; the folder has no text_encoder/"):
        StableDiffusion.from_pretrained(broken)
    (broken / "model_index.json").write_text(json.dumps(dict(index, _class_name="StableDiffusionXLPipeline")))
    with pytest.raises(MinisdError, match="describes a 'StableDiffusionXLPipeline'"):
        StableDiffusion.from_pretrained(broken)

    shutil.rmtree(broken)
    shutil.copytree(folder, broken)
    config_file = broken / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(dict(config, timestep_spacing="trailing")))
    with pytest.raises(MinisdError, match="timestep_spacing='trailing'.*supported: 'leading'"):
        StableDiffusion.from_pretrained(broken)
    config_file.write_text(json.dumps(dict(config, beta_schedule="sigmoid")))
    with pytest.raises(MinisdError, match="beta_schedule='sigmoid'"):
        StableDiffusion.from_pretrained(broken)


def test_the_folder_samples_from_the_command_line(pair, tmp_path, capsys):
    _, folder, _ = pair
    out = tmp_path / "grid.png"
    assert main(["sample", "--run", str(folder), "--prompt", "a red cat", "-n", "2", "--steps", "2",
                 "--out", str(out)]) == 0
    assert out.is_file() and "2 images of 32×32" in capsys.readouterr().out


def test_a_diffusers_folder_loads_in_bfloat16(pair):
    _, folder, _ = pair
    sd = StableDiffusion.from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters()} == {torch.bfloat16}
    images = sd("a red cat", num_inference_steps=2).images
    assert images.dtype == torch.float32 and images.shape == (1, 3, 32, 32)


def test_a_tokenizer_folder_gives_its_pad_token_and_length(tmp_path):
    """A hub folder's files (vocab.json, merges.txt, special_tokens_map.json with the pad token as
    an AddedToken, tokenizer_config.json) read as transformers reads them."""
    ref, _ = tiny_tokenizer(tmp_path / "tok", "!")
    (tmp_path / "tok" / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 20, "pad_token": "x"}))
    ours = BPETokenizer.from_folder(tmp_path / "tok")
    assert (ours.pad_id, ours.max_length) == (0, 20)
    ids, mask = ours(PROMPTS)
    expected = ref(PROMPTS, padding="max_length", max_length=20, return_tensors="pt").input_ids
    assert torch.equal(ids, expected) and mask.sum(1).tolist() == [5, 10]
    (tmp_path / "tok" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(MinisdError, match="pad token '<pad>' is not in the vocabulary"):
        BPETokenizer.from_folder(tmp_path / "tok")


@torch.no_grad()
def test_a_trajectory_of_a_loaded_folder_names_its_bpe_tokens_and_matches_the_pipeline(pair):
    from minisd.trajectory import record_trajectory

    _, _, sd = pair
    traj = record_trajectory(sd, "a red cat", seed=2, num_inference_steps=3, guidance_scale=7.5)
    # one name per position the U-Net reads; SD reads the 72 padding positions too: one summed map
    assert traj.tokens == [BPE_START, "a", "red", "cat", BPE_END, "(72 padding)"]
    assert traj.attention_map(2).shape == (6, 16, 16)
    for a in traj.attention.values():  # each pixel's attention sums to 1 over the entries
        torch.testing.assert_close(a.sum(1), torch.ones(a.shape[0], *a.shape[2:]), atol=1e-5, rtol=0)
    assert traj.attention_map(2)[-1].mean() > 0.05  # the padding's share is not negligible here
    expected = sd("a red cat", num_inference_steps=3, guidance_scale=7.5, seed=2).images
    assert (traj.images[-1:] - expected).abs().max() < 1e-4


@torch.no_grad()
def test_continuing_from_the_start_uses_the_models_sampler_settings(pair):
    """continue_from from step 0 with deterministic DDIM is the whole run of sd(...): the folder's
    prediction type, steps_offset 1, set_alpha_to_one False and no padding mask, as diffusers."""
    from minisd.trajectory import continue_from

    ref, _, sd = pair
    latents = torch.randn(2, *sd.latent_shape, generator=torch.Generator().manual_seed(3))
    got = continue_from(sd, latents, 0, PROMPTS, num_inference_steps=4, guidance_scale=7.5, sampler="ddim")
    expected = ref(PROMPTS, num_inference_steps=4, guidance_scale=7.5, latents=latents.clone(), output_type="pt").images
    assert (got.images - expected).abs().max() <= TOL


def test_a_tokenizer_saved_as_a_folder_reads_back_in_minisd_and_transformers(pair, tmp_path):
    ref, _, sd = pair
    sd.tokenizer.save(tmp_path / "tok")
    again = BPETokenizer.from_folder(tmp_path / "tok")
    theirs = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tok")
    # transformers 5 differs from CLIP on two inputs, left out here: it keeps "&amp;" (CLIP unescapes it), and
    # with SD 2's pad token "!" it reads a final "!" as that special token (id 0; CLIP: "!</w>", id 256)
    texts = PROMPTS + NEGATIVE + ["", "Ünïcode 🙂 1234, cats?"]
    expected = ref.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(again(texts)[0], expected)
    assert torch.equal(theirs(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids, expected)
    assert (again.pad_token, again.max_length, again.merges) == (sd.tokenizer.pad_token, 77, sd.tokenizer.merges)


@torch.no_grad()
def test_a_stable_diffusion_folder_exports_to_a_run_folder_that_samples_the_same(pair, tmp_path, capsys):
    """`minisd export` turns a diffusers folder into minisd's run format: in float32 the same
    images to the bit, with SD's settings kept; in float16 half the bytes and nearly the same."""
    _, folder, sd = pair
    kwargs = dict(num_inference_steps=4, guidance_scale=7.5, seed=5, negative_prompt=NEGATIVE)
    expected = sd(PROMPTS, **kwargs).images
    out = tmp_path / "exported"
    assert main(["export", "--run", str(folder), "--out", str(out), "--dtype", "float32"]) == 0
    assert f"minisd sample --run {out}" in capsys.readouterr().out
    assert (out / "tokenizer" / "vocab.json").is_file() and not (out / "model_index.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["exported"] == {"from": str(folder), "dtype": "float32", "format": "diffusers Stable Diffusion folder"}
    run = StableDiffusion.from_pretrained(out)
    assert isinstance(run.tokenizer, BPETokenizer)
    for key in ("prediction_type", "mask_padding", "steps_offset", "set_alpha_to_one", "image_size"):
        assert getattr(run, key) == getattr(sd, key), key
    assert torch.equal(run(PROMPTS, **kwargs).images, expected)

    half = tmp_path / "half"
    assert main(["export", "--run", str(folder), "--out", str(half)]) == 0
    weights = {p: p.stat().st_size for p in (out / "unet" / "model.safetensors", half / "unet" / "model.safetensors")}
    assert 0.45 < weights[half / "unet" / "model.safetensors"] / weights[out / "unet" / "model.safetensors"] < 0.55
    err = (StableDiffusion.from_pretrained(half)(PROMPTS, **kwargs).images - expected).abs().max().item()
    assert 0 < err < 0.05, err


def test_a_broken_stable_diffusion_folder_is_not_exported(pair, tmp_path, capsys):
    _, folder, _ = pair
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    out = tmp_path / "out"
    assert main(["export", "--run", str(broken), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "diffusion_pytorch_model.safetensors" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # nothing left behind


@pytest.fixture(scope="module")
def sd_512(tmp_path_factory):
    """A tiny random SD 1.x-format model at Stable Diffusion's real sizes: 512×512 images, a VAE
    that down-samples 8 times, 64×64 latents, 77-token prompts — saved by diffusers, loaded by minisd."""
    tmp = tmp_path_factory.mktemp("sd512")
    tokenizer, vocab_size = tiny_tokenizer(tmp / "vocab", None)
    torch.manual_seed(0)
    unet = randomise(diffusers.UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, norm_num_groups=8, cross_attention_dim=32,
        block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")), 1)
    vae = randomise(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=512), 2)
    text_encoder = randomise(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1)), 3)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                      scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(tmp / "model")
    return StableDiffusion.from_pretrained(tmp / "model")


@torch.no_grad()
def test_the_explorer_runs_at_stable_diffusions_sizes(sd_512, tmp_path):
    """The chapter-8 explorer on 64×64 latents and 77-token prompts: a prompt of more than 75
    tokens is cut (and the explorer says so), every one of the 77 positions gets a map, and each
    pixel's attention sums to 1 over them; a short prompt adds the padding's summed map."""
    from minisd.trajectory import MEAN_LAYER
    from minisd.widgets import denoising_explorer

    sd = sd_512
    assert (sd.image_size, sd.latent_shape, sd.tokenizer.max_length) == (512, (4, 64, 64), 77)
    long_prompt = " ".join(["a red cat"] * 30)  # 90 tokens
    with pytest.warns(UserWarning, match="cut to 75"):
        explorer = denoising_explorer(sd, long_prompt, steps=2, guidance=7.5)
    assert "cut to its first 75 tokens (it has 90)" in explorer.message.value
    traj = explorer.trajectories[0]
    assert len(traj.tokens) == 77 and traj.tokens[0] == BPE_START and traj.tokens[-1] == BPE_END
    assert traj.images.shape == (3, 3, 512, 512)
    assert list(explorer.layer.options) == [MEAN_LAYER, "down 64x64", "down 32x32", "mid 32x32", "up 32x32 #1",
                                            "up 32x32 #2", "up 64x64 #1", "up 64x64 #2"]
    maps = traj.attention_map(1)
    assert maps.shape == (77, 64, 64)
    torch.testing.assert_close(maps.sum(0), torch.ones(64, 64), atol=1e-5, rtol=0)
    assert explorer.frame.dtype == np.uint8 and explorer.frame.shape[1] >= 900  # 77 panels, in rows

    explorer.prompt.value = "a dog"  # runs again
    traj = explorer.trajectories[0]
    assert traj.tokens == [BPE_START, "a", "dog", BPE_END, "(73 padding)"] and explorer.message.value == ""
    for layer in explorer.layer.options:
        explorer.layer.value = layer  # each layer draws
        assert "could not draw" not in explorer.message.value
    torch.testing.assert_close(traj.attention_map(0).sum(0), torch.ones(64, 64), atol=1e-5, rtol=0)
    expected = sd("a dog", num_inference_steps=2, guidance_scale=7.5, seed=0).images
    assert (traj.images[-1:] - expected).abs().max() < 1e-4  # the run shown is the pipeline's run
    explorer.export_name.value = str(tmp_path / "run.gif")
    assert explorer.export() is not None and (tmp_path / "run.gif").stat().st_size > 0
