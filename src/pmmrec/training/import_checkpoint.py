"""``pmmrec import-checkpoint``: the PMMRec authors' pretrained checkpoint as a pmmrec checkpoint.

The reference code (ICDE24/PMMRec) saves ``{"model_state_dict": ..., "optimizer": ..., "scaler_state": ...,
"rng_state": ..., "cuda_rng_state": ...}`` with ``torch.save``. Its model is built from

* ``text_encoder.bert_model.*``: a Hugging Face ``AutoModel`` (paper: xlm-roberta-base), and
  ``text_encoder.text_proj``: Linear(H_text -> D);
* ``cv_encoder.image_net.*``: a ``CLIPVisionModel`` (paper: CLIP ViT-B/32), and ``cv_encoder.cv_proj``;
* ``fusion_module.*``: merged attention, ``MergeAtt_layers.<i>.{self_att.self.{query,key,value},
  self_att.output.{dense,LayerNorm}, inter.dense, output.{dense,LayerNorm}}`` (BERT's layer layout, BERT-base
  heads) plus ``token_type_embeddings`` (2, D);
* ``user_encoder.transformer_encoder.*``: SASRec, ``position_embedding`` (L, D), ``layer_norm``, and per block
  ``multi_head_attention.{w_Q,w_K,w_V,fc}`` (bias-free), ``multi_head_attention.layer_norm``,
  ``feed_forward.{w_1,w_2,layer_norm}``.

:data:`RULES` maps each name onto pmmrec's :class:`~pmmrec.models.pmmrec.PMMRec` built with the paper's
configuration (``configs/paper.yaml``), whose sizes (D, L, blocks) are read from the checkpoint's shapes. Two
deliberate departures, both reported:

* the reference adds its modality-type embeddings to copies of the token states and then fuses the *raw* states,
  so its fusion layer never saw them; they are imported as zeros, which reproduces its item vectors exactly (and
  lets fine-tuning learn them from there);
* buffers that older transformers versions saved (``position_ids``) are skipped: current versions rebuild them.

Nothing is loaded silently in part: a reference tensor that maps nowhere, or a model tensor no reference
tensor fills, is an error unless ``allow_partial`` is set (the reference itself loads with ``strict=False`` and
would not notice). The file is read with ``torch.load(weights_only=True)``, which never runs pickled code.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pmmrec.config import Config, load_config
from pmmrec.errors import PmmrecError
from pmmrec.models.pmmrec import PMMRec
from pmmrec.runtime.checkpoint import save_checkpoint

log = logging.getLogger(__name__)

_SASREC = r"user_encoder\.transformer_encoder\."
_BLOCK = _SASREC + r"transformer_blocks\.(\d+)\."
_FUSION = r"fusion_module\.MergeAtt_layers\.0\."
_WB = r"\.(weight|bias)"

# (reference name pattern, pmmrec name template, part). Patterns match the whole name; the first that matches wins.
RULES: list[tuple[str, str, str]] = [
    (r"text_encoder\.bert_model\.(.+)", r"item_encoder.text.model.\1", "text encoder"),
    (r"text_encoder\.text_proj" + _WB, r"item_encoder.text_proj.\1", "text projection"),
    (r"cv_encoder\.image_net\.(.+)", r"item_encoder.vision.backbone.\1", "vision encoder"),
    (r"cv_encoder\.cv_proj" + _WB, r"item_encoder.vision_proj.\1", "vision projection"),
    (_FUSION + r"self_att\.self\.query" + _WB, r"item_encoder.fusion.block.attn.q.\1", "fusion"),
    (_FUSION + r"self_att\.self\.key" + _WB, r"item_encoder.fusion.block.attn.k.\1", "fusion"),
    (_FUSION + r"self_att\.self\.value" + _WB, r"item_encoder.fusion.block.attn.v.\1", "fusion"),
    (_FUSION + r"self_att\.output\.dense" + _WB, r"item_encoder.fusion.block.attn.out.\1", "fusion"),
    (_FUSION + r"self_att\.output\.LayerNorm" + _WB, r"item_encoder.fusion.block.attn_norm.\1", "fusion"),
    (_FUSION + r"inter\.dense" + _WB, r"item_encoder.fusion.block.ffn_in.\1", "fusion"),
    (_FUSION + r"output\.dense" + _WB, r"item_encoder.fusion.block.ffn_out.\1", "fusion"),
    (_FUSION + r"output\.LayerNorm" + _WB, r"item_encoder.fusion.block.ffn_norm.\1", "fusion"),
    (r"fusion_module\.token_type_embeddings\.weight", "item_encoder.fusion.type_embedding.weight", "fusion"),
    (_SASREC + r"position_embedding\.weight", "user_encoder.position.weight", "user encoder"),
    (_SASREC + r"layer_norm" + _WB, r"user_encoder.input_norm.\1", "user encoder"),
    (_BLOCK + r"multi_head_attention\.w_Q\.weight", r"user_encoder.blocks.\1.attn.q.weight", "user encoder"),
    (_BLOCK + r"multi_head_attention\.w_K\.weight", r"user_encoder.blocks.\1.attn.k.weight", "user encoder"),
    (_BLOCK + r"multi_head_attention\.w_V\.weight", r"user_encoder.blocks.\1.attn.v.weight", "user encoder"),
    (_BLOCK + r"multi_head_attention\.fc\.weight", r"user_encoder.blocks.\1.attn.out.weight", "user encoder"),
    (_BLOCK + r"multi_head_attention\.layer_norm" + _WB, r"user_encoder.blocks.\1.attn_norm.\2", "user encoder"),
    (_BLOCK + r"feed_forward\.w_1" + _WB, r"user_encoder.blocks.\1.ffn_in.\2", "user encoder"),
    (_BLOCK + r"feed_forward\.w_2" + _WB, r"user_encoder.blocks.\1.ffn_out.\2", "user encoder"),
    (_BLOCK + r"feed_forward\.layer_norm" + _WB, r"user_encoder.blocks.\1.ffn_norm.\2", "user encoder"),
]
_COMPILED = [(re.compile(pattern), template, part) for pattern, template, part in RULES]
ZEROED = {"fusion_module.token_type_embeddings.weight":
          "the reference adds them to a copy of the tokens it never fuses; zeros reproduce its item vectors"}
_REBUILT_BUFFERS = ("position_ids",)  # saved by older transformers versions, rebuilt by current ones

# The paper's configuration (configs/paper.yaml) for everything the checkpoint's shapes do not say.
PAPER = {
    "text": {"max_tokens": 50, "trainable_layers": 2},
    "vision": {"trainable_layers": 2},
    "model": {"fusion": "merged_attention", "modality": "multimodal", "item_tower": "content",
              "user_encoder": "sasrec", "num_heads": 2, "dropout": 0.1},
    "data": {"min_seq_len": 3},
}


def map_name(name: str) -> tuple[str, str] | None:
    """The pmmrec name and part of a reference state-dict name, or None when no rule applies."""
    for pattern, template, part in _COMPILED:
        match = pattern.fullmatch(name)
        if match:
            return match.expand(template), part
    return None


@dataclass
class ImportReport:
    """Every reference tensor and every model tensor, and what happened to it."""

    source: str
    mapped: dict[str, str] = field(default_factory=dict)  # reference name -> pmmrec name
    zeroed: dict[str, str] = field(default_factory=dict)  # reference name -> why it was imported as zeros
    ignored: dict[str, str] = field(default_factory=dict)  # reference name -> why it is safe to skip
    unmapped: dict[str, str] = field(default_factory=dict)  # reference name -> why it could not be placed
    not_in_reference: list[str] = field(default_factory=list)  # model tensors left at their initial value
    parts: dict[str, int] = field(default_factory=dict)  # part -> tensors mapped

    def summary(self) -> str:
        parts = ", ".join(f"{part} {n}" for part, n in self.parts.items())
        lines = [f"import-checkpoint {self.source}: {len(self.mapped)} tensors mapped ({parts}), "
                 f"{len(self.zeroed)} zeroed, {len(self.ignored)} ignored, {len(self.unmapped)} unmapped, "
                 f"{len(self.not_in_reference)} model tensors not in the checkpoint"]
        lines += [f"  zeroed   {k}: {why}" for k, why in self.zeroed.items()]
        lines += [f"  ignored  {k}: {why}" for k, why in self.ignored.items()]
        lines += [f"  unmapped {k}: {why}" for k, why in self.unmapped.items()]
        lines += [f"  missing  {k}" for k in self.not_in_reference]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "mapped": self.mapped, "zeroed": self.zeroed, "ignored": self.ignored,
                "unmapped": self.unmapped, "not_in_reference": self.not_in_reference, "parts": self.parts}


def read_reference_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict inside a reference checkpoint, loaded without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise PmmrecError(f"checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types; the common one is UnpicklingError for a disallowed global
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise PmmrecError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {reason}). pmmrec "
            "never unpickles arbitrary objects, because that can run code from the file. If you trust the file, "
            "re-save just its weights in a separate Python session: torch.save({'model_state_dict': "
            "torch.load(PATH, weights_only=False)['model_state_dict']}, 'weights.pt'), and import weights.pt"
        ) from None
    state = raw
    if isinstance(raw, dict):
        for key in ("model_state_dict", "state_dict", "model"):
            if isinstance(raw.get(key), dict):
                state = raw[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = sorted(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
        raise PmmrecError(f"{path}: no model state dict found (expected the reference's 'model_state_dict'; "
                          f"the file holds {keys})")
    # Saved from a DistributedDataParallel wrapper without unwrapping: drop its "module." prefix.
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _shape(state: dict[str, torch.Tensor], name: str, path: Path) -> tuple[int, ...]:
    if name not in state:
        raise PmmrecError(f"{path}: no tensor {name!r}; is this a PMMRec reference checkpoint with a SASRec user "
                          "encoder? (its sizes are read from that tensor)")
    return tuple(state[name].shape)


def reference_config(state: dict[str, torch.Tensor], text_encoder: str, vision_encoder: str, path: Path,
                     num_heads: int = 2) -> Config:
    """The paper's configuration, sized by the checkpoint: D and L from SASRec's position table, the block count
    from its block names, the image size from the vision encoder's preprocessor."""
    from pmmrec.data.images import ImagePreprocessor
    from pmmrec.pretrained import local_model_dir

    length, dim = _shape(state, "user_encoder.transformer_encoder.position_embedding.weight", path)
    blocks = {int(m.group(1)) for k in state if (m := re.match(_BLOCK, k))}
    fusion_layers = {int(m.group(1)) for k in state if (m := re.match(r"fusion_module\.MergeAtt_layers\.(\d+)\.", k))}
    if len(fusion_layers) > 1:
        raise PmmrecError(f"{path}: the fusion has {len(fusion_layers)} merged-attention layers; pmmrec's merged "
                          "attention has one (the paper's and the reference's default)")
    image_size = ImagePreprocessor.from_pretrained(local_model_dir(vision_encoder, "--vision-encoder")).size
    tree = {
        "text": {**PAPER["text"], "encoder": str(text_encoder)},
        "vision": {**PAPER["vision"], "encoder": str(vision_encoder), "image_size": image_size},
        "model": {**PAPER["model"], "dim": dim, "num_blocks": max(len(blocks), 1), "num_heads": num_heads},
        "data": {**PAPER["data"], "max_seq_len": length},
        "objectives": {"use": ["rec"]},  # the reference trains no auxiliary heads
    }
    return load_config(None, base=tree, base_source=f"{path} (imported)")


