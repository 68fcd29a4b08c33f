"""The judge that measures generated images, FID on its features, and prompt accuracy."""

import numpy as np
import pytest
import torch

from minisd.data import ATTRIBUTES, HELD_OUT_PAIRS, VOCABULARY, encode_labels, parse_caption, render
from minisd.errors import MinisdError
from minisd.metrics import (
    bootstrap_interval,
    evaluate_pipeline,
    frechet_distance,
    load_judge,
    prompt_labels,
    resample_indices,
    within_prompt_distance,
)
from minisd.runs import format_pipeline_metrics


def fid_by_the_textbook(a, b):
    """The same distance through another route: the eigenvalues of the non-symmetric Σ_a Σ_b."""
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    lam = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0)
    return ((a.mean(0) - b.mean(0)).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * lam.sqrt().sum()).item()


def test_frechet_distance_against_two_independent_computations():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g)
    b = torch.randn(400, 6, generator=g) * 2 + 1
    assert frechet_distance(a, b) == pytest.approx(fid_by_the_textbook(a, b), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # Gaussians with diagonal sample covariances: ‖μ_a − μ_b‖² + Σ (σ_a − σ_b)²
    x = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]])  # mean 0, cov (4/3)·I
    y = x * torch.tensor([3.0, 0.5]) + torch.tensor([2.0, -1.0])
    expected = 2.0**2 + 1.0 + (4 / 3) * ((1 - 3) ** 2 + (1 - 0.5) ** 2)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)


@pytest.fixture(scope="module")
def judge():
    return load_judge(progress=False)


def test_the_judge_reads_real_images_at_least_99_percent_right(judge):
    model, accuracy = judge
    assert set(accuracy) == {f"{s}/{a}" for s in ("test", "heldout") for a in ATTRIBUTES}
    assert min(accuracy.values()) >= 0.99, accuracy
    # and the cached accuracy is the truth about the cached weights
    from minisd.data import Shapes

    ds = Shapes("test", 500, seed=3)
    read, feats = model.read(ds.images)
    assert (read == ds.labels).float().mean(0).min() >= 0.98 and feats.shape == (500, model.config.feature_dim)


def test_the_prompt_set_covers_every_attribute_value():
    test, held = prompt_labels("test"), prompt_labels("heldout")
    assert len(test) == 150 and len(held) == 30
    for labels in (test, held):
        for k, values in enumerate(VOCABULARY.values()):
            if k >= 2 or labels is test:
                assert set(labels[:, k].tolist()) == set(range(len(values)))
    pairs = {(VOCABULARY["color"][c], VOCABULARY["shape"][s]) for c, s in held[:, :2].tolist()}
    assert pairs == set(HELD_OUT_PAIRS)


class Painter:
    """A stand-in text-to-image model that draws what the caption says — or paints everything red."""

    image_size = 32

    def __init__(self, all_red=False):
        self.all_red = all_red

    def __call__(self, captions, num_inference_steps, guidance_scale, sampler, seed):
        labels = torch.cat([encode_labels(**parse_caption(c)) for c in captions])
        if self.all_red:
            labels[:, 0] = VOCABULARY["color"].index("red")

        class Out:
            images = render(labels, 32, np.random.default_rng(seed + 12345)).float() / 255
        return Out


