"""3D ViT: token grid, position-embedding interpolation, SDPA vs a plain reference, checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fvlm.model import ModelConfigError, VisionConfig, ViT3D, load_model_config, patchify, token_grid
from fvlm.model.vision import Attention


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
