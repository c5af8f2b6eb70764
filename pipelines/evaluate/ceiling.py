"""The text readout ceiling of ``fvlm evaluate`` (issue #14 item 4): the evaluation's prompt bank scored against
each evaluated case's own report texts instead of its image.

A perfect image tower would put each anatomy's image embedding exactly on the embedding of the text that
describes it; its zero-shot scores are then :func:`fvlm.zeroshot.score_texts` of those texts, and their AUC
is the most the prompts can read out of the model's text space. A ceiling near 0.5 (or below: inverted)
says the prompts, not the image tower, are what fails.

* Texts: ``case.json`` ``report.parsed.anatomies[name].text`` per anatomy of the model, and ``report.text``
  for whole-study tasks, tokenised as training tokenises them (``CaseDataset``: padded and truncated to the
  run recipe's ``data.max_text_len``, else the model's ``text.max_length``; the report to
  ``data.report_max_len``, else that length) and embedded by ``FVLM.encode_text``. Each distinct text is
  encoded once (normal texts repeat across cases).
* Global readout (``readout="global"``, whole-scan recipes, ``pipelines.evaluate.readout``): every task reads
  the whole report's embedding, as the image side reads the whole scan's.
* Cases: exactly the image scoring's: a task gets no ceiling score where its image score is NaN (anatomy
  absent or cut, no window) and none where the case has no text (no report, an empty anatomy text).
* Metrics: :func:`fvlm.metrics.auc_with_ci` per task on every evaluated case (as the image AUC), and the
  macro over the tasks the image macro includes (same flags), with :func:`fvlm.metrics.macro_auc_with_ci`'s
  joint interval; per anatomy likewise. A task whose ceiling AUC is undefined (one class among the cases
  with a text) is listed under ``tasks_without`` and left out of that mean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fvlm import metrics as M

__all__ = ["case_texts", "ceiling_metrics", "ceiling_scores", "embed_texts", "text_lengths"]

#: what the ceiling is, for metrics.json and the reports
DESCRIPTION = ("text readout ceiling: the same prompts scored against each evaluated case's own report texts "
               "(per-anatomy texts; the whole report for whole-study tasks) embedded by the model's text tower, "
               "in place of its image: the AUC a perfect image tower could reach with these prompts")


def text_lengths(checkpoint: Path, model: Any) -> dict[str, Any]:
    """Token lengths of the anatomy texts and of the report as training used them: the run recipe's
    ``data.max_text_len`` (else the model's ``text.max_length``) and ``data.report_max_len`` (else the former)."""
    length = int(getattr(model.config.text, "max_length", 0) or 128)
    report_length, source = None, "model text.max_length"
    run_cfg = Path(checkpoint) / "config.yaml"
    if run_cfg.is_file():
        from pipelines.config.recipe import load_recipe

        data = load_recipe(run_cfg).data
        length = int(getattr(data, "max_text_len", None) or length)
        report_length = getattr(data, "report_max_len", None)
        source = f"recipe {run_cfg.name}"
    return {"max_text_len": length, "report_max_len": int(report_length or length), "length_source": source}


def case_texts(case: dict, anatomy_names: Sequence[str]) -> tuple[list[str], str]:
    """(per-anatomy texts in ``anatomy_names`` order, whole report text) of one ``case.json``; "" where absent."""
    report = case.get("report") or {}
    parsed = report.get("parsed") if isinstance(report, dict) else None
    entries = parsed.get("anatomies") if isinstance(parsed, dict) else None
    entries = entries if isinstance(entries, dict) else {}
    texts = [str((entries.get(n) or {}).get("text") or "").strip() for n in anatomy_names]
    return texts, str(report.get("text") or "").strip() if isinstance(report, dict) else ""


@torch.no_grad()
def embed_texts(model: Any, tokenizer: Any, texts: Sequence[str], length: int, batch_size: int = 64) -> torch.Tensor:
    """(S, D) ``FVLM.encode_text`` embeddings of ``texts``, tokenised as ``CaseDataset`` does (padding and
    truncation to ``length``, ``[CLS] ... [SEP]``)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), padding="max_length", truncation=True,
                        max_length=length, return_attention_mask=True)
        ids = torch.tensor(enc["input_ids"], dtype=torch.int64, device=device)  # (b, L)
        mask = torch.tensor(enc["attention_mask"], dtype=torch.int64, device=device)
        out.append(model.encode_text(ids, mask).float().cpu())  # (b, D)
    return torch.cat(out) if out else torch.zeros(0, model.config.embed_dim)


def ceiling_scores(model: Any, tokenizer: Any, cases: Sequence[dict], anatomy_names: Sequence[str], bank: Any,
                   lengths: dict[str, Any], image_scores: np.ndarray | None = None, batch_size: int = 64,
                   readout: str = "anatomy") -> tuple[np.ndarray, dict[str, Any]]:
    """(N, T) text-ceiling scores of ``cases`` (``case.json`` dicts, in the order of ``image_scores``' rows) and
    counts for the report. ``image_scores`` (N, T): where NaN, the ceiling is NaN too (same cases).
    ``readout="global"`` (a whole-scan recipe read from its global embedding): every task reads the whole
    report's embedding, as the global image readout reads the whole scan's."""
    from fvlm.zeroshot import score_texts

    if readout not in ("anatomy", "global"):
        raise ValueError(f"readout must be anatomy or global, got {readout!r}")
    a = len(anatomy_names)
    per_case = [case_texts(c, anatomy_names) for c in cases]
    if readout == "global":  # no anatomy text: the whole report goes in every anatomy's place (below)
        per_case = [([""] * a, r) for _, r in per_case]
    whole = readout == "global" or any(i < 0 for i in bank.anatomy_index)
    anatomy_unique = sorted({t for texts, _ in per_case for t in texts if t})
    report_unique = sorted({r for _, r in per_case if r}) if whole else []
    index = {t: k for k, t in enumerate(anatomy_unique)}
    report_index = {t: k for k, t in enumerate(report_unique)}
    emb = embed_texts(model, tokenizer, anatomy_unique, lengths["max_text_len"], batch_size)  # (S, D)
    d = emb.shape[-1] if len(anatomy_unique) else int(model.config.embed_dim)
    text_emb = torch.zeros(len(cases), a, d)  # (N, A, D)
    text_mask = torch.zeros(len(cases), a, dtype=torch.bool)  # (N, A)
    for i, (texts, _) in enumerate(per_case):
        for k, t in enumerate(texts):
            if t:
                text_emb[i, k], text_mask[i, k] = emb[index[t]], True
    global_emb = global_mask = None
    if whole:
        remb = embed_texts(model, tokenizer, report_unique, lengths["report_max_len"], batch_size)  # (R, D)
        global_emb = torch.zeros(len(cases), d)  # (N, D)
        global_mask = torch.zeros(len(cases), dtype=torch.bool)  # (N,)
        for i, (_, r) in enumerate(per_case):
            if r:
                global_emb[i], global_mask[i] = remb[report_index[r]], True
        if readout == "global":
            text_emb, text_mask = global_emb.unsqueeze(1).expand(-1, a, -1), global_mask.unsqueeze(1).expand(-1, a)
    scale = float(model.logit_scale().detach())
    scores = score_texts(text_emb, text_mask, bank, scale, global_emb, global_mask)
    if image_scores is not None:
        scores[np.isnan(np.asarray(image_scores, dtype=np.float64))] = np.nan
    info = {"n_cases_with_text": int(sum(any(texts) or (readout == "global" and bool(r)) for texts, r in per_case)),
            "n_texts_encoded": len(anatomy_unique) + len(report_unique), **lengths}
    return scores, info


def _macro(aucs: dict[str, M.AucResult], names: list[str], y: np.ndarray, s: np.ndarray, cols: dict[str, int],
           n_boot: int, seed: int) -> dict[str, Any]:
    """Mean ceiling AUC over ``names`` that have one, with the joint bootstrap interval over those tasks."""
    have = [n for n in names if aucs[n].auc is not None]
    block: dict[str, Any] = {"n_tasks": len(have), "tasks": have, "tasks_without": [n for n in names if n not in have],
                             "auc": float(np.mean([aucs[n].auc for n in have])) if have else None, "auc_ci": None}
    if have:
        idx = [cols[n] for n in have]
        block["auc_ci"] = M.macro_auc_with_ci(y[:, idx], s[:, idx], n_boot=n_boot, seed=seed,
                                              task_names=have).to_dict()
    return block


def ceiling_metrics(tasks: Sequence[Any], labels: np.ndarray, scores: np.ndarray, cases: np.ndarray,
                    summary: dict[str, Any], n_boot: int, seed: int, description: str = DESCRIPTION) -> dict[str, Any]:
    """Per-task AUC of ``scores`` (N, T) on ``cases`` (bool mask: the cases the image AUC counts) and the macro
    over the image macro's included tasks, overall (``macro``) and per anatomy group (``per_anatomy``, the
    groups of ``summary``). Used for every readout beside the zero-shot one (text ceiling, linear probe)."""
    y, s = labels[cases], scores[cases]
    cols = {t.name: j for j, t in enumerate(tasks)}
    aucs = {t.name: M.auc_with_ci(y[:, j], s[:, j], n_boot=n_boot, seed=seed) for j, t in enumerate(tasks)}
    per = {g: _macro(aucs, list(block["included"]), y, s, cols, n_boot, seed)
           for g, block in summary.get("groups", {}).items()}
    return {"description": description, "macro": _macro(aucs, list(summary["included"]), y, s, cols, n_boot, seed),
            "per_anatomy": per, "tasks": {n: r.to_dict() for n, r in aucs.items()},
            "missing_scores": {t.name: int(np.isnan(scores[:, j]).sum()) for j, t in enumerate(tasks)}}
