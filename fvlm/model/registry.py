"""Registries of vision and text encoders, and model presets (``configs/model/*.yaml``).

Encoders are looked up by the ``name`` field of their config section, never by substrings of names:

    @register_vision_encoder("vit3d")
    def _vit3d(cfg: VisionConfig) -> nn.Module: ...

A vision encoder maps (B, C, Z, Y, X) to a :class:`fvlm.model.vision.VisionOutput` and exposes
``patch_size``; a text encoder maps (..., L) token ids and mask to (..., D) normalised embeddings.
``create_model(name_or_config, **overrides)`` builds an :class:`~fvlm.model.fvlm.FVLM`; ``list_models()``
lists the presets.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from anatomy.paths import config_dir, resolve_config
from fvlm.model.config import ModelConfig, ModelConfigError, TextConfig, VisionConfig

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


# ---- model presets ---------------------------------------------------------------------------------------
def list_models() -> list[str]:
    """Names of the model presets under ``configs/model/`` (e.g. ``base``, ``tiny``)."""
    folder = config_dir() / "model"
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_model_config(name_or_config: str | os.PathLike | dict | ModelConfig, **overrides: Any) -> ModelConfig:
    """A :class:`ModelConfig` from a preset name, a YAML path, a mapping or a config, with ``overrides``
    merged in (nested mappings key by key: ``text={"vocab_size": 500}``)."""
    if isinstance(name_or_config, ModelConfig):
        return name_or_config.replace(**overrides) if overrides else name_or_config
    if isinstance(name_or_config, dict):
        return ModelConfig.from_dict(name_or_config, **overrides)
    path = resolve_config("model", name_or_config)
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path}: expected a mapping at the top level")
    data.setdefault("name", Path(path).stem)
    return ModelConfig.from_dict(data, where=str(path), **overrides)


def create_model(name_or_config: str | os.PathLike | dict | ModelConfig, **overrides: Any) -> nn.Module:
    """Build an untrained :class:`~fvlm.model.fvlm.FVLM` from a preset name (``list_models()``), a YAML
    path, a mapping or a :class:`ModelConfig`, with ``overrides`` as in :func:`load_model_config`."""
    from fvlm.model.fvlm import FVLM

    return FVLM(load_model_config(name_or_config, **overrides))
