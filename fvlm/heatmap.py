"""Token-level similarity maps for one zero-shot finding (``fvlm predict --heatmap``).

A library: tensors in, tensors out; no file I/O.

Math. Let ``x_n`` (W) be the last pooled depth's normalised token n of the vision tower (the last entry of
``VisionOutput.features``). Anatomy pooling computes, for anatomy a, ``h_a = out_proj(sum_n w_an v_proj(x_n))``
with attention weights ``w_an >= 0`` summing to 1 over the tokens touching a; since ``out_proj`` and
``v_proj`` are affine and the weights sum to one, ``h_a = sum_n w_an u_n`` with the per-token value
``u_n = out_proj(v_proj(x_n))``. The heatmap projects every token's value with the anatomy's own projection
and normalises it like the pooled embedding::

    e_n = normalize(W_a^T u_n + b_a)                               (D)
    t   = normalize(p - q)        p, q: positive / negative prompt embeddings of the task (D)
    cosine:       m_n = <e_n, t>                                   in [-1, 1]
    probability:  m_n = softmax(s * [<e_n, q>, <e_n, p>])[1] = sigmoid(s * <e_n, p - q>)   in [0, 1]

with ``s`` the model's logit scale (1 / tau): ``probability`` is the score a case would get were its anatomy
embedding that token's alone (the same formula as :func:`fvlm.zeroshot.score_cases`). A whole-study task
(no anatomy) uses the global head instead: ``e_n = normalize(proj(x_n))``. Tokens that do not touch the
anatomy get ``fill`` (the model never looks at them for that anatomy) unless ``restrict=False``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["HEATMAP_MODES", "token_embeddings", "token_similarity", "task_heatmap", "upsample_to_input"]

HEATMAP_MODES = ("probability", "cosine")


def token_embeddings(tokens: Tensor, pooling: Any, anatomy_index: int) -> Tensor:
    """(B, N, W) tokens -> (B, N, D) L2-normalised per-token embeddings in anatomy ``anatomy_index``'s space.

    ``pooling`` is an :class:`fvlm.model.pooling.AnatomyPooling` (``anatomy_index >= 0``) or a
    :class:`GlobalPooling` (``anatomy_index < 0``).
    """
    if anatomy_index < 0:
        return F.normalize(pooling.proj(tokens), dim=-1)
    u = pooling.out_proj(pooling.v_proj(tokens))  # (B, N, W)
    w = pooling.proj_weight[anatomy_index].to(u.dtype)  # (W, D)
    b = pooling.proj_bias[anatomy_index].to(u.dtype)  # (D,)
    return F.normalize(u @ w + b, dim=-1)


def token_similarity(emb: Tensor, positive: Tensor, negative: Tensor, mode: str = "probability",
                     logit_scale: float = 1.0) -> Tensor:
    """(..., D) normalised embeddings, (D,) prompt embeddings -> (...) map (see the module docstring)."""
    if mode not in HEATMAP_MODES:
        raise ValueError(f"heatmap mode must be one of {', '.join(HEATMAP_MODES)}, got {mode!r}")
    pos, neg = positive.to(emb.dtype), negative.to(emb.dtype)
    if mode == "cosine":
        return emb @ F.normalize(pos - neg, dim=-1)
    return torch.sigmoid(float(logit_scale) * (emb @ (pos - neg)))


@torch.no_grad()
def task_heatmap(model: Any, image: Tensor, anatomy: Tensor, positive: Tensor, negative: Tensor,
                 anatomy_index: int, mode: str = "probability", restrict: bool = True,
                 fill: float = 0.0) -> tuple[Tensor, tuple[int, int, int]]:
    """Token map of one task on a batch: image (B, C, Z, Y, X), anatomy (B, Z, Y, X) -> ((B, gz, gy, gx), grid)."""
    from fvlm.model.pooling import touch_mask

    out = model.vision(model.vision_input(image, anatomy))
    tokens = out.features[-1]  # (B, N, W)
    pooling = model.global_pooling if anatomy_index < 0 else model.pooling
    emb = token_embeddings(tokens, pooling, anatomy_index)  # (B, N, D)
    m = token_similarity(emb, positive, negative, mode, float(model.logit_scale().detach()))  # (B, N)
    if restrict and anatomy_index >= 0:
        touch = touch_mask(anatomy, model.num_anatomies, model.vision.patch_size)[:, anatomy_index]  # (B, N)
        m = torch.where(touch, m, torch.full_like(m, float(fill)))
    grid = tuple(int(g) for g in out.grid)
    return m.reshape(m.shape[0], *grid), grid  # type: ignore[return-value]


def upsample_to_input(token_map: Tensor, size_zyx: tuple[int, int, int]) -> Tensor:
    """(B, gz, gy, gx) -> (B, Z, Y, X): trilinear, cell-centred (align_corners=False)."""
    return F.interpolate(token_map[:, None].float(), size=tuple(size_zyx), mode="trilinear",
                         align_corners=False)[:, 0]
