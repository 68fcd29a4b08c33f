"""CLIP: the contrastive loss against hand-computed values, the temperature clamp, causality of
the text tower, overfitting a small batch to perfect retrieval, save/load, and bad input."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minisd.clip import (
    CLIP,
    MAX_LOGIT_SCALE,
    CLIPConfig,
    ImageEncoder,
    ImageEncoderConfig,
    TextEncoder,
    TextEncoderConfig,
    clip_loss_fn,
    contrastive_loss,
    embed_images,
    embed_texts,
    retrieve,
    zero_shot_classify,
)
from minisd.data import VOCABULARY, Shapes, captions_for, describe, render, sample_labels
from minisd.errors import MinisdError
from minisd.tokenizer import shapes_tokenizer
from minisd.train import TrainConfig, train

TINY = CLIPConfig(TextEncoderConfig(width=32, layers=1, heads=2),
                  ImageEncoderConfig(patch_size=8, width=32, layers=1, heads=2), embed_dim=16)


def tiny_clip(seed=0, config=TINY):
    torch.manual_seed(seed)
    return CLIP(config).eval()


def test_contrastive_loss_equals_a_hand_computed_value():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    e = math.exp
    image_to_text = (-math.log(e(2) / (e(2) + e(0))) - math.log(e(3) / (e(1) + e(3)))) / 2  # rows
    text_to_image = (-math.log(e(2) / (e(2) + e(1))) - math.log(e(3) / (e(0) + e(3)))) / 2  # columns
    assert contrastive_loss(logits).item() == pytest.approx((image_to_text + text_to_image) / 2, rel=1e-6)


def test_contrastive_loss_is_symmetric_in_its_two_directions():
    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) * 3
    target = torch.arange(6)
    one_way = F.cross_entropy(logits, target)
    other_way = F.cross_entropy(logits.T, target)
    assert contrastive_loss(logits).item() == pytest.approx(((one_way + other_way) / 2).item(), rel=1e-6)
    # swapping the roles of images and texts gives the same loss
    assert contrastive_loss(logits.T).item() == pytest.approx(contrastive_loss(logits).item(), rel=1e-6)
    assert one_way.item() != pytest.approx(other_way.item(), rel=1e-3)  # the two directions differ


def test_label_aware_loss_spreads_the_target_over_every_match():
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    assert contrastive_loss(logits, torch.eye(5, dtype=torch.bool)).item() == pytest.approx(
        contrastive_loss(logits).item(), rel=1e-6)
    # images 0 and 1 show the same thing, so texts 0 and 1 both fit both of them
    matches = torch.eye(5, dtype=torch.bool)
    matches[0, 1] = matches[1, 0] = True
    logp_rows, logp_cols = logits.log_softmax(1), logits.log_softmax(0)
    rows = [-(logp_rows[0, 0] + logp_rows[0, 1]) / 2, -(logp_rows[1, 0] + logp_rows[1, 1]) / 2] + \
           [-logp_rows[i, i] for i in range(2, 5)]
    cols = [-(logp_cols[0, 0] + logp_cols[1, 0]) / 2, -(logp_cols[0, 1] + logp_cols[1, 1]) / 2] + \
           [-logp_cols[i, i] for i in range(2, 5)]
    expected = (torch.stack(rows).mean() + torch.stack(cols).mean()) / 2
    assert contrastive_loss(logits, matches).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(MinisdError, match="at least one match"):
        contrastive_loss(logits, torch.zeros(5, 5, dtype=torch.bool))


def test_temperature_starts_as_in_clip_and_is_clamped_at_100():
    model = tiny_clip()
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) ≈ 22,000
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    ids, mask = shapes_tokenizer(paraphrases=True)(["a red circle", "a blue square", ""])
    assert model(images, ids, mask).abs().max() <= 100 + 1e-4  # |cosine| ≤ 1, scale ≤ 100 in the forward
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE) == pytest.approx(math.log(100))


def test_text_encoder_is_causal_and_pools_at_the_end_token():
    enc = TextEncoder(TextEncoderConfig(vocab_size=31, width=32, layers=2, heads=2)).eval()
    tok = shapes_tokenizer(paraphrases=True)
    ids, mask = tok(["a small red circle in the top left", "a small red square in the top left"])
    out = enc(ids, mask)
    # the captions differ first at token 4 ('circle' / 'square'): earlier states cannot differ
    assert torch.allclose(out.last_hidden_state[0, :4], out.last_hidden_state[1, :4], atol=1e-6)
    assert not torch.allclose(out.last_hidden_state[0, 4], out.last_hidden_state[1, 4], atol=1e-3)
    end = mask.sum(1) - 1
    assert (ids[torch.arange(2), end] == tok.end_id).all()
    assert torch.equal(out.pooled, out.last_hidden_state[torch.arange(2), end])


def test_vit_patch_embedding_equals_cutting_patches_by_hand():
    enc = ImageEncoder(ImageEncoderConfig(patch_size=8, width=32, layers=1, heads=2))
    x = torch.randn(2, 3, 32, 32)
    patches = x.unfold(2, 8, 8).unfold(3, 8, 8)  # (B, C, 4, 4, 8, 8)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 16, 3 * 8 * 8)  # (B, patches, C·p·p), row-major
    by_hand = patches @ enc.patch_embedding.weight.reshape(32, -1).T + enc.patch_embedding.bias
    conv = enc.patch_embedding(x).flatten(2).transpose(1, 2)
    assert torch.allclose(conv, by_hand, atol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_a_tiny_clip_overfits_a_small_batch_to_perfect_retrieval(kind):
    labels = torch.stack([torch.arange(8) % 6, torch.arange(8) % 3, torch.arange(8) % 2, torch.arange(8) % 5], 1)
    assert len(set(captions_for(labels))) == 8
    images = render(labels)
    image_config = ImageEncoderConfig(patch_size=8, width=32, layers=1, heads=2) if kind == "vit" else \
        ImageEncoderConfig(kind="cnn", width=8, layers=2)
    model = tiny_clip(config=CLIPConfig(TINY.text, image_config, embed_dim=16))
    tok = shapes_tokenizer(paraphrases=True)
    config = TrainConfig(steps=150, batch_size=8, lr=3e-3, warmup_steps=10, progress=False)
    # every image in every batch, always the canonical caption: a lookup table is enough here
    loss_fn = clip_loss_fn(tok, paraphrase=0.0, drop=0.0, label_aware=False)
    result = train(model, lambda m, _, g: loss_fn(m, (images, labels), g), torch.zeros(8, 1), config)
    assert result.losses[-1] < 0.1 * result.losses[0]
    text = embed_texts(model, tok, captions_for(labels))
    image = embed_images(model, images)
    assert torch.equal(retrieve(text, image)[:, 0], torch.arange(8))
    assert torch.equal(retrieve(image, text)[:, 0], torch.arange(8))


def test_zero_shot_classify_picks_the_most_similar_prompt_ensemble():
    model, tok = tiny_clip(), shapes_tokenizer(paraphrases=True)
    images = Shapes("test", 10).images
    names, templates = ["red", "green", "blue"], ["a {} shape", "there is a {} shape"]
    image_emb = embed_images(model, images)
    by_hand = []
    for name in names:
        mean = embed_texts(model, tok, [t.format(name) for t in templates]).mean(0)
        by_hand.append(mean / mean.norm())
    expected = (image_emb @ torch.stack(by_hand).T).argmax(1)
    assert torch.equal(zero_shot_classify(model, tok, images, names, templates), expected)


def test_save_and_load_give_identical_embeddings(tmp_path):
    model, tok = tiny_clip(), shapes_tokenizer(paraphrases=True)
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    model.save_pretrained(tmp_path / "clip")
    model.text_encoder.save_pretrained(tmp_path / "text_encoder")
    loaded = CLIP.from_pretrained(tmp_path / "clip")
    assert loaded.config == model.config and loaded.logit_scale.item() == 2.5
    images = Shapes("test", 4).images
    prompts = ["a large blue square in the center", ""]
    assert torch.equal(embed_images(loaded, images), embed_images(model, images))
    assert torch.equal(embed_texts(loaded, tok, prompts), embed_texts(model, tok, prompts))
    text_tower = TextEncoder.from_pretrained(tmp_path / "text_encoder")  # alone, as the pipeline loads it
    ids, mask = tok(prompts)
    assert torch.equal(text_tower(ids, mask).last_hidden_state, model.text_encoder(ids, mask).last_hidden_state)


def test_the_empty_prompt_is_valid():
    emb = embed_texts(tiny_clip(), shapes_tokenizer(paraphrases=True), "")
    assert emb.shape == (1, 16) and torch.isfinite(emb).all() and emb.norm().item() == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("prompts,message", [
    ([], "empty"),
    (["a red circle", 3], "must be a string"),
    (None, "string or a list"),
    ([b"a red circle"], "must be a string"),
])
def test_bad_prompts_are_clear_errors(prompts, message):
    with pytest.raises(MinisdError, match=message):
        embed_texts(tiny_clip(), shapes_tokenizer(paraphrases=True), prompts)


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 3, 28, 28), (3, 32, 32), (2, 4, 32, 32)])
def test_images_of_the_wrong_size_or_channel_count_are_clear_errors(shape):
    with pytest.raises(MinisdError, match=r"images must have shape \(B, 3, 32, 32\)"):
        tiny_clip().encode_image(torch.zeros(shape))


def test_bad_configs_are_clear_errors():
    with pytest.raises(MinisdError, match="not divisible by patch_size"):
        ImageEncoderConfig(image_size=30, patch_size=4)
    with pytest.raises(MinisdError, match="unknown image encoder 'resnet'"):
        ImageEncoderConfig(kind="resnet")
    with pytest.raises(MinisdError, match="token ids must lie in"):
        TextEncoder(TextEncoderConfig(vocab_size=5, width=8, heads=2))(torch.tensor([[1, 9]]), torch.ones(1, 2, dtype=torch.bool))


def test_describe_paraphrases_keep_the_meaning_and_the_vocabulary():
    labels = sample_labels(400, generator=np.random.default_rng(0))
    plain, mentioned = describe(labels, torch.Generator().manual_seed(0), paraphrase=0.0, drop=0.0)
    assert plain == captions_for(labels) and mentioned.all()
    varied, mentioned = describe(labels, torch.Generator().manual_seed(0), paraphrase=1.0, drop=0.3)
    assert 0.6 < mentioned.float().mean() < 0.8
    tok = shapes_tokenizer(paraphrases=True)
    assert all(tok.unk_id not in tok.encode(c) for c in varied)  # every paraphrase word is known
    for text, keep, row in zip(varied, mentioned, labels):
        if keep[0]:  # the colour, when stated, is the right one (colours have no synonyms)
            assert VOCABULARY["color"][row[0]] in text.split()
    assert describe(labels[:2], paraphrase=0.0, drop=1.0)[0] == ["a shape", "a shape"]
    with pytest.raises(MinisdError, match="probabilities"):
        describe(labels, drop=1.5)
