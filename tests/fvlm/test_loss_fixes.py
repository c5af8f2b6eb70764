"""Issue 22, bugs 1-3: the uncertainty objective honours ``has_report``; the symmetric soft contrastive averages
each direction over its own valid rows; the 2-Wasserstein distance keeps its precision at large variances."""

from __future__ import annotations

import math

import pytest
import torch

from fvlm.losses import create_objective
from fvlm.losses.functional import soft_cross_entropy_rows, symmetric_soft_contrastive, wasserstein2_sq
from tests.fvlm.test_uncertainty import random_gaussians

# ----------------------------------------------------------------------------- bug 1: has_report (label-only)


@pytest.mark.parametrize("targets", ["disease_aware", "reference"])
def test_uncertainty_leaves_label_only_cases_out_of_every_term(targets) -> None:
    """Changing a label-only case's (empty) text moves no term, as with the base objective; the case's image
    does not move the intra-image term either (its targets would come from its empty text)."""
    out, batch = random_gaussians(b=6, a=3, seed=2, views=True)
    out["anatomy_mask"][:] = True
    out["anatomy_mask_view2"][:] = True
    has_report = torch.tensor([True, True, False, True, True, True])
    batch = {**batch, "has_report": has_report, "case_id": torch.arange(6)}
    obj = create_objective("uncertainty_contrastive", targets=targets, require_abnormal=False)
    base = obj(**out, **batch)
    g = torch.Generator().manual_seed(9)
    other = dict(out)
    for key in ("text_emb", "text_emb_view2", "image_emb_view2"):
        t = out[key].clone()
        t[2] = torch.nn.functional.normalize(torch.randn(t[2].shape, generator=g, dtype=t.dtype), dim=-1)
        other[key] = t
    for key in ("text_logvar", "text_logvar_view2", "image_logvar_view2"):
        t = out[key].clone()
        t[2] = t[2] + 1.5
        other[key] = t
    moved = obj(**other, **batch)
    for k in obj.terms:
        assert torch.allclose(moved[k], base[k], atol=1e-12), k
    # and the same change moves the terms when the case has a report (the test can fail)
    with_report = {**batch, "has_report": torch.ones(6, dtype=torch.bool)}
    assert not torch.allclose(obj(**other, **with_report)["uncertainty_inter"],
                              obj(**out, **with_report)["uncertainty_inter"])


def test_uncertainty_with_has_report_is_the_point_objective_with_has_report() -> None:
    """Equal variances: the inter term equals anatomy_contrastive, which masks label-only rows."""
    out, batch = random_gaussians(b=7, a=3, seed=4)
    same = torch.full_like(out["image_logvar"], -0.9)
    out = {**out, "image_logvar": same, "text_logvar": same.clone()}
    batch = {**batch, "has_report": torch.tensor([True, False, True, True, False, True, True])}
    got = create_objective("uncertainty_contrastive", targets="reference", intra_image=False,
                           intra_text=False)(**out, **batch)["uncertainty_inter"]
    want = create_objective("anatomy_contrastive")(**out, **batch)["anatomy_contrastive"]
    assert torch.allclose(got, want, atol=1e-12), (got.item(), want.item())


# ---------------------------------------------------------------- bug 2: each direction over its own rows


def test_symmetric_soft_contrastive_divides_each_side_by_its_valid_rows() -> None:
    """4 images take part, 2 texts: image->text is a mean over 4 rows, text->image over 2 (not 4)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 4, generator=g, dtype=torch.float64) * 3
    targets = torch.eye(4, dtype=torch.float64) + (torch.rand(4, 4, generator=g, dtype=torch.float64) < 0.3)
    cols = torch.tensor([True, False, True, False])
    valid = torch.ones(4, 1, dtype=torch.bool) & cols.unsqueeze(0)  # (4, 4): every row, columns 0 and 2
    got = symmetric_soft_contrastive(logits, targets, valid)
    i2t = soft_cross_entropy_rows(logits, targets, valid)  # (4,)
    t2i = soft_cross_entropy_rows(logits.T, targets.T, valid.T)  # (4,): rows 1 and 3 are empty
    want = 0.5 * (i2t.sum() / 4 + t2i.sum() / 2)
    assert got.item() == pytest.approx(want.item(), abs=1e-12)
    diluted = 0.5 * (i2t.sum() / 4 + t2i.sum() / 4)
    assert got.item() != pytest.approx(diluted.item(), abs=1e-6)
    # a square mask is unchanged: both sides have the same rows
    sq = cols.unsqueeze(0) & cols.unsqueeze(1)
    ref = 0.5 * (soft_cross_entropy_rows(logits, targets, sq).sum() + soft_cross_entropy_rows(
        logits.T, targets.T, sq.T).sum()) / 2
    assert symmetric_soft_contrastive(logits, targets, sq).item() == pytest.approx(ref.item(), abs=1e-12)


def test_batched_shapes_and_empty_anatomies() -> None:
    logits = torch.randn(3, 5, 5, dtype=torch.float64)
    valid = torch.zeros(3, 5, 5, dtype=torch.bool)
    valid[1, :3, 1:] = True
    out = symmetric_soft_contrastive(logits, torch.ones_like(logits), valid)
    assert out.shape == (3,) and out[0].item() == 0.0 and out[2].item() == 0.0 and out[1].item() > 0


# --------------------------------------------------------------------- bug 3: W2 from differences (fp32)


def test_w2_keeps_fp32_precision_at_large_variances() -> None:
    """At log-variance 4 (inside the head's clamp) the inner-product expansion lost ~0.03 in W2^2 in fp32;
    the differences stay within rounding of the float64 value."""
    g = torch.Generator().manual_seed(1)
    d = 256
    mu1 = torch.nn.functional.normalize(torch.randn(6, d, generator=g, dtype=torch.float64), dim=-1)
    mu2 = torch.nn.functional.normalize(torch.randn(5, d, generator=g, dtype=torch.float64), dim=-1)
    v1 = 4.0 - 0.05 * torch.rand(6, d, generator=g, dtype=torch.float64)
    v2 = 4.0 - 0.05 * torch.rand(5, d, generator=g, dtype=torch.float64)
    want = wasserstein2_sq(mu1, v1, mu2, v2)  # float64
    got = wasserstein2_sq(mu1.float(), v1.float(), mu2.float(), v2.float()).double()
    assert (got - want).abs().max().item() < 2e-4, (got - want).abs().max().item()
    # the closed form, spelled out
    s1, s2 = (0.5 * v1).exp(), (0.5 * v2).exp()
    ref = ((mu1[:, None] - mu2[None]) ** 2).sum(-1) + ((s1[:, None] - s2[None]) ** 2).sum(-1)
    assert torch.allclose(want, ref, atol=1e-12)
    assert math.isfinite(float(got.sum())) and bool((got >= 0).all())
