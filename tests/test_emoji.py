"""The emoji dataset: real pictures (the Noto Color Emoji font) with English and Japanese names."""

import hashlib
import io
import json
import os
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch

from minisd import emojis
from minisd.cli import main
from minisd.data import load_dataset
from minisd.errors import MinisdError
from minisd.tokenizer import Tokenizer, split_words
from minisd.viz import cjk_font, save_figure, show_images


def _font_or_skip():
    """The installed font; in CI (CI=true) a missing font fails instead of skipping."""
    try:
        return emojis.find_font("data")
    except MinisdError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("the Noto Color Emoji font is not installed (sudo apt install fonts-noto-color-emoji)")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    _font_or_skip()
    return tmp_path_factory.mktemp("emoji")  # an empty data folder: the system's font, a fresh cache


def test_the_table_names_every_emoji_the_font_draws_in_both_languages(root):
    chars, en, ja, rgba = emojis.emoji_renders(root)
    font = emojis.find_font(root)
    if hashlib.sha256(font.read_bytes()).hexdigest() == emojis.FONT_SHA256:
        assert len(chars) == 1377  # Debian's 2.042: 1,400 one-code-point emoji, 23 newer than the font
    else:
        assert len(chars) > 1000
    assert rgba.shape == (len(chars), emojis.BASE, emojis.BASE, 4) and rgba.dtype == np.uint8
    assert (rgba[..., 3].reshape(len(chars), -1).max(1) == 255).all()  # every render has opaque ink
    assert all(len(c.replace("\ufe0f", "")) == 1 for c in chars)
    assert ja[en.index("red apple")] == "赤リンゴ" and chars[en.index("red apple")] == "🍎"
    assert all(name in en for name in emojis.HELD_OUT)
    # the cache: a second call reads the same renders back from root/cache
    assert list((root / "cache").glob("emoji-*.npz"))
    again = emojis.emoji_renders(root)
    assert again[0] == chars and np.array_equal(again[3], rgba)


def test_load_is_deterministic_and_the_seed_matters(root):
    a = load_dataset("emoji", "train", root=root, image_size=32, num_images=64, seed=3)
    b = load_dataset("emoji", "train", root=root, image_size=32, num_images=64, seed=3)
    c = load_dataset("emoji", "train", root=root, image_size=32, num_images=64, seed=4)
    assert torch.equal(a.images, b.images) and a.captions == b.captions and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (64, 3, 32, 32) and a.images.dtype == torch.uint8
    assert a[0]["image"].shape == (3, 32, 32) and a.name == "emoji" and a.split == "train"
    corners = a.images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners.float().mean() > 250).item()  # a white background


def test_splits_hold_out_the_compositions_and_share_no_image(root):
    chars, en, ja, _ = emojis.emoji_renders(root)
    held = {en.index(name) for name in emojis.HELD_OUT}
    train = load_dataset("emoji", "train", root=root, num_images=3000)
    test = load_dataset("emoji", "test", root=root, num_images=600)
    heldout = load_dataset("emoji-ja", "heldout", root=root, num_images=30)
    assert not held & set(train.labels.tolist()) and not held & set(test.labels.tolist())
    assert set(heldout.labels.tolist()) == held
    assert not set(emojis.HELD_OUT) & set(train.texts)
    assert set(heldout.texts) == {ja[k] for k in held} == {"緑のハート", "紫の丸", "オレンジの四角"}
    # every emoji but the held-out ones appears in training, about equally often
    counts = torch.bincount(train.labels, minlength=len(chars))
    assert (counts[sorted(set(range(len(chars))) - held)] >= 2).all()
    # train places an emoji's left edge at an even column, test at an odd one: no image in both
    seen = {hashlib.sha1(im.numpy().tobytes()).digest() for im in train.images}
    assert not any(hashlib.sha1(im.numpy().tobytes()).digest() in seen for im in test.images)


def test_both_languages_and_the_japanese_tokens(root):
    both = load_dataset("emoji-both", "train", root=root, num_images=400)
    japanese = [t for t in both.captions if any(ord(ch) >= 0x3000 for ch in t)]
    assert 120 < len(japanese) < 280  # about half of 400
    chars, en, ja, _ = emojis.emoji_renders(root)
    for caption, k in zip(both.captions, both.labels.tolist()):
        assert caption in (en[k], ja[k])
    tok = Tokenizer.from_texts(en + ja, max_length=24)  # every name's words and characters
    ids, mask = tok(["赤リンゴ", "red apple"])
    assert [tok.vocab[i] for i in ids[0][mask[0]]] == ["<start>", "赤", "リ", "ン", "ゴ", "<end>"]
    assert [tok.vocab[i] for i in ids[1][mask[1]]] == ["<start>", "red", "apple", "<end>"]


