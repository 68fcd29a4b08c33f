"""`minisd bench`'s speed suites, kept lean: the diffusers twin of each preset's U-Net is the same
model (parameter count, output shape), the FLOP counter agrees with a hand count, and one quick
run of three suites writes a consistent table and JSON."""

import json

import pytest
import torch
from torch import nn

from minisd.bench import (
    call_diffusers,
    call_minisd,
    diffusers_unet,
    param_count,
    preset_sizes,
    train_step_flops,
)
from minisd.cli import main
from minisd.unet import UNet

pytest.importorskip("diffusers")


@pytest.mark.parametrize("preset", ["tiny", "cpu", "gpu"])
def test_diffusers_twin_has_the_same_size_and_output_shape(preset):
    sizes = preset_sizes(preset)
    torch.manual_seed(0)
    ours, theirs = UNet(sizes.unet).eval(), diffusers_unet(sizes.unet, sizes.side).eval()
    n_ours, n_theirs = param_count(ours), param_count(theirs)
    assert abs(n_ours - n_theirs) <= 0.05 * n_ours, (n_ours, n_theirs)
    c = sizes.unet
    inp = {"x": torch.randn(1, c.in_channels, sizes.side, sizes.side), "t": torch.tensor([500]),
           "context": torch.randn(1, sizes.context_length, c.context_dim),
           "mask": torch.arange(sizes.context_length)[None] < 5}
    with torch.no_grad():
        assert call_minisd(ours, inp).shape == call_diffusers(theirs, inp).shape == inp["x"].shape


def test_flop_counter_matches_hand_counts():
    B, n_in, n_out = 8, 32, 16
    x = torch.randn(B, n_in, requires_grad=True)  # so the backward computes the input's gradient too
    linear = nn.Linear(n_in, n_out)
    # forward x·Wᵀ: 2·B·in·out; backward: ∂x and ∂W, one product of the same size each
    assert train_step_flops(linear, lambda m: m(x).sum()) == 2 * B * n_in * n_out * 3
    C_in, C_out, k, H = 3, 5, 3, 6
    img = torch.randn(2, C_in, H, H, requires_grad=True)
    conv = nn.Conv2d(C_in, C_out, k, padding=1)
    assert train_step_flops(conv, lambda m: m(img).sum()) == 2 * 2 * C_out * H * H * C_in * k * k * 3


def test_quick_bench_of_three_suites(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "unet", "attention", "mfu", "--quick", "--no-compile", "--repeats", "1",
                 "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "ratio minisd / diffusers, eager" in table and "images/s" in table and "needs CUDA" in table
    result = json.loads(out.read_text())
    assert result["preset"] == "tiny" and result["machine"]["torch_threads"] >= 1
    assert set(result["suites"]) == {"unet", "attention", "mfu"}
    for rows in result["suites"].values():
        for r in rows:
            assert set(r) == {"what", "value", "unit", "target", "higher_is_better", "note"}
    unet = {r["what"]: r for r in result["suites"]["unet"]}
    ours, theirs = unet["minisd UNet training step, eager"], unet["diffusers UNet2DConditionModel training step, eager"]
    assert ours["value"] > 0 and theirs["value"] > 0 and ours["unit"] == "images/s"
    assert unet["ratio minisd / diffusers, eager"]["value"] == pytest.approx(ours["value"] / theirs["value"])
    params = unet["minisd UNet: parameters"]["value"]
    assert abs(params - unet["diffusers UNet2DConditionModel: parameters"]["value"]) <= 0.05 * params
    assert not any("compiled" in r["what"] for r in result["suites"]["unet"])  # --no-compile
    attention = {r["what"]: r for r in result["suites"]["attention"]}
    written, fused = (attention[f"U-Net training step, {k} attention"]["value"] for k in ("written-out", "fused"))
    assert attention["U-Net training step: fused speed-up"]["value"] == pytest.approx(fused / written)
    mfu = {r["what"]: r for r in result["suites"]["mfu"]}
    assert mfu["U-Net training step: FLOPs (forward + backward)"]["value"] > 0
    assert mfu["achieved, eager"]["unit"] == "GFLOP/s" and mfu["achieved, eager"]["value"] > 0
    assert mfu["MFU, eager"]["value"] is None and mfu["MFU, eager"]["note"] == "needs CUDA"


@pytest.mark.parametrize(("argv", "says"), [(["bench", "pixels"], "unknown bench suite 'pixels'"),
                                            (["bench", "unet", "--preset", "huge"], "unknown preset 'huge'")])
def test_bench_refuses_bad_values(argv, says, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err
