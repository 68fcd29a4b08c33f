"""Stable Diffusion 1.5 at its real size, without its weights: what loading, exporting and sampling
512×512 images cost on this machine, in minisd and in diffusers.

No weights can be downloaded here, so this builds a folder with SD 1.5's exact layout — the
U-Net, VAE and CLIP ViT-L/14 text tower of SD 1.5's config.json files, CLIP's real tokenizer
(from open_clip's copy of CLIP's merges file), SD 1.5's PNDM scheduler config — with random
weights stored in float16, as the published fp16 folders are. The images are noise; the sizes,
the code paths and the times are those of the real model.

    .venv/bin/python tools/sd_full_size.py [--work /tmp/sd15] [--steps 2] [--device auto|cpu|cuda]

Prints one line per measure and writes them to WORK/sd_full_size.json. Needs the dev extras
(diffusers, transformers; open_clip for CLIP's merges file, else a byte-level tokenizer stands in) and
about 10 GB of free disk and memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import torch

SD15_UNET = dict(attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, in_channels=4, out_channels=4,
                 layers_per_block=2, norm_num_groups=32, sample_size=64)
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=32, sample_size=512,
              scaling_factor=0.18215)
SD15_TEXT = dict(hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, vocab_size=49408, projection_dim=768)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None)
PROMPT = "a photograph of an astronaut riding a horse"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build_folder(folder: Path) -> None:
    """SD 1.5's layout with random float16 weights, saved by diffusers as a hub folder is."""
    import diffusers
    import transformers

    from minisd.tokenizer import BPETokenizer

    torch.manual_seed(0)
    tokenizer_dir = folder.parent / f"{folder.name}_tokenizer"
    try:
        import open_clip.tokenizer

        tokenizer = BPETokenizer.from_merges_file(open_clip.tokenizer.default_bpe())  # CLIP's own merges
    except ImportError:  # (the GPU machine) CLIP's byte alphabet without merges: other ids, the same times
        tokenizer = BPETokenizer([])
    tokenizer.save(tokenizer_dir)
    with torch.device("cpu"):
        parts = dict(
            unet=diffusers.UNet2DConditionModel(**SD15_UNET).half(),
            vae=diffusers.AutoencoderKL(**SD_VAE).half(),
            text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT)).half(),
            tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_dir),
            scheduler=diffusers.PNDMScheduler(**SD15_SCHEDULER),
        )
    pipe = diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(tokenizer_dir)


def timed(fn):
    begin = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - begin


def main() -> None:
    from minisd.pipeline import StableDiffusion
    from minisd.runs import export_run

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/sd15", help="folder for the model files (removed first)")
    p.add_argument("--steps", type=int, default=2, help="sampling steps timed per pipeline")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from minisd.train import pick_device

    args.device = str(pick_device(args.device))
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    folder = work / "sd15-layout"
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    figures: dict = {"device": args.device, "card": card, "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "steps": args.steps}

    def say(key, value, text):
        figures[key] = value
        print(text, flush=True)

    _, seconds = timed(lambda: build_folder(folder))
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    say("folder_gb", size / 1e9, f"SD 1.5-layout folder (random float16 weights) written by diffusers in "
                                 f"{seconds:.0f} s: {size / 1e9:.2f} GB")

    sd, seconds = timed(lambda: StableDiffusion.from_pretrained(folder, device=args.device, dtype=torch.float16))
    params = sum(p.numel() for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters())
    dtypes = sorted({str(p.dtype) for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters()})
    say("load_float16_s", seconds, f"minisd loads it in float16 in {seconds:.1f} s: {params / 1e6:,.2f} M parameters "
                                   f"({', '.join(dtypes)}), images {sd.image_size}², latents {sd.latent_shape}, "
                                   f"{len(sd.tokenizer):,} tokens")
    if len(sd.tokenizer) == 49408:
        assert sd.tokenizer(PROMPT)[0][0, :3].tolist() == [49406, 320, 8853], "not CLIP's vocabulary"
    del sd

    _, seconds = timed(lambda: export_run(folder, work / "exported", "float16", log=lambda _: None))
    size = sum(f.stat().st_size for f in (work / "exported").rglob("*") if f.is_file())
    say("export_s", seconds, f"minisd export → run folder in {seconds:.1f} s, {size / 1e9:.2f} GB")

    def time_run(unet, run, repeats=2):
        """(output, seconds, U-Net seconds) of `run()`, the fastest of `repeats` after a warm-up."""
        forward, spent = unet.forward, [0.0]

        def unet_timed(*a, **k):
            begin = time.perf_counter()
            out = forward(*a, **k)
            spent[0] += time.perf_counter() - begin
            return out

        run()  # warm-up (first-call allocations)
        unet.forward = unet_timed
        best = None
        try:
            for _ in range(repeats):
                spent[0] = 0.0
                out, seconds = timed(run)
                if best is None or seconds < best[1]:
                    best = (out, seconds, spent[0])
        finally:
            del unet.forward  # back to the class's forward
        return best

    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=7.5)

    def sample(sd, name):
        res, total, unet = time_run(sd.unet, lambda: sd(PROMPT, latents=latents, seed=0, **kwargs))
        step = unet / args.steps
        say(name, {"total_s": total, "unet_step_s": step, "rest_s": total - unet},
            f"{name}: {args.steps} guided steps + decode at {sd.image_size}² in {total:.1f} s (U-Net {step:.1f} s "
            f"per guided step, the rest {total - unet:.1f} s); 50 steps ≈ {50 * step + total - unet:.0f} s")
        return res.images.float().cpu()

    ours = StableDiffusion.from_pretrained(work / "exported", device=args.device)  # float32, from the run folder
    ours_images = sample(ours, "minisd float32")
    del ours
    bf16 = StableDiffusion.from_pretrained(folder, device=args.device, dtype=torch.bfloat16)
    sample(bf16, "minisd bfloat16")
    del bf16

    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, safety_checker=None,
                                                            requires_safety_checker=False).to(args.device)
    # SD 1.5's DDIM as the pipeline sets it up: clip_sample off (its scheduler_config.json says false; a DDIM
    # made from the PNDM config here would default to clipping ẑ_0 to [-1, 1], which neither SD nor minisd does)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config, clip_sample=False)
    ref.set_progress_bar_config(disable=True)
    theirs, total, unet = time_run(ref.unet, lambda: ref(PROMPT, latents=latents.clone(), output_type="pt",
                                                         **kwargs).images)
    ours_t = figures["minisd float32"]
    say("diffusers float32", {"total_s": total, "unet_step_s": unet / args.steps, "rest_s": total - unet},
        f"diffusers float32 (DDIM): {args.steps} steps + decode in {total:.1f} s (U-Net {unet / args.steps:.1f} s per "
        f"guided step, the rest {total - unet:.1f} s); minisd/diffusers time: U-Net "
        f"{ours_t['unet_step_s'] / (unet / args.steps):.2f}×, whole run {ours_t['total_s'] / total:.2f}×")
    diff = (ours_images - theirs.float().cpu()).abs().max().item()
    say("max_abs_image_difference", diff, f"the two pipelines' images differ by at most {diff:.1e} (pixels in [0, 1])")
    peak = peak_rss_gb()
    say("peak_rss_gb", peak, f"peak memory of this process {peak:.1f} GB")
    (work / "sd_full_size.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {work / 'sd_full_size.json'}")


if __name__ == "__main__":
    main()
