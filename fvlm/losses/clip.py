"""Global CLIP objective: whole scan against whole report, as CT-CLIP (the baseline recipe).

Over the GLOBAL batch (gathered from every rank), with global embeddings ``G_I, G_T`` (N, D) and logit
scale ``s = 1/tau``::

    S_ij  = s * <G_I_i, G_T_j>
    Y_ij  = 1 if case_i == case_j else 0          (the diagonal, plus repeats of a case in the batch)
    L     = 1/2 * [ 1/N sum_i CE(softmax_j S_ij ; Ybar_i.) + 1/N sum_j CE(softmax_i S_ij ; Ybar^T_j.) ]

with ``Ybar`` row-normalised; with distinct cases this is CLIP's symmetric InfoNCE (Radford et al. 2021).
A ``0 * sum(inputs)`` anchor keeps the graph so every rank runs the gathers' backward.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from fvlm.distributed import all_gather_with_grad
from fvlm.losses.functional import loss_dtype, symmetric_soft_contrastive, zero_anchor
from fvlm.losses.registry import register_objective

__all__ = ["ClipGlobal"]


class ClipGlobal(nn.Module):
    """Symmetric InfoNCE between whole-scan and whole-report embeddings; positives = same case.

    Args:
        gather: concatenates a (n_r, ...) tensor over ranks; default ``all_gather_with_grad``.
        term: name of the returned loss term.

    Forward keywords (extra keys are ignored)::

        global_image_emb  (B, D)  float
        global_text_emb   (B, D)  float
        logit_scale       ()      float   1 / tau
        case_id           (B,)    int64   optional; default every sample its own case

    Returns ``{term: scalar}``.
    """

    #: the trainer feeds whole-report tokens (``global_text_emb`` from the report) only to objectives that say so
    reads_report = True

    def __init__(self, gather: Callable[[torch.Tensor], torch.Tensor] | None = None, term: str = "clip_global") -> None:
        super().__init__()
        self.gather = gather if gather is not None else all_gather_with_grad
        self.term = term

    @property
    def terms(self) -> tuple[str, ...]:
        """Names of the loss terms ``forward`` returns."""
        return (self.term,)

    def zeroshot_scorer(self):
        """The pooled cosine (``fvlm.scoring``), read from the whole-scan embedding by the global readout."""
        from fvlm.scoring import ScorerSpec

        return ScorerSpec("pooled", {}, f"{self.term} trains the cosine of the whole-scan embeddings (global readout)")

    def forward(
        self,
        global_image_emb: torch.Tensor,
        global_text_emb: torch.Tensor,
        logit_scale: torch.Tensor | float,
        case_id: torch.Tensor | None = None,
        **batch: Any,
    ) -> dict[str, torch.Tensor]:
        if global_image_emb.dim() != 2 or global_text_emb.shape != global_image_emb.shape:
            raise ValueError(
                "ClipGlobal: global_image_emb and global_text_emb must both be (B, D), got "
                f"{tuple(global_image_emb.shape)} and {tuple(global_text_emb.shape)}"
            )
        if case_id is not None and tuple(case_id.shape) != (global_image_emb.shape[0],):
            raise ValueError(
                f"ClipGlobal: case_id must be (B,) = {(global_image_emb.shape[0],)}, got {tuple(case_id.shape)}"
            )
        dtype = loss_dtype(global_image_emb, global_text_emb)
        scale = torch.as_tensor(logit_scale, device=global_image_emb.device).to(dtype)

        img = self.gather(global_image_emb).to(dtype)  # (N, D)
        txt = self.gather(global_text_emb).to(dtype)  # (N, D)
        n = img.shape[0]
        cid = self.gather(case_id) if case_id is not None else torch.arange(n, device=img.device)  # (N,)

        logits = scale * img @ txt.T  # (N, N)
        targets = (cid.unsqueeze(1) == cid.unsqueeze(0)).to(dtype)  # (N, N)
        valid = torch.ones(n, n, dtype=torch.bool, device=img.device)  # (N, N)
        loss = symmetric_soft_contrastive(logits, targets, valid)  # ()
        return {self.term: loss + zero_anchor(img, txt, scale)}


register_objective("clip_global", ClipGlobal)
