"""Head ``task_classifier``: per anatomy a classifier of that anatomy's diagnosis tasks on its pooled features,
the image tower of a supervised ceiling (issue 15 item 5; recipe ``supervised``, objective ``supervised``).

Notation: B samples, A anatomies, W the vision width, K the most tasks of one anatomy. Anatomy ``a`` has the
``K_a <= K`` tasks ``t_a1 .. t_aK_a`` (catalog order, the column order of the training field
``anatomy_labels``); columns ``K_a .. K-1`` of that anatomy are padding. On ``h_ba = ctx.pooled[b, a]`` (W,),
the anatomy pooling's output before its per-anatomy projection (zero rows where the anatomy is masked)::

    linear (hidden = 0, default):  z_ba = h_ba @ W_a + beta_a                              W_a (W, K), beta_a (K,)
    hidden = H > 0:                z_ba = GELU(h_ba @ U_a + c_a) @ V_a + beta_a    U_a (W, H), V_a (H, K)

one map per anatomy; ``dropout`` (default 0) on ``h`` (and on the hidden layer). Whole-study tasks (a task
whose ``anatomy`` is None) get no logit: ``anatomy_labels`` holds no column for them, so nothing would train
it; :func:`fvlm.supervised.supervised_scores` gives them NaN.

Options (``model.heads.task_classifier``):

* ``catalog``: a task catalog name or YAML path (``fvlm54``, ``ct-rate``; ``anatomy.catalog.load_task_catalog``)
  whose per-anatomy tasks the head classifies. Must be the catalog of the report parser preset the training
  data was preprocessed with (fvlm15 -> fvlm54), whose order ``anatomy_labels`` follows; the objective checks
  it against the data (the dataset extra ``task_label_mask``).
* ``tasks``: anatomy name -> its task names, in ``anatomy_labels`` column order; given, the catalog is not read.
* ``anatomies``: the anatomy names in label order (rows of ``pooled``); default the model's ``anatomy_names``,
  else the catalog's anatomy set.
* ``hidden`` (0), ``dropout`` (0.0): see above.

Self-describing exports: the head writes the resolved ``anatomies`` and ``tasks`` into its entry of the
model's config (``ModelConfig.heads["task_classifier"]``; the way ``FVLM`` keeps the text tower's resolved
dims), so ``config.json`` of a saved model names the task of every logit and loading it never needs the
catalog again (a later edit of the catalog cannot reorder the logits of a trained model).

Outputs (merged into the model output; the ``supervised`` objective reads them by keyword)::

    task_logits  (B, A, K)  float  z (padding columns and masked anatomies hold values the loss ignores)
    task_mask    (A, K)     bool   column k is a task of anatomy a (False: padding)
    task_ids     (A, K)     int64  :func:`task_id` of each column's task name (0: padding)
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvlm.model.heads import Head, HeadContext, register_head

__all__ = ["TaskClassifier", "task_id", "task_id_table", "resolve_tasks", "NAME", "WEIGHT_STD"]

#: the head's registered name (and its key in ``ModelConfig.heads``)
NAME = "task_classifier"
#: initial weights: normal with std WEIGHT_STD / sqrt(input width) (logits start near 0, probabilities near 0.5)
WEIGHT_STD = 0.1
_MASK63 = (1 << 63) - 1


def task_id(name: str) -> int:
    """A positive 63-bit hash of a task name (blake2b, stable across processes and versions; 0 is padding)."""
    digest = hashlib.blake2b(str(name).encode("utf-8"), digest_size=8).digest()
    return (int.from_bytes(digest, "little") & _MASK63) or 1


def task_id_table(task_names: Sequence[Sequence[str]], k: int) -> Tensor:
    """(A, k) int64: :func:`task_id` of anatomy a's t-th task at [a, t], 0 in the padding columns."""
    out = torch.zeros(len(task_names), int(k), dtype=torch.int64)
    for a, names in enumerate(task_names):
        if len(names) > k:
            raise ValueError(f"anatomy row {a} has {len(names)} tasks, more than the {k} columns")
        for t, name in enumerate(names):
            out[a, t] = task_id(name)
    return out


