"""Zero-shot scoring on hand-built embeddings (issue 6, item 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fvlm.zeroshot import PromptBank, score_cases


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
    from fvlm.zeroshot import encode_prompts, select_prompts

    catalog = load_task_catalog("fvlm54")
    task = catalog.tasks[0]
    assert select_prompts(task, "release") == ((task.prompts.positive[0],), (task.prompts.negative[0],))
    assert all("present" in p for p in select_prompts(task, "ct-clip")[0])
    texts = [p for t in catalog.tasks for p in (*t.prompts.positive, *t.prompts.negative)]
    tok = train_wordpiece(texts, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = create_model("tiny", text={"vocab_size": 300}).eval()
    bank = encode_prompts(model, tok, catalog, tasks=[task.name])
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
