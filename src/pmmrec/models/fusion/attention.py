"""Token-level fusions: the two modalities' token states interact through attention before pooling.

PMMRec §III-A fuses the projected title tokens and image patch tokens with *merged attention*: one transformer
layer over the concatenated token sequence, with a learned modality-type embedding telling text from image,
followed by mean pooling over valid tokens. *Co-attention* (two cross-attention streams, as in LXMERT) is the
alternative studied in the paper's fusion ablation.

Both use BERT's layer layout (post-LN, GELU, FFN width 4D, LayerNorm eps 1e-12) with ``D // 64`` attention heads
when ``D`` is a multiple of 64 (BERT's head width), else one head, so that a BERT layer of hidden size ``D``
copies into the merged-attention layer unchanged (``model.fusion_init``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pmmrec.config import ModelConfig
from pmmrec.errors import PmmrecError
from pmmrec.models.layers import TransformerBlock, masked_mean
from pmmrec.pretrained import local_model_dir

TEXT, IMAGE = 0, 1  # rows of the modality-type embedding table

# BertLayer parameter name -> TransformerBlock parameter name (weights and biases alike).
_BERT_LAYER_NAMES = {
    "attention.self.query": "attn.q",
    "attention.self.key": "attn.k",
    "attention.self.value": "attn.v",
    "attention.output.dense": "attn.out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}


def fusion_heads(dim: int) -> int:
    """Attention heads of a fusion layer of width ``dim``: BERT's 64-wide heads when they fit exactly, else 1."""
    return dim // 64 if dim % 64 == 0 else 1


def _init_bert_style(module: nn.Module) -> None:
    """BERT's initialisation (normal, std 0.02; zero biases; unit LayerNorm), which the reference fusion uses."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MergedAttentionFusion(nn.Module):
    """Merged attention (PMMRec §III-A): one transformer layer over ``[text tokens; image tokens]``.

    Each token gets its modality-type embedding *added before* it enters the layer. (The reference code
    computes the type-embedded tokens and then concatenates the raw ones, so its type embeddings never
    reach the layer; a unit test guards against that.) Padded tokens are masked as keys and excluded from the
    final mean, so they cannot change the item vector.
    """

    def __init__(self, dim: int, dropout: float = 0.1):
        super().__init__()
        self.type_embedding = nn.Embedding(2, dim)  # row TEXT, row IMAGE
        self.block = TransformerBlock(dim, fusion_heads(dim), dropout, activation="gelu", eps=1e-12)
        self.apply(_init_bert_style)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> MergedAttentionFusion:
        fusion = cls(cfg.dim, cfg.dropout)
        if cfg.fusion_init is not None:
            fusion.load_bert_layer(cfg.fusion_init)
        return fusion

    def forward(self, text: Tensor, text_mask: Tensor, image: Tensor, image_mask: Tensor) -> Tensor:
        """text (N, T, D), text_mask (N, T), image (N, P, D), image_mask (N, P) -> (N, D)."""
        text = text + self.type_embedding.weight[TEXT]  # (N, T, D)
        image = image + self.type_embedding.weight[IMAGE]  # (N, P, D)
        valid = torch.cat([text_mask, image_mask], dim=1) != 0  # (N, T+P)
        # Zero the padding so that even non-finite values there cannot reach valid tokens (0 * inf = NaN).
        tokens = torch.cat([text, image], dim=1).masked_fill(~valid.unsqueeze(-1), 0.0)  # (N, T+P, D)
        states = self.block(tokens, valid.unsqueeze(1))  # (N, T+P, D); key-padding mask (N, 1, T+P)
        return masked_mean(states, valid)  # (N, D)

    def load_bert_layer(self, path: str, layer: int = -1) -> None:
        """Copy one layer of a local BERT-style model (default: its last) into the fusion layer.

        The last layer is the default because the fusion layer reads top-level token states, which are closest
        to what a BERT's last layer was trained on. The folder must hold a Hugging Face model whose layers match
        this one: hidden size ``D``, ``fusion_heads(D)`` heads, FFN width ``4 D`` and GELU. Anything else is a
        :class:`PmmrecError` naming the mismatch; nothing is ever downloaded.
        """
        from transformers import AutoConfig, AutoModel  # lazy: importing transformers is slow

        folder = local_model_dir(path, "model.fusion_init")
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise PmmrecError(f"model.fusion_init {path!r}: cannot read a Hugging Face config ({e})") from None
        dim = self.type_embedding.embedding_dim
        expected = {"hidden_size": dim, "num_attention_heads": fusion_heads(dim), "intermediate_size": 4 * dim,
                    "hidden_act": "gelu"}
        for key, want in expected.items():
            got = getattr(config, key, None)
            if got != want:
                raise PmmrecError(f"model.fusion_init {path!r}: {key} is {got!r} but the fusion layer (model.dim "
                                  f"= {dim}) needs {want!r}; use a BERT whose hidden size is model.dim")
        try:
            model = AutoModel.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise PmmrecError(f"model.fusion_init {path!r}: cannot load the model weights ({e})") from None
        layers = getattr(getattr(model, "encoder", None), "layer", None)
        if layers is None:
            raise PmmrecError(f"model.fusion_init {path!r}: {type(model).__name__} has no encoder.layer list; "
                              "expected a BERT-style encoder")
        source = layers[layer].state_dict()
        renamed = {}
        for theirs, ours in _BERT_LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                if f"{theirs}.{kind}" not in source:
                    raise PmmrecError(f"model.fusion_init {path!r}: its layers have no '{theirs}.{kind}'; "
                                      "expected BERT's layer layout")
                renamed[f"{ours}.{kind}"] = source[f"{theirs}.{kind}"]
        self.block.load_state_dict(renamed, strict=True)


class CoAttentionFusion(nn.Module):
    """Co-attention (LXMERT-style, PMMRec's fusion ablation): text attends to image, image attends to text.

    One cross-attention layer per direction (queries from one modality, keys and values from the other, then
    that stream's FFN). Each stream is mean-pooled over its valid tokens, and the two vectors are concatenated
    and projected to D, as the reference code's co-attention does. No type embeddings: the two streams are
    never mixed in one sequence, so there is nothing for them to distinguish.
    """

    def __init__(self, dim: int, dropout: float = 0.1):
        super().__init__()
        self.text_to_image = TransformerBlock(dim, fusion_heads(dim), dropout, activation="gelu", eps=1e-12)
        self.image_to_text = TransformerBlock(dim, fusion_heads(dim), dropout, activation="gelu", eps=1e-12)
        self.out = nn.Linear(2 * dim, dim)
        self.apply(_init_bert_style)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> CoAttentionFusion:
        return cls(cfg.dim, cfg.dropout)

    def forward(self, text: Tensor, text_mask: Tensor, image: Tensor, image_mask: Tensor) -> Tensor:
        """text (N, T, D), text_mask (N, T), image (N, P, D), image_mask (N, P) -> (N, D)."""
        text_valid, image_valid = text_mask != 0, image_mask != 0  # (N, T), (N, P)
        text = text.masked_fill(~text_valid.unsqueeze(-1), 0.0)  # padding cannot leak, even if non-finite
        image = image.masked_fill(~image_valid.unsqueeze(-1), 0.0)
        text_states = self.text_to_image(text, image_valid.unsqueeze(1), context=image)  # (N, T, D)
        image_states = self.image_to_text(image, text_valid.unsqueeze(1), context=text)  # (N, P, D)
        pooled = torch.cat([masked_mean(text_states, text_valid), masked_mean(image_states, image_valid)], dim=-1)
        return self.out(pooled)  # (N, 2D) -> (N, D)
