"""The prompt_context head (learned prompt context) and zero-shot prompts: label sentences, shapes and
gradients, learned prompts that change scores and survive export + load, the structured template set."""

from __future__ import annotations

import pytest
import torch

from anatomy.catalog import load_task_catalog, load_anatomy_set
from fvlm.model import create_model, load_pretrained, save_pretrained, train_wordpiece
from fvlm.model.heads import data_extras_for
from fvlm.prompts import LABEL_MAX_LEN, NO_FINDING, label_sentence, select_prompts, structured_prompts, task_prompts
from fvlm.zeroshot import encode_prompts, score_cases

NAMES = tuple(load_anatomy_set("fvlm15").names)
B, A = 3, 15


@pytest.fixture(scope="module")
def tok():
    catalog = load_task_catalog("fvlm54")
    corpus = [f"{t.title.lower()}. no {t.title.lower()}. no abnormality. " + " ".join(t.structured.sentences())
              for t in catalog.tasks]
    return train_wordpiece(corpus * 3, vocab_size=600, min_frequency=1)


def _model(tok, **opts):
    torch.manual_seed(0)
    return create_model("tiny", anatomy_names=NAMES, text={"vocab_size": len(tok)},
                        heads={"prompt_context": {"n_ctx": 4, **opts}}).eval()


def _batch(g=None):
    g = g or torch.Generator().manual_seed(0)
    return dict(image=torch.rand(B, 1, 32, 64, 64, generator=g), anatomy=torch.randint(0, A + 1, (B, 32, 64, 64), generator=g),
                input_ids=torch.randint(5, 100, (B, A, 8), generator=g), attention_mask=torch.ones(B, A, 8, dtype=torch.long),
                label_input_ids=torch.randint(5, 100, (B, A, LABEL_MAX_LEN), generator=g),
                label_attention_mask=torch.ones(B, A, LABEL_MAX_LEN, dtype=torch.long))


def test_label_sentence_format():
    assert label_sentence(["Emphysema", "Lung nodule"]) == "emphysema, lung nodule."
    assert label_sentence([]) == NO_FINDING == "no abnormality."
    assert label_sentence(["CT  finding"]) == "cT finding."  # only the first letter is lowered
    # issue 22: both prompts are training label sentences (the negative is what a case without findings reads)
    assert task_prompts("Ground-glass opacity") == ("ground-glass opacity.", NO_FINDING)
    assert task_prompts("Emphysema") == (label_sentence(["Emphysema"]), label_sentence([]))


@pytest.mark.parametrize("shared", [True, False])
def test_head_shapes_and_gradient_reaches_the_context(tok, shared):
    model = _model(tok, shared=shared).train()
    head = model.heads["prompt_context"]
    assert tuple(head.context.shape) == ((4, 64) if shared else (A, 4, 64))
    out = model(**_batch())
    assert tuple(out["label_text_emb"].shape) == (B, A, model.config.embed_dim)
    assert torch.allclose(out["label_text_emb"].norm(dim=-1), torch.ones(B, A), atol=1e-5)
    out["label_text_emb"].sum().backward()
    assert head.context.grad is not None and head.context.grad.abs().sum() > 0
    if not shared:  # every anatomy's context is used by its own label sentences
        assert (head.context.grad.abs().sum(dim=(1, 2)) > 0).all()
    # without label sentences (evaluation) the head adds nothing
    plain = {k: v for k, v in _batch().items() if not k.startswith("label_")}
    assert "label_text_emb" not in model(**plain)


def test_the_context_changes_the_label_embedding(tok):
    model = _model(tok, shared=False)
    batch = _batch()
    with torch.no_grad():
        before = model(**batch)["label_text_emb"]
        ctx = model.heads["prompt_context"].context
        ctx[2] += torch.randn(ctx[2].shape, generator=torch.Generator().manual_seed(1))  # anatomy 3 only
        # (not a constant shift: the text tower's embedding LayerNorm would remove it)
        after = model(**batch)["label_text_emb"]
    changed = (before - after).abs().amax(dim=(0, 2)) > 1e-6  # (A,)
    assert changed.tolist() == [i == 2 for i in range(A)]


