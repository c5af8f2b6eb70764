"""Region-aware contrastive term: the ``region`` head's late-interaction similarity in the per-anatomy soft-target
contrastive of fVLM (objective ``region_contrastive``; docs/methods.md#origins, issue 9).

Inputs come from :class:`fvlm.model.heads.region.RegionHead` (its kept regions ``v`` and projected text
tokens ``t``). Over the GLOBAL batch (everything gathered from every rank with ``all_gather_with_grad``,
like the pooled objectives), for each anatomy a::

    S^a_ij = late_interaction(t_j, v_i)          text j's tokens attend to image i's kept regions
                                                 (fvlm.model.heads.region: learned query/key/value
                                                 cross-attention, the attended value scored against each
                                                 text token, averaged over j's text tokens)
    logits = s_r * S^a_ij                        s_r = region_logit_scale (the head's own 1/tau)
    L_a    = symmetric soft-target cross-entropy with the targets Y^a of ``disease_aware`` (same case, both
             normal, identical text, shared findings), or of ``anatomy_contrastive`` (``disease_pairs=False``)

A sample takes part for anatomy a when the anatomy is present (``anatomy_mask``), the head kept at least one
of its tokens and its text has a token. The sum (or mean) over contributing anatomies follows the same rules
as :class:`fvlm.losses.anatomy.AnatomyContrastive` (n_a >= 2, ``require_abnormal``), plus the zero anchor.
The recipes add this term beside the pooled one (``fvlm-region``, ``fvlm-region-disease``).
"""

from __future__ import annotations

from typing import Any

import torch

from fvlm.losses.anatomy import AnatomyContrastive, DiseaseAware, Gather
from fvlm.losses.functional import late_interaction, loss_dtype, symmetric_soft_contrastive, zero_anchor
from fvlm.losses.registry import register_objective

__all__ = ["RegionContrastive"]

_HEAD_KEYS = ("region_tokens", "region_token_mask", "region_text", "region_text_mask", "region_logit_scale",
              "region_temperature")


