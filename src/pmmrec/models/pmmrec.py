"""PMMRec: item encoder + user encoder (PMMRec, ICDE 2024, §III).

The model knows nothing about ranks, devices or losses (docs/design.md, house rule 3): ``encode_items`` turns item inputs into
vectors, ``encode_sequences`` turns sequences of item vectors into user states, ``score`` compares them.
Losses live in ``pmmrec.objectives``.

Compact checkpoints: the frozen blocks of a *pretrained* encoder (MiniLM, EfficientNet-Lite0, a local Hugging Face
folder) never change, and rebuilding the model from its config loads them again from the same files. So
:meth:`PMMRec.checkpoint_state` leaves them out and stores, per encoder, a SHA-256 of the omitted tensors instead
(key ``FROZEN_DIGEST.<encoder prefix>``); :meth:`PMMRec.load_state_dict` accepts such a state after checking that
the tensors this model holds for the omitted names hash to the same digest, so a checkpoint can never be paired
with other encoder weights silently. With the CPU recipe this makes a checkpoint about 1 MB instead of 108 MB.
Randomly initialised (``tiny``) encoders are always stored in full.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from pmmrec.config import Config
from pmmrec.data.batch import ItemInputs
from pmmrec.data.datasets import SequenceBatch
from pmmrec.errors import PmmrecError
from pmmrec.models.item_encoder import ItemEncoder
from pmmrec.models.user import build_user_encoder
from pmmrec.objectives.base import StepOutputs
from pmmrec.objectives.registry import build_heads

FROZEN_DIGEST = "frozen_sha256"  # state key prefix: FROZEN_DIGEST.<encoder prefix> -> (32,) uint8 digest


def tensors_digest(state: Mapping[str, Tensor], names: list[str]) -> Tensor:
    """SHA-256 over the sorted ``names`` and their tensors' bytes, as a (32,) uint8 tensor."""
    digest = hashlib.sha256()
    for name in sorted(names):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)


class PMMRec(nn.Module):
    def __init__(self, config: Config, num_items: int):
        super().__init__()
        self.item_encoder = ItemEncoder(config, num_items)
        # Encoders whose weights come from files (rebuilt identically from the config): their frozen part is left
        # out of checkpoints. Tiny encoders are random, hence always saved.
        self.pretrained_prefixes = [f"item_encoder.{name}." for name, cfg in (("text", config.text),
                                                                             ("vision", config.vision))
                                    if getattr(self.item_encoder, name) is not None and cfg.encoder != "tiny"]
        self._digests: dict[str, Tensor] = {}
        self.user_encoder = build_user_encoder(config.model, config.data.max_seq_len)
        # The heads of the objectives in use (pmmrec.objectives.registry), saved with the model, never transferred.
        self.heads = build_heads(config, self.item_encoder)

    # ------------------------------------------------------------------------------------- compact checkpoints
    def _frozen_names(self, prefix: str) -> Iterator[str]:
        """State-dict names under ``prefix`` that never train: frozen parameters, and the buffers of modules
        without trainable parameters (BatchNorm statistics of frozen blocks stay fixed: they run in eval mode)."""
        module = self.get_submodule(prefix.rstrip("."))
        for name, param in module.named_parameters():
            if not param.requires_grad:
                yield prefix + name
        for path, sub in module.named_modules():
            if any(p.requires_grad for p in sub.parameters(recurse=False)):
                continue
            for name, _ in sub.named_buffers(recurse=False):
                if name not in sub._non_persistent_buffers_set:
                    yield f"{prefix}{path + '.' if path else ''}{name}"

    def checkpoint_state(self) -> dict[str, Tensor]:
        """``state_dict()`` without the frozen pretrained tensors, plus one digest of them per encoder."""
        state = self.state_dict()
        for prefix in self.pretrained_prefixes:
            omitted = list(self._frozen_names(prefix))
            if omitted:
                key = f"{FROZEN_DIGEST}.{prefix.rstrip('.')}"
                if key not in self._digests:  # frozen tensors only change through load_state_dict (clears this)
                    self._digests[key] = tensors_digest(state, omitted)
                state[key] = self._digests[key]
                for name in omitted:
                    del state[name]
        return state

    def verify_omitted(self, state: Mapping[str, Tensor], prefixes: list[str] | None = None) -> list[str]:
        """Check this model's tensors for the names a compact ``state`` omits (under ``prefixes``, default all
        digests it carries) against the stored digests; returns the verified names."""
        own = self.state_dict()
        verified = []
        for key, digest in state.items():
            if not key.startswith(FROZEN_DIGEST + "."):
                continue
            prefix = key[len(FROZEN_DIGEST) + 1:] + "."
            if prefixes is not None and prefix not in prefixes:
                continue
            if not any(name.startswith(prefix) for name in own):
                raise PmmrecError(
                    f"the checkpoint has {prefix.rstrip('.')} but this model has none: its config (with the "
                    "overrides given) builds another architecture, e.g. another model.modality; a checkpoint is "
                    "evaluated and served as it was trained (pmmrec transfer changes the modality)")
            omitted = [name for name in own if name.startswith(prefix) and name not in state]
            if not torch.equal(tensors_digest(own, omitted), digest.to(torch.uint8)):
                raise PmmrecError(
                    f"the checkpoint's frozen {prefix.rstrip('.')} weights differ from the ones this config "
                    f"loads ({len(omitted)} tensors; fingerprint mismatch): point "
                    f"{'text' if '.text' in prefix else 'vision'}.encoder at the files the checkpoint was "
                    "trained with")
            verified += omitted
        return verified

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that also accepts a compact state (see :meth:`checkpoint_state`)."""
        self._digests.clear()
        if not any(key.startswith(FROZEN_DIGEST + ".") for key in state_dict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        omitted = set(self.verify_omitted(state_dict))
        tensors = {k: v for k, v in state_dict.items() if not k.startswith(FROZEN_DIGEST + ".")}
        result = super().load_state_dict(tensors, strict=False, assign=assign)
        missing = [name for name in result.missing_keys if name not in omitted]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"error loading PMMRec state: missing {missing[:5]}, unexpected "
                               f"{result.unexpected_keys[:5]}")
        return result

    def forward(self, batch: SequenceBatch) -> StepOutputs:
        """A training batch -> the tensors every objective's term reads (each distinct item encoded once)."""
        encoder = self.item_encoder
        tokens = encoder.modality_tokens(batch.inputs) if encoder.tower != "id" else None
        unique_embs = (encoder.add_ids(encoder.fuse(tokens), batch.inputs.items) if tokens is not None
                       else self.encode_items(batch.inputs))  # (U, D)
        item_embs = unique_embs[batch.inverse]  # (B, L+1, D)
        mask = batch.items[:, :-1] != 0  # (B, L)
        states = self.encode_sequences(item_embs[:, :-1], mask)  # (B, L, D)
        return StepOutputs(self, tokens, unique_embs, item_embs, states, mask)

    def encode_items(self, items: ItemInputs) -> Tensor:
        return self.item_encoder(items)  # (N, D)

    def encode_sequences(self, item_embs: Tensor, mask: Tensor) -> Tensor:
        return self.user_encoder(item_embs, mask)  # (B, L, D) -> (B, L, D)

    @staticmethod
    def score(user_states: Tensor, item_embs: Tensor) -> Tensor:
        return user_states @ item_embs.T  # (B, D) x (N, D) -> (B, N)