def test_options_and_data_extras(tok):
    with pytest.raises(ValueError, match="n_ctx"):
        _model(tok, n_ctx=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        _model(tok, n_ctx=100)  # 100 + 48 label tokens > 128 positions of the tiny text tower
    with pytest.raises(ValueError, match="unknown option"):
        _model(tok, width=3)
    assert _model(tok).data_extras == ("label_text",)
    aug = _model(tok, text_augment=True)
    assert aug.data_extras == ("label_text_structured",) == data_extras_for(aug.config)


def test_init_from_phrase_copies_word_embeddings(tok):
    model = _model(tok, shared=False)
    head = model.heads["prompt_context"]
    head.init_from_phrase(model, tok, "emphysema")
    ids = tok("emphysema", add_special_tokens=False)["input_ids"]
    table = model.text.word_embeddings().weight
    assert torch.equal(head.context[5, 0], table[ids[0]])


def _scores(model, tok, learned=True):
    catalog = load_task_catalog("fvlm54")
    bank = encode_prompts(model, tok, catalog, learned=learned)
    g = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(4, A, model.config.embed_dim, generator=g), dim=-1)
    return bank, score_cases(img, torch.ones(4, A, dtype=torch.bool), bank, float(model.logit_scale().detach()))


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False])
def test_learned_prompts_change_scores_and_survive_export(tok, tmp_path, shared):
    model = _model(tok, shared=shared)
    bank, scores = _scores(model, tok)
    assert bank.templates == "learned" and bank.prompts[0] == (("lung nodule.",), (NO_FINDING,))  # issue 22
    assert scores.shape == (4, 54)
    # the catalog prompts give other embeddings than the learned context
    catalog_bank, _ = _scores(model, tok, learned=False)
    assert not torch.allclose(bank.positive, catalog_bank.positive)

    save_pretrained(model, tok, tmp_path / "export")
    loaded, loaded_tok = load_pretrained(tmp_path / "export")
    loaded.eval()
    assert torch.equal(loaded.heads["prompt_context"].context, model.heads["prompt_context"].context)
    bank2, scores2 = _scores(loaded, loaded_tok)
    assert torch.allclose(bank2.positive, bank.positive, atol=1e-6)
    assert abs(scores2 - scores).max() < 1e-6

    with torch.no_grad():
        model.heads["prompt_context"].context.add_(torch.randn_like(model.heads["prompt_context"].context) * 0.5)
    _, perturbed = _scores(model, tok)
    assert abs(perturbed - scores).max() > 1e-4


def test_per_anatomy_context_only_moves_its_anatomys_tasks(tok):
    model = _model(tok, shared=False)
    catalog = load_task_catalog("fvlm54")
    before = encode_prompts(model, tok, catalog, learned=True)
    with torch.no_grad():
        ctx = model.heads["prompt_context"].context
        ctx[NAMES.index("liver")] += torch.randn(ctx.shape[1:], generator=torch.Generator().manual_seed(1))
    after = encode_prompts(model, tok, catalog, learned=True)
    moved = [(before.positive[i] - after.positive[i]).abs().max() > 1e-6 for i in range(len(before))]
    assert moved == [a == "liver" for a in before.anatomies]


def test_learned_prompts_need_the_head(tok):
    torch.manual_seed(0)
    plain = create_model("tiny", anatomy_names=NAMES, text={"vocab_size": len(tok)})
    with pytest.raises(ValueError, match="prompt_context head"):
        encode_prompts(plain, tok, load_task_catalog("fvlm54"), learned=True)


def test_structured_template_set_adds_the_structured_sentences():
    catalog = load_task_catalog("fvlm54")
    t = catalog["emphysema"]
    pos, neg = select_prompts(t, "structured")
    assert pos[:3] == t.prompts.positive and neg[:3] == t.prompts.negative  # the catalog prompts first
    # plus the structured sentences, without repeats (the verdict "Emphysema is present." is a catalog prompt)
    assert pos[3:] == t.structured.sentences()[:3] and "Emphysema is present." in pos[:3]
    assert neg[3:] == ("No emphysema is seen.",) and "Emphysema is not present." in neg[:3]
    assert select_prompts(t, "all") == (t.prompts.positive, t.prompts.negative)  # unchanged
    assert structured_prompts(t)[1] == ("Emphysema is not present.", "No emphysema is seen.")
    # a task without structured fields keeps its catalog prompts under "structured"
    import dataclasses

    from anatomy.catalog import Structured

    bare = dataclasses.replace(t, structured=Structured())
    assert select_prompts(bare, "structured") == (t.prompts.positive, t.prompts.negative)


def test_structured_template_set_encodes(tok):
    model = _model(tok)
    bank = encode_prompts(model, tok, load_task_catalog("fvlm54"), templates="structured")
    assert bank.templates == "structured" and len(bank) == 54
    assert len(bank.prompts[2][0]) == 6  # emphysema: 3 catalog + 3 new structured positives
