"""Zero-shot scoring (issue 6, item 1; docs/architecture.md#zero-shot): per anatomy and diagnosis task, a positive and a
negative prompt embedding; the score of a case is the softmax over the two similarities times the model's
logit scale (1 / tau), positive side.

A library: a model, a tokenizer and a task catalog in, tensors and arrays out. No file I/O.

* Prompts come from the task catalog, their texts from :func:`fvlm.prompts.select_prompts`. Several templates
  are averaged: each side's text embeddings are averaged and the mean is L2-renormalised (CLIP's prompt
  ensembling). Template sets (``templates=``, :data:`fvlm.prompts.TEMPLATE_SETS`):
  ``"report"`` (the default: sentences written the way reports state and deny the finding, generated from the
  task's synonyms and phrasings by :func:`fvlm.prompts.report_prompts`: "A 10 mm nodule is observed in the
  lung." / "No nodules are seen.", "The lung is normal."; issue #14 item 4: report texts never say "Not x." or
  "X is not present.", so those negatives sit nowhere near the texts of normal cases), ``"all"`` (every
  stored catalog prompt, ``Task.prompts``), ``"release"`` (the fVLM release style, ``"X."`` / ``"Not x."``),
  ``"ct-clip"`` (CT-CLIP's ``"X is present."`` / ``"X is not present."``), ``"structured"`` (every stored
  catalog prompt plus the task's structured sentences, :func:`fvlm.prompts.structured_prompts`; a task without
  structured fields keeps its catalog prompts), or a sequence of 0-based template indices into each task's
  stored prompt lists. ``"all"`` keeps meaning the stored prompts only, so results of earlier runs stay comparable.
* Learned prompts (``encode_prompts(..., learned=True)``): a model with the ``prompt_context`` head
  (``fvlm.model.heads.prompt``) scores task t with its learned context vectors prepended to the label
  sentence ``"<title>."`` (positive) and ``"no abnormality."`` (negative: the label sentence training gives an
  anatomy without findings; :func:`fvlm.prompts.task_prompts`), CoOp-style, the context of the task's
  anatomy when the head keeps one per anatomy. The template set is not used then (one prompt per side).
* Text embeddings are computed once per :class:`PromptBank` and reused for every batch of cases.
* A task bound to an anatomy reads that anatomy's embedding; a whole-study task (``anatomy`` None) reads
  the global image embedding. A case whose anatomy is masked (absent, or cut by the crop) has no score for
  that anatomy's tasks: NaN, never 0 (the metrics count it as missing).
* Text readout ceiling (:func:`score_texts`): the same bank scored against the cases' own per-anatomy report
  texts, embedded by the text tower, in place of the image embeddings: what a perfect image tower (one that
  maps each anatomy exactly onto its text) would score with these prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from fvlm.prompts import DEFAULT_TEMPLATES, LABEL_MAX_LEN, select_prompts, task_prompts

__all__ = ["PromptBank", "encode_prompts", "score_cases", "score_texts"]


@dataclass(frozen=True)
class PromptBank:
    """Per task (catalog order) the averaged, renormalised positive and negative prompt embeddings."""

    task_names: tuple[str, ...]
    anatomies: tuple[str | None, ...]  #: each task's anatomy (None: whole study)
    anatomy_index: tuple[int, ...]  #: each task's row in ``image_emb`` (-1: the global embedding)
    positive: Tensor  #: (T, D)
    negative: Tensor  #: (T, D)
    prompts: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]  #: per task (positives, negatives) used
    templates: str

    def __len__(self) -> int:
        return len(self.task_names)


def _model_anatomy_names(model: Any, catalog: Any) -> list[str]:
    names = list(getattr(model.config, "anatomy_names", ()) or ())
    if not names:  # an export without names: the catalog's anatomy set when the count fits
        set_names = list(catalog.anatomy_set.names)
        if len(set_names) != model.config.num_anatomies:
            raise ValueError(
                f"the model stores no anatomy names and has {model.config.num_anatomies} anatomies, but the task "
                f"catalog's anatomy set {catalog.anatomy_set.name!r} has {len(set_names)}: cannot map tasks to anatomies"
            )
        names = set_names
    return names


@torch.no_grad()
def _embed(model: Any, tokenizer: Any, texts: list[str], head: Any = None,
           anatomy_index: Sequence[int] | None = None) -> Tensor:
    """(S, D) embeddings of ``texts``; with ``head`` (a ``prompt_context`` head) the learned context of
    each text's anatomy (``anatomy_index``, -1 whole study) is prepended."""
    if head is None:
        length = int(getattr(model.config.text, "max_length", 64) or 64)
    else:
        length = LABEL_MAX_LEN
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_attention_mask=True,
                    return_tensors="pt")
    device = next(model.parameters()).device
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    if head is None:
        return model.encode_text(ids, mask).float()
    idx = torch.tensor(list(anatomy_index), dtype=torch.long, device=device)  # (S,)
    return head.encode(model, ids, mask, idx).float()


