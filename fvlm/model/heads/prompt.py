"""Learnable prompt context (CoOp, Zhou et al. IJCV 2022; UMCL-style label-unified contrast,
docs/methods.md#origins): ``n_ctx`` continuous context vectors ``c_1 .. c_P`` (width H of the text encoder)
prepended, right after ``[CLS]``, to a label sentence, so the text tower encodes ``[CLS] c_1 .. c_P w_1 .. w_L``.

The label sentences, their token length and the learned-prompt texts of zero-shot scoring are those of
:mod:`fvlm.prompts` (:func:`~fvlm.prompts.label_sentence`, :data:`~fvlm.prompts.LABEL_MAX_LEN`,
:func:`~fvlm.prompts.task_prompts`): ``"emphysema, lung nodule."``, ``"no abnormality."``.

Head ``prompt_context`` (options):

* ``n_ctx`` (8): number of context vectors P.
* ``shared`` (True): one context for every anatomy, (P, H); False: one per anatomy, (A, P, H) - a task then
  uses its anatomy's context, a whole-study task the mean of the anatomies' contexts.
* ``init_std`` (0.02): the vectors start as N(0, init_std^2) (CoOp's random initialisation; a phrase's word
  embeddings would need the tokenizer, which a head is built without: :meth:`PromptContext.init_from_phrase`
  does it on a built model).
* ``text_augment`` (False): the training label sentences come from the dataset extra
  ``label_text_structured`` (structured catalog sentences appended at random, ``pipelines.train.extras.labels``)
  instead of ``label_text``.
* ``label_threshold`` (0.5): a label counts in the training sentences when above it; must equal the
  ``label_threshold`` of the recipe's ``label_unified`` objective (the trainer checks), so that sentences and
  targets agree on which findings a case has.

In training the head reads ``label_input_ids`` / ``label_attention_mask`` (B, A, L_lab) and returns
``label_text_emb`` (B, A, D), the L2-normalised embeddings of the label sentences with the context; the
``label_unified`` objective contrasts them with the anatomy image embeddings. Without those batch fields
(evaluation) it returns nothing. The context vectors are parameters of the head: they are saved and loaded
with the model (``fvlm.model.export``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fvlm.model.heads import Head, HeadContext, register_head
from fvlm.prompts import LABEL_MAX_LEN

__all__ = ["PromptContext"]


class PromptContext(Head):
    """The ``prompt_context`` head; see the module docstring."""

    batch_keys = ("label_input_ids", "label_attention_mask")
    data_extras = ("label_text",)

    def __init__(self, config: Any, n_ctx: int = 8, shared: bool = True, init_std: float = 0.02,
                 text_augment: bool = False, label_threshold: float = 0.5) -> None:
        super().__init__()
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        if not isinstance(init_std, (int, float)) or init_std <= 0:
            raise ValueError(f"init_std must be a positive number, got {init_std!r}")
        width = int(config.text.hidden_size)
        room = int(config.text.max_position_embeddings) - LABEL_MAX_LEN
        if n_ctx > room:
            raise ValueError(f"n_ctx={n_ctx} context vectors + {LABEL_MAX_LEN} label tokens exceed the text "
                             f"encoder's max_position_embeddings={config.text.max_position_embeddings}")
        if isinstance(label_threshold, bool) or not isinstance(label_threshold, (int, float)):
            raise ValueError(f"label_threshold must be a number, got {label_threshold!r}")
        self.n_ctx, self.shared, self.text_augment = int(n_ctx), bool(shared), bool(text_augment)
        self.label_threshold = float(label_threshold)
        self.data_extras = self.extras_for({"text_augment": self.text_augment, "label_threshold": self.label_threshold})
        self.num_anatomies = int(config.num_anatomies)
        shape = (n_ctx, width) if self.shared else (self.num_anatomies, n_ctx, width)
        self.context = nn.Parameter(torch.randn(shape) * float(init_std))  # (P, H) or (A, P, H)

    @classmethod
    def extras_for(cls, options: dict[str, Any]) -> tuple[str, ...]:
        from fvlm.model.heads import extra_name

        base = "label_text_structured" if options.get("text_augment") else "label_text"
        threshold = float(options.get("label_threshold", 0.5))
        return (base if threshold == 0.5 else extra_name(base, threshold=threshold),)

    def extra_repr(self) -> str:
        return f"n_ctx={self.n_ctx}, shared={self.shared}, context={tuple(self.context.shape)}"

    def prefix_for(self, anatomy_index: Tensor) -> Tensor:
        """Context vectors for S sequences: (S, P, H); ``anatomy_index`` (S,) long, -1 for a whole-study
        prompt (the mean context when per anatomy)."""
        s = anatomy_index.shape[0]
        if self.shared:
            return self.context.unsqueeze(0).expand(s, -1, -1)  # (S, P, H)
        mean = self.context.mean(0, keepdim=True)  # (1, P, H)
        table = torch.cat([self.context, mean], dim=0)  # (A + 1, P, H); row A = whole study
        idx = torch.where(anatomy_index < 0, torch.full_like(anatomy_index, self.num_anatomies), anatomy_index)
        return table[idx]  # (S, P, H)

    def encode(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
               anatomy_index: Tensor | None = None) -> Tensor:
        """Embeddings (S, D) of label sentences (S, L) with the context; ``anatomy_index`` (S,) picks the
        per-anatomy context (ignored when shared; required otherwise)."""
        s = input_ids.shape[0]
        if anatomy_index is None:
            if not self.shared:
                raise ValueError("a per-anatomy prompt context needs the anatomy of every sentence")
            anatomy_index = torch.zeros(s, dtype=torch.long, device=input_ids.device)
        prefix = self.prefix_for(anatomy_index.to(self.context.device).long())  # (S, P, H)
        return model.encode_text(input_ids, attention_mask, prefix=prefix)  # (S, D)

    def forward(self, model: nn.Module, ctx: HeadContext, label_input_ids: Tensor | None = None,
                label_attention_mask: Tensor | None = None, **batch: Any) -> dict[str, Tensor]:
        if label_input_ids is None or label_attention_mask is None:
            return {}
        b, a = ctx.image_emb.shape[:2]
        if label_input_ids.dim() != 3 or tuple(label_input_ids.shape[:2]) != (b, a):
            raise ValueError(f"prompt_context: label_input_ids must be (B, A, L) = ({b}, {a}, L), "
                             f"got {tuple(label_input_ids.shape)}")
        length = label_input_ids.shape[-1]
        anatomy = torch.arange(a, device=label_input_ids.device).repeat(b)  # (B*A,) row b*A + a -> a
        emb = self.encode(model, label_input_ids.reshape(b * a, length),
                          label_attention_mask.reshape(b * a, length), anatomy)  # (B*A, D)
        return {"label_text_emb": emb.reshape(b, a, -1)}  # (B, A, D)

    @torch.no_grad()
    def init_from_phrase(self, model: nn.Module, tokenizer: Any, phrase: str) -> None:
        """Set the context to the word embeddings of ``phrase`` (CoOp's "a photo of a"-style start; e.g.
        "a ct scan showing"), repeated or cut to ``n_ctx`` tokens, for every anatomy when per anatomy."""
        ids = tokenizer(phrase, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"init phrase {phrase!r} has no tokens")
        ids = (ids * (self.n_ctx // len(ids) + 1))[: self.n_ctx]
        table = model.text.word_embeddings().weight  # (vocab, H)
        vec = table[torch.tensor(ids, device=table.device)].to(self.context.dtype)  # (P, H)
        self.context.copy_(vec if self.shared else vec.unsqueeze(0).expand_as(self.context))


register_head("prompt_context", PromptContext,
              help="Learned prompt context (CoOp) prepended to label sentences; gives label_text_emb")
