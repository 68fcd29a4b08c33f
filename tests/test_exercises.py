"""The exercise checks (`minisd.exercises`) and the student edition of the notebooks.

Each check must accept a right answer and turn down a wrong one; the right answers here are
worked out independently of the checks (by hand or by brute force), the wrong ones are the
mistakes a learner makes. The student edition is built with nbconvert and run under nbval."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minisd import data
from minisd.diffusion import NoiseSchedule
from minisd.exercises import CHECKS, EXERCISES, check, main, student_edition

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(autouse=True)
def learner_mode(monkeypatch):
    """As a learner runs `check`: not strict (notebooks/conftest.py sets MINISD_CHECK_STRICT=1 for the
    whole test session; the tests of strict mode set it themselves)."""
    monkeypatch.delenv("MINISD_CHECK_STRICT", raising=False)


def hand_square():
    """A large red square in the center, drawn from its signed distance as chapter 0 draws the circle."""
    S, r = 32, 0.21 * 32
    ys, xs = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    d = torch.maximum((xs - 16).abs(), (ys - 16).abs()) - 0.85 * r
    return ((0.5 - d).clamp(0, 1) * torch.tensor(data.COLORS["red"]).view(3, 1, 1).float() + 0.5).to(torch.uint8)


def smallest_beta_end():
    """The smallest β_end with ᾱ_999 < 1e-3, by bisection on the real schedule."""
    lo, hi = 1e-3, 0.1
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if NoiseSchedule(1000, "linear", beta_end=mid).alphas_cumprod[-1] < 1e-3 else (mid, hi)
    return hi


def x3_by_simulation(alphas):
    """x₃'s factor and noise variance, measured: run the three noising steps on 400,000 samples."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(400_000, generator=g, dtype=torch.float64)
    x = x0
    for a in alphas:
        x = a.sqrt() * x + (1 - a).sqrt() * torch.randn(len(x), generator=g, dtype=torch.float64)
    signal = (x * x0).mean() / (x0 * x0).mean()
    return signal.item(), (x - signal * x0).var().item()


def x3_exact(alphas):
    return alphas.prod().sqrt(), 1 - alphas.prod()


def logsnr_betas_by_loop(T):
    betas, prev = [], 1.0
    for t in range(T):
        lam = 10 - 20 * t / (T - 1)
        abar = 1 / (1 + math.exp(-lam))
        betas.append(1 - abar / prev)
        prev = abar
    return torch.tensor(betas, dtype=torch.float64)


RIGHT = {
    "00.1": lambda: "a small white triangle in the bottom right",
    "00.2": hand_square,
    "00.4": lambda: 0.1,
    "01.1": lambda: x3_exact,
    "01.2": lambda: round(smallest_beta_end() * 1.01, 4),
    "01.3": lambda: logsnr_betas_by_loop,
    "01.4": lambda: math.prod(1 - b for b in torch.linspace(1e-4, 0.02, 10).tolist()),
}
WRONG = {
    "00.1": ["a small white triangle in the bottom left", "a white small triangle in the bottom right", 3],
    "00.2": [hand_square().float(), hand_square()[:, :, :31], torch.roll(hand_square(), 1, dims=2)],
    "00.4": [10, 1 / 180, 0.2, "0.1"],
    "01.1": [lambda a: (a.prod(), 1 - a.prod()), lambda a: (a.prod().sqrt(), a.sum() - 2), lambda a: 1 / 0],
    "01.2": [0.02, 0.012, -1, 1 / smallest_beta_end()],
    "01.3": [lambda T: torch.linspace(1e-4, 0.02, T, dtype=torch.float64),
             lambda T: 1 - torch.sigmoid(torch.linspace(10, -10, T, dtype=torch.float64))],
    "01.4": [0.5, 0.001, math.nan],
}


def ddim_variance_paper(abar_t, abar_prev, eta):
    """σ_t² as DDIM's eq. 16 writes it (Song et al. 2021): η² (1 − ᾱ_t')/(1 − ᾱ_t) (1 − ᾱ_t/ᾱ_t')."""
    return eta**2 * (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)


def cluster_shares_by_loop(points, centres):
    """Each point's nearest centre by a plain loop over the centres, then the fraction per centre."""
    counts = [0] * len(centres)
    for p in points.tolist():
        dists = [(p[0] - c[0]) ** 2 + (p[1] - c[1]) ** 2 for c in centres.tolist()]
        counts[dists.index(min(dists))] += 1
    return torch.tensor(counts, dtype=torch.float64) / len(points)


