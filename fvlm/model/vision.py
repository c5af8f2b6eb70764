"""3D Vision Transformer over a whole CT crop (the vision tower of fVLM, DESIGN.md section 4).

Layout: an image (B, C, Z, Y, X) is cut into non-overlapping patches of (pz, py, px) voxels, giving a token
grid (gz, gy, gx) = (Z/pz, Y/py, X/px) and N = gz * gy * gx tokens in row-major (z, y, x) order; the same
order is used by :func:`patchify` for the anatomy label map, so token n of the image and patch n of the
label map cover the same voxels. The reference crop 112 x 256 x 352 with 16 x 16 x 32 patches gives
7 x 16 x 11 = 1,232 tokens.

Position embeddings are learned on the grid of ``VisionConfig.image_size`` and trilinearly interpolated to
the token grid of each input, so inputs of other sizes (multiples of the patch size) work. There is no
class token: anatomy pooling and the global embedding read the patch tokens.

Attention goes through ``torch.nn.functional.scaled_dot_product_attention`` (fused flash / memory-efficient
kernels on GPU). Blocks can be recomputed in backward (activation checkpointing, non-reentrant).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fvlm.model.config import VisionConfig


def token_grid(spatial: tuple[int, ...], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Token grid (gz, gy, gx) of an input of spatial size (Z, Y, X); each side must be a multiple of the patch."""
    if len(spatial) != 3:
        raise ValueError(f"expected a (Z, Y, X) size, got {tuple(spatial)}")
    bad = [f"{a}={s} (patch {p})" for s, p, a in zip(spatial, patch, "zyx") if s % p or s < p]
    if bad:
        raise ValueError(
            f"input size {tuple(spatial)} is not a multiple of the patch size {tuple(patch)}: {', '.join(bad)}; "
            "pad or crop the image and its anatomy map to a multiple of the patch size"
        )
    return tuple(s // p for s, p in zip(spatial, patch))  # type: ignore[return-value]


def patchify(x: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """(B, C, Z, Y, X) -> (B, N, C * pz * py * px), tokens in row-major (gz, gy, gx) order."""
    b, c, z, y, xx = x.shape
    gz, gy, gx = token_grid((z, y, xx), patch)
    pz, py, px = patch
    x = x.reshape(b, c, gz, pz, gy, py, gx, px)  # (B, C, gz, pz, gy, py, gx, px)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, gz, gy, gx, C, pz, py, px)
    return x.reshape(b, gz * gy * gx, c * pz * py * px)  # (B, N, C*P)


class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention: softmax(q k^T / sqrt(d)) v per head."""

    def __init__(self, width: int, heads: int, qkv_bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        b, n, w = x.shape  # (B, N, W)
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, w // self.heads)  # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, d)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, n, w)  # (B, N, W)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        w = cfg.width
        hidden = int(round(w * cfg.mlp_ratio))
        self.norm1 = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.attn = Attention(w, cfg.heads, cfg.qkv_bias, cfg.dropout)
        self.norm2 = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(w, hidden), nn.GELU(), nn.Linear(hidden, w))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, W) -> (B, N, W)
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class VisionOutput(NamedTuple):
    """What the vision tower returns."""

    features: list[Tensor]
    """One (B, N, W) tensor per entry of ``output_layers`` (in that order), each through its own LayerNorm."""
    last: Tensor
    """(B, N, W) normalised tokens of the last block (the same tensor as in ``features`` when listed there)."""
    grid: tuple[int, int, int]
    """Token grid (gz, gy, gx), N = gz * gy * gx."""


class ViT3D(nn.Module):
    """3D ViT returning the (normalised) tokens of several blocks: ``forward(image (B, C, Z, Y, X))`` ->
    :class:`VisionOutput`. ``output_layers`` are 1-based block indices (block 1 is the first; -1 the last).
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.base_grid = cfg.grid
        patch_dim = cfg.in_channels * math.prod(cfg.patch_size)
        self.patch_embed = nn.Linear(patch_dim, cfg.width)  # a Conv3d with kernel = stride = patch, as a matmul
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.width, *self.base_grid))  # (1, W, gz0, gy0, gx0)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.output_layers = cfg.resolved_output_layers()  # 1-based block indices
        self.out_norms = nn.ModuleList(nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps) for _ in self.output_layers)
        # The last block's tokens feed the global embedding; they get their own norm only when not listed.
        self.norm = None if cfg.depth in self.output_layers else nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.grad_checkpointing = cfg.grad_checkpointing
        self.width = cfg.width
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.xavier_uniform_(self.patch_embed.weight)
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def position_embedding(self, grid: tuple[int, int, int]) -> Tensor:
        """Position embeddings for a token grid: the learned base grid, trilinearly interpolated. -> (1, N, W)"""
        pos = self.pos_embed  # (1, W, gz0, gy0, gx0)
        if tuple(grid) != tuple(self.base_grid):
            pos = F.interpolate(pos, size=tuple(grid), mode="trilinear", align_corners=False)  # (1, W, gz, gy, gx)
        return pos.flatten(2).transpose(1, 2)  # (1, N, W)

    def forward(self, image: Tensor, token_mask: Tensor | None = None, mask_token: Tensor | None = None
                ) -> VisionOutput:
        """``token_mask`` (B, N) bool (optional, SimMIM-style masked image modelling): the patch embeddings
        of the masked tokens are replaced by ``mask_token`` (W,) (default zeros; a learnable one belongs to
        the caller, e.g. the ``masked_reconstruction`` head) before the position embeddings are added.
        Without ``token_mask`` the tower is unchanged."""
        if image.dim() != 5 or image.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"image must be (B, {self.cfg.in_channels}, Z, Y, X), got shape {tuple(image.shape)}"
            )
        grid = token_grid(tuple(image.shape[2:]), self.patch_size)
        x = self.patch_embed(patchify(image, self.patch_size))  # (B, N, W)
        if token_mask is not None:
            n = grid[0] * grid[1] * grid[2]
            if token_mask.shape != (image.shape[0], n) or token_mask.dtype != torch.bool:
                raise ValueError(f"token_mask must be a ({image.shape[0]}, {n}) bool tensor (B, N tokens), got "
                                 f"{tuple(token_mask.shape)} {token_mask.dtype}")
            fill = x.new_zeros(self.width) if mask_token is None else mask_token.to(x.dtype)
            if fill.shape != (self.width,):
                raise ValueError(f"mask_token must be ({self.width},), got {tuple(fill.shape)}")
            x = torch.where(token_mask.unsqueeze(-1), fill, x)  # (B, N, W)
        x = x + self.position_embedding(grid).to(x.dtype)  # (B, N, W)
        wanted = {layer: i for i, layer in enumerate(self.output_layers)}
        features: list[Tensor | None] = [None] * len(self.output_layers)
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for depth, block in enumerate(self.blocks, start=1):
            x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)  # (B, N, W)
            if depth in wanted:
                i = wanted[depth]
                features[i] = self.out_norms[i](x)  # (B, N, W)
        last = features[self.output_layers.index(len(self.blocks))] if self.norm is None else self.norm(x)
        return VisionOutput(features, last, grid)  # type: ignore[arg-type]
