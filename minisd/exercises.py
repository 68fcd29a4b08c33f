"""Checks for the course's exercises: `check("01.2", answer)` prints ✓, or what is off and a hint.

Every exercise with a checkable answer has one check here, named by its chapter and number
("01.2" is exercise 2 of notebook 01). A check accepts what the exercise asks for — a number,
a tensor, or a function, which it runs on inputs the learner has not seen — and compares it with
a reference computed here from first principles or from `minisd` itself. It never prints the
answer, and it never raises on a wrong answer or on an answer that raises: a learner gets a
message, not a traceback. `check` returns True or False, so a test can use it.

Exercises without a checkable answer (a derivation, an essay question, an open experiment) have
no check; their notebooks give a "what you should see" note and a reference result instead.
`EXERCISES` lists every exercise of the chapters done so far with how it is checked.

The student edition of the notebooks, with every solution cell removed, is built by
`minisd student --out DIR` or `python -m minisd.exercises student --out DIR` (see `student_edition`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

MISSING = object()  # `check(id)` without an answer


class NotAnswered(Exception):
    """Raised inside a check when the learner's function is still the scaffold (it returns None)."""


@dataclass(frozen=True)
class Check:
    """One exercise's check: `judge(answer)` returns None when right, else what is off."""

    exercise: str
    asks: str  # what the answer is, as the notebook asks for it
    hint: str  # shown with every wrong answer; never the answer itself
    judge: Callable[[object], str | None]


CHECKS: dict[str, Check] = {}

# every exercise of the chapters with hints and solutions: id → "check" or what a learner should see
EXERCISES: dict[str, str] = {}


def exercise(exercise_id: str, asks: str, hint: str):
    """Register the decorated function as the check of `exercise_id`."""

    def register(judge):
        CHECKS[exercise_id] = Check(exercise_id, asks, hint, judge)
        EXERCISES[exercise_id] = "check"
        return judge

    return register


def open_exercise(exercise_id: str, see: str) -> None:
    """Register an exercise without a checkable answer, with what the learner should see."""
    EXERCISES[exercise_id] = see


def check(exercise_id: str, answer=MISSING) -> bool:
    """Check `answer` for exercise `exercise_id` ("01.2"); print ✓ or what is off, with a hint.

    Returns whether the answer is right. Raises nothing for a wrong answer, an answer that
    raises, or no answer yet (None). With the environment variable MINISD_CHECK_STRICT=1 (the
    test suite's run of the notebooks with their solutions) a wrong answer raises AssertionError,
    so that a solution which no longer passes its own check fails the test."""
    c = CHECKS.get(exercise_id)
    if c is None:
        known = ", ".join(sorted(CHECKS)) or "none"
        print(f"✗ there is no check for exercise {exercise_id!r}; checks exist for: {known}")
        return False
    if answer is MISSING or answer is None:
        print(f"… {exercise_id}: no answer yet. Give {c.asks}.")
        return False
    try:
        problem = c.judge(answer)
    except NotAnswered:
        print(f"… {exercise_id}: no answer yet (your function returns None). Give {c.asks}.")
        return False
    except Exception as e:  # the learner's function raised: say so, do not raise
        problem = f"your answer raised {type(e).__name__}: {e}"
    if problem is None:
        print(f"✓ {exercise_id}: right.")
        return True
    print(f"✗ {exercise_id}: {problem}\n  Hint: {c.hint}")
    if os.environ.get("MINISD_CHECK_STRICT") == "1":
        raise AssertionError(f"exercise {exercise_id}: {problem}")
    return False


# --- helpers the checks share ------------------------------------------------------------------

def _call(fn, *args):
    """fn(*args), with None (a scaffold's `...` body) read as no answer yet."""
    if not callable(fn):
        raise TypeError(f"the answer should be a function, got {type(fn).__name__}")
    out = fn(*args)
    if out is None:
        raise NotAnswered
    return out


def _number(answer, name: str = "the answer") -> float:
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        raise TypeError(f"{name} should be a number, got {type(answer).__name__}")
    if not math.isfinite(answer):
        raise ValueError(f"{name} is {answer}")
    return float(answer)


def _compare(got, want: torch.Tensor, what: str, rtol: float = 1e-4, atol: float = 1e-6) -> str | None:
    """None if `got` equals `want` (shape and values), else a message that does not show `want`."""
    got = torch.as_tensor(got)
    if tuple(got.shape) != tuple(want.shape):
        return f"{what} has shape {tuple(got.shape)}; expected {tuple(want.shape)}"
    if not torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol):
        worst = (got.double() - want.double()).abs().argmax().item()
        return f"{what} differs from the reference, most at index {worst} (of {got.numel()})"
    return None


# --- chapter 00 --------------------------------------------------------------------------------

@exercise("00.1", "the caption string of the rendered image",
          "build the labels with data.encode_labels(color=…, shape=…, size=…, position=…) and pass the "
          "same four words to data.caption")
def _(answer):
    from minisd.data import caption

    if not isinstance(answer, str):
        return f"the answer should be a string, got {type(answer).__name__}"
    if answer.strip() != caption("white", "triangle", "small", "bottom right"):
        return f"{answer!r} is not the caption of a small white triangle in the bottom right"
    return None


@exercise("00.2", "your hand-drawn large red square in the center: a uint8 tensor (3, 32, 32)",
          "copy the circle's cell and change only the distance: d = max(|x − cx|, |y − cy|) − h with "
          "h = 0.85 r; keep the coverage clamp(½ − d, 0, 1) and the + 0.5 before the uint8 rounding")
def _(answer):
    from minisd import data

    answer = torch.as_tensor(answer)
    if answer.dtype != torch.uint8:
        return f"the image should be uint8 (0–255) like minisd's, got {answer.dtype}"
    labels = data.encode_labels(color="red", shape="square", size="large", position="center")
    want = data.render(labels, 32, jitter=False)[0]
    if tuple(answer.shape) != tuple(want.shape):
        return f"the image has shape {tuple(answer.shape)}; expected (3, 32, 32), channels first"
    diff = (answer.int() - want.int()).abs()
    wrong = diff.amax(0) > 0
    if wrong.any():
        return f"{int(wrong.sum())} of 1024 pixels differ from minisd's render (largest difference {diff.max().item()})"
    return None


open_exercise("00.3", "an argument: with every blue shape held out, 'blue' is never seen in training, "
                      "so a held-out failure tests vocabulary, not composition")


@exercise("00.4", "the chance, as a fraction (e.g. 0.25 for 25 %)",
          "size and position are guessed independently: multiply the chance of each, 1/2 and 1/5")
def _(answer):
    x = _number(answer)
    if x > 1:
        return f"{x} is more than 1: give a fraction, not a percentage"
    if not math.isclose(x, 0.5 * 0.2, rel_tol=1e-6):
        return f"{x:g} is not the chance of guessing both size and position"
    return None


# --- chapter 01 --------------------------------------------------------------------------------

@exercise("01.1", "a function x3_coefficients(alphas) → (signal, noise_variance): for three alphas "
                  "α₁, α₂, α₃, the factor in front of x₀ in x₃ and the variance of its noise",
          "apply x_t = √α_t x_{t−1} + √(1 − α_t) ε_t three times; independent noises add their variances")
def _(answer):
    g = torch.Generator().manual_seed(101)
    for _ in range(5):  # five hidden sets of alphas
        alphas = torch.rand(3, generator=g, dtype=torch.float64) * 0.5 + 0.45
        got = _call(answer, alphas)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            return "the function should return two numbers: (signal factor, noise variance)"
        signal, variance = (_number(v) for v in got)
        if not math.isclose(signal, alphas.prod().sqrt().item(), rel_tol=1e-6):
            return "the factor in front of x₀ is wrong for some alphas"
        if not math.isclose(variance, 1 - alphas.prod().item(), rel_tol=1e-6, abs_tol=1e-12):
            return "the noise variance is wrong for some alphas (the factor in front of x₀ is right)"
    return None


