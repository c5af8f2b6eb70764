"""Zero-shot scoring on hand-built embeddings (issue 6, item 1); the report-style default template set and the
text readout ceiling (issue #14 item 4)."""

from __future__ import annotations

import inspect
import math
import re

import numpy as np
import pytest
import torch

from fvlm.prompts import DEFAULT_TEMPLATES, TEMPLATE_SETS, select_prompts
from fvlm.zeroshot import PromptBank, score_cases, score_texts


def _bank(anatomy_index=(0, 1, -1)) -> PromptBank:
    pos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    n = len(anatomy_index)
    return PromptBank(tuple(f"t{i}" for i in range(n)), tuple(None if i < 0 else f"a{i}" for i in anatomy_index),
                      tuple(anatomy_index), pos[:n], neg[:n], tuple(((("p",), ("n",)),) * n), "all")


def test_softmax_over_negative_and_positive_similarities_times_the_scale() -> None:
    c, s = math.cos(0.3), math.sin(0.3)
    image = torch.tensor([[[c, s], [c, s]]])  # (1, 2, 2)
    mask = torch.tensor([[True, True]])
    glob = torch.tensor([[s, c]])
    out = score_cases(image, mask, _bank(), 10.0, global_image_emb=glob)
    sig = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
    # softmax([neg, pos])[pos] = sigmoid(scale * (pos - neg))
    assert out[0, 0] == pytest.approx(sig(10 * (c - s)))
    assert out[0, 1] == pytest.approx(sig(10 * (s - c)))
    assert out[0, 2] == pytest.approx(sig(10 * (s - c)))  # whole study: the global embedding


def test_a_masked_anatomy_gives_nan_never_zero() -> None:
    image = torch.nn.functional.normalize(torch.rand(3, 2, 2), dim=-1)
    mask = torch.tensor([[True, False], [False, True], [True, True]])
    out = score_cases(image, mask, _bank((0, 1)), 5.0)
    assert np.isnan(out[0, 1]) and np.isnan(out[1, 0])
    assert np.isfinite(out[[0, 1, 2], [0, 1, 0]]).all() and np.isfinite(out[2]).all()


def test_whole_study_tasks_need_the_global_embedding() -> None:
    with pytest.raises(ValueError, match="t2"):
        score_cases(torch.zeros(1, 2, 2), torch.ones(1, 2, dtype=torch.bool), _bank(), 1.0)


