"""Objective ``supervised``: binary cross-entropy of the ``task_classifier`` head's logits against the per-anatomy
task labels, the training signal of the supervised ceiling (recipe ``supervised``; issue 15 item 5).

Not a zero-shot model: it learns what the image tower can learn from the labels themselves, with the same
encoder, data and budget as the contrastive recipes, so a zero-shot AUC can be read against it.

The loss (over the GLOBAL batch, gathered from every rank)
----------------------------------------------------------
Inputs: logits ``z`` (N, A, K) (``task_logits``), labels ``y`` (N, A, K) in [0, 1] (``anatomy_labels``: the
parsed labels of each anatomy's tasks, catalog order, zero-padded to K), and the cell validity::

    v_iak = M_ia                      anatomy a present and not cut in sample i (``anatomy_mask``)
          * C_ak                      column k is a task of anatomy a, not padding (the head's ``task_mask``)
          * U_iak                     the label is known (batch field ``anatomy_label_known``, dataset extra
                                      ``task_label_mask``; all known when absent) and finite

    l_iak = - [ rho_ak * y_iak * log sigma(z_iak) + (1 - y_iak) * log(1 - sigma(z_iak)) ]
    L     = sum_iak v_iak * l_iak / max(1, sum_iak v_iak)

the mean binary cross-entropy over the valid cells (soft labels allowed; labels are clamped to [0, 1]). The
positive weight ``rho`` (option ``pos_weight``; torch's ``BCEWithLogitsLoss(pos_weight=...)``) is 1 (default),
one number for every task, or ``"batch"``: per column the ratio of negative to positive label mass among the
valid cells of the global batch, ``rho_ak = clamp(sum_i v (1 - y) / sum_i v y, 1, max_pos_weight)`` (1 where
the batch has no positive), a balancing that up-weights rare findings. The denominator counts cells, not
weights, as torch's does.

Masked cells may hold anything (a masked anatomy's logit is the bias; NaN images give NaN): they are replaced
by 0 before the loss, and ``0 * sum(z)`` keeps the graph (and the gathers' backward) when no cell is valid.

Column check: with the batch field ``anatomy_task_ids`` (N, A, K) (the same extra: a hash of the task name of
each data column, 0 for padding) the head's ``task_ids`` must be equal, otherwise the head would learn task t
from the labels of another task: a ValueError tells to give the head the data's task catalog.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from fvlm.distributed import all_gather_with_grad
from fvlm.losses.functional import zero_anchor
from fvlm.losses.registry import register_objective

__all__ = ["Supervised"]

Gather = Callable[[torch.Tensor], torch.Tensor]


class Supervised(nn.Module):
    """Masked binary cross-entropy of the ``task_classifier`` logits (module docstring).

    Args:
        pos_weight: None (default, off), a positive number (weight of every positive term), or ``"batch"``
            (per-task negative/positive ratio of the global batch, clamped to ``[1, max_pos_weight]``).
        max_pos_weight: upper bound of the ``"batch"`` weights.
        gather: concatenates a (n_r, ...) tensor over ranks; default ``all_gather_with_grad``.
        term: name of the returned loss term.

    Forward keywords (extra keys are ignored)::

        task_logits          (B, A, K) float  the head's logits
        task_mask            (A, K)    bool   the head's task columns (False: padding)
        anatomy_mask         (B, A)    bool   anatomy present and not cut
        anatomy_labels       (B, A, K) float  labels, catalog order, zero-padded
        task_ids             (A, K)    int64  optional: the head's column task hashes
        anatomy_label_known  (B, A, K) bool   optional: the label of the cell is known
        anatomy_task_ids     (B, A, K) int64  optional: the data's column task hashes (checked against task_ids)

    Returns ``{term: scalar}``.
    """

    #: model heads whose outputs this objective reads (the trainer checks the model has them)
    needs_heads: tuple[str, ...] = ("task_classifier",)
    #: no text embedding enters the loss: alone (with text-free heads) it lets the trainer skip the text tower
    reads_text = False

    def __init__(self, pos_weight: float | str | None = None, max_pos_weight: float = 100.0,
                 gather: Gather | None = None, term: str = "supervised") -> None:
        super().__init__()
        if isinstance(pos_weight, str):
            if pos_weight != "batch":
                raise ValueError(f"pos_weight must be None, a positive number or 'batch', got {pos_weight!r}")
        elif pos_weight is not None and (isinstance(pos_weight, bool) or not isinstance(pos_weight, (int, float))
                                         or not pos_weight > 0):
            raise ValueError(f"pos_weight must be None, a positive number or 'batch', got {pos_weight!r}")
        if not isinstance(max_pos_weight, (int, float)) or not max_pos_weight >= 1:
            raise ValueError(f"max_pos_weight must be a number >= 1, got {max_pos_weight!r}")
        self.pos_weight = pos_weight if isinstance(pos_weight, str) or pos_weight is None else float(pos_weight)
        self.max_pos_weight = float(max_pos_weight)
        self.gather = gather if gather is not None else all_gather_with_grad
        self.term = term

    @property
    def terms(self) -> tuple[str, ...]:
        """Names of the loss terms ``forward`` returns."""
        return (self.term,)

    def extra_repr(self) -> str:
        return f"pos_weight={self.pos_weight!r}, max_pos_weight={self.max_pos_weight}"

    def forward(self, task_logits: torch.Tensor | None = None, task_mask: torch.Tensor | None = None,
                anatomy_mask: torch.Tensor | None = None, anatomy_labels: torch.Tensor | None = None,
                task_ids: torch.Tensor | None = None, anatomy_label_known: torch.Tensor | None = None,
                anatomy_task_ids: torch.Tensor | None = None, **batch: Any) -> dict[str, torch.Tensor]:
        if task_logits is None or task_mask is None:
            raise ValueError("supervised objective: the model output has no task_logits / task_mask; add the "
                             "task_classifier head to model.heads (e.g. {task_classifier: {catalog: fvlm54}})")
        if anatomy_mask is None or anatomy_labels is None:
            raise ValueError("supervised objective: needs the model output anatomy_mask (B, A) and the batch field "
                             "anatomy_labels (B, A, K)")
        self._check(task_logits, task_mask, anatomy_mask, anatomy_labels, task_ids, anatomy_label_known,
                    anatomy_task_ids)
        dtype = torch.float64 if task_logits.dtype == torch.float64 else torch.float32
        z = self.gather(task_logits)  # (N, A, K)
        y = self.gather(anatomy_labels.to(dtype))  # (N, A, K)
        present = self.gather(anatomy_mask.bool())  # (N, A)
        valid = present.unsqueeze(-1) & task_mask.bool().to(z.device).unsqueeze(0) & torch.isfinite(y)  # (N, A, K)
        if anatomy_label_known is not None:
            valid = valid & self.gather(anatomy_label_known.bool())
        z = torch.where(valid, z.to(dtype), 0.0)  # masked cells may hold NaN: out before anything else
        y = torch.where(valid, y, 0.0).clamp(0.0, 1.0)
        weight = self._pos_weight(y, valid)  # (A, K) or None
        cell = F.binary_cross_entropy_with_logits(z, y, pos_weight=weight, reduction="none")  # (N, A, K)
        count = valid.sum()
        loss = (cell * valid).sum() / count.clamp_min(1).to(dtype)
        return {self.term: loss + zero_anchor(z)}

    # ------------------------------------------------------------------------------------------ pieces

    def _pos_weight(self, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        """rho (A, K) of the module docstring, or None (all 1)."""
        if self.pos_weight is None:
            return None
        if self.pos_weight != "batch":
            return torch.full(y.shape[1:], float(self.pos_weight), dtype=y.dtype, device=y.device)
        pos = (y * valid).sum(0)  # (A, K)
        neg = ((1.0 - y) * valid).sum(0)  # (A, K)
        ratio = torch.where(pos > 0, neg / pos.clamp_min(torch.finfo(y.dtype).tiny), torch.ones_like(pos))
        return ratio.clamp(1.0, self.max_pos_weight).detach()

    def _check(self, logits, task_mask, anatomy_mask, labels, task_ids, known, data_ids) -> None:
        name = "supervised objective"
        if logits.dim() != 3:
            raise ValueError(f"{name}: task_logits must be (B, A, K), got {tuple(logits.shape)}")
        b, a, k = logits.shape
        if tuple(task_mask.shape) != (a, k):
            raise ValueError(f"{name}: task_mask must be (A, K) = {(a, k)}, got {tuple(task_mask.shape)}")
        if tuple(anatomy_mask.shape) != (b, a):
            raise ValueError(f"{name}: anatomy_mask must be (B, A) = {(b, a)}, got {tuple(anatomy_mask.shape)}")
        if labels.dim() != 3 or tuple(labels.shape[:2]) != (b, a) or labels.shape[2] != k:
            raise ValueError(
                f"{name}: anatomy_labels {tuple(labels.shape)} do not fit the task_classifier head's logits "
                f"{tuple(logits.shape)} (B, A, K): the data has another task list per anatomy than the head; give "
                "the head the catalog of the data's report parser preset (model.heads.task_classifier.catalog)")
        if known is not None and tuple(known.shape) != (b, a, k):
            raise ValueError(f"{name}: anatomy_label_known must be (B, A, K) = {(b, a, k)}, got {tuple(known.shape)}")
        if data_ids is not None and task_ids is not None:
            if tuple(data_ids.shape) != (b, a, k) or tuple(task_ids.shape) != (a, k):
                raise ValueError(f"{name}: anatomy_task_ids must be (B, A, K) = {(b, a, k)} and task_ids (A, K), got "
                                 f"{tuple(data_ids.shape)} and {tuple(task_ids.shape)}")
            same = data_ids.to(task_ids.device) == task_ids.unsqueeze(0)  # (B, A, K)
            if not bool(same.all()):
                rows = sorted({int(r) for r in same.all(dim=0).all(dim=-1).logical_not().nonzero().flatten()})
                raise ValueError(
                    f"{name}: the task_classifier head's task columns differ from the data's anatomy_labels columns "
                    f"in anatomy row(s) {rows}: the head would learn one task from another's labels. Give the head "
                    "the catalog of the data's report parser preset (model.heads.task_classifier.catalog; fvlm15 "
                    "-> fvlm54) or its exact tasks")


register_objective("supervised", Supervised)
