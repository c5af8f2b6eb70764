"""The fVLM model: 3D ViT + anatomy pooling + BERT-family text tower in one shared embedding space.

After "Large-scale and Fine-grained Vision-language Pre-training for Enhanced CT Image Understanding"
(fVLM, ICLR 2025): each anatomy's image region (the ViT tokens touching it, from several depths) is pooled
into one embedding and matched with the embedding of that anatomy's report text. A global image/report
pair of embeddings serves the CLIP baseline. The output dict's keys are the objectives' keyword arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from fvlm.model.config import ModelConfig
from fvlm.model.heads import HeadContext, create_head
from fvlm.model.pooling import AnatomyPooling, GlobalPooling, touch_mask
from fvlm.model.registry import create_text_encoder, create_vision_encoder
from fvlm.model.text import LogitScale
from fvlm.model.vision import AnatomyInput

#: The keys of FVLM.forward's output, in order.
OUTPUT_KEYS = ("image_emb", "text_emb", "anatomy_mask", "global_image_emb", "global_text_emb", "logit_scale")


class FVLM(nn.Module):
    """Anatomy-level vision-language model; see :meth:`forward` for the tensors in and out."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"FVLM needs a ModelConfig, got {type(config).__name__} (use create_model for names)")
        self.vision = create_vision_encoder(config.vision)
        # The anatomy map as extra input channels of the stem (VisionConfig.anatomy_channels; off by default).
        self.anatomy_input = (AnatomyInput(config.num_anatomies + 1, config.vision.anatomy_channels)
                              if config.vision.anatomy_channels else None)
        self.pooling = AnatomyPooling(
            config.num_anatomies, config.vision.width, config.embed_dim, config.pooling.heads, config.pooling.dropout
        )
        self.global_pooling = GlobalPooling(config.vision.width, config.embed_dim)
        self.text = create_text_encoder(config.text, config.embed_dim)
        self.logit_scale = LogitScale(config.init_temperature, config.max_logit_scale)
        # The text tower resolves a pretrained folder into explicit dims: keep that in the stored config.
        self.config = dataclasses.replace(config, text=getattr(self.text, "cfg", config.text))
        # Optional heads of the related methods (fvlm.model.heads), in config order, built from the resolved
        # config (so a head sees the real text width of a pretrained encoder).
        self.heads = nn.ModuleDict({name: create_head(name, self.config, opts) for name, opts in config.heads.items()})

    @property
    def num_anatomies(self) -> int:
        return self.config.num_anatomies

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """Batch fields the model's heads read (passed to ``forward`` by keyword when present)."""
        return tuple(dict.fromkeys(k for h in self.heads.values() for k in h.batch_keys))

    @property
    def data_extras(self) -> tuple[str, ...]:
        """Dataset extras (``pipelines.train.extras``) the heads need in training."""
        return tuple(dict.fromkeys(k for h in self.heads.values() for k in h.data_extras))

    def vision_input(self, image: Tensor, anatomy: Tensor) -> Tensor:
        """What the vision tower reads: the image (B, C, Z, Y, X), with ``vision.anatomy_channels`` > 0 followed
        by the anatomy map's learned channels (B, C + E, Z, Y, X) (:class:`fvlm.model.vision.AnatomyInput`)."""
        return image if self.anatomy_input is None else self.anatomy_input(image, anatomy)

    def encode_image(self, image: Tensor, anatomy: Tensor, cut: Tensor | None = None,
                     return_context: bool = False) -> dict[str, Any]:
        """image (B, C, Z, Y, X) float in [0, 1] (C = ``vision.in_channels``); anatomy (B, Z, Y, X) int labels
        0..A; cut (B, A) bool or None.

        Returns ``image_emb`` (B, A, D) (masked rows zero), ``anatomy_mask`` (B, A) bool (present and not
        cut) and ``global_image_emb`` (B, D); all embeddings L2-normalised. ``return_context`` adds what the
        heads read: ``features`` (K x (B, N, W)), ``tokens`` (B, N, W), ``grid``, ``touch`` (B, A, N) and
        ``pooled`` (B, A, W).
        """
        if image.dim() != 5:
            raise ValueError(f"image must be (B, C, Z, Y, X), got shape {tuple(image.shape)}")
        if anatomy.shape != (image.shape[0], *image.shape[2:]):
            raise ValueError(
                f"anatomy map {tuple(anatomy.shape)} does not match image {tuple(image.shape)}: expected "
                f"{(image.shape[0], *image.shape[2:])}"
            )
        out = self.vision(self.vision_input(image, anatomy))  # features: K x (B, N, W); last: (B, N, W)
        touch = touch_mask(anatomy, self.num_anatomies, self.vision.patch_size)  # (B, A, N)
        image_emb, anatomy_mask, pooled = self.pooling(out.features, touch, cut, return_pooled=True)
        result: dict[str, Any] = {
            "image_emb": image_emb,  # (B, A, D)
            "anatomy_mask": anatomy_mask,  # (B, A)
            "global_image_emb": self.global_pooling(out.last),  # (B, D)
        }
        if return_context:
            result.update(features=out.features, tokens=out.last, grid=out.grid, touch=touch, pooled=pooled)
        return result

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor, return_hidden: bool = False,
                    prefix: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """input_ids, attention_mask (..., L) -> L2-normalised embeddings (..., D), e.g. (B, A, L) -> (B, A, D);
        ``return_hidden`` also gives the last hidden states (..., L, H); ``prefix`` see ``TextTower``."""
        return self.text(input_ids, attention_mask, return_hidden=return_hidden, prefix=prefix)

    def forward(
        self,
        image: Tensor,
        anatomy: Tensor,
        input_ids: Tensor | None,
        attention_mask: Tensor | None,
        cut: Tensor | None = None,
        report_input_ids: Tensor | None = None,
        report_attention_mask: Tensor | None = None,
        **extras: Any,
    ) -> dict[str, Tensor]:
        """Embed a batch of crops and their per-anatomy texts.

        Args:
            image: (B, C, Z, Y, X) float in [0, 1]; Z, Y, X multiples of the patch size.
            anatomy: (B, Z, Y, X) integer anatomy labels, 0 background, 1..A.
            input_ids, attention_mask: (B, A, L) tokens of each anatomy's text; both None for a text-free
                forward (the text tower is skipped, ``text_emb`` and ``global_text_emb`` are None), which needs
                every head to have ``reads_text = False`` (the supervised recipe's trainer step).
            cut: (B, A) bool, anatomies cut by the crop border (masked out), or None.
            report_input_ids, report_attention_mask: (B, L') whole-report tokens for the global text
                embedding; when absent, ``global_text_emb`` is the normalised mean of the anatomy text
                embeddings over the anatomies whose text is non-empty.
            extras: further batch fields; each head gets those of its ``batch_keys`` that are given.

        Returns a dict with exactly the keys of ``OUTPUT_KEYS``: ``image_emb`` (B, A, D), ``text_emb``
        (B, A, D) (None text-free), ``anatomy_mask`` (B, A) bool, ``global_image_emb`` (B, D),
        ``global_text_emb`` (B, D) (None text-free), ``logit_scale`` (scalar 1/tau, clamped), then the outputs
        of the model's heads (each head documents its keys). Embeddings are L2-normalised; masked image rows are zero.
        """
        b, a = image.shape[0], self.num_anatomies
        text = input_ids is not None
        if text != (attention_mask is not None):
            raise ValueError("give both input_ids and attention_mask, or neither (a text-free forward)")
        if not text:
            readers = [name for name, head in self.heads.items() if getattr(head, "reads_text", True)]
            if readers:
                raise ValueError(f"a text-free forward (input_ids=None) needs heads that do not read text; "
                                 f"{', '.join(readers)} do: give the anatomy texts' tokens")
        elif input_ids.dim() != 3 or input_ids.shape[:2] != (b, a):
            raise ValueError(f"input_ids must be (B, A, L) = ({b}, {a}, L), got {tuple(input_ids.shape)}")
        heads = len(self.heads) > 0
        out = self.encode_image(image, anatomy, cut, return_context=heads)
        text_emb = text_hidden = global_text = None
        if text and heads:
            text_emb, text_hidden = self.encode_text(input_ids, attention_mask, return_hidden=True)
        elif text:
            text_emb = self.encode_text(input_ids, attention_mask)  # (B, A, D)
        if (report_input_ids is None) != (report_attention_mask is None):
            raise ValueError("give both report_input_ids and report_attention_mask, or neither")
        if report_input_ids is not None and text:
            global_text = self.encode_text(report_input_ids, report_attention_mask)  # (B, D)
        elif text:
            has_text = attention_mask.any(dim=-1).to(text_emb.dtype)  # (B, A)
            weights = torch.where(has_text.sum(-1, keepdim=True) > 0, has_text, torch.ones_like(has_text))
            global_text = (text_emb * weights.unsqueeze(-1)).sum(1)  # (B, D)
            global_text = torch.nn.functional.normalize(global_text, dim=-1)
        result = {
            "image_emb": out["image_emb"],
            "text_emb": text_emb,
            "anatomy_mask": out["anatomy_mask"],
            "global_image_emb": out["global_image_emb"],
            "global_text_emb": global_text,
            "logit_scale": self.logit_scale(),
        }
        if heads:
            ctx = HeadContext(image=image, anatomy=anatomy, features=out["features"], tokens=out["tokens"],
                              grid=out["grid"], touch=out["touch"], pooled=out["pooled"], image_emb=out["image_emb"],
                              anatomy_mask=out["anatomy_mask"], input_ids=input_ids, attention_mask=attention_mask,
                              text_hidden=text_hidden, text_emb=text_emb)
            for name, head in self.heads.items():
                given = {k: extras[k] for k in head.batch_keys if extras.get(k) is not None}
                for key, value in head(self, ctx, **given).items():
                    if key in result:
                        raise RuntimeError(f"head {name!r} returned {key!r}, which another output already has")
                    result[key] = value
        return result

    def extra_repr(self) -> str:
        return f"config={self.config.name!r}, anatomies={self.num_anatomies}, embed_dim={self.config.embed_dim}"


def count_parameters(module: nn.Module) -> dict[str, Any]:
    """Parameter counts of the model's parts (and total)."""
    parts = {name: sum(p.numel() for p in child.parameters()) for name, child in module.named_children()}
    parts["total"] = sum(p.numel() for p in module.parameters())
    return parts
