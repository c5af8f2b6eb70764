"""Head ``entity_mlm`` and objective ``entity_mlm``: shapes and gradients, image conditioning (an absent anatomy's
text sees no image), tied embeddings, the weighted cross-entropy against a plain reference. The recipes
fvlm-entity / fvlm-entity-disease training on CPU: tests/pipelines/train/test_recipes.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fvlm.losses import create_objective, list_objectives
from fvlm.model import create_model
from fvlm.model.heads import HeadContext, data_extras_for, list_heads

B, A, L, V = 2, 15, 12, 120


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, A, L), generator=g)
    ids[..., 0] = 2
    mask = torch.ones(B, A, L, dtype=torch.long)
    mask[:, :, -3:] = 0  # padding
    z = torch.arange(32).view(-1, 1, 1) * 4 // 32
    y = torch.arange(64).view(1, -1, 1) * 4 // 64
    x = torch.arange(64).view(1, 1, -1) * 4 // 64
    anatomy = ((z * 16 + y * 4 + x) % (A + 1)).expand(32, 64, 64).repeat(B, 1, 1, 1)  # every anatomy present
    sel = (torch.rand(B, A, L, generator=g) < 0.3) & mask.bool()
    sel[..., 0] = False
    sel[:, :, 1] = True
    labels = torch.where(sel, ids, torch.full_like(ids, -100))
    mlm_ids = torch.where(sel, torch.full_like(ids, 4), ids)
    weights = sel.float() * (1 + torch.rand(B, A, L, generator=g))
    return {"image": torch.rand(B, 1, 32, 64, 64, generator=g), "anatomy": anatomy, "input_ids": ids,
            "attention_mask": mask, "mlm_input_ids": mlm_ids, "mlm_labels": labels, "mlm_weights": weights}


def _model(**options):
    torch.manual_seed(0)
    return create_model("tiny", text={"vocab_size": V}, heads={"entity_mlm": options})


def test_registered_and_asks_for_its_dataset_extra() -> None:
    assert "entity_mlm" in list_heads() and "entity_mlm" in list_objectives()
    model = _model()
    assert model.batch_keys == ("mlm_input_ids", "mlm_labels", "mlm_weights")
    assert model.data_extras == ("entity_mlm",) == data_extras_for(model.config)
    assert data_extras_for(_model(extra="my_masking").config) == ("my_masking",)


def test_shapes_and_gradients() -> None:
    model = _model()
    x = _batch()
    out = model(**x)
    m = int((x["mlm_labels"] != -100).sum())
    assert out["mlm_logits"].shape == (m, V) and out["mlm_target"].shape == (m,) == out["mlm_token_weight"].shape
    sel = x["mlm_labels"] != -100
    assert torch.equal(out["mlm_target"], x["input_ids"][sel]) and torch.equal(out["mlm_token_weight"], x["mlm_weights"][sel])
    loss = create_objective("entity_mlm")(**out, **x)["entity_mlm"]
    assert math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    head = model.heads["entity_mlm"]
    for name, p in [*head.named_parameters(), ("word_embeddings", model.text.word_embeddings().weight),
                    ("vision.patch_embed", model.vision.patch_embed.weight),
                    ("pooling", next(model.pooling.parameters()))]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_without_the_batch_fields_the_head_is_silent() -> None:
    model = _model()
    x = {k: v for k, v in _batch().items() if not k.startswith("mlm_")}
    out = model(**x)
    assert not any(k.startswith("mlm_") for k in out)
    with pytest.raises(ValueError, match="entity_mlm head"):
        model(**x, mlm_input_ids=_batch()["mlm_input_ids"])
    with pytest.raises(ValueError, match="add the entity_mlm head"):
        create_objective("entity_mlm")(**out)


def _context(model, x: dict, present: torch.Tensor | None = None) -> HeadContext:
    enc = model.encode_image(x["image"], x["anatomy"], return_context=True)
    mask = enc["anatomy_mask"] if present is None else enc["anatomy_mask"] & present
    text_emb, hidden = model.encode_text(x["input_ids"], x["attention_mask"], return_hidden=True)
    return HeadContext(image=x["image"], anatomy=x["anatomy"], features=enc["features"], tokens=enc["tokens"],
                       grid=enc["grid"], touch=enc["touch"], pooled=enc["pooled"], image_emb=enc["image_emb"],
                       anatomy_mask=mask, input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                       text_hidden=hidden, text_emb=text_emb)


def _logits(model, x: dict, image: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    ctx = _context(model, {**x, "image": image}, present)
    keys = ("mlm_input_ids", "mlm_labels", "mlm_weights")
    return model.heads["entity_mlm"](model, ctx, **{k: x[k] for k in keys})["mlm_logits"]


@pytest.mark.slow
def test_the_text_is_conditioned_on_its_anatomy_image_and_a_masked_anatomy_sees_none() -> None:
    model = _model().eval()
    x = _batch()
    present = torch.ones(B, A, dtype=torch.bool)
    present[:, 3] = False  # anatomy 4 masked (e.g. cut): its text sees only the null token
    with torch.no_grad():
        one = _logits(model, x, x["image"], present)
        two = _logits(model, x, torch.rand_like(x["image"]), present)
    sel = x["mlm_labels"] != -100
    rows = torch.arange(A).expand(B, A).unsqueeze(-1).expand(B, A, L)[sel]  # anatomy of each masked position
    assert torch.allclose(one[rows == 3], two[rows == 3], atol=1e-6)  # no image reached it
    assert not torch.allclose(one[rows != 3], two[rows != 3], atol=1e-4)  # the others read their image
    # visibility: null always; pooled token of the own anatomy; tokens touching it; nothing for the masked one
    ctx = _context(model, x, present)
    _, visible = model.heads["entity_mlm"].memory(ctx)
    n = ctx.touch.shape[-1]
    assert visible.shape == (B, A, 1 + A + n) and visible[..., 0].all()
    assert visible[:, 3, 1:].sum() == 0
    assert torch.equal(visible[:, 5, 1:1 + A], torch.eye(A, dtype=torch.bool)[5].expand(B, A))
    assert torch.equal(visible[:, 5, 1 + A:], ctx.touch[:, 5])


def test_context_none_ignores_the_image() -> None:
    model = _model(context="none").eval()
    x = _batch()
    with torch.no_grad():
        assert torch.allclose(_logits(model, x, x["image"]), _logits(model, x, torch.rand_like(x["image"])), atol=1e-6)


def test_tied_embeddings_hold_no_vocabulary_matrix() -> None:
    tied, untied = _model(), _model(tie_embeddings=False)
    n_tied = sum(p.numel() for p in tied.heads.parameters())
    n_untied = sum(p.numel() for p in untied.heads.parameters())
    assert n_untied - n_tied == V * tied.config.text.hidden_size


def test_objective_matches_a_plain_weighted_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 11, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 11, (7,), generator=g)
    weight = torch.tensor([1.0, 0.1, 1.0, 0.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    got = create_objective("entity_mlm")(mlm_logits=logits, mlm_target=target, mlm_token_weight=weight)["entity_mlm"]
    ref = sum(float(w) * -torch.log_softmax(logits[i].detach(), -1)[target[i]] for i, w in enumerate(weight))
    assert got.item() == pytest.approx(float(ref / weight.sum()), rel=1e-5)
    got.backward()
    assert logits.grad[3].abs().sum() == 0  # zero weight: no gradient
    # changing a zero-weight token's logits does not change the loss
    other = logits.detach().clone()
    other[3] = 5.0
    again = create_objective("entity_mlm")(mlm_logits=other, mlm_target=target, mlm_token_weight=weight)["entity_mlm"]
    assert again.item() == pytest.approx(got.item())
    smooth = create_objective("entity_mlm", label_smoothing=0.1)(mlm_logits=logits, mlm_target=target,
                                                                 mlm_token_weight=weight)["entity_mlm"]
    ce = F.cross_entropy(logits.detach(), target, reduction="none", label_smoothing=0.1)
    assert smooth.item() == pytest.approx(float((ce * weight).sum() / weight.sum()), rel=1e-5)


def test_objective_with_no_masked_token_is_zero_and_keeps_the_graph() -> None:
    logits = torch.zeros(0, 11, requires_grad=True)
    out = create_objective("entity_mlm")(mlm_logits=logits, mlm_target=torch.zeros(0, dtype=torch.long),
                                         mlm_token_weight=torch.zeros(0))["entity_mlm"]
    assert out.item() == 0.0 and out.requires_grad
    out.backward()


@pytest.mark.parametrize("options, words", [({"context": "both"}, "context"), ({"depth": 0}, "depth"),
                                             ({"heads": 5}, "divisible"), ({"colour": 1}, "colour")])
def test_bad_options_are_errors(options: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        _model(**options)


def test_text_attention_is_the_weighted_attention_of_the_masked_words_to_the_anatomy_tokens() -> None:
    from fvlm.model.heads.entity import EntityMLMHead

    # hand-made: 1 sample, 2 anatomies, 3 text tokens, memory = null + 2 pooled + 4 fine entries
    att = torch.zeros(1, 2, 3, 7)
    att[0, 0, 0, 3:] = torch.tensor([0.1, 0.2, 0.3, 0.4])  # token 0: masked, weight 2
    att[0, 0, 1, 3:] = torch.tensor([0.4, 0.0, 0.0, 0.0])  # token 1: masked, weight 1
    att[0, 0, 2, 3:] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # token 2: not masked, ignored
    masked = torch.tensor([[[True, True, False], [False, False, False]]])
    weights = torch.tensor([[[2.0, 1.0, 5.0], [1.0, 1.0, 1.0]]])
    g = EntityMLMHead.text_attention(att, masked, weights, 4)
    want = torch.tensor([0.2 + 0.4, 0.4, 0.6, 0.8]) / 2.4  # 2 * row0 + 1 * row1, normalised
    assert torch.allclose(g[0, 0], want) and torch.all(g[0, 1] == 0)  # nothing masked: zero row

    torch.manual_seed(0)
    model = create_model("tiny", text={"vocab_size": V},
                         heads={"entity_mlm": {}, "masked_reconstruction": {"guide": "text_attention"}})
    x = _batch()
    ctx = _context(model, x)
    model.heads["entity_mlm"](model, ctx, **{k: x[k] for k in ("mlm_input_ids", "mlm_labels", "mlm_weights")})
    g = ctx.extra["text_attention"]  # (B, A, N): where the masked words look, inside their anatomy only
    inside = ctx.touch & ctx.anatomy_mask.unsqueeze(-1)
    assert g.shape == (B, A, 64) and not g.requires_grad
    assert torch.all(g[~inside] == 0) and torch.allclose(g.sum(-1)[ctx.anatomy_mask], torch.ones(()))
    rec = model.heads["masked_reconstruction"]
    out = rec(model, ctx)
    want = rec.token_weights(out["recon_token_mask"], g)  # the loss weights follow the text's attention
    assert torch.allclose(out["recon_token_weight"], want)
