"""Issue 22, bug 4 and the empty second phrasing: label sentences count a label with the same threshold as the
targets (``label_threshold``, passed from the recipe through the head to the dataset extra), and text_view2
leaves the texts of a label-only case unattended, as the base sample does. A fake dataset and a tiny
tokenizer: no cohort needed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fvlm.losses import create_objective
from fvlm.model.heads import extra_name, parse_extra_name
from fvlm.model.heads.prompt import PromptContext
from fvlm.prompts import LABEL_MAX_LEN
from fvlm.model.tokenizer import train_wordpiece
from pipelines.train.extras import get_extra
from pipelines.train.extras.labels import label_texts
from pipelines.train.extras.views import text_view2

NAMES = ("lung", "heart")
TASKS = (("emphysema", "lung_nodule"), ("cardiomegaly",))
L = 16


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece(["emphysema lung nodule cardiomegaly no abnormality.", "The lung is clear. No nodule.",
                            "Heart is normal."] * 3, vocab_size=200, min_frequency=1, max_length=L)


def _dataset(tok) -> SimpleNamespace:
    def tokens(texts, length):
        enc = tok(list(texts), padding="max_length", truncation=True, max_length=length, return_attention_mask=True)
        return torch.tensor(enc["input_ids"]), torch.tensor(enc["attention_mask"])

    return SimpleNamespace(anatomy_names=list(NAMES), task_names=[list(t) for t in TASKS], run={}, tokenizer=tok,
                           max_text_len=L, _tokens=tokens)


# ------------------------------------------------------------------------------ bug 4: one threshold


def test_label_sentences_use_the_threshold_of_the_targets(tok) -> None:
    labels = np.array([[0.4, 0.9], [0.2, 0.0]], dtype=np.float32)  # an uncertain emphysema (0.4)
    tasks = ((("Emphysema", ()), ("Lung nodule", ())), (("Cardiomegaly", ()),))
    assert label_texts(labels, tasks) == ["lung nodule.", "no abnormality."]  # default 0.5
    assert label_texts(labels, tasks, threshold=0.3) == ["emphysema, lung nodule.", "no abnormality."]
    # what label_unified binarises with the same threshold names the same findings
    obj = create_objective("label_unified", label_threshold=0.3)
    assert ((torch.from_numpy(labels) > obj.label_threshold)[0].tolist()) == [True, True]


def test_the_head_passes_its_threshold_to_the_extra_and_the_extra_uses_it(tok) -> None:
    cfg = SimpleNamespace(text=SimpleNamespace(hidden_size=8, max_position_embeddings=128), num_anatomies=2)
    assert PromptContext.extras_for({}) == ("label_text",)  # default: the plain extra, names unchanged
    name = PromptContext.extras_for({"label_threshold": 0.3, "text_augment": False})[0]
    assert name == extra_name("label_text", threshold=0.3) and parse_extra_name(name) == ("label_text",
                                                                                          {"threshold": 0.3})
    assert PromptContext(cfg, label_threshold=0.3, text_augment=True).data_extras == (
        extra_name("label_text_structured", threshold=0.3),)
    ds = _dataset(tok)
    labels = torch.tensor([[0.4, 0.0], [0.0, 0.0]])
    sample = {"anatomy_labels": labels}
    out = get_extra(name)(ds, 0, sample, {"report": {"text": "x"}}, None)
    enc = tok(["emphysema.", "no abnormality."], padding="max_length", truncation=True, max_length=LABEL_MAX_LEN)
    assert out["label_input_ids"].tolist() == enc["input_ids"]
    assert getattr(get_extra(name), "allows_label_only", False)
    plain = get_extra("label_text")(ds, 0, sample, {"report": {"text": "x"}}, None)
    assert tok.decode(plain["label_input_ids"][0], skip_special_tokens=True) == "no abnormality."
    with pytest.raises(ValueError, match="takes no options"):
        get_extra("image_view2?k=1")


def test_the_trainer_refuses_a_head_and_objective_that_disagree() -> None:
    from pipelines.train.trainer import check_objective_heads

    spec = SimpleNamespace(name="label_unified")
    config = SimpleNamespace(heads={"prompt_context": {"label_threshold": 0.3}})
    with pytest.raises(ValueError, match=r"label_threshold=0.5 .* label_threshold=0.3"):
        check_objective_heads([(spec, create_objective("label_unified"))], config)
    check_objective_heads([(spec, create_objective("label_unified", label_threshold=0.3))], config)


# ----------------------------------------------------------------- text_view2 of a label-only case


def test_text_view2_of_an_empty_label_only_text_is_unattended(tok) -> None:
    ds = _dataset(tok)
    ids, mask = ds._tokens(["", ""], L)
    assert int(mask.sum()) > 0  # the tokenizer attends [CLS] [SEP] of an empty string
    sample = {"input_ids": ids, "attention_mask": torch.zeros_like(mask)}  # the base sample: no report
    out = text_view2(ds, 0, sample, {"labels": {"emphysema": 1}}, np.random.default_rng(0))
    assert int(out["attention_mask_view2"].sum()) == 0
    # a case with texts keeps its attention
    texts = {"report": {"parsed": {"anatomies": {"lung": {"text": "The lung is clear. No nodule."},
                                                 "heart": {"text": ""}}}}}
    base_ids, base_mask = ds._tokens(["The lung is clear. No nodule.", ""], L)
    out = text_view2(ds, 0, {"input_ids": base_ids, "attention_mask": base_mask}, texts, np.random.default_rng(0))
    assert out["attention_mask_view2"].sum(-1).tolist() == base_mask.sum(-1).tolist()


# -------------------------------------------- structured per-finding sentences as training text (uncertainty)


def test_structured_second_phrasing_states_each_positive_finding() -> None:
    from pipelines.train.extras.views import structured_text

    emph = ("Emphysema", ("Low-attenuation areas are seen.", "Emphysema is observed.", "Emphysema is present."))
    nod = ("Lung nodule", ("A round opacity.", "A nodule is seen.", "A lung nodule is present."))
    plain = ("Other", ())
    text = "Emphysema in both lungs. A nodule in the left lobe."
    assert structured_text(text, [emph, nod, plain], None) == "Emphysema is present. A lung nodule is present."
    seen = set()
    for seed in range(30):
        out = structured_text(text, [emph, nod], np.random.default_rng(seed))
        parts = [p + "." for p in out.rstrip(".").split(". ")]
        assert len(parts) == 2 and sum(p in emph[1] for p in parts) == 1 and sum(p in nod[1] for p in parts) == 1
        seen.add(out)
    assert len(seen) > 4  # fields and order vary
    # no positive task with structured sentences: the reordered report text
    from pipelines.train.extras.views import rephrase

    assert structured_text(text, [plain], None) == text
    assert structured_text(text, [], np.random.default_rng(1)) == rephrase(text, np.random.default_rng(1))


def test_the_head_asks_for_the_structured_extra_and_it_keeps_empty_texts_unattended(tok) -> None:
    from fvlm.model.heads.uncertainty import UncertaintyHead
    from pipelines.train.extras.views import text_view2_structured

    assert UncertaintyHead.extras_for({"text_view": "structured"}) == ("image_view2", "text_view2_structured")
    assert UncertaintyHead.extras_for({}) == ("image_view2", "text_view2")
    with pytest.raises(ValueError, match="text_view must be one of"):
        UncertaintyHead(SimpleNamespace(embed_dim=8, num_anatomies=2), text_view="bullets")
    ds = _dataset(tok)
    ids, mask = ds._tokens(["The lung is clear. No nodule.", ""], L)
    sample = {"input_ids": ids, "attention_mask": mask, "anatomy_labels": torch.tensor([[1.0, 0.0], [0.0, 0.0]])}
    case = {"report": {"parsed": {"anatomies": {"lung": {"text": "The lung is clear. No nodule."}}}}}
    out = get_extra("text_view2_structured")(ds, 0, sample, case, np.random.default_rng(0))
    assert out["attention_mask_view2"].sum(-1).tolist()[1] == int(mask[1].sum())
    label_only = {**sample, "attention_mask": torch.zeros_like(mask)}
    out = text_view2_structured(ds, 0, label_only, {"labels": {"emphysema": 1}}, np.random.default_rng(0))
    assert int(out["attention_mask_view2"].sum()) == 0

