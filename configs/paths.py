"""Where fvlm finds its data files (``configs/``).

The configs live beside the packages in the source tree (``<root>/configs``). ``FVLM_CONFIG_DIR``
overrides the location, for installs that keep the configs elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Root of the source tree (the folder holding ``anatomy/``, ``fvlm/``, ``pipelines/``, ``configs/``).
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def config_dir() -> Path:
    """The ``configs/`` folder: ``$FVLM_CONFIG_DIR`` if set, else ``<project root>/configs``."""
    override = os.environ.get("FVLM_CONFIG_DIR")
    path = Path(override) if override else PROJECT_ROOT / "configs"
    if not path.is_dir():
        raise FileNotFoundError(
            f"fvlm config folder {path} does not exist; set FVLM_CONFIG_DIR to the repository's configs/ folder"
        )
    return path


def list_presets(kind: str, suffix: str = ".yaml") -> list[str]:
    """The preset names under ``configs/<kind>/`` (file stems with ``suffix``), sorted; [] without the folder."""
    try:
        folder = config_dir() / kind
    except FileNotFoundError:
        return []
    return sorted(p.stem for p in folder.glob(f"*{suffix}"))


def presets_help(kind: str, suffix: str = ".yaml") -> str:
    """``"a, b, c (configs/<kind>/)"`` for a command's help, read from the folder so the list cannot go stale."""
    return f"{', '.join(list_presets(kind, suffix)) or 'none found'} (configs/{kind}/)"


def resolve_config(kind: str, name_or_path: str | os.PathLike) -> Path:
    """Resolve a preset name (``fvlm15``) or a file path to a YAML file under ``configs/<kind>/``.

    A value that names an existing file is taken as that file; otherwise it is looked up as
    ``configs/<kind>/<name>.yaml``. The error lists the presets that exist.
    """
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise FileNotFoundError(f"{kind} config file {candidate} does not exist")
        return candidate
    folder = config_dir() / kind
    path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        presets = list_presets(kind)
        raise FileNotFoundError(
            f"unknown {kind} preset {str(name_or_path)!r}; presets: {', '.join(presets) or 'none'} "
            f"(or pass a path to a YAML file)"
        )
    return path
