"""3D ViT: token grid, position-embedding interpolation, SDPA vs a plain reference, checkpointing, the conv stem."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fvlm.model import (
    ModelConfig,
    ModelConfigError,
    VisionConfig,
    ViT3D,
    create_model,
    load_model_config,
    patchify,
    token_grid,
)
from fvlm.model.vision import Attention, ConvStem


def tiny_cfg(**kw) -> VisionConfig:
    base = dict(image_size=(32, 64, 64), patch_size=(8, 16, 16), width=32, depth=3, heads=4, mlp_ratio=2.0,
                output_layers=(1, 2, -1))
    base.update(kw)
    return VisionConfig(**base)


def test_base_geometry_gives_1232_tokens() -> None:
    cfg = load_model_config("base").vision
    assert cfg.patch_size == (16, 16, 32)
    assert cfg.grid == (7, 16, 11) and math.prod(cfg.grid) == 1232
    assert token_grid((112, 256, 352), cfg.patch_size) == (7, 16, 11)
    assert cfg.resolved_output_layers() == (3, 6, 9, 12)


def test_tiny_output_shapes_and_layers() -> None:
    torch.manual_seed(0)
    vit = ViT3D(tiny_cfg()).eval()
    out = vit(torch.rand(2, 1, 32, 64, 64))
    assert out.grid == (4, 4, 4)
    assert len(out.features) == 3 and all(f.shape == (2, 64, 32) for f in out.features)
    assert out.last is out.features[-1]
    vit2 = ViT3D(tiny_cfg(output_layers=(1,)))
    out2 = vit2(torch.rand(1, 1, 32, 64, 64))
    assert len(out2.features) == 1 and out2.last.shape == (1, 64, 32) and vit2.norm is not None


def test_patch_embedding_equals_conv3d() -> None:
    """patchify + Linear is the Conv3d with kernel = stride = patch, tokens in row-major (z, y, x) order."""
    torch.manual_seed(0)
    vit = ViT3D(tiny_cfg())
    x = torch.rand(2, 1, 32, 64, 64)
    tokens = vit.patch_embed(patchify(x, vit.patch_size))  # (B, N, W)
    weight = vit.patch_embed.weight.reshape(32, 1, 8, 16, 16)
    conv = F.conv3d(x, weight, vit.patch_embed.bias, stride=(8, 16, 16))  # (B, W, gz, gy, gx)
    torch.testing.assert_close(tokens, conv.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_position_embeddings_interpolate_to_other_sizes() -> None:
    torch.manual_seed(0)
    vit = ViT3D(tiny_cfg()).eval()
    torch.testing.assert_close(vit.position_embedding((4, 4, 4)), vit.pos_embed.flatten(2).transpose(1, 2))
    assert vit.position_embedding((6, 2, 7)).shape == (1, 84, 32)
    with torch.no_grad():  # a constant field stays constant under trilinear interpolation
        vit.pos_embed.fill_(0.5)
    torch.testing.assert_close(vit.position_embedding((5, 3, 9)), torch.full((1, 135, 32), 0.5))
    out = vit(torch.rand(1, 1, 48, 32, 112))
    assert out.grid == (6, 2, 7) and out.features[0].shape == (1, 84, 32)
    assert all(torch.isfinite(f).all() for f in out.features)


def test_input_not_multiple_of_patch_is_an_error() -> None:
    vit = ViT3D(tiny_cfg())
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        vit(torch.rand(1, 1, 30, 64, 64))
    with pytest.raises(ValueError, match=r"image must be \(B, 1"):
        vit(torch.rand(1, 32, 64, 64))


def test_sdpa_attention_equals_plain_softmax_reference() -> None:
    torch.manual_seed(0)
    attn = Attention(width=16, heads=4).double()
    x = torch.randn(2, 10, 16, dtype=torch.double, requires_grad=True)
    out = attn(x)
    b, n, w = x.shape
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(b, n, 3, 4, 4).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, h, N, d)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
    ref = F.linear((weights @ v).transpose(1, 2).reshape(b, n, w), attn.proj.weight, attn.proj.bias)
    torch.testing.assert_close(out, ref)
    g_out, = torch.autograd.grad(out.square().sum(), x)
    g_ref, = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(g_out, g_ref)


def test_activation_checkpointing_same_outputs_and_grads() -> None:
    torch.manual_seed(0)
    plain = ViT3D(tiny_cfg())
    ckpt = ViT3D(tiny_cfg(grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(2, 1, 32, 64, 64)
    results = []
    for model in (plain, ckpt):
        model.zero_grad()
        out = model(x)
        loss = sum((f * torch.linspace(-1, 1, f.shape[-1])).sum() for f in out.features)
        loss.backward()
        results.append(([f.detach() for f in out.features], {n: p.grad.clone() for n, p in model.named_parameters()}))
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b)
    assert results[0][1].keys() == results[1][1].keys()
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], msg=name)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(heads=5), "does not divide width"),
        (dict(image_size=(30, 64, 64)), "not a multiple of patch_size"),
        (dict(output_layers=(2, -2)), "name a block twice"),
        (dict(output_layers=(7,)), "outside blocks"),
        (dict(patch_size=(8, 16)), "three positive integers"),
    ],
)
def test_invalid_vision_config(kw, match) -> None:
    with pytest.raises(ModelConfigError, match=match):
        tiny_cfg(**kw)


# ---- conv stem -------------------------------------------------------------------------------------------
def conv_cfg(patch=(8, 16, 16), channels=(4, 8), image=(32, 64, 64), **kw) -> VisionConfig:
    return tiny_cfg(image_size=image, patch_size=patch, stem="conv", stem_channels=channels, depth=1,
                    output_layers=(-1,), **kw)


def patch_box(n: int, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """Voxel slices (z, y, x) of patch n (row-major over the grid)."""
    gz, gy, gx = grid
    idx = (n // (gy * gx), (n // gx) % gy, n % gx)
    return tuple(slice(i * p, (i + 1) * p) for i, p in zip(idx, patch))  # type: ignore[return-value]


@pytest.mark.parametrize(
    "patch, channels, strides, rest",
    [
        ((8, 8, 8), (4, 8, 8), ((2, 2, 2),) * 3, (1, 1, 1)),
        ((8, 16, 16), (4, 8, 8), ((2, 2, 2),) * 3, (1, 2, 2)),
        ((16, 16, 32), (4, 8), ((2, 2, 2),) * 2, (4, 4, 8)),
        ((4, 16, 16), (4, 8, 8), ((2, 2, 2), (2, 2, 2), (1, 2, 2)), (1, 2, 2)),
        ((6, 8, 8), (4, 8), ((2, 2, 2), (1, 2, 2)), (3, 2, 2)),
    ],
)
def test_conv_stem_strides_rule(patch, channels, strides, rest) -> None:
    cfg = VisionConfig(image_size=tuple(4 * p for p in patch), patch_size=patch, stem="conv", stem_channels=channels)
    assert cfg.stem_strides() == (strides, rest)
    for axis in range(3):
        assert math.prod(s[axis] for s in strides) * rest[axis] == patch[axis]


@pytest.mark.slow
@pytest.mark.parametrize(
    "patch, channels, image",
    [((8, 16, 16), (4, 8), (32, 64, 64)), ((8, 8, 8), (4, 8, 8), (32, 48, 40)), ((16, 16, 32), (4, 8), (32, 32, 64)),
     ((4, 8, 16), (4, 8, 8), (12, 24, 32)), ((6, 8, 8), (4, 8), (12, 16, 24))],
)
def test_conv_stem_grid_equals_linear_stem(patch, channels, image) -> None:
    torch.manual_seed(0)
    linear = ViT3D(tiny_cfg(image_size=image, patch_size=patch, depth=1, output_layers=(-1,))).eval()
    conv = ViT3D(conv_cfg(patch, channels, image)).eval()
    x = torch.rand(2, 1, *image)
    a, b = linear(x), conv(x)
    assert b.grid == a.grid == token_grid(image, patch)
    assert b.last.shape == a.last.shape == (2, math.prod(a.grid), 32)
    assert conv.embed_patches(x).shape == linear.embed_patches(x).shape
    assert conv.patch_size == linear.patch_size == patch  # what anatomy pooling's touch mask reads
    out = conv(torch.rand(1, 1, *(2 * s for s in image)))  # other sizes: position embeddings interpolate
    assert out.grid == tuple(2 * g for g in a.grid) and torch.isfinite(out.last).all()


@pytest.mark.parametrize("patch, channels", [((8, 16, 16), (4, 8, 8)), ((8, 8, 8), (4, 8, 8)), ((4, 8, 16), (4, 8))])
def test_conv_stem_receptive_field_is_centred_on_its_patch(patch, channels) -> None:
    """Token n's receptive field (norms removed: GroupNorm couples every voxel through its statistics) is
    patch n widened by the same margin e = 1 + 2 + ... + q_{K-1} on both sides of every axis."""
    torch.manual_seed(0)
    cfg = conv_cfg(patch, channels, image=tuple(4 * p for p in patch))
    stem = ConvStem(cfg).double()
    for i, m in enumerate(stem.stages):
        if isinstance(m, torch.nn.GroupNorm):
            stem.stages[i] = torch.nn.Identity()
    strides, _ = cfg.stem_strides()
    margin = [sum(math.prod(s[a] for s in strides[:i]) for i in range(len(strides))) for a in range(3)]
    grid = cfg.grid
    for n in (0, math.prod(grid) // 2 + 1, math.prod(grid) - 1):
        x = torch.randn(1, 1, *cfg.image_size, dtype=torch.double, requires_grad=True)
        g, = torch.autograd.grad(stem(x)[0, n].sum(), x)
        seen = g[0, 0].abs() > 0  # (Z, Y, X)
        for axis, box in enumerate(patch_box(n, grid, patch)):
            hit = seen.flatten(axis + 1).any(-1) if axis == 0 else seen.transpose(0, axis).flatten(1).any(-1)
            lo, hi = [int(i) for i in hit.nonzero()[[0, -1], 0]]
            assert lo == max(box.start - margin[axis], 0), (n, axis)
            assert hi == min(box.stop - 1 + margin[axis], cfg.image_size[axis] - 1), (n, axis)


@pytest.mark.slow
@pytest.mark.parametrize(
    "patch, channels, image",
    [((8, 16, 16), (4, 8, 8), (32, 64, 64)), ((8, 8, 8), (4, 8, 8), (32, 32, 32)), ((4, 8, 8), (4, 8), (16, 32, 32))],
)
def test_conv_stem_token_of_a_lone_patch_is_that_patch(patch, channels, image) -> None:
    """An image that is zero except inside patch n: the stem token that differs most from the background
    (median) token is n. Box filters make the stem a centred smoothing, so the answer is fixed by geometry."""
    stem = ConvStem(conv_cfg(patch, channels, image))
    with torch.no_grad():
        for m in stem.modules():
            if isinstance(m, torch.nn.Conv3d):
                m.weight.fill_(1.0 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
    grid = token_grid(image, patch)
    g = torch.Generator().manual_seed(0)
    for n in range(math.prod(grid)):
        x = torch.zeros(1, 1, *image)
        x[(0, 0, *patch_box(n, grid, patch))] = 0.5 + torch.rand(patch, generator=g)
        with torch.no_grad():
            tokens = stem(x)[0]  # (N, W)
        dev = (tokens - tokens.median(dim=0).values).norm(dim=-1)  # (N,)
        assert int(dev.argmax()) == n


def test_conv_stem_token_mask() -> None:
    torch.manual_seed(0)
    vit = ViT3D(conv_cfg()).eval()
    x = torch.rand(2, 1, 32, 64, 64)
    n = 64
    none = torch.zeros(2, n, dtype=torch.bool)
    torch.testing.assert_close(vit(x, token_mask=none).last, vit(x).last)
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[0, 21] = mask[1, [0, 42]] = True
    mask_token = torch.randn(32)
    out = vit(x, token_mask=mask, mask_token=mask_token)
    assert out.grid == (4, 4, 4) and torch.isfinite(out.last).all()
    # The masked patches' voxels reach no token (receptive fields overlap, so they are zeroed before the stem).
    y = x.clone()
    y[(0, 0, *patch_box(21, out.grid, vit.patch_size))] = 5.0
    y[(1, 0, *patch_box(42, out.grid, vit.patch_size))] = -3.0
    torch.testing.assert_close(vit(y, token_mask=mask, mask_token=mask_token).last, out.last)
    assert not torch.allclose(vit(y).last, vit(x).last)
    # Everything masked: the output no longer depends on the image.
    every = torch.ones(2, n, dtype=torch.bool)
    torch.testing.assert_close(vit(x, token_mask=every).last, vit(torch.rand_like(x), token_mask=every).last)
    with pytest.raises(ValueError, match="token_mask must be"):
        vit(x, token_mask=torch.zeros(2, n - 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_token must be"):
        vit(x, token_mask=mask, mask_token=torch.zeros(31))


def test_conv_stem_reset_parameters_and_checkpointing() -> None:
    torch.manual_seed(0)
    plain = ViT3D(conv_cfg())
    stem = plain.patch_embed
    assert isinstance(stem, ConvStem) and not hasattr(plain.patch_embed, "weight")
    norms = [m for m in stem.stages if isinstance(m, torch.nn.GroupNorm)]
    assert [m.num_groups for m in norms] == [4, 8] and all(bool((m.weight == 1).all()) for m in norms)
    assert float(stem.proj.bias.detach().abs().max()) == 0.0
    bound = math.sqrt(6.0 / (stem.proj.weight[0].numel() + 32))  # xavier on the (W, C_K * prod(rest)) matrix
    assert float(stem.proj.weight.detach().abs().max()) <= bound
    ckpt = ViT3D(conv_cfg(grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(1, 1, 32, 64, 64)
    grads = []
    for model in (plain, ckpt):
        model.zero_grad()
        model(x).last.square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], msg=k)
    assert float(grads[0]["patch_embed.stages.0.weight"].abs().sum()) > 0


def test_conv_stem_flops_per_voxel() -> None:
    """The formula of the module docstring, on the base geometry with channels 16, 32, 64."""
    stem = ConvStem(VisionConfig(stem="conv", stem_channels=(16, 32, 64)))
    assert stem.flops_per_voxel() == 256 + 1024 + 512 + 192


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(stem="convolution"), "unknown stem 'convolution'; choose one of linear, conv"),
        (dict(stem="conv", patch_size=(8, 15, 16)), r"cannot factor patch_size \[8, 15, 16\]: side y=15 is odd"),
        (dict(stem="conv", stem_channels=()), "stem_channels must be a non-empty list"),
        (dict(stem="conv", stem_channels=(8, 0)), "stem_channels must be a non-empty list of positive integers"),
        (dict(stem_channels=16), "stem_channels must be a non-empty list"),
    ],
)
def test_invalid_stem_config(kw, match) -> None:
    with pytest.raises(ModelConfigError, match=match):
        tiny_cfg(**kw)


def test_tiny_conv_preset_and_config_round_trip() -> None:
    tiny, conv = load_model_config("tiny"), load_model_config("tiny-conv")
    assert tiny.vision.stem == "linear" and conv.vision.stem == "conv" and conv.vision.stem_channels == (8, 16, 32)
    as_linear = conv.replace(vision={"stem": "linear", "stem_channels": list(tiny.vision.stem_channels)})
    assert as_linear.vision == tiny.vision  # tiny-conv is tiny but for the stem
    data = json.loads(json.dumps(conv.to_dict()))
    assert data["vision"]["stem"] == "conv" and data["vision"]["stem_channels"] == [8, 16, 32]
    assert ModelConfig.from_dict(data) == conv
    old = tiny.to_dict()
    del old["vision"]["stem"], old["vision"]["stem_channels"]  # a config.json written before the option
    assert ModelConfig.from_dict(old).vision.stem == "linear"


def test_conv_stem_export_round_trip_and_old_exports(tmp_path) -> None:
    from fvlm.model import load_pretrained, save_pretrained

    torch.manual_seed(0)
    x = torch.rand(1, 1, 32, 64, 64)
    model = create_model("tiny-conv", text={"vocab_size": 50}).eval()
    loaded, _ = load_pretrained(save_pretrained(model, None, tmp_path / "conv"))
    assert loaded.config.vision.stem == "conv" and isinstance(loaded.vision.patch_embed, ConvStem)
    with torch.no_grad():
        assert torch.equal(loaded.vision(x).last, model.vision(x).last)
    linear = create_model("tiny", text={"vocab_size": 50}).eval()
    out = save_pretrained(linear, None, tmp_path / "linear")
    data = json.loads((out / "config.json").read_text())
    del data["config"]["vision"]["stem"], data["config"]["vision"]["stem_channels"]
    (out / "config.json").write_text(json.dumps(data))
    old, _ = load_pretrained(out)
    assert old.config.vision.stem == "linear"
    with torch.no_grad():
        assert torch.equal(old.vision(x).last, linear.vision(x).last)