class RegionContrastive(DiseaseAware):
    """Per-anatomy soft-target InfoNCE over the region head's late-interaction similarity.

    Args: as :class:`DiseaseAware`, plus ``disease_pairs``: True (default) uses disease_aware's targets
    (needs ``anatomy_labels``), False anatomy_contrastive's (the reference false-negative calibration only).

    Forward keywords (extra keys ignored): the region head's ``region_tokens`` (B, A, k, D),
    ``region_token_mask`` (B, A, k), ``region_text`` (B, A, L, D), ``region_text_mask`` (B, A, L),
    ``region_logit_scale`` (), ``region_temperature`` () and, when the head gives them, its projections
    ``region_query`` (B, A, L, D), ``region_key``, ``region_value`` (B, A, k, D); the model's ``anatomy_mask`` (B, A); the batch's
    ``case_id``, ``text_id``, ``normal`` and (with ``disease_pairs``) ``anatomy_labels``, as in
    :class:`AnatomyContrastive`. Returns ``{term: scalar}``.
    """

    #: model heads whose outputs this objective reads (the trainer checks the model has them)
    needs_heads: tuple[str, ...] = ("region",)

    def __init__(
        self,
        disease_pairs: bool = True,
        mode: str = "exact",
        label_threshold: float = 0.5,
        normal_pairs: bool = True,
        identical_text: bool = True,
        require_abnormal: bool = True,
        reduction: str = "sum",
        gather: Gather | None = None,
        term: str = "region_contrastive",
        zeroshot_pooled_weight: float = 0.0,
    ) -> None:
        super().__init__(mode, label_threshold, normal_pairs, identical_text, require_abnormal, reduction, gather, term)
        self.disease_pairs = bool(disease_pairs)
        if isinstance(zeroshot_pooled_weight, bool) or not isinstance(zeroshot_pooled_weight, (int, float)) \
                or zeroshot_pooled_weight < 0:
            raise ValueError(f"region_contrastive: zeroshot_pooled_weight must be a number >= 0, "
                             f"got {zeroshot_pooled_weight!r}")
        self.zeroshot_pooled_weight = float(zeroshot_pooled_weight)

    def zeroshot_scorer(self) -> Any:
        """Zero-shot with what this term trains: the region similarity of the prompts' tokens and the kept
        regions (``fvlm.scoring.RegionScorer``), plus ``zeroshot_pooled_weight`` times the pooled logits
        (0, the default: the region similarity alone)."""
        from fvlm.scoring import ScorerSpec

        return ScorerSpec("region", {"pooled_weight": self.zeroshot_pooled_weight},
                          "region_contrastive trains the region similarity (top-k regions, text cross-attention)")

    def extra_repr(self) -> str:
        return f"disease_pairs={self.disease_pairs}, " + super().extra_repr()

    def forward(  # type: ignore[override]
        self,
        anatomy_mask: torch.Tensor,
        region_tokens: torch.Tensor | None = None,
        region_token_mask: torch.Tensor | None = None,
        region_text: torch.Tensor | None = None,
        region_text_mask: torch.Tensor | None = None,
        region_logit_scale: torch.Tensor | None = None,
        region_temperature: torch.Tensor | None = None,
        region_query: torch.Tensor | None = None,
        region_key: torch.Tensor | None = None,
        region_value: torch.Tensor | None = None,
        case_id: torch.Tensor | None = None,
        text_id: torch.Tensor | None = None,
        normal: torch.Tensor | None = None,
        **batch: Any,
    ) -> dict[str, torch.Tensor]:
        given = dict(zip(_HEAD_KEYS, (region_tokens, region_token_mask, region_text, region_text_mask,
                                      region_logit_scale, region_temperature)))
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(f"region_contrastive needs the outputs of the region head ({', '.join(missing)} "
                             "missing): add `heads: {region: {}}` to the recipe's model section")
        b, a = anatomy_mask.shape
        if region_tokens.dim() != 4 or region_tokens.shape[:2] != (b, a) or region_text.dim() != 4 \
                or region_text.shape[:2] != (b, a):
            raise ValueError(f"region_contrastive: region_tokens must be (B, A, k, D) and region_text (B, A, L, D) "
                             f"with (B, A) = {(b, a)}, got {tuple(region_tokens.shape)} and {tuple(region_text.shape)}")
        self._check_fields(b, a, case_id, text_id, normal)
        dtype = loss_dtype(region_tokens, region_text)
        scale = torch.as_tensor(region_logit_scale, device=region_tokens.device).to(dtype)

        # Gather: same tensors, same order, on every rank.
        reg = self.gather(region_tokens)  # (N, A, k, D)
        txt = self.gather(region_text)  # (N, A, L, D)
        reg_mask = self.gather(region_token_mask.bool())  # (N, A, k)
        txt_mask = self.gather(region_text_mask.bool())  # (N, A, L)
        mask = self.gather(anatomy_mask.bool())  # (N, A)
        n = reg.shape[0]
        cid = self.gather(case_id) if case_id is not None else torch.arange(n, device=reg.device)  # (N,)
        tid = self.gather(text_id) if self.identical_text else None  # (N, A)
        nrm = self.gather(normal.bool()) if normal is not None else None  # (N, A)
        extra = self._gather_extra(batch)

        mask = mask & reg_mask.any(-1) & txt_mask.any(-1)  # (N, A): anatomy present, regions kept, text given
        keep = mask[..., None, None]  # (N, A, 1, 1)
        reg = torch.where(keep, reg.to(dtype), 0.0)
        txt = torch.where(keep, txt.to(dtype), 0.0)
        proj = {}  # the head's learned query / key / value maps, gathered like the tokens
        for name, t in (("queries", region_query), ("keys", region_key), ("values", region_value)):
            if t is not None:
                proj[name] = torch.where(keep, self.gather(t).to(dtype), 0.0)
        sim, _ = late_interaction(txt, txt_mask, reg, reg_mask, region_temperature.to(dtype),
                                  **proj)  # (A, N_img, N_txt)
        present = mask.T  # (A, N)
        valid = present.unsqueeze(-1) & present.unsqueeze(-2)  # (A, N, N)
        targets = self.soft_targets(cid, tid, nrm, extra, present).to(dtype)  # (A, N, N)
        per_anatomy = symmetric_soft_contrastive(scale * sim, targets, valid)  # (A,)

        contributes = present.sum(dim=-1) >= 2  # (A,)
        if self.require_abnormal:
            contributes = contributes & (present & ~nrm.T).any(dim=-1)
        total = torch.where(contributes, per_anatomy, 0.0).sum()
        if self.reduction == "mean":
            total = total / contributes.sum().clamp_min(1).to(dtype)
        return {self.term: total + zero_anchor(reg, txt, scale, *proj.values())}

    # ------------------------------------------------------------------------------------------ targets

    def _gather_extra(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return super()._gather_extra(batch) if self.disease_pairs else {}

    def soft_targets(self, case_id, text_id, normal, extra, present) -> torch.Tensor:
        if self.disease_pairs:
            return super().soft_targets(case_id, text_id, normal, extra, present)
        return AnatomyContrastive.soft_targets(self, case_id, text_id, normal, extra, present)

    def _check_fields(self, b: int, a: int, case_id, text_id, normal) -> None:
        """The batch fields' checks of :class:`AnatomyContrastive` (without the embedding shapes)."""
        dummy = torch.empty(b, a, 1)
        self._check_inputs(dummy, dummy, torch.ones(b, a, dtype=torch.bool), case_id, text_id, normal)


register_objective("region_contrastive", RegionContrastive)
