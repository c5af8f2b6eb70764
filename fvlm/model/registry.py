"""Registries of vision and text encoders.

Encoders are looked up by the ``name`` field of their config section, never by substrings of names:

    @register_vision_encoder("vit3d")
    def _vit3d(cfg: VisionConfig) -> nn.Module: ...

A vision encoder maps (B, C, Z, Y, X) to a :class:`fvlm.model.vision.VisionOutput` and exposes
``patch_size``; a text encoder maps (..., L) token ids and mask to (..., D) normalised embeddings. The model
presets and ``create_model`` live in :mod:`fvlm.model.factory` (the model builds its towers from here, the
factory builds the model).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fvlm.model.config import ModelConfigError, TextConfig, VisionConfig

_VISION: dict[str, Callable[[VisionConfig], nn.Module]] = {}
_TEXT: dict[str, Callable[[TextConfig, int], nn.Module]] = {}


def register_vision_encoder(name: str) -> Callable:
    """Decorator: register ``fn(cfg: VisionConfig) -> nn.Module`` under ``name``."""

    def deco(fn: Callable) -> Callable:
        if name in _VISION:
            raise ValueError(f"vision encoder {name!r} is already registered")
        _VISION[name] = fn
        return fn

    return deco


def register_text_encoder(name: str) -> Callable:
    """Decorator: register ``fn(cfg: TextConfig, embed_dim: int) -> nn.Module`` under ``name``."""

    def deco(fn: Callable) -> Callable:
        if name in _TEXT:
            raise ValueError(f"text encoder {name!r} is already registered")
        _TEXT[name] = fn
        return fn

    return deco


def list_vision_encoders() -> list[str]:
    return sorted(_VISION)


def list_text_encoders() -> list[str]:
    return sorted(_TEXT)


def create_vision_encoder(cfg: VisionConfig) -> nn.Module:
    if cfg.name not in _VISION:
        raise ModelConfigError(f"model.vision: unknown encoder {cfg.name!r}; registered: {', '.join(list_vision_encoders())}")
    return _VISION[cfg.name](cfg)


def create_text_encoder(cfg: TextConfig, embed_dim: int) -> nn.Module:
    if cfg.name not in _TEXT:
        raise ModelConfigError(f"model.text: unknown encoder {cfg.name!r}; registered: {', '.join(list_text_encoders())}")
    return _TEXT[cfg.name](cfg, embed_dim)


@register_vision_encoder("vit3d")
def _vit3d(cfg: VisionConfig) -> nn.Module:
    from fvlm.model.vision import ViT3D

    return ViT3D(cfg)


@register_text_encoder("bert")
def _bert(cfg: TextConfig, embed_dim: int) -> nn.Module:
    from fvlm.model.text import TextTower

    return TextTower(cfg, embed_dim)
