"""Dataset extra ``task_label_mask``: which cells of ``anatomy_labels`` hold a real, known label, and which task
each column is, for the ``supervised`` objective of the ``task_classifier`` head (``fvlm.model.heads.classifier``).

``anatomy_labels`` (A, K) is zero-padded past each anatomy's tasks and reads an unknown label as 0 (a
label-only case whose label table leaves a column empty, a report that lacks a task). This extra tells them
apart:

==========================  ================  ====================================================
``anatomy_label_known``     (A, K) bool       column k is a task of anatomy a (not padding) and the case
                                              states its label (a parsed report label, or a non-empty
                                              ground-truth value for a label-only case)
``anatomy_task_ids``        (A, K) i64        ``fvlm.model.heads.classifier.task_id`` of each column's task
                                              name (``dataset.task_names``), 0 in padding columns
==========================  ================  ====================================================

The objective compares ``anatomy_task_ids`` with the head's own ``task_ids``: a head built from another catalog
than the data's report parser preset is an error, not a silent mix-up of tasks. No randomness.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from fvlm.model.heads.classifier import task_id_table
from pipelines.train.extras import register_extra

__all__ = ["task_label_mask", "known_labels"]


def known_labels(dataset: Any, case: dict) -> np.ndarray:
    """(A, K) bool: the label of anatomy a's k-th task is stated by ``case`` (module docstring), read the way
    ``CaseDataset`` reads ``anatomy_labels``."""
    report = case.get("report") or {}
    if not report and getattr(dataset, "allow_label_only", False) and isinstance(case.get("labels"), dict):
        entries = dataset._label_only_entries(case["labels"])  # the dataset's own reading of a label table
    else:
        entries = ((report.get("parsed") or {}).get("anatomies") or {})
    out = np.zeros((dataset.num_anatomies, dataset.max_tasks), dtype=bool)
    for a, name in enumerate(dataset.anatomy_names):
        labels = (entries.get(name) or {}).get("labels") or {}
        for k, task in enumerate(dataset.task_names[a]):
            v = labels.get(task)
            out[a, k] = v is not None and _finite(v)
    return out


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


@register_extra("task_label_mask", keys=("anatomy_label_known", "anatomy_task_ids"))
def task_label_mask(dataset: Any, index: int, sample: dict, case: dict, rng: np.random.Generator | None
                    ) -> dict[str, torch.Tensor]:
    """``anatomy_label_known`` and ``anatomy_task_ids`` of one case (module docstring)."""
    ids = _ids(tuple(tuple(t) for t in dataset.task_names), int(dataset.max_tasks))  # the same for every case
    return {"anatomy_label_known": torch.from_numpy(known_labels(dataset, case)),  # (A, K)
            "anatomy_task_ids": ids.clone()}  # (A, K)


@lru_cache(maxsize=8)
def _ids(task_names: tuple[tuple[str, ...], ...], k: int) -> torch.Tensor:
    return task_id_table(task_names, k)
