"""The dataset-extras zoo: every registered extra (and every extra factory) is tested the same way, by being
registered (issue 18 item 3; the model, head and objective zoo is ``tests/fvlm/test_zoo.py``).

On a tiny preprocessed cohort, in training (own generator) and in evaluation (no generator), an extra
produces exactly the fields it declared when registered (``register_extra(..., keys=...)``), none of them a
base sample field, with one shape per field across cases (the default collate stacks them). And every model
head's dataset extras produce the batch fields the head reads (``Head.batch_keys``), so a head and its extra
cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fvlm.model import create_model
from fvlm.model.heads import HEADS
from fvlm.model.tokenizer import train_wordpiece
from pipelines.cases.dataset import SAMPLE_KEYS, CaseDataset
from pipelines.cases.format import corpus_texts
from pipelines.train.extras import EXTRA_FACTORIES, EXTRAS, extra_keys, get_extra
from tests.fvlm.test_zoo import HEAD_OPTIONS
from tests.pipelines.preprocess.preprocess_fixtures import preprocessed_cohort

L = 48

#: head batch fields that no dataset extra produces, with the reason
NOT_FROM_EXTRAS = {
    "lesion": "masked_reconstruction's optional lesion guide: fvlm preprocess carries no lesion maps (the head's "
              "module docstring); a pipeline with lesion masks adds the field itself",
}


def _zoo(registry) -> list[str]:
    """Registered names whose object comes from the project's packages (not from a test module)."""
    return [n for n in registry.names() if str(getattr(registry[n], "__module__", "")).split(".")[0] == "pipelines"]


@pytest.fixture(scope="module")
def prep(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's 4-case cohort (``tests/conftest.py``) when there is one, else a 3-case cohort of its own."""
    try:
        return request.getfixturevalue("cohort4").prep
    except pytest.FixtureLookupError:
        return preprocessed_cohort(tmp_path_factory.mktemp("extras-zoo"), cases=3, seed=5)


@pytest.fixture(scope="module")
def tok(prep: Path):
    return train_wordpiece(corpus_texts(prep), vocab_size=400, max_length=L)


def _check(prep: Path, tok, name: str, keys: tuple[str, ...]) -> None:
    for train in (True, False):
        ds = CaseDataset(prep, tok, crop_size_zyx=(8, 16, 16), mode="resize", max_text_len=L, train=train,
                         extras=(name,))
        shapes: dict[str, tuple[int, ...]] = {}
        for i in range(len(ds)):
            sample = ds[i]
            produced = [k for k in sample if k not in SAMPLE_KEYS]
            assert sorted(produced) == sorted(keys), f"extra {name!r} (train={train}) produced {produced}, declared {keys}"
            for k in keys:
                v = sample[k]
                assert isinstance(v, torch.Tensor), f"extra {name!r}: {k} is a {type(v).__name__}, not a tensor"
                assert shapes.setdefault(k, tuple(v.shape)) == tuple(v.shape), \
                    f"extra {name!r}: {k} changes shape between cases ({shapes[k]} and {tuple(v.shape)})"


def test_the_zoo_is_not_empty() -> None:
    assert {"image_view2", "text_view2", "label_text", "entity_mlm", "task_label_mask"} <= set(_zoo(EXTRAS))
    assert {"label_text", "entity_mlm"} <= set(_zoo(EXTRA_FACTORIES))


@pytest.mark.parametrize("name", _zoo(EXTRAS))
def test_extra_produces_its_declared_fields(name: str, prep: Path, tok) -> None:
    keys = extra_keys(name)
    assert keys, f"extra {name!r} declares no fields: register it with keys=(...)"
    assert not set(keys) & set(SAMPLE_KEYS), f"extra {name!r} declares base sample fields"
    _check(prep, tok, name, keys)


@pytest.mark.parametrize("name", _zoo(EXTRA_FACTORIES))
def test_extra_factory_builds_a_producer_of_the_same_fields(name: str, prep: Path, tok) -> None:
    """The factory with no option (its defaults) gives a producer of the base extra's fields."""
    assert callable(EXTRA_FACTORIES.create(name))
    _check(prep, tok, f"{name}?", extra_keys(name))  # "name?" = the factory, no option


@pytest.mark.parametrize("head", [n for n in HEADS.names()
                                  if str(HEADS[n].__module__).split(".")[0] == "fvlm"])
def test_a_heads_extras_produce_the_fields_it_reads(head: str) -> None:
    built = create_model("tiny", text={"vocab_size": 100}, heads={head: dict(HEAD_OPTIONS.get(head, {}))}).heads[head]
    extras = tuple(built.data_extras)
    for extra in extras:
        get_extra(extra)  # registered (or a factory taking those options)
    produced = {k for e in extras for k in extra_keys(e)}
    reads = set(built.batch_keys) - set(NOT_FROM_EXTRAS)
    assert reads <= produced, f"head {head!r} reads {sorted(reads - produced)}, which its extras {extras} do not produce"
