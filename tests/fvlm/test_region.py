"""The ``region`` head and the ``region_contrastive`` objective (issue 9): top-k selection inside the anatomy only,
straight-through gradients to the scorer, late interaction against a looped reference, the objective against
``disease_aware`` in the single-region single-token case. The recipes training on CPU:
tests/pipelines/train/test_recipes.py."""

from __future__ import annotations

import math

import pytest
import torch

from fvlm.losses import create_objective
from fvlm.losses.functional import late_interaction
from fvlm.model import create_model
from fvlm.model.heads import HeadContext
from fvlm.model.heads.region import select_topk

B, A, L = 4, 15, 10


def _batch(seed: int = 0, b: int = B) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (b, A, L), generator=g)
    ids[..., 0] = 2
    mask = torch.ones(b, A, L, dtype=torch.long)
    mask[..., 7:] = 0
    return {"image": torch.rand(b, 1, 32, 64, 64, generator=g),
            "anatomy": torch.randint(0, A + 1, (b, 32, 64, 64), generator=g),
            "input_ids": ids, "attention_mask": mask}


def _fields(seed: int = 0, b: int = B) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 100)
    normal = torch.rand(b, A, generator=g) < 0.3
    normal[0] = False
    return {"case_id": torch.arange(b), "text_id": torch.randint(0, 3, (b, A), generator=g), "normal": normal,
            "anatomy_labels": (torch.rand(b, A, 3, generator=g) < 0.3).float()}


