"""The `gpu` preset: 64×64 Shapes and larger models. Training it needs a GPU; here every component
is built from the preset and one batch goes through the whole model, so the sizes fit together."""

import dataclasses

import torch

from minisd.clip import CLIP, clip_presets
from minisd.data import Shapes, normalize
from minisd.pipeline import StableDiffusion, unet_presets
from minisd.tokenizer import shapes_tokenizer
from minisd.train import IMAGE_SIZES
from minisd.unet import UNet
from minisd.vae import VAE, VAE_PRESETS, vae_loss


def test_the_gpu_preset_builds_a_64_pixel_model_whose_parts_fit_together():
    size = IMAGE_SIZES["gpu"]
    assert size == 64 and IMAGE_SIZES["cpu"] == 32
    torch.manual_seed(0)
    images = Shapes("train", 2, image_size=size, seed=0)
    x = normalize(images.images)

    vae = VAE(VAE_PRESETS["gpu"][0])
    loss, _ = vae_loss(vae, x, beta=1e-3)
    loss.backward()
    z = vae.encode_latents(x)
    assert z.shape == (2, *vae.latent_shape(size)) == (2, 4, 16, 16)

    clip_config = clip_presets()["gpu"][0]
    tokenizer = shapes_tokenizer(clip_config.text.max_length, paraphrases=True)
    clip = CLIP(dataclasses.replace(clip_config, text=dataclasses.replace(clip_config.text, vocab_size=len(tokenizer))))
    ids, mask = tokenizer(images.captions)
    assert clip(x, ids, mask).shape == (2, 2)  # the image tower takes 64×64

    unet_config = dataclasses.replace(unet_presets()["gpu"][0], in_channels=4, out_channels=4,
                                      context_dim=clip.text_encoder.config.width)
    sd = StableDiffusion(vae, clip.text_encoder, tokenizer, UNet(unet_config), image_size=size)
    res = sd("a large red circle in the center", num_images=1, num_inference_steps=2, seed=0)
    assert res.images.shape == (1, 3, 64, 64)
