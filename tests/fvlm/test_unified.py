"""The label_unified objective: label-agreement soft targets on hand-made label vectors, the loss against a
plain per-anatomy loop, gradients, label-only rows (text term and disease_aware's has_report mask)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fvlm.losses import create_objective
from fvlm.losses.unified import LabelUnified, label_agreement


def _labels(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_exact_agreement_on_hand_made_vectors():
    lab = _labels([1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0], [1, 1, 0]).unsqueeze(0)  # (A=1, N=5, K=3)
    want = torch.tensor([[1, 1, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [0, 0, 1, 1, 0],   # normal-normal: positive
                         [0, 0, 1, 1, 0],
                         [0, 0, 0, 0, 1]], dtype=torch.float32)
    assert torch.equal(label_agreement(lab, "exact")[0], want)


def test_jaccard_agreement_on_hand_made_vectors():
    lab = _labels([1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 1]).unsqueeze(0)
    got = label_agreement(lab, "jaccard")[0]
    want = torch.tensor([[1, 1 / 2, 0, 0],
                         [1 / 2, 1, 0, 1 / 3],
                         [0, 0, 1, 0],           # two empty vectors agree fully
                         [0, 1 / 3, 0, 1]])
    assert torch.allclose(got, want)


def test_soft_targets_add_the_same_case_and_are_per_anatomy():
    obj = LabelUnified(mode="exact")
    # N=3 samples, A=2 anatomies, K=2; samples 0 and 2 are the same case
    labels = torch.tensor([[[1, 0], [0, 0]],
                           [[1, 0], [0, 1]],
                           [[0, 1], [0, 1]]]).bool()
    y = obj.soft_targets(torch.tensor([7, 8, 7]), labels)  # (A, N, N)
    assert torch.equal(y[0], torch.tensor([[1., 1, 1], [1, 1, 0], [1, 0, 1]]))
    assert torch.equal(y[1], torch.tensor([[1., 0, 1], [0, 1, 1], [1, 1, 1]]))


def _reference(img, lab, mask, labels, scale, mode="exact"):
    """Per anatomy, a plain loop over the present samples (module docstring's formula)."""
    total = 0.0
    n, a, _ = img.shape
    for k in range(a):
        idx = [i for i in range(n) if mask[i, k]]
        lk = (labels[idx, k] > 0.5).float()
        if len(idx) < 2 or not lk.any():
            continue
        y = label_agreement(lk.unsqueeze(0), mode)[0].double()
        y.fill_diagonal_(1.0)
        s = scale * img[idx, k] @ lab[idx, k].T
        i2t = -(y / y.sum(1, keepdim=True) * F.log_softmax(s, 1)).sum(1).mean()
        t2i = -(y.T / y.T.sum(1, keepdim=True) * F.log_softmax(s.T, 1)).sum(1).mean()
        total += 0.5 * (i2t + t2i)
    return total


@pytest.mark.parametrize("mode", ["exact", "jaccard"])
def test_loss_matches_a_plain_per_anatomy_loop_and_gradients_flow(mode):
    g = torch.Generator().manual_seed(0)
    n, a, d, k = 6, 3, 8, 3
    img = F.normalize(torch.randn(n, a, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    lab = F.normalize(torch.randn(n, a, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    mask = torch.rand(n, a, generator=g) < 0.8
    mask[:, 0] = True
    labels = (torch.rand(n, a, k, generator=g) < 0.4).float()
    labels[:, 2] = 0  # an all-normal anatomy: nothing to learn, not counted
    out = LabelUnified(mode=mode)(image_emb=img, label_text_emb=lab, anatomy_mask=mask, anatomy_labels=labels,
                                  logit_scale=torch.tensor(10.0, dtype=torch.float64))
    assert set(out) == {"label_unified"}
    with torch.no_grad():
        ref = _reference(img, lab, mask, labels, 10.0, mode)
    assert float(out["label_unified"].detach()) == pytest.approx(float(ref), rel=1e-9)
    out["label_unified"].backward()
    assert img.grad.abs().sum() > 0 and lab.grad.abs().sum() > 0
    assert torch.isfinite(img.grad).all() and torch.isfinite(lab.grad).all()


def test_perfectly_aligned_label_sentences_reach_the_floor():
    """Identical label vectors get identical embeddings: the image of a sample sits on its label sentence."""
    labels = _labels([1, 0], [1, 0], [0, 1], [0, 0]).view(4, 1, 2)
    protos = F.normalize(torch.eye(4)[:3], dim=-1)
    key = {(1, 0): 0, (0, 1): 1, (0, 0): 2}
    emb = torch.stack([protos[key[tuple(int(v) for v in r[0])]] for r in labels]).unsqueeze(1)  # (4, 1, 4)
    out = LabelUnified()(image_emb=emb, label_text_emb=emb, anatomy_mask=torch.ones(4, 1, dtype=torch.bool),
                         anatomy_labels=labels, logit_scale=torch.tensor(100.0))
    # rows 0 and 1 share a label sentence: each splits its mass over two positives (entropy log 2 per row)
    floor = 0.5 * (2 * math.log(2) / 4 + 2 * math.log(2) / 4)
    assert float(out["label_unified"]) == pytest.approx(floor, abs=1e-4)


def test_text_term_leaves_label_only_rows_out():
    g = torch.Generator().manual_seed(1)
    n, a, d = 4, 2, 8
    img = F.normalize(torch.randn(n, a, d, generator=g), dim=-1)
    lab = F.normalize(torch.randn(n, a, d, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(n, a, d, generator=g), dim=-1).requires_grad_()
    labels = (torch.rand(n, a, 2, generator=g) < 0.5).float()
    labels[0, :, 0] = 1
    has_report = torch.tensor([True, False, True, True])
    obj = create_objective("label_unified", text_weight=0.5, image_weight=2.0)
    assert obj.terms == ("label_unified", "label_unified_text")
    kw = dict(image_emb=img, label_text_emb=lab, anatomy_mask=torch.ones(n, a, dtype=torch.bool),
              anatomy_labels=labels, logit_scale=torch.tensor(5.0), case_id=torch.arange(n))
    out = obj(text_emb=txt, has_report=has_report, **kw)
    out["label_unified_text"].backward()
    assert txt.grad[1].abs().sum() == 0  # the label-only case's (empty) text never takes part
    assert txt.grad[[0, 2, 3]].abs().sum() > 0
    assert lab.grad[1].abs().sum() > 0  # but its label sentence is a column of the text term
    # garbage in the label-only case's text changes nothing
    junk = txt.detach().clone()
    junk[1] = F.normalize(torch.randn(a, d, generator=g), dim=-1)
    again = obj(text_emb=junk, has_report=has_report, **kw)
    assert float(again["label_unified_text"]) == pytest.approx(float(out["label_unified_text"]))
    assert float(again["label_unified"]) == pytest.approx(float(out["label_unified"]))
    # weights scale the terms
    plain = create_objective("label_unified")(**kw)
    assert float(out["label_unified"]) == pytest.approx(2.0 * float(plain["label_unified"]))


def test_disease_aware_masks_label_only_rows():
    """A label-only case (has_report False, empty text) can form no pair in disease_aware: the loss equals the
    loss of the batch without it, whatever its text embedding holds."""
    g = torch.Generator().manual_seed(2)
    n, a, d = 5, 2, 8
    img = F.normalize(torch.randn(n, a, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, a, d, generator=g), dim=-1)
    normal = torch.tensor([[True, False], [False, False], [True, True], [False, True], [True, True]])
    labels = (~normal).float().unsqueeze(-1).expand(n, a, 2).clone()
    batch = dict(anatomy_mask=torch.ones(n, a, dtype=torch.bool), logit_scale=torch.tensor(10.0),
                 case_id=torch.arange(n), text_id=torch.arange(n * a).view(n, a), normal=normal,
                 anatomy_labels=labels)
    obj = create_objective("disease_aware")
    hr = torch.tensor([True, True, True, True, False])
    masked = obj(image_emb=img, text_emb=txt, has_report=hr, **batch)["disease_aware"]
    keep = hr.nonzero().squeeze(1)
    without = obj(image_emb=img[keep], text_emb=txt[keep], **{k: (v[keep] if torch.is_tensor(v) and v.dim() else v)
                                                             for k, v in batch.items()})["disease_aware"]
    assert float(masked) == pytest.approx(float(without))
    unmasked = obj(image_emb=img, text_emb=txt, **batch)["disease_aware"]
    assert float(unmasked) != pytest.approx(float(without))  # the normal label-only row would pair otherwise


def test_errors_name_what_is_missing():
    obj = LabelUnified()
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="prompt_context"):
        obj(image_emb=x, anatomy_mask=torch.ones(2, 3, dtype=torch.bool), logit_scale=1.0,
            anatomy_labels=torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match="anatomy_labels"):
        obj(image_emb=x, label_text_emb=x, anatomy_mask=torch.ones(2, 3, dtype=torch.bool), logit_scale=1.0)
    with pytest.raises(ValueError, match="text_emb"):
        LabelUnified(text_weight=1.0)(image_emb=x, label_text_emb=x, anatomy_mask=torch.ones(2, 3, dtype=torch.bool),
                                      logit_scale=1.0, anatomy_labels=torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match="mode"):
        LabelUnified(mode="cosine")
    with pytest.raises(ValueError, match="text_weight"):
        LabelUnified(text_weight=-1)


def test_nothing_usable_still_gives_a_zero_with_a_graph():
    x = F.normalize(torch.randn(3, 2, 4), dim=-1).requires_grad_()
    out = LabelUnified(text_weight=1.0)(image_emb=x, label_text_emb=x, text_emb=x,
                                        anatomy_mask=torch.zeros(3, 2, dtype=torch.bool), logit_scale=torch.tensor(5.0),
                                        anatomy_labels=torch.ones(3, 2, 1))
    total = sum(out.values())
    assert float(total) == 0.0
    total.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
