"""Anatomy-level contrastive objectives with false-negative calibration (fVLM, ICLR 2025).

fVLM (Shui et al., "Large-scale and Fine-grained Vision-language Pre-training for Enhanced CT Image
Understanding", ICLR 2025) contrasts each anatomy's image embedding with the embedding of the report
sentences about that anatomy, and corrects the false negatives this creates: two samples of the same
anatomy are not pushed apart when both are described as normal, or when their texts are identical.
``disease_aware`` adds the paper's disease-aware pairing, absent from the released code: samples whose
anatomy carries the same findings are positives too. docs/architecture.md#loss.

The loss (over the GLOBAL batch, gathered from every rank)
----------------------------------------------------------
Inputs: image and text embeddings ``I, T`` of shape (N, A, D) (L2-normalised by the model), presence mask
``M`` (N, A), logit scale ``s = 1/tau``. For each anatomy a, let ``P_a = {i : M_ia}`` (n_a samples)::

    S^a_ij   = s * <I_ia, T_ja>                                     i, j in P_a
    Y^a_ij   = 1  if case_i == case_j                               (the true pair; always on)
                  or normal_ia and normal_ja                        (switch ``normal_pairs``)
                  or text_ia == text_ja                             (switch ``identical_text``)
               [disease_aware: max(Y^a_ij, W^a_ij), W the finding-label agreement, see DiseaseAware]
    Ybar^a   = Y^a with each row divided by its sum
    L_a      = 1/2 * [ 1/n_a sum_i CE(softmax_j S^a_ij ; Ybar^a_i.) + 1/n_a sum_j CE(softmax_i S^a_ij ; Ybar^aT_j.) ]
    CE(p; y) = - sum_j y_j log p_j

An anatomy contributes when n_a >= 2 (one sample has nothing to contrast; its loss is identically 0) and,
with ``require_abnormal`` (the reference), when at least one of its present samples is abnormal
(``~normal``): with normal pairs on, an all-normal anatomy has all-ones targets and nothing to learn.
The total is the sum over contributing anatomies (``reduction="sum"``, the reference) or their mean
(``"mean"``), plus ``0 * sum(inputs)`` so that the graph, and the gathers' backward, always exist.

Distributed: every feature and field is gathered through ``gather`` (default
:func:`fvlm.distributed.all_gather_with_grad`), and every rank computes the same global loss. See
:mod:`fvlm.distributed` for the gradient each rank then gets and why DDP's mean reproduces one process.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from fvlm.distributed import all_gather_with_grad
from fvlm.losses.functional import loss_dtype, symmetric_soft_contrastive, zero_anchor
from fvlm.losses.registry import register_objective

__all__ = ["AnatomyContrastive", "DiseaseAware"]

Gather = Callable[[torch.Tensor], torch.Tensor]
_REDUCTIONS = ("sum", "mean")
_MODES = ("exact", "jaccard")


class AnatomyContrastive(nn.Module):
    """Per-anatomy symmetric soft-target InfoNCE with the reference's false-negative calibration.

    Args:
        normal_pairs: two samples both described as normal (for that anatomy) are positives.
        identical_text: two samples whose anatomy texts are identical (same ``text_id``) are positives.
        require_abnormal: an anatomy contributes only if at least one of its present samples in the global
            batch is abnormal (the reference's rule).
        reduction: ``"sum"`` over contributing anatomies (reference) or ``"mean"``.
        gather: concatenates a (n_r, ...) tensor over ranks; default ``all_gather_with_grad``
            (the identity in one process). Injectable for tests and other parallel layouts.
        term: name of the returned loss term.

    Forward keywords (extra keys are ignored)::

        image_emb     (B, A, D) float   per-anatomy image embeddings
        text_emb      (B, A, D) float   per-anatomy text embeddings
        anatomy_mask  (B, A)    bool    anatomy present and usable
        logit_scale   ()        float   1 / tau
        case_id       (B,)      int64   same case -> positive (default: every sample its own case)
        text_id       (B, A)    int64   hash of the anatomy text (needed with ``identical_text``)
        normal        (B, A)    bool    the anatomy's description is normal (needed with ``normal_pairs``
                                        or ``require_abnormal``)
        has_report    (B,)      bool    optional: False for a label-only case (no report, empty texts;
                                        ``pipelines.train.extras.labels``); its rows are masked out, so it
                                        never forms a pair, positive or negative, with its empty text

    Returns ``{term: scalar}``.
    """

    def __init__(
        self,
        normal_pairs: bool = True,
        identical_text: bool = True,
        require_abnormal: bool = True,
        reduction: str = "sum",
        gather: Gather | None = None,
        term: str = "anatomy_contrastive",
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.normal_pairs = bool(normal_pairs)
        self.identical_text = bool(identical_text)
        self.require_abnormal = bool(require_abnormal)
        self.reduction = reduction
        self.gather = gather if gather is not None else all_gather_with_grad
        self.term = term

    @property
    def terms(self) -> tuple[str, ...]:
        """Names of the loss terms ``forward`` returns."""
        return (self.term,)

    def zeroshot_scorer(self) -> Any:
        """Zero-shot with what this objective trains: the cosine of the pooled anatomy embedding and the prompt
        embedding times the logit scale (``fvlm.scoring``)."""
        from fvlm.scoring import ScorerSpec

        return ScorerSpec("pooled", {}, f"{self.term} trains the cosine of the pooled anatomy embeddings")

    def extra_repr(self) -> str:
        return (
            f"normal_pairs={self.normal_pairs}, identical_text={self.identical_text}, "
            f"require_abnormal={self.require_abnormal}, reduction={self.reduction!r}"
        )

    # ------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        anatomy_mask: torch.Tensor,
        logit_scale: torch.Tensor | float,
        case_id: torch.Tensor | None = None,
        text_id: torch.Tensor | None = None,
        normal: torch.Tensor | None = None,
        **batch: Any,
    ) -> dict[str, torch.Tensor]:
        self._check_inputs(image_emb, text_emb, anatomy_mask, case_id, text_id, normal)
        dtype = loss_dtype(image_emb, text_emb)
        scale = torch.as_tensor(logit_scale, device=image_emb.device).to(dtype)

        # Gather: same tensors, same order, on every rank, whatever the data.
        img = self.gather(image_emb)  # (N, A, D)
        txt = self.gather(text_emb)  # (N, A, D)
        mask = self.gather(anatomy_mask.bool())  # (N, A)
        has_report = batch.get("has_report")
        if has_report is not None:  # label-only cases have no text to pair with: out of this loss
            mask = mask & self.gather(has_report.bool().reshape(-1)).unsqueeze(-1)  # (N, A)
        n = img.shape[0]
        cid = self.gather(case_id) if case_id is not None else torch.arange(n, device=img.device)  # (N,)
        tid = self.gather(text_id) if self.identical_text else None  # (N, A)
        nrm = self.gather(normal.bool()) if normal is not None else None  # (N, A)
        extra = self._gather_extra(batch)

        # Masked-out entries may hold anything (zeros, NaN): zero them so no NaN reaches a gradient.
        keep = mask.unsqueeze(-1)  # (N, A, 1)
        img = torch.where(keep, img.to(dtype), 0.0)
        txt = torch.where(keep, txt.to(dtype), 0.0)

        present = mask.T  # (A, N)
        valid = present.unsqueeze(-1) & present.unsqueeze(-2)  # (A, N, N)
        logits = scale * torch.einsum("nad,mad->anm", img, txt)  # (A, N, N)
        targets = self.soft_targets(cid, tid, nrm, extra, present).to(dtype)  # (A, N, N)
        per_anatomy = symmetric_soft_contrastive(logits, targets, valid)  # (A,)

        contributes = present.sum(dim=-1) >= 2  # (A,)
        if self.require_abnormal:
            contributes = contributes & (present & ~nrm.T).any(dim=-1)
        total = torch.where(contributes, per_anatomy, 0.0).sum()
        if self.reduction == "mean":
            total = total / contributes.sum().clamp_min(1).to(dtype)
        return {self.term: total + zero_anchor(img, txt, scale)}

    # ----------------------------------------------------------------------------------------- targets

    def soft_targets(
        self,
        case_id: torch.Tensor,
        text_id: torch.Tensor | None,
        normal: torch.Tensor | None,
        extra: dict[str, torch.Tensor],
        present: torch.Tensor,
    ) -> torch.Tensor:
        """Unnormalised soft positives Y (A, N, N) over the global batch (rows normalised later).

        case_id (N,), text_id (N, A), normal (N, A), present (A, N). Entries outside present x present
        are ignored by the loss.
        """
        a, n = present.shape
        pos = (case_id.unsqueeze(1) == case_id.unsqueeze(0)).expand(a, n, n)  # (A, N, N)
        if self.normal_pairs:
            nt = normal.T  # (A, N)
            pos = pos | (nt.unsqueeze(-1) & nt.unsqueeze(-2))
        if self.identical_text:
            tt = text_id.T  # (A, N)
            pos = pos | (tt.unsqueeze(-1) == tt.unsqueeze(-2))
        return pos.float()

    def _gather_extra(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Further batch fields a subclass needs, gathered; none here."""
        return {}

    def _check_inputs(self, image_emb, text_emb, anatomy_mask, case_id, text_id, normal) -> None:
        if image_emb.dim() != 3 or text_emb.shape != image_emb.shape:
            raise ValueError(
                f"{type(self).__name__}: image_emb and text_emb must both be (B, A, D), "
                f"got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
            )
        b, a, _ = image_emb.shape
        if tuple(anatomy_mask.shape) != (b, a):
            raise ValueError(
                f"{type(self).__name__}: anatomy_mask must be (B, A) = {(b, a)}, got {tuple(anatomy_mask.shape)}"
            )
        if case_id is not None and tuple(case_id.shape) != (b,):
            raise ValueError(f"{type(self).__name__}: case_id must be (B,) = {(b,)}, got {tuple(case_id.shape)}")
        if self.identical_text:
            if text_id is None:
                raise ValueError(
                    f"{type(self).__name__}: identical_text=True needs the batch field text_id (B, A); "
                    "pass it or set identical_text=False"
                )
            if tuple(text_id.shape) != (b, a):
                raise ValueError(
                    f"{type(self).__name__}: text_id must be (B, A) = {(b, a)}, got {tuple(text_id.shape)}"
                )
        if self.normal_pairs or self.require_abnormal:
            if normal is None:
                raise ValueError(
                    f"{type(self).__name__}: normal_pairs / require_abnormal need the batch field normal (B, A); "
                    "pass it or switch both off"
                )
            if tuple(normal.shape) != (b, a):
                raise ValueError(
                    f"{type(self).__name__}: normal must be (B, A) = {(b, a)}, got {tuple(normal.shape)}"
                )


