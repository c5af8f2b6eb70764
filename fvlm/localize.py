"""Localisation maps of one finding from the ``region`` head (``fvlm predict --heatmap-mode region``, the
evaluation report's maps, the pointing benchmark).

A library: a model, prompt tokens and images in, token maps out; no file I/O.

Math (notation of :mod:`fvlm.model.heads.region`). For anatomy a of an image with tokens ``x_n`` (the head's
depth), touching set ``T_a``, the head's selection distribution and projected tokens::

    p_n   = softmax_{n in T_a}(s_an / tau_s)            the scorer's selection distribution over the anatomy
    v_n   = normalize(P_v x_n),  t_l = normalize(P_t h_l)   h_l: the prompt's token hidden states

The prompt's text tokens attend to the anatomy's tokens through the head's learned query and key maps
(``q_l = W_q t_l + b_q``, ``k_n = W_k v_n + b_k``), with the selection distribution as a prior. By default
(``topk_only=True``) the attended set ``K_a`` is the head's kept top-k of the anatomy, the very set training
attends, so the map shows what the trained similarity looks at; ``topk_only=False`` attends every touching
token (``K_a = T_a``) for a dense display map::

    c_ln      = <q_l, k_n> / tau_x
    product:    alpha_ln = softmax_{n in K_a}(c_ln + log p_n)          = p_n e^{c_ln} / Z_l
    attention:  alpha_ln = softmax_{n in K_a}(c_ln)                    (training's attention when K_a = top-k)
    selection:  alpha_ln = p_n / sum_{K_a} p
    map_n     = 1/(P |L_p|) sum_prompts sum_l alpha_ln          (mean over the prompts' text tokens)

The map sums to one over ``K_a`` and is exactly zero outside it (and in a sample where the anatomy is
absent). :func:`region_map` rescales it to peak 1 per sample (``normalize="peak"``) for
display; ``normalize="sum"`` keeps the distribution.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["COMBINE_MODES", "region_head", "region_map", "prompt_tokens"]

COMBINE_MODES = ("product", "attention", "selection")


def region_head(model: Any) -> Any:
    """The model's ``region`` head; ValueError naming the remedy when it has none."""
    heads = getattr(model, "heads", None)
    if heads is None or "region" not in heads:
        have = ", ".join(heads.keys()) if heads is not None and len(heads) else "none"
        raise ValueError(f"the model has no region head (its heads: {have}): region maps need a model trained with "
                         "`model.heads.region` (recipes fvlm-region, fvlm-region-disease); use --heatmap-mode "
                         "probability or cosine for the pooled-embedding map")
    return heads["region"]


def prompt_tokens(model: Any, tokenizer: Any, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Tokenise prompts as the zero-shot code does: (P, L) input_ids and attention_mask on the model's device."""
    if not texts:
        raise ValueError("region map: no prompt text given")
    length = int(getattr(model.config.text, "max_length", 64) or 64)
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=length,
                    return_attention_mask=True, return_tensors="pt")
    device = next(model.parameters()).device
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.no_grad()
def region_map(model: Any, image: Tensor, anatomy: Tensor, input_ids: Tensor, attention_mask: Tensor,
               anatomy_index: int, combine: str = "product", topk_only: bool = True,
               normalize: str = "peak") -> tuple[Tensor, tuple[int, int, int]]:
    """Map of one finding: image (B, C, Z, Y, X), anatomy (B, Z, Y, X), the finding's prompts (P, L) ->
    ((B, gz, gy, gx) map, grid); see the module docstring. ``anatomy_index`` is the finding's anatomy row
    (0-based); whole-study findings have no anatomy and no region map."""
    from fvlm.model.pooling import touch_mask

    head = region_head(model)
    if combine not in COMBINE_MODES:
        raise ValueError(f"region map: combine must be one of {', '.join(COMBINE_MODES)}, got {combine!r}")
    if normalize not in ("peak", "sum"):
        raise ValueError(f"region map: normalize must be peak or sum, got {normalize!r}")
    a_count = int(model.config.num_anatomies)
    if not 0 <= int(anatomy_index) < a_count:
        raise ValueError(f"region map: anatomy index {anatomy_index} is not one of the model's {a_count} anatomies "
                         "(whole-study findings have no anatomy to localise in)")
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"region map: prompt tokens must be (P, L), got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    out = model.vision(model.vision_input(image, anatomy))
    tokens = out.features[head.layer]  # (B, N, W)
    touch_all = touch_mask(anatomy, a_count, model.vision.patch_size)  # (B, A, N)
    probs, _, index, keep = head.select(tokens, touch_all)
    a = int(anatomy_index)
    allowed = touch_all[:, a]  # (B, N)
    if topk_only:
        allowed = torch.zeros_like(allowed).scatter(-1, index[:, a], keep[:, a])
    p = probs[:, a]  # (B, N)

    _, hidden = model.encode_text(input_ids, attention_mask, return_hidden=True)  # (P, L, H)
    _, q = head.text_tokens(hidden)  # (P, L, D) queries
    k = head.key(head.project_tokens(tokens))  # (B, N, D) keys of every token (the kept ones as in training)
    c = torch.einsum("pld,bnd->bpln", q, k) / head.temperature  # (B, P, L, N)
    fill = torch.finfo(c.dtype).min
    if combine == "selection":
        logits = torch.log(p.clamp_min(1e-30))[:, None, None].expand_as(c)
    elif combine == "attention":
        logits = c
    else:
        logits = c + torch.log(p.clamp_min(1e-30))[:, None, None]
    alpha = torch.softmax(logits.masked_fill(~allowed[:, None, None], fill), dim=-1)  # (B, P, L, N)
    tm = attention_mask.to(c.dtype)  # (P, L)
    m = (alpha * tm[None, :, :, None]).sum(2) / tm.sum(-1).clamp_min(1.0)[None, :, None]  # (B, P, N)
    m = m.mean(1) * allowed  # (B, N): zero outside the anatomy and where it is absent
    if normalize == "peak":
        m = m / m.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
    grid = tuple(int(g) for g in out.grid)
    return m.reshape(m.shape[0], *grid), grid  # type: ignore[return-value]
