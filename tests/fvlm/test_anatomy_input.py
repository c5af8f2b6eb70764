"""The anatomy map as input channels of the vision tower (``vision.anatomy_channels``, issue 15)."""

from __future__ import annotations

import pytest
import torch

from fvlm.model import ModelConfigError, create_model, load_model_config
from fvlm.model.vision import AnatomyInput, voxel_mask

B, A = 2, 15


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(B, 1, 32, 64, 64, generator=g)  # (B, 1, Z, Y, X)
    anatomy = torch.randint(0, A + 1, (B, 32, 64, 64), generator=g)  # (B, Z, Y, X)
    return image, anatomy


def test_config_defaults_off_and_checks_the_count() -> None:
    tiny = load_model_config("tiny")
    assert tiny.vision.anatomy_channels == 0 and tiny.vision.stem_in_channels == 1
    on = load_model_config("tiny-conv", vision={"anatomy_channels": 4})
    assert on.vision.stem_in_channels == 5
    for bad, match in ((-1, "anatomy_channels must be >= 0"), (True, "anatomy_channels must be an integer"),
                       (1.5, "anatomy_channels must be an integer")):
        with pytest.raises(ModelConfigError, match=match):
            load_model_config("tiny", vision={"anatomy_channels": bad})


def test_lookup_puts_each_labels_row_after_the_image() -> None:
    torch.manual_seed(0)
    layer = AnatomyInput(A + 1, 3)
    image, anatomy = _batch()
    x = layer(image, anatomy)  # (B, 4, Z, Y, X)
    assert x.shape == (B, 4, 32, 64, 64)
    assert torch.equal(x[:, :1], image)
    b, z, y, xx = 1, 5, 7, 9
    assert torch.equal(x[b, 1:, z, y, xx], layer.table[anatomy[b, z, y, xx]].detach())
    with pytest.raises(ValueError, match="labels 0..16, expected 0..15"):
        layer(image, torch.full_like(anatomy, A + 1).index_fill_(1, torch.tensor([0]), 0))
    with pytest.raises(ValueError, match="does not match image"):
        layer(image, anatomy[:, :16])


@pytest.mark.parametrize("stem", ["linear", "conv"])
def test_tokens_see_the_map_only_when_asked(stem: str) -> None:
    """Off, the tokens are a function of the image alone; on, relabelling voxels changes the tokens that
    hold them, and the table is trained through the whole model."""
    image, anatomy = _batch()
    other = anatomy.clone()
    other[:, :8] = (other[:, :8] + 1) % (A + 1)  # relabel the first row of patches (z < 8)
    ids = torch.randint(0, 50, (B, A, 6))
    for channels in (0, 4):
        torch.manual_seed(0)
        model = create_model("tiny", vision={"stem": stem, "anatomy_channels": channels}, text={"vocab_size": 50})
        with torch.no_grad():
            t1 = model.vision(model.vision_input(image, anatomy)).last  # (B, N, W)
            t2 = model.vision(model.vision_input(image, other)).last
        if channels == 0:
            assert model.anatomy_input is None and torch.equal(t1, t2)
        else:
            assert not torch.allclose(t1[:, :16], t2[:, :16])  # tokens of the relabelled z-row change
            out = model(image, anatomy, ids, torch.ones_like(ids))
            (out["image_emb"].sum() + out["global_image_emb"].sum()).backward()
            assert model.anatomy_input.table.grad is not None and model.anatomy_input.table.grad.abs().sum() > 0


def test_the_tower_names_the_missing_channels() -> None:
    model = create_model("tiny", vision={"anatomy_channels": 2}, text={"vocab_size": 50})
    image, _ = _batch()
    with pytest.raises(ValueError, match=r"\(B, 3, Z, Y, X\).*FVLM.vision_input"):
        model.vision(image)


def test_masked_patches_hide_their_labels_from_the_conv_stem() -> None:
    """Masked image modelling zeroes the masked patches' voxels in every input channel, the anatomy
    channels included, so relabelling inside masked patches changes no token."""
    torch.manual_seed(0)
    model = create_model("tiny", vision={"stem": "conv", "anatomy_channels": 4}, text={"vocab_size": 50}).eval()
    image, anatomy = _batch()
    token_mask = torch.zeros(B, 64, dtype=torch.bool)
    token_mask[:, 20] = True
    inside = voxel_mask(token_mask, (4, 4, 4), (8, 16, 16))[:, 0]  # (B, Z, Y, X)
    other = torch.where(inside, (anatomy + 3) % (A + 1), anatomy)
    with torch.no_grad():
        t1 = model.vision(model.vision_input(image, anatomy), token_mask=token_mask).last
        t2 = model.vision(model.vision_input(image, other), token_mask=token_mask).last
    assert torch.equal(t1, t2)


def test_export_round_trip_keeps_the_table(tmp_path) -> None:
    from fvlm.model import load_pretrained, save_pretrained

    torch.manual_seed(0)
    model = create_model("tiny-conv", vision={"anatomy_channels": 4}, text={"vocab_size": 50}).eval()
    loaded, _ = load_pretrained(save_pretrained(model, None, tmp_path / "anat"))
    assert loaded.config.vision.anatomy_channels == 4
    image, anatomy = _batch(1)
    with torch.no_grad():
        emb = model.encode_image(image, anatomy)["image_emb"]  # (B, A, D)
        assert torch.equal(loaded.encode_image(image, anatomy)["image_emb"], emb)
