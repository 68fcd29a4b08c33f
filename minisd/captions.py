"""Training captions as token tensors: every caption a Shapes label can get, tokenised once.

Training a text-conditioned model on Shapes needs fresh captions every step — paraphrased, with
attributes sometimes left out (`minisd.data.describe`). Writing and tokenising them in Python
costs the host several milliseconds per step at the `gpu` preset's batch sizes, while the GPU
waits. But a caption is fully decided by a few discrete choices:

    the labels (color, shape, size, position)      6 · 3 · 2 · 5 = 180
    which attributes are mentioned                  2⁴ = 16
    paraphrased or not, the template (10 bins)      2 · 10
    each attribute's synonym                        1 · 1 · 2 · 2

so `ShapesCaptions` writes every distinct caption once (with `minisd.data.write_caption`, the
writer `describe` uses), tokenises them into one table, and per step only turns the random
numbers into a row index — a few tensor operations on the training device. It draws exactly the
random numbers `describe` draws, in the same order, and makes the same choices from them, so a
run gives the same captions as before, bit for bit (tests/test_captions.py checks it).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from minisd.data import (
    ATTRIBUTES,
    PARAPHRASE_TEMPLATES,
    SYNONYMS,
    VOCABULARY,
    caption_draws,
    write_caption,
)
from minisd.errors import MinisdError

TEMPLATE_BINS = 10  # u_template · 10, floored: gives both the template (bin // 2) and "there is" (bin ≥ 5)
assert TEMPLATE_BINS == 2 * len(PARAPHRASE_TEMPLATES)
LABEL_COUNTS = tuple(len(VOCABULARY[a]) for a in ATTRIBUTES)  # (6, 3, 2, 5)
NUM_LABELS = math.prod(LABEL_COUNTS)
# synonym options per attribute value, and the most any value of the attribute has
OPTIONS = tuple(tuple(len(SYNONYMS.get(v, (v,))) for v in VOCABULARY[a]) for a in ATTRIBUTES)
SYNONYM_RADIX = tuple(max(o) for o in OPTIONS)  # (1, 1, 2, 2)


def mention_code(mentioned: torch.Tensor) -> torch.Tensor:
    """mentioned (B, 4) bool → (B,) 0 … 15: bit k set when attribute k is stated."""
    return (mentioned.long() << torch.arange(4, device=mentioned.device)).sum(-1)


def mixed_radix(digits: list, radix: tuple[int, ...]):
    """Σ digitᵢ · Πⱼ₍ⱼ>ᵢ₎ radixⱼ: digits (ints or tensors) → one code, first digit most significant."""
    code = 0
    for d, r in zip(digits, radix):
        code = code * r + d
    return code


def _choices(combo: int) -> tuple[tuple[bool, ...], bool, int, bool, tuple[int, ...]]:
    """A choice code (keep, para, template bin, synonyms) → write_caption's arguments, in canonical form."""
    rest, synonym_code = divmod(combo, math.prod(SYNONYM_RADIX))
    rest, bin_ = divmod(rest, TEMPLATE_BINS)
    keep_code, para = divmod(rest, 2)
    keep = [bool(keep_code >> k & 1) for k in range(4)]
    synonyms = []
    for r in reversed(SYNONYM_RADIX):
        synonym_code, d = divmod(synonym_code, r)
        synonyms.insert(0, d)
    para = bool(para)
    position_kept = keep[3]
    return (tuple(keep), para, bin_ // 2 if para and position_kept else 0, para and not position_kept and bin_ >= 5,
            tuple(s if para and k else 0 for s, k in zip(synonyms, keep)))


