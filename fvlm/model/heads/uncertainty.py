"""Head ``uncertainty``: a diagonal Gaussian per anatomy image embedding and per anatomy text embedding.

Probabilistic embeddings (docs/methods.md#origins; after PCME / PCME++, Chun et al., CVPR 2021 / ICLR 2024, and
D-MLM-style uncertainty-aware report alignment): the anatomy ``a`` of sample ``b`` is not a point but
``N(mu_ba, diag(exp(v_ba)))``. The means are the model's existing L2-normalised embeddings (``image_emb``,
``text_emb``); this head adds the log-variances ``v``::

    image:  v^I_ba = clamp(P^I_a(h_ba) ,  logvar_min, logvar_max)     h_ba  = ctx.pooled[b, a]          (W,)
    text:   v^T_ba = clamp(P^T_a(c_ba) ,  logvar_min, logvar_max)     c_ba  = ctx.text_hidden[b, a, 0]  (H,)
    P_a(x)  = x @ W_a + beta_a          per anatomy (W_a (W|H, D), beta_a (D,)), or one shared linear map

``h`` is the anatomy pooling's attention output before its per-anatomy projection, ``c`` the text encoder's
[CLS] hidden state (the same vectors the means are projected from). The biases start at ``init_logvar``
(default ``-log D``: variance 1/D per dimension, the squared per-dimension scale of a unit mean) and the
weights small (normal, std ``WEIGHT_STD / sqrt(F)``, F the input width), so at initialisation the variances
lie close to ``exp(init_logvar)`` and the 2-Wasserstein logits of ``uncertainty_contrastive`` are close to
the cosine logits of the point model. Not exactly equal on purpose: with equal variances the variance part
of the W2 distance, ``|sigma_i - sigma_j|^2``, has zero gradient (a saddle), and the small spread lets it
learn from the first step.

Intra-modal views (training): with ``intra_image`` and the batch fields of the dataset extra ``image_view2``
(``image_view2`` (B, 1, Z, Y, X), ``anatomy_view2`` (B, Z, Y, X), ``cut_view2`` (B, A)) the second augmented
view is encoded by the same towers; with ``intra_text`` and those of ``text_view2`` (``input_ids_view2``,
``attention_mask_view2`` (B, A, L)) the second phrasing of each anatomy text is. Views absent from the batch
(evaluation, prediction) are simply not encoded.

Outputs (merged into the model output)::

    image_logvar        (B, A, D)  log-variances of the anatomy image Gaussians (masked rows: the bias)
    text_logvar         (B, A, D)  log-variances of the anatomy text Gaussians
    image_emb_view2     (B, A, D)  second view's means      } with intra_image and its batch fields
    image_logvar_view2  (B, A, D)                           }
    anatomy_mask_view2  (B, A)     bool                     }
    text_emb_view2      (B, A, D)  second phrasing's means  } with intra_text and its batch fields
    text_logvar_view2   (B, A, D)                           }

Confidence (``fvlm predict``): :meth:`UncertaintyHead.confidence` maps an image log-variance to
``1 / (1 + mean_d exp(v_d) / v_0)`` with ``v_0 = exp(init_logvar)``: 0.5 at the initial variance, towards 1
as the model grows surer (variance -> 0), towards 0 as it grows less sure.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from fvlm.model.heads import Head, HeadContext, register_head
from fvlm.model.heads.entity import text_dims

__all__ = ["UncertaintyHead", "IMAGE_VIEW_KEYS", "TEXT_VIEW_KEYS", "WEIGHT_STD"]

#: initial weights of the log-variance maps: normal with std WEIGHT_STD / sqrt(input width)
WEIGHT_STD = 0.1

#: batch fields of the second image view (dataset extra ``image_view2``)
IMAGE_VIEW_KEYS = ("image_view2", "anatomy_view2", "cut_view2")
#: batch fields of the second phrasing of the anatomy texts (dataset extra ``text_view2``)
TEXT_VIEW_KEYS = ("input_ids_view2", "attention_mask_view2")
#: how the second phrasing is written (head option ``text_view``)
TEXT_VIEWS = ("rephrase", "structured")


class _LogVar(nn.Module):
    """(..., A, F) -> (..., A, D): per-anatomy (A, F, D) or shared (F, D) linear map, small initial weights."""

    def __init__(self, num_anatomies: int, in_dim: int, embed_dim: int, shared: bool, init: float) -> None:
        super().__init__()
        self.in_dim = in_dim
        shape = (in_dim, embed_dim) if shared else (num_anatomies, in_dim, embed_dim)
        self.weight = nn.Parameter(torch.randn(shape) * (WEIGHT_STD / math.sqrt(in_dim)))  # (F, D) or (A, F, D)
        self.bias = nn.Parameter(torch.full(shape[:-2] + (embed_dim,), float(init)))  # (D,) or (A, D)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"uncertainty head: input width {x.shape[-1]} differs from the head's {self.in_dim}")
        w = self.weight.to(x.dtype)
        if w.dim() == 2:
            return x @ w + self.bias.to(x.dtype)  # (..., A, D)
        return torch.einsum("...af,afd->...ad", x, w) + self.bias.to(x.dtype)  # (..., A, D)


@register_head("uncertainty")
class UncertaintyHead(Head):
    """Gaussian log-variance heads on the anatomy image and text embeddings; see the module docstring.

    Options (``model.heads.uncertainty``):
        shared: one linear map for every anatomy (True) or one per anatomy (False, default; like the pooling's
            per-anatomy projection).
        intra_image: encode the second augmented view when the batch has it (turns on the dataset extra
            ``image_view2`` in training).
        intra_text: encode the second phrasing of the anatomy texts when the batch has it (dataset extra
            ``text_view2``, or ``text_view2_structured`` with ``text_view: structured``).
        text_view: how the second phrasing is written: ``rephrase`` (the report's sentences reordered, one
            dropped) or ``structured`` (the catalog's structured sentences of the anatomy's positive findings,
            D-MLM's structured reports as training text; ``pipelines.train.extras.views``).
        init_logvar: initial log-variance per dimension (the biases); None: ``-log(embed_dim)``.
        logvar_min, logvar_max: clamp range of the log-variances (keeps exp() finite in half precision and
            the variance term of the objective bounded; gradients stop at the bounds).
    """

    def __init__(self, config: Any, shared: bool = False, intra_image: bool = True, intra_text: bool = True,
                 init_logvar: float | None = None, logvar_min: float = -12.0, logvar_max: float = 4.0,
                 text_view: str = "rephrase") -> None:
        super().__init__()
        if text_view not in TEXT_VIEWS:
            raise ValueError(f"text_view must be one of {', '.join(TEXT_VIEWS)}, got {text_view!r}")
        self.text_view = text_view
        d = int(config.embed_dim)
        init = -math.log(d) if init_logvar is None else float(init_logvar)
        if not logvar_min < logvar_max:
            raise ValueError(f"logvar_min ({logvar_min}) must be below logvar_max ({logvar_max})")
        if not logvar_min <= init <= logvar_max:
            raise ValueError(f"init_logvar {init:g} lies outside [logvar_min, logvar_max] = "
                             f"[{logvar_min}, {logvar_max}]")
        self.shared, self.intra_image, self.intra_text = bool(shared), bool(intra_image), bool(intra_text)
        self.init_logvar, self.logvar_min, self.logvar_max = init, float(logvar_min), float(logvar_max)
        a = int(config.num_anatomies)
        self.image = _LogVar(a, int(config.vision.width), d, self.shared, init)
        self.text = _LogVar(a, text_dims(config)[0], d, self.shared, init)  # the real width of a pretrained tower
        # per instance: only the views this head is set to encode are read from the batch / asked of the data
        self.batch_keys = (IMAGE_VIEW_KEYS if self.intra_image else ()) + (TEXT_VIEW_KEYS if self.intra_text else ())
        self.data_extras = self.extras_for({"intra_image": self.intra_image, "intra_text": self.intra_text,
                                            "text_view": text_view})

    @classmethod
    def extras_for(cls, options: dict[str, Any]) -> tuple[str, ...]:
        opts = options or {}
        text = "text_view2_structured" if opts.get("text_view", "rephrase") == "structured" else "text_view2"
        return (("image_view2",) if opts.get("intra_image", True) else ()) + (
            (text,) if opts.get("intra_text", True) else ())

    def extra_repr(self) -> str:
        return (f"shared={self.shared}, intra_image={self.intra_image}, intra_text={self.intra_text}, "
                f"init_logvar={self.init_logvar:.3f}, clamp=[{self.logvar_min}, {self.logvar_max}]")

    # ------------------------------------------------------------------------------------------ pieces

    def image_logvar(self, pooled: Tensor) -> Tensor:
        """pooled (B, A, W) (the pooling's pre-projection output) -> log-variances (B, A, D)."""
        return self.image(pooled).clamp(self.logvar_min, self.logvar_max)

    def text_logvar(self, cls_hidden: Tensor) -> Tensor:
        """cls_hidden (B, A, H) (the text encoder's [CLS] hidden states) -> log-variances (B, A, D)."""
        return self.text(cls_hidden).clamp(self.logvar_min, self.logvar_max)

    def zeroshot_scorer(self) -> Any:
        """For a bare export (no recipe beside it): the 2-Wasserstein scorer of ``fvlm.scoring`` with c = 1 (the
        recipe's ``distance_scale`` is not in the export; it sharpens the probabilities, never reorders them)."""
        from fvlm.scoring import ScorerSpec

        return ScorerSpec("wasserstein", {"distance_scale": 1.0},
                          "the model's uncertainty head (bare export: distance_scale 1 assumed)")

    def confidence(self, logvar: Tensor) -> tuple[Tensor, Tensor]:
        """logvar (..., D) -> (confidence (...,), mean variance (...,)):
        ``c = 1 / (1 + vbar / v_0)``, ``vbar = mean_d exp(logvar_d)``, ``v_0 = exp(init_logvar)``."""
        var = logvar.float().exp().mean(dim=-1)  # (...,)
        return 1.0 / (1.0 + var / math.exp(self.init_logvar)), var

    # ----------------------------------------------------------------------------------------- forward

    def forward(self, model: nn.Module, ctx: HeadContext, **batch: Any) -> dict[str, Tensor]:
        out = {
            "image_logvar": self.image_logvar(ctx.pooled),  # (B, A, D)
            "text_logvar": self.text_logvar(ctx.text_hidden[..., 0, :]),  # (B, A, D)
        }
        if self.intra_image and batch.get("image_view2") is not None:
            image2, anatomy2 = batch["image_view2"], batch.get("anatomy_view2")
            if anatomy2 is None:
                raise ValueError("uncertainty head: the batch has image_view2 but no anatomy_view2 "
                                 "(the dataset extra image_view2 gives both)")
            if image2.shape != ctx.image.shape:
                raise ValueError(f"uncertainty head: image_view2 {tuple(image2.shape)} differs from image "
                                 f"{tuple(ctx.image.shape)}")
            enc = model.encode_image(image2.to(ctx.image.dtype), anatomy2, batch.get("cut_view2"),
                                     return_context=True)
            out["image_emb_view2"] = enc["image_emb"]  # (B, A, D)
            out["image_logvar_view2"] = self.image_logvar(enc["pooled"])  # (B, A, D)
            out["anatomy_mask_view2"] = enc["anatomy_mask"]  # (B, A)
        if self.intra_text and batch.get("input_ids_view2") is not None:
            ids2, mask2 = batch["input_ids_view2"], batch.get("attention_mask_view2")
            if mask2 is None:
                raise ValueError("uncertainty head: the batch has input_ids_view2 but no attention_mask_view2 "
                                 "(the dataset extra text_view2 gives both)")
            if ids2.shape[:2] != ctx.input_ids.shape[:2]:
                raise ValueError(f"uncertainty head: input_ids_view2 {tuple(ids2.shape)} must be (B, A, L) with "
                                 f"(B, A) = {tuple(ctx.input_ids.shape[:2])}")
            emb2, hidden2 = model.encode_text(ids2, mask2, return_hidden=True)  # (B, A, D), (B, A, L, H)
            out["text_emb_view2"] = emb2
            out["text_logvar_view2"] = self.text_logvar(hidden2[..., 0, :])  # (B, A, D)
        return out