def _linear_abar_end(beta_end: float) -> float:
    from minisd.diffusion import NoiseSchedule

    return NoiseSchedule(1000, "linear", beta_start=1e-4, beta_end=beta_end).alphas_cumprod[-1].item()


@exercise("01.2", "the smallest β_end (to two significant figures) for which ᾱ_{T−1} < 10⁻³ with T = 1000",
          "solve T(β_start + β_end)/2 = ln 1000 for β_end, then check with "
          "NoiseSchedule(1000, 'linear', beta_end=…).alphas_cumprod[-1]")
def _(answer):
    b = _number(answer, "β_end")
    if not 0 < b < 1:
        return f"β_end = {b:g} is not a noise rate between 0 and 1"
    end = _linear_abar_end(b)
    if end >= 1e-3:
        return f"with β_end = {b:g}, ᾱ_(T−1) is still {end:.1e}, not below 10⁻³"
    if _linear_abar_end(b / 1.1) < 1e-3:
        return f"β_end = {b:g} works, but a value 10 % smaller works too: find the smallest"
    return None


@exercise("01.3", "a function logsnr_betas(T) → β (T,), float64, for log SNR falling linearly from +10 "
                  "(t = 0) to −10 (t = T − 1)",
          "ᾱ_t = sigmoid(λ_t) with λ_t = torch.linspace(10, −10, T); then β_t = 1 − ᾱ_t / ᾱ_{t−1} "
          "with ᾱ_{−1} = 1")
def _(answer):
    for T in (7, 1000):
        abar = torch.sigmoid(torch.linspace(10, -10, T, dtype=torch.float64))
        want = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        problem = _compare(_call(answer, T), want, f"β for T = {T}", rtol=1e-5, atol=1e-9)
        if problem:
            return problem
    return None


@exercise("01.4", "ᾱ_9 of the linear schedule with T = 10 (β from 10⁻⁴ to 0.02)",
          "NoiseSchedule(10, 'linear').alphas_cumprod[-1], or the product of (1 − β_t) over the 10 steps")
def _(answer):
    from minisd.diffusion import NoiseSchedule

    want = NoiseSchedule(10, "linear", beta_start=1e-4, beta_end=0.02).alphas_cumprod[-1].item()
    x = _number(answer)
    if not math.isclose(x, want, rel_tol=1e-3):
        return f"{x:.4g} is not ᾱ_9 of this schedule"
    return None


open_exercise("01.5", "the 'corr < 0.5' timestep moves later for x0 * 2 and earlier for x0 * 0.5: "
                      "signal-to-noise is (scale² · ᾱ)/(1 − ᾱ), so a smaller data scale is noise sooner")


# --- chapter 02 --------------------------------------------------------------------------------

@exercise("02.1", "a pair (timesteps for n = 1, timesteps for n = 2) that DDIMSampler(schedule, n) visits with the "
                  "default 'leading' spacing, each a list of integers in the order they are visited",
          "the 'leading' list is 0, k, 2k, … with k = T // n (T = 1000), visited from the largest down; "
          "it never visits T − 1")
def _(answer):
    from minisd.samplers import make_timesteps

    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        return "give two lists, one for n = 1 and one for n = 2: answer = (…, …)"
    for n, got in zip((1, 2), answer):
        got = torch.as_tensor(got).reshape(-1)
        want = make_timesteps(1000, n, "leading")
        if got.numel() != n:
            return f"the list for n = {n} has {got.numel()} timesteps; a sampler with n steps visits n"
        if got.is_floating_point() and not torch.equal(got, got.round()):
            return f"the list for n = {n} holds non-integer timesteps"
        got = got.long()
        if n > 1 and torch.equal(got.flip(0), want) and not torch.equal(got, want):
            return f"the list for n = {n} is in the wrong order: a sampler visits the noisiest timestep first"
        if not torch.equal(got, want):
            return f"the list for n = {n} is not the one DDIMSampler(schedule, {n}) visits"
    return None


def _posterior_variance(abar_t: torch.Tensor, abar_prev: torch.Tensor) -> torch.Tensor:
    """Var(x_t' | x_t, x_0) for the jump from t' to t, by Gaussian conditioning: x_t' has variance 1 − ᾱ_t' given x_0,
    x_t = √α x_t' + √(1 − α) ε with α = ᾱ_t/ᾱ_t', so Cov(x_t', x_t) = √α (1 − ᾱ_t') and Var(x_t) = 1 − ᾱ_t."""
    alpha = abar_t / abar_prev
    return (1 - abar_prev) - alpha * (1 - abar_prev) ** 2 / (1 - abar_t)


@exercise("02.3", "a function ddim_variance(abar_t, abar_prev, eta) → σ_t², the variance of the noise that a DDIM "
                  "step from t to t' adds (abar_t = ᾱ_t, abar_prev = ᾱ_t' > ᾱ_t, as 0-d float64 tensors)",
          "σ_t = η · √((1 − ᾱ_t')/(1 − ᾱ_t)) · √(1 − ᾱ_t/ᾱ_t'); the function returns the variance σ_t², "
          "so η is squared as well")
def _(answer):
    g = torch.Generator().manual_seed(203)
    pairs = []
    for _ in range(6):  # hidden pairs ᾱ_t < ᾱ_t'
        abar_prev = torch.rand((), generator=g, dtype=torch.float64) * 0.9 + 0.05
        pairs.append((abar_prev * (torch.rand((), generator=g, dtype=torch.float64) * 0.9 + 0.05), abar_prev))
    for eta in (1.0, 0.5, 0.25, 0.0):
        for abar_t, abar_prev in pairs:
            got = _number(_call(answer, abar_t.clone(), abar_prev.clone(), eta), "σ_t²")
            want = eta**2 * _posterior_variance(abar_t, abar_prev).item()
            if not math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-12):
                if eta == 1.0:
                    return "at η = 1 the variance is wrong for some (ᾱ_t, ᾱ_t'): there it should be the variance of " \
                           "DDPM's posterior for the same jump"
                return f"right at η = 1, but wrong at η = {eta}: how does σ_t² grow with η?"
    return None


@exercise("02.4", "a function cluster_shares(points, centres) → a tensor (K,): the fraction of the points (N, 2) "
                  "whose nearest of the K centres (K, 2) is centre k",
          "torch.cdist(points, centres).argmin(dim=1) is each point's nearest centre; count with "
          "torch.bincount(…, minlength=K), so that a centre no point is near still gets its 0, and divide by N")
def _(answer):
    g = torch.Generator().manual_seed(204)
    for K, N in ((8, 500), (3, 37)):
        centres = torch.randn(K, 2, generator=g) * 2
        points = centres[torch.randint(0, K, (N,), generator=g)] + 0.7 * torch.randn(N, 2, generator=g)
        centres = torch.cat([centres, torch.tensor([[50.0, 50.0]])])  # a centre no point is near: its share is 0
        nearest = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1).argmin(1)  # (N,)
        want = torch.zeros(K + 1, dtype=torch.float64).index_add_(0, nearest, torch.ones(N, dtype=torch.float64)) / N
        got = torch.as_tensor(_call(answer, points.clone(), centres.clone())).double()
        if got.shape == want.shape and math.isclose(got.sum().item(), N, rel_tol=1e-6):
            return "these look like counts: give fractions (divide by the number of points)"
        problem = _compare(got, want, f"the shares for {K + 1} centres", rtol=1e-5, atol=1e-7)
        if problem:
            return problem
    return None


