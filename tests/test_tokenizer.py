"""The word-level tokenizer: round trips, truncation with a warning, any Unicode string."""

import random
import warnings

import pytest
import torch

from minisd.data import Shapes
from minisd.errors import MinisdError
from minisd.tokenizer import Tokenizer, shapes_tokenizer


def test_every_shapes_caption_round_trips_without_unknown_words():
    tok = shapes_tokenizer()
    for text in Shapes("test", 500).captions:
        ids = tok.encode(text)
        assert tok.unk_id not in ids and ids[0] == tok.start_id and ids[-1] == tok.end_id
        assert tok.decode(ids) == text


def test_batch_is_padded_to_max_length_with_a_mask():
    tok = shapes_tokenizer(max_length=12)
    ids, mask = tok(["a red circle", "a large blue square in the top left"])
    assert ids.shape == mask.shape == (2, 12)
    assert mask.sum(1).tolist() == [5, 10]
    assert (ids[~mask] == tok.pad_id).all()


def test_truncation_warns_and_keeps_the_end_token():
    tok = Tokenizer(["a", "b"], max_length=5)
    with pytest.warns(UserWarning, match="cut to 3"):
        ids = tok.encode("a b a b a b")
    assert len(ids) == 5 and ids[-1] == tok.end_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode("a b a")  # exactly fits: no warning


def test_any_unicode_string_is_accepted():
    tok = shapes_tokenizer()
    rng = random.Random(0)
    samples = ["", "   ", "赤い丸", "a RED circle!!", "\x00\ud800\uffff", "🙂 a 🙂", "ｒｅｄ", "e\u0301"]
    samples += ["".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(30))) for _ in range(300)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in samples:
            ids, mask = tok([s])
            assert ids.shape == (1, 16) and ids[0, 0] == tok.start_id and mask[0].sum() >= 2
    assert tok.encode("ｒｅｄ") == tok.encode("red")  # NFKC folds full-width letters
    assert tok.encode("a RED circle")[1:-1] == [tok.ids["a"], tok.ids["red"], tok.ids["circle"]]
    assert tok.encode("a pink circle")[2] == tok.unk_id


def test_save_and_load(tmp_path):
    tok = Tokenizer.from_texts(["the cat sat", "the dog, the cat", "猫"], max_length=9)
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.vocab == tok.vocab and again.max_length == 9
    assert torch.equal(again(["the cat 猫"])[0], tok(["the cat 猫"])[0])
    assert tok.vocab[4] == "the"  # most common first
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MinisdError, match="not a minisd tokenizer.json"):
        Tokenizer.load(tmp_path / "bad.json")
    with pytest.raises(MinisdError, match="not found"):
        Tokenizer.load(tmp_path / "missing.json")
