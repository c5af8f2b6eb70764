"""YAML reading with ``extends:``: deep merge (the child wins), parents by name or path, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from configs.checks import ConfigError, deep_merge, read_config


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_deep_merge_merges_mappings_and_replaces_the_rest() -> None:
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1, "c": {"z": 1}}
    child = {"a": {"y": [3]}, "c": None, "d": 2}
    assert deep_merge(base, child) == {"a": {"x": 1, "y": [3]}, "b": 1, "c": None, "d": 2}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1, "c": {"z": 1}}  # inputs untouched


def test_a_chain_of_parents_resolves_child_last(tmp_path: Path) -> None:
    _write(tmp_path, "root.yaml", "name: root\nseed: 1\noptim: {lr: 1.0e-4, epochs: 20}\nlist: [1, 2]\n")
    _write(tmp_path, "mid.yaml", "extends: root\noptim: {lr: 3.0e-4}\n")
    leaf = _write(tmp_path, "leaf.yaml", "extends: mid.yaml\nlist: [3]\n")
    assert read_config(leaf) == {"seed": 1, "optim": {"lr": 3e-4, "epochs": 20}, "list": [3]}  # root's name dropped


def test_a_parent_may_be_a_shipped_preset(tmp_path: Path) -> None:
    mine = _write(tmp_path, "mine.yaml", "extends: tiny\nseed: 7\n")
    data = read_config(mine, "train")
    assert data["seed"] == 7 and data["model"]["preset"] == "tiny" and "extends" not in data


def test_an_unknown_parent_names_the_file_and_the_presets(tmp_path: Path) -> None:
    mine = _write(tmp_path, "mine.yaml", "extends: fvlmm\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: extends 'fvlmm': no fvlmm\.yaml beside it; train presets: "):
        read_config(mine, "train")
    with pytest.raises(ConfigError, match=r"mine\.yaml: extends 'x\.yaml': no such file"):
        read_config(_write(tmp_path, "mine.yaml", "extends: x.yaml\n"))
    with pytest.raises(ConfigError, match=r"mine\.yaml: extends must name a parent"):
        read_config(_write(tmp_path, "mine.yaml", "extends: [a]\n"))


def test_a_cycle_is_an_error_naming_the_files(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", "extends: b\n")
    _write(tmp_path, "b.yaml", "extends: a\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: extends forms a cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        read_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        read_config(_write(tmp_path, "self.yaml", "extends: self\n"))


def test_the_loader_error_class_is_raised(tmp_path: Path) -> None:
    class MyError(ConfigError):
        pass

    with pytest.raises(MyError, match="no such file"):
        read_config(_write(tmp_path, "a.yaml", "extends: missing.yaml\n"), error=MyError)
