"""Field checks shared by the loaders of fvlm's YAML data files (catalogs, grammars, recipes).

Each check names where the fault is (``<file>: <entry>``) and raises the loader's own error class, a
subclass of :class:`ConfigError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A data file under ``configs/`` (or a user's own) is malformed; the message names file and entry."""


def require(
    where: str, data: dict[str, Any], key: str, kind: type | tuple[type, ...], error: type[ConfigError] = ConfigError
) -> Any:
    """``data[key]``, which must exist and be an instance of ``kind``."""
    if key not in data:
        raise error(f"{where}: missing field {key!r}")
    value = data[key]
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise error(f"{where}: field {key!r} must be a {names}, got {type(value).__name__}")
    return value


def strings(
    where: str, data: dict[str, Any], key: str, required: bool = True, error: type[ConfigError] = ConfigError
) -> tuple[str, ...]:
    """``data[key]`` as a tuple of non-empty strings; a required list must also be non-empty, an optional
    one that is absent gives ``()``."""
    if key not in data and not required:
        return ()
    values = require(where, data, key, list, error)
    if required and not values:
        raise error(f"{where}: field {key!r} is empty")
    for v in values:
        if not isinstance(v, str) or not v.strip():
            raise error(f"{where}: field {key!r} holds {v!r}, expected non-empty strings")
    return tuple(values)


def read_yaml_mapping(path: str | Path, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """Parse a YAML file whose top level must be a mapping; a syntax error or another top level raises
    ``error`` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data
