"""Objective ``entity_mlm``: weighted cross-entropy over the masked tokens of the anatomy texts.

Reads the ``entity_mlm`` head's outputs (``fvlm.model.heads.entity``): logits ``z_m`` (V,) at the M masked
positions of the batch, their original tokens ``y_m`` and weights ``w_m`` (the dataset extra's: finding words
and modifiers 1, other words 1, boilerplate negations 0.1)::

    L = sum_m w_m * CE(z_m, y_m) / sum_m w_m,        CE(z, y) = -log softmax(z)_y

(with ``label_smoothing`` eps: the CE against (1 - eps) onehot(y) + eps / V). A weighted mean over this rank's
masked tokens (the data-parallel gradient average then averages the ranks); zero, with the graph kept, when
the batch has no masked token.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fvlm.losses.functional import zero_anchor
from fvlm.losses.registry import register_objective

__all__ = ["EntityMLM"]


class EntityMLM(nn.Module):
    """Weighted masked-token cross-entropy (module docstring).

    Forward keywords (extra keys are ignored)::

        mlm_logits        (M, V)  float
        mlm_target        (M,)    int64
        mlm_token_weight  (M,)    float  >= 0

    Returns ``{term: scalar}``.
    """

    #: model heads whose outputs this objective reads (the trainer checks the model has them)
    needs_heads: tuple[str, ...] = ("entity_mlm",)

    def __init__(self, label_smoothing: float = 0.0, term: str = "entity_mlm") -> None:
        super().__init__()
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.term = term

    @property
    def terms(self) -> tuple[str, ...]:
        """Names of the loss terms ``forward`` returns."""
        return (self.term,)

    def zeroshot_scorer(self):
        """The pooled embedding, stated plainly (``fvlm.scoring``): this objective trains a language model that
        reads the image, not an image-text similarity, so it has no score of its own to offer zero-shot; what it
        changes is the image tower (its pooled features and tokens are the decoder's memory), and the pooled
        anatomy embedding of the recipe's contrastive term is where that reaches zero-shot scoring."""
        from fvlm.scoring import ScorerSpec

        return ScorerSpec("pooled", {}, f"{self.term} trains masked-word prediction conditioned on the image, no "
                                        "image-text similarity: zero-shot scores the pooled anatomy embedding, "
                                        "whose image tower it trains")

    def forward(self, mlm_logits: torch.Tensor | None = None, mlm_target: torch.Tensor | None = None,
                mlm_token_weight: torch.Tensor | None = None, **batch: Any) -> dict[str, torch.Tensor]:
        if mlm_logits is None or mlm_target is None or mlm_token_weight is None:
            raise ValueError("entity_mlm objective: the model output has no mlm_logits / mlm_target / "
                             "mlm_token_weight; add the entity_mlm head to model.heads (and train with its "
                             "dataset extra, which the trainer turns on)")
        m = mlm_target.shape[0]
        if mlm_logits.dim() != 2 or mlm_logits.shape[0] != m or mlm_token_weight.shape != (m,):
            raise ValueError(f"entity_mlm objective: mlm_logits {tuple(mlm_logits.shape)} must be (M, V) with "
                             f"mlm_target {tuple(mlm_target.shape)} and mlm_token_weight "
                             f"{tuple(mlm_token_weight.shape)} both (M,)")
        logits = mlm_logits.float()
        w = mlm_token_weight.float()
        ce = F.cross_entropy(logits, mlm_target, reduction="none", label_smoothing=self.label_smoothing)  # (M,)
        total = w.sum()
        loss = torch.where(total > 0, (w * ce).sum() / total.clamp_min(torch.finfo(w.dtype).tiny),
                           torch.zeros((), device=logits.device))
        return {self.term: loss + zero_anchor(logits)}


register_objective("entity_mlm", EntityMLM)