open_exercise("02.2", "with trailing spacing, 'fixed_large' is worse at 20 steps (MMD² higher in 6 of 6 runs, mean NN "
                      "distance 0.123 against 0.055) and barely at 100: its last step adds noise of sd 0.170 (20 steps) "
                      "that no later step removes, where 'fixed_small' adds none")
open_exercise("02.5", "12 blocks at about the same compute (half the steps, 1.9× the time per step) do not draw more "
                      "single objects: one blob 39 % against 48 % of 64 samples, within the standard error")


# --- chapter 03 --------------------------------------------------------------------------------

def _skip_stack(config, size: int) -> list[tuple[int, int]]:
    """(channels, side) of every feature map the U-Net's down path pushes onto the skip stack, in push
    order, for a square input of side `size`: conv_in's output, every residual block's output, and every
    Downsample's output (not after the last level)."""
    chans = [config.base_channels * m for m in config.channel_mults]
    stack = [(chans[0], size)]
    for i, c in enumerate(chans):
        stack += [(c, size >> i)] * config.blocks_per_level
        if i < len(chans) - 1:
            stack.append((c, size >> (i + 1)))
    return stack


def _unet_with_zeroed_skips(unet, x, t, zeroed):
    """minisd's own UNet.forward, with zeros in place of every skip of side in `zeroed`: a pre-hook on each
    up-path residual block zeroes the skip's channels, the last ones of its concatenated input."""
    stack, handles = _skip_stack(unet.config, x.shape[-1]), []

    def zero_tail(channels):
        def hook(module, args):
            h = args[0].clone()
            h[:, -channels:] = 0
            return (h, *args[1:])
        return hook

    for level in unet.up:
        for res in level.res:
            channels, side = stack.pop()  # the up path pops the stack, the last pushed first
            if side in zeroed:
                handles.append(res.register_forward_pre_hook(zero_tail(channels)))
    try:
        with torch.no_grad():
            return unet(x, t)
    finally:
        for handle in handles:
            handle.remove()


@exercise("03.1", "a function unet_forward_zeroing(unet, x, t, zeroed) → the U-Net's output (B, C, H, W), "
                  "with zeros (of the same shape) in place of every skip whose feature map is s × s for s in zeroed",
          "copy unet_forward and change only where a skip is popped: if skip.shape[-1] in zeroed, use "
          "torch.zeros_like(skip); everything else — the pushes, the concatenation, the blocks — stays as it is")
def _(answer):
    from minisd.unet import UNet, UNetConfig

    g = torch.Generator().manual_seed(303)
    for mults, blocks, size in (((1, 2), 2, 16), ((1, 2, 2), 1, 16)):  # hidden U-Nets, not the chapter's
        torch.manual_seed(3)
        unet = UNet(UNetConfig(base_channels=8, channel_mults=mults, blocks_per_level=blocks,
                               attention_levels=(), norm_groups=4)).eval()
        x = torch.randn(2, 3, size, size, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        sides = sorted({side for _, side in _skip_stack(unet.config, size)}, reverse=True)
        for zeroed in [set(), {sides[0]}, {sides[-1]}, set(sides)]:
            want = _unet_with_zeroed_skips(unet, x, t, zeroed)
            with torch.no_grad():
                got = _call(answer, unet, x, t, set(zeroed))
            if not isinstance(got, torch.Tensor):
                return f"the function should return a tensor, got {type(got).__name__}"
            problem = _compare(got, want, f"the output with zeroed = {zeroed or '{}'} (skip sides {sides})",
                               rtol=1e-4, atol=1e-5)
            if problem:
                if not zeroed:
                    problem += "; with nothing zeroed it should equal unet(x, t)"
                return problem
    return None


open_exercise("03.2", "with ε as target the no-skip U-Net fails: ε-loss 0.96 (the U-Net 0.05, 150 steps each), x̂_0 "
                      "errors 9 to 32 times the U-Net's, nearly all detail, as (1 − ᾱ_t)/ᾱ_t × its ε-loss predicts")

open_exercise("03.3", "ConvDenoiser with the U-Net's training time (1074 steps here) beats the U-Net on v-loss and x̂_0 "
                      "error, but its one-blob share does not measurably move (39 → 45 %, intervals overlap; U-Net 72 %)")

open_exercise("03.4", "the share of the centre pixel's gradient from outside the 17×17 window grows with depth "
                      "(24, 42, 46 % untrained); without GroupNorm and attention it is about 0.1 % at every depth")


@exercise("03.5", "a function up_inputs(config) → the input channels of each residual block of the up path, "
                  "in the order they run (a list of ints), from the UNetConfig alone",
          "replay the skip stack: push conv_in's output, every residual block's output and every Downsample's "
          "output on the way down; on the way up each block takes the channels from below plus one popped skip")
def _(answer):
    from minisd.unet import UNet, UNetConfig

    for mults, blocks in (((1, 2), 2), ((1, 2, 4), 1), ((1, 2, 2), 2), ((1, 1, 2, 2), 3)):
        config = UNetConfig(base_channels=8, channel_mults=mults, blocks_per_level=blocks, attention_levels=())
        want = [res.conv1.in_channels for level in UNet(config).up for res in level.res]
        got = _call(answer, config)
        try:
            got = [int(c) for c in got]
        except TypeError:
            return f"the function should return a list of channel counts, got {type(got).__name__}"
        where = f"for channel_mults={mults}, blocks_per_level={blocks}"
        if len(got) != len(want):
            return f"{where} your list has the wrong number of up-path residual blocks ({len(got)})"
        wrong = [k for k, (a, b) in enumerate(zip(got, want)) if a != b]
        if wrong:
            return f"{where} block {wrong[0]} (counting from 0, in running order) gets a different number of channels"
    return None


# --- chapter 04 --------------------------------------------------------------------------------

def _ch04_example() -> tuple[torch.Tensor, torch.Tensor]:
    """The three queries and four keys of 4.1 (right, up, diagonal; right, up, left, diagonal)."""
    q = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]], dtype=torch.float64)
    return q, k


@exercise("04.1", "a pair (w5, w02): the largest attention weight of query 0 of 4.1 (the one pointing right) when all "
                  "queries are multiplied by 5, and when they are multiplied by 0.2",
          "multiplying q by c multiplies every score q·k/√d by c: recompute softmax(c · q Kᵀ/√d) for query 0 "
          "(d = 2) and take the largest of its four weights")
def _(answer):
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        raise TypeError("give a pair (w5, w02)")
    w5, w02 = (_number(a, name) for a, name in zip(answer, ("w5", "w02")))
    q, k = _ch04_example()
    want = {c: (c * q[0] @ k.T / math.sqrt(2)).softmax(-1).max().item() for c in (5.0, 0.2)}
    if math.isclose(w5, want[0.2], rel_tol=1e-3) and math.isclose(w02, want[5.0], rel_tol=1e-3):
        return "the two are swapped: a larger scale makes softmax more peaked"
    for c, got in ((5.0, w5), (0.2, w02)):
        if not math.isclose(got, want[c], rel_tol=1e-3):
            unscaled = (c * q[0] @ k.T).softmax(-1).max().item()
            if math.isclose(got, unscaled, rel_tol=1e-3):
                return f"the weight at ×{c:g} is that of scores not divided by √d"
            return f"the largest weight at ×{c:g} is off"
    return None


@exercise("04.5", "a function fused_attention(q, k, v, mask) → the output of F.scaled_dot_product_attention with "
                  "the course's boolean mask (True = may attend, broadcasting to (..., Lq, Lk)), equal to "
                  "minisd.attention.attention(q, k, v, mask)",
          "F.scaled_dot_product_attention(q, k, v, attn_mask=mask) reads a boolean mask as True = may attend, "
          "the same as the course; nn.MultiheadAttention's key_padding_mask means the opposite")