RIGHT.update({
    "02.1": lambda: ([0], [500, 0]),  # by hand: k = 1000 // n, the list 0, k, …, visited from the top
    "02.3": lambda: ddim_variance_paper,
    "02.4": lambda: cluster_shares_by_loop,
})
WRONG.update({
    "02.1": [([999], [999, 499]), ([0], [0, 500]), ([1000], [1000, 500]), [0, 500], ([0], [500])],
    "02.3": [lambda a, p, e: ddim_variance_paper(a, p, e).sqrt(),                    # σ, not σ²
             lambda a, p, e: e * (1 - p) / (1 - a) * (1 - a / p),                   # η not squared
             lambda a, p, e: e**2 * (1 - a / p),                                     # the forward β of the jump
             lambda a, p, e: ddim_variance_paper(p, a, e),                           # ᾱ_t and ᾱ_t' swapped
             lambda a, p, e: 1 / 0],
    "02.4": [lambda x, c: torch.bincount(torch.cdist(x, c).argmin(1), minlength=len(c)),          # counts
             lambda x, c: torch.bincount(torch.cdist(x, c).argmax(1), minlength=len(c)) / len(x),  # farthest
             lambda x, c: torch.bincount(torch.cdist(x, c).argmin(1)) / len(x)],                   # no minlength
})


def down_and_middle(unet, x, temb):
    """The U-Net's down path and bottleneck, written out: (the bottleneck's output, the skip stack)."""
    h = unet.conv_in(x)
    skips = [h]
    for level, down in zip(unet.down, unet.downsample):
        for res, attn in zip(level.res, level.attn):
            h = attn(res(h, temb))
            skips.append(h)
        if not isinstance(down, torch.nn.Identity):
            h = down(h)
            skips.append(h)
    return unet.mid2(unet.mid_attn(unet.mid1(h, temb)), temb), skips


def unet_forward_zeroing_written_out(unet, x, t, zeroed):
    """03.1 by hand: the U-Net's forward pass with its skip stack, zeros for the skips of a side in zeroed."""
    temb = unet.time(t)
    h, skips = down_and_middle(unet, x, temb)
    for level, up in zip(unet.up, unet.upsample):
        for res, attn in zip(level.res, level.attn):
            skip = skips.pop()
            h = attn(res(torch.cat([h, skip * (skip.shape[-1] not in zeroed)], dim=1), temb))
        h = up(h)
    return unet.conv_out(torch.nn.functional.silu(unet.norm_out(h)))


def zeroing_ignored(unet, x, t, zeroed):
    return unet(x, t)


def zeroing_everything(unet, x, t, zeroed):
    return unet_forward_zeroing_written_out(unet, x, t, {x.shape[-1] >> k for k in range(8)})


def zeroing_one_level_too_deep(unet, x, t, zeroed):  # zeroes the skips half the size of those asked for
    return unet_forward_zeroing_written_out(unet, x, t, {s // 2 for s in zeroed})


def zeroing_queue_not_stack(unet, x, t, zeroed):
    """The skips taken first in, first out: the shapes do not fit."""
    temb = unet.time(t)
    h, skips = down_and_middle(unet, x, temb)
    for level, up in zip(unet.up, unet.upsample):
        for res, attn in zip(level.res, level.attn):
            h = attn(res(torch.cat([h, skips.pop(0)], dim=1), temb))
        h = up(h)
    return unet.conv_out(torch.nn.functional.silu(unet.norm_out(h)))


def up_inputs_by_hand(config):
    """03.5 by walking the U: the channel count of every skip pushed, then the up path's concatenations."""
    chans = [config.base_channels * m for m in config.channel_mults]
    pushed = [chans[0]]                                           # conv_in
    for i, c in enumerate(chans):
        pushed += [c] * config.blocks_per_level                   # the level's residual blocks
        if i + 1 < len(chans):
            pushed.append(c)                                      # its Downsample
    h, inputs = chans[-1], []
    for c in reversed(chans):
        for _ in range(config.blocks_per_level + 1):
            inputs.append(h + pushed.pop())
            h = c
    return inputs


def up_inputs_without_downsample_pushes(config):
    chans = [config.base_channels * m for m in config.channel_mults]
    pushed = [chans[0]] + [c for c in chans for _ in range(config.blocks_per_level)]
    h, inputs = chans[-1], []
    for c in reversed(chans):
        for _ in range(config.blocks_per_level):
            inputs.append(h + pushed.pop())
            h = c
    return inputs


def up_inputs_gives_outputs(config):
    """The blocks' output channels instead of their inputs: the concatenated skip forgotten."""
    return [config.base_channels * m for m in reversed(config.channel_mults) for _ in range(config.blocks_per_level + 1)]


RIGHT.update({
    "03.1": lambda: unet_forward_zeroing_written_out,
    "03.5": lambda: up_inputs_by_hand,
})
WRONG.update({
    "03.1": [zeroing_ignored, zeroing_everything, zeroing_one_level_too_deep, zeroing_queue_not_stack],
    "03.5": [up_inputs_without_downsample_pushes, up_inputs_gives_outputs,
             lambda config: up_inputs_by_hand(config)[::-1], lambda config: 96],
})


def test_03_1_reference_all_zeroed_is_the_no_skip_unet():
    """The check's reference with every skip zeroed is minisd's own ablation, skip_connections=False."""
    import dataclasses

    from minisd.exercises import _unet_with_zeroed_skips
    from minisd.unet import UNet, UNetConfig

    config = UNetConfig(base_channels=8, channel_mults=(1, 2, 2), blocks_per_level=2, attention_levels=(1,),
                        norm_groups=4)
    unet, ablated = UNet(config), UNet(dataclasses.replace(config, skip_connections=False))
    ablated.load_state_dict(unet.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(_unet_with_zeroed_skips(unet, x, t, {16, 8, 4}), ablated(x, t))
        torch.testing.assert_close(unet_forward_zeroing_written_out(unet, x, t, set()), unet(x, t))


def ch04_top_weights():
    """04.1 by hand: scale the scores, softmax written out with exp."""
    q = torch.tensor([2.0, 0.0])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]])
    tops = []
    for c in (5.0, 0.2):
        e = torch.exp(c * (k @ q) / math.sqrt(2))
        tops.append((e / e.sum()).max().item())
    return tuple(tops)


