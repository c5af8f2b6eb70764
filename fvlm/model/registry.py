"""Registries of vision and text encoders.

Encoders are looked up by the ``name`` field of their config section, never by substrings of names:

    @register_vision_encoder("vit3d")
    def _vit3d(cfg: VisionConfig) -> nn.Module: ...

A vision encoder maps (B, C, Z, Y, X) to a :class:`fvlm.model.vision.VisionOutput` and exposes
``patch_size``; a text encoder maps (..., L) token ids and mask to (..., D) normalised embeddings. The model
presets and ``create_model`` live in :mod:`fvlm.model.factory` (the model builds its towers from here, the
factory builds the model). Both registries are :class:`fvlm.registry.Registry` instances
(:data:`VISION_ENCODERS`, :data:`TEXT_ENCODERS`); a registered encoder is tested by ``tests/fvlm/test_zoo.py``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fvlm.model.config import ModelConfigError, TextConfig, VisionConfig
from fvlm.registry import Registry

#: name -> fn(cfg: VisionConfig) -> nn.Module
VISION_ENCODERS: Registry[Callable[[VisionConfig], nn.Module]] = Registry(
    "vision encoder", where="model.vision", error=ModelConfigError)
#: name -> fn(cfg: TextConfig, embed_dim: int) -> nn.Module
TEXT_ENCODERS: Registry[Callable[[TextConfig, int], nn.Module]] = Registry(
    "text encoder", where="model.text", error=ModelConfigError)


def register_vision_encoder(name: str, help: str | None = None) -> Callable:
    """Decorator: register ``fn(cfg: VisionConfig) -> nn.Module`` under ``name``."""
    return VISION_ENCODERS.register(name, help=help)


def register_text_encoder(name: str, help: str | None = None) -> Callable:
    """Decorator: register ``fn(cfg: TextConfig, embed_dim: int) -> nn.Module`` under ``name``."""
    return TEXT_ENCODERS.register(name, help=help)


def list_vision_encoders() -> list[str]:
    return VISION_ENCODERS.names()


def list_text_encoders() -> list[str]:
    return TEXT_ENCODERS.names()


def create_vision_encoder(cfg: VisionConfig) -> nn.Module:
    return VISION_ENCODERS.create(cfg.name, cfg)


def create_text_encoder(cfg: TextConfig, embed_dim: int) -> nn.Module:
    return TEXT_ENCODERS.create(cfg.name, cfg, embed_dim)


@register_vision_encoder("vit3d", help="3D ViT: patch embedding, pre-norm transformer blocks, multi-depth tokens")
def _vit3d(cfg: VisionConfig) -> nn.Module:
    from fvlm.model.vision import ViT3D

    return ViT3D(cfg)


@register_text_encoder("bert", help="BERT-family text tower (transformers) with a projection to the embedding")
def _bert(cfg: TextConfig, embed_dim: int) -> nn.Module:
    from fvlm.model.text import TextTower

    return TextTower(cfg, embed_dim)
