"""Label-unified contrast: anatomy image embeddings against label-sentence embeddings with multi-positive
soft targets from label agreement (UMCL-style, docs/methods.md#origins).

Labels become text: each anatomy's label vector is written as a sentence ("emphysema, lung nodule." /
"no abnormality."; ``pipelines.train.extras.labels``) and encoded with learned prompt context (the
``prompt_context`` head's ``label_text_emb``). Because every case with labels has a label sentence, cases
without a report (label-only data) train too.

The loss (over the GLOBAL batch, gathered from every rank)
----------------------------------------------------------
Inputs: image embeddings ``I`` (N, A, D), label-sentence embeddings ``E`` (N, A, D), report-text embeddings
``T`` (N, A, D), presence mask ``M`` (N, A), binarised label vectors ``l_ia`` in {0,1}^K
(``anatomy_labels > label_threshold``), ``has_report`` h_i, logit scale ``s = 1/tau``. Per anatomy a, with
``P_a = {i : M_ia}``::

    Y^a_ij  = 1                                  if case_i == case_j (the same case, always)
              [l_ia == l_ja]                     mode "exact"   (two normal vectors agree: positive)
              |l_ia & l_ja| / |l_ia | l_ja|      mode "jaccard" (1 when both are empty)
    image term    S^a_ij = s <I_ia, E_ja>,  i, j in P_a
                  L^a_img = 1/2 [ 1/n sum_i CE(softmax_j S^a_i. ; Ybar^a_i.) + 1/n sum_j CE(softmax_i S^a_.j ; Ybar^aT_j.) ]
    text term     R^a_ij = s <T_ia, E_ja>,  i in P_a with h_i (rows: cases with a report), j in P_a
                  L^a_txt = 1/2 [ mean_i CE(softmax_j R^a_i. ; Ybar^a_i.) + mean_j CE(softmax_i R^a_.j ; Ybar^aT_j.) ]
    L = image_weight * sum_a L^a_img   (+ text_weight * sum_a L^a_txt, returned as a second term)

``Ybar`` is Y row-normalised over the valid entries (``fvlm.losses.functional``). A case without a report
(h_i False) takes part through its image and its label sentence only: it is a column of the text term (its
label sentence is real) but never a row (its text is empty). An anatomy contributes when n_a >= 2 and, with
``require_abnormal``, when one of its present samples has a positive label (an all-normal anatomy has
all-ones targets and nothing to learn). ``reduction="mean"`` averages over contributing anatomies instead of
summing. A ``0 * sum(inputs)`` anchor keeps every gather's backward on every rank.

In the ``fvlm-unified`` recipe this objective is added to ``disease_aware`` (image vs report text), which masks
the rows of label-only cases (``has_report``) so that an empty text never forms a pair.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from fvlm.distributed import all_gather_with_grad
from fvlm.losses.functional import loss_dtype, soft_cross_entropy_rows, symmetric_soft_contrastive, zero_anchor
from fvlm.losses.registry import register_objective

__all__ = ["LabelUnified", "label_agreement"]

Gather = Callable[[torch.Tensor], torch.Tensor]
_MODES = ("exact", "jaccard")
_REDUCTIONS = ("sum", "mean")


def label_agreement(labels: torch.Tensor, mode: str = "exact") -> torch.Tensor:
    """(A, N, N) agreement of binary label vectors ``labels`` (A, N, K): exact equality (1/0) or Jaccard
    overlap; two empty vectors (normal and normal) agree fully in both modes."""
    lab = labels.float()
    inter = lab @ lab.transpose(1, 2)  # (A, N, N)
    count = lab.sum(dim=-1)  # (A, N)
    union = count.unsqueeze(-1) + count.unsqueeze(-2) - inter  # (A, N, N)
    if mode == "exact":
        return ((inter == count.unsqueeze(-1)) & (inter == count.unsqueeze(-2))).float()
    if mode == "jaccard":
        return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")


class LabelUnified(nn.Module):
    """Per-anatomy image vs label-sentence contrast with label-agreement soft targets (module docstring).

    Args:
        mode: ``"exact"`` (identical label vectors are positives) or ``"jaccard"`` (weighted by overlap).
        label_threshold: a label counts as positive above it.
        image_weight: weight of the image-label term.
        text_weight: weight of the report-text-label term (0: off, not computed).
        require_abnormal: an anatomy contributes only when one of its present samples has a positive label.
        reduction: ``"sum"`` over contributing anatomies (as ``anatomy_contrastive``) or ``"mean"``.
        gather: concatenates a (n_r, ...) tensor over ranks; default ``all_gather_with_grad``.
        term: name of the image term; the text term is ``<term>_text``.

    Forward keywords (extra keys are ignored)::

        image_emb       (B, A, D)  float  anatomy image embeddings
        label_text_emb  (B, A, D)  float  label-sentence embeddings (``prompt_context`` head)
        text_emb        (B, A, D)  float  report-text embeddings (text term only)
        anatomy_mask    (B, A)     bool
        anatomy_labels  (B, A, K)  float  per-anatomy task labels
        logit_scale     ()         float  1 / tau
        case_id         (B,)       int64  optional; default every sample its own case
        has_report      (B,)       bool   optional; default all True

    Returns ``{term: image_weight * L_img}`` plus ``{term + "_text": text_weight * L_txt}`` when
    ``text_weight > 0``.
    """

    #: model heads whose outputs this objective reads (the trainer checks the model has them)
    needs_heads: tuple[str, ...] = ("prompt_context",)

    def __init__(self, mode: str = "exact", label_threshold: float = 0.5, image_weight: float = 1.0,
                 text_weight: float = 0.0, require_abnormal: bool = True, reduction: str = "sum",
                 gather: Gather | None = None, term: str = "label_unified") -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"label_unified: mode must be one of {_MODES}, got {mode!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"label_unified: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        for name, w in (("image_weight", image_weight), ("text_weight", text_weight)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise ValueError(f"label_unified: {name} must be a number >= 0, got {w!r}")
        self.mode, self.label_threshold = mode, float(label_threshold)
        self.image_weight, self.text_weight = float(image_weight), float(text_weight)
        self.require_abnormal, self.reduction = bool(require_abnormal), reduction
        self.gather = gather if gather is not None else all_gather_with_grad
        self.term = term

    @property
    def terms(self) -> tuple[str, ...]:
        return (self.term, f"{self.term}_text") if self.text_weight > 0 else (self.term,)

    def zeroshot_scorer(self):
        """The pooled cosine (``fvlm.scoring``): this objective trains the pooled anatomy embedding against
        label sentences; ``--prompts learned`` scores with those sentences' format (``"<title>."`` against
        ``"no abnormality."``, ``fvlm.prompts.task_prompts``)."""
        from fvlm.scoring import ScorerSpec

        return ScorerSpec("pooled", {}, f"{self.term} trains the cosine of the pooled anatomy embedding and label "
                                        "sentences (learned prompts: '<title>.' vs 'no abnormality.', as in training)")

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, image_weight={self.image_weight}, text_weight={self.text_weight}, "
                f"require_abnormal={self.require_abnormal}, reduction={self.reduction!r}")

    def soft_targets(self, case_id: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Unnormalised targets Y (A, N, N) from case ids (N,) and binary labels (N, A, K)."""
        agree = label_agreement(labels.transpose(0, 1), self.mode)  # (A, N, N)
        same = (case_id.unsqueeze(1) == case_id.unsqueeze(0)).float()  # (N, N)
        return torch.maximum(agree, same.unsqueeze(0))

    def forward(self, image_emb: torch.Tensor, anatomy_mask: torch.Tensor, logit_scale: torch.Tensor | float,
                label_text_emb: torch.Tensor | None = None, anatomy_labels: torch.Tensor | None = None,
                text_emb: torch.Tensor | None = None, case_id: torch.Tensor | None = None,
                has_report: torch.Tensor | None = None, **batch: Any) -> dict[str, torch.Tensor]:
        if label_text_emb is None:
            raise ValueError("label_unified needs label_text_emb from the prompt_context head: add "
                             "model.heads: {prompt_context: {}} to the recipe (see configs/train/fvlm-unified.yaml)")
        if anatomy_labels is None:
            raise ValueError("label_unified needs the batch field anatomy_labels (B, A, K)")
        b, a = image_emb.shape[:2]
        if image_emb.dim() != 3 or label_text_emb.shape != image_emb.shape:
            raise ValueError(f"label_unified: image_emb and label_text_emb must both be (B, A, D), got "
                             f"{tuple(image_emb.shape)} and {tuple(label_text_emb.shape)}")
        if tuple(anatomy_mask.shape) != (b, a) or anatomy_labels.dim() != 3 or anatomy_labels.shape[:2] != (b, a):
            raise ValueError(f"label_unified: anatomy_mask must be (B, A) and anatomy_labels (B, A, K) with "
                             f"(B, A) = {(b, a)}, got {tuple(anatomy_mask.shape)} and {tuple(anatomy_labels.shape)}")
        use_text = self.text_weight > 0
        if use_text and (text_emb is None or text_emb.shape != image_emb.shape):
            raise ValueError("label_unified: text_weight > 0 needs text_emb (B, A, D)")
        dtype = loss_dtype(image_emb, label_text_emb)
        scale = torch.as_tensor(logit_scale, device=image_emb.device).to(dtype)

        img = self.gather(image_emb)  # (N, A, D)
        lab = self.gather(label_text_emb)  # (N, A, D)
        mask = self.gather(anatomy_mask.bool())  # (N, A)
        labels = self.gather(anatomy_labels.float() > self.label_threshold)  # (N, A, K)
        n = img.shape[0]
        cid = self.gather(case_id) if case_id is not None else torch.arange(n, device=img.device)  # (N,)
        keep = mask.unsqueeze(-1)  # (N, A, 1)
        img = torch.where(keep, img.to(dtype), 0.0)
        lab = torch.where(keep, lab.to(dtype), 0.0)

        present = mask.T  # (A, N)
        targets = self.soft_targets(cid, labels).to(dtype)  # (A, N, N)
        contributes = present.sum(dim=-1) >= 2  # (A,)
        if self.require_abnormal:
            contributes = contributes & (present & labels.any(dim=-1).T).any(dim=-1)
        n_contrib = contributes.sum().clamp_min(1).to(dtype)

        valid = present.unsqueeze(-1) & present.unsqueeze(-2)  # (A, N, N)
        logits = scale * torch.einsum("nad,mad->anm", img, lab)  # (A, N, N)
        per_anatomy = symmetric_soft_contrastive(logits, targets, valid)  # (A,)
        image_loss = torch.where(contributes, per_anatomy, 0.0).sum()
        if self.reduction == "mean":
            image_loss = image_loss / n_contrib
        out = {self.term: self.image_weight * image_loss + zero_anchor(img, lab, scale)}

        if use_text:
            txt = torch.where(keep, self.gather(text_emb).to(dtype), 0.0)  # (N, A, D)
            hr = (self.gather(has_report.bool().reshape(-1)) if has_report is not None
                  else torch.ones(n, dtype=torch.bool, device=img.device))  # (N,)
            rows = present & hr.unsqueeze(0)  # (A, N) texts that exist
            valid_t = rows.unsqueeze(-1) & present.unsqueeze(-2)  # (A, N, N) text i vs label sentence j
            logits_t = scale * torch.einsum("nad,mad->anm", txt, lab)  # (A, N, N)
            t2l = soft_cross_entropy_rows(logits_t, targets, valid_t).sum(-1)  # (A,)
            l2t = soft_cross_entropy_rows(logits_t.transpose(1, 2), targets.transpose(1, 2),
                                          valid_t.transpose(1, 2)).sum(-1)  # (A,)
            n_rows = valid_t.any(-1).sum(-1).clamp_min(1).to(dtype)  # (A,)
            n_cols = valid_t.any(-2).sum(-1).clamp_min(1).to(dtype)  # (A,)
            per_t = 0.5 * (t2l / n_rows + l2t / n_cols)  # (A,)
            text_ok = contributes & rows.any(dim=-1)
            text_loss = torch.where(text_ok, per_t, 0.0).sum()
            if self.reduction == "mean":
                text_loss = text_loss / text_ok.sum().clamp_min(1).to(dtype)
            out[f"{self.term}_text"] = self.text_weight * text_loss + zero_anchor(txt)
        return out


register_objective("label_unified", LabelUnified)