def fused_attention_by_sdpa(q, k, v, mask):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


RIGHT.update({"04.1": ch04_top_weights, "04.5": lambda: fused_attention_by_sdpa})
WRONG.update({
    "04.1": [ch04_top_weights()[::-1],                                      # swapped
             (0.9998, 0.3),                                                 # made up
             tuple((c * torch.tensor([2.0, 0.0]) @ torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]]).T)
                   .softmax(-1).max().item() for c in (5.0, 0.2))],        # scores not divided by √d
    "04.5": [lambda q, k, v, m: fused_attention_by_sdpa(q, k, v, None if m is None else ~m),  # nn.MultiheadAttention's sense
             lambda q, k, v, m: fused_attention_by_sdpa(q, k, v, None),                      # mask ignored
             lambda q, k, v, m: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=1.0)],
})


def ch05_matches_by_loop(labels, mentioned):
    """Image j fits caption k: every attribute caption k states agrees — one pair and one attribute at a time."""
    B = len(labels)
    out = torch.zeros(B, B, dtype=torch.bool)
    for j in range(B):
        for k in range(B):
            out[j, k] = all(labels[j, a] == labels[k, a] or not mentioned[k, a] for a in range(4))
    return out


def ch05_accuracy_with_minisd(model, tokenizer, images, labels, names, templates):
    from minisd.clip import zero_shot_classify

    return (zero_shot_classify(model, tokenizer, images, names, templates) == labels).float().mean().item()


def ch05_accuracy_first_template(model, tokenizer, images, labels, names, templates):
    return ch05_accuracy_with_minisd(model, tokenizer, images, labels, names, templates[:1])


def ch05_accuracy_argmin(model, tokenizer, images, labels, names, templates):
    from minisd.clip import class_embeddings, embed_images

    sims = embed_images(model, images) @ class_embeddings(model, tokenizer, names, templates).T
    return (sims.argmin(1).cpu() == labels).float().mean().item()


RIGHT.update({
    "05.3": lambda: ch05_matches_by_loop,
    "05.4": lambda: ch05_accuracy_with_minisd,
})
WRONG.update({
    "05.3": [lambda labels, mentioned: (labels[:, None] == labels[None]).all(-1),               # exact labels only
             lambda labels, mentioned: ch05_matches_by_loop(labels, mentioned).T,               # transposed
             lambda labels, mentioned: ((labels[:, None] == labels[None]) & mentioned[None]).all(-1),
             lambda labels, mentioned: ch05_matches_by_loop(labels, mentioned).float()],
    "05.4": [ch05_accuracy_first_template, ch05_accuracy_argmin,
             lambda *args: 100 * ch05_accuracy_with_minisd(*args),                                # a percentage
             lambda *args: 1 - ch05_accuracy_with_minisd(*args)],                                 # the error rate
})


