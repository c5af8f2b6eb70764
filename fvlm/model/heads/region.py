"""Local region selection with sentence cross-attention (head ``region``; docs/methods.md#origins, issue 9).

After the local-region contrastive line of work (LRCLR: a scorer keeps the significant local regions, the
sentence's tokens attend to them, late interaction scores the pair) transferred to anatomies: inside each
anatomy a scorer keeps its top-k vision tokens, the anatomy text's tokens cross-attend to the kept tokens,
and the pair's similarity is the attention-weighted token-region cosine averaged over the text tokens.

Notation: B samples, A anatomies, N vision tokens (width W) of the grid, L text tokens (width H), k regions
kept per anatomy, D the head's dimension (``dim``, default the model's ``embed_dim``).

1. Scorer (anatomy-conditioned MLP) over the tokens ``x_n`` of one depth (``layer``, default the last)::

       s_an = w_2^T GELU(W_1 x_n + b_1 + e_a) + b_2                              (B, A, N)

2. Selection. With ``T_a`` the tokens touching anatomy a (``ctx.touch``), the selection distribution and the
   straight-through hard top-k (Bengio et al. 2013's estimator applied to a top-k mask)::

       p_an = softmax_{n in T_a}(s_an / tau_s)          (0 outside T_a)           (B, A, N)
       m_an = 1 if n is among the min(k, |T_a|) largest s_an over T_a, else 0    (B, A, N)
       w_an = m_an + (p_an - stopgrad(p_an))                                      (B, A, N)

   Forward ``w = m`` exactly (a kept region enters with weight 1, the others not at all); backward
   ``dL/ds = dL/dw * dp/ds``, so the scorer learns which tokens help the contrastive term. A token outside
   the anatomy can never be kept (its score is -inf before the top-k and ``m`` is ANDed with the touch
   mask); an anatomy with fewer than k touching tokens keeps all of them and masks the remaining slots.

3. Projections to the head's space, L2-normalised: kept regions ``v_ar = w_ar * normalize(P_v x_r)``
   (k slots, gathered at the top-k indices; the gate carries the scorer's gradient) and text tokens
   ``t_al = normalize(P_t h_al)`` of ``ctx.text_hidden``.

4. Cross-attention and late interaction (:func:`fvlm.losses.functional.late_interaction`): text j's tokens
   attend to image i's kept regions of the same anatomy through learned query / key / value maps (D x D,
   LRCLR's sentence-to-region cross-attention), and the attended value is scored against the text token (a
   smooth max over regions, the hard max of late interaction as ``tau_x -> 0``)::

       q_jal = W_q t_jal + b_q,   k_iar = W_k v_iar + b_k,   u_iar = W_v v_iar + b_v
       alpha_{lr}  = softmax_r(<q_jal, k_iar> / tau_x)                 (r kept in i, l a token of j)
       S^a_ij      = 1/|L_j| sum_l < t_jal, sum_r alpha_lr u_iar >                  (A, N_img, N_txt)

   The maps start at the identity (W = I, b = 0), where the head is the parameter-free attention of
   issue 9: ``alpha = softmax(<t, v> / tau_x)`` and ``S = mean_l sum_r alpha_lr <t_l, v_r>``; training
   moves them. The keys and values are computed from the gated regions, so the selection gradient still
   reaches the scorer through both.

   Cost: A x N_img x N_txt x L x k multiply-adds of size D and a few such tensors kept for backward (the
   objective computes it over the global batch: ``region_contrastive``); e.g. 56 x 56 x 15 x 64 x 16 is
   48M entries per tensor. The region-aware embedding of a sample's own text (j = i) is
   ``normalize(1/|L| sum_l sum_r alpha_lr u_ar)`` (``region_emb``).

Outputs (merged into the model output; the objective reads them by keyword)::

    region_weights     (B, A, N)     straight-through selection weights w (forward: the 0/1 kept set)
    region_probs       (B, A, N)     selection distribution p over the anatomy's tokens
    region_attention   (B, A, N)     the sample's own text attention over its kept tokens, mean over text
                                     tokens (sums to 1 over the kept tokens; 0 elsewhere and for absent rows)
    region_tokens      (B, A, k, D)  gated, normalised kept regions v (zero in empty slots)
    region_token_mask  (B, A, k)     bool, slot holds a kept token of the anatomy
    region_text        (B, A, L, D)  normalised projected text tokens t
    region_text_mask   (B, A, L)     bool, the text's attention mask
    region_query       (B, A, L, D)  the text tokens' queries q
    region_key         (B, A, k, D)  the kept regions' keys k (gated like the regions)
    region_value       (B, A, k, D)  the kept regions' values u
    region_emb         (B, A, D)     region-aware embedding of the own text (zero rows where nothing kept)
    region_logit_scale ()            the region similarity's own 1/tau (learnable)
    region_temperature ()            tau_x of the smooth max (a fixed buffer, so objective and maps agree)

``region_weights`` and ``region_attention`` are also left in ``ctx.extra`` for heads that run later (e.g.
a reconstruction loss focused on the selected region).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvlm.model.heads import Head, HeadContext, register_head
from fvlm.model.text import LogitScale

__all__ = ["RegionHead", "select_topk"]


def select_topk(scores: Tensor, touch: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, ...]:
    """Straight-through top-k selection inside each anatomy (module docstring, step 2).

    scores (B, A, N) float, touch (B, A, N) bool -> ``probs`` p (B, A, N), ``weights`` w (B, A, N) (forward
    the 0/1 kept set, backward the gradient of p), ``index`` (B, A, k') int64 and ``keep`` (B, A, k') bool
    with k' = min(k, N): the kept tokens' indices (slots past the anatomy's touching count are not kept).
    Rows without a touching token have p = w = 0 and keep nothing.
    """
    if scores.shape != touch.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and touch {tuple(touch.shape)} must both be (B, A, N)")
    if k < 1:
        raise ValueError(f"region selection: k must be at least 1, got {k}")
    k = min(int(k), scores.shape[-1])
    masked = (scores / temperature).masked_fill(~touch, torch.finfo(scores.dtype).min)  # (B, A, N)
    probs = torch.softmax(masked, dim=-1) * touch  # (B, A, N), 0 outside the anatomy and in empty rows
    index = masked.topk(k, dim=-1).indices  # (B, A, k)
    keep = touch.gather(-1, index)  # (B, A, k): False where fewer than k tokens touch
    hard = torch.zeros_like(scores).scatter(-1, index, keep.to(scores.dtype))  # (B, A, N) 0/1
    weights = hard + (probs - probs.detach())  # exactly `hard` forward (p - p = 0)
    return probs, weights, index, keep


class RegionHead(Head):
    """Top-k region selection per anatomy, text-to-region cross-attention and late interaction.

    Args (``model.heads.region`` options):
        k: regions kept per anatomy (fewer when fewer tokens touch it).
        dim: dimension D of the projected tokens (default the model's ``embed_dim``).
        hidden: scorer MLP width.
        layer: which entry of ``ctx.features`` the scorer and the regions read (default -1, the last pooled
            depth).
        select_temperature: tau_s of the selection softmax.
        attn_temperature: tau_x of the text-to-region attention (smooth max over regions).
        init_temperature: initial 1/scale of the region similarity's own learnable logit scale
            (default the model's ``init_temperature``).
    """

    def __init__(self, config: Any, k: int = 16, dim: int | None = None, hidden: int = 64, layer: int = -1,
                 select_temperature: float = 1.0, attn_temperature: float = 0.1,
                 init_temperature: float | None = None) -> None:
        super().__init__()
        if int(k) < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if hidden < 1 or (dim is not None and dim < 1):
            raise ValueError(f"hidden and dim must be positive, got hidden={hidden}, dim={dim}")
        if select_temperature <= 0 or attn_temperature <= 0:
            raise ValueError(f"temperatures must be positive, got select_temperature={select_temperature}, "
                             f"attn_temperature={attn_temperature}")
        n_layers = len(config.vision.output_layers)
        if not -n_layers <= int(layer) < n_layers:
            raise ValueError(f"layer {layer} is outside the {n_layers} pooled depths (model.vision.output_layers)")
        width, text_width = config.vision.width, config.text.hidden_size
        self.k, self.layer = int(k), int(layer)
        self.dim = int(dim or config.embed_dim)
        self.select_temperature = float(select_temperature)
        self.register_buffer("temperature", torch.tensor(float(attn_temperature)), persistent=False)
        self.score_in = nn.Linear(width, hidden)
        self.score_anatomy = nn.Parameter(torch.zeros(config.num_anatomies, hidden))  # (A, hidden): e_a
        self.score_out = nn.Linear(hidden, 1)
        self.region_proj = nn.Linear(width, self.dim)
        self.text_proj = nn.Linear(text_width, self.dim)
        # learned cross-attention maps (module docstring, step 4), starting at the identity
        self.query, self.key, self.value = (nn.Linear(self.dim, self.dim) for _ in range(3))
        for lin in (self.query, self.key, self.value):
            nn.init.eye_(lin.weight)
            nn.init.zeros_(lin.bias)
        tau = float(init_temperature if init_temperature is not None else config.init_temperature)
        self.logit_scale = LogitScale(tau, config.max_logit_scale)
        nn.init.normal_(self.score_anatomy, std=0.02)

    def zeroshot_scorer(self) -> Any:
        """For a bare export (no recipe beside it): the region scorer of ``fvlm.scoring``, region similarity
        alone (the recipe's ``zeroshot_pooled_weight`` is not in the export)."""
        from fvlm.scoring import ScorerSpec

        return ScorerSpec("region", {"pooled_weight": 0.0}, "the model's region head (bare export)")

    def extra_repr(self) -> str:
        return (f"k={self.k}, dim={self.dim}, layer={self.layer}, select_temperature={self.select_temperature}, "
                f"attn_temperature={float(self.temperature):g}")

    # ------------------------------------------------------------------------------------ the pieces

    def scores(self, tokens: Tensor) -> Tensor:
        """tokens (B, N, W) -> scorer logits s (B, A, N)."""
        h = self.score_in(tokens)  # (B, N, hidden)
        h = F.gelu(h.unsqueeze(1) + self.score_anatomy.to(h.dtype)[None, :, None])  # (B, A, N, hidden)
        return self.score_out(h).squeeze(-1)  # (B, A, N)

    def select(self, tokens: Tensor, touch: Tensor) -> tuple[Tensor, ...]:
        """tokens (B, N, W), touch (B, A, N) -> (probs, weights, index, keep), see :func:`select_topk`."""
        return select_topk(self.scores(tokens), touch, self.k, self.select_temperature)

    def project_tokens(self, tokens: Tensor) -> Tensor:
        """(..., W) vision tokens -> (..., D) normalised."""
        return F.normalize(self.region_proj(tokens), dim=-1)

    def project_text(self, hidden: Tensor) -> Tensor:
        """(..., L, H) text hidden states -> (..., L, D) normalised."""
        return F.normalize(self.text_proj(hidden), dim=-1)

    def image_regions(self, tokens: Tensor, touch: Tensor) -> dict[str, Tensor]:
        """What the similarity reads of an image: tokens (B, N, W), touch (B, A, N) (masked anatomies already
        removed) -> ``probs``, ``weights`` (B, A, N), ``index``, ``keep`` (B, A, k), ``regions``, ``keys``,
        ``values`` (B, A, k, D). The same top-k set and projections as training (``forward``)."""
        probs, weights, index, keep = self.select(tokens, touch)
        regions = self.regions(tokens, weights, index, keep)  # (B, A, k, D)
        return {"probs": probs, "weights": weights, "index": index, "keep": keep, "regions": regions,
                "keys": self.key(regions), "values": self.value(regions)}

    def text_tokens(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(..., L, H) text hidden states -> (normalised tokens t, queries q), both (..., L, D)."""
        text = self.project_text(hidden)
        return text, self.query(text)

    def regions(self, tokens: Tensor, weights: Tensor, index: Tensor, keep: Tensor) -> Tensor:
        """Gated, normalised kept regions (B, A, k, D) (zero in empty slots)."""
        b, a, k = index.shape
        w = tokens.shape[-1]
        picked = tokens.gather(1, index.reshape(b, a * k, 1).expand(b, a * k, w)).reshape(b, a, k, w)  # (B, A, k, W)
        gate = weights.gather(-1, index) * keep  # (B, A, k): 1 forward, carries dp/ds backward
        return self.project_tokens(picked) * gate.unsqueeze(-1).to(picked.dtype)

    # ---------------------------------------------------------------------------------------- forward

    def forward(self, model: nn.Module, ctx: HeadContext, **batch: Any) -> dict[str, Tensor]:
        tokens = ctx.features[self.layer]  # (B, N, W)
        touch = ctx.touch & ctx.anatomy_mask.unsqueeze(-1)  # (B, A, N): masked anatomies keep nothing
        img = self.image_regions(tokens, touch)
        probs, weights, index, keep = img["probs"], img["weights"], img["index"], img["keep"]
        regions, keys, values = img["regions"], img["keys"], img["values"]  # (B, A, k, D) each
        text, query = self.text_tokens(ctx.text_hidden)  # (B, A, L, D) each
        text_mask = ctx.attention_mask.bool()  # (B, A, L)

        # own text -> own regions: attention map and region-aware embedding
        c = torch.einsum("bald,bakd->balk", query, keys)  # (B, A, L, k)
        fill = torch.finfo(c.dtype).min
        alpha = torch.softmax((c / self.temperature).masked_fill(~keep.unsqueeze(2), fill), dim=-1)
        alpha = alpha * keep.unsqueeze(2)  # (B, A, L, k): rows with nothing kept are zero
        tm = text_mask.to(c.dtype)
        att = (alpha * tm.unsqueeze(-1)).sum(2) / tm.sum(-1, keepdim=True).clamp_min(1.0)  # (B, A, k)
        attention = torch.zeros_like(probs).scatter_add(-1, index, att.to(probs.dtype))  # (B, A, N)
        emb = F.normalize(torch.einsum("bak,bakd->bad", att, values), dim=-1)  # (B, A, D)
        emb = emb * keep.any(-1, keepdim=True)
        ctx.extra["region_weights"] = weights
        ctx.extra["region_attention"] = attention
        return {
            "region_weights": weights,
            "region_probs": probs,
            "region_attention": attention,
            "region_tokens": regions,
            "region_token_mask": keep,
            "region_text": text,
            "region_text_mask": text_mask,
            "region_query": query,
            "region_key": keys,
            "region_value": values,
            "region_emb": emb,
            "region_logit_scale": self.logit_scale(),
            "region_temperature": self.temperature.clone(),
        }


register_head("region", RegionHead)
