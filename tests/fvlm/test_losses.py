"""Objectives: hand-computed soft targets, a plain looped reference, gradcheck, the no-usable-anatomy path.

The reference implementations below are deliberately naive (Python loops over anatomies, rows, columns)
so that the vectorised objectives are checked against the math of their docstrings, not against themselves.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from fvlm.losses import (
    AnatomyContrastive,
    DiseaseAware,
    create_objective,
    list_objectives,
    objective_defaults,
    register_objective,
)
from fvlm.losses import registry as registry_module

#: the objectives of the fVLM recipes, which the looped reference below re-implements; they read only the
#: model's base outputs. The related methods' objectives read head outputs (uncertainty, region, ...) and have
#: their own reference tests: test_uncertainty, test_unified, test_region, test_entity, test_reconstruct.
REFERENCED = ("anatomy_contrastive", "anatomy_infonce", "disease_aware", "clip_global")
ANATOMY_OBJECTIVES = [n for n in REFERENCED if isinstance(create_objective(n), AnatomyContrastive)]


# ------------------------------------------------------------------------------------- plain reference


def ref_targets(a, idx, case_id, text_id, normal, labels, *, normal_pairs, identical_text, mode, thr=0.5):
    """Y[r][c] for the present samples idx of anatomy a, one pair at a time."""
    y = []
    for i in idx:
        row = []
        for j in idx:
            v = 0.0
            if int(case_id[i]) == int(case_id[j]):
                v = 1.0
            if normal_pairs and bool(normal[i, a]) and bool(normal[j, a]):
                v = 1.0
            if identical_text and int(text_id[i, a]) == int(text_id[j, a]):
                v = 1.0
            if mode is not None:
                li = [float(x) > thr for x in labels[i, a]]
                lj = [float(x) > thr for x in labels[j, a]]
                if mode == "exact" and li == lj and any(li):
                    v = max(v, 1.0)
                if mode == "jaccard":
                    inter = sum(p and q for p, q in zip(li, lj))
                    union = sum(p or q for p, q in zip(li, lj))
                    v = max(v, inter / union if union else 0.0)
            row.append(v)
        y.append(row)
    return y


def ref_soft_ce(logit_rows, y_rows):
    """mean over rows of -sum_j ybar_ij log softmax(s_i)_j; lists of lists (logits are 0-d tensors)."""
    total = 0.0
    for s, y in zip(logit_rows, y_rows):
        s = torch.stack(s)
        logp = s - torch.logsumexp(s, dim=0)
        ysum = sum(y)
        total = total + sum(-(y[c] / ysum) * logp[c] for c in range(len(y)))
    return total / len(logit_rows)


def ref_anatomy_loss(
    image_emb,
    text_emb,
    anatomy_mask,
    logit_scale,
    case_id,
    text_id,
    normal,
    anatomy_labels=None,
    *,
    normal_pairs=True,
    identical_text=True,
    require_abnormal=True,
    reduction="sum",
    mode=None,
):
    b, a_count, _ = image_emb.shape
    total, count = 0.0, 0
    for a in range(a_count):
        idx = [i for i in range(b) if bool(anatomy_mask[i, a])]
        if len(idx) < 2:
            continue
        if require_abnormal and all(bool(normal[i, a]) for i in idx):
            continue
        y = ref_targets(a, idx, case_id, text_id, normal, anatomy_labels,
                        normal_pairs=normal_pairs, identical_text=identical_text, mode=mode)
        s = [[logit_scale * torch.dot(image_emb[i, a], text_emb[j, a]) for j in idx] for i in idx]
        s_t = [[s[r][c] for r in range(len(idx))] for c in range(len(idx))]
        y_t = [[y[r][c] for r in range(len(idx))] for c in range(len(idx))]
        total = total + 0.5 * (ref_soft_ce(s, y) + ref_soft_ce(s_t, y_t))
        count += 1
    if reduction == "mean" and count:
        total = total / count
    return torch.as_tensor(total, dtype=image_emb.dtype)


def ref_clip_loss(global_image_emb, global_text_emb, logit_scale, case_id):
    n = global_image_emb.shape[0]
    s = [[logit_scale * torch.dot(global_image_emb[i], global_text_emb[j]) for j in range(n)] for i in range(n)]
    y = [[1.0 if int(case_id[i]) == int(case_id[j]) else 0.0 for j in range(n)] for i in range(n)]
    s_t = [[s[r][c] for r in range(n)] for c in range(n)]
    return 0.5 * (ref_soft_ce(s, y) + ref_soft_ce(s_t, y))


def reference(name: str, out: dict, batch: dict, **options) -> torch.Tensor:
    """The looped reference for the registered objective ``name`` with its registered defaults."""
    opts = {**objective_defaults(name), **options}
    if name == "clip_global":
        return ref_clip_loss(out["global_image_emb"], out["global_text_emb"], out["logit_scale"], batch["case_id"])
    mode = opts.get("mode", "exact") if name == "disease_aware" else None
    return ref_anatomy_loss(
        out["image_emb"], out["text_emb"], batch["anatomy_mask"], out["logit_scale"],
        batch["case_id"], batch["text_id"], batch["normal"], batch["anatomy_labels"],
        normal_pairs=opts.get("normal_pairs", True), identical_text=opts.get("identical_text", True),
        require_abnormal=opts.get("require_abnormal", True), reduction=opts.get("reduction", "sum"), mode=mode,
    )


# ---------------------------------------------------------------------------------------------- data


def random_batch(b=6, a=3, d=4, k=3, seed=0, dtype=torch.float64, p_present=0.8, p_normal=0.5):
    """Model output + batch fields; few distinct texts and labels so that every rule fires."""
    g = torch.Generator().manual_seed(seed)
    out = {
        "image_emb": F.normalize(torch.randn(b, a, d, generator=g, dtype=dtype), dim=-1),  # (B, A, D)
        "text_emb": F.normalize(torch.randn(b, a, d, generator=g, dtype=dtype), dim=-1),  # (B, A, D)
        "global_image_emb": F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1),  # (B, D)
        "global_text_emb": F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1),  # (B, D)
        "logit_scale": torch.tensor(4.0, dtype=dtype),
    }
    normal = torch.rand(b, a, generator=g) < p_normal  # (B, A)
    labels = (torch.rand(b, a, k, generator=g) < 0.5).to(torch.uint8)  # (B, A, K)
    labels[normal] = 0
    batch = {
        "anatomy_mask": torch.rand(b, a, generator=g) < p_present,  # (B, A)
        "case_id": torch.randint(0, b - 1, (b,), generator=g),  # a repeated case now and then
        "text_id": torch.randint(0, 3, (b, a), generator=g),  # (B, A)
        "normal": normal,
        "anatomy_labels": labels,
    }
    out["anatomy_mask"] = batch.pop("anatomy_mask")  # the model reports which anatomies are usable
    return out, batch


def fields(out, batch):
    """The reference takes the mask from the batch dict; keep one place for it."""
    return out, {**batch, "anatomy_mask": out["anatomy_mask"]}


def loss_of(name, out, batch, **options):
    obj = create_objective(name, **options)
    (value,) = obj(**out, **batch).values()
    return value


# --------------------------------------------------------------------------------- hand-computed targets

#: one anatomy, four samples, four distinct cases
CASES = torch.tensor([0, 1, 2, 3])


def targets_for(obj, *, normal, text_id, labels=None, present=None):
    n = len(normal)
    normal = torch.tensor(normal).view(n, 1)
    text_id = torch.tensor(text_id).view(n, 1)
    present = torch.ones(1, n, dtype=torch.bool) if present is None else torch.tensor(present).view(1, n)
    extra = {} if labels is None else {"labels": (torch.tensor(labels, dtype=torch.float).view(n, 1, -1) > 0.5)}
    return obj.soft_targets(CASES, text_id, normal, extra, present)[0]


def test_targets_normal_normal_pairs() -> None:
    """Samples 0 and 1 are both normal: positives of each other; the abnormal ones only of themselves."""
    kw = dict(normal=[True, True, False, False], text_id=[10, 11, 12, 13])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float)
    assert torch.equal(targets_for(AnatomyContrastive(), **kw), expected)
    assert torch.equal(targets_for(AnatomyContrastive(normal_pairs=False), **kw), torch.eye(4))
    assert torch.equal(targets_for(create_objective("anatomy_infonce"), **kw), torch.eye(4))


def test_targets_identical_text() -> None:
    """Abnormal samples 2 and 3 share their text: positives (switchable); normal 0, 1 differ in text."""
    kw = dict(normal=[True, False, False, False], text_id=[10, 11, 12, 12])
    expected = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float)
    assert torch.equal(targets_for(AnatomyContrastive(), **kw), expected)
    assert torch.equal(targets_for(AnatomyContrastive(identical_text=False), **kw), torch.eye(4))


def test_targets_shared_disease() -> None:
    """Labels [1,0,1], [1,0,1], [1,1,0], [0,0,0]: exact pairs 0-1; Jaccard 0-2 = 1-2 = 1/3; normal 3 alone."""
    kw = dict(normal=[False, False, False, True], text_id=[10, 11, 12, 13],
              labels=[[1, 0, 1], [1, 0, 1], [1, 1, 0], [0, 0, 0]])
    exact = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float)
    third = 1.0 / 3.0
    jaccard = torch.tensor([[1, 1, third, 0], [1, 1, third, 0], [third, third, 1, 0], [0, 0, 0, 1]])
    assert torch.equal(targets_for(DiseaseAware(mode="exact"), **kw), exact)
    assert torch.allclose(targets_for(DiseaseAware(mode="jaccard"), **kw), jaccard)
    # the reference (no disease-aware pairing) keeps them apart
    assert torch.equal(targets_for(AnatomyContrastive(), **kw), torch.eye(4))


def test_reference_targets_agree_with_hand_matrix() -> None:
    """The looped reference implements the same rules as the hand matrices above."""
    normal = torch.tensor([[False], [False], [False], [True]])
    labels = torch.tensor([[[1, 0, 1]], [[1, 0, 1]], [[1, 1, 0]], [[0, 0, 0]]])
    text_id = torch.tensor([[10], [11], [12], [13]])
    y = ref_targets(
        0, [0, 1, 2, 3], CASES, text_id, normal, labels, normal_pairs=True, identical_text=True, mode="jaccard"
    )
    third = 1.0 / 3.0
    assert y == [[1, 1, third, 0], [1, 1, third, 0], [third, third, 1, 0], [0, 0, 0, 1]]


def test_hand_computed_loss_two_samples() -> None:
    """Two samples, one anatomy, orthogonal unit embeddings, scale s: S = [[s, 0], [0, s]].

    Plain InfoNCE: each row -log(e^s / (e^s + 1)) = log(1 + e^-s); both directions equal, so L = log(1 + e^-s).
    Both normal (normal pairs on, one abnormal elsewhere is needed, so sample 1 is abnormal here and the
    targets stay the identity): same value. Identical texts: Y = [[1/2, 1/2], [1/2, 1/2]], so
    L = -1/2 (log p_same + log p_other) = log(1 + e^s) - s/2.
    """
    s = 3.0
    e = torch.eye(2, dtype=torch.float64).view(2, 1, 2)  # (B=2, A=1, D=2)
    out = {"image_emb": e, "text_emb": e.clone(), "anatomy_mask": torch.ones(2, 1, dtype=torch.bool),
           "logit_scale": torch.tensor(s, dtype=torch.float64)}
    batch = {
        "case_id": torch.tensor([0, 1]),
        "text_id": torch.tensor([[5], [6]]),
        "normal": torch.tensor([[True], [False]]),
    }
    assert loss_of("anatomy_contrastive", out, batch).item() == pytest.approx(math.log1p(math.exp(-s)))
    same_text = {**batch, "text_id": torch.tensor([[5], [5]])}
    assert loss_of("anatomy_contrastive", out, same_text).item() == pytest.approx(math.log1p(math.exp(s)) - s / 2)
    assert loss_of("anatomy_infonce", out, same_text).item() == pytest.approx(math.log1p(math.exp(-s)))


# ------------------------------------------------------------------------------ against the reference


def test_the_reference_covers_the_fvlm_objectives() -> None:
    assert set(REFERENCED) <= set(list_objectives())


@pytest.mark.parametrize("name", REFERENCED)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(name: str, seed: int) -> None:
    out, batch = random_batch(seed=seed)
    got = loss_of(name, out, batch)
    want = reference(name, *fields(out, batch))
    assert torch.allclose(got, want, atol=1e-12), (name, got.item(), want.item())


@pytest.mark.parametrize("normal_pairs", [True, False])
@pytest.mark.parametrize("identical_text", [True, False])
@pytest.mark.parametrize("require_abnormal", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_anatomy_options_match_reference(normal_pairs, identical_text, require_abnormal, reduction) -> None:
    out, batch = random_batch(b=7, a=4, seed=3)
    batch["normal"][:, 3] = True  # anatomy 3 has no abnormal sample: require_abnormal matters
    opts = dict(
        normal_pairs=normal_pairs, identical_text=identical_text, require_abnormal=require_abnormal, reduction=reduction
    )
    got = loss_of("anatomy_contrastive", out, batch, **opts)
    want = reference("anatomy_contrastive", *fields(out, batch), **opts)
    assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("mode", ["exact", "jaccard"])
def test_disease_aware_modes_match_reference(mode: str) -> None:
    out, batch = random_batch(b=8, a=2, k=2, seed=4, p_normal=0.25)  # many abnormal samples, few label vectors
    got = loss_of("disease_aware", out, batch, mode=mode)
    want = reference("disease_aware", *fields(out, batch), mode=mode)
    assert torch.allclose(got, want, atol=1e-12)
    assert not torch.allclose(got, loss_of("anatomy_contrastive", out, batch)), "labels changed nothing"


def test_clip_global_is_clip_with_distinct_cases() -> None:
    """Distinct cases: clip_global is CLIP's symmetric cross-entropy on the diagonal."""
    out, batch = random_batch(b=5, seed=5)
    batch["case_id"] = torch.arange(5)
    logits = out["logit_scale"] * out["global_image_emb"] @ out["global_text_emb"].T
    want = 0.5 * (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5)))
    assert torch.allclose(loss_of("clip_global", out, batch), want, atol=1e-12)


