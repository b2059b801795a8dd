"""Encoders: one factory for vision encoders (:func:`create_encoder`) and one for text encoders.

>>> enc = create_encoder("efficientnet_lite0")          # offline ImageNet weights, 1280-d
>>> x = enc.preprocess(patches_uint8_nhwc); z = enc(x)  # (B, 1280)

Every vision encoder is a :class:`VisionEncoder` with ``name``, ``embed_dim``, ``weights_id``, ``pretrained``,
``mean``, ``std``, ``input_px``, ``preprocess`` and ``forward``.
"""
from __future__ import annotations

from typing import Any

from histomoe_core.encoders.base import RANDOM_INIT, RandomInitWarning, VisionEncoder
from histomoe_core.encoders.text import (
    TEXT_ENCODERS, TextEncoder, create_text_encoder, list_text_encoders, metadata_text,
)
from histomoe_core.encoders.vision import ENCODERS, EncoderError, hub_encoder, timm_encoder

#: the offline pretrained default
DEFAULT_ENCODER = "efficientnet_lite0"


def create_encoder(name: str = DEFAULT_ENCODER, **kwargs: Any) -> VisionEncoder:
    """Build a vision encoder by name: a registered one (``list_encoders()``), ``hf-hub:org/name``, or any
    timm architecture (random init, with a :class:`RandomInitWarning`). Keyword options go to its factory."""
    if name.startswith("hf-hub:"):
        return hub_encoder(name, **kwargs)
    if name in ENCODERS:
        return ENCODERS.create(name, **kwargs)
    return timm_encoder(name, **kwargs)


def list_encoders() -> list[str]:
    """Registered encoder names (any timm architecture and ``hf-hub:`` names work too)."""
    return ENCODERS.list()


__all__ = [
    "create_encoder", "list_encoders", "create_text_encoder", "list_text_encoders", "metadata_text",
    "VisionEncoder", "TextEncoder", "RandomInitWarning", "EncoderError", "ENCODERS", "TEXT_ENCODERS",
    "RANDOM_INIT", "DEFAULT_ENCODER",
]
