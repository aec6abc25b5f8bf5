"""model.feature_dropout: dropout on each modality's encoder output before its projection, in training only."""

from __future__ import annotations

import pytest
import torch

from pmmrec.config import load_config
from pmmrec.data.batch import ItemInputs
from pmmrec.errors import ConfigError
from pmmrec.models.item_encoder import ItemEncoder

# Frozen tiny encoders (no dropout of their own in training), so what reaches a projection differs between
# training and evaluation only by the feature dropout.
TINY = ["text.encoder=tiny", "vision.encoder=tiny", "model.dim=16", "model.fusion=sum", "vision.image_size=16",
        "text.trainable_layers=0", "vision.trainable_layers=0"]


def _inputs(n: int = 64) -> ItemInputs:
    g = torch.Generator().manual_seed(0)
    return ItemInputs(items=torch.arange(1, n + 1), text_ids=torch.randint(5, 50, (n, 6), generator=g),
                      text_mask=torch.ones(n, 6, dtype=torch.long), images=torch.randn(n, 3, 16, 16, generator=g),
                      has_image=torch.ones(n, dtype=torch.bool))


def _encoder(p: float) -> ItemEncoder:
    torch.manual_seed(0)
    return ItemEncoder(load_config(None, [*TINY, f"model.feature_dropout={p}"]), num_items=64)


def _projection_inputs(encoder: ItemEncoder, inputs: ItemInputs) -> dict[str, torch.Tensor]:
    seen = {}
    hooks = [proj.register_forward_hook(lambda _m, args, _out, name=name: seen.__setitem__(name, args[0]))
             for name, proj in (("text", encoder.text_proj), ("vision", encoder.vision_proj))]
    with torch.no_grad():
        encoder(inputs)
    for hook in hooks:
        hook.remove()
    return seen


def test_drops_encoder_outputs_before_the_projections_in_training_only():
    plain, dropped, inputs = _encoder(0.0), _encoder(0.5), _inputs()
    assert plain.state_dict().keys() == dropped.state_dict().keys()  # no parameters: checkpoints load either way
    clean = _projection_inputs(plain.eval(), inputs)
    assert torch.equal(dropped.eval()(inputs), plain(inputs))  # identity in evaluation
    assert all(torch.equal(clean[k], v) for k, v in _projection_inputs(plain.train(), inputs).items())
    for name, seen in _projection_inputs(dropped.train(), inputs).items():
        zero = seen == 0
        assert 0.4 < zero.float().mean() < 0.6, name  # about half of each feature vector's entries
        assert torch.allclose(seen[~zero], 2 * clean[name][~zero]), name  # the rest scaled by 1 / (1 - p)


def test_bad_feature_dropout_is_an_error():
    with pytest.raises(ConfigError, match="model.feature_dropout"):
        load_config(None, ["model.feature_dropout=1.0"])