def test_anatomy_infonce_is_per_anatomy_clip() -> None:
    """Plain variant, everything present, distinct cases: sum over anatomies of CLIP on each anatomy."""
    out, batch = random_batch(b=5, a=3, seed=6, p_present=1.1)
    batch["case_id"] = torch.arange(5)
    batch["normal"][0] = False  # every anatomy has an abnormal sample
    want = 0.0
    for a in range(3):
        logits = out["logit_scale"] * out["image_emb"][:, a] @ out["text_emb"][:, a].T
        want = want + 0.5 * (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5)))
    assert torch.allclose(loss_of("anatomy_infonce", out, batch), want, atol=1e-12)


# ------------------------------------------------------------------------------- exclusion and skipping


@pytest.mark.parametrize("name", ANATOMY_OBJECTIVES)
def test_absent_anatomy_is_excluded(name: str) -> None:
    """An absent (sample, anatomy) changes nothing, whatever its embedding holds (even NaN), grads included."""
    out, batch = random_batch(b=6, a=3, seed=7)
    out["anatomy_mask"][2] = False  # sample 2 has no usable anatomy
    base = loss_of(name, out, batch)
    # the same batch without sample 2 at all
    keep = [0, 1, 3, 4, 5]
    sub_out = {k: (v[keep] if v.dim() else v) for k, v in out.items()}
    sub_batch = {k: v[keep] for k, v in batch.items()}
    assert torch.allclose(base, loss_of(name, sub_out, sub_batch), atol=1e-12)
    # garbage in the absent entries
    img = out["image_emb"].clone()
    img[2] = float("nan")
    img.requires_grad_(True)
    value = loss_of(name, {**out, "image_emb": img}, batch)
    assert torch.allclose(value, base, atol=1e-12)
    value.backward()
    assert torch.isfinite(img.grad).all() and torch.equal(img.grad[2], torch.zeros_like(img.grad[2]))