def learned_head(model: Any) -> Any:
    """The model's ``prompt_context`` head; ValueError when it has none."""
    heads = getattr(model, "heads", None)
    if heads is None or "prompt_context" not in heads:
        have = ", ".join(heads.keys()) if heads is not None and len(heads) else "none"
        raise ValueError(f"learned prompts need a model trained with the prompt_context head (model.heads of a "
                         f"recipe such as fvlm-unified); this model's heads: {have}. Use the catalog prompts")
    return heads["prompt_context"]


def encode_prompts(model: Any, tokenizer: Any, catalog: Any, templates: str | Sequence[int] = DEFAULT_TEMPLATES,
                   tasks: Sequence[str] | None = None, learned: bool = False) -> PromptBank:
    """Embed every task's prompts once. ``templates``: a template set (module docstring; default
    :data:`fvlm.prompts.DEFAULT_TEMPLATES`, ``"report"``). ``tasks``: a subset of the catalog's task names
    (default all). ``learned``: the model's learned prompt context + ``"<title>."`` / ``"no abnormality."``
    (module docstring) instead of the catalog prompts of ``templates``.

    Raises ValueError naming the tasks whose anatomy the model lacks, or when ``learned`` and the model has
    no ``prompt_context`` head.
    """
    if tokenizer is None:
        raise ValueError("the checkpoint has no tokenizer: zero-shot prompts cannot be encoded")
    names = _model_anatomy_names(model, catalog)
    chosen = [catalog[t] for t in tasks] if tasks is not None else list(catalog.tasks)
    lacking = [f"{t.name} ({t.anatomy})" for t in chosen if t.anatomy is not None and t.anatomy not in names]
    if lacking:
        raise ValueError(f"task(s) naming an anatomy the model lacks: {', '.join(lacking)}; the model's anatomies: "
                         f"{', '.join(names)}")
    anatomy_index = tuple(-1 if t.anatomy is None else names.index(t.anatomy) for t in chosen)
    head = None
    if learned:
        head = learned_head(model)
        selected = [tuple((s,) for s in task_prompts(t.title)) for t in chosen]
        templates = "learned"
    else:
        anatomies = catalog.anatomy_set
        selected = [select_prompts(t, templates, anatomies[t.anatomy] if t.anatomy in anatomies else None)
                    for t in chosen]
    texts = [s for pos, neg in selected for s in (*pos, *neg)]
    text_anatomy = [i for (pos, neg), i in zip(selected, anatomy_index) for _ in (*pos, *neg)]
    emb = (_embed(model, tokenizer, texts, head, text_anatomy) if texts
           else torch.zeros(0, model.config.embed_dim))
    pos_rows, neg_rows, k = [], [], 0
    for pos, neg in selected:
        p, k = emb[k:k + len(pos)], k + len(pos)
        n, k = emb[k:k + len(neg)], k + len(neg)
        pos_rows.append(torch.nn.functional.normalize(p.mean(0), dim=-1))
        neg_rows.append(torch.nn.functional.normalize(n.mean(0), dim=-1))
    d = emb.shape[-1]
    return PromptBank(
        task_names=tuple(t.name for t in chosen),
        anatomies=tuple(t.anatomy for t in chosen),
        anatomy_index=anatomy_index,
        positive=torch.stack(pos_rows) if pos_rows else torch.zeros(0, d),
        negative=torch.stack(neg_rows) if neg_rows else torch.zeros(0, d),
        prompts=tuple(selected),
        templates=templates if isinstance(templates, str) else ",".join(str(i) for i in templates),
    )


