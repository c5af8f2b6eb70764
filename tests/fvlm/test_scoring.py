"""Per-recipe zero-shot scoring (issue 22, ``fvlm.scoring``): each recipe scores with what it trained, declared by
its objectives (or, for a bare export, its heads) through the registry; the 2-Wasserstein scorer ranks as
training ranks; the region scorer is the training similarity."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fvlm.losses import create_objective
from fvlm.losses.functional import w2_logits
from fvlm.model import create_model, train_wordpiece
from fvlm.scoring import (ScorerSpec, create_scorer, list_scorers, pair_probability, scorer_spec,
                          wasserstein_logits)
from fvlm.zeroshot import PromptBank

A = 15


def _bank(pos: torch.Tensor, neg: torch.Tensor, anatomy_index=(0,), prompts=None) -> PromptBank:
    t = len(anatomy_index)
    return PromptBank(task_names=tuple(f"t{i}" for i in range(t)), anatomies=tuple(None if i < 0 else "a"
                                                                                    for i in anatomy_index),
                      anatomy_index=tuple(anatomy_index), positive=pos, negative=neg,
                      prompts=prompts or tuple(((f"p{i}.",), (f"n{i}.",)) for i in range(t)), templates="all")


# ------------------------------------------------------------------------------------- the distance


def test_equal_means_different_variances_are_ranked_as_training_ranks_them() -> None:
    """Two cases with the same anatomy mean and different variances; the positive prompt's Gaussian has the
    first case's variance, the negative the second's (same means): the pooled cosine cannot tell them apart,
    the scorer ranks them by the trained -(s c/2) W2^2 logits."""
    d = 8
    mu = F.normalize(torch.randn(d, generator=torch.Generator().manual_seed(0)), dim=0)
    image_mu = mu.expand(2, 1, d).clone()  # (B, A=1, D): equal means
    image_lv = torch.stack([torch.full((1, d), -4.0), torch.full((1, d), 0.5)])  # (B, 1, D)
    prompts = {"pos_mu": mu[None], "pos_lv": torch.full((1, d), -4.0), "neg_mu": mu[None],
               "neg_lv": torch.full((1, d), 0.5)}
    model = SimpleNamespace(logit_scale=lambda: torch.tensor(20.0))
    bank = _bank(mu[None], mu[None])
    feats = {"image_emb": image_mu, "image_logvar": image_lv, "anatomy_mask": torch.ones(2, 1, dtype=torch.bool),
             "global_image_emb": image_mu[:, 0]}
    scorer = create_scorer("wasserstein", distance_scale=0.5)
    got = scorer.score(model, feats, {"bank": bank, **prompts})[:, 0]  # (B,)
    # what training computes: the objective's logits with a = s c / 2
    a = 0.5 * 0.5 * 20.0
    l_pos = w2_logits(image_mu[:, 0], image_lv[:, 0], prompts["pos_mu"], prompts["pos_lv"], a)[:, 0]
    l_neg = w2_logits(image_mu[:, 0], image_lv[:, 0], prompts["neg_mu"], prompts["neg_lv"], a)[:, 0]
    np.testing.assert_allclose(got, torch.sigmoid(l_pos - l_neg).double().numpy(), rtol=1e-6)
    assert got[0] > 0.5 > got[1]  # ranked as training ranks them
    pooled = create_scorer("pooled").score(model, feats, {"bank": bank})[:, 0]
    assert pooled[0] == pytest.approx(pooled[1]) == pytest.approx(0.5)  # the pooled cosine sees a tie


def test_equal_variances_rank_as_the_pooled_cosine() -> None:
    """W2^2 = 2 - 2 cos for unit means and equal variances: the same ranking, the logit gap scaled by c."""
    g = torch.Generator().manual_seed(1)
    d, b = 6, 5
    img = F.normalize(torch.randn(b, 1, d, generator=g), dim=-1)
    pos, neg = (F.normalize(torch.randn(1, d, generator=g), dim=-1) for _ in range(2))
    lv = torch.full((1, d), -2.0)
    logits = wasserstein_logits(img, lv.expand(b, 1, d), torch.tensor([0]),
                                {"pos_mu": pos, "pos_lv": lv, "neg_mu": neg, "neg_lv": lv}, scale=3.0)
    cos_gap = (img[:, 0] @ pos.T - img[:, 0] @ neg.T)[:, 0]  # (B,)
    torch.testing.assert_close(logits["pos"][:, 0] - logits["neg"][:, 0], 2 * 3.0 * cos_gap, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------- on a real tiny model


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece(["lung nodule is present.", "no lung nodule.", "emphysema is seen.", "no emphysema."] * 3,
                           vocab_size=120, min_frequency=1)


def _images(seed: int = 0, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 1, 32, 64, 64, generator=g)
    z = torch.arange(32).view(-1, 1, 1) * 4 // 32
    y = torch.arange(64).view(1, -1, 1) * 4 // 64
    x = torch.arange(64).view(1, 1, -1) * 4 // 64
    anatomy = ((z * 16 + y * 4 + x) % (A + 1)).expand(32, 64, 64).unsqueeze(0).repeat(b, 1, 1, 1)
    anatomy[1][anatomy[1] == 3] = 0  # anatomy index 2 absent in sample 1
    return image, anatomy


@pytest.mark.slow
def test_wasserstein_prompts_are_the_templates_w2_barycentre(tok) -> None:
    torch.manual_seed(0)
    model = create_model("tiny", heads={"uncertainty": {}}, text={"vocab_size": len(tok)}).eval()
    prompts = ((("lung nodule is present.", "lung nodule."), ("no lung nodule.",)),
               (("emphysema is seen.",), ("no emphysema.", "emphysema is absent.")))
    emb = {s: None for pos, neg in prompts for s in (*pos, *neg)}
    with torch.no_grad():
        for s in emb:
            enc = tok([s], padding="max_length", truncation=True, max_length=model.config.text.max_length,
                      return_tensors="pt")
            e, h = model.encode_text(enc["input_ids"], enc["attention_mask"], return_hidden=True)
            emb[s] = (e[0], model.heads["uncertainty"].text_logvar(h[:, 0].unsqueeze(1).expand(-1, A, -1))[0])
    pos = torch.stack([F.normalize(torch.stack([emb[s][0] for s in p]).mean(0), dim=0) for p, _ in prompts])
    neg = torch.stack([F.normalize(torch.stack([emb[s][0] for s in n]).mean(0), dim=0) for _, n in prompts])
    bank = _bank(pos, neg, anatomy_index=(2, 5), prompts=prompts)
    scorer = create_scorer("wasserstein")
    prep = scorer.prepare(model, tok, bank)
    sig = torch.stack([emb[s][1][5].mul(0.5).exp() for s in prompts[1][1]]).mean(0)  # task 1, anatomy 5
    torch.testing.assert_close(prep["neg_lv"][1], 2 * sig.log(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prep["pos_mu"], pos, rtol=1e-5, atol=1e-6)
    image, anatomy = _images()
    scores = scorer.score_images(model, prep, image, anatomy)
    assert scores.shape == (2, 2) and np.isnan(scores[1, 0]) and np.isfinite(scores[0]).all()
    learned = SimpleNamespace(**{**bank.__dict__, "templates": "learned"})
    with pytest.raises(ValueError, match="catalog prompts"):
        scorer.prepare(model, tok, learned)
    with pytest.raises(ValueError, match="'uncertainty' head"):
        scorer.prepare(create_model("tiny", text={"vocab_size": len(tok)}), tok, bank)


@pytest.mark.slow
@pytest.mark.parametrize("pooled_weight", [0.0, 1.0])
def test_region_scores_are_the_training_similarity(tok, pooled_weight: float) -> None:
    """The region scorer's logit gap is s_r (S(pos) - S(neg)) [+ w s (cos_pos - cos_neg)], with S the
    late-interaction similarity region_contrastive trains, recomputed here from a model forward whose anatomy
    texts are the prompts."""
    from fvlm.losses.functional import late_interaction

    torch.manual_seed(2)
    model = create_model("tiny", heads={"region": {"k": 3}}, text={"vocab_size": len(tok)}).eval()
    head = model.heads["region"]
    with torch.no_grad():
        for lin in (head.query, head.key, head.value):
            lin.weight.add_(0.2 * torch.randn_like(lin.weight))
    texts = ("lung nodule is present.", "no lung nodule.")
    a = 4
    image, anatomy = _images(1)
    length = model.config.text.max_length
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    with torch.no_grad():
        emb = model.encode_text(enc["input_ids"], enc["attention_mask"])  # (2, D)
        sims, cos = [], []
        for j in range(2):
            ids = enc["input_ids"][j].expand(2, A, -1).contiguous()
            mask = enc["attention_mask"][j].expand(2, A, -1).contiguous()
            out = model(image, anatomy, ids, mask)
            s, _ = late_interaction(out["region_text"], out["region_text_mask"], out["region_tokens"],
                                    out["region_token_mask"], out["region_temperature"], queries=out["region_query"],
                                    keys=out["region_key"], values=out["region_value"])  # (A, Ni, Nt)
            sims.append(torch.diagonal(s[a]))  # (B,) image i with its own text (both the prompt)
            cos.append(out["image_emb"][:, a] @ emb[j])
    bank = _bank(F.normalize(emb[:1], dim=-1), F.normalize(emb[1:], dim=-1), anatomy_index=(a,),
                 prompts=(((texts[0],), (texts[1],)),))
    scorer = create_scorer("region", pooled_weight=pooled_weight)
    got = scorer.score_images(model, scorer.prepare(model, tok, bank), image, anatomy)[:, 0]
    gap = float(head.logit_scale().detach()) * (sims[0] - sims[1])
    gap = gap + pooled_weight * float(model.logit_scale().detach()) * (cos[0] - cos[1])
    np.testing.assert_allclose(got, torch.sigmoid(gap).double().numpy(), rtol=1e-4)


# ------------------------------------------------------------------------ declared through the registry


@pytest.mark.parametrize("recipe, name, options, words", [
    ("fvlm", "pooled", {}, "anatomy_contrastive"),
    ("fvlm-uncertainty", "wasserstein", {"distance_scale": 1.0}, "W2"),
    ("fvlm-region", "region", {"pooled_weight": 0.0}, "region similarity"),
    ("fvlm-unified", "pooled", {}, "no abnormality"),
    ("fvlm-entity", "pooled", {}, "no image-text similarity"),
])
def test_each_recipe_declares_its_scorer(recipe: str, name: str, options: dict, words: str) -> None:
    from pipelines.config.recipe import load_recipe

    objectives = [create_objective(s.name, **s.options) for s in load_recipe(recipe).objectives]
    spec = scorer_spec(objectives)
    assert (spec.name, spec.options) == (name, options) and words in spec.reason
    create_scorer(spec.name, **spec.options)


def test_region_recipe_option_and_bare_exports_and_errors() -> None:
    obj = create_objective("region_contrastive", zeroshot_pooled_weight=0.5)
    assert scorer_spec([obj]).options == {"pooled_weight": 0.5}
    with pytest.raises(ValueError, match="zeroshot_pooled_weight"):
        create_objective("region_contrastive", zeroshot_pooled_weight=-1)
    # a bare export: the heads declare it
    unc = create_model("tiny", heads={"uncertainty": {}})
    assert scorer_spec([], unc).name == "wasserstein" and scorer_spec([], create_model("tiny")).name == "pooled"
    # two methods with different scorers in one recipe: an error naming both
    with pytest.raises(ValueError, match="more than one zero-shot scorer"):
        scorer_spec([obj, create_objective("uncertainty_contrastive")])
    assert set(list_scorers()) >= {"pooled", "wasserstein", "region"}
    with pytest.raises(ValueError, match="unknown zero-shot scorer 'cosine'"):
        create_scorer("cosine")
    with pytest.raises(ValueError, match=r"zero-shot scorer 'wasserstein': unknown option\(s\) scale"):
        create_scorer("wasserstein", scale=2)
    assert isinstance(scorer_spec([create_objective("supervised")]), ScorerSpec)


def test_pair_probability_is_the_softmax_positive_side() -> None:
    n, p = torch.tensor([0.3, -1.0]), torch.tensor([1.3, 2.0])
    torch.testing.assert_close(pair_probability(n, p), torch.sigmoid(p - n))
