"""Modality encoders: pretrained text and vision models turning titles and images into token states (PMMRec §III-A)."""

from pmmrec.models.encoders.freeze import freeze_all_but_top_k
from pmmrec.models.encoders.image import VisionEncoder, build_vision_encoder
from pmmrec.models.encoders.text import TextEncoder, build_text_encoder

__all__ = ["TextEncoder", "VisionEncoder", "build_text_encoder", "build_vision_encoder", "freeze_all_but_top_k"]
