"""Split a Hugging Face encoder at its first trainable block: frozen prefix | trainable top (docs/design.md §9).

With only the top k blocks trainable, everything below them (embeddings, frozen blocks) computes the same
function of the item at every step, so its output (the hidden states entering the first trainable block) can be
computed once per item and cached. These helpers do the split on any Hugging Face model whose blocks take the
hidden states as their first argument and return them (the transformers 5 convention for BERT, RoBERTa, XLM-R,
ViT, CLIP...), without knowing the model's forward:

- :func:`run_prefix` runs the model's own forward and stops it (an exception raised from a forward pre-hook) as
  the hidden states enter the first trainable block;
- :func:`run_top` runs the model's own forward with the frozen blocks replaced by pass-throughs and the cached
  states substituted at the entrance of the first trainable block. The embeddings still run on a dummy input
  (cheap: a table lookup or one patch convolution) and their output is discarded; everything the model does
  after the blocks (a final LayerNorm for ViT) runs as usual, and so does the attention mask.

``run_top(run_prefix(x)) == model(x)`` exactly (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn


class _PrefixDone(Exception):
    """Raised from a hook to stop a forward once the prefix output is captured."""


def _passthrough(hidden_states: Tensor, *args, **kwargs) -> Tensor:
    return hidden_states


def run_prefix(blocks: Sequence[nn.Module], first_trainable: int, forward: Callable[[], object]) -> Tensor:
    """The hidden states that enter ``blocks[first_trainable]`` during ``forward()`` (which is cut short there)."""
    captured: list[Tensor] = []

    def capture(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _PrefixDone

    handle = blocks[first_trainable].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        forward()
    except _PrefixDone:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"the forward never reached block {first_trainable}")
    return captured[0]


def run_top(blocks: Sequence[nn.Module], first_trainable: int, prefix: Tensor, forward: Callable[[], Tensor]):
    """``forward()`` with blocks below ``first_trainable`` skipped and ``prefix`` entering that block."""

    def substitute(module, args, kwargs):
        if args:
            return (prefix, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": prefix}

    skipped = list(blocks[:first_trainable])
    for block in skipped:
        block.forward = _passthrough  # an instance attribute shadows the class's forward until deleted
    handle = blocks[first_trainable].register_forward_pre_hook(substitute, with_kwargs=True)
    try:
        return forward()
    finally:
        handle.remove()
        for block in skipped:
            del block.forward
