"""Plain functions over tensors shared by the objectives and by zero-shot scoring (no gathering, no modules).

* Masked, symmetric soft-target contrastive cross-entropy (:func:`symmetric_soft_contrastive`) and the zero
  anchor that keeps the graph (:func:`zero_anchor`), used by every objective in this package.
* Similarities that an objective trains and a zero-shot scorer (``fvlm.scoring``) reads the same way: the
  region head's late interaction (:func:`late_interaction`, ``region_contrastive`` and the ``region`` scorer)
  and the 2-Wasserstein logits of diagonal Gaussians (:func:`w2_logits`, ``uncertainty_contrastive`` and the
  ``wasserstein`` scorer).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["soft_cross_entropy_rows", "symmetric_soft_contrastive", "zero_anchor", "loss_dtype",
           "late_interaction", "wasserstein2_sq", "w2_logits"]


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


def late_interaction(text: Tensor, text_mask: Tensor, regions: Tensor, region_mask: Tensor,
                     temperature: float | Tensor, queries: Tensor | None = None, keys: Tensor | None = None,
                     values: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Region-aware similarity of every (image i, text j) pair per anatomy (step 4 of the docstring of
    ``fvlm.model.heads.region``).

    text (Nt, A, L, D), text_mask (Nt, A, L) bool, regions (Ni, A, k, D), region_mask (Ni, A, k) bool ->
    ``S`` (A, Ni, Nt) and ``defined`` (A, Ni, Nt) bool (image i keeps a region and text j has a token;
    S = 0 elsewhere). Inputs are expected L2-normalised (regions may carry the selection gate).
    ``queries`` (Nt, A, L, D), ``keys`` and ``values`` (Ni, A, k, D): the head's learned projections; each
    defaults to the text / the regions (the parameter-free attention).
    """
    if (text.dim() != 4 or regions.dim() != 4 or text.shape[1] != regions.shape[1]
            or text.shape[-1] != regions.shape[-1]):
        raise ValueError(f"late_interaction: text must be (Nt, A, L, D) and regions (Ni, A, k, D), got "
                         f"{tuple(text.shape)} and {tuple(regions.shape)}")
    q = text if queries is None else queries  # (Nt, A, L, D)
    k_ = regions if keys is None else keys  # (Ni, A, k, D)
    u = regions if values is None else values  # (Ni, A, k, D)
    if q.shape != text.shape or k_.shape != regions.shape or u.shape != regions.shape:
        raise ValueError(f"late_interaction: queries must be shaped like text {tuple(text.shape)} and keys / values "
                         f"like regions {tuple(regions.shape)}, got {tuple(q.shape)}, {tuple(k_.shape)}, "
                         f"{tuple(u.shape)}")
    logits = torch.einsum("jald,iakd->aijlk", q, k_)  # (A, Ni, Nt, L, k)
    c = logits if (queries is None and keys is None and values is None) else torch.einsum(
        "jald,iakd->aijlk", text, u)  # (A, Ni, Nt, L, k): <t_l, u_r>
    rmask = region_mask.transpose(0, 1)[:, :, None, None, :]  # (A, Ni, 1, 1, k)
    fill = torch.finfo(c.dtype).min
    alpha = torch.softmax((logits / temperature).masked_fill(~rmask, fill), dim=-1)  # (A, Ni, Nt, L, k)
    per_token = (alpha * c.masked_fill(~rmask, 0.0)).sum(dim=-1)  # (A, Ni, Nt, L)
    tmask = text_mask.transpose(0, 1)[:, None].to(c.dtype)  # (A, 1, Nt, L)
    count = tmask.sum(dim=-1)  # (A, 1, Nt)
    sim = (per_token * tmask).sum(dim=-1) / count.clamp_min(1.0)  # (A, Ni, Nt)
    defined = region_mask.any(dim=-1).T[:, :, None] & (count > 0)  # (A, Ni, Nt)
    return torch.where(defined, sim, torch.zeros_like(sim)), defined


def wasserstein2_sq(mu1: torch.Tensor, logvar1: torch.Tensor, mu2: torch.Tensor, logvar2: torch.Tensor
                    ) -> torch.Tensor:
    """Pairwise squared 2-Wasserstein distances between diagonal Gaussians.

    ``W2^2_ij = sum_d (mu1_id - mu2_jd)^2 + sum_d (sigma1_id - sigma2_jd)^2``, ``sigma = exp(logvar / 2)``.
    Shapes: mu1, logvar1 (..., N, D); mu2, logvar2 (..., M, D) -> (..., N, M).

    Computed from the differences, not through the inner-product expansion ``|a|^2 + |b|^2 - 2 <a, b>``: at
    large variances (sigma^2 = e^4 per dimension inside the head's clamp) the expansion subtracts numbers of
    size ``D e^4`` to get a difference of order 1 and loses it to fp32 rounding (issue 22: 0.027 in W2^2, about
    a logit at scale 100). The differences cost an (..., N, M, D) temporary per part, which the anatomy
    batches of the objective (A x N x N x D) afford.
    """
    s1, s2 = torch.exp(0.5 * logvar1), torch.exp(0.5 * logvar2)  # (..., N, D), (..., M, D)
    dmu = mu1.unsqueeze(-2) - mu2.unsqueeze(-3)  # (..., N, M, D)
    dsig = s1.unsqueeze(-2) - s2.unsqueeze(-3)  # (..., N, M, D)
    return (dmu * dmu).sum(-1) + (dsig * dsig).sum(-1)  # (..., N, M), >= 0 by construction


def w2_logits(mu1: torch.Tensor, logvar1: torch.Tensor, mu2: torch.Tensor, logvar2: torch.Tensor,
              scale: torch.Tensor | float, shift: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``-scale * W2^2 + shift`` (..., N, M); see :func:`wasserstein2_sq`."""
    return -scale * wasserstein2_sq(mu1, logvar1, mu2, logvar2) + shift
