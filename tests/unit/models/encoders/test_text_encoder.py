"""Text encoder: MiniLM offline, tiny BERT from config, local folders, freezing by block.

See docs/design.md §4 and §10.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from pmmrec.config import TextConfig, load_config
from pmmrec.errors import PmmrecError
from pmmrec.models.encoders.text import TextEncoder, build_text_encoder
from pmmrec.pretrained import tokenizer_dir

MINILM_TOTAL = 22_713_216  # 6 x 384-d BERT blocks + embeddings + pooler
MINILM_BLOCK = 1_774_464  # one 384-d block: attention (4 x 384^2 + biases), 2 LayerNorms, 384 <-> 1536 MLP


def _trainable(encoder: nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in encoder.named_parameters() if p.requires_grad}


def _trainable_blocks(encoder: nn.Module) -> set[int]:
    """Indices of the blocks holding trainable parameters (any trainable parameter outside a block fails)."""
    blocks = set()
    for name in _trainable(encoder):
        match = re.search(r"\.(?:layers?|block)\.(\d+)\.", name)
        assert match, f"{name} trains but is not in a block"
        blocks.add(int(match.group(1)))
    return blocks


def _tiny(**overrides) -> TextEncoder:
    torch.manual_seed(0)
    return build_text_encoder(TextConfig(encoder="tiny", **overrides))


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir("minilm"))


@pytest.mark.parametrize("k", [0, 1, 2, 6])
def test_minilm_freezes_all_but_the_top_k_blocks(k):
    encoder = build_text_encoder(TextConfig(encoder="minilm", trainable_layers=k))
    assert _trainable_blocks(encoder) == set(range(6 - k, 6))
    assert sum(_trainable(encoder).values()) == k * MINILM_BLOCK
    assert sum(p.numel() for p in encoder.parameters()) == MINILM_TOTAL
    assert encoder.out_dim == 384 and encoder.trainable_layers == k


def test_minilm_loads_offline_and_paraphrases_are_closer(minilm_tokenizer):
    encoder = build_text_encoder(TextConfig(encoder="minilm", trainable_layers=0)).eval()
    pairs = [("wireless bluetooth headphones with noise cancelling", "noise-cancelling bluetooth earbuds, wireless"),
             ("organic dark roast coffee beans", "freshly ground arabica coffee, dark roast"),
             ("harry potter and the philosopher's stone hardcover", "the first harry potter book, hard cover edition")]
    titles = [t for pair in pairs for t in pair]
    batch = minilm_tokenizer(titles, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = encoder(batch["input_ids"], batch["attention_mask"])  # (6, T, 384)
    assert states.shape == (6, batch["input_ids"].shape[1], 384)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (6, T, 1)
    for pooled in ((states * mask).sum(1) / mask.sum(1), states[:, 0]):  # masked mean, [CLS]
        unit = nn.functional.normalize(pooled, dim=-1)
        sim = unit @ unit.T  # (6, 6)
        for i in range(6):
            partner = i ^ 1
            others = [sim[i, j] for j in range(6) if j not in (i, partner)]
            assert sim[i, partner] > max(others) + 0.1, (titles[i], sim[i])


def test_tiny_encoders_of_the_tiny_recipe_build_quickly_and_deterministically(repo):
    cfg = load_config(repo / "configs" / "tiny.yaml").text
    torch.manual_seed(0)
    a = build_text_encoder(cfg)
    torch.manual_seed(0)
    b = build_text_encoder(cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    ids, mask = torch.randint(0, 30522, (3, 5)), torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] + [0] * 4])
    assert a(ids, mask).shape == (3, 5, cfg.tiny_dim) and a.out_dim == cfg.tiny_dim
    # All blocks train (trainable_layers = tiny_layers); the embeddings never do.
    assert _trainable_blocks(a) == set(range(cfg.tiny_layers))
    assert not any(n.startswith("model.pooler") for n, _ in a.named_parameters())


def test_frozen_blocks_run_without_dropout_in_train_mode():
    encoder = _tiny(tiny_layers=3, trainable_layers=1)
    parent = nn.Sequential(encoder)  # the override must also work when a parent module switches modes
    parent.eval()
    parent.train()
    blocks = encoder.blocks()
    assert [b.training for b in blocks] == [False, False, True] and not encoder.model.embeddings.training
    prefix = []
    blocks[1].register_forward_hook(lambda module, args, out: prefix.append(out[0] if isinstance(out, tuple)
                                                                            else out))
    ids, mask = torch.randint(0, 30522, (4, 6)), torch.ones(4, 6, dtype=torch.long)
    first, second = encoder(ids, mask), encoder(ids, mask)
    assert torch.equal(prefix[0], prefix[1])  # frozen prefix: deterministic
    assert not torch.equal(first, second)  # the trainable top block still applies dropout
    first.sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in encoder.parameters())


def test_fully_frozen_encoder_is_deterministic_in_train_mode():
    encoder = _tiny(trainable_layers=0).train()
    assert not _trainable(encoder)
    ids, mask = torch.randint(0, 30522, (2, 4)), torch.ones(2, 4, dtype=torch.long)
    assert torch.equal(encoder(ids, mask), encoder(ids, mask))


def test_local_folder_round_trip(tmp_path):
    torch.manual_seed(1)
    saved = _tiny(tiny_layers=2, trainable_layers=0)
    saved.model.save_pretrained(tmp_path)
    loaded = build_text_encoder(TextConfig(encoder=str(tmp_path), trainable_layers=1)).eval()
    ids, mask = torch.randint(0, 30522, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(loaded(ids, mask), saved.eval()(ids, mask), atol=1e-6)
    assert _trainable_blocks(loaded) == {1}


def test_text_tower_of_a_clip_folder(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(text_config=dict(tower, vocab_size=99), vision_config=dict(tower, image_size=32,
                                                                                         patch_size=16)))
    clip.save_pretrained(tmp_path)
    encoder = build_text_encoder(TextConfig(encoder=str(tmp_path), trainable_layers=1)).eval()
    assert type(encoder.model).__name__ == "CLIPTextModel" and _trainable_blocks(encoder) == {1}
    ids, mask = torch.randint(0, 99, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        expected = clip.eval().text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(encoder(ids, mask), expected, atol=1e-5)


def test_folder_whose_weights_do_not_match_is_an_error(tmp_path):
    _tiny(tiny_layers=2).model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3  # block 2 would silently be random
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PmmrecError, match="weights do not match"):
        build_text_encoder(TextConfig(encoder=str(tmp_path)))


@pytest.mark.parametrize("name", ["bert-base-uncased", "FacebookAI/xlm-roberta-base", "/no/such/folder"])
def test_names_that_would_need_a_download_are_clear_errors(name):
    with pytest.raises(PmmrecError, match="cannot be downloaded"):
        build_text_encoder(TextConfig(encoder=name))


def test_folder_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(PmmrecError, match="no config.json"):
        build_text_encoder(TextConfig(encoder=str(tmp_path)))


def test_more_tokens_than_positions_is_an_error():
    with pytest.raises(PmmrecError, match="max_tokens"):
        build_text_encoder(TextConfig(encoder="tiny", max_tokens=513))