def active_channels_by_distributions(mean, logvar):
    """06.1 by torch.distributions: each number's KL to N(0, 1), one channel at a time in a loop."""
    from torch.distributions import Normal, kl_divergence

    count = 0
    for c in range(mean.shape[1]):
        q = Normal(mean[:, c].double(), (0.5 * logvar[:, c].double()).exp())
        per_image = kl_divergence(q, Normal(0.0, 1.0)).flatten(1).sum(1)  # (B,)
        count += bool(per_image.mean() >= math.log(2))
    return count


def sample_psnr_by_hand(model, images, generator):
    """06.2 with the PSNR written out: 10·log10(1 / MSE) per image, pixels in [0, 1]."""
    with torch.no_grad():
        z = model.encode(images.float() / 127.5 - 1).sample(generator)
        recon = ((model.decode(z) + 1) / 2).clamp(0, 1)
    mse = ((recon - images.float() / 255) ** 2).reshape(len(images), -1).mean(1)
    return sum(10 * math.log10(1 / m) for m in mse.tolist()) / len(images)


def sample_psnr_wrong(use):
    from minisd.vae import psnr

    def f(model, images, generator):
        with torch.no_grad():
            q = model.encode(data.normalize(images))
            if use == "mean":
                return psnr(data.denormalize(model.decode(q.mode())), images.float() / 255)
            if use == "no denormalize":
                return psnr(model.decode(q.sample(generator)), data.normalize(images))
            return psnr(data.denormalize(model.decode(q.sample(torch.Generator().manual_seed(99)))),
                        images.float() / 255)  # its own noise, not the generator passed in
    return f


def attribute_accuracy_by_loop(images, labels):
    """06.4 counted image by image and attribute by attribute."""
    from minisd.metrics import read_attributes

    right = [0, 0, 0, 0]
    for image, label in zip(images, labels):
        read = read_attributes(image[None])[0].tolist()
        for k in range(4):
            right[k] += read[k] == label[k].item()
    return torch.tensor(right) / len(images)


def noise_latents_rewritten(z, abar, scale, eps):
    """06.5: the scale cancels on the signal, so only the noise is divided by it."""
    return math.sqrt(abar) * z + math.sqrt(1 - abar) / scale * eps


def nearest_mean_by_loop(train_x, train_y, test_x, test_y):
    """06.6: class means and distances in plain Python loops."""
    classes = sorted(set(train_y.tolist()))
    means = {k: train_x[train_y == k].mean(0) for k in classes}
    right = 0
    for x, y in zip(test_x, test_y):
        best = min(classes, key=lambda k: ((x - means[k]) ** 2).sum().item())
        right += best == y.item()
    return right / len(test_y)


def nearest_neighbour(train_x, train_y, test_x, test_y):
    return (train_y[torch.cdist(test_x, train_x).argmin(1)] == test_y).float().mean().item()


RIGHT.update({
    "06.1": lambda: active_channels_by_distributions,
    "06.2": lambda: sample_psnr_by_hand,
    "06.4": lambda: attribute_accuracy_by_loop,
    "06.5": lambda: noise_latents_rewritten,
    "06.6": lambda: nearest_mean_by_loop,
})
WRONG.update({
    "06.1": [lambda m, lv: int((0.5 * (m**2 + lv.exp() - 1 - lv)).sum(dim=(2, 3)).mean(0).ge(1.0).sum()),  # 1 nat
             lambda m, lv: int((0.5 * (m**2 + lv.exp() - 1 - lv)).mean(dim=(2, 3)).mean(0).ge(math.log(2)).sum()),
             lambda m, lv: int((0.5 * (m**2 + lv.exp() - 1 - lv)).sum(dim=(2, 3)).amax(0).ge(math.log(2)).sum())],
    "06.2": [sample_psnr_wrong("mean"), sample_psnr_wrong("no denormalize"), sample_psnr_wrong("other noise")],
    "06.4": [lambda x, y: attribute_accuracy_by_loop(x, y).mean(),
             lambda x, y: 100 * attribute_accuracy_by_loop(x, y),
             lambda x, y: attribute_accuracy_by_loop(x, y.flip(1))],
    "06.5": [lambda z, a, s, e: math.sqrt(a) * s * z + math.sqrt(1 - a) * e,
             lambda z, a, s, e: math.sqrt(a) * z + math.sqrt(1 - a) * e,
             lambda z, a, s, e: a * z + (1 - a) / s * e],
    "06.6": [nearest_neighbour,
             lambda *a: 1 - nearest_mean_by_loop(*a),
             lambda tx, ty, vx, vy: nearest_mean_by_loop(tx, ty, tx, ty)],
})


