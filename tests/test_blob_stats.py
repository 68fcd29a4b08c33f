"""Chapter 2's blob and colour count (`minisd.metrics.blob_stats`, `count_regions` with `min_area`):
synthetic images with a known number of blobs and colours, real Shapes images read against their
labels, and region sizes against a plain flood fill."""

import pytest
import torch

from minisd.data import COLORS, Shapes
from minisd.errors import MinisdError
from minisd.metrics import blob_stats, count_regions

RED, GREEN, BLUE, YELLOW = (torch.tensor(COLORS[c], dtype=torch.float32) / 255 for c in ("red", "green", "blue", "yellow"))
COLOUR_INDEX = {name: k for k, name in enumerate(COLORS)}


def _square(img, top, left, size, rgb):
    img[:, top:top + size, left:left + size] = rgb.view(3, 1, 1)


def _region_sizes_by_flood_fill(mask: list[list[bool]]) -> list[int]:
    """Sizes of the 8-connected regions of a 2-D list of bools, by a plain depth-first search."""
    h, w, seen, sizes = len(mask), len(mask[0]), set(), []
    for start in ((i, j) for i in range(h) for j in range(w) if mask[i][j]):
        if start in seen:
            continue
        stack, size = [start], 0
        seen.add(start)
        while stack:
            i, j = stack.pop()
            size += 1
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    n = (i + di, j + dj)
                    if 0 <= n[0] < h and 0 <= n[1] < w and mask[n[0]][n[1]] and n not in seen:
                        seen.add(n)
                        stack.append(n)
        sizes.append(size)
    return sizes


def test_count_regions_min_area_matches_a_flood_fill():
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(30, 12, 12, generator=g) < torch.linspace(0.05, 0.5, 30).view(-1, 1, 1)
    for min_area in (1, 2, 4, 10):
        expected = [sum(s >= min_area for s in _region_sizes_by_flood_fill(m.tolist())) for m in masks]
        assert count_regions(masks, min_area).tolist() == expected, min_area
    with pytest.raises(MinisdError, match="min_area"):
        count_regions(masks, 0)


def test_synthetic_images_with_known_blobs_and_colours():
    x = torch.zeros(6, 3, 32, 32)
    _square(x[0], 4, 4, 6, RED)                       # one red square
    _square(x[1], 4, 4, 6, RED)                       # two separate squares, red and green (36 px each)
    _square(x[1], 20, 20, 6, GREEN)
    _square(x[2], 10, 10, 5, YELLOW)                  # a yellow square with a dim anti-aliased border:
    x[2, :, 9, 9:16] = 0.4 * YELLOW.view(3, 1)        # (0.38, 0.35, 0.06), nearer green than yellow in RGB
    _square(x[3], 4, 4, 6, GREEN)                     # a green square and a 1-pixel speck: one blob
    x[3, :, 25, 25] = 1.0
    _square(x[4], 4, 4, 4, RED)                       # two squares touching at a corner: one 8-connected blob
    _square(x[4], 8, 8, 4, RED)
    st = blob_stats(x)                                # x[5] stays black
    assert st["blobs"].tolist() == [1, 2, 1, 1, 1, 0]
    assert st["colour"].tolist() == [COLOUR_INDEX["red"], COLOUR_INDEX["red"], COLOUR_INDEX["yellow"],
                                     COLOUR_INDEX["green"], COLOUR_INDEX["red"], -1]
    assert st["colour_share"][1].item() == pytest.approx(0.5)
    assert st["colour_share"][2].item() == 1.0        # the dim border counts as yellow, by hue
    assert st["one_blob"].tolist() == [True, False, True, True, True, False]
    assert st["one_colour"].tolist() == [True, False, True, True, True, False]
    assert st["foreground"][1].item() == pytest.approx(72 / 1024)
    assert st["foreground"][3].item() == pytest.approx(37 / 1024)  # the speck is foreground, not a blob
    assert st["foreground"][5].item() == 0.0
    # the minimum area: the blobs of 32–37 pixels count at 20, not at 40; at 1 the speck counts too
    assert blob_stats(x, min_area=20)["blobs"].tolist() == [1, 2, 1, 1, 1, 0]
    assert blob_stats(x, min_area=40)["blobs"].tolist() == [0, 0, 0, 0, 0, 0]
    assert blob_stats(x[:4], min_area=1)["blobs"].tolist() == [1, 2, 1, 2]


def test_real_shapes_are_one_blob_of_their_own_colour():
    shapes = Shapes("test", 200, seed=0)
    st = blob_stats(shapes.images)
    assert st["one_blob"].all() and st["one_colour"].all()
    assert torch.equal(st["colour"], shapes.labels[:, 0])  # colour read back = colour drawn
    # uint8 and floats in [0, 1] give the same reading
    as_float = blob_stats(shapes.images.float() / 255)
    assert all(torch.equal(as_float[k], st[k]) for k in st)


def test_blob_stats_rejects_non_rgb():
    with pytest.raises(MinisdError, match="RGB images"):
        blob_stats(torch.zeros(2, 1, 32, 32))
