"""Head ``entity_mlm``: image-conditioned masked language modelling of the anatomy texts (docs/methods.md#origins).

After ECAMP (entity-centred context-aware medical VLP, Wang et al. 2024), transferred to anatomies: the
dataset extra ``entity_mlm`` (``pipelines.train.extras.entity``) masks each anatomy text with finding words
and their modifiers masked more often and boilerplate negations less; this head has the text encoder read
the masked text, a light decoder lets every text token look at the anatomy's image, and an MLM head
predicts the masked tokens.

Notation: B samples, A anatomies, L text tokens, H text width, N vision tokens of width W, V vocabulary.

1. Text: ``h = TextEncoder(mlm_input_ids)`` (B, A, L, H), the same encoder (and weights) as the contrastive
   text tower, through ``model.encode_text(..., return_hidden=True)``.
2. Image context of anatomy a of sample b - coarse and fine fused in one attention memory::

       m_0   = e_null                                   a learned "no image" token, always visible
       m_a'  = P_c(pooled_ba') + e_coarse               the anatomy's pooled feature (coarse), visible to
                                                        the texts of anatomy a' = a only
       m_n   = P_f(tokens_bn)  + e_fine                 every vision token (fine), visible to the texts of
                                                        anatomy a when token n touches a (``ctx.touch``)

   ``P_c``, ``P_f`` linear maps W -> H, ``e_*`` learned type embeddings. A text token's cross-attention
   softmax runs over {null, its anatomy's pooled token, its anatomy's tokens} together, so the decoder
   itself learns how much to take from the coarse summary and how much from local detail (fusion by joint
   attention rather than by a fixed sum). An anatomy that is masked (absent or cut: ``anatomy_mask``
   False) sees only the null token: its text is modelled from language context alone. ``context``
   restricts the memory for ablations (``coarse``: pooled only, ``fine``: tokens only, ``none``: null only).
   The memory of one image is shared by its A texts, so keys and values are computed once per image and
   the A x L queries of the image attend through one boolean mask (B, 1, A*L, 1+A+N).
3. Decoder: ``depth`` pre-norm layers of self-attention over the text's tokens (its attention mask),
   cross-attention to the memory, MLP.
4. MLM head on the masked positions only (M of them; the (B, A, L, V) logits would not fit in memory)::

       z = LN(GELU(W_t x + b_t))                        (M, H)
       logits = z E^T + b_v                             (M, V), E the text encoder's word embeddings (tied)

   (``tie_embeddings=False``: an own (H, V) matrix.)

Outputs (the objective ``entity_mlm`` reads them)::

    mlm_logits        (M, V)  float  logits at the masked positions, in (b, a, l) order
    mlm_target        (M,)    int64  the original tokens there
    mlm_token_weight  (M,)    float  their loss weights (the extra's ``mlm_weights``)

5. Where the text points. The last decoder layer's cross-attention of the masked tokens over the vision
   tokens, weighted by the tokens' loss weights (so finding words count most, boilerplate little), is
   left for later heads as ``ctx.extra["text_attention"]`` (B, A, N), per anatomy summing to 1::

       g_ban = sum_l w_bal [l masked] mean_h att^h_bal(n)  /  sum_n' (same)

   (detached). The ``masked_reconstruction`` head, listed after this one, focuses its loss there: the
   ECAMP-style guidance to the described region without a separate localisation head.

Without the batch fields (evaluation, prediction) the head returns nothing and costs nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvlm.model.heads import Head, HeadContext, register_head

__all__ = ["EntityMLMHead", "MLM_KEYS", "text_dims"]

#: batch fields of the dataset extra ``entity_mlm``
MLM_KEYS = ("mlm_input_ids", "mlm_labels", "mlm_weights")
CONTEXTS = ("fused", "coarse", "fine", "none")


def text_dims(config: Any) -> tuple[int, int, int]:
    """(hidden size, vocabulary size, attention heads) of the model's text encoder: from a local pretrained
    folder's ``config.json`` when ``text.pretrained`` is set (the config's dimensions are not yet resolved
    when heads are built), else from ``config.text``."""
    t = config.text
    if t.pretrained:
        from fvlm.model.text import _transformers

        hc = _transformers().AutoConfig.from_pretrained(str(t.pretrained), local_files_only=True)
        return int(hc.hidden_size), int(hc.vocab_size), int(hc.num_attention_heads)
    return int(t.hidden_size), int(t.vocab_size), int(t.num_heads)


class _Attention(nn.Module):
    """Multi-head attention softmax(q k^T / sqrt(d)) v through SDPA; ``mask`` bool, True = may attend."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"entity_mlm: width {dim} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, memory: Tensor, mask: Tensor, weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        s, q_len, dim = x.shape  # (S, Q, H)
        k_len, d = memory.shape[1], dim // self.heads
        q = self.q(x).reshape(s, q_len, self.heads, d).transpose(1, 2)  # (S, h, Q, d)
        k, v = self.kv(memory).reshape(s, k_len, 2, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # (S, h, K, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)  # (S, h, Q, d)
        out = self.proj(out.transpose(1, 2).reshape(s, q_len, dim))  # (S, Q, H)
        if not weights:
            return out
        with torch.no_grad():  # the same softmax, spelled out, averaged over heads: (S, Q, K)
            logits = (q @ k.transpose(-1, -2)) / d**0.5  # (S, h, Q, K)
            att = torch.softmax(logits.masked_fill(~mask, torch.finfo(logits.dtype).min), dim=-1).mean(1)
        return out, att


class _DecoderLayer(nn.Module):
    """x + SelfAttn(LN x) over each text, + CrossAttn(LN x, memory), + MLP(LN x)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_mlp = (nn.LayerNorm(dim) for _ in range(3))
        self.self_attn = _Attention(dim, heads, dropout)
        self.cross_attn = _Attention(dim, heads, dropout)
        hidden = int(round(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, text_mask: Tensor, memory: Tensor, visible: Tensor,
                weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        b, a, length, dim = x.shape  # (B, A, L, H)
        k = memory.shape[1]
        y = self.norm_self(x).reshape(b * a, length, dim)  # (B*A, L, H)
        self_mask = text_mask.reshape(b * a, 1, 1, length)  # (B*A, 1, 1, L)
        x = x + self.self_attn(y, y, self_mask).reshape(b, a, length, dim)
        q = self.norm_cross(x).reshape(b, a * length, dim)  # (B, A*L, H)
        cross_mask = visible[:, :, None, :].expand(b, a, length, k).reshape(b, 1, a * length, k)  # (B, 1, A*L, K)
        cross = self.cross_attn(q, memory, cross_mask, weights=weights)
        att = None
        if weights:
            cross, att = cross
            att = att.reshape(b, a, length, k)  # (B, A, L, K) cross-attention of each text token
        x = x + cross.reshape(b, a, length, dim)
        x = x + self.mlp(self.norm_mlp(x))  # (B, A, L, H)
        return (x, att) if weights else x


@register_head("entity_mlm")
class EntityMLMHead(Head):
    """Image-conditioned MLM decoder and head; see the module docstring.

    Options (``model.heads.entity_mlm``):
        depth: decoder layers (default 1).
        heads: attention heads of the decoder (default: the text encoder's).
        mlp_ratio: decoder MLP width / H.
        dropout: decoder dropout.
        context: ``fused`` (pooled + tokens, default), ``coarse``, ``fine`` or ``none`` (module docstring).
        tie_embeddings: predict through the text encoder's word embeddings (default True).
        extra: name of the dataset extra that draws the masks (default ``entity_mlm``; another registered
            masking plugs in here).
        masking: the masking rates and weights as recipe data (fields of
            ``pipelines.train.extras.entity.EntityMasking``: ``entity_prob``, ``cue_prob``, ``base_prob``,
            ``negation_prob`` and their ``*_weight``); passed to the extra as ``extra?key=value&...``
            (:func:`fvlm.model.heads.extra_name`); unknown fields are an error when the data pipeline builds it.
    """

    batch_keys = MLM_KEYS
    data_extras = ("entity_mlm",)

    def __init__(self, config: Any, depth: int = 1, heads: int | None = None, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, context: str = "fused", tie_embeddings: bool = True,
                 extra: str = "entity_mlm", masking: dict[str, Any] | None = None) -> None:
        super().__init__()
        if context not in CONTEXTS:
            raise ValueError(f"context must be one of {', '.join(CONTEXTS)}, got {context!r}")
        if int(depth) < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        hidden, vocab, text_heads = text_dims(config)
        width = int(config.vision.width)
        self.context, self.tie_embeddings = context, bool(tie_embeddings)
        if masking is not None and not isinstance(masking, dict):
            raise ValueError(f"masking must map EntityMasking fields to numbers, got {masking!r}")
        self.masking = dict(masking or {})
        self.data_extras = self.extras_for({"extra": extra, "masking": self.masking})
        self.vocab = vocab
        self.fine_proj = nn.Linear(width, hidden)
        self.coarse_proj = nn.Linear(width, hidden)
        self.type_emb = nn.Parameter(torch.zeros(3, hidden))  # null, coarse, fine
        self.null = nn.Parameter(torch.zeros(hidden))
        self.memory_norm = nn.LayerNorm(hidden)
        self.layers = nn.ModuleList(_DecoderLayer(hidden, int(heads or text_heads), float(mlp_ratio), float(dropout))
                                    for _ in range(int(depth)))
        self.transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden))
        self.decoder = None if self.tie_embeddings else nn.Linear(hidden, vocab, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab))
        nn.init.trunc_normal_(self.type_emb, std=0.02)
        nn.init.trunc_normal_(self.null, std=0.02)

    @classmethod
    def extras_for(cls, options: dict[str, Any]) -> tuple[str, ...]:
        from fvlm.model.heads import extra_name

        options = options or {}
        return (extra_name(str(options.get("extra", "entity_mlm")), **dict(options.get("masking") or {})),)

    def extra_repr(self) -> str:
        return f"depth={len(self.layers)}, context={self.context!r}, tie_embeddings={self.tie_embeddings}"

    # ------------------------------------------------------------------------------------------ pieces

    def memory(self, ctx: HeadContext) -> tuple[Tensor, Tensor]:
        """The attention memory (B, 1+A+N, H) and which texts see which entries, ``visible`` (B, A, 1+A+N)."""
        tokens, pooled = ctx.tokens, ctx.pooled  # (B, N, W), (B, A, W)
        b, a = pooled.shape[:2]
        dtype = self.fine_proj.weight.dtype
        null = (self.null + self.type_emb[0]).to(dtype).expand(b, 1, -1)  # (B, 1, H)
        coarse = self.coarse_proj(pooled.to(dtype)) + self.type_emb[1]  # (B, A, H)
        fine = self.fine_proj(tokens.to(dtype)) + self.type_emb[2]  # (B, N, H)
        memory = self.memory_norm(torch.cat([null, coarse, fine], dim=1))  # (B, 1+A+N, H)
        present = ctx.anatomy_mask.bool()  # (B, A)
        see_coarse = torch.eye(a, dtype=torch.bool, device=present.device) & present[:, :, None]  # (B, A, A)
        see_fine = ctx.touch.bool() & present[:, :, None]  # (B, A, N)
        if self.context in ("fine", "none"):
            see_coarse = torch.zeros_like(see_coarse)
        if self.context in ("coarse", "none"):
            see_fine = torch.zeros_like(see_fine)
        see_null = torch.ones_like(present).unsqueeze(-1)  # (B, A, 1)
        return memory, torch.cat([see_null, see_coarse, see_fine], dim=-1)  # (B, A, 1+A+N)

    @staticmethod
    def text_attention(att: Tensor, masked: Tensor, weights: Tensor, n: int) -> Tensor:
        """Where the text points (module docstring, step 5): (B, A, L, K) last-layer cross-attention, masked
        (B, A, L) bool, weights (B, A, L) -> (B, A, N) attention of the masked tokens to the fine memory
        entries, weighted by their loss weights, summing to 1 per anatomy (zero rows where nothing is masked
        or the anatomy is not visible). Detached."""
        w = (weights.float() * masked).unsqueeze(-1)  # (B, A, L, 1)
        fine = att[..., -n:].float()  # (B, A, L, N): the last N memory entries are the vision tokens
        g = (w * fine).sum(2)  # (B, A, N)
        total = g.sum(-1, keepdim=True)
        return torch.where(total > 0, g / total.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(g)).detach()

    def forward(self, model: nn.Module, ctx: HeadContext, **batch: Any) -> dict[str, Tensor]:
        missing = [k for k in MLM_KEYS if batch.get(k) is None]
        if len(missing) == len(MLM_KEYS):
            return {}  # evaluation / prediction: nothing to model
        if missing:
            raise ValueError(f"entity_mlm head: batch has {sorted(set(MLM_KEYS) - set(missing))} but not {missing}")
        ids, labels, weights = batch["mlm_input_ids"], batch["mlm_labels"], batch["mlm_weights"]
        if ids.shape != ctx.input_ids.shape or labels.shape != ids.shape or weights.shape != ids.shape:
            raise ValueError(f"entity_mlm head: mlm_input_ids {tuple(ids.shape)}, mlm_labels {tuple(labels.shape)} "
                             f"and mlm_weights {tuple(weights.shape)} must all be (B, A, L) = "
                             f"{tuple(ctx.input_ids.shape)} like input_ids")
        _, hidden = model.encode_text(ids, ctx.attention_mask, return_hidden=True)  # (B, A, L, H)
        text_mask = ctx.attention_mask.bool().clone()  # (B, A, L)
        text_mask[..., 0] = True  # an all-padding row still attends to its first place (no NaN)
        memory, visible = self.memory(ctx)
        x = hidden.to(memory.dtype)
        for i, layer in enumerate(self.layers):
            if i == len(self.layers) - 1:
                x, att = layer(x, text_mask, memory, visible, weights=True)  # (B, A, L, H), (B, A, L, K)
            else:
                x = layer(x, text_mask, memory, visible)  # (B, A, L, H)
        sel = labels != -100  # (B, A, L)
        ctx.extra["text_attention"] = self.text_attention(att, sel, weights, ctx.touch.shape[-1])
        z = self.transform(x[sel])  # (M, H)
        if self.decoder is not None:
            logits = self.decoder(z) + self.bias  # (M, V)
        else:
            table = model.text.word_embeddings().weight  # (V, H)
            if table.shape[0] != self.bias.shape[0]:
                raise ValueError(f"entity_mlm head was built for a vocabulary of {self.bias.shape[0]} tokens but the "
                                 f"text encoder has {table.shape[0]}; build the model with text.vocab_size = "
                                 "len(tokenizer)")
            logits = z @ table.to(z.dtype).t() + self.bias  # (M, V)
        return {"mlm_logits": logits, "mlm_target": labels[sel], "mlm_token_weight": weights[sel].to(logits.dtype)}
