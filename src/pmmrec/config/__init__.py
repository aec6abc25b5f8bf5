"""Typed configuration: a dataclass tree loaded from YAML recipes with dotted command-line overrides.

``load_config("configs/tiny.yaml", ["model.fusion=sum", "train.epochs=3"])`` returns a validated :class:`Config`.
Unknown keys and wrong types are errors that name the file, the line, the key and a close match. Defaults follow
the paper (PMMRec, ICDE 2024) and the reference code; every deviation is commented. The resolved config is
written into every run folder (:func:`dump_config`).
"""

from pmmrec.config.loading import (
    RETIRED_KEYS,
    config_differences,
    config_from_dict,
    config_to_yaml,
    dump_config,
    load_config,
    parse_override,
)
from pmmrec.config.schema import (
    Config,
    DataConfig,
    EvalConfig,
    Fusion,
    Modality,
    ModelConfig,
    NiclConfig,
    NidConfig,
    ObjectivesConfig,
    RclConfig,
    RecConfig,
    RunConfig,
    TextConfig,
    TrainConfig,
    TransferConfig,
    UserEncoderName,
    VisionConfig,
)

__all__ = ["RETIRED_KEYS", "Config", "DataConfig", "EvalConfig", "Fusion", "ModelConfig", "Modality", "NiclConfig",
           "NidConfig", "ObjectivesConfig", "RclConfig", "RecConfig", "RunConfig", "TextConfig", "TrainConfig", "TransferConfig",
           "UserEncoderName", "VisionConfig", "config_differences", "config_from_dict", "config_to_yaml", "dump_config",
           "load_config", "parse_override"]
