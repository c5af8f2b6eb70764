"""Every model preset resolves to exactly the config it had before the presets used ``extends:``.

``tests/data/configs/models_resolved.json`` holds ``load_model_config(name).to_dict()`` of every preset,
recorded at commit f05534a (before ``tiny-conv.yaml`` extended ``tiny.yaml``). A preset whose resolved config
changes changes every model built from it: change it on purpose and re-record its entry, never silently.
Re-recorded on purpose since: ``vision.anatomy_channels: 0`` (the option added off; the models are unchanged).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fvlm.model.factory import list_models, load_model_config

SNAPSHOT = json.loads((Path(__file__).parents[1] / "data" / "configs" / "models_resolved.json").read_text())


def test_the_snapshot_covers_every_preset() -> None:
    assert sorted(SNAPSHOT) == list_models()


@pytest.mark.parametrize("name", sorted(SNAPSHOT))
def test_preset_resolves_as_before(name: str) -> None:
    assert load_model_config(name).to_dict() == SNAPSHOT[name]
