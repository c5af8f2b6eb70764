"""Every training recipe resolves to exactly the config it had before the recipes used ``extends:``.

``tests/data/configs/recipes_resolved.json`` holds ``load_recipe(name).to_dict()`` of every recipe, recorded at
commit f05534a (before configs/train/*.yaml were rewritten to state only what differs from their parent). A
recipe whose resolved config changes changes what a run trains, so the benchmarks' figures would move: change
the recipe on purpose and re-record its entry, never silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from configs.paths import list_presets
from pipelines.config.recipe import load_recipe

SNAPSHOT = json.loads((Path(__file__).parents[2] / "data" / "configs" / "recipes_resolved.json").read_text())


def test_the_snapshot_covers_every_recipe() -> None:
    assert sorted(SNAPSHOT) == list_presets("train")


@pytest.mark.parametrize("name", sorted(SNAPSHOT))
def test_recipe_resolves_as_before(name: str) -> None:
    assert load_recipe(name).to_dict() == SNAPSHOT[name]


def test_recipes_state_only_what_differs() -> None:
    """Every recipe but the base extends another one."""
    from configs.checks import read_yaml_mapping
    from configs.paths import config_dir

    folder = config_dir() / "train"
    roots = [n for n in list_presets("train") if "extends" not in read_yaml_mapping(folder / f"{n}.yaml")]
    assert roots == ["fvlm"]
