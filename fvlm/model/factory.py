"""Model presets (``configs/model/*.yaml``) and the model factory: ``create_model(name_or_config,
**overrides)`` builds an :class:`~fvlm.model.fvlm.FVLM`, ``list_models()`` lists the presets.

Apart from :mod:`fvlm.model.registry` (the encoder registries the model builds its towers from), so that the
model file imports the registry and this module imports the model, never the reverse.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from configs.checks import read_config
from configs.paths import list_presets, resolve_config
from fvlm.model.config import ModelConfig, ModelConfigError
from fvlm.model.fvlm import FVLM

__all__ = ["create_model", "list_models", "load_model_config"]


def list_models() -> list[str]:
    """Names of the model presets under ``configs/model/`` (e.g. ``base``, ``tiny``)."""
    return list_presets("model")


def load_model_config(name_or_config: str | os.PathLike | dict | ModelConfig, **overrides: Any) -> ModelConfig:
    """A :class:`ModelConfig` from a preset name, a YAML path (``extends: PARENT`` followed), a mapping or a
    config, with ``overrides`` merged in (nested mappings key by key: ``text={"vocab_size": 500}``)."""
    if isinstance(name_or_config, ModelConfig):
        return name_or_config.replace(**overrides) if overrides else name_or_config
    if isinstance(name_or_config, dict):
        return ModelConfig.from_dict(name_or_config, **overrides)
    path = resolve_config("model", name_or_config)
    data = read_config(path, "model", ModelConfigError)
    data.setdefault("name", Path(path).stem)
    return ModelConfig.from_dict(data, where=str(path), **overrides)


def create_model(name_or_config: str | os.PathLike | dict | ModelConfig, **overrides: Any) -> FVLM:
    """Build an untrained :class:`~fvlm.model.fvlm.FVLM` from a preset name (``list_models()``), a YAML
    path, a mapping or a :class:`ModelConfig`, with ``overrides`` as in :func:`load_model_config`."""
    return FVLM(load_model_config(name_or_config, **overrides))
