"""Dataset extras image_view2 and text_view2 (issue 8): a second augmented view of each crop and a second
phrasing of each anatomy text, deterministic from the extra's own generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anatomy.reports.text import split_sentences
from fvlm.model.tokenizer import train_wordpiece
from pipelines.cases.dataset import SAMPLE_KEYS, CaseDataset
from pipelines.cases.format import corpus_texts
from pipelines.train.extras import list_extras
from pipelines.train.extras.views import DROP_MIN_SENTENCES, rephrase

IMAGE_KEYS = ("image_view2", "anatomy_view2", "cut_view2")
TEXT_KEYS = ("input_ids_view2", "attention_mask_view2")
L = 96


@pytest.fixture(scope="module")
def prep(preprocessed) -> Path:
    """3 synthetic NIfTI cases (seed 5, a quarter normal) preprocessed with the fast config and the masks."""
    return preprocessed(3, 5).prep


@pytest.fixture(scope="module")
def tok(prep: Path):
    return train_wordpiece(corpus_texts(prep), vocab_size=400, max_length=L)


def _ds(prep, tok, mode="resize", extras=("image_view2", "text_view2"), **kw) -> CaseDataset:
    size = (8, 16, 16) if mode == "resize" else (8, 16, 24)
    return CaseDataset(prep, tok, crop_size_zyx=size, mode=mode, max_text_len=L, extras=extras, **kw)


# ------------------------------------------------------------------------------------------ the phrasing


def _sentences(text: str) -> list[str]:
    """The sentences the views split a text into: the report parser's."""
    return [s.text for s in split_sentences(text.strip())]


def test_sentence_split_and_rephrase() -> None:
    assert _sentences("A 3.5 mm nodule.  The liver is normal! Any cyst? No.") == [
        "A 3.5 mm nodule.", "The liver is normal!", "Any cyst?", "No."]
    assert _sentences("") == [] and _sentences("One sentence only.") == ["One sentence only."]
    assert rephrase("One sentence only.", np.random.default_rng(0)) == "One sentence only."
    two = "First is here. Second is there."
    for seed in range(5):  # two sentences: always swapped (never the identity, never dropped)
        assert rephrase(two, np.random.default_rng(seed)) == "Second is there. First is here."
    assert rephrase(two, None) == two  # evaluation: unchanged
    many = "S1 one. S2 two. S3 three. S4 four."
    outs = {rephrase(many, np.random.default_rng(seed)) for seed in range(40)}
    assert len(outs) > 5 and many not in outs
    for o in outs:
        parts = _sentences(o)
        assert set(parts) <= set(_sentences(many)) and len(parts) in (3, 4) and len(set(parts)) == len(parts)
    assert any(len(_sentences(o)) == 3 for o in outs) and any(len(_sentences(o)) == 4 for o in outs)
    assert DROP_MIN_SENTENCES == 3
    # deterministic from the generator
    assert rephrase(many, np.random.default_rng(7)) == rephrase(many, np.random.default_rng(7))


def test_the_views_keep_an_abbreviation_inside_its_sentence() -> None:
    """The report parser's splitter, not a full stop followed by a space: "Approx." ends no sentence."""
    text = "Approx. 3 mm nodule. The liver is normal."
    assert _sentences(text) == ["Approx. 3 mm nodule.", "The liver is normal."]
    for seed in range(5):  # two sentences: swapped whole
        assert rephrase(text, np.random.default_rng(seed)) == "The liver is normal. Approx. 3 mm nodule."
    assert rephrase("Approx. 3 mm nodule.", np.random.default_rng(0)) == "Approx. 3 mm nodule."  # one sentence


# ------------------------------------------------------------------------------------------- the extras


def test_registered_and_shapes_in_both_modes(prep, tok) -> None:
    assert {"image_view2", "text_view2"} <= set(list_extras())
    for mode in ("resize", "crop"):
        ds = _ds(prep, tok, mode)
        s = ds[(0, 1)]
        assert tuple(s)[:len(SAMPLE_KEYS)] == SAMPLE_KEYS and set(s) == set(SAMPLE_KEYS) | set(IMAGE_KEYS + TEXT_KEYS)
        a = ds.num_anatomies
        assert s["image_view2"].shape == s["image"].shape and s["image_view2"].dtype == torch.float32
        assert s["anatomy_view2"].shape == s["anatomy"].shape and s["anatomy_view2"].dtype == torch.int64
        assert s["cut_view2"].shape == (a,) and s["cut_view2"].dtype == torch.bool
        assert s["input_ids_view2"].shape == s["input_ids"].shape == (a, L)
        assert s["attention_mask_view2"].shape == (a, L) and s["input_ids_view2"].dtype == torch.int64
        assert 0.0 <= float(s["image_view2"].min()) and float(s["image_view2"].max()) <= 1.0


