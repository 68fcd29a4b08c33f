"""A word-level tokenizer: caption → token ids for the text encoder.

    "a small red circle"  →  [<start>, a, small, red, circle, <end>, <pad>, …]  →  [1, 4, 9, 7, 5, 2, 0, …]

Text is lower-cased and split into words and single punctuation marks (any script: `\\w` is
Unicode-aware). Japanese and Chinese write no spaces between words, so each kana and each CJK
ideograph is a token of its own: "赤リンゴ" → 赤, リ, ン, ゴ. Words not in the vocabulary become
<unk>, so any string is accepted. Sequences
have a fixed length, `max_length`, counting <start> and <end>; longer text is cut, with a warning.
Real Stable Diffusion uses CLIP's byte-pair tokenizer with 49,408 tokens; our captions need a few
dozen words, and a word-level vocabulary keeps every id readable.
"""

from __future__ import annotations

import json
import re
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from minisd.errors import MinisdError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
_CJK = "\u3005\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # 々, kana, CJK ideographs
_WORDS = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")  # one CJK character, a word of other letters, a mark


def split_words(text: str) -> list[str]:
    """Normalise (NFKC, lower case) and split into words, punctuation marks and single CJK characters."""
    return _WORDS.findall(unicodedata.normalize("NFKC", str(text)).lower())


class Tokenizer:
    def __init__(self, words: Iterable[str], max_length: int = 16):
        if max_length < 2:
            raise MinisdError(f"max_length must be at least 2 (for <start> and <end>), got {max_length}")
        vocab = list(SPECIALS) + [w for w in dict.fromkeys(words) if w not in SPECIALS]
        self.vocab = vocab
        self.ids = {w: i for i, w in enumerate(vocab)}
        self.max_length = max_length
        self.pad_id, self.start_id, self.end_id, self.unk_id = (self.ids[s] for s in SPECIALS)

    @classmethod
    def from_texts(cls, texts: Iterable[str], max_length: int = 16, min_count: int = 1) -> Tokenizer:
        """Build the vocabulary from a corpus: every word seen at least `min_count` times, most common first."""
        counts = Counter(w for t in texts for w in split_words(t))
        return cls([w for w, n in counts.most_common() if n >= min_count], max_length)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Ids with <start> and <end>, not padded; cut to max_length with a warning."""
        ids = [self.ids.get(w, self.unk_id) for w in split_words(text)]
        if len(ids) > self.max_length - 2:
            warnings.warn(f"caption of {len(ids)} words cut to {self.max_length - 2} "
                          f"(max_length {self.max_length}): {text[:60]!r}", stacklevel=2)
            ids = ids[: self.max_length - 2]
        return [self.start_id, *ids, self.end_id]

    def __call__(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts → (ids (B, max_length) long, mask (B, max_length) bool, True for real tokens)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [self.encode(text) for text in texts]
        ids = torch.tensor([row + [self.pad_id] * (self.max_length - len(row)) for row in rows],
                           dtype=torch.long).reshape(len(texts), self.max_length)
        return ids, ids != self.pad_id

    def decode(self, ids: Iterable[int]) -> str:
        """Ids → text, without special tokens except <unk>."""
        skip = {self.pad_id, self.start_id, self.end_id}
        return " ".join(self.vocab[i] for i in (int(i) for i in ids) if i not in skip)

    def save(self, path) -> None:
        from minisd.checkpoint import atomic_write

        data = {"vocab": self.vocab, "max_length": self.max_length}
        atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(data, ensure_ascii=False, indent=1)))

    @classmethod
    def load(cls, path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise MinisdError(f"tokenizer file {str(path)!r} not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            vocab, max_length = data["vocab"], data["max_length"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MinisdError(f"{str(path)!r} is not a minisd tokenizer.json ({e})") from None
        if list(vocab[: len(SPECIALS)]) != list(SPECIALS):
            raise MinisdError(f"{str(path)!r} does not start with the special tokens {list(SPECIALS)}")
        return cls(vocab[len(SPECIALS):], max_length)


def shapes_tokenizer(max_length: int = 16, paraphrases: bool = False) -> Tokenizer:
    """A tokenizer whose vocabulary covers every canonical Shapes caption and, with `paraphrases`,
    every caption `minisd.data.describe` can write (other word orders, synonyms, "shape")."""
    from minisd.data import PARAPHRASE_TEMPLATES, SYNONYMS, VOCABULARY

    words = ["a", "in", "the"] + [w for values in VOCABULARY.values() for v in values for w in split_words(v)]
    if paraphrases:
        words += ["shape"] + [w for t in PARAPHRASE_TEMPLATES for w in split_words(t.format(np="", loc=""))]
        words += [w for options in SYNONYMS.values() for v in options for w in split_words(v)]
    return Tokenizer(words, max_length)
