"""Masked, symmetric soft-target contrastive cross-entropy, and the zero anchor that keeps the graph.

Shared by every objective in this package; plain functions over tensors, no gathering.
"""

from __future__ import annotations

import torch

__all__ = ["soft_cross_entropy_rows", "symmetric_soft_contrastive", "zero_anchor", "loss_dtype"]


def loss_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half and bfloat16 are upcast for the softmax)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def soft_cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Row-wise soft cross-entropy over the valid columns.

    For each row i with valid columns V_i and non-negative targets y_i (zero outside V_i)::

        ce_i = - sum_{j in V_i} ybar_ij * log( exp(s_ij) / sum_{k in V_i} exp(s_ik) ),   ybar_ij = y_ij / sum_j y_ij

    Rows with no valid column or an all-zero target give 0 (and a finite, zero gradient).

    Shapes: logits, targets, valid (..., N, M) -> (..., N).
    """
    fill = torch.finfo(logits.dtype).min  # finite: a fully masked row stays finite, no NaN in backward
    logp = torch.log_softmax(logits.masked_fill(~valid, fill), dim=-1)  # (..., N, M)
    y = targets * valid
    ybar = y / y.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)  # rows sum to 1 (or 0)
    return -(ybar * logp.masked_fill(~valid, 0.0)).sum(dim=-1)  # (..., N)


def symmetric_soft_contrastive(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of the image->text and text->image soft cross-entropies, each averaged over its own valid rows.

    ``logits[..., i, j] = scale * <image_i, text_j>``; ``targets`` the (unnormalised) soft positives;
    ``valid[..., i, j]`` True when image i and text j both take part. With ``n_r`` the images that take part
    (rows with at least one valid column) and ``n_c`` the texts that do (columns with a valid row)::

        L = 1/2 * ( 1/n_r sum_i CE(S_i., Y_i.)  +  1/n_c sum_j CE(S^T_j., Y^T_j.) )

    For a square presence mask (both sides the same samples) ``n_r = n_c``; they differ when the two sides
    take part differently (the intra-image term's two views, whose masks differ when the second crop cuts an
    anatomy; the label-only columns of a text-vs-label term). Each direction is the mean over the rows it
    has, so rows without a valid entry never dilute it.

    Shapes: logits, targets, valid (..., N, M) -> (...,). Zero where nothing takes part.
    """
    n_rows = valid.any(dim=-1).sum(dim=-1).clamp_min(1).to(logits.dtype)  # (...,) images taking part
    n_cols = valid.any(dim=-2).sum(dim=-1).clamp_min(1).to(logits.dtype)  # (...,) texts taking part
    i2t = soft_cross_entropy_rows(logits, targets, valid).sum(dim=-1) / n_rows
    t2i = soft_cross_entropy_rows(logits.transpose(-1, -2), targets.transpose(-1, -2), valid.transpose(-1, -2))
    return 0.5 * (i2t + t2i.sum(dim=-1) / n_cols)


def zero_anchor(*tensors: torch.Tensor) -> torch.Tensor:
    """``0 * sum`` of every tensor: a zero that depends on all inputs, so backward reaches each of them.

    Added to every objective's loss so that each rank runs the backward of every gather it ran forward
    (the gather's backward is a collective), even when nothing in its batch or the global batch is usable.
    Inputs must be finite (the objectives zero the masked-out entries first).
    """
    total = None
    for t in tensors:
        s = t.sum()
        total = s if total is None else total + s.to(total.dtype)
    return 0.0 * total
