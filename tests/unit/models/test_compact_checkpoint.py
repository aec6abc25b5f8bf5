"""Compact checkpoints: frozen pretrained encoder weights are replaced by a verified digest (models/pmmrec.py)."""

import pytest
import torch

from pmmrec.config import load_config
from pmmrec.errors import PmmrecError
from pmmrec.models.pmmrec import FROZEN_DIGEST, PMMRec
from pmmrec.training.transfer import load_parts

# EfficientNet-Lite0 (pretrained, from its PyPI package) with its top block trainable, and a tiny random text
# encoder: the vision branch is compacted, the text branch is always saved in full.
OVERRIDES = ["text.encoder=tiny", "vision.encoder=efficientnet-lite0", "vision.trainable_layers=1", "model.dim=16"]


def build(*extra: str, seed: int = 0) -> PMMRec:
    torch.manual_seed(seed)
    return PMMRec(load_config(None, [*OVERRIDES, *extra]), num_items=5)


def test_frozen_pretrained_tensors_are_left_out_and_restored_from_the_files():
    model = build()
    state = model.checkpoint_state()
    full = model.state_dict()
    omitted = set(full) - set(state)
    assert omitted and all(k.startswith("item_encoder.vision.") for k in omitted)
    assert f"{FROZEN_DIGEST}.item_encoder.vision" in state and f"{FROZEN_DIGEST}.item_encoder.text" not in state
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not omitted & trainable  # the trainable top block (and its BatchNorm statistics) is saved
    assert any(k.startswith("item_encoder.vision.") and "running_mean" in k for k in state)
    frozen = build("vision.trainable_layers=0").checkpoint_state()  # fully frozen: nothing of it is stored
    assert not any(k.startswith("item_encoder.vision.") for k in frozen)
    # A model rebuilt with another seed (other random tiny text weights) takes every saved tensor.
    other = build(seed=1)
    other.load_state_dict(state)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in full.items())


def test_other_encoder_weights_are_refused():
    state = build().checkpoint_state()
    other = build()
    with torch.no_grad():
        frozen = next(p for n, p in other.named_parameters() if n.startswith("item_encoder.vision.")
                      and not p.requires_grad)
        frozen.add_(1e-3)
    with pytest.raises(PmmrecError, match="frozen item_encoder.vision weights differ"):
        other.load_state_dict(state)
    with pytest.raises(PmmrecError, match="differ"):
        load_parts(other, state, "item_encoder")


def test_transfer_counts_verified_frozen_tensors_as_loaded_even_with_another_depth():
    state = build().checkpoint_state()
    target = build("vision.trainable_layers=0")  # the saved top block is loaded, the rest is verified
    report = load_parts(target, state, "full")
    vision = {k for k in target.state_dict() if k.startswith("item_encoder.vision.")}
    assert vision <= set(report.loaded)
    assert not any(k.startswith("item_encoder.") for k in report.reinitialised)


def test_a_strict_load_still_reports_really_missing_tensors():
    state = build().checkpoint_state()
    del state[next(k for k in state if k.startswith("user_encoder."))]
    with pytest.raises(RuntimeError, match="missing"):
        build().load_state_dict(state)


def test_a_model_built_without_a_part_of_the_checkpoint_is_told_which():
    state = build().checkpoint_state()
    with pytest.raises(PmmrecError, match="has item_encoder.vision but this model has none.*model.modality"):
        build("model.modality=text").load_state_dict(state)


def test_weights_that_do_not_fit_the_overridden_config_are_a_clear_error():
    from pmmrec.models.loading import Checkpoint, build_model

    state = build("vision.trainable_layers=0").checkpoint_state()  # every stored tensor is a trainable one
    config = load_config(None, [*OVERRIDES, "vision.trainable_layers=0", "model.dim=8"])
    with pytest.raises(PmmrecError, match="ckpt.pt: its weights do not fit the model its config builds.*size mismatch"):
        build_model(Checkpoint("ckpt.pt", {"model": state}, config, ["a", "b", "c", "d", "e"]))