def map_state(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], source: str
              ) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """Place each reference tensor into a copy of ``own`` (pmmrec's state dict) and report on every name."""
    report = ImportReport(source)
    new = dict(own)
    filled: set[str] = set()
    for name, tensor in state.items():
        target = map_name(name)
        if target is None:
            if name.rsplit(".", 1)[-1] in _REBUILT_BUFFERS:
                report.ignored[name] = "a buffer older transformers versions saved; it is rebuilt, not loaded"
            else:
                report.unmapped[name] = "no pmmrec counterpart (a part pmmrec's paper model does not have)"
            continue
        ours, part = target
        if ours not in own:
            if name.rsplit(".", 1)[-1] in _REBUILT_BUFFERS:
                report.ignored[name] = "a buffer older transformers versions saved; it is rebuilt, not loaded"
            else:
                report.unmapped[name] = f"maps to {ours}, which the model built from the encoder folders lacks"
            continue
        if tuple(own[ours].shape) != tuple(tensor.shape):
            raise PmmrecError(f"{source}: {name} has shape {tuple(tensor.shape)} but {ours} has "
                              f"{tuple(own[ours].shape)}; do --text-encoder/--vision-encoder match the encoders the "
                              "checkpoint was trained with (paper: xlm-roberta-base, clip-vit-base-patch32)?")
        if name in ZEROED:
            new[ours] = torch.zeros_like(own[ours])
            report.zeroed[name] = ZEROED[name]
        else:
            new[ours] = tensor.detach().to(own[ours].dtype).clone()
            report.mapped[name] = ours
            report.parts[part] = report.parts.get(part, 0) + 1
        filled.add(ours)
    report.not_in_reference = [k for k in own if k not in filled and k.rsplit(".", 1)[-1] not in _REBUILT_BUFFERS]
    return new, report