def _(answer):
    from minisd.attention import attention

    g = torch.Generator().manual_seed(405)
    for B, H, Lq, Lk, d in ((2, 4, 5, 7, 8), (1, 2, 16, 3, 4)):
        q, k, v = (torch.randn(B, H, L, d, generator=g) for L in (Lq, Lk, Lk))
        lengths = torch.randint(1, Lk + 1, (B,), generator=g)
        lengths[0] = Lk - 1                                              # at least one padded key
        mask = (torch.arange(Lk) < lengths[:, None])[:, None, None, :]   # (B, 1, 1, Lk): keys of each caption
        for m in (mask, None):
            got = _call(answer, q.clone(), k.clone(), v.clone(), m)
            problem = _compare(got, attention(q, k, v, m), "the output" + (" with the mask" if m is not None else
                                                                            " without a mask"), rtol=1e-4, atol=1e-5)
            if problem:
                return problem
    return None


open_exercise("04.2", "hiding \"the\" moves no accuracy by more than the 45 prompts' noise; hiding \"a\" moves shape by "
                      "-9 points [-18, -2] with shape at chance: one interval in ten excluding 0, as chance would give")
open_exercise("04.3", "the label vector added to the timestep embedding too: no measurable change against concatenation "
                      "alone (colour -7 [-16, +2], position +7 [0, +13]; one seed), still ahead of cross attention on colour")
open_exercise("04.4", "cross attention at 16x16 too: 1.63x the time per step; the token model's position 20 % -> 56 % "
                      "(+36 [+20, +49]), colour +18 and size +11 points, in one training run")


# --- chapter 05 --------------------------------------------------------------------------------

@exercise("05.3", "a function caption_matches(labels, mentioned) → matches (B_img, B_txt) bool: "
                  "matches[j, k] is True when image j fits caption k",
          "image j fits caption k when, for every attribute, either the labels agree (labels[j, a] == labels[k, a]) "
          "or caption k does not state it (mentioned[k, a] is False); broadcast labels[:, None, :] against "
          "labels[None, :, :] and reduce over the attribute axis with .all(-1)")
def _(answer):
    from minisd.captions import LABEL_COUNTS
    from minisd.clip import caption_fits

    g = torch.Generator().manual_seed(505)
    for B in (9, 64):  # hidden batches: random labels, random partial captions
        labels = torch.stack([torch.randint(n, (B,), generator=g) for n in LABEL_COUNTS], dim=1)  # (B, 4)
        mentioned = torch.rand(B, 4, generator=g) > 0.4  # (B, 4): which attributes caption k states
        got = torch.as_tensor(_call(answer, labels, mentioned))
        want = caption_fits(labels, mentioned)  # (B_img, B_txt)
        if tuple(got.shape) != (B, B):
            return f"for a batch of {B} the matrix has shape {tuple(got.shape)}; expected ({B}, {B})"
        if got.dtype != torch.bool:
            return f"the matrix should be bool (True = fits), got {got.dtype}"
        if not got.diagonal().all():
            return "some image does not fit its own caption: the diagonal must be all True"
        if torch.equal(got, want.T) and not torch.equal(got, want):
            return ("the matrix is transposed, or reads what the image's caption states: rows are images, "
                    "columns captions, and what counts is what caption k (the column) states")
        if not torch.equal(got, want):
            return f"{int((got != want).sum())} of {B * B} entries differ from the rule (batch of {B})"
    return None


@torch.no_grad()
def _ch05_zero_shot_accuracy(model, tokenizer, images, labels, names, templates) -> float:
    """From first principles: each class's prompt embeddings averaged and normalised (prompt ensembling),
    each image given its most similar class."""
    from minisd.data import normalize

    rows = []
    for name in names:
        ids, mask = tokenizer([t.format(name) for t in templates])
        rows.append(model.encode_text(ids, mask).mean(0))
    weights = torch.nn.functional.normalize(torch.stack(rows), dim=-1)  # (K, embed_dim)
    predicted = (model.encode_image(normalize(images)) @ weights.T).argmax(1)  # (N,)
    return (predicted == labels).float().mean().item()


@exercise("05.4", "a function zero_shot_accuracy(model, tokenizer, images, labels, class_names, templates) → the "
                  "fraction (0 … 1) of images whose class, read from prompts alone, equals labels",
          "build one prompt per class and template (template.format(name)), average each class's prompt "
          "embeddings and normalise (minisd.clip.class_embeddings does it), give each image its most similar "
          "class, and compare with the labels")
def _(answer):
    from minisd.clip import CLIP, clip_presets
    from minisd.data import VOCABULARY, Shapes
    from minisd.tokenizer import shapes_tokenizer

    config = clip_presets()["tiny"][0]
    torch.manual_seed(55)  # a hidden, untrained model: its accuracies are far from 0, 1 and each other
    model = CLIP(config).eval()
    tokenizer = shapes_tokenizer(config.text.max_length, paraphrases=True)
    data = Shapes("test", num_images=300, image_size=config.image.image_size, seed=505)
    for k, attr, templates in ((0, "color", ["a {} shape", "there is a {} shape"]), (3, "position", ["a shape in the {}"])):
        names = list(VOCABULARY[attr])
        got = _number(_call(answer, model, tokenizer, data.images, data.labels[:, k], names, templates),
                      "the accuracy")
        if got > 1:
            return f"the accuracy is {got:g}: give a fraction between 0 and 1, not a percentage"
        want = _ch05_zero_shot_accuracy(model, tokenizer, data.images, data.labels[:, k], names, templates)
        if not math.isclose(got, want, abs_tol=1e-6):
            return f"the accuracy for {attr} (templates {templates}) differs from the reference on hidden images"
    return None


open_exercise("05.1", "from τ = 1 the learned τ only reaches 0.685 in 250 steps, and the model lands next to the "
                      "τ = 1 row (shape 46.8 %): learning τ does not make its start unimportant")
open_exercise("05.2", "the CNN tower (97,664 parameters, 12 s) reads held-out shape in 73.2 % of images against the "
                      "ViT's 7.8 %, and test position 100 % against 24.2 % (one 250-step run each)")
open_exercise("05.5", "with the causal mask only the changed word and <end> move; without it every token's state "
                      "moves (by 5.4–7.4), <start>'s included")
open_exercise("05.6", "100 or 1,000 held-out images in training do not lift held-out shape at 250 steps (6.2 %, "
                      "8.4 % against 7.8 %); their colour rises to 100 %")


# --- chapter 06 --------------------------------------------------------------------------------

@exercise("06.1", "a function active_channels(mean, logvar) → int: for posterior means and log-variances "
                  "(B, C, h, w), the number of channels whose KL to N(0, 1) per image is at least one bit",
          "a channel's KL per image is ½(μ² + σ² − 1 − log σ²) summed over its h × w positions, then averaged "
          "over the B images; one bit is log 2 ≈ 0.693 nats")
