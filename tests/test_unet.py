"""The U-Net: shapes for several configurations, clear errors, overfitting one batch, save/load."""

import pytest
import torch

from minisd.diffusion import NoiseSchedule, diffusion_loss
from minisd.errors import MinisdError
from minisd.train import TrainConfig, train
from minisd.unet import UNet, UNetConfig, shape_trace

SMALL = dict(base_channels=16, heads=2)


@pytest.mark.parametrize("config,size", [
    (UNetConfig(**SMALL), 32),
    (UNetConfig(**SMALL, channel_mults=(1,), attention_levels=()), 7),
    (UNetConfig(**SMALL, channel_mults=(1, 2, 4, 4), blocks_per_level=1, attention_levels=(2, 3)), 16),
    (UNetConfig(**SMALL, in_channels=4, out_channels=4, context_dim=12, attention_levels=(0, 1, 2)), 8),
    (UNetConfig(**SMALL, extra_in_channels=5, out_channels=6), 12),
    (UNetConfig(**SMALL, skip_connections=False), 16),
])
def test_output_shape(config, size):
    model = UNet(config)
    B = 2
    x, t = torch.randn(B, config.in_channels, size, size), torch.tensor([0, 999])
    ctx = torch.randn(B, 5, config.context_dim) if config.context_dim else None
    extra = torch.randn(B, config.extra_in_channels, size, size) if config.extra_in_channels else None
    assert model(x, t, ctx, extra=extra).shape == (B, config.out_channels, size, size)


def test_shape_trace_goes_down_and_back_up():
    model = UNet(UNetConfig(**SMALL))
    rows = shape_trace(model, torch.randn(1, 3, 32, 32), torch.tensor([5]))
    sizes = [shape[-1] for _, shape in rows]
    assert sizes[0] == 32 and min(sizes) == 8 and sizes[-1] == 32
    assert rows[-1] == ("conv_out", (1, 3, 32, 32))


def test_the_skip_ablation_keeps_the_architecture():
    """skip_connections=False feeds zeros where the skips join: same layers, same parameter count."""
    with_skips, without = UNet(UNetConfig(**SMALL)), UNet(UNetConfig(**SMALL, skip_connections=False))
    assert sum(p.numel() for p in with_skips.parameters()) == sum(p.numel() for p in without.parameters())


def test_bad_configurations_are_rejected_with_clear_errors():
    with pytest.raises(MinisdError, match=r"channel count 12 .* not divisible by norm_groups 8"):
        UNetConfig(base_channels=12)
    with pytest.raises(MinisdError, match=r"channel count 24 \(base_channels 8 × 3\) is not divisible by norm_groups 16"):
        UNetConfig(base_channels=8, channel_mults=(2, 3), norm_groups=16)
    with pytest.raises(MinisdError, match="attention level 3 does not exist"):
        UNetConfig(attention_levels=(3,))
    model = UNet(UNetConfig(**SMALL))
    with pytest.raises(MinisdError, match=r"image size \(30, 30\) is not divisible by 4"):
        model(torch.randn(1, 3, 30, 30), torch.tensor([1]))
    with pytest.raises(MinisdError, match="input has 4 channels; this U-Net expects 3"):
        model(torch.randn(1, 4, 32, 32), torch.tensor([1]))


def test_a_small_unet_overfits_one_batch():
    torch.manual_seed(0)
    schedule = NoiseSchedule(1000)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    model = UNet(UNetConfig(**SMALL, channel_mults=(1, 2), attention_levels=()))
    fixed_t = torch.tensor([100, 300, 500, 700])
    fixed_noise = torch.randn(4, 3, 16, 16)

    def loss_fn(m, x, g):  # one fixed batch of (t, ε): a memorisation task
        return torch.nn.functional.mse_loss(m(schedule.add_noise(x, fixed_noise, fixed_t), fixed_t), fixed_noise)

    result = train(model, loss_fn, x0, TrainConfig(steps=300, batch_size=4, lr=3e-3, warmup_steps=10,
                                                   progress=False, device="cpu"))
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first / 10, (first, last)
    assert diffusion_loss(model, schedule, x0).item() > 0  # still a valid denoiser call


def test_save_and_load_reproduce_outputs_exactly(tmp_path):
    model = UNet(UNetConfig(**SMALL, context_dim=8)).eval()
    model.save_pretrained(tmp_path / "unet")
    again = UNet.from_pretrained(tmp_path / "unet")
    x, t, ctx = torch.randn(2, 3, 16, 16), torch.tensor([3, 4]), torch.randn(2, 3, 8)
    assert torch.equal(model(x, t, ctx), again(x, t, ctx))
    assert again.config == model.config
    (tmp_path / "unet" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MinisdError, match="could not be read"):
        UNet.from_pretrained(tmp_path / "unet")
    with pytest.raises(MinisdError, match="not found"):
        UNet.from_pretrained(tmp_path / "nowhere")
