"""The GPU path's host side, checked on the CPU: pre-tokenised captions equal the Python ones, no
value is read back inside a logging window, the precision chooser, fp16 with a gradient scaler,
and the multi-tensor EMA and clipping against their one-tensor-at-a-time references."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from minisd import bench_host
from minisd.bench import run_bench
from minisd.bench_host import FEW_ROWS, HOST_STAGES, HostReads, OperationCount, stage_setup
from minisd.captions import ShapesCaptions
from minisd.clip import caption_fits
from minisd.data import describe, sample_labels
from minisd.errors import MinisdError, as_if_on_a_gpu
from minisd.tokenizer import shapes_tokenizer
from minisd.train import EMA, TrainConfig, choose_precision, clip_grad_norm, train

CPU = torch.device("cpu")


@pytest.mark.parametrize("paraphrase,drop", [(0.5, 0.25), (0.5, 0.1), (1.0, 0.5), (0.0, 0.0), (0.3, 0.9)])
def test_pretokenised_captions_equal_describe_then_tokenize(paraphrase, drop):
    tokenizer = shapes_tokenizer(16, paraphrases=True)
    labels = sample_labels(3000, "train", np.random.default_rng(1))
    texts, mentioned = describe(labels, torch.Generator().manual_seed(7), paraphrase, drop)
    ids, mask, mentioned2 = ShapesCaptions(tokenizer, paraphrase, drop).draw(labels, torch.Generator().manual_seed(7))
    want_ids, want_mask = tokenizer(texts)
    assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask) and torch.equal(mentioned, mentioned2)
    assert len(set(texts)) > (1 if paraphrase == drop == 0 else 20)  # the check covers varied captions


def test_unconditional_rows_get_the_empty_caption_and_the_rest_are_kept():
    tokenizer = shapes_tokenizer(16, paraphrases=True)
    captions = ShapesCaptions(tokenizer, 0.5, 0.1)
    ids, _, _ = captions.draw(sample_labels(8, "train", np.random.default_rng(0)), torch.Generator().manual_seed(0))
    drop = torch.tensor([True, False] * 4)
    new_ids, mask = captions.unconditional(ids, drop)
    empty_ids, empty_mask = tokenizer([""])
    assert torch.equal(new_ids[drop], empty_ids.expand(4, -1)) and torch.equal(mask[drop], empty_mask.expand(4, -1))
    assert torch.equal(new_ids[~drop], ids[~drop])


def test_caption_fits_equals_the_attribute_by_attribute_rule():
    labels = sample_labels(200, "train", np.random.default_rng(2))
    mentioned = torch.rand(200, 4, generator=torch.Generator().manual_seed(3)) >= 0.4
    want = ((labels[:, None, :] == labels[None, :, :]) | ~mentioned[None]).all(-1)
    got = caption_fits(labels, mentioned)
    assert torch.equal(got, want) and 0 < want.float().mean() < 1


@pytest.mark.parametrize("stage", HOST_STAGES)
@pytest.mark.parametrize("flat", [False, True])
def test_the_training_loop_reads_values_back_once_per_window(stage, flat):
    """Every read of a tensor's value is a sync on a GPU: inside a window of `log_every` steps there
    must be none, whatever the stage (counted with the real loss functions, stand-in networks)."""
    model, loss_fn, data, config, hook = stage_setup(stage, "tiny", rows=256)
    steps, window = 30, 10
    # fused AdamW, as on a GPU (the CPU's default multi-tensor AdamW reads its step counters as numbers)
    config = dataclasses.replace(config, steps=steps, log_every=window, progress=False, device="cpu",
                                 warmup_steps=5, fused_optimizer=True, flat_parameters=flat)
    with HostReads() as reads, as_if_on_a_gpu():
        result = train(model, loss_fn, data, config, hook=None if hook is None else (lambda step, loss: None))
    assert len(result.losses) == steps and all(np.isfinite(result.losses))
    assert reads.count <= steps // window + 1, f"{reads.count} reads of values in {steps} steps"


def test_host_reads_counts_what_it_should():
    with HostReads() as reads:
        t = torch.ones(3)
        t.sum().item()
        t.tolist()
        bool(t.any())
    assert reads.count == 3 and torch.Tensor.item.__name__ == "item"  # and puts the methods back


def test_operation_count_counts_forward_and_backward_operations():
    w = torch.ones(3, requires_grad=True)
    with OperationCount() as ops:
        (w * 2).sum().backward()  # mul, sum; backward: ones_like (the seed), expand, mul, detach (the hand-over)
    with OperationCount() as none:
        pass
    assert 4 <= ops.count <= 8 and none.count == 0


def test_losses_are_the_per_step_values_whatever_the_window():
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    data = (x, x.sum(1, keepdim=True))

    def loss_fn(m, batch, g):
        return ((m(batch[0]) - batch[1]) ** 2).mean()

    runs = []
    for window in (1, 7, 100):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        runs.append(train(model, loss_fn, data, TrainConfig(steps=20, batch_size=8, log_every=window,
                                                            progress=False, device="cpu")).losses)
    assert runs[0] == runs[1] == runs[2] and len(runs[0]) == 20


@pytest.mark.parametrize("capability,want", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"),
                                             ((8, 6), "bf16"), ((9, 0), "bf16")])
def test_precision_is_chosen_by_the_cards_compute_capability(capability, want):
    assert choose_precision("auto", torch.device("cuda"), capability) == want


def test_precision_on_the_cpu_and_when_asked_for():
    assert choose_precision("auto", CPU) == "fp32"
    assert choose_precision("bf16", torch.device("cuda"), (7, 5)) == "bf16"  # asked for: not second-guessed
    with pytest.raises(MinisdError, match="unknown precision 'fp8'"):
        choose_precision("fp8", CPU)
    with pytest.raises(MinisdError, match="precision"):
        TrainConfig(precision="half")


@pytest.mark.parametrize("flat", [False, True])
def test_fp16_with_a_gradient_scaler_trains(flat):
    """float16 autocast with loss scaling (what a T4 gets, with flat weights: CUDA's default) runs and
    learns; here on the CPU."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)

    def loss_fn(m, batch, gen):
        out = m(batch[0])
        assert out.dtype == torch.float16  # autocast is on
        return ((out.float() - batch[1]) ** 2).mean()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    config = TrainConfig(steps=150, batch_size=32, lr=1e-2, warmup_steps=10, precision="fp16", progress=False,
                         device="cpu", flat_parameters=flat)
    result = train(model, loss_fn, (x, y), config)
    assert result.precision == "fp16" and all(p.dtype == torch.float32 for p in model.parameters())
    assert np.mean(result.losses[-10:]) < 0.2 * np.mean(result.losses[:10])
    if flat:  # the same run as per tensor, up to the rounding of the clipping norm
        torch.manual_seed(0)
        plain = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        train(plain, loss_fn, (x, y), dataclasses.replace(config, flat_parameters=False))
        assert max((a - b).abs().max().item() for a, b in zip(model.parameters(), plain.parameters())) < 1e-2


def test_an_fp16_run_resumes_exactly_with_its_gradient_scale(tmp_path):
    """With fp16 the gradient scaler's scale is part of the state: a resume that started again from
    the initial scale would skip steps (overflows) that the uninterrupted run took."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = 30 * x @ torch.randn(8, 1, generator=g)  # large gradients: the initial scale of 2^16 overflows float16

    def loss_fn(m, batch, gen):
        return ((m(batch[0]).float() - batch[1]) ** 2).mean()

    def run(state_file=None, stop_at=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        if stop_at is not None:  # a user pressing stop during the forward pass of step `stop_at`
            calls = iter(range(10**6))

            def stop(module, args):
                if next(calls) == stop_at:
                    raise KeyboardInterrupt

            model.register_forward_pre_hook(stop)
        config = TrainConfig(steps=24, batch_size=32, lr=1e-2, warmup_steps=4, precision="fp16", progress=False,
                             device="cpu", save_every=8)
        return model, train(model, loss_fn, (x, y), config, state_file=state_file)

    whole, whole_run = run()
    state = tmp_path / "state.safetensors"
    with pytest.raises(KeyboardInterrupt):
        run(state, stop_at=13)  # saved after step 8 and stopped in step 14
    with safe_open(str(state), framework="pt") as f:
        saved_scale = json.loads(f.metadata()["minisd_train_state"])["scaler"]["scale"]
    assert saved_scale < 2.0**16  # the scale had come down: what the resume must not forget
    resumed, resumed_run = run(state)
    assert resumed_run.resumed_from == 8 and resumed_run.losses == whole_run.losses
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), whole.parameters()))


def test_ema_update_equals_the_formula_tensor_by_tensor():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5))
    ema = EMA(model, decay=0.9)
    before = copy.deepcopy(ema.model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].running_mean.add_(1.0)
    ema.update(model, step=50)
    d = min(0.9, 51 / 60)
    for (name, p), avg in zip(model.state_dict().items(), ema.model.state_dict().values()):
        want = p if "running" in name or "num_batches" in name else d * before[name] + (1 - d) * p
        assert torch.allclose(avg, want, atol=1e-6), name


def test_clip_grad_norm_equals_pytorchs():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 7), torch.nn.Linear(6, 7)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        (m(torch.randn(5, 6, generator=torch.Generator().manual_seed(1))) ** 2).sum().backward()
    ours = clip_grad_norm(list(a.parameters()), 0.5)
    theirs = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
    assert torch.allclose(ours, theirs) and ours > 0.5
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad)


def test_bench_host_quick_gives_rows_for_every_stage(tmp_path):
    result = run_bench(["host"], out=tmp_path / "bench.json", repeats=1, quick=True, log=None)
    rows = result["suites"]["host"]
    for stage in HOST_STAGES:
        what = {r["what"]: r for r in rows if r["what"].startswith(stage)}
        assert what[f"{stage}: reads of values per step"]["value"] <= 0.2
        # the host issues the same operations whatever the batch: no Python or launch per row
        few = what[f"{stage}: … a step with {FEW_ROWS} rows per batch"]
        assert few["note"].startswith("the same operations"), few["note"]
        # so the loop's share is the time with few rows less the stand-in's own forward and backward
        network = what[f"{stage}: … the stand-in's own forward and backward"]["value"]
        assert 0 < network < few["value"]
        assert what[f"{stage}: host time per step"]["value"] == pytest.approx(few["value"] - network, abs=1e-6)
        assert what[f"{stage}: operations per step"]["value"] > 50
        assert what[f"{stage}: … with the weights per tensor"]["value"] > 0
    assert (tmp_path / "bench.json").is_file()


@pytest.mark.parametrize("stage", HOST_STAGES)
def test_what_the_host_bench_subtracts_as_the_networks_own_work_runs_in_the_step(stage):
    ms, info = bench_host.host_ms_per_step(stage, "tiny", steps=3, warmup=2, repeats=1)
    tensors, steps = info["parameter_tensors"], 3
    network, step = info["network_operations"], info["operations"]
    assert not network - step, dict(network - step)  # every operation subtracted is one the step runs
    # at least one operation a weight forward (the stack) and one backward (its gradient handed over)
    assert network.total() / steps >= 2 * tensors and 0 < info["network_ms"] < ms


def test_the_host_time_falls_back_to_the_batch_when_the_host_works_per_row(monkeypatch):
    """A loss with Python per row issues more operations at the preset's batch than with few rows:
    then the few rows' time is not the host's share, and the batch's time is used."""
    real_setup = bench_host.stage_setup

    def per_row_setup(*args, **kwargs):
        model, loss_fn, data, config, hook = real_setup(*args, **kwargs)

        def loss_per_row(m, batch, generator):
            for image in batch[:4096]:  # a step of work for every row: what the loop must not do
                image.float().sum()
            return loss_fn(m, batch, generator)

        return model, loss_per_row, data, config, hook

    monkeypatch.setattr(bench_host, "stage_setup", per_row_setup)
    ms, parts = bench_host.loop_ms_per_step("vae", "tiny", steps=3, warmup=2, repeats=1)
    assert not parts["same_operations"]
    assert ms == pytest.approx(parts["at_batch"][0] - parts["network_ms"])