def _(answer):
    from minisd.vae import DiagonalGaussian

    g = torch.Generator().manual_seed(601)
    # per-number KLs chosen so that summing over positions, the one-bit threshold in nats and the
    # average over images all matter: channel 0 ≈ 0.02 nats per number (1.3 per image: active),
    # channel 1 ≈ 0.85 nats per image in all (active only by the nats threshold, not by 1 nat),
    # channel 2 ≈ 0.3 per image (inactive), channel 3 active in one image only, 0.6 on average
    B, h, w = 6, 8, 8
    target = torch.zeros(B, 4, h, w, dtype=torch.float64)
    target[:, 0] = 1.3 / (h * w)
    target[:, 1] = 0.85 / (h * w)
    target[:, 2] = 0.3 / (h * w)
    target[0, 3] = 3.6 / (h * w)
    for trial in range(2):
        # a posterior with exactly these KLs: σ² = 1, μ = ±√(2 KL); then shuffle the channel order
        sign = torch.where(torch.rand(B, 4, h, w, generator=g) < 0.5, -1.0, 1.0).double()
        mean, logvar = sign * (2 * target).sqrt(), torch.zeros_like(target)
        if trial == 1:  # a second posterior: part of the KL from σ² ≠ 1 (the μ² part alone is not enough)
            logvar = torch.full_like(target, -0.02)
            mean = sign * (2 * target - (logvar.exp() - 1 - logvar)).clamp(min=0).sqrt()
        perm = torch.randperm(4, generator=g)
        mean, logvar = mean[:, perm].float(), logvar[:, perm].float()
        kl = DiagonalGaussian(mean.double(), logvar.double()).kl_per_number()  # (B, C, h, w)
        want = int((kl.sum(dim=(2, 3)).mean(0) >= math.log(2)).sum())
        got = _call(answer, mean, logvar)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, float) and got.is_integer():
            got = int(got)
        if isinstance(got, bool) or not isinstance(got, int):
            return f"the function should return a whole number of channels, got {type(got).__name__}"
        if got != want:
            return f"it counts {got} active channels on a hidden posterior (B, 4, 8, 8) where that is not the count"
    return None


@exercise("06.2", "a function sample_psnr(model, images, generator) → float: the mean PSNR (dB) of the images "
                  "decoded from one posterior *sample* each, against the images (uint8, N × 3 × 32 × 32)",
          "normalize the images, encode, draw z = model.encode(x).sample(generator), decode, denormalize, "
          "and measure minisd.vae.psnr against images / 255 (both in [0, 1])")
def _(answer):
    from minisd.data import Shapes, denormalize, normalize
    from minisd.vae import VAE, VAEConfig, psnr

    torch.manual_seed(602)
    model = VAE(VAEConfig(channels=(8, 8), norm_groups=4)).eval()
    images = Shapes("test", 12, seed=602).images
    with torch.no_grad():
        q = model.encode(normalize(images))
        want = psnr(denormalize(model.decode(q.sample(torch.Generator().manual_seed(6)))), images.float() / 255)
        from_mean = psnr(denormalize(model.decode(q.mode())), images.float() / 255)
        got = _number(_call(answer, model, images, torch.Generator().manual_seed(6)), "the PSNR")
    if abs(got - want) < 1e-3:
        return None
    if abs(got - from_mean) < 1e-3:
        return "that is the PSNR of the posterior mean, not of a sample"
    return "the PSNR differs from that of the decoded posterior samples (on a hidden model and images)"


open_exercise("06.3", "PSNR 32.5 / 33.8 / 34.8 dB with 2 / 4 / 8 latent channels, colour kept by all three; the KL "
                      "per image grows with the channels: 4 is a trade-off between reconstruction and what the "
                      "diffusion model must learn")


@exercise("06.4", "a function attribute_accuracy(images, labels) → tensor (4,): the share of images (N, 3, 32, 32, "
                  "floats in [0, 1]) whose colour, shape, size and position minisd.metrics.read_attributes reads as "
                  "the labels (N, 4) say",
          "read = read_attributes(images) gives labels (N, 4), −1 where no object is found; compare it with "
          "`labels` column by column and average over the images (dim 0)")
def _(answer):
    from minisd.data import Shapes
    from minisd.metrics import read_attributes

    data = Shapes("test", 40, seed=604)
    images = data.images.float() / 255
    g = torch.Generator().manual_seed(604)
    images[:8] = images[torch.randperm(40, generator=g)[:8]]  # some images that do not fit their labels
    images[8:12] = 0  # and some with no object at all
    want = (read_attributes(images) == data.labels).float().mean(0)
    got = _call(answer, images.clone(), data.labels.clone())
    got = torch.as_tensor(got)
    if got.numel() == 1:
        return "give one share per attribute (4 numbers), not one for all"
    if got.max() > 1:
        return "give shares between 0 and 1, not percentages or counts"
    return _compare(got.float().flatten(), want, "the shares", rtol=1e-4, atol=1e-4)


@exercise("06.5", "a function noise_latents(z, abar, scale, eps) → the latent the decoder gets: z scaled, "
                  "noised to ᾱ = abar as the diffusion model does, and unscaled again",
          "the diffusion model sees s·z; noising gives √ᾱ·(s·z) + √(1 − ᾱ)·ε; the decoder needs that divided by s")
def _(answer):
    g = torch.Generator().manual_seed(605)
    for abar, scale in ((0.9, 1.35), (0.3, 0.18215), (0.05, 2.0)):
        z = torch.randn(2, 4, 8, 8, generator=g) * 0.7
        eps = torch.randn(2, 4, 8, 8, generator=g)
        want = (math.sqrt(abar) * scale * z + math.sqrt(1 - abar) * eps) / scale
        got = _call(answer, z.clone(), abar, scale, eps.clone())
        problem = _compare(got, want, f"the latent for ᾱ = {abar}, scale {scale}", rtol=1e-4, atol=1e-5)
        if problem:
            return problem
    return None


