"""model.item_tower=content+id: the content vector plus a zero-initialised ID embedding with ID dropout."""

from __future__ import annotations

import pytest
import torch

from pmmrec.config import load_config
from pmmrec.data.batch import ItemInputs
from pmmrec.models.item_encoder import ItemEncoder
from pmmrec.models.loading import id_rows

TINY = ["text.encoder=tiny", "vision.encoder=tiny", "model.dim=16", "model.fusion=sum", "vision.image_size=16"]


def _inputs(items: list[int]) -> ItemInputs:
    g = torch.Generator().manual_seed(0)
    n = len(items)
    return ItemInputs(items=torch.tensor(items), text_ids=torch.randint(5, 50, (n, 6), generator=g),
                      text_mask=torch.ones(n, 6, dtype=torch.long), images=torch.randn(n, 3, 16, 16, generator=g),
                      has_image=torch.ones(n, dtype=torch.bool))


def _encoders(tower_dropout: float = 0.5):
    torch.manual_seed(0)
    content = ItemEncoder(load_config(None, TINY), num_items=5).eval()
    torch.manual_seed(0)
    hybrid = ItemEncoder(load_config(None, [*TINY, "model.item_tower=content+id",
                                            f"model.id_dropout={tower_dropout}"]), num_items=5).eval()
    return content, hybrid


def test_starts_as_the_content_tower_and_learns_ids():
    content, hybrid = _encoders()
    inputs = _inputs([1, 2, 3])
    assert torch.equal(content(inputs), hybrid(inputs))  # zero-initialised IDs; content parts built identically
    with torch.no_grad():
        hybrid.id_embedding.weight[1:] = torch.randn(5, 16)
    out = hybrid(inputs)
    assert torch.allclose(out, content(inputs) + hybrid.id_embedding.weight[[1, 2, 3]])
    # An item without an ID (number 0: added after training, or from another domain) is its content alone.
    assert torch.equal(hybrid(_inputs([0, 0, 0])), content(_inputs([0, 0, 0])))


def test_id_dropout_leaves_out_whole_id_vectors_in_training_only():
    content, hybrid = _encoders(tower_dropout=0.5)
    content.train()
    with torch.no_grad():
        hybrid.id_embedding.weight[1:] = 1.0
    inputs = _inputs(list(range(1, 6)) * 40)
    vectors = content.fuse(content.modality_tokens(inputs))
    hybrid.train()
    torch.manual_seed(1)
    added = hybrid.add_ids(vectors, inputs.items) - vectors  # (200, D): each row all ones or all zeros
    kept = added.abs().sum(1) > 0.5
    assert torch.allclose(added[kept], torch.ones_like(added[kept]), atol=1e-5)
    assert torch.allclose(added[~kept], torch.zeros_like(added[~kept]), atol=1e-5)
    assert 0.3 < kept.float().mean() < 0.7
    hybrid.eval()
    assert torch.allclose(hybrid.add_ids(vectors, inputs.items) - vectors, torch.ones(200, 16), atol=1e-5)


def test_id_rows_map_another_catalogue_to_the_trained_ids():
    assert id_rows(["a", "b", "c"], ["a", "b", "c"]) is None
    assert id_rows(["a", "b", "c"], ["c", "x", "a"]).tolist() == [0, 3, 0, 1]


def test_bad_id_dropout_is_an_error():
    from pmmrec.errors import ConfigError

    with pytest.raises(ConfigError, match="model.id_dropout"):
        load_config(None, ["model.id_dropout=1.5"])
