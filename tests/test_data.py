"""The Shapes dataset: the DESIGN's vocabulary, colours, captions, splits, determinism, speed."""

import time

import numpy as np
import pytest
import torch

from minisd.data import (
    COLORS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    Shapes,
    caption,
    decode_labels,
    encode_labels,
    parse_caption,
    render,
    toy_2d,
)
from minisd.errors import MinisdError


def test_vocabulary_and_canonical_colours_are_the_designs():
    assert COLORS == {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 230),
                      "yellow": (240, 220, 40), "purple": (150, 60, 200), "white": (240, 240, 240)}
    assert SHAPES == ("circle", "square", "triangle")
    assert SIZES == ("small", "large")
    assert POSITIONS == ("top left", "top right", "bottom left", "bottom right", "center")


def test_caption_form_and_round_trip():
    assert caption("red", "circle", "small", "top left") == "a small red circle in the top left"
    ds = Shapes("test", num_images=300, seed=3)
    for text, row, attrs in zip(ds.captions, ds.labels, decode_labels(ds.labels)):
        assert parse_caption(text) == attrs
        assert torch.equal(encode_labels(**attrs)[0], row)


def test_items_have_image_caption_and_labels():
    ds = Shapes("train", num_images=10, image_size=32)
    item = ds[4]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["caption"] == ds.captions[4]
    assert item["labels"].shape == (4,) and item["labels"].dtype == torch.long
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch["image"].shape == (5, 3, 32, 32) and len(batch["caption"]) == 5


def test_deterministic_for_a_seed_and_splits_differ():
    a, b = Shapes("train", 200, seed=5), Shapes("train", 200, seed=5)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, Shapes("train", 200, seed=6).images)
    assert not torch.equal(a.images, Shapes("test", 200, seed=5).images)


def test_held_out_pairs_never_in_train_or_test_and_only_in_heldout():
    def pairs(ds):
        return {(d["color"], d["shape"]) for d in decode_labels(ds.labels)}

    held = set(HELD_OUT_PAIRS)
    assert not pairs(Shapes("train", 5000)) & held
    assert not pairs(Shapes("test", 2000)) & held
    assert pairs(Shapes("heldout", 500)) == held
    # every other pair, size and position does occur in training
    train = Shapes("train", 5000)
    assert len(pairs(train)) == len(COLORS) * len(SHAPES) - len(held)
    assert set(train.labels[:, 2].tolist()) == {0, 1} and set(train.labels[:, 3].tolist()) == set(range(5))


def test_rendered_object_has_its_colour_position_and_size():
    """Read every image back: at least 40% of the object's pixels are exactly its canonical colour (the
    rest are anti-aliased edges), the foreground's centroid falls in the named quadrant, and large
    objects cover more pixels than small ones."""
    ds = Shapes("test", num_images=1000, seed=0)
    img = ds.images.float()
    fg = img.amax(1) > 100  # the object, edges included: (N, H, W)
    for i in range(len(ds)):
        color, shape, size, position = ds.labels[i].tolist()
        canonical = torch.tensor(COLORS[ATTR_COLOR[color]], dtype=torch.float32).view(3, 1, 1)
        exact = (img[i] == canonical).all(0)
        assert exact.sum() > 8 and exact.sum() >= 0.4 * fg[i].sum()
        ys, xs = torch.nonzero(fg[i], as_tuple=True)
        cx, cy = xs.float().mean() / 32, ys.float().mean() / 32
        name = POSITIONS[position]
        if name == "center":
            assert abs(cx - 0.5) < 0.1 and abs(cy - 0.5) < 0.1
        else:
            assert (cy < 0.5) == name.startswith("top") and (cx < 0.5) == name.endswith("left")
    area = fg.flatten(1).sum(1).float()
    small, large = area[ds.labels[:, 2] == 0], area[ds.labels[:, 2] == 1]
    assert small.max() < large.min()


ATTR_COLOR = list(COLORS)


def test_shapes_are_told_apart_by_fill_fraction():
    """A circle fills π/4 of its bounding box, a square all of it, a triangle about half."""
    labels = encode_labels(color=["white"] * 3, shape=list(SHAPES), size=["large"] * 3, position=["center"] * 3)
    img = render(labels, 64, jitter=False).float()
    cover = img[:, 0] / 240
    for k, expected in enumerate([np.pi / 4, 1.0, 0.5]):
        rows, cols = torch.nonzero(cover[k] > 0.5, as_tuple=True)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert abs((cover[k] > 0.5).sum() / box - expected) < 0.08, SHAPES[k]


def test_fast_enough_for_fifty_thousand_images():
    start = time.perf_counter()
    ds = Shapes("train", 50_000, image_size=32)
    assert len(ds) == 50_000 and ds.images.shape == (50_000, 3, 32, 32)
    assert time.perf_counter() - start < 30  # about 2 s on 2 cores; generous for a loaded CI box


def test_bad_attributes_and_splits_name_the_value_and_the_allowed_ones():
    with pytest.raises(MinisdError, match=r"unknown color 'pink'; allowed: 'red', 'green'"):
        caption("pink", "circle", "small", "center")
    with pytest.raises(MinisdError, match=r"unknown shape 'hexagon'; allowed: 'circle', 'square', 'triangle'"):
        encode_labels(color="red", shape="hexagon", size="small", position="center")
    with pytest.raises(MinisdError, match=r"unknown position 'middle'.*'center'"):
        parse_caption("a small red circle in the middle")
    with pytest.raises(MinisdError, match=r"unknown size 'huge'"):
        parse_caption("a huge red circle in the center")
    with pytest.raises(MinisdError, match=r"unknown attribute 'texture'"):
        encode_labels(color="red", shape="circle", size="small", position="center", texture="x")
    with pytest.raises(MinisdError, match=r"unknown split 'validation'; allowed: 'train', 'test', 'heldout'"):
        Shapes("validation")
    with pytest.raises(MinisdError, match="not of the form"):
        parse_caption("red circle")
    with pytest.raises(MinisdError, match=r"unknown toy dataset 'swiss'"):
        toy_2d("swiss")


@pytest.mark.parametrize("name", ["spiral", "moons", "gaussians"])
def test_toy_data_is_deterministic_and_standardised(name):
    x = toy_2d(name, 5000, seed=0)
    assert x.shape == (5000, 2) and torch.equal(x, toy_2d(name, 5000, seed=0))
    assert abs(x.std().item() - 1) < 0.05 and x.mean(0).abs().max() < 0.05
