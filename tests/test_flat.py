"""`FlatParameters`: every weight a view of one flat tensor, so AdamW, clipping and the EMA are one
operation each (CUDA's default). Checked on the CPU against the per-tensor training it replaces:
the same training up to rounding, an exact resume, state files that fit either way, and each weight
handed back in memory of its own."""

import dataclasses

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from minisd.diffusion import NoiseSchedule, diffusion_loss
from minisd.errors import MinisdError
from minisd.train import FlatParameters, TrainConfig, train
from minisd.unet import UNet, UNetConfig

SCHEDULE = NoiseSchedule(1000)
X0 = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
# grad_clip 0.05: clipping binds at every step, so the flat norm is what scales the update
CONFIG = TrainConfig(steps=12, batch_size=8, lr=2e-3, weight_decay=0.1, warmup_steps=3, grad_clip=0.05,
                     ema_decay=0.9, progress=False, device="cpu", log_every=4)


def unet():
    torch.manual_seed(0)
    return UNet(UNetConfig(base_channels=16, channel_mults=(1, 2), blocks_per_level=1, attention_levels=(1,)))


def loss_fn(m, x, g):
    return diffusion_loss(m, SCHEDULE, x, generator=g)


def run(flat: bool, state_file=None, model=None, **changes):
    model = model or unet()
    result = train(model, loss_fn, X0, dataclasses.replace(CONFIG, flat_parameters=flat, **changes),
                   state_file=state_file)
    return model, result


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def own_memory(model):
    params = list(model.parameters())
    return len({p.untyped_storage().data_ptr() for p in params}) == len(params) and all(
        p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in params)


def test_flat_weights_train_as_per_tensor_ones_up_to_rounding():
    (flat, flat_run), (plain, plain_run) = run(True), run(False)
    moved = (weights(plain) - weights(unet())).abs().max().item()
    gap = (weights(flat) - weights(plain)).abs().max().item()
    assert moved > 1e-3 and gap < 1e-3 * moved, (gap, moved)  # the same training, not the same rounding
    assert (weights(flat_run.ema) - weights(plain_run.ema)).abs().max().item() < 1e-3 * moved
    assert max(abs(a - b) for a, b in zip(flat_run.losses, plain_run.losses)) < 1e-4
    assert own_memory(flat) and own_memory(flat_run.ema)  # handed back unflattened: ready to save
    save_file(flat.state_dict(), "/dev/null")  # safetensors refuses tensors that share memory


def test_flat_weights_really_are_one_tensor_during_training():
    """Inside the loop every weight is a view of one flat tensor, in its own layout (channels-last
    convolutions stay channels-last), and one optimiser step moves them all."""
    model, seen = unet(), {}

    def hook(step, loss):
        params = list(model.parameters())
        seen["storages"] = len({p.untyped_storage().data_ptr() for p in params})
        seen["conv_nhwc"] = model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    train(model, loss_fn, X0, dataclasses.replace(CONFIG, steps=2, flat_parameters=True, channels_last=True),
          hook=hook)
    assert seen == {"storages": 1, "conv_nhwc": True}
    assert own_memory(model) and model.conv_in.weight.is_contiguous()


def test_a_flat_run_resumes_exactly(tmp_path):
    state = tmp_path / "state.safetensors"
    whole, whole_run = run(True)
    with pytest.raises(KeyboardInterrupt):  # stopped in step 10 (one forward pass a step), saved at 4 and 8
        run(True, state_file=state, save_every=4, model=_interrupting(unet(), at_call=10))
    assert state.is_file()
    resumed, resumed_run = run(True, state_file=state, save_every=4)
    assert resumed_run.resumed_from == 8
    assert torch.equal(weights(resumed), weights(whole)) and resumed_run.losses == whole_run.losses
    assert torch.equal(weights(resumed_run.ema), weights(whole_run.ema))


def _interrupting(model, at_call):
    """The model raises KeyboardInterrupt at its `at_call`-th forward pass (a user pressing stop)."""
    calls = {"n": 0}

    def pre_hook(module, args):
        calls["n"] += 1
        if calls["n"] > at_call:
            raise KeyboardInterrupt

    model.register_forward_pre_hook(pre_hook)
    return model


@pytest.mark.parametrize("first,then", [(False, True), (True, False)])
def test_state_files_are_the_same_whether_the_weights_were_flat(tmp_path, first, then):
    """A state saved by a per-tensor run (the CPU) resumes flat (CUDA), and the other way round,
    ending where an uninterrupted run ends, up to rounding."""
    state = tmp_path / "state.safetensors"
    with pytest.raises(KeyboardInterrupt):
        run(first, state_file=state, save_every=6, model=_interrupting(unet(), at_call=7))
    resumed, resumed_run = run(then, state_file=state, save_every=6)
    straight, _ = run(first)
    assert resumed_run.resumed_from == 6
    moved = (weights(straight) - weights(unet())).abs().max().item()
    assert (weights(resumed) - weights(straight)).abs().max().item() < 1e-3 * moved


def test_interrupted_training_hands_the_weights_back_unflattened():
    model = _interrupting(unet(), at_call=3)
    with pytest.raises(KeyboardInterrupt):
        run(True, model=model)
    assert own_memory(model)


def test_a_model_with_frozen_weights_is_trained_per_tensor():
    """AdamW must leave a frozen weight alone; a flat optimiser would decay it, so such a model
    keeps the per-tensor path even when flat weights are asked for."""
    model = unet()
    model.conv_in.requires_grad_(False)
    frozen = model.conv_in.weight.detach().clone()
    run(True, model=model)
    assert torch.equal(model.conv_in.weight, frozen)
    assert not torch.equal(model.conv_out.weight.detach(), unet().conv_out.weight.detach())


def test_a_weight_without_a_gradient_counts_as_gradient_zero():
    model = nn.Sequential(nn.Linear(3, 1), nn.Linear(3, 1))  # the second one is never used
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))
    unused = [p.detach().clone() for p in model[1].parameters()]
    train(model, lambda m, b, g: (m[0](b) ** 2).mean(), x,
          dataclasses.replace(CONFIG, flat_parameters=True, weight_decay=0.0, ema_decay=0.0))
    assert all(torch.equal(p, q) for p, q in zip(model[1].parameters(), unused))  # no decay: zero moments


def test_only_dense_weights_of_one_kind_can_be_flattened():
    with pytest.raises(MinisdError, match=r"dense weights.*strides \(6, 2\)"):
        FlatParameters([nn.Parameter(torch.randn(4, 6)[:, ::2])])
    with pytest.raises(MinisdError, match="torch.float64"):
        FlatParameters([nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(2, dtype=torch.float64))])


@pytest.mark.parametrize("stage", ["vae", "clip"])
def test_the_real_stages_train_flat_as_per_tensor(stage):
    """The course's own networks (every kind of weight they have: convolutions, norms, embeddings,
    the class token, CLIP's temperature) through the real stage functions, flat against per tensor."""
    from minisd.clip import train_clip
    from minisd.vae import train_vae

    def run(flat):
        options = {"flat_parameters": flat}
        if stage == "vae":
            return train_vae("tiny", steps=8, progress=False, device="cpu", train_options=options)[0]
        return train_clip("tiny", steps=8, progress=False, device="cpu", train_options=options)[0]

    flat, plain = run(True), run(False)
    assert own_memory(flat)
    worst = max((a - b).abs().max().item() for a, b in zip(flat.state_dict().values(), plain.state_dict().values()))
    assert 0 < worst < 1e-5, worst  # not 0: the flat path ran (its norm rounds differently)