def import_checkpoint(reference: str | os.PathLike, out: str | os.PathLike, *, text_encoder: str,
                      vision_encoder: str, allow_partial: bool = False, num_heads: int = 2
                      ) -> tuple[ImportReport, Config]:
    """Write ``out``, a pmmrec checkpoint (model + config) that ``pmmrec transfer --from`` accepts.

    ``text_encoder`` and ``vision_encoder`` are local Hugging Face folders of the encoders the checkpoint was
    trained with (their architecture and tokenizer/preprocessor; the weights come from the checkpoint).
    ``num_heads``: SASRec's attention heads, which the weights do not reveal (paper: 2).
    """
    reference = Path(reference)
    state = read_reference_state(reference)
    config = reference_config(state, text_encoder, vision_encoder, reference, num_heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # tensors the checkpoint does not fill (reported) start deterministic
        model = PMMRec(config, num_items=0)
    new, report = map_state(state, model.state_dict(), str(reference))
    if (report.unmapped or report.not_in_reference) and not allow_partial:
        examples = list(report.unmapped)[:3] + report.not_in_reference[:3]
        raise PmmrecError(f"{reference}: a partial import ({len(report.unmapped)} checkpoint tensors unmapped, "
                          f"{len(report.not_in_reference)} model tensors not in the checkpoint, e.g. {examples}); "
                          "pass --allow-partial to accept it (the report lists every name)")
    model.load_state_dict(new, strict=True)
    save_checkpoint(out, {"model": model.state_dict(), "config": config.to_dict(), "item_ids": [],
                          "import_report": report.to_dict()})
    log.info("%s", report.summary().splitlines()[0])
    return report, config
