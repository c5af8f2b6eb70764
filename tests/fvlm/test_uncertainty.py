"""Probabilistic anatomy embeddings (issue 8): the ``uncertainty`` head, the 2-Wasserstein similarity against
its closed form, the ``uncertainty_contrastive`` objective (targets, terms, gradients, errors) and the variance
regulariser on a toy problem."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fvlm.losses import AnatomyContrastive, DiseaseAware, create_objective
from fvlm.losses.functional import symmetric_soft_contrastive, w2_logits, wasserstein2_sq
from fvlm.losses.uncertainty import kl_to_prior
from fvlm.model import create_model, load_pretrained, save_pretrained
from fvlm.model.heads import create_head, data_extras_for

A = 15
SHAPE = (32, 64, 64)
VIEW_OUTPUTS = ("image_emb_view2", "image_logvar_view2", "anatomy_mask_view2", "text_emb_view2", "text_logvar_view2")


# ------------------------------------------------------------------------------------------------ the head


def _inputs(b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.arange(SHAPE[0]).view(-1, 1, 1) * 4 // SHAPE[0]
    y = torch.arange(SHAPE[1]).view(1, -1, 1) * 4 // SHAPE[1]
    x = torch.arange(SHAPE[2]).view(1, 1, -1) * 4 // SHAPE[2]
    anatomy = ((z * 16 + y * 4 + x) % (A + 1)).expand(*SHAPE).unsqueeze(0).repeat(b, 1, 1, 1)  # (B, Z, Y, X)
    anatomy[0][anatomy[0] == 3] = 0  # anatomy 3 absent in sample 0
    ids = torch.randint(5, 90, (b, A, 8), generator=g)
    return {"image": torch.rand(b, 1, *SHAPE, generator=g), "anatomy": anatomy, "input_ids": ids,
            "attention_mask": torch.ones_like(ids)}


def _views(inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    b = inp["image"].shape[0]
    return {"image_view2": inp["image"].flip(-1) * 0.9, "anatomy_view2": inp["anatomy"].flip(-1),
            "cut_view2": torch.zeros(b, A, dtype=torch.bool), "input_ids_view2": inp["input_ids"].flip(-1),
            "attention_mask_view2": inp["attention_mask"]}


def _batch_fields(b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    normal = torch.rand(b, A, generator=g) < 0.4
    normal[0] = False
    labels = (torch.rand(b, A, 3, generator=g) < 0.5).float() * (~normal).unsqueeze(-1)
    return {"case_id": torch.arange(b), "text_id": torch.randint(0, 3, (b, A), generator=g), "normal": normal,
            "anatomy_labels": labels}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tiny", heads={"uncertainty": {}}, text={"vocab_size": 100})


def test_head_output_shapes_with_and_without_views(model) -> None:
    inp = _inputs()
    head = model.heads["uncertainty"]
    assert model.batch_keys == ("image_view2", "anatomy_view2", "cut_view2", "input_ids_view2", "attention_mask_view2")
    assert model.data_extras == ("image_view2", "text_view2")
    with torch.no_grad():
        plain = model(**inp)
        both = model(**inp, **_views(inp))
    d = model.config.embed_dim
    for out in (plain, both):
        assert out["image_logvar"].shape == out["text_logvar"].shape == (3, A, d)
        assert out["image_logvar"].min() >= head.logvar_min and out["image_logvar"].max() <= head.logvar_max
    assert not set(VIEW_OUTPUTS) & set(plain)
    for k in VIEW_OUTPUTS:
        assert both[k].shape == ((3, A) if k == "anatomy_mask_view2" else (3, A, d)), k
    assert both["anatomy_mask_view2"].dtype == torch.bool and not both["anatomy_mask_view2"][0, 2]
    # the views are encoded by the same towers: the flipped anatomy map keeps the same anatomies present
    assert torch.equal(both["anatomy_mask_view2"], both["anatomy_mask"])
    assert not torch.allclose(both["image_emb_view2"], both["image_emb"])
    assert not torch.allclose(both["text_logvar_view2"], both["text_logvar"])
    # close to the initial variance 1/D at initialisation, but not all equal (the W2 variance part needs a spread)
    v = both["image_logvar"][both["anatomy_mask"]]
    assert (v - head.init_logvar).abs().max() < 1.0 and v.std() > 1e-3
    assert head.init_logvar == pytest.approx(-math.log(d))


def test_head_options_extras_and_errors() -> None:
    cfg = create_model("tiny", text={"vocab_size": 100}).config
    assert data_extras_for(cfg.replace(heads={"uncertainty": {}})) == ("image_view2", "text_view2")
    assert data_extras_for(cfg.replace(heads={"uncertainty": {"intra_text": False}})) == ("image_view2",)
    assert data_extras_for(cfg.replace(heads={"uncertainty": {"intra_image": False, "intra_text": False}})) == ()
    head = create_head("uncertainty", cfg, {"shared": True, "intra_image": False, "init_logvar": -2.0})
    assert head.batch_keys == ("input_ids_view2", "attention_mask_view2") and head.data_extras == ("text_view2",)
    assert head.image.weight.shape == (cfg.vision.width, cfg.embed_dim)
    assert head.text.weight.shape == (cfg.text.hidden_size, cfg.embed_dim)
    per = create_head("uncertainty", cfg, {})
    assert per.image.weight.shape == (A, cfg.vision.width, cfg.embed_dim)
    conf, var = head.confidence(torch.full((2, cfg.embed_dim), -2.0))
    assert torch.allclose(conf, torch.full((2,), 0.5)) and torch.allclose(var, torch.full((2,), math.exp(-2.0)))
    conf, _ = head.confidence(torch.full((1, cfg.embed_dim), -2.0 - math.log(3.0)))  # a third of v_0
    assert conf.item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="unknown option.*bogus"):
        create_head("uncertainty", cfg, {"bogus": 1})
    with pytest.raises(ValueError, match="logvar_min"):
        create_head("uncertainty", cfg, {"logvar_min": 1.0, "logvar_max": 0.0})
    with pytest.raises(ValueError, match="init_logvar"):
        create_head("uncertainty", cfg, {"init_logvar": 9.0})


def test_head_with_intra_off_ignores_view_fields() -> None:
    torch.manual_seed(0)
    m = create_model("tiny", heads={"uncertainty": {"intra_image": False, "intra_text": False}},
                     text={"vocab_size": 100})
    inp = _inputs(b=2)
    with torch.no_grad():
        out = m(**inp, **_views(inp))
    assert m.batch_keys == () and not set(VIEW_OUTPUTS) & set(out) and "image_logvar" in out


def test_head_gradients_reach_every_part(model) -> None:
    """One objective step: the log-variance maps and the towers under the means all get gradients."""
    inp = _inputs()
    model.zero_grad()
    out = model(**inp, **_views(inp))
    terms = create_objective("uncertainty_contrastive")(**out, **_batch_fields(3))
    assert set(terms) == {"uncertainty_inter", "uncertainty_intra_image", "uncertainty_intra_text",
                          "uncertainty_variance"}
    sum(terms.values()).backward()
    head = model.heads["uncertainty"]
    for name, p in [("head.image.weight", head.image.weight), ("head.text.weight", head.text.weight),
                    ("head.image.bias", head.image.bias), ("head.text.bias", head.text.bias),
                    ("pooling.proj_weight", model.pooling.proj_weight), ("text.proj.weight", model.text.proj.weight),
                    ("vision.patch", next(model.vision.parameters()))]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_head_fits_a_local_pretrained_text_encoder(tmp_path, monkeypatch) -> None:
    """The text log-variance map takes the pretrained encoder's width (48), not the config's default."""
    from transformers import BertConfig, BertModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    BertModel(BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=96, max_position_embeddings=40)).save_pretrained(str(tmp_path / "bert"))
    m = create_model("tiny", heads={"uncertainty": {}}, text={"pretrained": str(tmp_path / "bert"), "max_length": 32})
    assert m.heads["uncertainty"].text.weight.shape == (A, 48, m.config.embed_dim)
    inp = _inputs(b=2)
    inp["input_ids"] = inp["input_ids"] % 120
    with torch.no_grad():
        assert m(**inp)["text_logvar"].shape == (2, A, m.config.embed_dim)


def test_head_saves_and_loads_with_the_model(model, tmp_path) -> None:
    from fvlm.model import train_wordpiece

    tok = train_wordpiece([f"word{i} lung" for i in range(30)], vocab_size=100, min_frequency=1)
    save_pretrained(model, tok, tmp_path / "m")
    loaded, _ = load_pretrained(tmp_path / "m")
    assert loaded.config.heads == {"uncertainty": {}}
    inp = _inputs(b=2)
    model.eval(), loaded.eval()
    with torch.no_grad():
        a, b = model(**inp), loaded(**inp)
    assert torch.allclose(a["image_logvar"], b["image_logvar"]) and torch.allclose(a["text_logvar"], b["text_logvar"])
    model.train()


# -------------------------------------------------------------------------------- W2: the closed form


def test_w2_hand_computed_cases() -> None:
    """Written out, sigma = exp(logvar / 2):

    1. mu1 = (1, 0), sigma1 = (1, 1); mu2 = (0, 1), sigma2 = (2, 1):
       |mu1 - mu2|^2 = 1 + 1 = 2, |sigma1 - sigma2|^2 = (1 - 2)^2 + 0 = 1        -> W2^2 = 3
    2. mu1 = (3, 4), sigma1 = (3, 0.5); mu2 = (0, 0), sigma2 = (1, 0.5):
       |mu1 - mu2|^2 = 9 + 16 = 25, |sigma1 - sigma2|^2 = (3 - 1)^2 + 0 = 4     -> W2^2 = 29
    3. mu1 = (0.6, 0.8), sigma1 = (0.1, 0.2); mu2 = (0.8, 0.6), sigma2 = (0.3, 0.2):
       |mu1 - mu2|^2 = 0.04 + 0.04 = 0.08, |sigma1 - sigma2|^2 = 0.04             -> W2^2 = 0.12
    """
    f64 = dict(dtype=torch.float64)
    cases = [
        ((1.0, 0.0), (1.0, 1.0), (0.0, 1.0), (2.0, 1.0), 3.0),
        ((3.0, 4.0), (3.0, 0.5), (0.0, 0.0), (1.0, 0.5), 29.0),
        ((0.6, 0.8), (0.1, 0.2), (0.8, 0.6), (0.3, 0.2), 0.12),
    ]
    for mu1, s1, mu2, s2, want in cases:
        lv1 = 2 * torch.log(torch.tensor([s1], **f64))  # (1, D)
        lv2 = 2 * torch.log(torch.tensor([s2], **f64))
        got = wasserstein2_sq(torch.tensor([mu1], **f64), lv1, torch.tensor([mu2], **f64), lv2)  # (1, 1)
        assert got.shape == (1, 1) and got.item() == pytest.approx(want, abs=1e-12), (mu1, s1, mu2, s2)
        # symmetric, and a logit by -a W2^2 + b
        assert wasserstein2_sq(torch.tensor([mu2], **f64), lv2, torch.tensor([mu1], **f64), lv1).item() == \
            pytest.approx(want, abs=1e-12)
        logit = w2_logits(torch.tensor([mu1], **f64), lv1, torch.tensor([mu2], **f64), lv2, 2.5, 0.5)
        assert logit.item() == pytest.approx(-2.5 * want + 0.5, abs=1e-12)


def test_w2_identical_distributions_have_distance_zero() -> None:
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(5, 7, generator=g, dtype=torch.float64)
    lv = torch.randn(5, 7, generator=g, dtype=torch.float64)
    d = wasserstein2_sq(mu, lv, mu, lv)  # (5, 5)
    assert torch.allclose(torch.diagonal(d), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    off = d[~torch.eye(5, dtype=torch.bool)]
    assert (off > 0).all()
    # the same mean with another variance is not the same distribution
    assert wasserstein2_sq(mu[:1], lv[:1], mu[:1], lv[:1] + 1.0).item() > 0


def _bures_w2(m1, c1, m2, c2) -> float:
    """General 2-Wasserstein between Gaussians: |m1 - m2|^2 + tr(C1 + C2 - 2 (C2^1/2 C1 C2^1/2)^1/2)."""

    def sqrtm(c):
        w, v = torch.linalg.eigh(c)
        return v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T

    r = sqrtm(c2)
    return float(((m1 - m2) ** 2).sum() + torch.trace(c1 + c2 - 2 * sqrtm(r @ c1 @ r)))


def test_w2_pairwise_matches_the_general_gaussian_formula() -> None:
    """Batched (..., N, M) distances equal the general Bures-Wasserstein formula on diagonal covariances."""
    g = torch.Generator().manual_seed(2)
    mu1, lv1 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, generator=g,
                                                                                   dtype=torch.float64)
    mu2, lv2 = torch.randn(2, 5, 4, generator=g, dtype=torch.float64), torch.randn(2, 5, 4, generator=g,
                                                                                   dtype=torch.float64)
    d = wasserstein2_sq(mu1, lv1, mu2, lv2)
    assert d.shape == (2, 3, 5)
    for a in range(2):
        for i in range(3):
            for j in range(5):
                want = _bures_w2(mu1[a, i], torch.diag(lv1[a, i].exp()), mu2[a, j], torch.diag(lv2[a, j].exp()))
                assert d[a, i, j].item() == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_kl_to_prior_values() -> None:
    """0 at the prior variance; per dimension 1/2 (r - 1 - log r) with r = var / v0: r = e -> (e - 2) / 2."""
    v0 = 0.25
    assert kl_to_prior(torch.full((3, 4), math.log(v0)), v0).abs().max().item() == 0.0
    got = kl_to_prior(torch.tensor([[math.log(v0) + 1.0, math.log(v0) - 1.0]]), v0)  # mean of r = e and r = 1/e
    want = 0.5 * ((math.e - 2.0) + (math.exp(-1.0) - 1.0 + 1.0)) / 2.0
    assert got.item() == pytest.approx(want, abs=1e-7)


# ------------------------------------------------------------------------------------------ the objective


def random_gaussians(b=6, a=3, d=4, k=3, seed=0, dtype=torch.float64, p_present=0.8, views=True):
    """Model output (means, log-variances, views) + batch fields, few distinct texts and labels."""
    g = torch.Generator().manual_seed(seed)

    def unit():
        return F.normalize(torch.randn(b, a, d, generator=g, dtype=dtype), dim=-1)  # (B, A, D)

    def logvar():
        return math.log(1.0 / d) + 0.5 * torch.randn(b, a, d, generator=g, dtype=dtype)  # (B, A, D)

    out = {"image_emb": unit(), "text_emb": unit(), "image_logvar": logvar(), "text_logvar": logvar(),
           "anatomy_mask": torch.rand(b, a, generator=g) < p_present, "logit_scale": torch.tensor(4.0, dtype=dtype)}
    if views:
        out.update(image_emb_view2=unit(), image_logvar_view2=logvar(), text_emb_view2=unit(),
                   text_logvar_view2=logvar(), anatomy_mask_view2=torch.rand(b, a, generator=g) < p_present)
    normal = torch.rand(b, a, generator=g) < 0.5
    labels = (torch.rand(b, a, k, generator=g) < 0.5).float()
    labels[normal] = 0
    batch = {"case_id": torch.randint(0, b - 1, (b,), generator=g), "text_id": torch.randint(0, 3, (b, a), generator=g),
             "normal": normal, "anatomy_labels": labels}
    return out, batch


@pytest.mark.parametrize("targets, point, options", [
    ("disease_aware", "disease_aware", {"mode": "exact"}),
    ("disease_aware", "disease_aware", {"mode": "jaccard"}),
    ("reference", "anatomy_contrastive", {}),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_equal_variances_give_exactly_the_point_objective(targets, point, options, seed) -> None:
    """-s/2 W2^2 = s cos - s for unit means and equal variances: the inter term IS disease_aware / fVLM."""
    out, batch = random_gaussians(seed=seed)
    same = torch.full_like(out["image_logvar"], -1.3)
    out = {**out, "image_logvar": same, "text_logvar": same.clone()}
    obj = create_objective("uncertainty_contrastive", targets=targets, intra_image=False, intra_text=False, **options)
    got = obj(**out, **batch)["uncertainty_inter"]
    want = create_objective(point, **options)(**out, **batch)[point]
    assert torch.allclose(got, want, atol=1e-12), (got.item(), want.item())
    # and different variances change it
    varied = obj(**{**out, "image_logvar": random_gaussians(seed=seed + 7)[0]["image_logvar"]}, **batch)
    assert not torch.allclose(varied["uncertainty_inter"], want)


@pytest.mark.parametrize("mode", ["exact", "jaccard"])
def test_false_negative_targets_are_disease_awares(mode) -> None:
    out, batch = random_gaussians(b=8, a=4, seed=3)
    present = out["anatomy_mask"].T
    obj = create_objective("uncertainty_contrastive", mode=mode)
    ref = DiseaseAware(mode=mode)
    args = (batch["case_id"], batch["text_id"], batch["normal"])
    got = obj.soft_targets(*args, obj._gather_extra(batch), present)
    want = ref.soft_targets(*args, ref._gather_extra(batch), present)
    assert torch.equal(got, want) and (got > 0).sum() > got.shape[0] * got.shape[1]  # more than the diagonal
    plain = create_objective("uncertainty_contrastive", targets="reference")
    assert torch.equal(plain.soft_targets(*args, {}, present), AnatomyContrastive().soft_targets(*args, {}, present))


def test_intra_image_term_hand_computed() -> None:
    """One anatomy, two abnormal samples of distinct cases, view 2 = view 1, orthogonal unit means, equal
    variances: W2^2 = [[0, 2], [2, 0]], logits -s/2 W2^2 = [[0, -s], [-s, 0]], each row's cross-entropy
    log(1 + e^-s), so the term (weight 1) is log(1 + e^-s); the same for the text term."""
    s = 3.0
    e = torch.eye(2, dtype=torch.float64).view(2, 1, 2)  # (B=2, A=1, D=2)
    lv = torch.full((2, 1, 2), -0.7, dtype=torch.float64)
    m = torch.ones(2, 1, dtype=torch.bool)
    out = {"image_emb": e, "text_emb": e.clone(), "image_logvar": lv, "text_logvar": lv.clone(), "anatomy_mask": m,
           "logit_scale": torch.tensor(s, dtype=torch.float64), "image_emb_view2": e.clone(),
           "image_logvar_view2": lv.clone(), "anatomy_mask_view2": m.clone(), "text_emb_view2": e.clone(),
           "text_logvar_view2": lv.clone()}
    batch = {"case_id": torch.tensor([0, 1]), "text_id": torch.tensor([[5], [6]]),
             "normal": torch.tensor([[False], [False]]), "anatomy_labels": torch.zeros(2, 1, 1)}
    obj = create_objective("uncertainty_contrastive", intra_image_weight=1.0, intra_text_weight=1.0)
    terms = obj(**out, **batch)
    for k in ("uncertainty_inter", "uncertainty_intra_image", "uncertainty_intra_text"):
        assert terms[k].item() == pytest.approx(math.log1p(math.exp(-s)), abs=1e-12), k
    assert terms["uncertainty_variance"].item() == pytest.approx(
        float(kl_to_prior(lv[0, 0], 0.5)), abs=1e-12)  # one anatomy, every Gaussian alike, prior 1/D = 0.5
    # the weights scale the returned terms
    half = create_objective("uncertainty_contrastive", intra_image_weight=0.5, variance_weight=0.0)(**out, **batch)
    assert half["uncertainty_intra_image"].item() == pytest.approx(0.5 * math.log1p(math.exp(-s)), abs=1e-12)
    assert half["uncertainty_variance"].item() == 0.0


def test_intra_image_uses_the_second_views_mask_and_the_same_targets() -> None:
    """The intra-image term equals a direct computation with the view-2 mask and disease-aware targets."""
    out, batch = random_gaussians(b=7, a=3, seed=5)
    obj = create_objective("uncertainty_contrastive", intra_image_weight=1.0, require_abnormal=False)
    got = obj(**out, **batch)["uncertainty_intra_image"]
    p1, p2 = out["anatomy_mask"].T, out["anatomy_mask_view2"].T  # (A, N)
    y = DiseaseAware().soft_targets(batch["case_id"], batch["text_id"], batch["normal"],
                                    {"labels": batch["anatomy_labels"] > 0.5}, p1).double()
    total = 0.0
    s1, s2 = (out["image_logvar"] / 2).exp(), (out["image_logvar_view2"] / 2).exp()  # (B, A, D) sigmas
    for a in range(3):
        w2 = torch.tensor([[float(((out["image_emb"][i, a] - out["image_emb_view2"][j, a]) ** 2).sum()
                                  + ((s1[i, a] - s2[j, a]) ** 2).sum()) for j in range(7)] for i in range(7)],
                          dtype=torch.float64)
        valid = p1[a].unsqueeze(-1) & p2[a].unsqueeze(-2)
        if p1[a].sum() >= 2 and p2[a].sum() >= 2:
            total += float(symmetric_soft_contrastive(-2.0 * w2, y[a], valid))  # a = s/2 = 2
    assert got.item() == pytest.approx(total, abs=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_objective_interface(dtype) -> None:
    obj = create_objective("uncertainty_contrastive")
    out, batch = random_gaussians(seed=13, dtype=dtype)
    terms = obj(**out, **batch, unused_field=torch.zeros(3), region_tokens=None)
    assert tuple(terms) == obj.terms == ("uncertainty_inter", "uncertainty_intra_image", "uncertainty_intra_text",
                                         "uncertainty_variance")
    assert all(t.dim() == 0 and t.dtype == torch.float32 and torch.isfinite(t) for t in terms.values())
    assert obj.needs_heads == ("uncertainty",)
    off = create_objective("uncertainty_contrastive", intra_image=False, intra_text=False)
    assert tuple(off(**out, **batch)) == off.terms == ("uncertainty_inter", "uncertainty_variance")


def test_every_term_backpropagates_into_means_and_log_variances() -> None:
    """Each contrastive term reaches the means and log-variances it compares; the variance term every
    log-variance and no mean (its prior is anchored at each mean, by design)."""
    out, batch = random_gaussians(b=6, a=2, seed=21, p_present=1.1)
    batch["normal"][0] = False
    obj = create_objective("uncertainty_contrastive")
    logvars = [k for k in out if "logvar" in k]
    reads = {
        "uncertainty_inter": ["image_emb", "text_emb", "image_logvar", "text_logvar"],
        "uncertainty_intra_image": ["image_emb", "image_logvar", "image_emb_view2", "image_logvar_view2"],
        "uncertainty_intra_text": ["text_emb", "text_logvar", "text_emb_view2", "text_logvar_view2"],
        "uncertainty_variance": logvars,
    }
    assert set(reads) == set(obj.terms)
    for term, keys in reads.items():
        leaves = {k: (v.clone().requires_grad_(True) if v.is_floating_point() and v.dim() else v)
                  for k, v in out.items()}
        obj(**leaves, **batch)[term].backward()
        for k, v in leaves.items():
            if not (v.is_floating_point() and v.dim()):
                continue
            moved = v.grad is not None and v.grad.abs().sum() > 0
            assert moved == (k in keys), (term, k)


@pytest.mark.slow  # float64 gradcheck
def test_gradcheck() -> None:
    out, batch = random_gaussians(b=3, a=2, d=2, k=2, seed=11, p_present=1.1)
    batch["normal"][0] = False
    obj = create_objective("uncertainty_contrastive")
    keys = [k for k, v in out.items() if v.is_floating_point()]
    inputs = tuple(out[k].clone().requires_grad_(True) for k in keys)

    def f(*xs):
        return sum(obj(**{**out, **dict(zip(keys, xs))}, **batch).values())

    assert f(*inputs).item() > 0
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_absent_entries_change_nothing_even_nan() -> None:
    out, batch = random_gaussians(b=6, a=3, seed=7)
    out["anatomy_mask"][2] = False
    out["anatomy_mask_view2"][2] = False
    obj = create_objective("uncertainty_contrastive")
    base = obj(**out, **batch)
    dirty = {k: v.clone() for k, v in out.items()}
    for k in ("image_emb", "image_logvar", "text_emb", "text_logvar", "image_emb_view2", "image_logvar_view2",
              "text_emb_view2", "text_logvar_view2"):
        dirty[k][2] = float("nan")
        dirty[k].requires_grad_(True)
    got = obj(**dirty, **batch)
    for k in base:
        assert torch.allclose(got[k], base[k], atol=1e-12), k
    sum(got.values()).backward()
    for k in ("image_emb", "image_logvar", "text_logvar_view2"):
        assert torch.isfinite(dirty[k].grad).all() and dirty[k].grad[2].abs().sum() == 0, k


def test_clear_errors_for_missing_fields() -> None:
    out, batch = random_gaussians(seed=1, views=False)
    with pytest.raises(ValueError, match=r"intra_image=true needs the model output image_emb_view2.*image_view2.*"
                                         r"intra_image: false"):
        create_objective("uncertainty_contrastive")(**out, **batch)
    with pytest.raises(ValueError, match=r"intra_text=true needs the model output text_emb_view2.*text_view2"):
        create_objective("uncertainty_contrastive", intra_image=False)(**out, **batch)
    create_objective("uncertainty_contrastive", intra_image=False, intra_text=False)(**out, **batch)  # fine
    no_var = {k: v for k, v in out.items() if k != "text_logvar"}
    with pytest.raises(ValueError, match=r"no text_logvar.*uncertainty head"):
        create_objective("uncertainty_contrastive", intra_image=False, intra_text=False)(**no_var, **batch)
    with pytest.raises(ValueError, match="anatomy_labels"):
        create_objective("uncertainty_contrastive", intra_image=False, intra_text=False)(
            **out, **{k: v for k, v in batch.items() if k != "anatomy_labels"})
    bad = {**out, "image_logvar": out["image_logvar"][:, :, :2]}
    with pytest.raises(ValueError, match=r"image_logvar must be \(B, A, D\)"):
        create_objective("uncertainty_contrastive", intra_image=False, intra_text=False)(**bad, **batch)
    for opts, field in (({"targets": "other"}, "targets"), ({"variance_weight": -1}, "variance_weight"),
                        ({"prior_var": 0.0}, "prior_var"), ({"distance_scale": 0}, "distance_scale")):
        with pytest.raises(ValueError, match=field):
            create_objective("uncertainty_contrastive", **opts)


# ------------------------------------------------------------------------------ collapse on a toy problem


def _toy(variance_weight: float, steps: int, n: int = 32, seed: int = 0) -> list[tuple[float, float]]:
    """n pairs whose means are all the same point (nothing tells the pairs apart but the variances), free
    1-d log-variances starting near the prior's log v0, Adam on the inter term (+ the regulariser).
    Returns (min, max) of log(var / v0) after each half of the steps."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.ones(n, 1, 1, dtype=torch.float64)  # (N, A=1, D=1), unit means, all equal
    v0 = 0.5
    img = (math.log(v0) + 0.1 * torch.randn(n, 1, 1, generator=g, dtype=torch.float64)).requires_grad_(True)
    txt = (math.log(v0) + 0.1 * torch.randn(n, 1, 1, generator=g, dtype=torch.float64)).requires_grad_(True)
    obj = create_objective("uncertainty_contrastive", targets="reference", intra_image=False, intra_text=False,
                           variance_weight=variance_weight, prior_var=v0)
    opt = torch.optim.Adam([img, txt], lr=0.15)
    batch = {"case_id": torch.arange(n), "text_id": torch.arange(n).view(n, 1),
             "normal": torch.zeros(n, 1, dtype=torch.bool)}
    mask = torch.ones(n, 1, dtype=torch.bool)
    marks = []
    for step in range(steps):
        terms = obj(image_emb=mu, text_emb=mu, image_logvar=img, text_logvar=txt, anatomy_mask=mask,
                    logit_scale=torch.tensor(10.0, dtype=torch.float64), **batch)
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
        if step + 1 in (steps // 2, steps):
            r = torch.cat([img, txt]).detach() - math.log(v0)
            marks.append((r.min().item(), r.max().item()))
    return marks


@pytest.mark.slow  # optimises a toy problem
def test_variance_regulariser_prevents_collapse_on_a_toy_problem() -> None:
    """Without the regulariser the W2 objective uses the variances as free coordinates to tell the pairs
    apart: the smallest keep collapsing toward 0 (and the largest blow up); with it they stay in a band
    around the prior variance. Measured (100 steps, seeds 0-2): without, log(var/v0) down to -5.0 .. -5.3
    (-4.4 at step 50: still falling) and up to 7 .. 8; with weight 1, within [-1.8, 2.2] and settled (moves
    < 0.1 between steps 50 and 100)."""
    (mid_min, _), (end_min, end_max) = _toy(0.0, 100)
    assert end_min < -4.5 and end_min < mid_min - 0.3, (mid_min, end_min)  # collapsing, and still going
    assert end_max > 5.5
    (rmid_min, rmid_max), (rend_min, rend_max) = _toy(1.0, 100)
    assert -3.0 < rend_min and rend_max < 3.0, (rend_min, rend_max)
    assert abs(rend_min - rmid_min) < 0.2 and abs(rend_max - rmid_max) < 0.2  # bounded: settled, not drifting