def _unflip(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor | None:
    """The flip of x along some axes that equals ref, or None."""
    import itertools

    for k in range(4):
        for dims in itertools.combinations((-3, -2, -1), k):
            y = torch.flip(x, dims) if dims else x
            if torch.equal(y, ref):
                return y
    return None


def test_two_different_views_of_the_same_case_deterministically(prep, tok) -> None:
    ds = _ds(prep, tok)
    for index in range(len(ds)):
        s = ds[(0, index)]
        # the same case: in resize mode the second anatomy map is the first up to flips
        assert _unflip(s["anatomy_view2"], s["anatomy"]) is not None
        assert not torch.equal(s["image_view2"], s["image"])  # the jitter makes them differ, flips or not
        again = ds[(0, index)]
        other = _ds(prep, tok)[(0, index)]  # a fresh dataset (another worker): the same draws
        for k in IMAGE_KEYS + TEXT_KEYS:
            assert torch.equal(again[k], s[k]) and torch.equal(other[k], s[k]), k
    # another epoch draws again
    a, b = ds[(0, 0)], ds[(1, 0)]
    assert not torch.equal(a["image_view2"], b["image_view2"]) or not torch.equal(a["input_ids_view2"],
                                                                                  b["input_ids_view2"])


def test_the_second_phrasing_is_the_same_text_reordered(prep, tok) -> None:
    ds = _ds(prep, tok, extras=("text_view2",))
    changed = checked = 0
    for index in range(len(ds)):
        s = ds[(0, index)]
        case = ds.case_json(index)
        parsed = case["report"]["parsed"]["anatomies"]
        for k, name in enumerate(ds.anatomy_names):
            text = str((parsed.get(name) or {}).get("text") or "")
            n = len(_sentences(text))
            ids, ids2 = s["input_ids"][k], s["input_ids_view2"][k]
            if n < 2:
                assert torch.equal(ids, ids2), name  # nothing to reorder
                continue
            changed += int(not torch.equal(ids, ids2))
            if s["attention_mask"][k].all() or s["attention_mask_view2"][k].all():
                continue  # truncated to L tokens: the tails differ
            words = sorted(ids[s["attention_mask"][k].bool()].tolist())
            words2 = sorted(ids2[s["attention_mask_view2"][k].bool()].tolist())
            checked += 1
            if n < DROP_MIN_SENTENCES:
                assert words == words2, name  # the same tokens, other order
            else:
                assert set(words2) <= set(words), name  # a sentence may be gone, nothing new
    assert changed > 0 and checked > 5


def test_each_extra_alone_and_the_base_sample_unchanged(prep, tok) -> None:
    base = _ds(prep, tok, extras=())[(0, 1)]
    img_only = _ds(prep, tok, extras=("image_view2",))[(0, 1)]
    txt_only = _ds(prep, tok, extras=("text_view2",))[(0, 1)]
    both = _ds(prep, tok)[(0, 1)]
    assert set(img_only) == set(base) | set(IMAGE_KEYS) and set(txt_only) == set(base) | set(TEXT_KEYS)
    for k in base:  # turning extras on never changes the base sample's draws
        assert torch.equal(base[k], img_only[k]) and torch.equal(base[k], txt_only[k]) and torch.equal(base[k], both[k])
    for k in IMAGE_KEYS:  # each extra draws from its own stream: the other one being on changes nothing
        assert torch.equal(img_only[k], both[k])
    for k in TEXT_KEYS:
        assert torch.equal(txt_only[k], both[k])


def test_evaluation_gives_the_evaluation_view_and_the_texts_unchanged(prep, tok) -> None:
    s = _ds(prep, tok, mode="crop", train=False)[0]
    assert torch.equal(s["image_view2"], s["image"]) and torch.equal(s["anatomy_view2"], s["anatomy"])
    assert torch.equal(s["cut_view2"], s["cut"]) and torch.equal(s["input_ids_view2"], s["input_ids"])


def test_the_trainer_turns_them_on_from_the_head_options() -> None:
    from fvlm.model import load_model_config
    from fvlm.model.heads import data_extras_for
    from pipelines.config.recipe import load_recipe
    from pipelines.train.trainer import model_config_for

    cfg = model_config_for(load_recipe("fvlm-uncertainty", ["model.preset=tiny"]))
    assert cfg.heads == {"uncertainty": {"shared": False, "intra_image": True, "intra_text": True,
                                         "text_view": "structured"}}
    assert data_extras_for(cfg) == ("image_view2", "text_view2_structured")  # issue 22: structured reports
    tiny = load_model_config("tiny")
    assert data_extras_for(tiny.replace(heads={"uncertainty": {"intra_image": False}})) == ("text_view2",)
