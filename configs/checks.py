"""Reading and checking fvlm's YAML data files (catalogs, grammars, recipes, model sizes).

:func:`read_yaml_mapping` parses one file; :func:`read_config` also follows its ``extends: <parent>`` chain
(the parent's mapping deep-merged under the child's, the child winning), so a recipe states only what differs
from its parent. Each check names where the fault is (``<file>: <entry>``) and raises the loader's own error
class, a subclass of :class:`ConfigError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from configs.paths import config_dir, list_presets


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


#: The key of a YAML file that names its parent (:func:`read_config`).
EXTENDS = "extends"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A new mapping: ``base`` with ``override`` laid over it. Mappings present on both sides merge key by key
    (recursively); any other value of ``override`` (a scalar, a list, ``null``) replaces the base's whole."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _parent_file(child: Path, parent: str, kind: str | None, error: type[ConfigError]) -> Path:
    """The file ``extends: parent`` of ``child`` names: a file path (``.yaml``) relative to the child's folder;
    else ``<name>.yaml`` beside the child, then the preset ``configs/<kind>/<name>.yaml``."""
    if Path(parent).suffix in (".yaml", ".yml"):
        path = child.parent / parent
        if not path.is_file():
            raise error(f"{child}: extends {parent!r}: no such file {path}")
        return path
    candidates = [child.parent / f"{parent}.yaml"]
    if kind:
        candidates.append(config_dir() / kind / f"{parent}.yaml")
    for path in candidates:
        if path.is_file():
            return path
    presets = f"; {kind} presets: {', '.join(list_presets(kind)) or 'none'}" if kind else ""
    raise error(f"{child}: extends {parent!r}: no {parent}.yaml beside it{presets} (or give a path to a YAML file)")


def read_config(
    path: str | Path, kind: str | None = None, error: type[ConfigError] = ConfigError
) -> dict[str, Any]:
    """Parse a YAML mapping and resolve its ``extends:`` chain: the parent's resolved mapping (its own ``name``
    dropped: a name belongs to its file) deep-merged under this file's (:func:`deep_merge`, the child wins).

    ``extends: NAME`` is ``NAME.yaml`` beside the file, else the preset ``configs/<kind>/NAME.yaml``;
    ``extends: FILE.yaml`` is a path relative to the file. An unknown parent, a non-string value or a cycle
    (``a.yaml -> b.yaml -> a.yaml``) raises ``error`` naming the file.
    """
    chain: list[Path] = []
    layers: list[dict[str, Any]] = []
    current = Path(path)
    while True:
        key = current.resolve()
        if key in chain:
            cycle = " -> ".join(str(p) for p in [*chain[chain.index(key):], key])
            raise error(f"{path}: {EXTENDS} forms a cycle: {cycle}")
        chain.append(key)
        data = read_yaml_mapping(current, error)
        parent = data.pop(EXTENDS, None)
        layers.append(data)
        if parent is None:
            break
        if not isinstance(parent, str) or not parent.strip():
            raise error(f"{current}: {EXTENDS} must name a parent preset or YAML file, got {parent!r}")
        current = _parent_file(current, parent.strip(), kind, error)
    merged: dict[str, Any] = {}
    for depth, layer in enumerate(reversed(layers)):
        if depth:
            merged.pop("name", None)
        merged = deep_merge(merged, layer)
    return merged
