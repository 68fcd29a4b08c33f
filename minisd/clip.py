"""CLIP from scratch: a text encoder and an image encoder trained so that matching pairs agree
(Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision").

    caption ─tokenizer─▶ ids ─TextEncoder─▶ per-token states (B, L, D) ─pool at <end>─▶ ─W_t─▶ t̂ = t/‖t‖
    image ─────────────────────ImageEncoder (a small ViT, or a CNN)─────────────────────▶ ─W_i─▶ î = i/‖i‖

    logits = exp(logit_scale) · Î T̂ᵀ    (B, B): cosine similarity of every image with every caption
    loss   = ½ [ CE(logits, diag) + CE(logitsᵀ, diag) ]   — each image must pick out its caption
                                                           among the batch, and each caption its image

The explainer's words, "matching pairs towards 1, the others towards 0", are this softmax: the
cosine similarities are scaled by a learned temperature and each row (and column) is turned into
probabilities. Stable Diffusion reuses only the trained text tower, frozen: the U-Net attends to
its per-token states (`TextEncoder` alone can be saved and loaded for that).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minisd.attention import FEED_FORWARDS, TransformerBlock
from minisd.captions import LABEL_COUNTS, mention_code, mixed_radix
from minisd.errors import MinisdError, cheap_to_read, check_choice

IMAGE_ENCODERS = ("vit", "cnn")
MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the learned scale at 100 so training stays stable


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 31  # len(shapes_tokenizer(paraphrases=True)); train_clip sets it from its tokenizer
    max_length: int = 16
    width: int = 64
    layers: int = 2
    heads: int = 4
    causal: bool = True  # as in CLIP: each token sees only the tokens before it
    # Options that CLIP's own text tower needs (minisd.convert sets them; the defaults are minisd's own):
    feed_forward: str = "geglu"  # "geglu" (gated, as in the U-Net), or a plain MLP with CLIP's
    #                              "quick_gelu" (OpenAI CLIP, SD 1.x) or "gelu" (OpenCLIP, SD 2.x)
    ff_dim: int | None = None  # hidden width of the feed-forward; None: 4 · width
    qkv_bias: bool = False  # biases on the attention's q, k, v projections (CLIP: True)
    norm_eps: float = 1e-5  # LayerNorm ε
    clip_skip: int = 0  # read the states this many blocks before the last, through the final LayerNorm
    #                     (diffusers' clip_skip; 1 = the penultimate block). The skipped blocks are kept
    #                     (their weights load) but not run.

    def __post_init__(self):
        if min(self.vocab_size, self.max_length, self.width, self.layers, self.heads) < 1:
            raise MinisdError(f"text encoder sizes must be ≥ 1, got {self}")
        if self.width % self.heads:
            raise MinisdError(f"text width {self.width} is not divisible by heads {self.heads}")
        check_choice("feed_forward", self.feed_forward, FEED_FORWARDS)
        if self.ff_dim is not None and self.ff_dim < 1:
            raise MinisdError(f"ff_dim must be ≥ 1 or None, got {self.ff_dim}")
        if not 0 <= self.clip_skip < self.layers:
            raise MinisdError(f"clip_skip {self.clip_skip} is not allowed with {self.layers} layers; "
                              f"use 0 … {self.layers - 1}")


@dataclass(frozen=True)
class ImageEncoderConfig:
    kind: str = "vit"  # "vit": a Vision Transformer on patches; "cnn": a small conv net
    image_size: int = 32
    in_channels: int = 3
    patch_size: int = 4  # vit: the image is cut into (image_size / patch_size)² patches
    width: int = 64  # vit: token width; cnn: channels of the first conv (doubled at each halving)
    layers: int = 2  # vit: transformer blocks; cnn: halvings
    heads: int = 4

    def __post_init__(self):
        check_choice("image encoder", self.kind, IMAGE_ENCODERS)
        if min(self.image_size, self.in_channels, self.patch_size, self.width, self.layers, self.heads) < 1:
            raise MinisdError(f"image encoder sizes must be ≥ 1, got {self}")
        if self.kind == "vit":
            if self.image_size % self.patch_size:
                raise MinisdError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
            if self.width % self.heads:
                raise MinisdError(f"image width {self.width} is not divisible by heads {self.heads}")
        elif self.image_size % 2**self.layers:
            raise MinisdError(f"image_size {self.image_size} is not divisible by 2^layers = {2**self.layers}")


@dataclass(frozen=True)
class CLIPConfig:
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    embed_dim: int = 64  # the shared space both towers project into
    init_temperature: float = 0.07  # CLIP's initial τ: logit_scale starts at log(1/0.07)

    def __post_init__(self):  # accept plain dicts, as read back from config.json
        if isinstance(self.text, dict):
            object.__setattr__(self, "text", TextEncoderConfig(**self.text))
        if isinstance(self.image, dict):
            object.__setattr__(self, "image", ImageEncoderConfig(**self.image))
        if self.embed_dim < 1 or not 0 < self.init_temperature:
            raise MinisdError(f"embed_dim must be ≥ 1 and init_temperature > 0, got {self.embed_dim}, "
                              f"{self.init_temperature}")


def causal_mask(length: int, device=None) -> torch.Tensor:
    """(L, L) bool, True where token i may attend to token j ≤ i."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


class TextOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, L, width): one state per token — what the U-Net attends to
    pooled: torch.Tensor  # (B, width): the state at each caption's <end> token
    mask: torch.Tensor  # (B, L) bool, True for real tokens


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Token ids must index the embedding table: a clear error instead of an index error."""
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        raise MinisdError(f"token ids must lie in 0 … {vocab_size - 1}, got "
                          f"{int(ids.min())} … {int(ids.max())}; was the tokenizer built for this model?")


class TextEncoder(nn.Module):
    """Token + position embeddings → transformer blocks (causal self-attention) → LayerNorm.

    ids (B, L) long, mask (B, L) bool → TextOutput. As in CLIP, the sentence vector is the final
    state of the <end> token: with a causal mask it is the only token that has read the whole caption.
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = c = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.position_embedding = nn.Parameter(torch.randn(c.max_length, c.width) * 0.01)
        self.blocks = nn.ModuleList(
            TransformerBlock(c.width, c.heads, feed_forward=c.feed_forward, ff_dim=c.ff_dim,
                             qkv_bias=c.qkv_bias, norm_eps=c.norm_eps) for _ in range(c.layers))
        self.final_norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextOutput:
        B, L = ids.shape
        if L > self.config.max_length:
            raise MinisdError(f"token sequence of length {L} is longer than max_length {self.config.max_length}")
        if cheap_to_read(ids):  # on a GPU, ids are checked on the CPU before they are sent (encode_prompts)
            check_token_ids(ids, self.config.vocab_size)
        x = self.token_embedding(ids) + self.position_embedding[:L]  # (B, L, width)
        self_mask = causal_mask(L, ids.device) if self.config.causal else mask[:, None, None, :]
        for block in self.blocks[:len(self.blocks) - self.config.clip_skip]:
            x = block(x, self_mask=self_mask)
        x = self.final_norm(x)
        end = mask.long().sum(1) - 1  # index of <end>: the last real token
        return TextOutput(x, x[torch.arange(B, device=x.device), end], mask)

    def save_pretrained(self, folder) -> None:
        from minisd.checkpoint import save_module

        save_module(self, asdict(self.config), folder)

    @classmethod
    def from_pretrained(cls, folder) -> TextEncoder:
        from minisd.checkpoint import load_module

        return load_module(cls, TextEncoderConfig, folder)


