"""Exporting a run for shipping, and the model shipped with the course."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from minisd import MinisdError, StableDiffusion
from minisd.cli import main
from minisd.pipeline import PRETRAINED


def test_export_stores_float16_weights_that_sample_almost_the_same_images(tiny_run, tmp_path, capsys):
    out = tmp_path / "shipped"
    assert main(["export", "--run", str(tiny_run), "--out", str(out)]) == 0
    for part in ("vae", "text_encoder", "unet"):
        weights = load_file(str(out / part / "model.safetensors"))
        assert {w.dtype for w in weights.values()} == {torch.float16}, part
    config = json.loads((out / "config.json").read_text())
    assert config["exported"]["dtype"] == "float16" and config["preset"] == "tiny"
    a = StableDiffusion.from_pretrained(tiny_run)("a red circle", num_images=4, num_inference_steps=10, seed=0)
    b = StableDiffusion.from_pretrained(out)("a red circle", num_images=4, num_inference_steps=10, seed=0)
    assert next(StableDiffusion.from_pretrained(out).unet.parameters()).dtype == torch.float32
    assert 0 < (a.images - b.images).abs().max() < 0.02
    capsys.readouterr()
    assert main(["export", "--run", str(tiny_run), "--out", str(out)]) == 2  # never over an existing folder
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["export", "--run", str(tiny_run), "--out", str(tmp_path / "x"), "--dtype", "int8"]) == 2
    assert "unknown dtype 'int8'" in capsys.readouterr().err


def test_files_written_atomically_get_a_normal_files_mode(tmp_path):
    from minisd.checkpoint import atomic_write

    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.txt", lambda tmp: open(tmp, "w").write("x"))
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_the_shipped_model_is_small_float16_measured_and_loads_by_name():
    folder = PRETRAINED["shapes-cpu"]
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 10 * 2**20, size
    assert all(w.dtype == torch.float16 for w in load_file(str(folder / "unet" / "model.safetensors")).values())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["train"]["total_wall_seconds"] < 15 * 60
    figures = metrics["eval"]["sd/test/ddim-20"]  # measured on these float16 weights by `minisd eval`
    assert figures["all"] >= 0.8 and figures["color"] >= 0.95 and figures["shape"] >= 0.9
    assert figures["all_ci"][0] <= figures["all"] <= figures["all_ci"][1]
    # FID against real images of the same prompts: above their own reference, and not by much
    assert figures["fid_reference_ci"][1] < figures["fid_ci"][0] and figures["fid_excess"] < 50
    assert figures["agreement_all"] >= 0.95  # the geometric reader checks the judge on these samples
    sd = StableDiffusion.from_pretrained("shapes-cpu")
    assert sd.image_size == 32 and sd.latent_shape == (4, 8, 8)
    with pytest.raises(MinisdError, match="'shapes-cpu'"):
        StableDiffusion.from_pretrained("shapes-gpu")


def test_the_shipped_model_draws_what_it_is_asked(tmp_path):
    """Every colour × shape (a seen size and position each), read back by the judge."""
    from minisd.data import COLORS, POSITIONS, SHAPES, SIZES, caption, encode_labels
    from minisd.metrics import load_judge

    sd = StableDiffusion.from_pretrained("shapes-cpu")
    prompts, rows = [], []
    for i, (c, s) in enumerate((c, s) for c in COLORS for s in SHAPES):
        size, position = SIZES[i % 2], POSITIONS[i % 5]
        prompts.append(caption(c, s, size, position))
        rows.append(encode_labels(color=c, shape=s, size=size, position=position))
    images = sd(prompts, num_inference_steps=10, sampler="dpmsolver++", seed=0).images
    judge, _ = load_judge(progress=False)
    read, _ = judge.read(images)
    right = (read == torch.cat(rows)).all(1).float().mean().item()
    assert right >= 0.85, right  # held-out pairs included
