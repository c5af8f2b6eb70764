"""Anatomy pooling: one embedding per anatomy from the ViT tokens that touch it (fVLM, docs/architecture.md#model).

1. Touch mask. The anatomy label map (B, Z, Y, X), labels 1..A (0 background), is reduced to the token
   grid per anatomy: token n touches anatomy a when any voxel of its patch has label a. This equals
   max-pooling the one-hot mask (B, A, Z, Y, X) with kernel = stride = patch size, computed without ever
   building the one-hot volume (a scatter over the patch's voxels).
2. Attention. The tokens of K depths are concatenated along the token axis: keys/values (B, K*N, W). One
   learnable query q_a per anatomy attends, in a multi-head attention shared by all anatomies, to the
   tokens that touch anatomy a only (key mask = the touch mask repeated over depths):
   h_a = MHA(q_a, tokens touching a).
3. Projection. An anatomy-specific linear map W_a (W -> D), then L2 normalisation:
   e_a = normalize(W_a h_a + b_a).

Masking. ``anatomy_mask[b, a]`` is True when anatomy a touches at least one token of sample b and is not
marked ``cut`` (cut by the crop border). Masked rows of ``image_emb`` are exactly zero. An absent anatomy
never takes a softmax over an empty set: its row attends to every token (a finite dummy) and its output is
then replaced by zeros, so neither outputs nor gradients can become NaN.

Also :class:`GlobalPooling` for the CLIP baseline: mean of the last block's tokens -> linear -> D -> L2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvlm.model.vision import patchify


def touch_mask(anatomy: Tensor, num_anatomies: int, patch: tuple[int, int, int]) -> Tensor:
    """(B, Z, Y, X) integer labels in 0..A -> (B, A, N) bool: token n touches anatomy a (label a + 1).

    Same as ``F.max_pool3d(one_hot(anatomy)[:, 1:], kernel_size=patch, stride=patch).flatten(2) > 0``.
    """
    if anatomy.dim() != 4:
        raise ValueError(f"anatomy map must be (B, Z, Y, X), got shape {tuple(anatomy.shape)}")
    if anatomy.dtype.is_floating_point or anatomy.dtype == torch.bool:
        raise ValueError(f"anatomy map must hold integer labels, got dtype {anatomy.dtype}")
    lo, hi = torch.aminmax(anatomy)
    if int(lo) < 0 or int(hi) > num_anatomies:
        raise ValueError(
            f"anatomy map holds labels {int(lo)}..{int(hi)}, expected 0 (background) .. {num_anatomies} "
            f"(the model's num_anatomies); was the map made with another anatomy set?"
        )
    b = anatomy.shape[0]
    labels = patchify(anatomy.unsqueeze(1), patch).long()  # (B, N, P)
    n = labels.shape[1]
    hit = torch.zeros(b, n, num_anatomies + 1, dtype=torch.bool, device=anatomy.device)  # (B, N, A+1)
    hit.scatter_(2, labels, True)
    return hit[..., 1:].transpose(1, 2)  # (B, A, N)


class AnatomyPooling(nn.Module):
    """Learnable per-anatomy queries over the touching tokens of several depths; see the module docstring.

    ``forward(features, touch, cut=None, return_pooled=False)``: features, a list of K tensors (B, N, W);
    touch (B, A, N) bool; cut (B, A) bool or None. Returns ``(image_emb (B, A, D), anatomy_mask (B, A) bool)``
    and, with ``return_pooled``, a third tensor: the attention output ``h_a`` (B, A, W) before the per-anatomy
    projection (masked rows zero), which the optional heads read.
    """

    def __init__(self, num_anatomies: int, width: int, embed_dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"pooling heads={heads} does not divide width={width}")
        self.num_anatomies, self.width, self.embed_dim, self.heads = num_anatomies, width, embed_dim, heads
        self.dropout = dropout
        self.query = nn.Parameter(torch.empty(num_anatomies, width))  # (A, W)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.proj_weight = nn.Parameter(torch.empty(num_anatomies, width, embed_dim))  # (A, W, D)
        self.proj_bias = nn.Parameter(torch.zeros(num_anatomies, embed_dim))  # (A, D)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.query, std=0.02)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        bound = 1.0 / math.sqrt(self.width)  # nn.Linear's default range, per anatomy
        nn.init.uniform_(self.proj_weight, -bound, bound)
        nn.init.zeros_(self.proj_bias)

    def forward(self, features: list[Tensor], touch: Tensor, cut: Tensor | None = None,
                return_pooled: bool = False) -> tuple[Tensor, ...]:
        tokens = torch.cat(list(features), dim=1)  # (B, K*N, W)
        b, kn, w = tokens.shape
        a, h = self.num_anatomies, self.heads
        if touch.shape[:2] != (b, a) or kn % touch.shape[2]:
            raise ValueError(f"touch mask {tuple(touch.shape)} does not fit tokens {tuple(tokens.shape)} and A={a}")
        keymask = touch.repeat(1, 1, kn // touch.shape[2])  # (B, A, K*N), depth-major like `tokens`
        present = keymask.any(dim=-1)  # (B, A)
        mask = present
        if cut is not None:
            if cut.shape != (b, a):
                raise ValueError(f"cut must be (B, A) = {(b, a)}, got {tuple(cut.shape)}")
            mask = present & ~cut.to(torch.bool)
        # Guard: a row with no touching token attends to every token (a finite dummy) and is zeroed below.
        attn_mask = keymask | ~present.unsqueeze(-1)  # (B, A, K*N)

        d = w // h
        q = self.q_proj(self.query).reshape(a, h, d).transpose(0, 1)  # (h, A, d)
        q = q.unsqueeze(0).expand(b, h, a, d).to(tokens.dtype)  # (B, h, A, d)
        k = self.k_proj(tokens).reshape(b, kn, h, d).transpose(1, 2)  # (B, h, K*N, d)
        v = self.v_proj(tokens).reshape(b, kn, h, d).transpose(1, 2)  # (B, h, K*N, d)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask.unsqueeze(1), dropout_p=self.dropout if self.training else 0.0
        )  # (B, h, A, d)
        out = self.out_proj(out.transpose(1, 2).reshape(b, a, w))  # (B, A, W)
        emb = torch.einsum("baw,awd->bad", out, self.proj_weight.to(out.dtype)) + self.proj_bias.to(out.dtype)
        emb = F.normalize(emb, dim=-1)  # (B, A, D)
        emb = torch.where(mask.unsqueeze(-1), emb, torch.zeros_like(emb))  # masked rows exactly zero
        if return_pooled:
            return emb, mask, torch.where(mask.unsqueeze(-1), out, torch.zeros_like(out))  # ..., (B, A, W)
        return emb, mask


class GlobalPooling(nn.Module):
    """CLIP-baseline image embedding: mean over the last block's tokens -> linear -> D -> L2. (B, N, W) -> (B, D)"""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        return F.normalize(self.proj(tokens.mean(dim=1)), dim=-1)  # (B, D)