def unknown_words_by_decoding():
    """The words that come back as <unk> after a round trip through the course's tokenizer."""
    from minisd.tokenizer import shapes_tokenizer

    tok, prompt = shapes_tokenizer(paraphrases=True), "a big crimson circle in the middle"
    ids, mask = tok([prompt])
    decoded = [tok.vocab[i] for i in ids[0][mask[0]].tolist()][1:-1]  # without <start> and <end>
    return [w for w, d in zip(prompt.split(), decoded) if d == "<unk>"]


RIGHT.update({"07.4": unknown_words_by_decoding})
WRONG.update({"07.4": [["crimson", "big"], [], ["middle"], "crimson", ["crimson", "blue"]]})


def last_to_settle_by_masking(settle, final_ok, attribute, prompts, first_seed):
    """The runs that settle last, with tensor operations: mask the runs that never settle, take the maximum,
    then read each run's prompt and seed off its index."""
    s = settle[:, attribute].where(final_ok[:, attribute], torch.tensor(-1))
    runs = (s == s.max()).nonzero()[:, 0].tolist() if s.max() >= 0 else []
    P = len(prompts)
    return [(prompts[i % P], first_seed + i // P) for i in runs]


def last_to_settle_argmax(settle, final_ok, attribute, prompts, first_seed):   # one run only, ties lost
    s = settle[:, attribute].where(final_ok[:, attribute], torch.tensor(-1))
    i = int(s.argmax())
    return [(prompts[i % len(prompts)], first_seed + i // len(prompts))]


def last_to_settle_unfiltered(settle, final_ok, attribute, prompts, first_seed):  # never-settled runs kept
    s = settle[:, attribute]
    P = len(prompts)
    return [(prompts[i % P], first_seed + i // P) for i in (s == s.max()).nonzero()[:, 0].tolist()]


def last_to_settle_swapped(settle, final_ok, attribute, prompts, first_seed):    # prompt-major bookkeeping
    runs = last_to_settle_by_masking(settle, final_ok, attribute, list(range(len(prompts))), 0)
    P, S = len(prompts), len(settle) // len(prompts)
    out = []
    for p, s in runs:
        i = p + P * s
        out.append((prompts[i // S], first_seed + i % S))
    return out


def fraction_and_t_by_hand(frames, sampler):
    """t from the spacing rules as diffusers writes them (T = 1000), not from sampler.timesteps."""
    n, T = len(sampler.timesteps), 1000
    ts = []
    for k in frames.tolist():
        if k == n:
            ts.append(0)                                             # the final image
        elif sampler.timestep_spacing == "leading":
            ts.append((n - 1 - k) * (T // n))
        elif sampler.timestep_spacing == "trailing":
            ts.append(round(T - k * T / n) - 1)
        else:                                                        # DPM-Solver++'s linspace over n + 1 points
            ts.append(round((T - 1) * (n - k) / n))
    return torch.tensor([k / n for k in frames.tolist()]), torch.tensor(ts)


def object_ratio_by_loop(maps, mask):
    steps, tokens, h, w = maps.shape
    area = sum(mask[y, x].item() for y in range(h) for x in range(w)) / (h * w)
    out = torch.zeros(steps, tokens, dtype=torch.float64)
    for s in range(steps):
        for k in range(tokens):
            on = sum(maps[s, k, y, x].item() * mask[y, x].item() for y in range(h) for x in range(w))
            total = sum(maps[s, k, y, x].item() for y in range(h) for x in range(w))
            out[s, k] = on / total / area
    return out


RIGHT.update({
    "08.1": lambda: last_to_settle_by_masking,
    "08.3": lambda: fraction_and_t_by_hand,
    "08.4": lambda: object_ratio_by_loop,
})
WRONG.update({
    "08.1": [last_to_settle_argmax, last_to_settle_unfiltered, last_to_settle_swapped,
             lambda s, ok, a, p, f: last_to_settle_by_masking(s, ok, a, p, 0),                # seed offset dropped
             lambda s, ok, a, p, f: last_to_settle_by_masking(-s, ok, a, p, f),               # the first to settle
             lambda s, ok, a, p, f: (s == s[:, a].max()).nonzero().tolist()],                 # not (prompt, seed)
    "08.3": [lambda k, smp: (k / len(smp.timesteps), 1000 * (1 - k / len(smp.timesteps))),   # t from a formula
             lambda k, smp: (k / len(smp.timesteps), smp.timesteps[(k - 1).clamp(min=0)]),   # off by one step
             lambda k, smp: (k / (len(smp.timesteps) + 1), fraction_and_t_by_hand(k, smp)[1]),  # n + 1 frames
             lambda k, smp: (k / len(smp.timesteps), smp.timesteps[k.clamp(max=len(smp.timesteps) - 1)]),
             lambda k, smp: (k / len(smp.timesteps), smp.timesteps[k])],                     # frame n: IndexError
    "08.4": [lambda m, mask: (m * mask).sum((-2, -1)) / m.sum((-2, -1)),                      # not over the area
             lambda m, mask: (m * mask).sum((-2, -1)) / mask.sum() / mask.mean(),             # Σ A·m / Σ m
             lambda m, mask: object_ratio_by_loop(m, mask).T,                                 # (tokens, steps)
             lambda m, mask: (m * mask).sum((-2, -1)) / m.sum((-3, -2, -1))[:, None] / mask.mean()],  # over tokens
})


def channels_last_strides_by_hand(shape):
    """Strides of (B, C, H, W) laid out as (B, H, W, C): the channel moves fastest, then the column, the row."""
    B, C, H, W = shape
    return (H * W * C, 1, W * C, C)


def rows_by_chunks(draw, n, rank, world):
    """The whole global batch, cut into `world` equal pieces: piece `rank`."""
    return torch.stack(draw(n * world).chunk(world))[rank]


KINDS_09 = ("convolution", "attention / matmul", "normalisation", "elementwise & other", "optimiser",
            "Python & framework")


def shares_by_kind_by_rules(rows):
    """9.2's bookkeeping written as an ordered list of (rule, kind): the first rule that matches a row wins."""
    rules = [(lambda name, phase: name in ("forward", "backward", "optimiser step"), "Python & framework"),
             (lambda name, phase: phase == "optimiser step", "optimiser"),
             (lambda name, phase: re.search(r"conv", name, re.I), "convolution"),
             (lambda name, phase: re.search(r"addmm|aten::mm|bmm|matmul|linear|attention|softmax", name, re.I),
              "attention / matmul"),
             (lambda name, phase: re.search(r"norm", name, re.I) and "_foreach" not in name, "normalisation"),
             (lambda name, phase: re.search(r"_foreach|adam|optimizer", name, re.I), "optimiser"),
             (lambda name, phase: True, "elementwise & other")]
    seconds = dict.fromkeys(KINDS_09, 0.0)
    for name, phase, own, _total in rows:
        seconds[next(kind for rule, kind in rules if rule(name, phase))] += own
    return {k: v / sum(seconds.values()) for k, v in seconds.items()}


def shares_from_total_time(rows):  # a wrong answer: total (inclusive) seconds count the children twice
    return shares_by_kind_by_rules([(name, phase, total, total) for name, phase, _own, total in rows])


def shares_optimiser_by_name(rows):  # a wrong answer: AdamW's elementwise ops sorted by their names
    return shares_by_kind_by_rules([(name, None if phase == "optimiser step" and name != "optimiser step" else phase,
                                     own, total) for name, phase, own, total in rows])


def shares_without_phases(rows):  # a wrong answer: the phases' own time (Python between the ops) left out
    return shares_by_kind_by_rules([r for r in rows if r[0] not in ("forward", "backward", "optimiser step")])


def seconds_by_kind(rows):  # a wrong answer: seconds, not shares
    total = sum(own for _name, _phase, own, _total in rows)
    return {k: v * total for k, v in shares_by_kind_by_rules(rows).items()}


RIGHT.update({"09.2": lambda: channels_last_strides_by_hand,
              "09.4": lambda: rows_by_chunks,
              "09.5": lambda: shares_by_kind_by_rules})
WRONG.update({
    "09.2": [lambda shape: (shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1),   # contiguous NCHW
             lambda shape: (shape[1] * shape[2] * shape[3], 1, shape[1], shape[1] * shape[2]),   # H and W swapped
             lambda shape: (shape[2] * shape[3] * shape[1], shape[3] * shape[1], shape[1], 1),   # in (B, H, W, C) order
             lambda shape: shape],
    "09.4": [lambda draw, n, rank, world: draw(n),                                 # every process from the same seed
             lambda draw, n, rank, world: draw(n * world)[:n],                      # always the first slice
             lambda draw, n, rank, world: draw(n * world)[rank::world],             # interleaved rows
             lambda draw, n, rank, world: draw(n * world)[rank * n:(rank + 1) * n + 1]],  # one row too many
    "09.5": [shares_from_total_time, shares_optimiser_by_name, shares_without_phases, seconds_by_kind,
             lambda rows: [0.2] * 5],
})


def split_caption_by_loop(text, normalise=True):
    """10.1 worked out character by character, without a regular expression."""
    import unicodedata

    def japanese(ch):
        return ch == "\u3005" or "\u3040" <= ch <= "\u30ff" or "\u3400" <= ch <= "\u4dbf" or \
            "\u4e00" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff"

    tokens, run = [], ""
    for ch in (unicodedata.normalize("NFKC", text) if normalise else text).lower():
        letter = (ch.isalnum() or ch == "_" or unicodedata.category(ch) in ("Mn", "Mc")) and not japanese(ch)
        if letter:
            run += ch
            continue
        if run:
            tokens.append(run)
            run = ""
        if not ch.isspace():
            tokens.append(ch)  # a kana or kanji, or a mark
    return tokens + ([run] if run else [])


RIGHT.update({"10.1": lambda: split_caption_by_loop,
              "10.2": lambda: lambda asked, k: sum(int(a) == k for a in asked) / len(asked)})
WRONG.update({
    "10.1": [lambda text: text.split(),                                                    # spaces only
             lambda text: list(text.replace(" ", "")),                                     # every character
             lambda text: split_caption_by_loop(text, normalise=False),                    # no NFKC: ｔｈｅ stays wide
             lambda text: [t.upper() for t in split_caption_by_loop(text)],                  # not lower case
             lambda text: [t for t in split_caption_by_loop(text) if t.isalnum() or len(t) > 1]],  # marks dropped
    "10.2": [lambda asked, k: sum(int(a) == k for a in asked),                               # a count, not a share
             lambda asked, k: 1 / len(set(int(a) for a in asked)),                           # 1 / number of kinds
             lambda asked, k: max(sum(int(a) == j for a in asked) for j in set(int(a) for a in asked)) / len(asked)],
})


def _regex_rename(key, rules, number=r"[0-9]+", anchored=True):
    """Each rule's source as a regular expression — {i} and {j} named groups matching `number`, anchored at dots
    unless not `anchored` — the leftmost match replaced."""
    for source, target in rules:
        body = re.escape(source).replace(r"\{i\}", rf"(?P<i>{number})").replace(r"\{j\}", rf"(?P<j>{number})")
        m = re.search(rf"(?:^|(?<=\.)){body}(?=\.|$)" if anchored else body, key)
        if m:
            key = key[:m.start()] + target.format(**m.groupdict()) + key[m.end():]
    return key


def rename_by_regex(key, rules):
    """11.1 worked out with regular expressions on the whole key: each rule's source becomes a pattern anchored at
    dots, {i} and {j} named groups of digits; the leftmost match is replaced."""
    return _regex_rename(key, rules)


def rename_substrings(key, rules):
    """Plain text replacement: no numbers, and parts of names match too."""
    for source, target in rules:
        if "{" not in source:
            key = key.replace(source, target, 1)
    return key


def rename_first_rule_only(key, rules):
    """Stops after the first rule that matches."""
    for rule in rules:
        new = rename_by_regex(key, [rule])
        if new != key:
            return new
    return key


def rename_any_part_is_a_number(key, rules):
    """{i} and {j} match any part, not only numbers."""
    return _regex_rename(key, rules, number=r"[^.]+")


def rename_not_anchored(key, rules):
    """Matches inside parts: 'to_out.0' also renames 'xto_out.0' and 'to_out.01'."""
    return _regex_rename(key, rules, anchored=False)


RIGHT.update({"11.1": lambda: rename_by_regex})
WRONG.update({"11.1": [rename_substrings, rename_first_rule_only, rename_any_part_is_a_number, rename_not_anchored,
                       lambda key, rules: key]})                                             # nothing renamed


def test_every_check_has_right_and_wrong_answers_here():
    assert set(RIGHT) == set(CHECKS) == set(WRONG)


@pytest.mark.parametrize("exercise_id", sorted(RIGHT))
def test_check_accepts_the_right_answer(exercise_id, capsys):
    assert check(exercise_id, RIGHT[exercise_id]()) is True
    assert capsys.readouterr().out.startswith(f"✓ {exercise_id}")


@pytest.mark.parametrize("exercise_id", sorted(WRONG))
def test_check_turns_down_wrong_answers_without_raising_or_telling(exercise_id, capsys):
    for wrong in WRONG[exercise_id]:
        assert check(exercise_id, wrong) is False, wrong
        said = capsys.readouterr().out
        assert said.startswith(f"✗ {exercise_id}") and "Hint:" in said


def test_the_simulation_agrees_with_the_exact_x3():
    """The right answer of 01.1 is not only algebra: three real noising steps give the same numbers."""
    alphas = torch.tensor([0.9, 0.7, 0.8], dtype=torch.float64)
    (s_sim, v_sim), (s, v) = x3_by_simulation(alphas), x3_exact(alphas)
    assert abs(s_sim - s.item()) < 0.005 and abs(v_sim - v.item()) < 0.005


def test_no_answer_yet_and_scaffolds_are_not_wrong(capsys, monkeypatch):
    monkeypatch.setenv("MINISD_CHECK_STRICT", "1")  # not even strict mode raises for a missing answer

    def scaffold(alphas):
        ...

    assert check("00.4") is False and check("00.4", None) is False and check("01.1", scaffold) is False
    out = capsys.readouterr().out
    assert out.count("no answer yet") == 3 and "✗" not in out


def test_strict_mode_raises_on_a_wrong_answer(monkeypatch):
    monkeypatch.setenv("MINISD_CHECK_STRICT", "1")
    with pytest.raises(AssertionError, match="00.4"):
        check("00.4", 0.2)


def test_unknown_exercise_says_which_exist(capsys):
    assert check("99.9", 1) is False
    assert "00.1" in capsys.readouterr().out


def test_messages_never_contain_the_answer(capsys):
    check("00.4", 0.3)
    check("01.4", 0.5)
    out = capsys.readouterr().out
    assert "0.1 " not in out and "10 %" not in out and "0.90" not in out


# --- the notebooks' exercise sections ---------------------------------------------------------

def cells_of(path):
    return json.loads(Path(path).read_text())["cells"]


def tagged(cell, tag):
    return tag in cell.get("metadata", {}).get("tags", [])


WITH_SOLUTIONS = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")
                        if any(tagged(c, "solution") for c in cells_of(p)))


def test_some_notebooks_have_solutions():
    assert {p.name[:2] for p in WITH_SOLUTIONS} >= {"00", "01"}


@pytest.mark.parametrize("path", WITH_SOLUTIONS, ids=lambda p: p.name[:2])
def test_every_exercise_has_a_hint_a_solution_and_a_check_or_a_reference(path):
    cells = cells_of(path)
    start = next(i for i, c in enumerate(cells) if "".join(c["source"]).startswith("## Exercises"))
    chapter = path.name[:2]
    numbers, seen = [], {}
    current = None
    for c in cells[start + 1:]:
        text = "".join(c["source"])
        m = re.match(r"\*\*(\d+)\. ", text)
        if c["cell_type"] == "markdown" and m and not c["metadata"].get("tags"):
            current = f"{chapter}.{int(m.group(1))}"
            numbers.append(current)
            continue
        if current is None:
            continue
        for tag in ("hint", "solution"):
            if tagged(c, tag):
                assert c["metadata"]["jupyter"]["source_hidden"] is True, f"{current}: {tag} not collapsed"
                seen.setdefault(current, set()).add(tag)
        for used in re.findall(r'check\("(\d\d\.\d+)"', text):
            assert used == current, f"a cell of exercise {current} checks {used}"
            seen.setdefault(current, set()).add("check" if not tagged(c, "solution") else "solution")
    assert numbers == [f"{chapter}.{k}" for k in range(1, len(numbers) + 1)]
    for ex in numbers:
        assert {"hint", "solution"} <= seen.get(ex, set()), f"{ex} lacks a hint or a solution"
        assert ex in EXERCISES, f"{ex} is not listed in minisd.exercises.EXERCISES"
        if EXERCISES[ex] == "check":
            assert "check" in seen[ex], f"{ex} has a check but no cell calls it"


def test_student_edition_removes_solutions_only(tmp_path):
    written = student_edition(WITH_SOLUTIONS, tmp_path)
    assert [p.name for p in written] == [p.name for p in WITH_SOLUTIONS]
    for original, student in zip(WITH_SOLUTIONS, written):
        before, after = cells_of(original), cells_of(student)
        kept = [c for c in before if not tagged(c, "solution")]
        assert len(after) == len(kept) < len(before)
        assert [c["source"] for c in after] == [c["source"] for c in kept]
        assert not any(tagged(c, "solution") for c in after) and any(tagged(c, "hint") for c in after)
        assert all(not c.get("outputs") for c in after)


def test_student_edition_bad_input(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a notebook")
    assert main(["student", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "notes.txt" in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "notes.txt").exists()


def test_student_edition_runs_top_to_bottom(tmp_path):
    """The student edition of every notebook with solutions, run as the test suite runs the notebooks
    (nbval, quick mode): without its solutions each still runs, and every check says 'no answer yet'."""
    written = student_edition(WITH_SOLUTIONS, tmp_path)
    env = {**os.environ, "MINISD_QUICK": "1", "MINISD_CHECK_STRICT": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                             "--nbval-current-env", "--rootdir", str(tmp_path), *map(str, written)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]

