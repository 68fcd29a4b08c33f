"""The training loop, and the end-to-end claim of chapter 2: a DDPM learns a 2-D distribution."""

import math

import pytest
import torch

from minisd.data import toy_2d
from minisd.denoisers import MLPDenoiser
from minisd.diffusion import NoiseSchedule, diffusion_loss
from minisd.errors import MinisdError
from minisd.metrics import mean_nn_distance, mmd
from minisd.samplers import DDIMSampler, DDPMSampler, sample
from minisd.train import TrainConfig, lr_factor, pick_device, pick_preset, train


def test_metrics_against_closed_form_cases():
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    assert mmd(x, x) == pytest.approx(0.0, abs=1e-12)
    assert mean_nn_distance(x, x) == 0.0
    # two single points at distance d: MMD² = k(a,a) + k(b,b) − 2k(a,b) = Σ_h 2(1 − exp(−d²/2h²))
    a, b, d = torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), 1.0
    expected = sum(2 * (1 - math.exp(-d * d / (2 * h * h))) for h in (0.5, 1.0))
    assert mmd(a, b, bandwidths=(0.5, 1.0)) == pytest.approx(expected, rel=1e-9)
    assert mean_nn_distance(torch.zeros(1, 2), torch.tensor([[3.0, 4.0]])) == pytest.approx(5.0)


def test_toy_ddpm_samples_match_the_data():
    """Train a small MLP denoiser on a spiral; its samples must be ≥ 5× closer to held-out data
    than pure noise is, by MMD and by mean nearest-neighbour distance, for DDPM and for DDIM."""
    torch.manual_seed(0)
    data = toy_2d("spiral", 8000, seed=0)
    schedule = NoiseSchedule(1000, "linear")
    model = MLPDenoiser(hidden=128, num_blocks=3)
    result = train(model, lambda m, x, g: diffusion_loss(m, schedule, x, generator=g), data,
                   TrainConfig(steps=2500, batch_size=256, lr=2e-3, progress=False, device="cpu"))
    assert sum(result.losses[-100:]) / 100 < 0.5 * sum(result.losses[:10]) / 10
    held_out = toy_2d("spiral", 2000, seed=1)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2000, 2, generator=g)
    for sampler in (DDPMSampler(schedule, 100), DDIMSampler(schedule, 50)):
        samples = sample(model, sampler, (2000, 2), generator=g, progress=False)
        assert mmd(samples, held_out) * 5 < mmd(noise, held_out), type(sampler).__name__
        assert mean_nn_distance(samples, held_out) * 5 < mean_nn_distance(noise, held_out)


def test_training_is_reproducible_for_a_seed():
    data = toy_2d("moons", 1000)
    s = NoiseSchedule(100)

    def run():
        torch.manual_seed(0)
        m = MLPDenoiser(hidden=32, num_blocks=1)
        return train(m, lambda m, x, g: diffusion_loss(m, s, x, generator=g), data,
                     TrainConfig(steps=20, batch_size=32, progress=False, device="cpu")).losses

    assert run() == run()


def test_train_takes_tuples_and_calls_the_hook():
    x, y = torch.randn(100, 3), torch.randn(100, 1)
    model = torch.nn.Linear(3, 1)
    seen = []

    def loss_fn(m, batch, g):
        xb, yb = batch
        return ((m(xb) - yb) ** 2).mean()

    result = train(model, loss_fn, (x, y), TrainConfig(steps=5, batch_size=10, progress=False, device="cpu"),
                   hook=lambda step, loss: seen.append(step))
    assert seen == list(range(5)) and len(result.losses) == 5 and result.seconds > 0
    with pytest.raises(MinisdError, match="different lengths"):
        train(model, loss_fn, (x, y[:50]), TrainConfig(steps=1, progress=False, device="cpu"))


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    c = TrainConfig(steps=1000, warmup_steps=100, min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.01) and lr_factor(99, c) == pytest.approx(1.0)
    assert lr_factor(100, c) == pytest.approx(1.0) and lr_factor(1000, c) == pytest.approx(0.1)


def test_presets_and_devices(monkeypatch):
    monkeypatch.setenv("MINISD_QUICK", "1")
    assert pick_preset() == "tiny"
    monkeypatch.delenv("MINISD_QUICK")
    assert pick_preset() == ("gpu" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(MinisdError, match=r"unknown device 'tpu'"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(MinisdError, match="CUDA is not available"):
            pick_device("cuda")
    with pytest.raises(MinisdError, match="steps and batch_size"):
        TrainConfig(steps=0)


def test_attribute_reader_reads_real_shapes_and_rejects_mismatches():
    from minisd.data import Shapes
    from minisd.metrics import attribute_accuracy, read_attributes

    for split in ("test", "heldout"):
        ds = Shapes(split, 1000, seed=11)
        acc = attribute_accuracy(ds.images, ds.labels)
        assert min(acc.values()) >= 0.99, (split, acc)
        noisy = (ds.images.float() / 255 + 0.05 * torch.randn(ds.images.shape)).clamp(0, 1)
        assert attribute_accuracy(noisy, ds.labels)["all"] >= 0.95
    wrong = ds.labels.clone()
    wrong[:, 1] = (wrong[:, 1] + 1) % 3  # every shape label wrong
    assert attribute_accuracy(ds.images, wrong)["shape"] < 0.02
    assert (read_attributes(torch.zeros(2, 3, 32, 32)) == -1).all()  # an empty image has no object


def test_channels_last_changes_the_memory_layout_not_the_training():
    from minisd.unet import UNet, UNetConfig

    x0 = torch.rand(16, 3, 16, 16) * 2 - 1
    s = NoiseSchedule(1000)

    def run(**switches):
        torch.manual_seed(0)
        m = UNet(UNetConfig(base_channels=16, channel_mults=(1, 2), blocks_per_level=1, attention_levels=(1,)))
        train(m, lambda m, x, g: diffusion_loss(m, s, x, generator=g), x0,
              TrainConfig(steps=10, batch_size=8, progress=False, device="cpu", **switches))
        return m

    plain, nhwc = run(), run(channels_last=True)
    assert nhwc.conv_in.weight.is_contiguous()  # handed back in the standard layout, ready to save
    worst = max((a - b).abs().max().item() for a, b in zip(plain.parameters(), nhwc.parameters()))
    assert 0 < worst < 1e-4  # another convolution kernel, so not bit-identical; the same training
