"""Anatomy pooling: touch mask, only touching tokens, absent and cut anatomies never NaN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fvlm.model import AnatomyPooling, touch_mask

PATCH = (2, 2, 2)


def test_touch_mask_equals_max_pooled_one_hot() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2, 4, 6, 8))
    labels[1][labels[1] == 2] = 0  # anatomy 2 absent from sample 1
    touch = touch_mask(labels, 3, PATCH)  # (B, A, N)
    one_hot = F.one_hot(labels, 4).permute(0, 4, 1, 2, 3)[:, 1:].float()  # (B, A, Z, Y, X)
    ref = F.max_pool3d(one_hot, kernel_size=PATCH, stride=PATCH).flatten(2) > 0  # (B, A, N)
    assert touch.shape == (2, 3, 2 * 3 * 4) and touch.dtype == torch.bool
    assert torch.equal(touch, ref)
    assert not touch[1, 1].any()


def test_touch_mask_rejects_foreign_labels() -> None:
    with pytest.raises(ValueError, match="expected 0 .background. .. 3"):
        touch_mask(torch.full((1, 2, 2, 2), 5), 3, PATCH)
    with pytest.raises(ValueError, match="integer labels"):
        touch_mask(torch.zeros(1, 2, 2, 2), 3, PATCH)


def _pool(a: int = 3, w: int = 16) -> AnatomyPooling:
    torch.manual_seed(0)
    return AnatomyPooling(num_anatomies=a, width=w, embed_dim=8, heads=4).double()


def test_only_touching_tokens_are_pooled() -> None:
    pool = _pool()
    feats = [torch.randn(2, 10, 16, dtype=torch.double) for _ in range(2)]  # K=2 depths, N=10
    touch = torch.zeros(2, 3, 10, dtype=torch.bool)
    touch[:, 0, :4] = True
    touch[:, 1, 3:7] = True
    touch[:, 2, 8:] = True
    emb, mask = pool(feats, touch)
    assert emb.shape == (2, 3, 8) and mask.all()
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 3, dtype=torch.double))
    changed = [f.clone() for f in feats]
    changed[0][:, 9] += 10.0  # token 9 of depth 1: touches anatomy 3 only
    changed[1][:, 5] -= 10.0  # token 5 of depth 2: touches anatomy 2 only
    emb2, _ = pool(changed, touch)
    torch.testing.assert_close(emb2[:, 0], emb[:, 0])  # anatomy 1 never sees tokens 5 or 9
    assert not torch.allclose(emb2[:, 1], emb[:, 1])
    assert not torch.allclose(emb2[:, 2], emb[:, 2])


def test_absent_anatomy_is_masked_zero_and_never_nan() -> None:
    pool = _pool()
    feats = [torch.randn(2, 10, 16, dtype=torch.double, requires_grad=True)]
    touch = torch.zeros(2, 3, 10, dtype=torch.bool)
    touch[0, 0, :3] = True
    touch[0, 2, 5:] = True
    touch[1, 2, 1] = True  # sample 1: anatomies 1 and 2 absent; sample 0: anatomy 2 absent
    emb, mask = pool(feats, touch)
    assert mask.tolist() == [[True, False, True], [False, False, True]]
    assert torch.isfinite(emb).all()
    assert torch.equal(emb[~mask], torch.zeros_like(emb[~mask]))
    (emb * torch.randn_like(emb)).sum().backward()
    grads = [feats[0].grad] + [p.grad for p in pool.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert pool.query.grad[1].abs().sum() == 0  # nothing flows into a query whose anatomy is nowhere


def test_all_absent_batch_is_finite() -> None:
    pool = _pool()
    feats = [torch.randn(2, 10, 16, dtype=torch.double, requires_grad=True)]
    emb, mask = pool(feats, torch.zeros(2, 3, 10, dtype=torch.bool))
    assert not mask.any() and torch.equal(emb, torch.zeros_like(emb))
    emb.sum().backward()
    assert torch.isfinite(feats[0].grad).all()


def test_cut_anatomy_is_masked() -> None:
    pool = _pool()
    feats = [torch.randn(2, 10, 16, dtype=torch.double)]
    touch = torch.ones(2, 3, 10, dtype=torch.bool)
    cut = torch.tensor([[False, True, False], [False, False, False]])
    emb, mask = pool(feats, touch, cut)
    assert mask.tolist() == [[True, False, True], [True, True, True]]
    assert torch.equal(emb[0, 1], torch.zeros(8, dtype=torch.double))
    with pytest.raises(ValueError, match="cut must be"):
        pool(feats, touch, cut[:, :2])