# ------------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize("k", [1, 3, 8])
def test_topk_keeps_min_k_touching_tokens_inside_the_anatomy(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    scores = torch.randn(3, 4, 20, generator=g)
    touch = torch.rand(3, 4, 20, generator=g) < 0.3
    touch[0, 0] = False  # an absent anatomy
    touch[1, 1] = False
    touch[1, 1, [2, 5]] = True  # fewer than k touching tokens (for k > 2)
    scores[touch.logical_not()] += 100.0  # tokens outside the anatomy score highest: still never kept
    probs, weights, index, keep = select_topk(scores, touch, k)
    hard = torch.zeros_like(scores).scatter(-1, index, keep.float())
    assert torch.equal(weights, hard)  # forward: exactly the 0/1 kept set
    assert torch.equal(hard.sum(-1), torch.minimum(touch.sum(-1), torch.tensor(k)).float())
    assert not (hard.bool() & ~touch).any()
    # the kept ones are the best-scoring touching tokens
    for b in range(3):
        for a in range(4):
            inside = touch[b, a].nonzero().flatten()
            best = inside[scores[b, a, inside].argsort(descending=True)[:k]]
            assert set(best.tolist()) == set(index[b, a][keep[b, a]].tolist())
    # the selection distribution lives on the anatomy's tokens
    assert torch.equal(probs > 0, touch)
    present = touch.any(-1)
    assert torch.allclose(probs.sum(-1)[present], torch.ones(int(present.sum())))
    assert torch.equal(probs.sum(-1)[~present], torch.zeros(int((~present).sum())))


def test_straight_through_weights_pass_the_softmax_gradient() -> None:
    scores = torch.randn(1, 1, 6, dtype=torch.float64, requires_grad=True)
    touch = torch.tensor([[[True, True, False, True, True, True]]])
    _, weights, _, _ = select_topk(scores, touch, 2)
    coef = torch.arange(6, dtype=torch.float64)
    (weights * coef).sum().backward()
    ref = scores.detach().clone().requires_grad_(True)
    p = torch.softmax(ref.masked_fill(~touch, -math.inf), dim=-1)
    (p * coef).sum().backward()
    assert torch.allclose(scores.grad, ref.grad) and scores.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------- similarity


def test_late_interaction_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(3)
    ni, nt, a, length, k, d = 3, 2, 2, 4, 3, 5
    text = torch.nn.functional.normalize(torch.randn(nt, a, length, d, generator=g, dtype=torch.float64), dim=-1)
    regions = torch.nn.functional.normalize(torch.randn(ni, a, k, d, generator=g, dtype=torch.float64), dim=-1)
    tmask = torch.rand(nt, a, length, generator=g) < 0.7
    rmask = torch.rand(ni, a, k, generator=g) < 0.7
    rmask[0, 1] = False  # image 0 keeps nothing of anatomy 1
    tmask[1, 0] = False  # text 1 of anatomy 0 is empty
    tau = 0.2
    sim, defined = late_interaction(text, tmask, regions, rmask, tau)
    assert sim.shape == (a, ni, nt)
    for aa in range(a):
        for i in range(ni):
            for j in range(nt):
                kept = [r for r in range(k) if rmask[i, aa, r]]
                toks = [t for t in range(length) if tmask[j, aa, t]]
                if not kept or not toks:
                    assert not defined[aa, i, j] and sim[aa, i, j] == 0
                    continue
                total = 0.0
                for t in toks:
                    c = torch.stack([text[j, aa, t] @ regions[i, aa, r] for r in kept])
                    total += float((torch.softmax(c / tau, 0) * c).sum())
                assert defined[aa, i, j]
                assert sim[aa, i, j].item() == pytest.approx(total / len(toks), abs=1e-12)


def test_late_interaction_with_learned_projections_matches_a_loop() -> None:
    """Issue 22: alpha = softmax(<q_l, k_r> / tau), S = mean_l <t_l, sum_r alpha_lr u_r>; with q = t, k = u = v it
    is the parameter-free attention above."""
    g = torch.Generator().manual_seed(4)
    ni, nt, a, length, k, d = 2, 3, 2, 4, 3, 5
    text = torch.nn.functional.normalize(torch.randn(nt, a, length, d, generator=g, dtype=torch.float64), dim=-1)
    regions = torch.nn.functional.normalize(torch.randn(ni, a, k, d, generator=g, dtype=torch.float64), dim=-1)
    q, key, val = (torch.randn(*x.shape, generator=g, dtype=torch.float64) for x in (text, regions, regions))
    tmask = torch.rand(nt, a, length, generator=g) < 0.8
    rmask = torch.rand(ni, a, k, generator=g) < 0.8
    rmask[:, :, 0] = True
    tmask[:, :, 0] = True
    tau = 0.3
    sim, _ = late_interaction(text, tmask, regions, rmask, tau, queries=q, keys=key, values=val)
    for aa in range(a):
        for i in range(ni):
            for j in range(nt):
                kept = [r for r in range(k) if rmask[i, aa, r]]
                toks = [t for t in range(length) if tmask[j, aa, t]]
                total = 0.0
                for t in toks:
                    alpha = torch.softmax(torch.stack([q[j, aa, t] @ key[i, aa, r] for r in kept]) / tau, 0)
                    z = sum(alpha[n] * val[i, aa, r] for n, r in enumerate(kept))
                    total += float(text[j, aa, t] @ z)
                assert sim[aa, i, j].item() == pytest.approx(total / len(toks), abs=1e-12)
    plain, _ = late_interaction(text, tmask, regions, rmask, tau)
    same, _ = late_interaction(text, tmask, regions, rmask, tau, queries=text, keys=regions, values=regions)
    assert torch.allclose(plain, same, atol=1e-12)
    with pytest.raises(ValueError, match="queries must be shaped like text"):
        late_interaction(text, tmask, regions, rmask, tau, queries=q[:, :, :2])


# ------------------------------------------------------------------------------------------------ head


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tiny", heads={"region": {"k": 4}})


def test_head_outputs_shapes_and_localisation_fields(model) -> None:
    batch = _batch()
    out = model(**batch)
    n, k, d = 64, 4, model.heads["region"].dim
    shapes = {"region_weights": (B, A, n), "region_probs": (B, A, n), "region_attention": (B, A, n),
              "region_tokens": (B, A, k, d), "region_token_mask": (B, A, k), "region_text": (B, A, L, d),
              "region_text_mask": (B, A, L), "region_emb": (B, A, d), "region_logit_scale": (),
              "region_temperature": ()}
    for key, shape in shapes.items():
        assert tuple(out[key].shape) == shape, key
    enc = model.encode_image(batch["image"], batch["anatomy"], return_context=True)
    touch = enc["touch"] & enc["anatomy_mask"].unsqueeze(-1)
    kept = out["region_weights"].detach()
    assert torch.equal(kept.sum(-1), touch.sum(-1).clamp(max=k).float())
    assert not (kept.bool() & ~touch).any()
    # the own text's attention: a distribution over the kept tokens of each present anatomy
    att = out["region_attention"].detach()
    assert not ((att > 0) & ~kept.bool()).any()
    present = touch.any(-1)
    assert torch.allclose(att.sum(-1)[present], torch.ones(int(present.sum())), atol=1e-5)
    assert torch.equal(out["region_emb"][~present], torch.zeros_like(out["region_emb"][~present]))


def test_head_leaves_its_weights_for_later_heads(model) -> None:
    batch = _batch(1, b=2)
    enc = model.encode_image(batch["image"], batch["anatomy"], return_context=True)
    emb, hidden = model.encode_text(batch["input_ids"], batch["attention_mask"], return_hidden=True)
    ctx = HeadContext(image=batch["image"], anatomy=batch["anatomy"], features=enc["features"], tokens=enc["tokens"],
                      grid=enc["grid"], touch=enc["touch"], pooled=enc["pooled"], image_emb=enc["image_emb"],
                      anatomy_mask=enc["anatomy_mask"], input_ids=batch["input_ids"],
                      attention_mask=batch["attention_mask"], text_hidden=hidden, text_emb=emb)
    out = model.heads["region"](model, ctx)
    assert ctx.extra["region_weights"] is out["region_weights"]
    assert ctx.extra["region_attention"] is out["region_attention"]


@pytest.mark.parametrize("disease_pairs", [True, False])
def test_region_contrastive_gradients_reach_the_scorer(model, disease_pairs: bool) -> None:
    model.zero_grad()
    out = model(**_batch(2))
    loss = create_objective("region_contrastive", disease_pairs=disease_pairs)(**out, **_fields(2))
    (value,) = loss.values()
    assert torch.isfinite(value) and value > 0
    value.backward()
    head = model.heads["region"]
    for name in ("score_in.weight", "score_out.weight", "score_anatomy", "region_proj.weight", "text_proj.weight",
                 "logit_scale.log_scale", "query.weight", "key.weight", "value.weight"):
        grad = head.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_one_region_one_token_equals_disease_aware() -> None:
    """With one kept region and one text token per anatomy, S_ij = <t_j, v_i>: the objective is disease_aware on
    those vectors (targets, masking and reduction reused), for both target sets."""
    g = torch.Generator().manual_seed(5)
    b, a, d = 6, 3, 4
    v = torch.nn.functional.normalize(torch.randn(b, a, 1, d, generator=g, dtype=torch.float64), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(b, a, 1, d, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.rand(b, a, generator=g) < 0.8
    fields = {"case_id": torch.tensor([0, 1, 2, 2, 3, 4]), "text_id": torch.randint(0, 3, (b, a), generator=g),
              "normal": torch.rand(b, a, generator=g) < 0.4,
              "anatomy_labels": (torch.rand(b, a, 2, generator=g) < 0.5).double()}
    fields["normal"][0] = False
    scale = torch.tensor(7.0, dtype=torch.float64)
    out = {"anatomy_mask": mask, "region_tokens": v, "region_token_mask": torch.ones(b, a, 1, dtype=torch.bool),
           "region_text": t, "region_text_mask": torch.ones(b, a, 1, dtype=torch.bool), "region_logit_scale": scale,
           "region_temperature": torch.tensor(0.1, dtype=torch.float64)}
    pooled = {"image_emb": v[:, :, 0], "text_emb": t[:, :, 0], "anatomy_mask": mask, "logit_scale": scale}
    for disease_pairs, ref in ((True, "disease_aware"), (False, "anatomy_contrastive")):
        got = create_objective("region_contrastive", disease_pairs=disease_pairs)(**out, **fields)["region_contrastive"]
        want = create_objective(ref)(**pooled, **fields)[ref]
        assert got.item() == pytest.approx(want.item(), abs=1e-12)
        assert got.item() > 0


def test_missing_head_outputs_name_the_head() -> None:
    out = {"image_emb": torch.zeros(2, A, 8), "text_emb": torch.zeros(2, A, 8),
           "anatomy_mask": torch.ones(2, A, dtype=torch.bool), "logit_scale": torch.tensor(10.0)}
    with pytest.raises(ValueError, match="region head"):
        create_objective("region_contrastive")(**out, **_fields(0, b=2))


def test_nothing_kept_gives_a_zero_with_a_graph(model) -> None:
    model.zero_grad()
    batch = _batch(3)
    batch["anatomy"] = torch.zeros_like(batch["anatomy"])  # no anatomy anywhere
    out = model(**batch)
    (value,) = create_objective("region_contrastive")(**out, **_fields(3)).values()
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert model.heads["region"].text_proj.weight.grad is not None


@pytest.mark.parametrize("options, words", [({"k": 0}, "k must"), ({"layer": 7}, "layer 7"),
                                             ({"attn_temperature": 0}, "temperatures"), ({"colour": 1}, "colour")])
def test_bad_options_are_errors(options: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        create_model("tiny", heads={"region": options})