def score_cases(image_emb: Tensor, anatomy_mask: Tensor, bank: PromptBank, logit_scale: float | Tensor,
                global_image_emb: Tensor | None = None) -> np.ndarray:
    """(B, T) float64 zero-shot scores: ``softmax([s_neg, s_pos] * logit_scale)[pos]`` with ``s = <img, text>``.

    ``image_emb`` (B, A, D) and ``anatomy_mask`` (B, A) as ``FVLM.encode_image`` returns them; a task whose
    anatomy is masked in a case gets NaN. Whole-study tasks need ``global_image_emb`` (B, D).
    """
    image_emb = torch.as_tensor(image_emb).float()
    mask = torch.as_tensor(anatomy_mask).bool()
    if image_emb.dim() != 3 or mask.shape != image_emb.shape[:2]:
        raise ValueError(f"image_emb must be (B, A, D) and anatomy_mask (B, A), got {tuple(image_emb.shape)} "
                         f"and {tuple(mask.shape)}")
    b = image_emb.shape[0]
    out = np.full((b, len(bank)), np.nan, dtype=np.float64)
    if not len(bank):
        return out
    scale = float(logit_scale)
    pos, neg = bank.positive.float().to(image_emb.device), bank.negative.float().to(image_emb.device)
    idx = torch.tensor(bank.anatomy_index, device=image_emb.device)
    anatomy_tasks = idx >= 0
    if (~anatomy_tasks).any() and global_image_emb is None:
        whole = [n for n, i in zip(bank.task_names, bank.anatomy_index) if i < 0]
        raise ValueError(f"whole-study task(s) {', '.join(whole)} need global_image_emb")
    if (idx >= image_emb.shape[1]).any():
        raise ValueError(f"the prompt bank refers to anatomy rows up to {int(idx.max())}, image_emb has "
                         f"{image_emb.shape[1]}")
    safe = idx.clamp_min(0)
    feats = image_emb[:, safe]  # (B, T, D)
    valid = mask[:, safe] & anatomy_tasks  # (B, T)
    if (~anatomy_tasks).any():
        g = torch.as_tensor(global_image_emb).float().to(image_emb.device)
        feats = torch.where(anatomy_tasks.view(1, -1, 1), feats, g.unsqueeze(1))
        valid = valid | ~anatomy_tasks.view(1, -1)
    s_pos = (feats * pos.unsqueeze(0)).sum(-1) * scale
    s_neg = (feats * neg.unsqueeze(0)).sum(-1) * scale
    prob = torch.softmax(torch.stack([s_neg, s_pos], dim=-1), dim=-1)[..., 1]
    prob = torch.where(valid, prob, torch.full_like(prob, float("nan")))
    return prob.double().cpu().numpy()


def score_texts(text_emb: Tensor, text_mask: Tensor, bank: PromptBank, logit_scale: float | Tensor,
                global_text_emb: Tensor | None = None, global_text_mask: Tensor | None = None) -> np.ndarray:
    """(B, T) float64 text readout ceiling: :func:`score_cases` with each case's own report texts in place of
    its image, ``p = softmax([<t, n>, <t, p>] * logit_scale)[pos] = sigmoid(logit_scale * (<t, p> - <t, n>))``
    with ``t`` the text embedding of the task's anatomy.

    A perfect image tower maps each anatomy's region exactly onto the embedding of the text that describes it;
    its zero-shot scores would be these. Their AUC bounds what the prompts can read out of the model's text
    space, whatever the image tower learns: a task whose ceiling is near 0.5 (or below) cannot be read with
    these prompts even by a perfect image tower.

    ``text_emb`` (B, A, D): each case's per-anatomy text embeddings (``FVLM.encode_text`` of the anatomy
    texts, tokenised as in training); ``text_mask`` (B, A) True where the case has a text for that anatomy
    (False: no report, an empty text, or an anatomy the image scoring masks) -> NaN. Whole-study tasks read
    ``global_text_emb`` (B, D), the whole report's embedding, and ``global_text_mask`` (B,) (default: all
    True).
    """
    text_emb = torch.as_tensor(text_emb).float()
    if global_text_emb is not None and global_text_mask is not None:
        gmask = torch.as_tensor(global_text_mask).bool().to(text_emb.device)
        if gmask.shape != text_emb.shape[:1]:
            raise ValueError(f"global_text_mask must be (B,) = ({text_emb.shape[0]},), got {tuple(gmask.shape)}")
    else:
        gmask = None
    out = score_cases(text_emb, text_mask, bank, logit_scale, global_text_emb)
    if gmask is not None:
        whole = np.array([i < 0 for i in bank.anatomy_index], dtype=bool)
        out[np.ix_(~gmask.cpu().numpy(), whole)] = np.nan
    return out