def test_prompt_accuracy_and_fid_of_a_perfect_and_of_a_red_only_painter(judge):
    model, _ = judge
    perfect = evaluate_pipeline(Painter(), model, "test", per_prompt=2)
    assert min(perfect[a] for a in (*ATTRIBUTES, "all")) >= 0.97, perfect
    assert perfect["num_images"] == 300
    # The reference is real images drawn for the same prompts, so a painter that draws exactly like
    # the data scores what the reference scores: its interval holds the reference's value, and
    # its excess over the reference holds 0. (Against an i.i.d. real set, as before, it did not.)
    lo, hi = perfect["fid_ci"]
    assert lo <= perfect["fid_reference"] <= hi, perfect
    assert perfect["fid_excess_ci"][0] <= 0 <= perfect["fid_excess_ci"][1]
    assert perfect["fid_excess"] == pytest.approx(perfect["fid"] - perfect["fid_reference"])
    assert 0.8 < perfect["diversity"] < 1.25
    assert perfect["geometric_all"] >= 0.97 and perfect["agreement_all"] >= 0.97
    for a in (*ATTRIBUTES, "all"):
        assert perfect[f"{a}_ci"][0] <= perfect[a] <= perfect[f"{a}_ci"][1]
    wrong = evaluate_pipeline(Painter(all_red=True), model, "test", per_prompt=2)
    asked_red = (prompt_labels("test")[:, 0] == VOCABULARY["color"].index("red")).float().mean().item()
    assert wrong["color"] == pytest.approx(asked_red, abs=0.03) and wrong["all"] <= wrong["color"]
    assert wrong["color_ci"][1] < 0.5 and wrong["shape"] >= 0.97
    assert wrong["fid_excess_ci"][0] > 10 * perfect["fid_excess_ci"][1]
    assert wrong["fid_reference"] == pytest.approx(perfect["fid_reference"])  # the same prompts, the same reference
    lines = format_pipeline_metrics(wrong, "ddim 20 steps")
    assert f"color {100 * wrong['color']:.1f}% [{100 * wrong['color_ci'][0]:.1f}, " in lines[1]
    assert "FID " in lines[2] and "real vs real" in lines[2] and "agrees with the judge" in lines[3]


def test_bootstrap_interval_of_a_mean_matches_the_normal_closed_form():
    x = torch.randn(400, generator=torch.Generator().manual_seed(0)) * 2 + 1
    est, lo, hi = bootstrap_interval(torch.mean, x, reps=2000)
    half = 1.96 * x.std().item() / 400**0.5  # x̄ ± 1.96 s/√n
    assert est == pytest.approx(x.mean().item())
    assert lo == pytest.approx(est - half, abs=0.1 * half) and hi == pytest.approx(est + half, abs=0.1 * half)
    assert bootstrap_interval(torch.mean, x, reps=300, seed=5) == bootstrap_interval(torch.mean, x, reps=300, seed=5)


def test_bootstrap_within_groups_gives_the_stratified_standard_error():
    # Two groups of 200 with success rates 0.2 and 0.8. Resampling within each group keeps half
    # of the rows in each: SE = √(Σ (n_g/N)² p_g(1 − p_g)/n_g) = 0.020. Ignoring the groups lets
    # their shares vary too: SE = √(p(1 − p)/N) = 0.025.
    hits = torch.cat([torch.arange(200) < 40, torch.arange(200) < 160]).float()
    groups = torch.arange(2).repeat_interleave(200)
    _, lo, hi = bootstrap_interval(torch.mean, hits, groups=groups, reps=3000)
    assert (hi - lo) / 2 == pytest.approx(1.96 * 0.020, rel=0.1)
    _, lo, hi = bootstrap_interval(torch.mean, hits, reps=3000)
    assert (hi - lo) / 2 == pytest.approx(1.96 * 0.025, rel=0.1)


def test_resampling_within_groups_keeps_every_row_in_its_group():
    groups = torch.tensor([2, 0, 2, 1, 0, 2, 2, 1, 0, 0])
    picks = torch.stack([resample_indices(groups, torch.Generator().manual_seed(s)) for s in range(200)])
    assert (groups[picks] == groups).all()
    for i in range(len(groups)):  # every row of the group turns up
        assert set(picks[:, i].tolist()) == set(torch.nonzero(groups == groups[i]).flatten().tolist())


def test_bias_correction_moves_the_interval_by_the_bootstraps_bias():
    # The plug-in variance (dividing by n) of a resample is low by the factor (n − 1)/n on average,
    # so the bootstrap's bias estimate is −s²/n and the corrected ends move up by s²/n.
    x = torch.randn(20, generator=torch.Generator().manual_seed(1))
    def var(v):
        return v.var(unbiased=False)
    _, lo, hi = bootstrap_interval(var, x, reps=4000)
    _, lo_c, hi_c = bootstrap_interval(var, x, reps=4000, correct_bias=True)
    s2 = var(x).item()
    assert lo_c - lo == pytest.approx(s2 / 20, abs=0.02 * s2) and hi_c - hi == pytest.approx(lo_c - lo)


