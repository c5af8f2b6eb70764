"""Masked reconstruction: the ViT's optional token mask (default behaviour unchanged), the per-anatomy mask draw,
the head's shapes and gradients, and a loss that counts only the guided region (region head's selection, lesion
map) - changing the target outside it leaves the loss unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from fvlm.losses import create_objective, list_objectives
from fvlm.model import create_model
from fvlm.model.heads import HeadContext, list_heads
from fvlm.model.heads.reconstruct import draw_token_mask
from fvlm.model.vision import patchify

B, A, L, V = 2, 15, 8, 100
PATCH = (8, 16, 16)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.arange(32).view(-1, 1, 1) * 4 // 32
    y = torch.arange(64).view(1, -1, 1) * 4 // 64
    x = torch.arange(64).view(1, 1, -1) * 4 // 64
    anatomy = ((z * 16 + y * 4 + x) % (A + 1)).expand(32, 64, 64).repeat(B, 1, 1, 1)
    anatomy[:, :16] = torch.where(anatomy[:, :16] == 2, 1, anatomy[:, :16])  # anatomy 1 spans several tokens
    return {"image": torch.rand(B, 1, 32, 64, 64, generator=g), "anatomy": anatomy,
            "input_ids": torch.randint(5, V, (B, A, L), generator=g), "attention_mask": torch.ones(B, A, L, dtype=torch.long)}


def _model(**options):
    torch.manual_seed(0)
    return create_model("tiny", text={"vocab_size": V}, heads={"masked_reconstruction": options})


def _context(model, x: dict, **extra) -> HeadContext:
    enc = model.encode_image(x["image"], x["anatomy"], return_context=True)
    text_emb, hidden = model.encode_text(x["input_ids"], x["attention_mask"], return_hidden=True)
    return HeadContext(image=x["image"], anatomy=x["anatomy"], features=enc["features"], tokens=enc["tokens"],
                       grid=enc["grid"], touch=enc["touch"], pooled=enc["pooled"], image_emb=enc["image_emb"],
                       anatomy_mask=enc["anatomy_mask"], input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                       text_hidden=hidden, text_emb=text_emb, extra=dict(extra))


# ------------------------------------------------------------------------------------------ the ViT's mask


def test_vit_without_a_token_mask_is_unchanged() -> None:
    torch.manual_seed(0)
    model = create_model("tiny", text={"vocab_size": V}).eval()
    image = _batch()["image"]
    with torch.no_grad():
        plain = model.vision(image)
        none = model.vision(image, token_mask=None)
        nothing = model.vision(image, token_mask=torch.zeros(B, 64, dtype=torch.bool))
        some = torch.zeros(B, 64, dtype=torch.bool)
        some[:, :10] = True
        masked = model.vision(image, token_mask=some, mask_token=torch.randn(64))
        everything = torch.ones(B, 64, dtype=torch.bool)
        blind_a = model.vision(image, token_mask=everything, mask_token=torch.ones(64))
        blind_b = model.vision(torch.rand_like(image), token_mask=everything, mask_token=torch.ones(64))
    for a, b in zip([plain.last, *plain.features], [none.last, *none.features]):
        assert torch.equal(a, b)
    assert torch.equal(plain.last, nothing.last)
    assert not torch.allclose(plain.last, masked.last)
    assert torch.allclose(blind_a.last, blind_b.last, atol=1e-6)  # every patch replaced: the image is not seen
    assert "mask_token" not in "".join(model.vision.state_dict())  # the tower's parameters are unchanged


@pytest.mark.parametrize("mask, token, words", [(torch.zeros(B, 63, dtype=torch.bool), None, "token_mask"),
                                                (torch.zeros(B, 64), None, "bool"),
                                                (torch.zeros(B, 64, dtype=torch.bool), torch.zeros(3), "mask_token")])
def test_vit_bad_token_mask_is_an_error(mask, token, words) -> None:
    torch.manual_seed(0)
    model = create_model("tiny", text={"vocab_size": V})
    with pytest.raises(ValueError, match=words):
        model.vision(_batch()["image"], token_mask=mask, mask_token=token)


# ------------------------------------------------------------------------------------------ the mask draw


def test_draw_masks_the_ratio_of_each_anatomy_and_of_its_guided_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    inside = torch.rand(3, 5, 40, generator=g) < 0.4
    inside[:, 4] = False  # an absent anatomy
    guided = inside & (torch.rand(3, 5, 40, generator=g) < 0.3)
    for ratio in (0.25, 0.5, 0.75):
        mask = draw_token_mask(inside, guided, ratio, generator=g)  # (3, 40)
        assert mask.shape == (3, 40)
        assert not (mask & ~inside.any(1)).any()  # only tokens of present anatomies
        got = (mask.unsqueeze(1) & inside).sum(-1)
        assert (got >= torch.ceil(ratio * inside.sum(-1))).all()
        got_guided = (mask.unsqueeze(1) & guided).sum(-1)
        assert (got_guided >= torch.ceil(ratio * guided.sum(-1))).all()
        assert (got_guided[guided.any(-1)] >= 1).all()


# ------------------------------------------------------------------------------------------------- the head


def test_registered_shapes_and_gradients() -> None:
    assert "masked_reconstruction" in list_heads() and "guided_reconstruction" in list_objectives()
    model = _model()
    x = _batch()
    out = model(**x)
    t = out["recon_pred"].shape[0]
    voxels = 8 * 16 * 16
    assert out["recon_pred"].shape == out["recon_target"].shape == (t, voxels) and out["recon_weight"].shape == (t,)
    assert out["recon_token_mask"].shape == out["recon_token_weight"].shape == (B, 64)
    counted = out["recon_token_weight"] > 0
    assert t == int(counted.sum()) and not (counted & ~out["recon_token_mask"]).any()
    # uniform guide (no region head, no lesion map): every present anatomy's masked tokens sum to weight 1
    present = out["anatomy_mask"].sum(-1).float()
    assert torch.allclose(out["recon_token_weight"].sum(-1), present)
    assert torch.allclose(out["recon_target"], patchify(x["image"], PATCH)[counted])
    loss = create_objective("guided_reconstruction")(**out, **x)["guided_reconstruction"]
    assert math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    head = model.heads["masked_reconstruction"]
    for name, p in [*head.named_parameters(), ("vision.patch_embed", model.vision.patch_embed.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _region(ctx: HeadContext, seed: int = 0) -> torch.Tensor:
    """A made-up selection: 2 random tokens of each present anatomy (1 on them, 0 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    inside = ctx.touch & ctx.anatomy_mask.unsqueeze(-1)
    score = torch.rand(inside.shape, generator=g).masked_fill(~inside, -1.0)
    top = score.topk(2, dim=-1).indices
    sel = torch.zeros_like(inside).scatter_(-1, top, True) & inside
    return sel.float()


def test_the_loss_counts_only_the_selected_region() -> None:
    model = _model(mask_ratio=0.5)
    x = _batch()
    ctx = _context(model, x)
    region = _region(ctx)
    ctx.extra["region_weights"] = region
    torch.manual_seed(3)
    out = model.heads["masked_reconstruction"](model, ctx)
    w, mask = out["recon_token_weight"], out["recon_token_mask"]
    selected = region.bool().any(1)  # (B, N)
    assert (w > 0).any() and not ((w > 0) & ~(selected & mask)).any()  # only masked tokens of the selection
    assert torch.allclose(w.sum(-1), ctx.anatomy_mask.sum(-1).float())  # each anatomy with a selection counts once
    # the loss over the whole grid, as a reference: outside the selection the weight is 0
    objective = create_objective("guided_reconstruction")
    loss = objective(**out)["guided_reconstruction"]
    counted = w > 0
    full_target = patchify(x["image"], PATCH)  # (B, N, P)
    pred_full = torch.zeros_like(full_target)
    pred_full[counted] = out["recon_pred"].detach()
    ref = ((pred_full - full_target).abs().mean(-1) * w).sum() / w.sum()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # change the target (the image) outside the selected region: the head's target rows and the loss stay
    changed = x["image"].clone()
    patches = patchify(changed, PATCH)
    outside = ~counted
    patches[outside] = torch.rand_like(patches[outside])
    changed_target = patches[counted]
    assert torch.equal(changed_target, out["recon_target"])
    again = objective(recon_pred=out["recon_pred"], recon_target=changed_target, recon_weight=out["recon_weight"])
    assert again["guided_reconstruction"].item() == loss.item()
    # ...while changing it inside does change the loss
    inside_changed = out["recon_target"].clone()
    inside_changed[0] += 0.5
    moved = objective(recon_pred=out["recon_pred"], recon_target=inside_changed, recon_weight=out["recon_weight"])
    assert moved["guided_reconstruction"].item() != loss.item()


@pytest.mark.slow
def test_the_region_weights_are_not_trained_by_reconstruction() -> None:
    model = _model()
    x = _batch()
    ctx = _context(model, x)
    region = _region(ctx).requires_grad_(True)
    ctx.extra["region_weights"] = region * 1.0
    out = model.heads["masked_reconstruction"](model, ctx)
    create_objective("guided_reconstruction")(**out)["guided_reconstruction"].backward()
    assert region.grad is None


@pytest.mark.slow
def test_region_head_first_guides_the_reconstruction() -> None:
    torch.manual_seed(0)
    model = create_model("tiny", text={"vocab_size": V}, heads={"region": {"k": 2}, "masked_reconstruction": {}})
    out = model(**_batch())
    w = out["recon_token_weight"]
    selected = (out["region_weights"].detach() > 0).any(1)
    assert (w > 0).any() and not ((w > 0) & ~selected).any()


def test_lesion_map_guides_when_there_is_no_region_head() -> None:
    model = _model(guide="lesion")
    x = _batch()
    lesion = torch.zeros(B, 32, 64, 64, dtype=torch.long)
    lesion[:, 8:16, 16:32, 16:24] = 1  # half of one patch (token (1, 1, 1))
    out = model(**x, lesion=lesion)
    w = out["recon_token_weight"]
    token = 1 * 16 + 1 * 4 + 1
    assert torch.equal((w > 0).nonzero()[:, 1], torch.tensor([token, token]))  # only the lesion's token, per sample
    assert out["recon_token_mask"][:, token].all()  # a guided token is always among the masked ones
    with pytest.raises(ValueError, match="lesion"):
        model(**x)  # guide=lesion without a lesion map


def test_objective_with_nothing_counted_is_zero_and_keeps_the_graph() -> None:
    pred = torch.zeros(0, 5, requires_grad=True)
    out = create_objective("guided_reconstruction")(recon_pred=pred, recon_target=torch.zeros(0, 5),
                                                    recon_weight=torch.zeros(0))["guided_reconstruction"]
    assert out.item() == 0.0 and out.requires_grad
    out.backward()


def test_objective_l2_and_bad_inputs() -> None:
    pred, target = torch.tensor([[1.0, 3.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    weight = torch.tensor([1.0, 3.0])
    l2 = create_objective("guided_reconstruction", kind="l2")(recon_pred=pred, recon_target=target, recon_weight=weight)
    assert l2["guided_reconstruction"].item() == pytest.approx((1 * 5.0 + 3 * 2.0) / 4)
    with pytest.raises(ValueError, match="kind"):
        create_objective("guided_reconstruction", kind="l3")
    with pytest.raises(ValueError, match=r"\(T, P\)"):
        create_objective("guided_reconstruction")(recon_pred=pred, recon_target=target[:1], recon_weight=weight)
    with pytest.raises(ValueError, match="masked_reconstruction head"):
        create_objective("guided_reconstruction")()


def test_norm_target_normalises_each_patch() -> None:
    model = _model(norm_target=True)
    out = model(**_batch())
    t = out["recon_target"]
    assert torch.allclose(t.mean(-1), torch.zeros(t.shape[0]), atol=1e-4)
    assert torch.allclose(t.std(-1, unbiased=False), torch.ones(t.shape[0]), atol=1e-3)


@pytest.mark.parametrize("options, words", [({"mask_ratio": 1.0}, "mask_ratio"), ({"guide": "text"}, "guide"),
                                             ({"decoder_depth": -1}, "decoder_depth")])
def test_bad_options_are_errors(options: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        _model(**options)