def resolve_tasks(config: Any, catalog: str | None = None, tasks: Mapping[str, Sequence[str]] | None = None,
                  anatomies: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """(anatomy names in label order, per anatomy its task names) for the options of the head; see the
    module docstring. ValueError naming the option at fault."""
    where = f"model.heads.{NAME}"
    cat = None
    if tasks is None:
        if not catalog:
            raise ValueError(f"{where}: give `catalog` (a task catalog name such as fvlm54, the report parser "
                             "preset's catalog of the training data) or `tasks` (anatomy name -> task names)")
        from anatomy.catalog import load_task_catalog

        cat = load_task_catalog(catalog)
    model_names = list(getattr(config, "anatomy_names", ()) or ())
    if anatomies is not None:
        names = [str(a) for a in anatomies]
        if model_names and names != model_names:
            raise ValueError(f"{where}: anatomies {names} differ from the model's anatomy_names {model_names}")
    elif model_names:
        names = model_names
    elif cat is not None:
        names = list(cat.anatomy_set.names)
    else:
        raise ValueError(f"{where}: with `tasks` and no `catalog`, name the anatomies in label order (`anatomies`) "
                         "or give the model anatomy_names")
    a = int(config.num_anatomies)
    if len(names) != a or len(set(names)) != len(names):
        raise ValueError(f"{where}: {len(names)} anatomy names ({', '.join(names)}) for a model of {a} anatomies "
                         "(names must be distinct, one per anatomy label)")
    if cat is not None:
        by = cat.by_anatomy()
        lacking = [n for n in names if n not in by]
        if lacking == names:
            raise ValueError(f"{where}: catalog {cat.name!r} (anatomy set {cat.anatomy_set.name!r}) has no task for "
                             f"any anatomy of the model ({', '.join(names)})")
        per = [[t.name for t in by.get(n, [])] for n in names]
    else:
        if not isinstance(tasks, Mapping):
            raise ValueError(f"{where}: tasks must map anatomy names to lists of task names, got {tasks!r}")
        unknown = [k for k in tasks if k not in names]
        if unknown:
            raise ValueError(f"{where}: tasks name anatomies the model lacks: {', '.join(map(str, unknown))}; its "
                             f"anatomies: {', '.join(names)}")
        per = []
        for n in names:
            row = tasks.get(n) or []
            if isinstance(row, str) or not all(isinstance(t, str) and t for t in row):
                raise ValueError(f"{where}: tasks.{n} must be a list of task names, got {row!r}")
            per.append(list(row))
    flat = [t for row in per for t in row]
    if not flat:
        raise ValueError(f"{where}: no task for any anatomy")
    dup = sorted({t for t in flat if flat.count(t) > 1})
    if dup:
        raise ValueError(f"{where}: task name(s) listed more than once: {', '.join(dup)}")
    return names, per


class _PerAnatomyLinear(nn.Module):
    """(B, A, F) -> (B, A, O): one linear map per anatomy, weight (A, F, O), bias (A, O)."""

    def __init__(self, num_anatomies: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_anatomies, in_dim, out_dim) * (WEIGHT_STD / math.sqrt(in_dim)))
        self.bias = nn.Parameter(torch.zeros(num_anatomies, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("baf,afo->bao", x, self.weight.to(x.dtype)) + self.bias.to(x.dtype)  # (B, A, O)


@register_head(NAME)
class TaskClassifier(Head):
    """Per-anatomy task classifier on the pooled anatomy features; see the module docstring."""

    data_extras = ("task_label_mask",)
    reads_text = False  # the logits read the pooled image features only

    def __init__(self, config: Any, catalog: str | None = None, tasks: Mapping[str, Sequence[str]] | None = None,
                 anatomies: Sequence[str] | None = None, hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
            raise ValueError(f"model.heads.{NAME}: hidden must be a non-negative integer, got {hidden!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.heads.{NAME}: dropout must lie in [0, 1), got {dropout!r}")
        self.anatomies, self.task_names = resolve_tasks(config, catalog, tasks, anatomies)
        self.catalog, self.hidden, self.p = catalog, int(hidden), float(dropout)
        a, width = len(self.anatomies), int(config.vision.width)
        self.num_tasks = max(1, max(len(row) for row in self.task_names))  # K
        k = self.num_tasks
        self._index = {t: (i, j) for i, row in enumerate(self.task_names) for j, t in enumerate(row)}
        mask = torch.zeros(a, k, dtype=torch.bool)
        for i, row in enumerate(self.task_names):
            mask[i, : len(row)] = True
        self.register_buffer("task_mask", mask, persistent=False)  # (A, K), derived from the config
        self.register_buffer("task_ids", task_id_table(self.task_names, k), persistent=False)  # (A, K)
        if self.hidden:
            self.fc1 = _PerAnatomyLinear(a, width, self.hidden)
            self.fc2 = _PerAnatomyLinear(a, self.hidden, k)
        else:
            self.fc = _PerAnatomyLinear(a, width, k)
        self.dropout = nn.Dropout(self.p)
        # the resolved task lists go into the model's stored config (module docstring: self-describing exports)
        entry = getattr(config, "heads", {}).get(NAME) if isinstance(getattr(config, "heads", None), dict) else None
        if isinstance(entry, dict):
            entry["anatomies"] = list(self.anatomies)
            entry["tasks"] = {n: list(row) for n, row in zip(self.anatomies, self.task_names) if row}

    def extra_repr(self) -> str:
        n = sum(len(row) for row in self.task_names)
        return (f"tasks={n}, anatomies={len(self.anatomies)}, K={self.num_tasks}, hidden={self.hidden}, "
                f"dropout={self.p}, catalog={self.catalog!r}")

    def index(self, task: str) -> tuple[int, int] | None:
        """(anatomy row, column) of ``task``'s logit, or None when the head has no logit for it."""
        return self._index.get(task)

    def logits(self, pooled: Tensor) -> Tensor:
        """pooled (B, A, W) -> task logits (B, A, K)."""
        if pooled.dim() != 3 or pooled.shape[1] != len(self.anatomies):
            raise ValueError(f"{NAME} head: pooled must be (B, A, W) with A = {len(self.anatomies)}, "
                             f"got {tuple(pooled.shape)}")
        x = self.dropout(pooled)
        if self.hidden:
            return self.fc2(self.dropout(F.gelu(self.fc1(x))))  # (B, A, K)
        return self.fc(x)  # (B, A, K)

    def forward(self, model: nn.Module, ctx: HeadContext, **batch: Any) -> dict[str, Tensor]:
        return {"task_logits": self.logits(ctx.pooled), "task_mask": self.task_mask, "task_ids": self.task_ids}
