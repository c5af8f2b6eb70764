"""Text tower: a BERT-family encoder through transformers, CLS token -> linear -> D -> L2.

The encoder is built from :class:`TextConfig` dimensions (tests, training from scratch; nothing is
downloaded) or loaded from a local pretrained folder the user names (``TextConfig.pretrained``, e.g. a
biomedical BERT saved with ``save_pretrained``), always with ``local_files_only=True``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvlm.model.config import TextConfig


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the fvlm text tower needs the 'transformers' package (and 'tokenizers'); install them with "
            "pip install transformers tokenizers safetensors"
        ) from e
    return transformers


def hf_config(cfg: TextConfig) -> Any:
    """The transformers config of the encoder described by ``cfg``: ``cfg.hf_config`` (the full config an
    export stores) with the dimension fields of ``cfg`` written over it."""
    tf = _transformers()
    data = dict(cfg.hf_config or {})
    model_type = data.pop("model_type", cfg.model_type)
    data.update(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
    )
    return tf.AutoConfig.for_model(model_type, **data)


def build_encoder(cfg: TextConfig) -> nn.Module:
    """A transformers encoder (no pooler head): from the local folder ``cfg.pretrained``, else from ``cfg``."""
    tf = _transformers()
    if cfg.pretrained:
        path = Path(cfg.pretrained).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"text.pretrained={cfg.pretrained!r} is not a local folder; fvlm never downloads weights: "
                "save the pretrained encoder to a folder (save_pretrained) and give its path"
            )
        encoder = tf.AutoModel.from_pretrained(
            str(path), local_files_only=True, add_pooling_layer=False,
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        )
    else:
        encoder = tf.AutoModel.from_config(hf_config(cfg), add_pooling_layer=False)
    if cfg.grad_checkpointing:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return encoder


def resolved_text_config(cfg: TextConfig, encoder: nn.Module) -> TextConfig:
    """``cfg`` with the encoder's actual transformers config written in (``hf_config``, dimensions) and
    ``pretrained`` cleared: what an export stores, so loading it needs no pretrained folder."""
    hc = encoder.config
    data = hc.to_diff_dict()  # only what differs from the model type's defaults
    for k in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        data.pop(k, None)
    return dataclasses.replace(
        cfg,
        pretrained=None,
        model_type=hc.model_type,
        vocab_size=hc.vocab_size,
        hidden_size=hc.hidden_size,
        num_layers=hc.num_hidden_layers,
        num_heads=hc.num_attention_heads,
        intermediate_size=hc.intermediate_size,
        max_position_embeddings=hc.max_position_embeddings,
        max_length=min(cfg.max_length, hc.max_position_embeddings),
        dropout=hc.hidden_dropout_prob,
        hf_config=data,
    )


class TextTower(nn.Module):
    """``forward(input_ids (..., L), attention_mask (..., L))`` -> (..., D) L2-normalised embeddings of the
    CLS (first) token (``TextConfig.pooling: cls``) or of the mean of the attended tokens (``mean``) of each sequence. Any leading shape: (B, A, L) for per-anatomy texts, (T, L) prompts.

    ``return_hidden=True`` also returns the encoder's last hidden states (..., L, H) (heads read them).
    ``prefix`` (P, H) or (S, P, H), S = prod(leading shape): continuous embeddings inserted right after the
    CLS token, before the word embeddings of the rest (learnable prompt context, CoOp-style); the encoder
    then sees ``[CLS] p_1 .. p_P w_1 .. w_{L-1}`` with position embeddings over all L + P places (the
    sequence must fit ``max_position_embeddings``), and the hidden states returned are those of the L
    original places (the prefix places dropped).
    """

    def __init__(self, cfg: TextConfig, embed_dim: int) -> None:
        super().__init__()
        #: encode each distinct sequence once, without the padding columns no sequence uses (:meth:`_encode_compact`)
        self.compact = True
        self.encoder = build_encoder(cfg)
        self.cfg = resolved_text_config(cfg, self.encoder)
        self.proj = nn.Linear(self.encoder.config.hidden_size, embed_dim)

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    def word_embeddings(self) -> nn.Embedding:
        """The encoder's input word-embedding table (vocab, H)."""
        return self.encoder.get_input_embeddings()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, return_hidden: bool = False,
                prefix: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ"
            )
        lead, length = input_ids.shape[:-1], input_ids.shape[-1]
        vocab = self.encoder.config.vocab_size
        if input_ids.numel() and int(input_ids.max()) >= vocab:
            raise ValueError(
                f"input_ids hold token id {int(input_ids.max())} but the text encoder has vocab_size={vocab}; "
                "build the model with text.vocab_size = len(tokenizer)"
            )
        ids = input_ids.reshape(-1, length)  # (S, L), S = prod(lead)
        mask = attention_mask.reshape(-1, length).long()  # (S, L)
        if prefix is None and not return_hidden and self.compact:
            return self._encode_compact(ids, mask).reshape(*lead, -1)  # (..., D)
        if prefix is None:
            hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (S, L, H)
        else:
            s = ids.shape[0]
            if prefix.dim() == 2:
                prefix = prefix.unsqueeze(0).expand(s, -1, -1)  # (S, P, H)
            if prefix.dim() != 3 or prefix.shape[0] != s or prefix.shape[-1] != self.hidden_size:
                raise ValueError(f"prefix must be (P, {self.hidden_size}) or ({s}, P, {self.hidden_size}), "
                                 f"got {tuple(prefix.shape)}")
            p = prefix.shape[1]
            if length + p > self.encoder.config.max_position_embeddings:
                raise ValueError(f"{length} tokens + {p} context vectors exceed the text encoder's "
                                 f"max_position_embeddings={self.encoder.config.max_position_embeddings}")
            words = self.word_embeddings()(ids)  # (S, L, H)
            embeds = torch.cat([words[:, :1], prefix.to(words.dtype), words[:, 1:]], dim=1)  # (S, L+P, H)
            full = torch.cat([mask[:, :1], mask.new_ones(s, p), mask[:, 1:]], dim=1)  # (S, L+P)
            out = self.encoder(inputs_embeds=embeds, attention_mask=full).last_hidden_state  # (S, L+P, H)
            hidden = torch.cat([out[:, :1], out[:, 1 + p:]], dim=1)  # (S, L, H)
        emb = F.normalize(self.proj(self._pool(hidden, mask)), dim=-1)  # (S, D)
        emb = emb.reshape(*lead, -1)  # (..., D)
        if return_hidden:
            return emb, hidden.reshape(*lead, length, -1)  # (..., D), (..., L, H)
        return emb

    def _pool(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """(S, L, H) last hidden states, (S, L) attention mask -> (S, H): the CLS state (``pooling: cls``) or
        ``sum_l m_l h_l / max(1, sum_l m_l)`` (``pooling: mean``; a text with no attended token gives 0)."""
        if self.cfg.pooling == "cls":
            return hidden[:, 0]  # (S, H)
        m = mask.to(hidden.dtype).unsqueeze(-1)  # (S, L, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)  # (S, H)

    def _encode_compact(self, ids: Tensor, mask: Tensor) -> Tensor:
        """(S, L) ids and mask -> (S, D), the same embeddings as encoding every row at full length, cheaper.

        A batch of per-anatomy texts repeats itself (the same normal sentence for many cases, the same empty
        text for every absent anatomy) and is padded to the longest text the loader allows. The distinct rows
        (``torch.unique`` over ids and mask) are encoded once and gathered back; the gradient of a shared row
        is the sum over its copies, as before. Rows with at least one attended token are cut after the last
        column any of them attends to: with right padding and absolute positions, a token's hidden state does
        not depend on masked columns after it. A row that attends to nothing (an empty text) softmaxes
        uniformly over all ``L`` places, so it keeps its full length. With dropout, copies share one mask.
        """
        s, length = ids.shape
        if s == 0:
            return self.proj.weight.new_zeros(0, self.proj.out_features)
        rows, inverse = torch.unique(torch.cat([ids, mask], dim=1), dim=0, return_inverse=True)  # (U, 2L), (S,)
        u_ids, u_mask = rows[:, :length], rows[:, length:]  # (U, L) each
        used = u_mask.any(dim=1)  # (U,) rows with an attended token
        order, cls = [], []
        if used.any():
            keep = int(torch.nonzero(u_mask[used].any(dim=0)).max()) + 1
            out = self.encoder(input_ids=u_ids[used, :keep], attention_mask=u_mask[used, :keep]).last_hidden_state
            order.append(torch.nonzero(used).squeeze(1))
            cls.append(self._pool(out, u_mask[used, :keep]))  # (U1, H)
        if (~used).any():
            out = self.encoder(input_ids=u_ids[~used], attention_mask=u_mask[~used]).last_hidden_state
            order.append(torch.nonzero(~used).squeeze(1))
            cls.append(self._pool(out, u_mask[~used]))  # (U0, H)
        hidden = torch.cat(cls)[torch.argsort(torch.cat(order))]  # (U, H) pooled, in the order of `rows`
        return F.normalize(self.proj(hidden), dim=-1)[inverse]  # (S, D)


class LogitScale(nn.Module):
    """One learnable temperature: stores log(1/tau) (init 1/0.07), returns exp clamped to ``max_scale``."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(float(torch.log(torch.tensor(1.0 / init_temperature)))))
        self.max_scale = max_scale

    def forward(self) -> Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)  # scalar, 1/tau
