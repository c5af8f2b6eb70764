"""3D Vision Transformer over a whole CT crop (the vision tower of fVLM, docs/architecture.md#model).

Layout: an image (B, C, Z, Y, X) is cut into non-overlapping patches of (pz, py, px) voxels, giving a token
grid (gz, gy, gx) = (Z/pz, Y/py, X/px) and N = gz * gy * gx tokens in row-major (z, y, x) order; the same
order is used by :func:`patchify` for the anatomy label map, so token n of the image and patch n of the
label map cover the same voxels (with the conv stem token n is centred on patch n and sees a few voxels
beyond it; see Stems). The reference crop 112 x 256 x 352 with 16 x 16 x 32 patches gives
7 x 16 x 11 = 1,232 tokens.

Position embeddings are learned on the grid of ``VisionConfig.image_size`` and trilinearly interpolated to
the token grid of each input, so inputs of other sizes (multiples of the patch size) work. There is no
class token: anatomy pooling and the global embedding read the patch tokens.

Attention goes through ``torch.nn.functional.scaled_dot_product_attention`` (fused flash / memory-efficient
kernels on GPU). Blocks can be recomputed in backward (activation checkpointing, non-reentrant; the stem is
not recomputed).

Stems (``VisionConfig.stem``), both (B, C, Z, Y, X) -> (B, N, W) tokens on the same grid, in the same order:

``linear``  ``patchify`` then one linear map C*pz*py*px -> W (the reference ViT; a Conv3d with kernel = stride
            = patch). Cost 2 C W FLOPs per voxel.
``conv``    :class:`ConvStem`, a hybrid patch embedding after Xiao et al., "Early Convolutions Help
            Transformers See Better" (NeurIPS 2021), in 3D. K = len(stem_channels) stages, stage i::

                h_i = GELU(GN(Conv3d(h_{i-1}; kernel s_i + 2, stride s_i, padding 1, no bias)))
                      (B, C_i, Z / q_i,z, Y / q_i,y, X / q_i,x),  q_i = s_1 ... s_i per axis, h_0 = image

            then a projection Conv3d(C_K -> W, kernel = stride = r) to the token grid (B, W, gz, gy, gx),
            flattened row-major to (B, N, W). Strides (``VisionConfig.stem_strides``): per axis a stage
            halves the side while what is left of the patch side is even, else keeps it; the projection
            takes the rest, so s_1 ... s_K r = p exactly and the grid is (Z/pz, Y/py, X/px), as ``patchify``.
            Kernels are 4 on a stride-2 axis and 3 on a stride-1 axis.

            GN is a GroupNorm with gcd(C_i, 8) groups (Wu & He, ECCV 2018): statistics per sample, so it
            works at batch 1, is the same in train and eval, and has no running buffers for DeepSpeed to
            keep in sync; torch computes it in float32 for bf16 inputs. Its mean and variance are taken over
            the whole crop, so every token depends (through two numbers per group) on the crop's content;
            a per-voxel LayerNorm over the channels would keep tokens local but is scale invariant, and
            after the first conv of a one-channel CT it maps flat regions of any density to the same
            vector (the Hounsfield value would be lost). BatchNorm is ruled out by batch sizes of 1-2.

            Alignment. A stride-s stage with kernel s + 2 and padding 1 maps output j to inputs
            [s j - 1, s j + s], centred on its s-block; a kernel-3 stride-2 conv would be centred on 2j and
            the shifts would add up to (q_K - 1) / 2 voxels, half a patch. Here token n's receptive field is
            patch n widened by the same margin on both sides, per axis e = q_0 + q_1 + ... + q_{K-1} (q_0 = 1:
            the one-voxel overlap of each stage, in input voxels), e = 1 + 2 + 4 = 7 for three stride-2
            stages. So token n is centred on patch n and pooling's touch mask (computed on the patches) stays
            right; the neighbouring tokens also see the outer e voxels of patch n.

            Cost per input voxel (FLOPs = 2 x multiply-adds; norm and GELU are a few FLOPs per element):
            sum_i 2 prod(s_i + 2) C_{i-1} C_i / prod(q_i)  +  2 C_K prod(r) W / (pz py px). Base geometry
            (patch 16 x 16 x 32, W 768) with channels 16, 32, 64: 256 + 1024 + 512 + 192 = 1,984 against the
            linear stem's 1,536; both are small next to the 12 blocks (~26k FLOPs per voxel at 1,232 tokens),
            but the first stage's activations are at half resolution: C_1 / 8 values per input voxel per
            saved tensor.

Masked image modelling (``forward(token_mask=...)``): the embeddings of masked tokens are replaced by the
mask token after the stem, for both stems. With the conv stem the masked patches' voxels are also set to 0
before the stem, because the receptive fields overlap: otherwise the visible neighbours of a masked token
would carry the outer e voxels of its patch into the encoder.
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


def stem_groups(channels: int) -> int:
    """GroupNorm groups of a conv stem stage: gcd(C, 8) (8 groups for 16, 32, 64 channels; 8 channels: one each)."""
    return math.gcd(channels, 8)


def voxel_mask(token_mask: Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> Tensor:
    """(B, N) token mask -> (B, 1, Z, Y, X) voxel mask: every voxel of patch n takes token n's value."""
    b = token_mask.shape[0]
    (gz, gy, gx), (pz, py, px) = grid, patch
    m = token_mask.reshape(b, 1, gz, 1, gy, 1, gx, 1)  # (B, 1, gz, 1, gy, 1, gx, 1)
    m = m.expand(b, 1, gz, pz, gy, py, gx, px)  # (B, 1, gz, pz, gy, py, gx, px)
    return m.reshape(b, 1, gz * pz, gy * py, gx * px)  # (B, 1, Z, Y, X)