class DiseaseAware(AnatomyContrastive):
    """``anatomy_contrastive`` plus disease-aware pairing: shared findings make positives.

    With ``L_ia`` the binarised finding labels of anatomy a in sample i (``anatomy_labels > label_threshold``,
    (N, A, K), zero-padded tasks are simply never positive)::

        exact:    W^a_ij = 1 if L_ia == L_ja and L_ia has at least one finding, else 0
        jaccard:  W^a_ij = |L_ia & L_ja| / |L_ia | L_ja|   (0 when both are empty)
        Y^a_ij  = max(Y^a_ij (reference targets), W^a_ij)

    So two abnormal samples with the same diagnosis are not pushed apart (exact), or are pulled together in
    proportion to their label overlap (jaccard). Needs the batch field ``anatomy_labels`` (B, A, K).
    """

    def __init__(
        self,
        mode: str = "exact",
        label_threshold: float = 0.5,
        normal_pairs: bool = True,
        identical_text: bool = True,
        require_abnormal: bool = True,
        reduction: str = "sum",
        gather: Gather | None = None,
        term: str = "disease_aware",
    ) -> None:
        super().__init__(normal_pairs, identical_text, require_abnormal, reduction, gather, term)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.mode = mode
        self.label_threshold = float(label_threshold)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, label_threshold={self.label_threshold}, " + super().extra_repr()

    def _gather_extra(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        labels = batch.get("anatomy_labels")
        if labels is None:
            raise ValueError(
                "DiseaseAware needs the batch field anatomy_labels (B, A, K) of per-anatomy finding labels"
            )
        if labels.dim() != 3:
            raise ValueError(f"DiseaseAware: anatomy_labels must be (B, A, K), got {tuple(labels.shape)}")
        return {"labels": self.gather(labels.float() > self.label_threshold)}  # (N, A, K) bool

    def soft_targets(self, case_id, text_id, normal, extra, present) -> torch.Tensor:
        base = super().soft_targets(case_id, text_id, normal, extra, present)  # (A, N, N)
        lab = extra["labels"].transpose(0, 1).float()  # (A, N, K)
        if lab.shape[:2] != present.shape:
            raise ValueError(
                f"DiseaseAware: anatomy_labels is {tuple(extra['labels'].shape)}, "
                f"expected (N, A, K) with (A, N) = {tuple(present.shape)}"
            )
        inter = lab @ lab.transpose(1, 2)  # (A, N, N) shared findings
        count = lab.sum(dim=-1)  # (A, N)
        if self.mode == "exact":
            same = inter == count.unsqueeze(-1)  # every finding of i is in j ...
            same = same & (inter == count.unsqueeze(-2)) & (count.unsqueeze(-1) > 0)  # ... and of j in i, non-empty
            agree = same.float()
        else:
            union = count.unsqueeze(-1) + count.unsqueeze(-2) - inter  # (A, N, N)
            agree = torch.where(union > 0, inter / union.clamp_min(1), 0.0)
        return torch.maximum(base, agree)


register_objective("anatomy_contrastive", AnatomyContrastive)
register_objective(
    "anatomy_infonce",
    AnatomyContrastive,
    defaults={"normal_pairs": False, "identical_text": False, "term": "anatomy_infonce"},
    help="anatomy_contrastive without its extra positives (normal pairs, identical texts): plain per-anatomy InfoNCE",
)
register_objective("disease_aware", DiseaseAware)
