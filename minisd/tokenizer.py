"""A word-level tokenizer: caption → token ids for the text encoder.

    "a small red circle"  →  [<start>, a, small, red, circle, <end>, <pad>, …]  →  [1, 4, 9, 7, 5, 2, 0, …]

Text is lower-cased and split into words and single punctuation marks (any script: `\\w` is
Unicode-aware). Japanese and Chinese write no spaces between words, so each kana and each CJK
ideograph is a token of its own: "赤リンゴ" → 赤, リ, ン, ゴ. Words not in the vocabulary become
<unk>, so any string is accepted. Sequences have a fixed length, `max_length`, counting <start>
and <end>; longer text is cut, with a warning.
Real Stable Diffusion uses CLIP's byte-pair tokenizer with 49,408 tokens; our captions need a few
dozen words, and a word-level vocabulary keeps every id readable. `BPETokenizer`, at the end of
this module, is CLIP's tokenizer written from scratch: it reads CLIP's merges file or a diffusers
`tokenizer/` folder and gives exactly CLIP's ids.
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

from minisd.errors import MinisdError, read_json_object

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

    def tokens(self, text: str) -> list[str]:
        """The words the text encoder reads for `text`, one per position, <start> and <end> included."""
        return [self.vocab[i] for i in self.encode(text)]

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


# --- CLIP's byte-pair encoding: what Stable Diffusion's text encoder reads -----------------------
# Real captions are open-ended, so a word list cannot cover them. CLIP (Radford et al. 2021) uses
# byte-pair encoding (Sennrich et al. 2016): start from the bytes of each word and apply, in order
# of priority, the 48,894 merges that training found most useful — "c a t</w>" → "ca t</w>" →
# "cat</w>" — so common words become one token, rare ones several pieces, and any text at all
# (any script, emoji) some sequence of the 49,408 tokens. "</w>" marks the end of a word.

BPE_START, BPE_END = "<|startoftext|>", "<|endoftext|>"
BPE_MAX_LENGTH = 77  # CLIP's context, and Stable Diffusion's: <start>, 75 tokens, <end>
_BPE_MERGES = 49152 - 256 - 2  # how many merges CLIP's vocabulary of 49,408 holds


def byte_alphabet() -> dict[int, str]:
    """Each of the 256 byte values → a printable character, so that BPE can work on text.

    Bytes that already print as themselves (!…~, ¡…¬, ®…ÿ) keep their character; the other 68
    (space, control codes, …) take the characters from U+0100 on, in order. The table's order —
    the printable bytes first — is the order of the first 256 tokens of the vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return table


