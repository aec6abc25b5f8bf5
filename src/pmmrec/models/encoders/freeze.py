"""Partial fine-tuning of pretrained encoders: freeze all but the top k blocks (PMMRec §IV-A, docs/design.md §4).

The paper fine-tunes only the top layers of its text and vision encoders. The reference code expresses this as
"freeze every parameter whose index is below 165", which silently changes meaning with the architecture. Here
the unit is a *block* (a transformer layer, an MBConv block): :func:`freeze_all_but_top_k` takes the encoder's
ordered blocks and everything else that must stay fixed (embeddings, stem, pooler).

Frozen parts must also stay in eval mode when the model trains: no dropout, and BatchNorm normalises with (and
keeps) its pretrained running statistics. :func:`eval_frozen` enforces it, and the encoders call it from their
``train()`` override. Deterministic frozen blocks are also what makes their outputs cacheable (docs/design.md §9).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn


def freeze_all_but_top_k(blocks: Sequence[nn.Module], others_frozen: Iterable[nn.Module], k: int) -> None:
    """Make only the last ``k`` of ``blocks`` trainable; freeze the other blocks and all of ``others_frozen``.

    ``blocks`` are ordered from input to output. ``k = 0`` freezes everything; ``k >= len(blocks)`` trains every
    block (the modules in ``others_frozen`` stay frozen either way). ``others_frozen`` is frozen first and the top
    blocks are then set trainable explicitly, so it may hold the blocks' parents (even the whole model: "freeze
    everything but the top k"), and calling this again with another ``k`` re-partitions the encoder.
    """
    if k < 0:
        raise ValueError(f"the number of trainable blocks must be >= 0, got {k}")
    first_trainable = max(len(blocks) - k, 0)
    for module in others_frozen:
        module.requires_grad_(False)
    for i, block in enumerate(blocks):
        block.requires_grad_(i >= first_trainable)


def is_frozen(module: nn.Module) -> bool:
    """True when the module has parameters and none of them trains."""
    has_params = False
    for p in module.parameters():
        if p.requires_grad:
            return False
        has_params = True
    return has_params


def eval_frozen(module: nn.Module) -> None:
    """Put every fully frozen sub-module of ``module`` in eval mode, leaving the trainable ones as they are.

    Frozen-ness is read from ``requires_grad`` at call time, so it follows whatever freezing was applied last.
    The walk stops at the first frozen module of each branch: ``eval()`` covers its whole subtree. Modules
    without parameters (a dropout between two trainable layers) keep the mode of their parent.
    """
    for child in module.children():
        if is_frozen(child):
            child.eval()
        else:
            eval_frozen(child)


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of blocks of a Hugging Face encoder, ordered from input to output.

    ``model.encoder.layer`` for BERT-likes (BERT, RoBERTa, XLM-R, ViT); otherwise the ``nn.ModuleList`` of
    same-type modules holding the most parameters, which finds the stack without knowing its attribute name
    (``encoder.layers`` for CLIP, ``transformer.layer`` for DistilBERT, ``encoder.block`` for T5).
    """
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        return layers
    best, best_count = None, -1
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        count = sum(p.numel() for p in module.parameters())
        if count > best_count:
            best, best_count = module, count
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of blocks (nn.ModuleList) to freeze by block")
    return best