class ConvStem(nn.Module):
    """Hybrid patch embedding (module docstring): K strided conv + GroupNorm + GELU stages, then a projection
    with kernel = stride = the rest of the patch. ``forward(image (B, C, Z, Y, X))`` -> (B, N, W) tokens on
    the grid (Z/pz, Y/py, X/px) in row-major (z, y, x) order, as ``patchify``."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        strides, rest = cfg.stem_strides()
        self.strides, self.rest = strides, rest
        self.channels = (cfg.stem_in_channels, *cfg.stem_channels)
        self.width = cfg.width
        self.patch_size = cfg.patch_size
        layers: list[nn.Module] = []
        for c_in, c_out, s in zip(self.channels[:-1], self.channels[1:], strides):
            kernel = tuple(k + 2 for k in s)  # centred on each s-block with a one-voxel overlap
            layers += [nn.Conv3d(c_in, c_out, kernel, stride=s, padding=1, bias=False),
                       nn.GroupNorm(stem_groups(c_out), c_out, eps=1e-5), nn.GELU()]
        self.stages = nn.Sequential(*layers)
        self.proj = nn.Conv3d(self.channels[-1], cfg.width, kernel_size=rest, stride=rest)

    def reset_parameters(self) -> None:
        for m in self.stages.modules():
            if isinstance(m, nn.Conv3d):  # followed by a norm: only the shape of the filters matters
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.proj.weight.view(self.width, -1))  # as the linear stem's (W, P) matrix
        nn.init.zeros_(self.proj.bias)

    def flops_per_voxel(self) -> float:
        """Multiply-add FLOPs (x 2) of the convolutions per input voxel (module docstring)."""
        total, q = 0.0, 1
        for c_in, c_out, s in zip(self.channels[:-1], self.channels[1:], self.strides):
            q *= math.prod(s)
            total += 2 * math.prod(k + 2 for k in s) * c_in * c_out / q
        return total + 2 * self.channels[-1] * math.prod(self.rest) * self.width / math.prod(self.patch_size)

    def forward(self, image: Tensor) -> Tensor:
        x = self.stages(image)  # (B, C_K, Z / q_z, Y / q_y, X / q_x)
        x = self.proj(x)  # (B, W, gz, gy, gx)
        return x.flatten(2).transpose(1, 2)  # (B, N, W)


class AnatomyInput(nn.Module):
    """The anatomy map as input channels (``VisionConfig.anatomy_channels``): a learned table T of shape
    (A + 1, E), one row per label (0 background, 1..A), looked up per voxel and put after the image's channels::

        x = concat(image, T[anatomy])    (B, C, Z, Y, X), (B, Z, Y, X) -> (B, C + E, Z, Y, X)

    The stem then sees which voxels of each patch belong to which anatomy, so a token can carry an anatomy's
    share of the patch and its density apart from its neighbours'. Rows start at N(0, 0.5^2), the scale of the
    [0, 1] image. Under masked image modelling the masked patches' anatomy channels are hidden with the image's
    (``ViT3D.forward``: the conv stem zeroes every channel of their voxels, the linear stem replaces their
    tokens), so the map does not leak the masked region's shape."""

    def __init__(self, num_labels: int, channels: int) -> None:
        super().__init__()
        if num_labels < 2 or channels < 1:
            raise ValueError(f"anatomy input needs >= 2 labels and >= 1 channel, got {num_labels}, {channels}")
        self.num_labels, self.channels = num_labels, channels
        self.table = nn.Parameter(torch.empty(num_labels, channels))  # (A + 1, E)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.table, std=0.5)

    def forward(self, image: Tensor, anatomy: Tensor) -> Tensor:
        if anatomy.shape != (image.shape[0], *image.shape[2:]):
            raise ValueError(f"anatomy map {tuple(anatomy.shape)} does not match image {tuple(image.shape)}")
        lo, hi = torch.aminmax(anatomy)
        if int(lo) < 0 or int(hi) >= self.num_labels:
            raise ValueError(f"anatomy map holds labels {int(lo)}..{int(hi)}, expected 0..{self.num_labels - 1}")
        maps = F.embedding(anatomy.long(), self.table.to(image.dtype))  # (B, Z, Y, X, E)
        return torch.cat([image, maps.permute(0, 4, 1, 2, 3)], dim=1)  # (B, C + E, Z, Y, X)


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
        self.stem_type = cfg.stem  # "linear" | "conv"
        self.patch_embed: nn.Module
        if cfg.stem == "conv":
            self.patch_embed = ConvStem(cfg)  # (B, C, Z, Y, X) -> (B, N, W)
        else:  # a Conv3d with kernel = stride = patch, as a matmul on patchify's (B, N, C*P)
            self.patch_embed = nn.Linear(cfg.stem_in_channels * math.prod(cfg.patch_size), cfg.width)
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
        if isinstance(self.patch_embed, ConvStem):
            self.patch_embed.reset_parameters()
        else:
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

    def embed_patches(self, image: Tensor) -> Tensor:
        """The stem: (B, C, Z, Y, X) -> (B, N, W) token embeddings, before position embeddings."""
        if self.stem_type == "conv":
            return self.patch_embed(image)  # (B, N, W)
        return self.patch_embed(patchify(image, self.patch_size))  # (B, N, W)

    def forward(self, image: Tensor, token_mask: Tensor | None = None, mask_token: Tensor | None = None
                ) -> VisionOutput:
        """``token_mask`` (B, N) bool (optional, SimMIM-style masked image modelling): the patch embeddings
        of the masked tokens are replaced by ``mask_token`` (W,) (default zeros; a learnable one belongs to
        the caller, e.g. the ``masked_reconstruction`` head) before the position embeddings are added; with
        the conv stem the voxels of the masked patches are also set to 0 before the stem (module docstring).
        Without ``token_mask`` the tower is unchanged."""
        if image.dim() != 5 or image.shape[1] != self.cfg.stem_in_channels:
            extra = (f" (the image's {self.cfg.in_channels} and {self.cfg.anatomy_channels} anatomy channels: "
                     "build the input with FVLM.vision_input(image, anatomy))" if self.cfg.anatomy_channels else "")
            raise ValueError(
                f"image must be (B, {self.cfg.stem_in_channels}, Z, Y, X){extra}, got shape {tuple(image.shape)}"
            )
        grid = token_grid(tuple(image.shape[2:]), self.patch_size)
        if token_mask is not None:
            n = grid[0] * grid[1] * grid[2]
            if token_mask.shape != (image.shape[0], n) or token_mask.dtype != torch.bool:
                raise ValueError(f"token_mask must be a ({image.shape[0]}, {n}) bool tensor (B, N tokens), got "
                                 f"{tuple(token_mask.shape)} {token_mask.dtype}")
            if mask_token is not None and mask_token.shape != (self.width,):
                raise ValueError(f"mask_token must be ({self.width},), got {tuple(mask_token.shape)}")
            if self.stem_type == "conv":  # overlapping receptive fields: hide the masked voxels from the neighbours
                image = image.masked_fill(voxel_mask(token_mask, grid, self.patch_size), 0.0)
        x = self.embed_patches(image)  # (B, N, W)
        if token_mask is not None:
            fill = x.new_zeros(self.width) if mask_token is None else mask_token.to(x.dtype)
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