class ImageEncoder(nn.Module):
    """images (B, C, S, S) in [-1, 1] → one feature vector per image (B, width_out).

    'vit' (Dosovitskiy et al. 2021): cut the image into patches, embed each linearly (a strided
    conv), prepend a learned [class] token, add position embeddings, run transformer blocks, and
    read the class token. 'cnn': conv → (GroupNorm, SiLU, stride-2 conv) × layers, flattened —
    flattening rather than pooling keeps *where* the object is.
    """

    def __init__(self, config: ImageEncoderConfig):
        super().__init__()
        self.config = c = config
        if c.kind == "vit":
            n = (c.image_size // c.patch_size) ** 2
            self.patch_embedding = nn.Conv2d(c.in_channels, c.width, c.patch_size, stride=c.patch_size)
            self.class_token = nn.Parameter(torch.randn(c.width) * 0.02)
            self.position_embedding = nn.Parameter(torch.randn(n + 1, c.width) * 0.02)
            self.pre_norm = nn.LayerNorm(c.width)
            self.blocks = nn.ModuleList(TransformerBlock(c.width, c.heads) for _ in range(c.layers))
            self.final_norm = nn.LayerNorm(c.width)
            self.out_features = c.width
        else:
            layers, ch = [nn.Conv2d(c.in_channels, c.width, 3, padding=1)], c.width
            for _ in range(c.layers):
                layers += [nn.GroupNorm(8 if ch % 8 == 0 else 1, ch), nn.SiLU(), nn.Conv2d(ch, 2 * ch, 3, 2, 1)]
                ch *= 2
            self.net = nn.Sequential(*layers, nn.SiLU(), nn.Flatten())
            self.out_features = ch * (c.image_size // 2**c.layers) ** 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        if images.ndim != 4 or images.shape[1:] != (c.in_channels, c.image_size, c.image_size):
            raise MinisdError(f"images must have shape (B, {c.in_channels}, {c.image_size}, {c.image_size}), "
                              f"got {tuple(images.shape)}")
        if c.kind == "cnn":
            return self.net(images)
        x = rearrange(self.patch_embedding(images), "b d h w -> b (h w) d")  # (B, patches, width)
        x = torch.cat([self.class_token.expand(len(x), 1, -1), x], dim=1) + self.position_embedding
        x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x[:, 0])  # (B, width): the class token


def contrastive_loss(logits: torch.Tensor, matches: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric loss on logits (B_images, B_texts).

    Without `matches`, image i belongs with text i: the mean of the cross-entropy of each row
    (image → its text) and of each column (text → its image). `matches` (bool, same shape) can say
    instead which pairs are true, when a batch holds several images a caption fits (Shapes has only
    180 different captions); each row's and column's target is then spread evenly over its matches.
    """
    if matches is None:
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    m = matches.float()
    if cheap_to_read(m) and ((m.sum(0) == 0).any() or (m.sum(1) == 0).any()):
        raise MinisdError("every image and every text needs at least one match")
    image_to_text = -(m / m.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -(m / m.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return (image_to_text + text_to_image) / 2


class CLIP(nn.Module):
    """The two towers, their projections into a shared `embed_dim` space, and the temperature.

    `logit_scale` is log(1/τ): initialised to log(1/0.07) and clamped at log(100), as in CLIP.
    """

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text_encoder = TextEncoder(config.text)
        self.image_encoder = ImageEncoder(config.image)
        self.text_projection = nn.Linear(config.text.width, config.embed_dim, bias=False)
        self.image_projection = nn.Linear(self.image_encoder.out_features, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.init_temperature)))

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) and mask → unit-length text embeddings (B, embed_dim)."""
        return F.normalize(self.text_projection(self.text_encoder(ids, mask).pooled), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) in [-1, 1] → unit-length image embeddings (B, embed_dim)."""
        return F.normalize(self.image_projection(self.image_encoder(images)), dim=-1)

    def clamp_logit_scale(self) -> None:
        """Keep exp(logit_scale) ≤ 100 (CLIP does this after every optimiser step)."""
        with torch.no_grad():
            self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def forward(self, images, ids, mask) -> torch.Tensor:
        """→ logits (B_images, B_texts) = exp(logit_scale) · cosine similarities."""
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        return scale * self.encode_image(images) @ self.encode_text(ids, mask).T

    def save_pretrained(self, folder) -> None:
        from minisd.checkpoint import save_module

        save_module(self, asdict(self.config), folder)

    @classmethod
    def from_pretrained(cls, folder) -> CLIP:
        from minisd.checkpoint import load_module

        return load_module(cls, CLIPConfig, folder)


# --- using a trained CLIP: prompts in, similarities out ----------------------------------------

def check_prompts(prompts) -> list[str]:
    """A string or a non-empty list of strings → list of strings; anything else is a clear error.
    The empty string is a valid prompt (it is the 'no caption' of classifier-free guidance)."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise MinisdError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise MinisdError("the list of prompts is empty; give at least one string (\"\" is allowed)")
    for p in prompts:
        if not isinstance(p, str):
            raise MinisdError(f"every prompt must be a string, got {p!r} ({type(p).__name__})")
    return list(prompts)


@torch.no_grad()
def embed_texts(model: CLIP, tokenizer, prompts, batch_size: int = 512) -> torch.Tensor:
    """Prompts → unit text embeddings (N, embed_dim), on the model's device."""
    prompts = check_prompts(prompts)
    device = model.logit_scale.device
    out = []
    for lo in range(0, len(prompts), batch_size):
        ids, mask = tokenizer(prompts[lo: lo + batch_size])
        out.append(model.encode_text(ids.to(device), mask.to(device)))
    return torch.cat(out)


@torch.no_grad()
def embed_images(model: CLIP, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Images (N, C, S, S) uint8 or floats in [0, 1] → unit image embeddings (N, embed_dim)."""
    from minisd.data import normalize

    if not torch.is_tensor(images):
        raise MinisdError(f"images must be a tensor (N, C, H, W), got {type(images).__name__}")
    device = model.logit_scale.device
    return torch.cat([model.encode_image(normalize(images[lo: lo + batch_size]).to(device))
                      for lo in range(0, len(images), batch_size)])


def class_embeddings(model: CLIP, tokenizer, class_names: list[str], templates: list[str]) -> torch.Tensor:
    """Zero-shot classifier weights (K, embed_dim): for each class, the normalised mean of the
    embeddings of every template filled with its name ("a {} shape" → "a red shape") — CLIP's
    prompt ensembling."""
    if not templates or any("{}" not in t for t in templates):
        raise MinisdError(f"templates must be a non-empty list of strings with a '{{}}' slot, got {templates!r}")
    rows = [embed_texts(model, tokenizer, [t.format(name) for t in templates]).mean(0) for name in class_names]
    return F.normalize(torch.stack(rows), dim=-1)


def zero_shot_classify(model: CLIP, tokenizer, images: torch.Tensor, class_names: list[str],
                       templates: list[str]) -> torch.Tensor:
    """The index (N,) of the class whose prompts best match each image — no training on classes."""
    return (embed_images(model, images) @ class_embeddings(model, tokenizer, class_names, templates).T).argmax(1).cpu()


# Prompt templates for reading one Shapes attribute, in the words of the paraphrased captions.
ATTRIBUTE_TEMPLATES = {
    "color": ["a {} shape", "there is a {} shape"],
    "shape": ["a {}", "there is a {}"],
    "size": ["a {} shape", "there is a {} shape"],
    "position": ["a shape in the {}", "in the {} there is a shape"],
}


def retrieve(queries: torch.Tensor, candidates: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Indices (Nq, k) of the `k` candidates most similar to each query (unit embeddings)."""
    return (queries @ candidates.T).topk(k, dim=1).indices.cpu()


# --- sizes and training ------------------------------------------------------------------------

def clip_presets():
    """preset → (CLIPConfig, TrainConfig). 'cpu' trains in about two minutes on 2 cores."""
    from minisd.train import TrainConfig

    return {
        "tiny": (CLIPConfig(TextEncoderConfig(width=32, layers=1, heads=2),
                            ImageEncoderConfig(patch_size=8, width=32, layers=1, heads=2), embed_dim=32),
                 TrainConfig(steps=60, batch_size=64, lr=2e-3, warmup_steps=10, desc="CLIP (tiny)")),
        "cpu": (CLIPConfig(TextEncoderConfig(width=64, layers=2, heads=4),
                           ImageEncoderConfig(patch_size=4, width=64, layers=2, heads=4), embed_dim=64),
                TrainConfig(steps=500, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_steps=50,
                            desc="CLIP (cpu)")),
        "gpu": (CLIPConfig(TextEncoderConfig(width=256, layers=4, heads=8),
                           ImageEncoderConfig(image_size=64, patch_size=8, width=256, layers=6, heads=8),
                           embed_dim=256),
                # 1,500 steps: about 40 s on one H200 from the 26 ms of GPU work a step measured there
                TrainConfig(steps=1500, batch_size=512, lr=5e-4, weight_decay=0.1, warmup_steps=100,
                            desc="CLIP (gpu)")),
    }


CLIP_IMAGES = {"tiny": 2_000, "cpu": 20_000, "gpu": 20_000}  # training images drawn by default


def caption_fits(labels: torch.Tensor, mentioned: torch.Tensor) -> torch.Tensor:
    """matches (B_img, B_txt) bool: image i fits caption j if they agree on every attribute caption j
    states — i.e. `((labels[:, None] == labels[None]) | ~mentioned[None]).all(-1)`, computed as one
    comparison of codes: each image's labels with the attributes caption j leaves out set to 0, as
    one number (2⁴ = 16 versions per image), against caption j's own."""
    keep = torch.arange(16, device=labels.device)[:, None] >> torch.arange(4, device=labels.device) & 1  # (16, 4)
    image_codes = mixed_radix(list((labels[:, None, :] * keep).unbind(-1)), LABEL_COUNTS)  # (B, 16)
    mask_code = mention_code(mentioned)  # (B,) which attributes each caption states
    text_codes = image_codes[torch.arange(len(labels), device=labels.device), mask_code]  # (B,)
    return image_codes[:, mask_code] == text_codes[None, :]  # (B_img, B_txt)


def clip_loss_fn(tokenizer, paraphrase: float = 0.5, drop: float = 0.25, label_aware: bool = True):
    """loss_fn(model, (images, labels), generator) for `minisd.train.train`: fresh (paraphrased,
    sometimes partial) captions for the batch each step, then the contrastive loss. With
    `label_aware`, every caption that fits an image counts as its match (see `contrastive_loss`)."""
    from minisd.captions import ShapesCaptions
    from minisd.data import normalize

    captions = ShapesCaptions(tokenizer, paraphrase, drop)  # what `describe` writes, tokenised once

    def loss_fn(model, batch, generator):
        images, labels = batch
        ids, mask, mentioned = captions.draw(labels, generator)
        device = images.device
        logits = model(normalize(images), ids.to(device), mask.to(device))
        matches = caption_fits(labels, mentioned.to(device)) if label_aware else None
        return contrastive_loss(logits, matches)

    return loss_fn


def caption_loss_fn(tokenizer, texts: list[str]):
    """loss_fn(model, (images, caption_ids), generator) for a dataset with fixed captions (MNIST,
    CIFAR-10, your own images): image i's caption is texts[caption_ids[i]], and every caption of
    the batch that is the same text counts as a match (two photos of a cat share one caption)."""
    from minisd.captions import FixedCaptions
    from minisd.data import normalize

    captions = FixedCaptions(tokenizer, texts)  # tokenised once

    def loss_fn(model, batch, generator):
        images, caption_ids = batch
        ids, mask = captions.ids(caption_ids.to(images.device))
        logits = model(normalize(images), ids, mask)
        return contrastive_loss(logits, caption_ids[:, None] == caption_ids[None, :])

    return loss_fn


def train_clip(preset: str = "cpu", *, images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
               texts: list[str] | None = None,
               config: CLIPConfig | None = None, steps: int | None = None, label_aware: bool = True,
               paraphrase: float = 0.5, drop: float = 0.25, seed: int = 0, device: str = "auto",
               progress: bool = True, state_file=None, train_options: dict | None = None):
    """Train a CLIP on Shapes (train split: the held-out colour–shape pairs never appear), or on
    any captioned images.

    `images` uint8 (N, 3, S, S) and `labels` (N, 4) default to Shapes training images rendered
    with `seed` (20,000; 2,000 for 'tiny'); captions are then written fresh each step (`describe`).
    With `texts`, `labels` (N,) are instead indices into that list of fixed captions (see
    `minisd.data.load_dataset`), and the vocabulary is built from them.
    Returns (model, tokenizer, TrainResult); state_file: see `minisd.train.train` (resume);
    train_options: other `TrainConfig` fields, e.g. {"compile": True}.
    """
    from minisd.data import Shapes
    from minisd.tokenizer import Tokenizer, shapes_tokenizer
    from minisd.train import PRESETS, train

    check_choice("preset", preset, PRESETS)
    default_config, train_config = clip_presets()[preset]
    config = config or default_config
    train_config = replace(train_config, seed=seed, device=device, progress=progress,
                           **({"steps": steps} if steps is not None else {}), **(train_options or {}))
    if images is None:
        data = Shapes("train", num_images=CLIP_IMAGES[preset], image_size=config.image.image_size, seed=seed)
        images, labels = data.images, data.labels
    if texts is None:
        tokenizer = shapes_tokenizer(config.text.max_length, paraphrases=True)
        loss_fn = clip_loss_fn(tokenizer, paraphrase, drop, label_aware)
    else:
        tokenizer = Tokenizer.from_texts(texts, config.text.max_length)
        loss_fn = caption_loss_fn(tokenizer, texts)
    config = replace(config, text=replace(config.text, vocab_size=len(tokenizer)),  # one row per word
                     image=replace(config.image, image_size=images.shape[-1]))
    torch.manual_seed(seed)  # the initial weights
    model = CLIP(config)
    # The contrastive loss compares every image with every caption of the batch, so with several
    # processes each computes the whole batch (shard_batch=False) rather than a slice.
    result = train(model, loss_fn, (images, labels), train_config, hook=lambda step, loss: model.clamp_logit_scale(),
                   state_file=state_file, shard_batch=False)
    return model, tokenizer, result


@torch.no_grad()
def evaluate_clip(model: CLIP, tokenizer, split: str = "test", num_images: int = 2000, seed: int = 0,
                  candidates: int = 100) -> dict[str, float]:
    """The figures issue 4 asks for, on a Shapes split (rendered with `seed + 1`, so not the
    training images):

    zero-shot accuracy per attribute — prompts from `ATTRIBUTE_TEMPLATES` only, no classifier trained;
    retrieval R@1 among `candidates` images — for the canonical caption of each image, the most
    similar of `candidates` images (itself and `candidates − 1` others) must show exactly what
    the caption says (colour, shape, size and position; another image with the same four
    attributes counts as a hit). For the 'heldout' split half of each block of candidates are
    test images, so that a caption such as "a small blue triangle …" competes with blue circles
    and red triangles, not only with the other two held-out pairs;
    image→text the same way over all 180 canonical captions.
    """
    from minisd.data import ATTRIBUTES, VOCABULARY, Shapes, captions_for

    model.eval()
    data = Shapes(split, num_images=num_images, image_size=model.config.image.image_size, seed=seed + 1)
    image_emb = embed_images(model, data.images)
    out: dict[str, float] = {}
    for k, name in enumerate(ATTRIBUTES):  # zero_shot_classify, on the embeddings already computed
        classes = class_embeddings(model, tokenizer, list(VOCABULARY[name]), ATTRIBUTE_TEMPLATES[name])
        predicted = (image_emb @ classes.T).argmax(1).cpu()
        out[f"zero_shot_{name}"] = (predicted == data.labels[:, k]).float().mean().item()
    # text → image: blocks of `candidates` images; the captions of the split's images in a block query it
    per_block = candidates // 2 if split == "heldout" else candidates
    blocks = num_images // per_block
    if blocks == 0:
        raise MinisdError(f"num_images {num_images} is too small for blocks of {candidates} candidates")
    pool_labels, pool_emb = data.labels, image_emb
    if per_block < candidates:  # fill each block with distractors from the test split
        distractors = Shapes("test", num_images=blocks * (candidates - per_block),
                             image_size=model.config.image.image_size, seed=seed + 2)
        pool_labels = torch.cat([data.labels[: blocks * per_block].view(blocks, per_block, 4),
                                 distractors.labels.view(blocks, -1, 4)], 1).view(-1, 4)
        pool_emb = torch.cat([image_emb[: blocks * per_block].view(blocks, per_block, -1),
                              embed_images(model, distractors.images).view(blocks, candidates - per_block, -1)],
                             1).view(blocks * candidates, -1)
    text_emb = embed_texts(model, tokenizer, data.captions[: blocks * per_block])
    hits = []
    for b in range(blocks):
        queries = slice(b * per_block, (b + 1) * per_block)
        best = retrieve(text_emb[queries], pool_emb[b * candidates: (b + 1) * candidates])[:, 0] + b * candidates
        hits.append((pool_labels[best] == data.labels[queries]).all(1))
    out[f"text_to_image_r1_of_{candidates}"] = torch.cat(hits).float().mean().item()
    # image → text among every canonical caption
    every = torch.cartesian_prod(*(torch.arange(len(VOCABULARY[a])) for a in ATTRIBUTES))  # (180, 4) labels
    best = retrieve(image_emb, embed_texts(model, tokenizer, captions_for(every)))[:, 0]
    out["image_to_text_r1_of_180"] = (every[best] == data.labels).all(1).float().mean().item()
    return out
