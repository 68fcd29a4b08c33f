"""minisd: a small Stable Diffusion, built from scratch one chapter at a time.

Modules, in course order:
    data        the built-in captioned Shapes dataset and 2-D toy data       (chapters 1, 2)
    diffusion   noise schedules, q(x_t | x_0), training targets and loss     (chapters 1, 2)
    denoisers   the small networks of chapter 2 (an MLP, a plain conv net)   (chapter 2)
    samplers    DDPM and DDIM steps and the sampling loop                    (chapter 2)
    train       one plain training loop and the compute presets              (chapter 2 on)
    metrics     distances between samples and data; the judge, FID          (chapter 2 on)
    unet        the U-Net with skip connections                              (chapter 3)
    attention   attention from scratch, self- and cross attention blocks    (chapter 4)
    tokenizer   captions → token ids                                         (chapters 4, 5)
    clip        text and image encoders trained contrastively; zero-shot     (chapter 5)
    vae         the VAE: images ↔ latents, its two-term loss, latent scale  (chapter 6)
    pipeline    StableDiffusion: text → latents → image; the U-Net stage    (chapter 7)
    runs        run folders: train components stage by stage, evaluate them  (chapters 5–7)
    checkpoint  safetensors + config.json, written atomically               (all saved models)
    convert     Stable Diffusion 1.x/2.x weights (diffusers folders) → these classes  (chapter 10)
    viz, widgets  figures and ipywidgets explorers                           (all)
"""

from minisd.errors import MinisdError

__version__ = "0.1.0"
__all__ = ["MinisdError", "StableDiffusion", "__version__"]


def __getattr__(name):  # `from minisd import StableDiffusion` without importing torch for every command
    if name == "StableDiffusion":
        from minisd.pipeline import StableDiffusion

        return StableDiffusion
    raise AttributeError(f"module 'minisd' has no attribute {name!r}")
