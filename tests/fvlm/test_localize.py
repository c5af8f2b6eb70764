"""Region-head localisation maps (``fvlm.localize``): zero outside the anatomy, a distribution over its tokens,
the selection/attention/product variants, the top-k restriction, and clear errors (no region head, a
whole-study task) in the library and in ``fvlm predict --heatmap-mode region``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fvlm.localize import region_head, region_map
from fvlm.model import create_model, touch_mask

A = 15


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tiny", heads={"region": {"k": 3}}).eval()


def _inputs(seed: int = 0, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 1, 32, 64, 64, generator=g)
    anatomy = torch.randint(0, A + 1, (b, 32, 64, 64), generator=g)
    anatomy[1][anatomy[1] == 5] = 0  # anatomy 5 (index 4) absent from sample 1
    anatomy[0, :, :32] = torch.where(anatomy[0, :, :32] == 5, 0, anatomy[0, :, :32])
    ids = torch.randint(5, 100, (2, 8), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return image, anatomy, ids, mask


@pytest.mark.parametrize("combine", ["product", "attention", "selection"])
def test_map_is_a_distribution_on_the_anatomy_and_zero_outside(model, combine: str) -> None:
    image, anatomy, ids, mask = _inputs()
    a = 4
    m, grid = region_map(model, image, anatomy, ids, mask, a, combine=combine, normalize="sum", topk_only=False)
    assert grid == (4, 4, 4) and m.shape == (2, 4, 4, 4)
    touch = touch_mask(anatomy, A, model.vision.patch_size)[:, a]  # (B, N)
    flat = m.flatten(1)
    assert touch[0].any() and not touch[1].any()
    assert torch.equal(flat[~touch], torch.zeros_like(flat[~touch]))  # zero outside the anatomy ...
    assert torch.equal(flat[1], torch.zeros_like(flat[1]))  # ... and where it is absent
    assert flat[0].sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (flat[0][touch[0]] > 0).all()
    peak, _ = region_map(model, image, anatomy, ids, mask, a, combine=combine, topk_only=False)
    assert peak.flatten(1)[0].max().item() == pytest.approx(1.0)
    assert torch.allclose(peak.flatten(1)[0] * flat[0].max(), flat[0], atol=1e-6)


def test_selection_map_is_the_scorer_distribution(model) -> None:
    image, anatomy, ids, mask = _inputs(1)
    m, _ = region_map(model, image, anatomy, ids, mask, 2, combine="selection", normalize="sum", topk_only=False)
    head = model.heads["region"]
    with torch.no_grad():
        tokens = model.vision(image).features[head.layer]
        probs, *_ = head.select(tokens, touch_mask(anatomy, A, model.vision.patch_size))
    assert torch.allclose(m.flatten(1), probs[:, 2], atol=1e-6)


def test_the_default_map_is_the_training_attention_over_the_kept_tokens() -> None:
    """Issue 22: the map attends the same top-k set, through the same learned query/key maps, as training: with
    the anatomy's own text as the prompt, the attention map is the head's ``region_attention``."""
    torch.manual_seed(3)
    model = create_model("tiny", heads={"region": {"k": 3}}).eval()
    head = model.heads["region"]
    with torch.no_grad():  # learned maps away from the identity, so the test sees them
        for lin in (head.query, head.key, head.value):
            lin.weight.add_(0.3 * torch.randn_like(lin.weight))
    image, anatomy, ids, mask = _inputs(4)
    a = 6
    m, _ = region_map(model, image, anatomy, ids[:1], mask[:1], a, combine="attention", normalize="sum")
    text_ids = ids[:1].expand(A, -1).unsqueeze(0).expand(2, A, -1).contiguous()  # (B, A, L): every text the prompt
    text_mask = mask[:1].expand(A, -1).unsqueeze(0).expand(2, A, -1).contiguous()  # (B, A, L)
    with torch.no_grad():
        out = model(image, anatomy, text_ids, text_mask)
    want = out["region_attention"][:, a]  # (B, N)
    assert torch.allclose(m.flatten(1), want, atol=1e-5)
    assert ((m.flatten(1) > 0).sum(-1) <= 3).all()


def test_topk_only_keeps_the_selected_tokens(model) -> None:
    image, anatomy, ids, mask = _inputs(2)
    m, _ = region_map(model, image, anatomy, ids, mask, 7, topk_only=True, normalize="sum")
    nonzero = (m.flatten(1) > 0).sum(-1)
    touching = touch_mask(anatomy, A, model.vision.patch_size)[:, 7].sum(-1)
    assert torch.equal(nonzero, touching.clamp(max=3))


def test_errors_name_the_problem(model) -> None:
    image, anatomy, ids, mask = _inputs()
    plain = create_model("tiny")
    with pytest.raises(ValueError, match="no region head"):
        region_head(plain)
    with pytest.raises(ValueError, match="whole-study"):
        region_map(model, image, anatomy, ids, mask, -1)
    with pytest.raises(ValueError, match="combine"):
        region_map(model, image, anatomy, ids, mask, 0, combine="max")


def test_predict_region_mode_without_a_region_head_is_a_clear_error(tmp_path: Path) -> None:
    from anatomy.catalog import load_anatomy_set
    from fvlm.model import save_pretrained, train_wordpiece
    from pipelines.predict.run import predict

    tok = train_wordpiece(["lung nodule is present", "not lung nodule"] * 5, vocab_size=100, min_frequency=1)
    plain = create_model("tiny", anatomy_names=tuple(load_anatomy_set("fvlm15").names), text={"vocab_size": len(tok)})
    save_pretrained(plain, tok, tmp_path / "model")
    # the check comes before the scan is read: no scan is needed to see it
    with pytest.raises(ValueError, match="no region head"):
        predict(tmp_path / "model", tmp_path / "absent.nii.gz", masks=tmp_path / "absent_masks.nii.gz",
                heatmap="lung_nodule", heatmap_mode="region")


def test_evaluate_report_writes_the_maps(tmp_path: Path) -> None:
    """``fvlm evaluate --maps``: one PNG per map (or arrays without matplotlib), one row per map for the report."""
    from types import SimpleNamespace

    import numpy as np

    from pipelines.evaluate.report import write_maps

    g = np.random.default_rng(0)
    anatomy = np.zeros((8, 8), bool)
    anatomy[2:6, 2:6] = True
    maps = [{"case_id": f"c{i}", "task": "lung_nodule", "anatomy": "lung", "score": 0.7, "method": "region head",
             "z": 3, "image": g.random((8, 8)), "map": g.random((8, 8)) * anatomy, "anatomy_mask": anatomy}
            for i in range(2)]
    rows = write_maps(SimpleNamespace(maps=maps), tmp_path)
    assert [r["case_id"] for r in rows] == ["c0", "c1"]
    for r in rows:
        assert (tmp_path / r["file"]).is_file()
        assert r["uri"] is None or r["uri"].startswith("data:image/png;base64,")
    assert write_maps(SimpleNamespace(maps=[]), tmp_path / "none") == []
