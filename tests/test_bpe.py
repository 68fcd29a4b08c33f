"""CLIP's byte-pair-encoding tokenizer, from scratch, against open_clip's port of CLIP's own."""

import json
import os
import random
import warnings

import pytest

from minisd.errors import MinisdError
from minisd.tokenizer import BPE_END, BPE_START, BPETokenizer, byte_alphabet


def _open_clip():
    """open_clip's tokenizer module (the dev extras install it); CI must not skip."""
    if os.environ.get("CI") == "true":
        import open_clip.tokenizer as tokenizer
        return tokenizer
    return pytest.importorskip("open_clip.tokenizer")


@pytest.fixture(scope="module")
def pair():
    oc = _open_clip()
    return BPETokenizer.from_merges_file(oc.default_bpe()), oc.SimpleTokenizer()


def _strings(n: int = 3000, seed: int = 0) -> list[str]:
    """Varied text: words of several scripts, emoji, digits, punctuation, HTML entities,
    apostrophes, odd whitespace, mixed case, long prompts."""
    import emoji

    rng = random.Random(seed)
    emoji.config.load_language("ja")
    names = [d[lang].strip(":").replace("_", " ") for d in list(emoji.EMOJI_DATA.values())[:800] for lang in ("en", "ja")
             if lang in d]
    pool = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") + list("!?.,;:-_()[]{}'\"/\\@#$%^&*+=~`|<>")
            + list("àéîõüßçñÆØÅœ") + list("あいうえおカキクケコ赤青緑日本語") + list("абвгдαβγδ") + ["🍎", "🐱", "❤️", "👍🏽", "🇯🇵"]
            + ["&amp;", "&lt;", "&quot;", "'s", "'ll", "'re", " ", " ", "\t", "\n", "  "])
    out = [f"a photo of {name}" for name in names]
    while len(out) < n:
        kind = rng.random()
        if kind < 0.6:
            out.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 40))))
        elif kind < 0.9:
            out.append(" ".join(rng.choice(names) for _ in range(rng.randint(1, 6))))
        else:  # a long prompt, past 77 tokens
            out.append(", ".join(rng.choice(names) for _ in range(rng.randint(30, 60))))
    return out[:n]


def test_ids_equal_open_clip_on_thousands_of_strings(pair):
    mine, ref = pair
    strings = _strings()
    assert len(strings) >= 3000
    different = [s for s in strings if mine.encode(s) != ref.encode(s)]
    assert not different, f"{len(different)} strings differ, e.g. {different[:3]!r}"
    assert len(mine) == 49408 and mine.start_id == 49406 and mine.end_id == 49407


def test_the_byte_alphabet():
    table = byte_alphabet()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ" and list(table)[:3] == [ord("!"), ord('"'), ord("#")]


def test_sequences_are_padded_and_cut_as_stable_diffusion_reads_them(pair):
    mine, ref = pair
    ids, mask = mine(["a photo of a cat", ""])
    assert ids.shape == (2, 77) and mask.shape == (2, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and mask[0].sum() == 7
    assert (ids[0, 7:] == 49407).all()  # SD 1.x pads with <|endoftext|>
    assert ids[1, :2].tolist() == [49406, 49407] and mask[1].sum() == 2
    long = " ".join(["red apple"] * 60)
    with pytest.warns(UserWarning, match="prompt of 120 tokens cut to 75"):
        cut, cut_mask = mine([long])
    assert cut[0, 0] == 49406 and cut[0, 76] == 49407 and cut_mask[0].all()
    assert cut[0, 1:76].tolist() == mine.encode(long)[:75]
    # open_clip pads with 0 instead; up to the end token the two agree
    assert ref([long])[0, :77].tolist() == cut[0].tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mine(["a short prompt"])


def test_decode_gives_back_the_cleaned_text(pair):
    mine, _ = pair
    for s in _strings(300, seed=1):
        assert mine.decode(mine.encode(s)).replace(" ", "") == mine.clean(s).replace(" ", "")


def test_special_tokens_written_in_the_text(pair):
    mine, _ = pair
    assert mine.encode(f"{BPE_START}hi{BPE_END}") == [49406, mine.encode("hi")[0], 49407]


def test_a_diffusers_tokenizer_folder_reads_the_same(pair, tmp_path):
    mine, _ = pair
    merges = [pair_ for pair_, _ in sorted(mine.rank.items(), key=lambda kv: kv[1])]
    (tmp_path / "vocab.json").write_text(json.dumps(mine.vocab, ensure_ascii=False))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    folder = BPETokenizer.from_folder(tmp_path)
    for s in _strings(200, seed=2):
        assert folder.encode(s) == mine.encode(s)
    # what goes wrong, said clearly
    vocab = dict(mine.vocab)
    del vocab["cat</w>"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(MinisdError, match="the vocabulary lacks 1 token"):
        BPETokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    with pytest.raises(MinisdError, match="is not valid JSON"):
        BPETokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps(mine.vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nc a\nthree tokens here\n")
    with pytest.raises(MinisdError, match="line 3 is not a merge"):
        BPETokenizer.from_folder(tmp_path)
    with pytest.raises(MinisdError, match="vocab.json' not found; a tokenizer folder holds"):
        BPETokenizer.from_folder(tmp_path / "nowhere")