@pytest.mark.parametrize("name", ANATOMY_OBJECTIVES)
def test_anatomy_without_abnormal_sample_is_skipped(name: str) -> None:
    """Anatomy 1 is normal in every sample: with require_abnormal it adds nothing, as if it were absent."""
    out, batch = random_batch(b=6, a=3, seed=8, p_present=1.1)
    batch["normal"][:, 1] = True
    batch["anatomy_labels"][:, 1] = 0
    batch["normal"][0, [0, 2]] = False
    with_it = loss_of(name, out, batch)
    without = loss_of(name, {**out, "anatomy_mask": out["anatomy_mask"].index_fill(1, torch.tensor([1]), False)}, batch)
    assert torch.allclose(with_it, without, atol=1e-12)
    kept = loss_of(name, out, batch, require_abnormal=False)
    assert kept > with_it  # the all-normal anatomy does contribute when asked to


def test_mean_reduction_divides_by_contributing_anatomies() -> None:
    out, batch = random_batch(b=6, a=4, seed=9, p_present=1.1)
    batch["normal"][0] = False
    batch["normal"][:, 3] = True  # anatomy 3 is skipped: 3 contribute
    total = loss_of("anatomy_contrastive", out, batch, reduction="sum")
    mean = loss_of("anatomy_contrastive", out, batch, reduction="mean")
    assert torch.allclose(mean, total / 3, atol=1e-12)


