"""Dataset extras ``label_text`` and ``label_text_structured``: each anatomy's labels as a sentence, for the
label-unified contrast (``prompt_context`` head, ``label_unified`` objective; docs/methods.md#origins).

Per anatomy a, the sentence is built from the sample's ``anatomy_labels`` (A, K) (a label counts when it is
above the threshold, :data:`LABEL_THRESHOLD` unless the ``prompt_context`` head's ``label_threshold`` option
names another: the same rule, ``labels > label_threshold``, with which ``label_unified`` binarises the labels
of its targets, so a sentence never names a finding the targets call absent or the reverse) and the titles of the anatomy's tasks in the run's task catalog (the report parser preset's, the order of
``anatomy_labels``), in the one format of :func:`fvlm.prompts.label_sentence`: the lower-cased
titles of its positive tasks joined by ", " and ended with "." (``"emphysema, lung nodule."``), or
``"no abnormality."``. A run whose preset cannot be loaded uses the task names with spaces as titles.

``label_text_structured`` (text augmentation, head option ``text_augment``): in training, for each anatomy
with a positive task that has structured catalog sentences (``appearance``, ``observation``, ``verdict``;
``anatomy.catalog.Structured``), with probability :data:`STRUCTURED_PROB` one of them, of a positive task
drawn at random, is appended: ``"emphysema. There are centrilobular low-attenuation areas in both lungs."``.
Never in evaluation (no generator).

Fields (fixed shapes; L_lab = ``fvlm.prompts.LABEL_MAX_LEN``):

==========================  ================  ====================================================
``label_input_ids``         (A, L_lab) i64    the label sentences, ``[CLS] ... [SEP]`` + padding
``label_attention_mask``    (A, L_lab) i64
``has_report``              () bool           the case has a report (False: a label-only case)
==========================  ================  ====================================================

Both extras let the dataset keep label-only cases (``allows_label_only``): a case with ground-truth labels
(``case.json`` ``labels``, from preprocess ``--labels``) and no report trains with empty anatomy texts
(attention mask 0) and its ground-truth labels; ``has_report`` False tells the objectives to leave its
report-text pairs out (``disease_aware`` / ``anatomy_contrastive`` mask such rows, ``label_unified`` uses
only its label sentences).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from fvlm.prompts import LABEL_MAX_LEN, label_sentence
from pipelines.train.extras import register_extra, register_extra_factory

__all__ = ["STRUCTURED_PROB", "AUGMENT_FIELDS", "LABEL_THRESHOLD", "label_texts", "anatomy_tasks", "make_label_text"]

#: chance that an anatomy with a positive task gets a structured sentence appended (label_text_structured)
STRUCTURED_PROB = 0.5
#: the structured fields used as augmentation (the definition is textbook text, not an image statement)
AUGMENT_FIELDS = ("appearance", "observation", "verdict")
#: a label counts as positive above this (the default ``label_threshold`` of the objectives and the head)
LABEL_THRESHOLD = 0.5
#: the fields a label_text producer returns
LABEL_TEXT_KEYS = ("label_input_ids", "label_attention_mask", "has_report")


@lru_cache(maxsize=8)
def _catalog_tasks(preset: str | None, names: tuple[tuple[str, ...], ...]) -> tuple[tuple[tuple[str, tuple[str, ...]], ...], ...]:
    """Per anatomy, per task: (title, structured augmentation sentences)."""
    catalog = None
    if preset:
        try:
            from anatomy.reports.preset import load_preset

            catalog = load_preset(preset).catalog
        except Exception:  # noqa: BLE001 - a custom preset that is gone: titles from the names
            catalog = None
    out = []
    for anatomy_names in names:
        row = []
        for name in anatomy_names:
            task = None
            if catalog is not None:
                try:
                    task = catalog[name]
                except KeyError:
                    task = None
            if task is None:
                row.append((name.replace("_", " "), ()))
            else:
                st = getattr(task, "structured", None)
                row.append((task.title, st.sentences(AUGMENT_FIELDS) if st else ()))
        out.append(tuple(row))
    return tuple(out)


def anatomy_tasks(dataset: Any) -> tuple[tuple[tuple[str, tuple[str, ...]], ...], ...]:
    """Per anatomy of ``dataset``, per task (``anatomy_labels`` column order): (title, augmentation sentences)."""
    return _catalog_tasks(dataset.run.get("report_parser_preset"),
                          tuple(tuple(t) for t in dataset.task_names))


def label_texts(labels: np.ndarray, tasks: Any, rng: np.random.Generator | None = None,
                augment_prob: float = 0.0, threshold: float = LABEL_THRESHOLD) -> list[str]:
    """One label sentence per anatomy from ``labels`` (A, K) and :func:`anatomy_tasks`, a task positive where
    ``labels > threshold``; with ``rng`` and ``augment_prob`` > 0 a structured sentence of a positive task is
    appended with that probability."""
    out = []
    for k, row in enumerate(tasks):
        positive = [t for t, (title, _) in enumerate(row) if t < labels.shape[1] and labels[k, t] > threshold]
        text = label_sentence([row[t][0] for t in positive])
        if rng is not None and augment_prob > 0:
            candidates = [s for t in positive for s in row[t][1]]
            if candidates and rng.random() < augment_prob:
                text = f"{text} {candidates[int(rng.integers(len(candidates)))]}"
        out.append(text)
    return out


def _produce(dataset: Any, sample: dict, case: dict, rng: np.random.Generator | None,
             augment_prob: float, threshold: float = LABEL_THRESHOLD) -> dict[str, torch.Tensor]:
    labels = sample["anatomy_labels"].numpy()  # (A, K)
    texts = label_texts(labels, anatomy_tasks(dataset), rng, augment_prob, threshold)
    enc = dataset.tokenizer(texts, padding="max_length", truncation=True, max_length=LABEL_MAX_LEN,
                            return_attention_mask=True)
    return {
        "label_input_ids": torch.tensor(enc["input_ids"], dtype=torch.int64),  # (A, L_lab)
        "label_attention_mask": torch.tensor(enc["attention_mask"], dtype=torch.int64),  # (A, L_lab)
        "has_report": torch.tensor(bool(case.get("report")), dtype=torch.bool),  # ()
    }


@register_extra("label_text", keys=LABEL_TEXT_KEYS)
def label_text(dataset: Any, index: int, sample: dict, case: dict, rng: np.random.Generator | None
               ) -> dict[str, torch.Tensor]:
    """Label sentences, no augmentation (module docstring)."""
    return _produce(dataset, sample, case, rng, 0.0)


@register_extra("label_text_structured", keys=LABEL_TEXT_KEYS)
def label_text_structured(dataset: Any, index: int, sample: dict, case: dict, rng: np.random.Generator | None
                          ) -> dict[str, torch.Tensor]:
    """Label sentences with structured-sentence augmentation in training (module docstring)."""
    return _produce(dataset, sample, case, rng, STRUCTURED_PROB)


label_text.allows_label_only = True  # type: ignore[attr-defined]
label_text_structured.allows_label_only = True  # type: ignore[attr-defined]


def make_label_text(threshold: float = LABEL_THRESHOLD, structured: bool = False):
    """A ``label_text`` (``structured``: ``label_text_structured``) producer whose sentences count a label
    above ``threshold``: the extra ``label_text?threshold=0.3`` that the ``prompt_context`` head names when
    its ``label_threshold`` option is not the default."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"label_text: threshold must be a number, got {threshold!r}")
    prob = STRUCTURED_PROB if structured else 0.0

    def produce(dataset: Any, index: int, sample: dict, case: dict, rng: np.random.Generator | None
                ) -> dict[str, torch.Tensor]:
        return _produce(dataset, sample, case, rng, prob, float(threshold))

    produce.allows_label_only = True  # type: ignore[attr-defined]
    return produce


register_extra_factory("label_text", lambda threshold=LABEL_THRESHOLD: make_label_text(threshold, False))
register_extra_factory("label_text_structured", lambda threshold=LABEL_THRESHOLD: make_label_text(threshold, True))