@functools.lru_cache(maxsize=8)
def _table(vocab: tuple[str, ...], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids (rows, L) of every distinct caption form × 180 labels, row block of each choice code)."""
    from minisd.tokenizer import Tokenizer

    tokenizer = Tokenizer(vocab[4:], max_length)  # vocab starts with the special tokens
    num_combos = 16 * 2 * TEMPLATE_BINS * math.prod(SYNONYM_RADIX)
    forms, block = {}, np.empty(num_combos, dtype=np.int64)
    for combo in range(num_combos):
        block[combo] = forms.setdefault(_choices(combo), len(forms))
    all_labels = np.array(np.unravel_index(np.arange(NUM_LABELS), LABEL_COUNTS)).T.tolist()  # (180, 4)
    captions = []
    for keep, para, template, there_is, synonyms in forms:  # in order of first appearance = block number
        for labels in all_labels:
            # a value with fewer synonyms than the attribute's most: its code never has the extra digit
            syn = [min(s, OPTIONS[a][v] - 1) for a, (s, v) in enumerate(zip(synonyms, labels))]
            captions.append(write_caption(labels, keep, para, template, there_is, syn))
    ids, _ = tokenizer(captions)
    return ids, torch.from_numpy(block)


class _Tables:
    """Token tables made on the CPU once and copied to each device once (a copy per step would make
    a GPU's host wait); and the empty caption, for the rows that train the unconditional model."""

    def __init__(self, tokenizer, tables: dict[str, torch.Tensor]):
        self.pad_id = tokenizer.pad_id
        self._cpu = {**tables, "empty": tokenizer([""])[0][0]}  # <start> <end> <pad> …
        self._on: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._on:
            self._on[device] = {k: t.to(device) for k, t in self._cpu.items()}
        return self._on[device]

    def unconditional(self, ids: torch.Tensor, drop_rows: torch.Tensor):
        """Replace the captions of rows where drop_rows (B,) is True by the empty caption: (ids, mask)."""
        ids = torch.where(drop_rows[:, None], self._tables(ids.device)["empty"], ids)
        return ids, ids != self.pad_id


class ShapesCaptions(_Tables):
    """Fresh Shapes captions as token ids, the way `describe` writes them, for a training loop.

        captions = ShapesCaptions(tokenizer, paraphrase=0.5, drop=0.25)
        ids, mask, mentioned = captions.draw(labels, generator)   # (B, L), (B, L), (B, 4)

    equals `tokenizer(describe(labels, generator, 0.5, 0.25)[0])` and its `mentioned`, from the
    same random numbers, but runs on the generator's device with no Python per caption.
    """

    def __init__(self, tokenizer, paraphrase: float = 0.5, drop: float = 0.0):
        if not (0 <= paraphrase <= 1 and 0 <= drop <= 1):
            raise MinisdError(f"paraphrase {paraphrase} and drop {drop} must be probabilities in [0, 1]")
        self.paraphrase, self.drop = paraphrase, drop
        ids, block = _table(tuple(tokenizer.vocab), tokenizer.max_length)
        widest = max(LABEL_COUNTS)
        super().__init__(tokenizer, {
            "ids": ids, "block": block,
            # (4, 6): how many synonyms each value of each attribute has (1 past an attribute's last value)
            "options": torch.tensor([list(o) + [1] * (widest - len(o)) for o in OPTIONS])})

    def draw(self, labels: torch.Tensor, generator: torch.Generator | None = None):
        """labels (B, 4) → (ids (B, L) long, mask (B, L) bool, mentioned (B, 4) bool), on labels' device."""
        u, mentioned = caption_draws(len(labels), generator, self.drop)
        device = u.device
        table = self._tables(device)
        labels = labels.to(device).long()
        # Choices are made in float64, as Python makes them from the same float32 numbers in `describe`
        # (exactly: a float32 times a small integer is exact in float64). MPS has no float64.
        u64 = (u if device.type != "mps" else u.cpu()).double()
        para = (u64[:, 0] < self.paraphrase).long().to(device)
        bin_ = (u64[:, 1] * TEMPLATE_BINS).floor().long().to(device)
        counts = table["options"][torch.arange(4, device=device), labels]  # (B, 4) synonyms of each row's values
        synonyms = (u64[:, 2:6] * counts.to(u64.device)).floor().long().to(device)
        combo = mixed_radix([mention_code(mentioned), para, bin_, *synonyms.unbind(1)],
                            (16, 2, TEMPLATE_BINS, *SYNONYM_RADIX))
        row = table["block"][combo] * NUM_LABELS + mixed_radix(list(labels.unbind(1)), LABEL_COUNTS)
        ids = table["ids"][row]
        return ids, ids != self.pad_id, mentioned


class FixedCaptions(_Tables):
    """A dataset's fixed captions tokenised once: `ids(caption_ids)` → (ids, mask) on their device."""

    def __init__(self, tokenizer, texts: list[str]):
        super().__init__(tokenizer, {"ids": tokenizer(texts)[0]})

    def ids(self, caption_ids: torch.Tensor):
        ids = self._tables(caption_ids.device)["ids"][caption_ids]
        return ids, ids != self.pad_id