def _clustered_rows(n: int, centres: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows around `centres` (K, dim) and their classes: every class present, a fifth of the rows far-flung
    (so that the nearest single row and the nearest class mean disagree on some)."""
    classes, dim = centres.shape
    y = torch.randint(0, classes, (n,), generator=g)
    y[:classes] = torch.arange(classes)
    spread = 1 + 2 * (torch.rand(n, 1, generator=g) < 0.2)
    return centres[y] + torch.randn(n, dim, generator=g) * spread, y


@exercise("06.6", "a function nearest_mean_accuracy(train_x, train_y, test_x, test_y) → float: the accuracy on "
                  "the test rows of the classifier that assigns each row the class whose mean training row is nearest",
          "means = torch.stack([train_x[train_y == k].mean(0) for k in classes]); each test row gets the class "
          "of the nearest mean (torch.cdist, then argmin); accuracy is the share of rows where that is test_y")
def _(answer):
    g = torch.Generator().manual_seed(606)
    for dim, classes in ((5, 3), (64, 4)):
        centres = torch.randn(classes, dim, generator=g) * 0.8
        (tx, ty), (vx, vy) = _clustered_rows(200, centres, g), _clustered_rows(150, centres, g)
        labels = ty.unique()
        means = torch.stack([tx[ty == k].mean(0) for k in labels])
        want = (labels[torch.cdist(vx, means).argmin(1)] == vy).float().mean().item()
        got = _number(_call(answer, tx.clone(), ty.clone(), vx.clone(), vy.clone()), "the accuracy")
        if got > 1:
            return "give the accuracy as a fraction between 0 and 1"
        if abs(got - want) > 1e-6:
            return f"the accuracy on hidden data ({dim} features, {classes} classes) differs from the nearest-mean classifier's"
    return None


# --- chapter 07 --------------------------------------------------------------------------------

@exercise("07.4", 'a list of the words of "a big crimson circle in the middle" that the tokenizer turns into <unk>',
          "compare each word with sd.tokenizer.vocab (or decode the token ids and look for <unk>); synonyms that "
          "describe() uses are in the vocabulary too")
def _(answer):
    from minisd.tokenizer import shapes_tokenizer, split_words

    if isinstance(answer, str) or not all(isinstance(w, str) for w in answer):
        return "the answer should be a list of words (strings), e.g. ['…']"
    known = set(shapes_tokenizer(paraphrases=True).vocab)
    words = split_words("a big crimson circle in the middle")
    given = {w.strip().lower() for w in answer}
    if stray := sorted(given - set(words)):
        return f"{stray} are not words of the prompt"
    if known_given := sorted(given & known):
        return f"{known_given} are in the vocabulary: they get their own embedding, not <unk>"
    if missing := len({w for w in words if w not in known} - given):
        return f"{missing} word(s) of the prompt that become <unk> are missing from the list"
    return None


open_exercise("07.1", "from the same noise, 89 % of the test prompts are right at w = 1, 99–100 % at w = 2 to 8, 97 % at "
                      "16; the prompts wrong at w = 1 (red drawn yellow) are right by w = 4, circles grow corners at 8–16")
open_exercise("07.2", "without empty captions in training: FID at w = 0 is 286 against 116, at w = 4 81 against 27, and "
                      "prompt accuracy at w = 8 falls to 85 % from 98 %; at w = 1 (no unconditional branch) they are level")
open_exercise("07.3", "img2img towards a large green square: colour and shape change first (97 % and 82 % at strength "
                      "0.4), size by 0.6, position last (2 % at 0.4, 65 % at 0.6, all at 0.8)")
open_exercise("07.5", "at w = 4 both samplers are at the ceiling from 10 steps (DDIM 99.7 %, DPM-Solver++ 98.7 % at 5) and "
                      "FID is 26–27 at every step count: this measurement cannot tell them apart")


# --- chapter 08 --------------------------------------------------------------------------------

def _ch08_settle_data(g: torch.Generator, prompts: int, seeds: int, frames: int, attribute: int):
    """Hidden settle data as settle_frames returns it: (runs, 4) frames 0 … frames − 1 for the runs whose final
    image is right, `frames` (one past the last) for those that never settle; the largest settle step of
    `attribute` shared by runs of two different seeds, and a run that never settles in it."""
    runs = prompts * seeds
    settle = torch.randint(0, frames - 3, (runs, 4), generator=g)
    final_ok = torch.rand(runs, 4, generator=g) > 0.15
    late = frames - 2 - int(torch.randint(0, 2, (1,), generator=g))
    i, j = 1, prompts + 3                                       # two runs of different seeds (and prompts)
    settle[[i, j], attribute] = late
    final_ok[[i, j], attribute] = True
    final_ok[runs - 1, attribute] = False                       # a run whose final image is wrong
    settle[~final_ok] = frames
    return settle, final_ok


def _ch08_last_by_loop(settle, final_ok, attribute, prompts, first_seed):
    settled = [(int(settle[i, attribute]), i) for i in range(len(settle)) if final_ok[i, attribute]]
    if not settled:
        return []
    last = max(k for k, _ in settled)
    P = len(prompts)
    return [(prompts[i % P], first_seed + i // P) for k, i in settled if k == last]


@exercise("08.1", "a function last_to_settle(settle, final_ok, attribute, prompts, first_seed) → the runs whose "
                  "attribute settles last, as a list of (prompt, seed) pairs",
          "leave out the runs whose final image is wrong (their settle step is one past the last frame), take the "
          "largest settle step of the others, and keep every run that has it (there can be ties); run i is prompt "
          "i % len(prompts) with seed first_seed + i // len(prompts)")
def _(answer):
    g = torch.Generator().manual_seed(808)
    for prompts, seeds, frames, attribute, first_seed in ((5, 3, 11, 3, 0), (7, 2, 51, 0, 40), (4, 4, 21, 1, 7)):
        names = [f"hidden prompt {p}" for p in range(prompts)]
        settle, final_ok = _ch08_settle_data(g, prompts, seeds, frames, attribute)
        want = sorted(_ch08_last_by_loop(settle, final_ok, attribute, names, first_seed))
        got = _call(answer, settle.clone(), final_ok.clone(), attribute, list(names), first_seed)
        if isinstance(got, (str, tuple)) or not all(isinstance(r, (tuple, list)) and len(r) == 2 for r in got):
            return "the function should return a list of (prompt, seed) pairs, one per run"
        got = sorted((str(p), int(s)) for p, s in got)
        where = f"for {prompts} prompts × {seeds} seeds, attribute {attribute}"
        if len(got) != len(want):
            return f"{where} you return {len(got)} run(s); the number of runs that settle last is different"
        if {p for p, _ in got} != {p for p, _ in want}:
            return f"{where} the prompts of the runs are not those that settle last"
        if got != want:
            return f"{where} the prompts are right but some seeds are not"
    return None


def _ch08_hidden_samplers():
    from minisd.diffusion import NoiseSchedule
    from minisd.samplers import DDIMSampler, DPMSolverSampler

    schedule = NoiseSchedule.standard("scaled_linear")
    return [DDIMSampler(schedule, 7), DDIMSampler(schedule, 25, timestep_spacing="trailing"),
            DPMSolverSampler(schedule, 9)]


@exercise("08.3", "a function fraction_and_t(frames, sampler) → (fraction, t): for settle frames 0 … n of an "
                  "n-step run, the fraction of the run and the timestep t, both tensors shaped like frames",
          "the fraction is frame / n; frame k < n is the state before step k, at t = sampler.timesteps[k]; frame n "
          "is the final image, at t = 0. Read t from the sampler, not from a formula: spacings differ")
def _(answer):
    g = torch.Generator().manual_seed(803)
    for sampler in _ch08_hidden_samplers():
        n = len(sampler.timesteps)
        frames = torch.cat([torch.tensor([0, n - 1, n]), torch.randint(0, n + 1, (9,), generator=g)])
        want_t = torch.cat([sampler.timesteps.long(), torch.zeros(1, dtype=torch.long)])[frames]
        got = _call(answer, frames.clone(), sampler)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            return "the function should return two things: (fraction, t)"
        where = f"for a sampler of {n} steps with '{sampler.timestep_spacing}' spacing"
        problem = _compare(got[0], frames.double() / n, f"the fraction {where}", rtol=1e-5, atol=1e-6)
        if problem:
            return problem
        problem = _compare(got[1], want_t, f"t {where}", rtol=0, atol=0.5)
        if problem:
            return problem + " (is frame n, the final image, at t = 0?)"
    return None


def _ch08_ratio(maps, mask):
    share_on_object = (maps * mask).flatten(-2).sum(-1) / maps.flatten(-2).sum(-1)
    return share_on_object / mask.mean()


@exercise("08.4", "a function object_ratio(maps, mask) → (steps, tokens): for attention maps (steps, tokens, h, w) "
                  "and an object mask (h, w), each map's share of its weight on the object over the object's share "
                  "of the image",
          "per step and token: sum(map · mask) / sum(map) is the share of the attention on the object; divide it by "
          "mask.mean(), the share of the image the object covers. Sum over the pixels only")
def _(answer):
    g = torch.Generator().manual_seed(804)
    for steps, tokens, side in ((5, 3, 8), (2, 9, 4)):
        maps = torch.rand(steps, tokens, side, side, generator=g) * torch.rand(steps, tokens, 1, 1, generator=g) * 3
        mask = (torch.rand(side, side, generator=g) * 2 - 0.6).clamp(0, 1)    # fractional cells, some empty
        problem = _compare(_call(answer, maps.clone(), mask.clone()), _ch08_ratio(maps, mask),
                           f"the ratio for {steps} steps × {tokens} tokens", rtol=1e-4, atol=1e-6)
        if problem:
            return problem
    return None


open_exercise("08.2", "50 prompts × 1 seed: the colour settles earlier at w = 1 (median step 0; 5.4 steps earlier than "
                      "at w = 4, run by run) and later at w = 8 (2.8 steps); the order stays, colour last, but at w = 1 "
                      "only 40–49 of 50 final images are right per attribute")
open_exercise("08.5", "the held-out small blue triangle: 10 of 10 read as small triangles in place, 8 as blue; the shape "
                      "word's AUROC in up 8x8 #1 is 0.91, as for the trained objects of 8.4 (0.89)")
open_exercise("08.6", "a 51-frame GIF, w = 1 above w = 8: the w = 8 guess overshoots in the first fifth of the run "
                      "while w = 1's is a calm disc; the words of up 8x8 #1 look at the same places at both scales")


# --- chapter 09 --------------------------------------------------------------------------------

@exercise("09.2", "a function channels_last_strides(shape) → the strides (4 numbers, in elements) of a tensor of "
                  "shape (B, C, H, W) stored channels-last, as x.stride() reports them",
          "channels-last keeps the index order (B, C, H, W) but lays the numbers out in memory as (B, H, W, C): "
          "the channel index moves fastest (stride 1), then the column, then the row, then the image")
def _(answer):
    for shape in ((2, 3, 4, 5), (7, 16, 3, 2), (1, 8, 6, 6)):  # hidden shapes, every dim but one batch > 1
        want = torch.empty(shape).to(memory_format=torch.channels_last).stride()
        got = _call(answer, shape)
        try:
            got = tuple(int(s) for s in got)
        except TypeError:
            return f"the function should return 4 strides (a tuple of ints), got {type(got).__name__}"
        if len(got) != 4:
            return f"the function should return 4 strides, one per dimension (B, C, H, W), got {len(got)}"
        if got == torch.empty(shape).stride():
            return "those are the strides of the default (contiguous, NCHW) layout, not of channels-last"
        if sorted(got) != sorted(want):
            return f"for a hidden shape {shape} the strides are not the channels-last ones"
        if got != want:
            return (f"for a hidden shape {shape} the strides are channels-last's numbers in the wrong places: "
                    "give them in the index order (B, C, H, W)")
    return None


def _ch09_rows(draw, n: int, rank: int, world: int) -> torch.Tensor:
    from minisd.distributed import rows, shard

    with shard(rank, world):
        return rows(draw, n)


@exercise("09.4", "a function my_rows(draw, n, rank, world) → this process's n rows of random numbers, the ones a "
                  "single process would have drawn for them (what minisd.distributed.rows does inside shard(rank, world))",
          "a single process draws all n · world rows of the global batch at once; process `rank` computes rows "
          "rank·n … rank·n + n − 1 of that batch")
def _(answer):
    for n, rank, world in ((4, 1, 2), (3, 2, 4), (5, 0, 3), (2, 3, 4), (6, 0, 1)):
        def draw(m, n=n, world=world):  # a fresh seeded generator per call, as every process seeds its own
            return torch.randn(m, 3, generator=torch.Generator().manual_seed(900 + 7 * n + world))

        want = _ch09_rows(draw, n, rank, world)
        got = torch.as_tensor(_call(answer, draw, n, rank, world))
        if tuple(got.shape) != tuple(want.shape):
            return f"with n = {n} rows per process the function returns shape {tuple(got.shape)}, not {n} rows"
        if torch.equal(got, want):
            continue
        if rank > 0 and torch.equal(got, draw(n)):
            return (f"process {rank} of {world} gets the numbers of the first rows: every process draws the same "
                    "n numbers from the same seed")
        return f"process {rank} of {world} (n = {n}) does not get the rows one process would give it"
    return None


_CH09_PHASES = ("forward", "backward", "optimiser step")
_CH09_KINDS = ("convolution", "attention / matmul", "normalisation", "elementwise & other", "optimiser",
               "Python & framework")


def _ch09_kind(name: str, phase: str | None) -> str:
    """9.2's sorting of one profiler row: phases' own time, then everything of the optimiser step, then by name."""
    if name in _CH09_PHASES:
        return "Python & framework"
    if phase == "optimiser step":
        return "optimiser"
    low = name.lower()
    if "conv" in low:
        return "convolution"
    if any(k in low for k in ("addmm", "aten::mm", "bmm", "matmul", "linear", "attention", "softmax")):
        return "attention / matmul"
    if "norm" in low and "_foreach" not in low:
        return "normalisation"
    if "_foreach" in low or "adam" in low or "optimizer" in low:
        return "optimiser"
    return "elementwise & other"


def _ch09_profile_rows(g: torch.Generator) -> list[tuple[str, str | None, float, float]]:
    """Hidden profiler rows (name, phase, self seconds, total seconds) of a made-up training step: total ≥ self,
    parents' totals include their children, AdamW's elementwise ops inside the optimiser step."""
    ops = [("forward", "forward"), ("aten::convolution", "forward"), ("aten::mkldnn_convolution", "forward"),
           ("aten::native_group_norm", "forward"), ("aten::silu", "forward"), ("aten::mm", "forward"),
           ("aten::_softmax", "forward"), ("aten::add", "forward"), ("aten::mse_loss", "forward"),
           ("backward", "backward"), ("aten::convolution_backward", "backward"),
           ("aten::native_group_norm_backward", "backward"), ("aten::mm", "backward"), ("aten::mul", "backward"),
           ("autograd::engine::evaluate_function: ConvolutionBackward0", "backward"),
           ("optimiser step", "optimiser step"), ("Optimizer.step#AdamW.step", "optimiser step"),
           ("aten::_foreach_mul_", "optimiser step"), ("aten::mul_", "optimiser step"),
           ("aten::lerp_", "optimiser step"), ("aten::add_", "optimiser step"), ("aten::sqrt", "optimiser step"),
           ("aten::copy_", None)]
    rows = []
    for name, phase in ops:
        own = float(torch.rand((), generator=g)) * 0.05 + 0.001
        extra = float(torch.rand((), generator=g)) * 0.2 if name in _CH09_PHASES or "convolution" in name else 0.0
        rows.append((name, phase, own, own + extra))
    return rows


@exercise("09.5", "a function shares_by_kind(rows) → dict {kind: share of the step}: rows are the profiler's "
                  "(name, phase, self seconds, total seconds), sorted into the six kinds of 9.2; the shares add up to 1",
          "as in 9.2: a row named like a phase is 'Python & framework', a row inside the optimiser step is "
          "'optimiser' whatever its name, the rest go by kind_of(name); add *self* seconds (total seconds count "
          "the children again), then divide by their sum")
def _(answer):
    g = torch.Generator().manual_seed(905)
    for _trial in range(3):
        rows = _ch09_profile_rows(g)
        want = {k: 0.0 for k in _CH09_KINDS}
        for name, phase, own, _total in rows:
            want[_ch09_kind(name, phase)] += own
        total = sum(want.values())
        got = _call(answer, list(rows))
        if not isinstance(got, dict):
            return f"the function should return a dict {{kind: share}}, got {type(got).__name__}"
        if stray := sorted(set(got) - set(_CH09_KINDS)):
            return f"{stray} are not kinds of 9.2 (use the names of KINDS)"
        got = {k: _number(got.get(k, 0.0), f"the share of {k!r}") for k in _CH09_KINDS}
        if not math.isclose(sum(got.values()), 1.0, abs_tol=1e-6):
            return f"the shares add up to {sum(got.values()):.3g}, not 1: divide each kind's seconds by their sum"
        wrong = [k for k in _CH09_KINDS if abs(got[k] - want[k] / total) > 1e-6]
        if wrong:
            return f"on hidden profiler rows the shares of {wrong} are off"
    return None


open_exercise("09.1", "the command lands close to 9.3 on the same machine (minisd / diffusers 1.03 × against 1.00 ×); "
                      "channels-last is the one switch above the noise (1.09 ×, 9.3: 1.07 ×), fused AdamW is not")
open_exercise("09.3", "a 4×8×8 latent keeps far more of a photo than an 8×8 thumbnail (25.4 against 19.5 dB) and far "
                      "less than of a digit (33.8 dB): photo detail comes back softened")
open_exercise("09.6", "for the same 12,800 images batch 8 ends lower (held-out loss 0.1198 against 0.2069) and, at a "
                      "fixed lr, wins per second too although batch 64 runs at 4× the images/s")


# --- chapter 10 ----------------------------------------------------------------------------------

_CH10_STRINGS = ("赤いハート", "Tシャツ", "ice hockey", "地球(アジアとオーストラリア)", "Ｔｈｅ　ＥＮＤ", "人々",
                 "non-potable water", "ｶﾀｶﾅ", "cat with tears of joy", "a 100% score!", "しずくの絵文字ー")


def _ch10_captions() -> list[str]:
    """Hand-picked edge cases (full-width letters, half-width kana, 々, marks) and every 7th emoji name in
    English and Japanese."""
    from minisd.emojis import _emoji_table

    names = [n for pair in _emoji_table().values() for n in pair]
    return [*_CH10_STRINGS, *names[::7]]


@exercise("10.1", "a function split_caption(text) → list of tokens, as minisd's tokenizer splits a caption",
          "normalise first (NFKC, then lower case); one token per kana or kanji character (and 々), one per run of "
          "other letters and digits, one per mark that is neither a letter, a digit nor a space")
def _(answer):
    from minisd.tokenizer import split_words

    for text in _ch10_captions():
        got = _call(answer, text)
        if not isinstance(got, (list, tuple)) or not all(isinstance(t, str) for t in got):
            return f"the function should return a list of strings, got {type(got).__name__}"
        want = split_words(text)
        if list(got) != want:
            return f"{text!r} is split into {len(got)} tokens where the tokenizer makes {len(want)}" \
                if len(got) != len(want) else f"{text!r} is split into the right number of tokens, but not the same ones"
    return None


@exercise("10.2", "a function chance_top1(asked, k) → the top-1 fidelity (a share, 0 … 1) of a model that always "
                  "draws emoji k, on the asked emoji indices `asked`",
          "a model that always draws k is right exactly on the samples that asked for k")
def _(answer):
    g = torch.Generator().manual_seed(1001)
    for n, kinds in ((50, 5), (200, 40), (7, 3)):
        asked = torch.randint(kinds, (n,), generator=g)
        for k in (int(asked[0]), kinds):  # an emoji that was asked for, and one that was not
            want = float((asked == k).double().mean())
            got = _number(_call(answer, asked.clone(), k))
            if abs(got - want) > 1e-6:
                return (f"for {n} samples the function gives {got:.4g}; " +
                        ("it should be a share between 0 and 1" if got > 1 else "not the share it would score"))
    return None


open_exercise("10.3", "in Japanese the colour follows the colour word in 69.9 % [65.4, 74.0] of 432 samples, against "
                      "82.2 % [78.3, 85.5] in English: orange, brown and white fall behind")
open_exercise("10.4", "top-5 2.0 % without guidance (w = 1), 6.8, 8.7 and 7.5 % at w = 2, 4 and 8: guidance helps, but "
                      "400 prompts find no best w among 2, 4 and 8")


# --- chapter 11 --------------------------------------------------------------------------------

_CH11_CASES = [  # (key, rules): whole parts only, numbers only for {i} and {j}, first place only, rules in order
    ("attn1.to_out.0.bias", [("to_out.0", "to_out")]),
    ("attn1.to_out.01.bias", [("to_out.0", "to_out")]),
    ("attn1.xto_out.0.bias", [("to_out.0", "to_out")]),
    ("down_blocks.x.resnets.0.conv1.weight", [("down_blocks.{i}.resnets.{j}", "down.{i}.res.{j}")]),
    ("a.1.a.2.w", [("a.{i}", "b.{i}")]),
    ("a.1.w", [("a.{i}", "b.{i}"), ("b.1", "c"), ("a.1", "never")]),
    ("x.3.y.12.z", [("x.{i}.y.{j}", "p.{j}.q.{i}")]),
]


def _ch11_keys():
    """(key, rules) pairs: hand-made edge cases, and every 5th tensor name of SD 1.5-shaped models (built on the
    meta device from diffusers' and transformers' own classes) with minisd's tables."""
    cases = list(_CH11_CASES)
    try:
        import diffusers
        import transformers
    except ImportError:  # the hand-made cases and the rule tables' own names still test the function
        diffusers = transformers = None
    from minisd.convert import TEXT_RULES, UNET_RULES, vae_config_from_diffusers, vae_rules

    vae = vae_rules(vae_config_from_diffusers({"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2}))
    for rules in (UNET_RULES, vae, TEXT_RULES):
        cases += [(source.format(i=3, j=1) + ".weight", rules) for source, _ in rules]
    if diffusers is not None:
        with torch.device("meta"):
            unet = diffusers.UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2,
                                                  norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
                                                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
            ae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                         down_block_types=("DownEncoderBlock2D",) * 4,
                                         up_block_types=("UpDecoderBlock2D",) * 4)
            text = transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_size=32, num_hidden_layers=3,
                                                                          num_attention_heads=4, intermediate_size=64))
        for model, rules in ((unet, UNET_RULES), (ae, vae), (text, TEXT_RULES)):
            names = [k.removeprefix("text_model.") for k in model.state_dict()]
            cases += [(k, rules) for k in names[::5]]
    return cases


@exercise("11.1", "a function rename(key, rules) → the renamed key, as minisd.convert.rename renames it",
          "split at the dots and compare whole parts; {i} and {j} match a part made of digits and carry it to the "
          "target; each rule once, at its first match, the rules in order")
def _(answer):
    from minisd.convert import rename

    for key, rules in _ch11_keys():
        got = _call(answer, key, [tuple(r) for r in rules])
        if not isinstance(got, str):
            return f"the function should return a string, got {type(got).__name__}"
        if got != rename(key, rules):
            rule_text = rules[0] if len(rules) == 1 else f"a table of {len(rules)} rules"
            return f"{key!r} with {rule_text} becomes {got!r}, which is not what the rules make"
    return None


open_exercise("11.2", "SD 1.5's U-Net: residual blocks 537.67 M parameters (62.6 %), transformer blocks 267.24 M "
                      "(31.1 %), the rest 54.61 M (6.4 %); the cpu preset: 52.6 % and 41.0 %")
open_exercise("11.3", "on the SD 2.x-style tiny model: 3.7e-06 with all three settings as SD; padding mask on 1.0, "
                      "steps_offset 0 0.13, set_alpha_to_one True 2.4e-02: the same order as the SD 1.x style")


# --- the student edition -----------------------------------------------------------------------

SOLUTION_TAG = "solution"


def student_edition(notebooks, out) -> list[Path]:
    """Write each notebook to folder `out` with every cell tagged `solution` removed and the outputs
    cleared (nbconvert's TagRemovePreprocessor and ClearOutputPreprocessor); hints stay, collapsed.
    Returns the paths written."""
    import nbformat
    from nbconvert.preprocessors import ClearOutputPreprocessor, TagRemovePreprocessor
    from traitlets.config import Config

    from minisd.checkpoint import atomic_write
    from minisd.errors import MinisdError

    config = Config()
    config.TagRemovePreprocessor.remove_cell_tags = {SOLUTION_TAG}
    remove = TagRemovePreprocessor(config=config)
    clear = ClearOutputPreprocessor()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in map(Path, notebooks):
        if path.suffix != ".ipynb" or not path.is_file():
            raise MinisdError(f"{str(path)!r} is not a notebook file (.ipynb)")
        nb = nbformat.read(path, as_version=4)
        nb, _ = remove.preprocess(nb, {})
        nb, _ = clear.preprocess(nb, {})
        target = out / path.name
        atomic_write(target, lambda tmp, nb=nb: nbformat.write(nb, tmp))
        written.append(target)
    return written


def main(argv=None) -> int:
    """`python -m minisd.exercises student …` is `minisd student …` (the command's errors: one line, status 2)."""
    from minisd.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
