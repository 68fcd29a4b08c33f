"""The judge that measures generated images, FID on its features, and prompt accuracy."""

import numpy as np
import pytest
import torch

from minisd.data import ATTRIBUTES, HELD_OUT_PAIRS, VOCABULARY, encode_labels, parse_caption, render
from minisd.metrics import evaluate_pipeline, frechet_distance, load_judge, prompt_labels


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
    assert perfect["fid"] < 2 * perfect["fid_floor"] + 0.05
    assert 0.5 < perfect["diversity"] < 1.5
    wrong = evaluate_pipeline(Painter(all_red=True), model, "test", per_prompt=2)
    asked_red = (prompt_labels("test")[:, 0] == VOCABULARY["color"].index("red")).float().mean().item()
    assert wrong["color"] == pytest.approx(asked_red, abs=0.03) and wrong["all"] <= wrong["color"]
    assert wrong["shape"] >= 0.97
    assert wrong["fid"] > 3 * perfect["fid"]


def test_the_judge_reads_the_gpu_presets_64_pixel_images_by_averaging_them_down(judge):
    from minisd.data import Shapes

    model, _ = judge
    ds = Shapes("test", 500, image_size=64, seed=3)  # the `gpu` preset's size; the judge was trained at 32
    read, feats = model.read(ds.images)
    assert (read == ds.labels).float().mean(0).min() >= 0.98 and feats.shape == (500, model.config.feature_dim)