def test_encode_prompts_averages_templates_and_names_missing_anatomies() -> None:
    from anatomy.catalog import load_task_catalog
    from fvlm.model import create_model, train_wordpiece
    from fvlm.zeroshot import encode_prompts

    catalog = load_task_catalog("fvlm54")
    task = catalog.tasks[0]
    assert select_prompts(task, "release") == ((task.prompts.positive[0],), (task.prompts.negative[0],))
    assert all("present" in p for p in select_prompts(task, "ct-clip")[0])
    texts = [p for t in catalog.tasks for p in (*t.prompts.positive, *t.prompts.negative)]
    tok = train_wordpiece(texts, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = create_model("tiny", text={"vocab_size": 300}).eval()
    bank = encode_prompts(model, tok, catalog, templates="all", tasks=[task.name])
    emb = bank.positive[0]
    assert float(emb.norm()) == pytest.approx(1.0, abs=1e-5)
    ref = torch.nn.functional.normalize(torch.stack([
        model.encode_text(**{k: v for k, v in zip(("input_ids", "attention_mask"),
                                                   (e["input_ids"], e["attention_mask"]))})[0]
        for e in [tok([p], padding="max_length", truncation=True, max_length=model.config.text.max_length,
                      return_tensors="pt") for p in task.prompts.positive]]).mean(0), dim=-1)
    assert torch.allclose(emb, ref, atol=1e-5)
    small = create_model("tiny", num_anatomies=2, anatomy_names=("lung", "heart"), text={"vocab_size": 300}).eval()
    with pytest.raises(ValueError, match="hepatic_cyst \\(liver\\)"):
        encode_prompts(small, tok, catalog)


# ------------------------------------------------------------------ report-style prompts (issue #14 item 4)

_NEGATION = re.compile(r"\b(no|not)\b", re.I)
_NORMAL = re.compile(r"\b(normal|unremarkable|natural)\b", re.I)  # "The lung is normal.": no finding at all


def test_report_is_the_default_template_set_and_the_others_stay_selectable() -> None:
    from anatomy.catalog import load_task_catalog
    from fvlm.zeroshot import encode_prompts

    assert DEFAULT_TEMPLATES == "report" and set(TEMPLATE_SETS) == {"report", "all", "release", "ct-clip", "structured"}
    assert inspect.signature(encode_prompts).parameters["templates"].default == "report"
    assert inspect.signature(select_prompts).parameters["templates"].default == "report"
    task = load_task_catalog("fvlm54")["lung_nodule"]
    assert select_prompts(task) == select_prompts(task, "report")
    assert select_prompts(task, "all") == (task.prompts.positive, task.prompts.negative)
    assert select_prompts(task, "release") == ((task.prompts.positive[0],), (task.prompts.negative[0],))
    with pytest.raises(ValueError, match="report, all, release"):
        select_prompts(task, "reports")


@pytest.mark.parametrize("catalog_name", ["fvlm54", "ct-rate"])
def test_report_template_set_states_and_denies_every_task(catalog_name: str) -> None:
    """Every task gets positives and negatives; every negative negates, no positive does; slots are filled."""
    from anatomy.catalog import load_task_catalog

    catalog = load_task_catalog(catalog_name)
    for task in catalog.tasks:
        anatomy = catalog.anatomy_set[task.anatomy] if task.anatomy else None
        pos, neg = select_prompts(task, "report", anatomy)
        assert pos and neg, task.name
        assert not set(pos) & set(neg), task.name
        for text in (*pos, *neg):
            assert "{" not in text and "}" not in text and "  " not in text, (task.name, text)
            assert text[0].isupper() and text.endswith((".", ")")), (task.name, text)
        assert all(_NEGATION.search(n) or _NORMAL.search(n) for n in neg), (task.name, neg)
        denials = [n for n in neg if _NEGATION.search(n) and not _NORMAL.search(n)]
        assert len(denials) >= 2, (task.name, neg)  # the finding itself is denied, not only "normal" said
        assert not any(_NEGATION.search(p) for p in pos), (task.name, pos)
        # the report style, not the release's "Not x." nor CT-CLIP's "x is not present."
        assert not any(n.startswith("Not ") or "not present" in n for n in neg), (task.name, neg)
        if task.anatomy is None:
            assert not any("normal" in n for n in neg)


def test_report_prompts_read_like_reports() -> None:
    from anatomy.catalog import load_task_catalog

    catalog = load_task_catalog("fvlm54")
    lung = catalog.anatomy_set["lung"]
    pos, neg = select_prompts(catalog["lung_nodule"], "report", lung)
    assert "A 10 mm nodule is observed in the lung." in pos and "There is a nodule in the lung." in pos
    assert "No nodules are seen." in neg and "The lung is normal." in neg
    pos, neg = select_prompts(catalog["pleural_effusion"], "report", lung)
    assert "There is right pleural effusion." in pos and "Pleural effusion is observed." in pos
    assert "No pleural effusion is seen." in neg and "No pleural effusions are seen." not in neg
    pos, neg = select_prompts(catalog["degenerative_spine_changes"], "report", catalog.anatomy_set["bone"])
    assert "Degenerative changes are observed." in pos and "No degenerative changes are seen." in neg
    pos, neg = select_prompts(catalog["emphysema"], "report", lung)
    assert not any(re.search(r"\bemphysematous (is|are|was|were)\b", t, re.I) for t in (*pos, *neg))
    pos, _ = select_prompts(catalog["hepatic_mass"], "report", catalog.anatomy_set["liver"])
    assert not any("(hemangioma?)" in p for p in pos)  # a phrasing's question is dropped
    # the noun names the anatomy: no "There is cardiomegaly in the heart."
    pos, _ = select_prompts(catalog["cardiomegaly"], "report", catalog.anatomy_set["heart"])
    assert not any(p.startswith("There is") and "in the heart" in p for p in pos)


def test_encode_prompts_defaults_to_report_prompts() -> None:
    from anatomy.catalog import load_task_catalog
    from fvlm.model import create_model, train_wordpiece
    from fvlm.zeroshot import encode_prompts

    catalog = load_task_catalog("fvlm54")
    names = ["lung_nodule", "hepatic_cyst"]
    texts = [p for n in names for side in select_prompts(catalog[n], "report") for p in side]
    tok = train_wordpiece(texts, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = create_model("tiny", text={"vocab_size": 300}).eval()
    bank = encode_prompts(model, tok, catalog, tasks=names)
    assert bank.templates == "report"
    assert bank.prompts[1] == select_prompts(catalog["hepatic_cyst"], "report", catalog.anatomy_set["liver"])
    assert bank.prompts[1][0][0] == "A 10 mm simple cyst is observed in the liver."


# ------------------------------------------------------------------ text readout ceiling (issue #14 item 4)


def test_text_ceiling_of_texts_equal_to_the_prompts_is_perfect() -> None:
    """Texts embedded exactly on the positive prompt score above 0.5, those on the negative below: AUC 1."""
    from fvlm.metrics import auc_with_ci

    bank = _bank((0, 1))
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0])
    noise = 0.05 * torch.randn(8, 2, 2, generator=g)
    rows = torch.stack([torch.stack([bank.positive[t] if y else bank.negative[t] for t in range(2)]) for y in labels])
    text = torch.nn.functional.normalize(rows + noise, dim=-1)  # (8, A=2, D=2)
    out = score_texts(text, torch.ones(8, 2, dtype=torch.bool), bank, 10.0)
    assert out.shape == (8, 2) and ((out > 0.5) == labels.bool().numpy()[:, None]).all()
    for t in range(2):
        assert auc_with_ci(labels.numpy(), out[:, t], n_boot=0).auc == 1.0
    # the same formula as the image scores
    np.testing.assert_allclose(out, score_cases(text, torch.ones(8, 2, dtype=torch.bool), bank, 10.0))


def test_text_ceiling_is_nan_without_a_text() -> None:
    bank = _bank()
    text = torch.nn.functional.normalize(torch.rand(3, 2, 2), dim=-1)
    mask = torch.tensor([[True, False], [False, True], [True, True]])
    glob = torch.nn.functional.normalize(torch.rand(3, 2), dim=-1)
    out = score_texts(text, mask, bank, 5.0, glob, torch.tensor([True, False, True]))
    assert np.isnan(out[0, 1]) and np.isnan(out[1, 0]) and np.isnan(out[1, 2])
    assert np.isfinite(out[2]).all() and np.isfinite(out[0, [0, 2]]).all()
    with pytest.raises(ValueError, match="global_text_mask"):
        score_texts(text, mask, bank, 5.0, glob, torch.tensor([True, False]))