@pytest.mark.parametrize("kwargs, message", [
    ({"reps": 0}, "reps 0"), ({"level": 1.5}, "level 1.5"),
    ({"groups": torch.zeros(3, dtype=torch.long)}, "groups \\(3 rows\\)"),
])
def test_bootstrap_interval_rejects_bad_settings(kwargs, message):
    with pytest.raises(MinisdError, match=message):
        bootstrap_interval(torch.mean, torch.ones(5), **kwargs)


def test_within_prompt_distance_is_the_mean_pairwise_distance_whatever_the_group_size():
    # For x, y ~ N(0, I_D): E‖x − y‖ = 2 Γ((D + 1)/2) / Γ(D/2). The spread around a group's mean,
    # which this replaced, shrinks by √((k − 1)/k) for groups of k.
    D = 8
    expected = 2 * torch.exp(torch.lgamma(torch.tensor((D + 1) / 2)) - torch.lgamma(torch.tensor(D / 2))).item()
    g = torch.Generator().manual_seed(2)
    for k in (2, 5):
        feats = torch.randn(4000 // k * k, D, generator=g)
        groups = torch.arange(4000 // k).repeat_interleave(k)
        assert within_prompt_distance(feats, groups) == pytest.approx(expected, rel=0.03)
    same = torch.zeros(10, D)
    assert within_prompt_distance(same, torch.arange(5).repeat_interleave(2)) == 0


def test_the_judge_reads_the_gpu_presets_64_pixel_images_by_averaging_them_down(judge):
    from minisd.data import Shapes

    model, _ = judge
    ds = Shapes("test", 500, image_size=64, seed=3)  # the `gpu` preset's size; the judge was trained at 32
    read, feats = model.read(ds.images)
    assert (read == ds.labels).float().mean(0).min() >= 0.98 and feats.shape == (500, model.config.feature_dim)


def test_box_fill_tells_the_three_shapes_apart_and_is_nan_without_an_object():
    from minisd.metrics import box_fill

    means = {}
    for shape in VOCABULARY["shape"]:
        labels = encode_labels(color="green", shape=shape, size="large", position="center").repeat(100, 1)
        means[shape] = box_fill(render(labels, 32, np.random.default_rng(4))).mean().item()
    assert means["square"] == pytest.approx(1.0, abs=0.05)
    assert means["circle"] == pytest.approx(np.pi / 4, abs=0.05)
    assert means["triangle"] == pytest.approx(0.5, abs=0.07)
    # a square with its four sides pushed in to 0.7 of the half-side at their middles (a pinched square)
    u = (torch.arange(32) - 15.5) / 12  # the square spans |u| ≤ 1
    ax, ay = u.abs().view(1, 32), u.abs().view(32, 1)
    inside = torch.maximum(ax, ay) <= 1 - 0.3 * (1 - torch.minimum(ax, ay))
    x = inside.float().expand(1, 3, 32, 32)
    assert box_fill(x).item() < 0.9
    assert box_fill(torch.zeros(2, 3, 32, 32)).isnan().all()


def test_the_wilson_interval_against_its_closed_form_and_a_normal_approximation():
    from minisd.metrics import proportion_interval

    z2 = 1.959964**2
    assert proportion_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)), abs=1e-6)  # 0 of n: [0, z²/(n + z²)]
    assert proportion_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0), abs=1e-6)
    lo, hi = proportion_interval(300, 600)  # far from 0 and 1 it is p ± 1.96 √(p(1 − p)/n)
    assert (lo + hi) / 2 == pytest.approx(0.5) and (hi - lo) / 2 == pytest.approx(1.96 * 0.5 / 600**0.5, rel=0.01)
    with pytest.raises(MinisdError, match="hits 11"):
        proportion_interval(11, 10)