class BPETokenizer:
    """CLIP's byte-pair-encoding tokenizer, as Stable Diffusion 1.x uses it.

        "a photo of a cat"  →  [49406, 320, 1125, 539, 320, 2368, 49407, 49407, …]  (77 ids)

    Text is cleaned as CLIP cleans it (ftfy's repairs if ftfy is installed, HTML entities
    unescaped, runs of whitespace made one space, lower case) and split into words, single
    digits, and runs of other marks; each piece's UTF-8 bytes are merged by `merges`. Sequences
    are <|startoftext|>, at most 75 tokens (longer text is cut, with a warning), <|endoftext|>,
    then padding with `pad_token`: None pads with <|endoftext|> as Stable Diffusion 1.x does; SD 2.x
    pads with "!" (id 0). The choice matters: the causal text encoder gives the padding positions
    states of their own, and SD's U-Net attends to every position, padding included.
    """

    def __init__(self, merges: list[tuple[str, str]], max_length: int = BPE_MAX_LENGTH,
                 vocab: dict[str, int] | None = None, pad_token: str | None = None):
        import regex  # Unicode classes \\p{L} (letters) and \\p{N} (numbers), which `re` lacks

        alphabet = list(byte_alphabet().values())
        tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BPE_START, BPE_END]
        self.vocab = dict(vocab) if vocab is not None else {t: i for i, t in enumerate(tokens)}
        missing = [t for t in tokens if t not in self.vocab]
        if missing:
            raise MinisdError(f"the vocabulary lacks {len(missing)} token(s) its merges make, e.g. {missing[:3]}")
        self.ids_to_tokens = {i: t for t, i in self.vocab.items()}
        self.merges = [tuple(m) for m in merges]
        self.rank = {pair: r for r, pair in enumerate(self.merges)}
        self.byte_char = byte_alphabet()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        self.max_length = max_length
        self.start_id, self.end_id = self.vocab[BPE_START], self.vocab[BPE_END]
        if pad_token is not None and pad_token not in self.vocab:
            raise MinisdError(f"pad token {pad_token!r} is not in the vocabulary")
        self.pad_token = pad_token
        self.pad_id = self.end_id if pad_token is None else self.vocab[pad_token]
        self._pieces = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|"
                                     r"[^\s\p{L}\p{N}]+", regex.IGNORECASE)
        self._cache: dict[str, list[str]] = {}

    # -- reading the files ----------------------------------------------------------------------
    @classmethod
    def from_merges_file(cls, path, max_length: int = BPE_MAX_LENGTH) -> BPETokenizer:
        """CLIP's own merges file, `bpe_simple_vocab_16e6.txt(.gz)`: a header line, then one merge
        per line; the vocabulary follows from the merges."""
        import gzip

        path = Path(path)
        if not path.is_file():
            raise MinisdError(f"merges file {str(path)!r} not found")
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        return cls(_read_merges(raw.decode("utf-8"), path), max_length)

    @classmethod
    def from_folder(cls, folder, max_length: int | None = None) -> BPETokenizer:
        """A diffusers-format `tokenizer/` folder: `vocab.json` (token → id) and `merges.txt`, or
        the single `tokenizer.json` that transformers ≥ 5 writes. The pad token and, unless
        `max_length` is given, the sequence length (`model_max_length`, else 77) come from
        `special_tokens_map.json` / `tokenizer_config.json` where the folder has them."""
        folder = Path(folder)
        if (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
            for name in ("vocab.json", "merges.txt"):
                if not (folder / name).is_file():
                    raise MinisdError(f"{str(folder / name)!r} not found; a tokenizer folder holds vocab.json and "
                                      f"merges.txt (or tokenizer.json)")
            vocab = read_json_object(folder / "vocab.json")
            merges = _read_merges((folder / "merges.txt").read_text(encoding="utf-8"), folder / "merges.txt")
        else:
            model = read_json_object(folder / "tokenizer.json").get("model", {})
            if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>" or \
                    not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
                raise MinisdError(f"{str(folder / 'tokenizer.json')!r} is not CLIP's byte-pair tokenizer")
            vocab = model["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        settings = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # special_tokens_map.json has the last word
            if (folder / name).is_file():
                settings.update(read_json_object(folder / name))
        pad = settings.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad  # saved either as text or as an AddedToken
        if max_length is None:
            length = settings.get("model_max_length")
            # tokenizers without a limit store a huge number here
            max_length = length if isinstance(length, int) and 2 <= length <= 4096 else BPE_MAX_LENGTH
        return cls(merges, max_length, vocab, pad_token=None if pad == BPE_END else pad)

    def save(self, folder) -> None:
        """Write the tokenizer as a diffusers `tokenizer/` folder — vocab.json, merges.txt and
        tokenizer_config.json (sequence length, pad token) — which `from_folder` and transformers'
        `CLIPTokenizer` read back."""
        from minisd.checkpoint import atomic_write

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, "bos_token": BPE_START,
                  "eos_token": BPE_END, "unk_token": BPE_END, "pad_token": self.pad_token or BPE_END}
        files = {"vocab.json": json.dumps(self.vocab, ensure_ascii=False),
                 "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges),
                 "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n"}
        for name, text in files.items():
            atomic_write(folder / name, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))

    # -- text → tokens --------------------------------------------------------------------------
    def clean(self, text: str) -> str:
        """CLIP's cleaning: ftfy's repairs (if installed), HTML entities unescaped twice, one space
        for each run of whitespace, lower case."""
        import html

        try:
            import ftfy

            text = ftfy.fix_text(text)
        except ImportError:  # ftfy repairs mojibake; without it such text tokenizes differently
            pass
        return " ".join(html.unescape(html.unescape(text)).split()).lower()

    def merge(self, piece: str) -> list[str]:
        """One piece (its bytes as `byte_alphabet` characters) → its BPE tokens: repeatedly merge
        the adjacent pair with the best (lowest) rank, everywhere it occurs, until none is left."""
        if piece in self._cache:
            return self._cache[piece]
        parts = [*piece[:-1], piece[-1] + "</w>"]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.rank.get(pair, float("inf")))
            if best not in self.rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[piece] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Ids of the text's tokens, without <|startoftext|>, <|endoftext|> or padding."""
        ids = []
        for piece in self._pieces.findall(self.clean(text)):
            if piece in (BPE_START, BPE_END):  # written out in the text: the special token itself, as CLIP does
                ids.append(self.vocab[piece])
                continue
            chars = "".join(self.byte_char[b] for b in piece.encode("utf-8"))
            ids += [self.vocab[t] for t in self.merge(chars)]
        return ids

    def sequence(self, text: str) -> list[int]:
        """<|startoftext|>, the text's ids cut to max_length − 2 (with a warning), <|endoftext|>."""
        body = self.encode(text)
        if len(body) > self.max_length - 2:
            warnings.warn(f"prompt of {len(body)} tokens cut to {self.max_length - 2} "
                          f"(max_length {self.max_length}): {text[:60]!r}", stacklevel=3)
            body = body[: self.max_length - 2]
        return [self.start_id, *body, self.end_id]

    def tokens(self, text: str) -> list[str]:
        """The pieces the text encoder reads for `text`, one per position up to <|endoftext|>,
        without their end-of-word mark ('cat</w>' → 'cat')."""
        return [self.ids_to_tokens[i].removesuffix("</w>") for i in self.sequence(text)]

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts → (ids (B, max_length) long, mask (B, max_length) bool: True up to <|endoftext|>)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(texts), self.max_length, dtype=torch.bool)
        for row, text in enumerate(texts):
            seq = self.sequence(text)
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = True
        return ids, mask

    def decode(self, ids) -> str:
        """Ids → text (special tokens dropped); "</w>" becomes a space."""
        out = bytearray()
        for i in map(int, ids):
            if i in (self.start_id, self.end_id):
                continue
            token = self.ids_to_tokens[i]
            out += bytes(self.char_byte[c] for c in token.removesuffix("</w>"))
            if token.endswith("</w>"):
                out += b" "
        return out.decode("utf-8", errors="replace").strip()


def _read_merges(text: str, where) -> list[tuple[str, str]]:
    """The merges of a merges file: lines 2 … 48,895, each two tokens separated by a space."""
    lines = text.split("\n")[1: _BPE_MERGES + 1]
    while lines and not lines[-1].strip():  # the newline that ends a file shorter than CLIP's
        lines.pop()
    merges = [tuple(line.split()) for line in lines]
    bad = next((n for n, m in enumerate(merges, start=2) if len(m) != 2), None)
    if bad is not None:
        raise MinisdError(f"{str(where)!r} line {bad} is not a merge (two tokens separated by a space)")
    return merges
