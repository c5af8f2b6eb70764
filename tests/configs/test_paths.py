"""Where the configs are found: the package's own folder (importlib.resources), or FVLM_CONFIG_DIR."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import configs
from configs.paths import CONFIG_DIR_ENV, config_dir, list_presets, packaged_config_dir, resolve_config


def test_default_is_the_configs_package_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_DIR_ENV, raising=False)
    assert config_dir() == packaged_config_dir() == Path(configs.__file__).parent
    assert (config_dir() / "train" / "fvlm.yaml").is_file()
    assert {"fvlm", "tiny"} <= set(list_presets("train"))


def test_the_environment_variable_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    shutil.copy(packaged_config_dir() / "train" / "tiny.yaml", tmp_path / "train" / "mine.yaml")
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    assert config_dir() == tmp_path
    assert list_presets("train") == ["mine"]
    assert resolve_config("train", "mine") == tmp_path / "train" / "mine.yaml"
    with pytest.raises(FileNotFoundError, match=r"unknown train preset 'tiny'; presets: mine"):
        resolve_config("train", "tiny")


def test_a_missing_override_folder_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'nope'} does not exist \({CONFIG_DIR_ENV}\)"):
        config_dir()
    assert list_presets("train") == []


def test_the_data_files_are_declared_package_data() -> None:
    """pyproject.toml ships every data file of configs/ (the globs cover each suffix and depth in use)."""
    import ast
    import fnmatch
    import re

    text = (Path(configs.__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^include = \[.*"configs".*\]$', text, re.M), "configs is not a package of the wheel"
    globs = ast.literal_eval(re.search(r"^\[tool\.setuptools\.package-data\]\nconfigs = (\[.*\])$", text, re.M)[1])
    folder = packaged_config_dir()
    data = [p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc")]
    missed = [f for f in data if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert data and not missed, f"configs files not shipped as package data: {missed}"