def test_split_words_keeps_english_and_splits_japanese_into_characters():
    assert split_words("a small red circle, in the top-left!") == \
        ["a", "small", "red", "circle", ",", "in", "the", "top", "-", "left", "!"]
    assert split_words("緑のハート") == ["緑", "の", "ハ", "ー", "ト"]
    assert split_words("血液型AB型") == ["血", "液", "型", "ab", "型"]
    assert split_words("ｱｲｳ wörds 々") == ["ア", "イ", "ウ", "wörds", "々"]  # NFKC: half-width kana → full


def test_japanese_titles_draw_with_a_japanese_font(root, tmp_path):
    if cjk_font() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no font with Japanese glyphs (sudo apt install fonts-ipafont-gothic)")
        pytest.skip("no font with Japanese glyphs installed")
    ds = load_dataset("emoji-ja", "heldout", root=root, num_images=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_figure(show_images(ds.images, ds.captions), tmp_path / "ja.png")
    assert not [w for w in caught if "missing from font" in str(w.message)]


def test_cli_preview_of_the_japanese_emoji(root, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["data", "--dataset", "emoji-both", "--root", str(root), "-n", "16", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- what goes wrong, said clearly --------------------------------------------------------------
def test_missing_font_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(emojis, "FONT_PLACES", (str(tmp_path / "nowhere.ttf"),))
    with pytest.raises(MinisdError, match="apt install fonts-noto-color-emoji.*--download"):
        load_dataset("emoji", root=tmp_path)
    assert main(["data", "--dataset", "emoji", "--root", str(tmp_path), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the Noto Color Emoji font")
    assert not (tmp_path / "g.png").exists()


def test_missing_package_is_a_clear_error(root, monkeypatch):
    emojis._emoji_table.cache_clear()
    monkeypatch.setitem(sys.modules, "emoji", None)  # `import emoji` raises ImportError
    try:
        with pytest.raises(MinisdError, match="needs the `emoji` package: pip install emoji"):
            load_dataset("emoji", root=root, num_images=4)
    finally:
        emojis._emoji_table.cache_clear()


def test_bad_split_and_language(root):
    with pytest.raises(MinisdError, match="unknown split 'val'; allowed: 'train', 'test', 'heldout'"):
        load_dataset("emoji", "val", root=root)
    with pytest.raises(MinisdError, match="unknown language 'fr'; allowed: 'en', 'ja', 'both'"):
        emojis.load_emoji("train", "fr", root=root)


def _deb(members: dict[str, bytes]) -> bytes:
    """A minimal .deb: an ar archive with debian-binary and a data.tar.xz holding `members`."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    out = b"!<arch>\n"
    for name, body in (("debian-binary", b"2.0\n"), ("data.tar.xz", data.getvalue())):
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body
        out += b"\n" * (len(body) % 2)
    return out


def test_font_package_unpacking_and_checksum(tmp_path, monkeypatch):
    font = b"not really a font, but bytes to find"
    package = _deb({emojis.FONT_MEMBER: font, "./usr/share/doc/README": b"x"})
    assert emojis._member_of_deb(package, emojis.FONT_MEMBER) == font
    with pytest.raises(MinisdError, match="holds no"):
        emojis._member_of_deb(_deb({"./other": b"y"}), emojis.FONT_MEMBER)
    with pytest.raises(MinisdError, match="not a .deb"):
        emojis._member_of_deb(b"PK\x03\x04", emojis.FONT_MEMBER)
    # a download whose checksum differs writes nothing
    url = (tmp_path / "pkg.deb").as_uri()
    (tmp_path / "pkg.deb").write_bytes(package)
    with pytest.raises(MinisdError, match=r"SHA-256 differs\); nothing written"):
        emojis.download_font(tmp_path / "data", url=url)
    assert not (tmp_path / "data").exists()
    # with the checksum of this package, the font lands in root, written whole
    monkeypatch.setattr(emojis, "FONT_PACKAGE_SHA256", hashlib.sha256(package).hexdigest())
    assert emojis.download_font(tmp_path / "data", url=url).read_bytes() == font


# --- the judge and the fidelity measurement -----------------------------------------------------
def test_colour_and_object_of_a_name():
    assert emojis.colour_and_object("green heart") == ("green", "heart")
    assert emojis.colour_and_object("black large square") == ("black", "square")
    assert emojis.colour_and_object("red apple") == ("red", None)
    assert emojis.colour_and_object("grinning face") == (None, None)


@pytest.fixture(scope="module")
def judge(root):
    judge, accuracy = emojis.load_emoji_judge(root, log=lambda *a: None, progress=False)
    return judge, accuracy


def test_the_judge_reads_clean_renders(judge, root):
    model, stored = judge
    measured = emojis.emoji_judge_accuracy(model, root)  # fresh renders, not the stored figures
    assert measured["test/top1"] >= 0.99 and measured["heldout/top1"] >= 0.99
    assert measured["test/top5"] >= measured["test/top1"]
    assert measured == pytest.approx(stored, abs=1e-6)


class _Drawer:
    """A stand-in text-to-image model that draws the emoji its prompt names (shifted by `offset`
    in the table: 0 = a perfect model, 1 = always the wrong emoji, None = nothing at all)."""

    def __init__(self, root, lang, offset):
        chars, en, ja, self.rgba = emojis.emoji_renders(root)
        self.index = {name: k for k, name in enumerate(en if lang == "en" else ja)}
        self.offset, self.count = offset, len(chars)

    def __call__(self, prompts, num_inference_steps, guidance_scale, seed):
        if self.offset is None:  # a model that draws nothing: white images
            return type("Result", (), {"images": torch.ones(len(prompts), 3, 32, 32)})
        which = np.array([(self.index[p] + self.offset) % self.count for p in prompts])
        images = emojis._compose(self.rgba, which, 32, np.random.default_rng(seed), odd_x=True)
        return type("Result", (), {"images": torch.from_numpy(images).float() / 255})


@pytest.mark.parametrize("lang", ["en", "ja"])
def test_fidelity_of_a_perfect_and_of_a_wrong_model(judge, root, lang):
    model, _ = judge
    perfect = emojis.evaluate_emoji(_Drawer(root, lang, 0), model, root, lang=lang, limit=300, held_out_per_prompt=10)
    assert perfect["top1"] >= 0.97 and perfect["heldout_top1"] >= 0.9
    assert min(perfect["heldout_colour"], perfect["heldout_object"]) >= perfect["heldout_top1"]
    assert perfect["fid"] < 2 * perfect["fid_reference"]
    lo, hi = perfect["top1_ci"]
    assert lo <= perfect["top1"] <= hi
    wrong = emojis.evaluate_emoji(_Drawer(root, lang, 1), model, root, lang=lang, limit=300, held_out_per_prompt=10)
    assert wrong["top1"] < 0.05 and wrong["heldout_top1"] < 0.05
    # FID compares distributions: drawing every emoji in its neighbour's place leaves it where it was
    assert abs(wrong["fid"] - perfect["fid"]) < 0.25 * perfect["fid_reference"]
    blank = emojis.evaluate_emoji(_Drawer(root, lang, None), model, root, lang=lang, limit=300, held_out_per_prompt=10)
    assert blank["fid"] > 5 * perfect["fid_reference"] and blank["top5"] < 0.05


def test_fidelity_keeps_its_samples_when_asked(judge, root):
    model, _ = judge
    r = emojis.evaluate_emoji(_Drawer(root, "en", 0), model, root, limit=50, held_out_per_prompt=4, return_samples=True)
    s = r["samples"]
    assert len(s["images"]) == len(s["asked"]) == len(s["read"]) == len(s["held_out"]) == 50 + 3 * 4
    assert s["read"].shape[1] == 5 and int(s["held_out"].sum()) == 12
    # the rates are the samples' readings, counted
    assert (s["read"][~s["held_out"], 0] == s["asked"][~s["held_out"]]).float().mean().item() == pytest.approx(r["top1"])
    assert "samples" not in emojis.evaluate_emoji(_Drawer(root, "en", 0), model, root, limit=5, held_out_per_prompt=1)


def test_an_emoji_run_trains_samples_in_japanese_and_is_measured(root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--dataset", "emoji-ja", "--root", str(root), "--out", str(out)]) == 0
    assert "measure with `minisd eval" in capsys.readouterr().out
    png = tmp_path / "s.png"
    assert main(["sample", "--run", str(out), "--prompt", "赤リンゴ", "-n", "2", "--steps", "5", "--out", str(png)]) == 0
    assert main(["eval", "--run", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "prompts in ja: 1434 images" in printed and "held-out compositions" in printed
    figures = json.loads((out / "metrics.json").read_text())["eval"]["sd/emoji-ja"]
    assert 0 <= figures["top1"] <= figures["top5"] <= 1 and figures["num_images"] == 1434