# ----------------------------------------------------------------- no usable anatomy: a zero with a graph


def leaves(out: dict) -> dict:
    return {k: (v.clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in out.items()}


@pytest.mark.parametrize("name", ANATOMY_OBJECTIVES)
@pytest.mark.parametrize("why", ["nothing_present", "no_abnormal", "one_sample_each"])
def test_no_usable_anatomy_gives_zero_with_grad_path(name: str, why: str) -> None:
    out, batch = random_batch(b=4, a=3, seed=10)
    if why == "nothing_present":
        out["anatomy_mask"][:] = False
    elif why == "no_abnormal":
        batch["normal"][:] = True
        batch["anatomy_labels"][:] = 0
    else:  # each anatomy present in exactly one sample
        out["anatomy_mask"] = torch.zeros(4, 3, dtype=torch.bool)
        out["anatomy_mask"][torch.arange(3), torch.arange(3)] = True
    out = leaves(out)
    (value,) = create_objective(name)(**out, **batch).values()
    assert torch.isfinite(value) and value.item() == 0.0
    assert value.requires_grad
    value.backward()
    for key in ("image_emb", "text_emb", "logit_scale"):
        assert out[key].grad is not None, key
        assert torch.equal(out[key].grad, torch.zeros_like(out[key].grad)), key


# ------------------------------------------------------------------------------------------ gradients


@pytest.mark.slow  # float64 gradcheck
@pytest.mark.parametrize("name", REFERENCED)
def test_gradcheck(name: str) -> None:
    """Analytic gradients of embeddings and logit scale vs finite differences, float64, tiny tensors."""
    out, batch = random_batch(b=4, a=2, d=3, k=2, seed=11, p_present=0.9, p_normal=0.4)
    batch["normal"][0] = False
    obj = create_objective(name)
    keys = ["image_emb", "text_emb", "global_image_emb", "global_text_emb", "logit_scale"]
    used = [k for k in keys if k in inspect.signature(obj.forward).parameters]
    inputs = tuple(out[k].clone().requires_grad_(True) for k in used)

    def f(*xs):
        (v,) = obj(**{**out, **dict(zip(used, xs))}, **batch).values()
        return v

    assert f(*inputs).item() > 0
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", REFERENCED)
def test_gradients_match_reference(name: str) -> None:
    out, batch = random_batch(seed=12)
    a, b = leaves(out), leaves(out)
    loss_of(name, a, batch).backward()
    reference(name, *fields(b, batch)).backward()
    for k, v in a.items():
        if v.is_floating_point() and b[k].grad is not None:
            assert torch.allclose(v.grad, b[k].grad, atol=1e-12), k


# ------------------------------------------------------------------------------ registry and interface


@pytest.mark.parametrize("name", REFERENCED)
def test_objective_interface(name: str) -> None:
    """Any registered objective: an nn.Module, called with model output + batch (extra keys ignored),
    returns exactly its named terms as finite scalars; float32 and bfloat16 inputs are accepted."""
    obj = create_objective(name)
    assert isinstance(obj, torch.nn.Module)
    for dtype in (torch.float32, torch.bfloat16):
        out, batch = random_batch(seed=13, dtype=dtype)
        terms = obj(**out, **batch, unused_field=torch.zeros(3), image_tokens=None)
        assert tuple(terms) == obj.terms
        assert all(t.dim() == 0 and torch.isfinite(t) for t in terms.values())


def test_registry_lists_the_objectives() -> None:
    assert {"anatomy_contrastive", "anatomy_infonce", "disease_aware", "clip_global"} <= set(list_objectives())
    assert objective_defaults("anatomy_infonce")["normal_pairs"] is False


def test_register_and_create_custom_objective() -> None:
    class Zero(torch.nn.Module):
        terms = ("zero",)

        def __init__(self, value: float = 0.0) -> None:
            super().__init__()
            self.value = value

        def forward(self, image_emb, **_):
            return {"zero": image_emb.sum() * 0 + self.value}

    try:
        register_objective("test_zero", Zero, defaults={"value": 1.0})
        assert "test_zero" in list_objectives()
        assert create_objective("test_zero").value == 1.0
        assert create_objective("test_zero", value=2.0).value == 2.0
        with pytest.raises(ValueError, match="already registered"):
            register_objective("test_zero", Zero)
    finally:
        registry_module.OBJECTIVES.unregister("test_zero")


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="unknown objective 'nope'.*anatomy_contrastive"):
        create_objective("nope")
    with pytest.raises(ValueError, match=r"objective 'anatomy_contrastive': unknown option\(s\) temperature"):
        create_objective("anatomy_contrastive", temperature=0.07)
    with pytest.raises(ValueError, match="reduction"):
        create_objective("anatomy_contrastive", reduction="max")
    with pytest.raises(ValueError, match="mode"):
        create_objective("disease_aware", mode="cosine")
    out, batch = random_batch()
    with pytest.raises(ValueError, match="text_id"):
        create_objective("anatomy_contrastive")(**out, **{k: v for k, v in batch.items() if k != "text_id"})
    with pytest.raises(ValueError, match="normal"):
        create_objective("anatomy_contrastive")(**out, **{k: v for k, v in batch.items() if k != "normal"})
    with pytest.raises(ValueError, match="anatomy_labels"):
        create_objective("disease_aware")(**out, **{k: v for k, v in batch.items() if k != "anatomy_labels"})
    with pytest.raises(ValueError, match=r"anatomy_mask must be \(B, A\)"):
        create_objective("anatomy_contrastive")(**{**out, "anatomy_mask": out["anatomy_mask"][:, :2]}, **batch)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        create_objective("clip_global")(**{**out, "global_text_emb": out["text_emb"]}, **batch)
    # plain InfoNCE needs neither text ids nor normal flags when require_abnormal is off
    value = loss_of("anatomy_infonce", out, {"case_id": batch["case_id"]}, require_abnormal=False)
    assert torch.isfinite(value)
