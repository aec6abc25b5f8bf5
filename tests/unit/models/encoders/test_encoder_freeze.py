"""Freezing by block and eval mode of frozen parts (pmmrec.models.encoders.freeze)."""

from __future__ import annotations

import pytest
from torch import nn

from pmmrec.models.encoders.freeze import eval_frozen, find_blocks, freeze_all_but_top_k, is_frozen


def _stack(n: int = 4) -> nn.Module:
    model = nn.Module()
    model.embed = nn.Embedding(10, 4)
    model.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)) for _ in range(n)])
    model.heads = nn.ModuleList([nn.Linear(4, 2), nn.ReLU()])  # mixed types: never taken for the block stack
    return model


def _trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("k", [0, 1, 3, 4, 9])
def test_only_top_k_blocks_train(k):
    model = _stack()
    freeze_all_but_top_k(model.blocks, [model], k)
    expected = {f"blocks.{i}.0.{w}" for i in range(max(4 - k, 0), 4) for w in ("weight", "bias")}
    assert _trainable(model) == expected


def test_refreezing_with_another_k_repartitions():
    model = _stack()
    freeze_all_but_top_k(model.blocks, [model], 4)
    freeze_all_but_top_k(model.blocks, [model.embed], 1)
    assert _trainable(model) == {"blocks.3.0.weight", "blocks.3.0.bias"}


def test_negative_k_is_an_error():
    with pytest.raises(ValueError):
        freeze_all_but_top_k(_stack().blocks, [], -1)


def test_frozen_modules_go_to_eval_and_trainable_ones_stay_in_train():
    model = _stack()
    freeze_all_but_top_k(model.blocks, [model], 1)
    model.train()
    eval_frozen(model)
    assert [b.training for b in model.blocks] == [False, False, False, True]
    assert not model.embed.training
    assert model.blocks[3][1].training  # a parameter-free dropout inside a trainable block keeps train mode
    assert is_frozen(model.blocks[0]) and not is_frozen(model.blocks[3]) and not is_frozen(nn.ReLU())


def test_find_blocks_prefers_encoder_layer_then_the_largest_uniform_list():
    model = _stack()
    assert find_blocks(model) is model.blocks
    model.encoder = nn.Module()
    model.encoder.layer = nn.ModuleList([nn.Linear(2, 2)])
    assert find_blocks(model) is model.encoder.layer
    with pytest.raises(ValueError, match="no list of blocks"):
        find_blocks(nn.Linear(2, 2))
