"""Fusion modules: shapes, padding, sensitivity to each modality, gradients, registry, BERT initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pmmrec.config import ModelConfig
from pmmrec.errors import PmmrecError
from pmmrec.models.fusion import FUSIONS, MergedAttentionFusion, build_fusion
from pmmrec.models.fusion.attention import IMAGE, TEXT, fusion_heads

D, N, T, P = 32, 4, 5, 3


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: extra intra-op threads only add contention (3x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_fusion(ModelConfig(dim=D, fusion=name, **overrides))


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(N, T, D, generator=g)
    image = torch.randn(N, P, D, generator=g)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    image_mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
    return text, text_mask, image, image_mask


ALL = sorted(FUSIONS)


@pytest.mark.parametrize("name", ALL)
def test_shape_and_finite_with_padding(name):
    fusion = _build(name)
    text, text_mask, image, image_mask = _inputs()
    text_mask[2] = 0  # an item whose whole title is padding
    out = fusion(text, text_mask, image, image_mask)
    assert out.shape == (N, D)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_every_parameter_gets_a_gradient(name):
    fusion = _build(name).train()
    text, text_mask, image, image_mask = _inputs()
    text.requires_grad_(True)
    image.requires_grad_(True)  # so that the parameter-free sum fusion can backpropagate too
    fusion(text, text_mask, image, image_mask).square().sum().backward()
    missing = [n for n, p in fusion.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert text.grad.abs().sum() > 0 and image.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL)
def test_sensitive_to_each_modality(name):
    fusion = _build(name).eval()
    text, text_mask, image, image_mask = _inputs()
    base = fusion(text, text_mask, image, image_mask)
    other_text, _, other_image, _ = _inputs(seed=2)
    text_changed = fusion(other_text, text_mask, image, image_mask)
    image_changed = fusion(text, text_mask, other_image, image_mask)
    # Every item (row) must react, not just some.
    assert ((text_changed - base).abs().amax(dim=-1) > 1e-4).all()
    assert ((image_changed - base).abs().amax(dim=-1) > 1e-4).all()


@pytest.mark.parametrize("name", ALL)
def test_masked_tokens_do_not_change_the_output(name):
    fusion = _build(name).eval()
    text, text_mask, image, image_mask = _inputs()
    base = fusion(text, text_mask, image, image_mask)
    garbage_text = torch.where(text_mask.bool().unsqueeze(-1), text, torch.full_like(text, 1e4))
    garbage_text[1, 3] = float("nan")  # even non-finite padding must not leak
    garbage_image = torch.where(image_mask.bool().unsqueeze(-1), image, torch.randn_like(image) * 50)
    out = fusion(garbage_text, text_mask, garbage_image, image_mask)
    assert torch.allclose(out, base, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_learns_a_toy_task(name):
    """With learnable modality projections in front (as in the item encoder), a regression loss goes down."""
    fusion = _build(name).train()
    torch.manual_seed(0)
    proj_t, proj_v = nn.Linear(D, D), nn.Linear(D, D)
    params = [*fusion.parameters(), *proj_t.parameters(), *proj_v.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    text, text_mask, image, image_mask = _inputs()
    target = torch.randn(N, D, generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(30):
        loss = (fusion(proj_t(text), text_mask, proj_v(image), image_mask) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_merged_attention_uses_the_type_embeddings():
    """Guard against the reference bug: type embeddings computed, then the raw tokens concatenated."""
    fusion = _build("merged_attention").eval()
    inputs = _inputs()
    base = fusion(*inputs)
    for row in (TEXT, IMAGE):
        with torch.no_grad():
            fusion.type_embedding.weight[row] += 0.5
        changed = fusion(*inputs)
        assert not torch.allclose(changed, base, atol=1e-4)
        base = changed


def test_fusion_heads():
    assert [fusion_heads(d) for d in (32, 64, 96, 384, 768)] == [1, 1, 1, 6, 12]


def test_unknown_fusion_lists_choices():
    with pytest.raises(PmmrecError, match="unknown model.fusion 'nope'.*merged_attention"):
        build_fusion(ModelConfig(dim=D, fusion="nope"))


def test_fusion_init_refused_for_fusions_it_cannot_initialise(tmp_path):
    with pytest.raises(PmmrecError, match="fusion_init.*'sum'"):
        build_fusion(ModelConfig(dim=D, fusion="sum", fusion_init=str(tmp_path)))


# -- initialisation from a local BERT ----------------------------------------------------------------------------


def _save_tiny_bert(folder, hidden: int, heads: int, layers: int = 2):
    from transformers import BertConfig, BertModel

    torch.manual_seed(7)
    config = BertConfig(vocab_size=30, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, max_position_embeddings=16)
    model = BertModel(config).eval()
    model.save_pretrained(folder)
    return model


def test_fusion_init_copies_a_bert_layer(tmp_path):
    bert = _save_tiny_bert(tmp_path / "bert", hidden=D, heads=fusion_heads(D))
    fusion = _build("merged_attention", fusion_init=str(tmp_path / "bert"))
    source, block = bert.encoder.layer[-1], fusion.block
    pairs = [(source.attention.self.query, block.attn.q), (source.attention.self.key, block.attn.k),
             (source.attention.self.value, block.attn.v), (source.attention.output.dense, block.attn.out),
             (source.attention.output.LayerNorm, block.attn_norm), (source.intermediate.dense, block.ffn_in),
             (source.output.dense, block.ffn_out), (source.output.LayerNorm, block.ffn_norm)]
    for theirs, ours in pairs:
        assert torch.equal(theirs.weight, ours.weight) and torch.equal(theirs.bias, ours.bias)
    # And the copied block computes what the BERT layer computes.
    x = torch.randn(2, 6, D)
    expected = source(x)
    expected = expected[0] if isinstance(expected, tuple) else expected
    got = block.eval()(x, torch.ones(2, 1, 6, dtype=torch.bool))
    assert torch.allclose(got, expected, atol=1e-5)


def test_fusion_init_wrong_size_is_a_clear_error(tmp_path):
    _save_tiny_bert(tmp_path / "bert48", hidden=48, heads=1)
    with pytest.raises(PmmrecError, match="hidden_size is 48 .*needs 32"):
        _build("merged_attention", fusion_init=str(tmp_path / "bert48"))


def test_fusion_init_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(PmmrecError, match="not a local folder"):
        MergedAttentionFusion(D).load_bert_layer(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PmmrecError, match="cannot read a Hugging Face config"):
        MergedAttentionFusion(D).load_bert_layer(str(tmp_path / "empty"))
