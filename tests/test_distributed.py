"""Data-parallel training: two CPU processes with Gloo, started by torchrun exactly as a user would,
must end with the weights one process gets on the same global batches."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minisd import distributed

# Stated tolerance: the two runs see the same numbers; only the order in which gradients are
# summed (two half-batch means averaged by all-reduce vs one mean) and the thread count differ,
# which moves float32 weights of size ~1 by about 1e-5 after the tiny preset's steps.
WEIGHT_TOLERANCE = 1e-4
LOSS_TOLERANCE = 1e-4


def test_two_gloo_processes_train_the_same_weights_as_one(tiny_run, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "minisd", "train", "--preset", "tiny", "--out", str(out), "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "training on 2 processes (gloo)" in r.stdout
    assert r.stdout.count(f"wrote {out}") == 1  # rank 0 alone reports (and writes)
    for part in ("vae", "text_encoder", "clip", "unet"):
        one, two = load_file(tiny_run / part / "model.safetensors"), load_file(out / part / "model.safetensors")
        assert one.keys() == two.keys()
        worst = max((one[k] - two[k]).abs().max().item() for k in one)
        assert worst < WEIGHT_TOLERANCE, f"{part}: weights differ by {worst:.2e}"
        assert any((one[k] != two[k]).any() for k in one) or part in ("text_encoder", "clip")  # really two runs
    m1, m2 = (json.loads((d / "metrics.json").read_text())["train"] for d in (tiny_run, out))
    for stage in ("vae", "clip", "unet"):
        assert m1[stage]["steps"] == m2[stage]["steps"]
        assert max(abs(a - b) for a, b in zip(m1[stage]["losses"], m2[stage]["losses"])) < LOSS_TOLERANCE
    assert json.loads((out / "config.json").read_text())["stages"].keys() == {"vae", "clip", "unet"}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_run.iterdir())  # nothing stray


def test_rows_give_each_process_its_slice_of_one_global_draw():
    def draw(m):
        return torch.randn(m, 3, generator=torch.Generator().manual_seed(0))

    whole = draw(8)
    with distributed.shard(0, 2):
        first = distributed.rows(draw, 4)
    with distributed.shard(1, 2):
        second = distributed.rows(draw, 4)
    assert torch.equal(torch.cat([first, second]), whole)
    assert torch.equal(distributed.rows(draw, 8), whole)  # alone: the plain draw


def test_a_batch_that_does_not_split_over_the_processes_is_refused(monkeypatch):
    import minisd.train
    from minisd.errors import MinisdError
    from minisd.train import TrainConfig, train

    monkeypatch.setattr(minisd.train, "setup", lambda device: (0, 3))  # as if torchrun started 3 processes
    with pytest.raises(MinisdError, match="batch_size 4 does not split evenly over 3 processes"):
        train(torch.nn.Linear(2, 2), lambda m, b, g: m(b).sum(), torch.zeros(8, 2),
              TrainConfig(steps=1, batch_size=4, device="cpu", progress=False))
