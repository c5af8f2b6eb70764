"""Uncertainty-aware anatomy contrastive objective: 2-Wasserstein similarity between Gaussian embeddings.

Probabilistic embeddings (docs/methods.md#origins; PCME++, Chun, ICLR 2024, for the closed-form distribution
distance in a contrastive loss; D-MLM-style inter- and intra-modal terms). Each anatomy embedding is a
diagonal Gaussian ``N(mu, diag(sigma^2))``: the means are the model's L2-normalised ``image_emb`` /
``text_emb``, the log-variances ``v = log sigma^2`` come from the ``uncertainty`` head
(:mod:`fvlm.model.heads.uncertainty`).

Distance and logits
-------------------
For diagonal covariances the 2-Wasserstein distance has the closed form::

    W2^2(N(mu_i, S_i), N(mu_j, S_j)) = |mu_i - mu_j|^2 + |sigma_i - sigma_j|^2,    sigma = exp(v / 2)

(for commuting covariances the Bures term ``tr(S_i + S_j - 2 (S_i^1/2 S_j S_i^1/2)^1/2)`` is exactly
``|sigma_i - sigma_j|^2``). It becomes a logit by a scale and a shift::

    S_ij = -a * W2^2_ij + b,      a = s * c / 2,   s = the model's logit scale 1/tau,   c = ``distance_scale``

The scale is the model's learnable logit scale (one temperature for the whole model, as in the point
objectives), times a fixed factor ``c``. The factor 1/2 makes the objective an exact generalisation of the
cosine one: with unit means and equal variances ``W2^2 = 2 - 2 cos``, so ``S_ij = s c cos_ij - s c + b``,
and the softmax cross-entropy is invariant to the constant: with equal variances and ``c = 1`` the inter
term IS ``anatomy_contrastive`` / ``disease_aware`` (tested). For the same reason the shift ``b`` cancels in
every row and column softmax and is not a parameter here (:func:`~fvlm.losses.functional.w2_logits` takes it
for completeness).

Terms (each per anatomy over the GLOBAL batch, with the false-negative targets ``Y`` of
:class:`~fvlm.losses.anatomy.AnatomyContrastive` (``targets: reference``) or
:class:`~fvlm.losses.anatomy.DiseaseAware` (``targets: disease_aware``), rows normalised, symmetric soft
cross-entropy ``L(S, Y, valid)`` of :func:`~fvlm.losses.functional.symmetric_soft_contrastive`)::

    inter        L( -a W2^2(I_i, T_j),   Y,  P_i & P_j )       image crop i vs anatomy text j
    intra_image  L( -a W2^2(I_i, I'_j),  Y,  P_i & P'_j )      view 1 of crop i vs view 2 of crop j
    intra_text   L( -a W2^2(T_i, T'_j),  Y,  P_i & P_j )       phrasing 1 of text i vs phrasing 2 of text j

``P`` is ``anatomy_mask`` (view 1; the texts take part where their image does, as in the inter term), ``P'``
the second view's mask; both are ANDed with the optional batch field ``has_report`` (B,): a label-only case
(no report, empty texts; ``pipelines.train.extras.labels``) takes part in no term, as in
:class:`~fvlm.losses.anatomy.AnatomyContrastive` (its empty text would otherwise be a pair, and its targets
``normal`` / ``text_id`` come from that empty text). The positives are the same as the inter term's: the same case (the two views /
phrasings of one sample) plus the false-negative pairs. An anatomy counts as in ``anatomy_contrastive``: at
least two taking-part samples and, with ``require_abnormal``, one abnormal sample among them; the anatomy
terms are summed (``reduction: sum``) or averaged (``mean``).

Variance regulariser (KL to a mean-anchored isotropic prior ``N(mu, v0 I)``; ``v0 = prior_var``, default
``1 / D``, the head's initial variance)::

    KL_d(v) = 1/2 * ( exp(v_d) / v0 - 1 - log(exp(v_d) / v0) ) >= 0,   zero at exp(v_d) = v0
    R_a     = mean over the present Gaussians of anatomy a (image, text and their second views) of mean_d KL_d
    R       = sum_a R_a (or their mean),  anatomies with at least one present Gaussian

The prior is anchored at each embedding's own mean, so the regulariser acts on variances only. Why it stops
collapse: through ``sigma = exp(v/2)`` the contrastive gradient with respect to ``v`` vanishes as the
variance goes to 0 (``d sigma / d v = sigma / 2``), while ``dKL_d/dv_d = 1/2 (exp(v_d)/v0 - 1)`` tends to
-1/2: near zero variance the regulariser always wins. Upwards it grows exponentially, so variances stay
within a band around ``v0`` whose width the contrastive terms and ``variance_weight`` set.

Every returned term already carries its weight (``inter_weight`` ...); the trainer adds the terms (times the
objective's own weight in the recipe). Missing inputs are errors that name the field and the switch.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from fvlm.distributed import all_gather_with_grad
from fvlm.losses.anatomy import AnatomyContrastive, DiseaseAware
from fvlm.losses.functional import loss_dtype, symmetric_soft_contrastive, w2_logits, zero_anchor
from fvlm.losses.registry import register_objective

__all__ = ["UncertaintyContrastive", "kl_to_prior"]

Gather = Callable[[torch.Tensor], torch.Tensor]
_TARGETS = ("reference", "disease_aware")


# ------------------------------------------------------------------------------------------ functional


def kl_to_prior(logvar: torch.Tensor, prior_var: float) -> torch.Tensor:
    """Per-dimension ``KL(N(mu, exp(v)) || N(mu, v0))`` averaged over the last dim: (..., D) -> (...,).

    ``1/2 * mean_d (exp(v_d)/v0 - 1 - v_d + log v0)``; zero iff every variance equals v0.
    """
    r = logvar - math.log(prior_var)  # log(exp(v) / v0)
    return 0.5 * (torch.exp(r) - 1.0 - r).mean(dim=-1)


# ---------------------------------------------------------------------------------------------- module


class UncertaintyContrastive(nn.Module):
    """Per-anatomy contrastive objective over Gaussian embeddings with 2-Wasserstein logits (the math: module
    docstring).

    Args:
        targets: false-negative targets: ``disease_aware`` (:class:`DiseaseAware`: reference + shared
            findings) or ``reference`` (:class:`AnatomyContrastive`).
        mode, label_threshold: ``DiseaseAware`` options (``targets: disease_aware`` only).
        normal_pairs, identical_text, require_abnormal, reduction: as in ``AnatomyContrastive``.
        intra_image: the view-1 vs view-2 image term (needs the head's ``intra_image`` outputs).
        intra_text: the phrasing-1 vs phrasing-2 text term (needs the head's ``intra_text`` outputs).
        inter_weight, intra_image_weight, intra_text_weight, variance_weight: weight of each term (the
            returned terms are already weighted).
        prior_var: ``v0`` of the variance regulariser; None: ``1 / D``.
        distance_scale: fixed factor ``c`` of the logit scale ``a = s c / 2``.
        gather: as in ``AnatomyContrastive`` (default ``all_gather_with_grad``).

    Forward keywords: those of ``AnatomyContrastive`` (``image_emb``, ``text_emb`` (B, A, D),
    ``anatomy_mask`` (B, A), ``logit_scale``, ``case_id``, ``text_id``, ``normal``, and ``anatomy_labels``
    for disease-aware targets) plus the head's ``image_logvar``, ``text_logvar`` (B, A, D) and, for the intra
    terms, ``image_emb_view2``, ``image_logvar_view2`` (B, A, D), ``anatomy_mask_view2`` (B, A),
    ``text_emb_view2``, ``text_logvar_view2`` (B, A, D).

    Returns ``{term: scalar}`` for the terms in :attr:`terms`.
    """

    #: model heads whose outputs this objective reads (the trainer checks the model has them)
    needs_heads: tuple[str, ...] = ("uncertainty",)

    def __init__(
        self,
        targets: str = "disease_aware",
        mode: str = "exact",
        label_threshold: float = 0.5,
        normal_pairs: bool = True,
        identical_text: bool = True,
        require_abnormal: bool = True,
        reduction: str = "sum",
        intra_image: bool = True,
        intra_text: bool = True,
        inter_weight: float = 1.0,
        intra_image_weight: float = 0.5,
        intra_text_weight: float = 0.5,
        variance_weight: float = 1.0,
        prior_var: float | None = None,
        distance_scale: float = 1.0,
        gather: Gather | None = None,
    ) -> None:
        super().__init__()
        if targets not in _TARGETS:
            raise ValueError(f"uncertainty_contrastive: targets must be one of {_TARGETS}, got {targets!r}")
        for name, w in (("inter_weight", inter_weight), ("intra_image_weight", intra_image_weight),
                        ("intra_text_weight", intra_text_weight), ("variance_weight", variance_weight)):
            if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0:
                raise ValueError(f"uncertainty_contrastive: {name} must be a number >= 0, got {w!r}")
        if prior_var is not None and not prior_var > 0:
            raise ValueError(f"uncertainty_contrastive: prior_var must be positive (or null for 1/D), "
                             f"got {prior_var!r}")
        if not distance_scale > 0:
            raise ValueError(f"uncertainty_contrastive: distance_scale must be positive, got {distance_scale!r}")
        self.gather = gather if gather is not None else all_gather_with_grad
        if targets == "disease_aware":
            self.calibration: AnatomyContrastive = DiseaseAware(
                mode, label_threshold, normal_pairs, identical_text, require_abnormal, reduction, self.gather)
        else:
            self.calibration = AnatomyContrastive(normal_pairs, identical_text, require_abnormal, reduction,
                                                  self.gather)
        self.targets = targets
        self.intra_image, self.intra_text = bool(intra_image), bool(intra_text)
        self.inter_weight, self.intra_image_weight = float(inter_weight), float(intra_image_weight)
        self.intra_text_weight, self.variance_weight = float(intra_text_weight), float(variance_weight)
        self.prior_var = None if prior_var is None else float(prior_var)
        self.distance_scale = float(distance_scale)

    def zeroshot_scorer(self) -> Any:
        """Zero-shot with the trained distance: ``-(s c / 2) W2^2`` of the image and prompt Gaussians, this
        objective's ``distance_scale`` c (``fvlm.scoring.WassersteinScorer``)."""
        from fvlm.scoring import ScorerSpec

        return ScorerSpec("wasserstein", {"distance_scale": self.distance_scale},
                          "uncertainty_contrastive trains -(s c/2) W2^2 between Gaussian embeddings")

    @property
    def terms(self) -> tuple[str, ...]:
        """Names of the loss terms ``forward`` returns."""
        return (("uncertainty_inter",) + (("uncertainty_intra_image",) if self.intra_image else ())
                + (("uncertainty_intra_text",) if self.intra_text else ()) + ("uncertainty_variance",))

    def extra_repr(self) -> str:
        return (f"targets={self.targets!r}, intra_image={self.intra_image}, intra_text={self.intra_text}, "
                f"weights=(inter {self.inter_weight}, intra_image {self.intra_image_weight}, intra_text "
                f"{self.intra_text_weight}, variance {self.variance_weight}), prior_var={self.prior_var}, "
                f"distance_scale={self.distance_scale}")

    # ------------------------------------------------------------------------------------ the targets

    def soft_targets(self, case_id, text_id, normal, extra, present) -> torch.Tensor:
        """The false-negative targets Y (A, N, N) of the chosen calibration (``AnatomyContrastive.soft_targets``)."""
        return self.calibration.soft_targets(case_id, text_id, normal, extra, present)

    def _gather_extra(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.calibration._gather_extra(batch)

    # ----------------------------------------------------------------------------------------- forward

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        anatomy_mask: torch.Tensor,
        logit_scale: torch.Tensor | float,
        image_logvar: torch.Tensor | None = None,
        text_logvar: torch.Tensor | None = None,
        case_id: torch.Tensor | None = None,
        text_id: torch.Tensor | None = None,
        normal: torch.Tensor | None = None,
        image_emb_view2: torch.Tensor | None = None,
        image_logvar_view2: torch.Tensor | None = None,
        anatomy_mask_view2: torch.Tensor | None = None,
        text_emb_view2: torch.Tensor | None = None,
        text_logvar_view2: torch.Tensor | None = None,
        **batch: Any,
    ) -> dict[str, torch.Tensor]:
        self._check(image_emb, image_logvar, text_logvar, image_emb_view2, image_logvar_view2, anatomy_mask_view2,
                    text_emb_view2, text_logvar_view2)
        self.calibration._check_inputs(image_emb, text_emb, anatomy_mask, case_id, text_id, normal)
        dtype = loss_dtype(image_emb, text_emb, image_logvar, text_logvar)
        scale = torch.as_tensor(logit_scale, device=image_emb.device).to(dtype)
        a_coef = 0.5 * self.distance_scale * scale  # a = s c / 2

        g = self.gather
        mask = g(anatomy_mask.bool())  # (N, A)
        has_report = batch.get("has_report")
        reported = g(has_report.bool().reshape(-1)).unsqueeze(-1) if has_report is not None else None  # (N, 1)
        if reported is not None:  # label-only cases have no text to pair with: out of every term (as the base)
            mask = mask & reported
        keep = mask.unsqueeze(-1)  # (N, A, 1)
        # masked-out entries may hold anything: zero them (mean 0, log-variance 0) so no NaN reaches a gradient
        img, img_v = (torch.where(keep, g(x).to(dtype), 0.0) for x in (image_emb, image_logvar))  # (N, A, D)
        txt, txt_v = (torch.where(keep, g(x).to(dtype), 0.0) for x in (text_emb, text_logvar))  # (N, A, D)
        n = img.shape[0]
        cid = g(case_id) if case_id is not None else torch.arange(n, device=img.device)  # (N,)
        tid = g(text_id) if self.calibration.identical_text else None  # (N, A)
        nrm = g(normal.bool()) if normal is not None else None  # (N, A)
        extra = self.calibration._gather_extra(batch)

        present = mask.T  # (A, N)
        targets = self.soft_targets(cid, tid, nrm, extra, present).to(dtype)  # (A, N, N)
        abnormal = (~nrm.T) if nrm is not None else torch.ones_like(present)  # (A, N)
        d = img.shape[-1]
        prior = self.prior_var if self.prior_var is not None else 1.0 / d

        def pair_term(mu1, v1, p1, mu2, v2, p2) -> torch.Tensor:
            """Reduced per-anatomy contrastive of Gaussians (N, A, D) x2 with presence (A, N) x2."""
            t = lambda x: x.transpose(0, 1)  # (N, A, D) -> (A, N, D)  # noqa: E731
            logits = w2_logits(t(mu1), t(v1), t(mu2), t(v2), a_coef)  # (A, N, N)
            valid = p1.unsqueeze(-1) & p2.unsqueeze(-2)  # (A, N, N)
            per_anatomy = symmetric_soft_contrastive(logits, targets, valid)  # (A,)
            both = p1 & p2  # (A, N) samples taking part on both sides
            counts = (p1.sum(-1) >= 2) & (p2.sum(-1) >= 2)
            if self.calibration.require_abnormal:
                counts = counts & (both & abnormal).any(dim=-1)
            return self._reduce(per_anatomy, counts, dtype)

        out: dict[str, torch.Tensor] = {}
        kl_sum = torch.where(mask, kl_to_prior(img_v, prior), 0.0).T  # (A, N)
        kl_sum = kl_sum + torch.where(mask, kl_to_prior(txt_v, prior), 0.0).T  # (A, N)
        kl_count = 2 * present.sum(-1)  # (A,)
        anchors = [img, img_v, txt, txt_v, scale]

        inter = pair_term(img, img_v, present, txt, txt_v, present)
        out["uncertainty_inter"] = self.inter_weight * inter

        if self.intra_image:
            mask2 = g(anatomy_mask_view2.bool())  # (N, A)
            if reported is not None:
                mask2 = mask2 & reported
            keep2 = mask2.unsqueeze(-1)
            img2, img2_v = (torch.where(keep2, g(x).to(dtype), 0.0) for x in (image_emb_view2, image_logvar_view2))
            present2 = mask2.T  # (A, N)
            out["uncertainty_intra_image"] = self.intra_image_weight * pair_term(img, img_v, present, img2, img2_v,
                                                                                 present2)
            kl_sum = kl_sum + torch.where(mask2, kl_to_prior(img2_v, prior), 0.0).T
            kl_count = kl_count + present2.sum(-1)
            anchors += [img2, img2_v]
        if self.intra_text:
            txt2, txt2_v = (torch.where(keep, g(x).to(dtype), 0.0) for x in (text_emb_view2, text_logvar_view2))
            out["uncertainty_intra_text"] = self.intra_text_weight * pair_term(txt, txt_v, present, txt2, txt2_v,
                                                                               present)
            kl_sum = kl_sum + torch.where(mask, kl_to_prior(txt2_v, prior), 0.0).T
            kl_count = kl_count + present.sum(-1)
            anchors += [txt2, txt2_v]

        per_anatomy_kl = kl_sum.sum(-1) / kl_count.clamp_min(1).to(dtype)  # (A,)
        out["uncertainty_variance"] = self.variance_weight * self._reduce(per_anatomy_kl, kl_count > 0, dtype)
        anchor = zero_anchor(*anchors)  # every gathered input in the graph, whatever the data
        return {k: v + anchor for k, v in out.items()}

    def _reduce(self, per_anatomy: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        total = torch.where(counts, per_anatomy, 0.0).sum()
        if self.calibration.reduction == "mean":
            total = total / counts.sum().clamp_min(1).to(dtype)
        return total

    # ------------------------------------------------------------------------------------------ checks

    def _check(self, image_emb, image_logvar, text_logvar, image_emb_view2, image_logvar_view2, anatomy_mask_view2,
               text_emb_view2, text_logvar_view2) -> None:
        who = "uncertainty_contrastive"
        if image_logvar is None or text_logvar is None:
            missing = " and ".join(k for k, v in (("image_logvar", image_logvar), ("text_logvar", text_logvar))
                                   if v is None)
            raise ValueError(f"{who}: the model output has no {missing}; the objective needs the uncertainty head: "
                             "add `heads: {uncertainty: {}}` to the recipe's model section")
        shape = tuple(image_emb.shape)
        for name, t in (("image_logvar", image_logvar), ("text_logvar", text_logvar)):
            if tuple(t.shape) != shape:
                raise ValueError(f"{who}: {name} must be (B, A, D) = {shape} like image_emb, got {tuple(t.shape)}")
        views = (
            ("intra_image", self.intra_image, "image_view2",
             (("image_emb_view2", image_emb_view2, shape), ("image_logvar_view2", image_logvar_view2, shape),
              ("anatomy_mask_view2", anatomy_mask_view2, shape[:2]))),
            ("intra_text", self.intra_text, "text_view2",
             (("text_emb_view2", text_emb_view2, shape), ("text_logvar_view2", text_logvar_view2, shape))),
        )
        for switch, on, extra, fields in views:
            if not on:
                continue
            for name, t, want in fields:
                if t is None:
                    raise ValueError(
                        f"{who}: {switch}=true needs the model output {name}, which the uncertainty head gives when "
                        f"its option {switch} is on and the batch holds the dataset extra {extra!r} (the trainer "
                        f"turns it on from the head's options); turn the head's {switch} on, or set "
                        f"{switch}: false in this objective's options")
                if tuple(t.shape) != want:
                    raise ValueError(f"{who}: {name} must have shape {want}, got {tuple(t.shape)}")


register_objective("uncertainty_contrastive", UncertaintyContrastive)
