"""Where fvlm finds its data files: the ``configs`` package's folder, or ``$FVLM_CONFIG_DIR``.

The YAML and JSON files are package data of :mod:`configs`, so :func:`config_dir` finds them through
:mod:`importlib.resources` whether fvlm runs from a source checkout, an editable install or an installed
wheel. ``FVLM_CONFIG_DIR`` overrides the location with another folder of the same layout
(``<dir>/train/*.yaml``, ``<dir>/model/*.yaml``, ...).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

#: Environment variable naming another configs folder.
CONFIG_DIR_ENV = "FVLM_CONFIG_DIR"


def packaged_config_dir() -> Path:
    """The folder of the :mod:`configs` package (its data files lie beside its modules)."""
    folder = resources.files(__package__ or "configs")
    if not isinstance(folder, Path):  # e.g. a zip import: the loaders open files by path
        raise FileNotFoundError(
            f"fvlm's configs are installed as {folder!r}, not as a folder; set {CONFIG_DIR_ENV} to a copy of "
            f"the repository's configs/ folder"
        )
    return folder


def config_dir() -> Path:
    """The configs folder: ``$FVLM_CONFIG_DIR`` if set, else the :mod:`configs` package's folder."""
    override = os.environ.get(CONFIG_DIR_ENV)
    path = Path(override) if override else packaged_config_dir()
    if not path.is_dir():
        raise FileNotFoundError(
            f"fvlm config folder {path} does not exist"
            + (f" ({CONFIG_DIR_ENV}); point it at a folder laid out as the repository's configs/" if override
               else f"; reinstall fvlm or set {CONFIG_DIR_ENV} to the repository's configs/ folder")
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
