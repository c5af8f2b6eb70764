"""Objective ``guided_reconstruction``: weighted voxel loss of the masked tokens the guide points to.

Reads the ``masked_reconstruction`` head's outputs (``fvlm.model.heads.reconstruct``): for the T counted
tokens (masked, inside a present anatomy, with positive guide weight) the predicted voxels ``yhat_t`` (P,),
the target voxels ``y_t`` (P,) and the weights ``w_t`` (each anatomy's weights sum to 1)::

    e_t = 1/P sum_v |yhat_tv - y_tv|          (kind "l1", SimMIM's choice; "l2": squared error)
    L   = sum_t w_t e_t / sum_t w_t

Tokens the head did not count have weight 0 and are not even predicted, so the image there cannot change
the loss. A weighted mean over this rank's tokens; zero, with the graph kept, when nothing is counted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fvlm.losses.functional import zero_anchor
from fvlm.losses.registry import register_objective

__all__ = ["GuidedReconstruction"]

_KINDS = ("l1", "l2")


class GuidedReconstruction(nn.Module):
    """Guide-weighted masked voxel reconstruction loss (module docstring).

    Forward keywords (extra keys are ignored)::

        recon_pred    (T, P)  float
        recon_target  (T, P)  float
        recon_weight  (T,)    float  >= 0

    Returns ``{term: scalar}``.
    """

    #: model heads whose outputs this objective reads (the trainer checks the model has them)
    needs_heads: tuple[str, ...] = ("masked_reconstruction",)

    def __init__(self, kind: str = "l1", term: str = "guided_reconstruction") -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
        self.kind, self.term = kind, term

    @property
    def terms(self) -> tuple[str, ...]:
        """Names of the loss terms ``forward`` returns."""
        return (self.term,)

    def zeroshot_scorer(self):
        """The pooled embedding (``fvlm.scoring``): voxel reconstruction trains the image tower only, with no
        text, so zero-shot reads the pooled anatomy embedding of the recipe's contrastive term."""
        from fvlm.scoring import ScorerSpec

        return ScorerSpec("pooled", {}, f"{self.term} trains masked-voxel reconstruction, no image-text similarity: "
                                        "zero-shot scores the pooled anatomy embedding, whose image tower it trains")

    def forward(self, recon_pred: torch.Tensor | None = None, recon_target: torch.Tensor | None = None,
                recon_weight: torch.Tensor | None = None, **batch: Any) -> dict[str, torch.Tensor]:
        if recon_pred is None or recon_target is None or recon_weight is None:
            raise ValueError("guided_reconstruction objective: the model output has no recon_pred / recon_target "
                             "/ recon_weight; add the masked_reconstruction head to model.heads")
        if recon_pred.shape != recon_target.shape or recon_pred.dim() != 2 or recon_weight.shape != recon_pred.shape[:1]:
            raise ValueError(f"guided_reconstruction objective: recon_pred {tuple(recon_pred.shape)} and recon_target "
                             f"{tuple(recon_target.shape)} must be (T, P), recon_weight {tuple(recon_weight.shape)} (T,)")
        diff = recon_pred.float() - recon_target.float()  # (T, P)
        err = diff.abs().mean(-1) if self.kind == "l1" else diff.square().mean(-1)  # (T,)
        w = recon_weight.float()
        total = w.sum()
        loss = torch.where(total > 0, (w * err).sum() / total.clamp_min(torch.finfo(w.dtype).tiny),
                           torch.zeros((), device=diff.device))
        return {self.term: loss + zero_anchor(recon_pred.float())}


register_objective("guided_reconstruction", GuidedReconstruction)
