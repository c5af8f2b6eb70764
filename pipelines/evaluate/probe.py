"""Linear-probe ceiling of ``fvlm evaluate`` (issue #15 item 5): what the frozen image tower holds about each
task, whatever the prompts.

Per task, an L2-regularised logistic regression on the frozen embedding of the task's anatomy (the global
embedding for whole-study tasks, and for every task under the global readout, ``pipelines.evaluate.readout``),
fitted on the labels of a *training* cohort and scored on the evaluated (held-out) cases::

    x = standardise(e)                 e: (D,) image embedding of the case's anatomy (FVLM.encode_image)
    s = w . x + b                      (the decision function: the held-out score)
    (w, b) = argmin  1/2 |w|^2 + C sum_i log(1 + exp(-y_i (w . x_i + b)))       y_i in {-1, +1}

* Embeddings (:func:`embed_cases`): the evaluation's view, ``FVLM.encode_image(image, anatomy, cut)`` of each
  case as zero-shot scoring sees it (``CaseDataset(train=False)``: central crop or resize), or, with
  ``windows=(size, min_inside)``, the windows around each anatomy (``pipelines.inference.windows``): an
  anatomy's embedding is the mean over the windows where it counts, the global embedding the mean over all of
  the case's windows, each L2-renormalised.
* Training cases of a task: those where the anatomy is present and not masked and the label is known.
* ``C`` (:func:`fit_linear_probe`): chosen from :data:`C_GRID` by stratified ``folds``-fold cross-validation on
  the training cases only (shuffled with ``seed``): the standardiser and the regression are fitted inside each
  fold (warm-started along the increasing C path), the C with the highest mean fold ROC AUC wins (ties: the
  smaller C, more regularised), then the pipeline is refitted on every training case. Held-out labels never
  reach the fit. A task with fewer than ``folds`` training positives or negatives is skipped, with the reason.
* Held-out scores (:func:`probe_scores`): the decision function; NaN where the anatomy is masked (and, in
  ``fvlm evaluate``, wherever the zero-shot score is NaN, so both are scored on the same cases) and for
  skipped tasks.

* Label fractions (:func:`draw_fraction`, ``fvlm probe --fractions``): a share ``f`` of a task's training cases,
  drawn per seed and per task, stratified so both classes stay present::

      n_c' = min(n_c, max(min_per_class, round(f * n_c)))      for each class c in {positive, negative}

  drawn without replacement by ``numpy.random.default_rng([seed, crc32(task name)])`` (the same draw for the
  same seed and task, whatever the other tasks); with ``min_folds`` the cross-validation folds shrink to
  ``min(folds, n_pos', n_neg')`` (at least ``min_folds``) so that a small draw can still choose C.

Everything is deterministic (lbfgs, seeded folds, seeded draws). ``probe_metrics`` reports AUC per task, per anatomy and
macro over the zero-shot macro's tasks, as the text readout ceiling (``pipelines.evaluate.ceiling``).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["C_GRID", "DESCRIPTION", "ProbeFit", "embed_cases", "task_features", "draw_fraction", "fit_linear_probe",
           "fit_probe", "probe_scores", "probe_metrics"]

#: regularisation strengths tried by cross-validation (inverse L2 weight, on standardised features)
C_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)

#: what the probe is, for metrics.json and the reports
DESCRIPTION = ("linear probe: per task, an L2 logistic regression on the frozen image embedding of the task's "
               "anatomy (the global embedding for whole-study tasks and for the global readout), fitted on the "
               "training cohort's labels with C chosen by stratified cross-validation on the training cases only, "
               "scored on the evaluated cases: what the image tower holds about the task, whatever the prompts")


@torch.no_grad()
def embed_cases(model: Any, dataset: Any, batch_size: int = 4,
                windows: tuple[Sequence[int], float] | None = None) -> dict[str, Any]:
    """Frozen image embeddings of every case of ``dataset`` (a ``CaseDataset(train=False)``), in its order.

    Returns ``case_ids`` (list of N), ``image_emb`` (N, A, D) float32 (zero rows where masked),
    ``anatomy_mask`` (N, A) bool (present and not masked), ``global_image_emb`` (N, D) float32 and ``view``
    (``"dataset"`` or ``"windows"``). ``windows=(size_zyx, min_inside)``: the windows view (module docstring).
    """
    device = next(model.parameters()).device
    a = int(model.config.num_anatomies)
    emb, mask, glob = [], [], []
    if windows is None:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
            enc = model.encode_image(torch.stack([it["image"] for it in items]).to(device),
                                     torch.stack([it["anatomy"] for it in items]).to(device),
                                     torch.stack([it["cut"] for it in items]).to(device))
            emb.append(enc["image_emb"].float().cpu())  # (b, A, D)
            mask.append(enc["anatomy_mask"].bool().cpu())  # (b, A)
            glob.append(enc["global_image_emb"].float().cpu())  # (b, D)
    else:
        from pipelines.inference.windows import case_windows, encode_case_windows, window_global

        size, min_inside = windows
        d = int(model.config.embed_dim)
        for i in range(len(dataset)):
            cw = case_windows(dataset, i, size, min_inside)
            if cw is None:  # no anatomy in the case
                emb.append(torch.zeros(1, a, d))
                mask.append(torch.zeros(1, a, dtype=torch.bool))
                glob.append(torch.zeros(1, d))
                continue
            enc = encode_case_windows(model, cw, batch_size)
            m = enc["anatomy_mask"].cpu()  # (W, A)
            e = (enc["image_emb"].cpu() * m.unsqueeze(-1)).sum(0)  # (A, D)
            emb.append(torch.nn.functional.normalize(e, dim=-1).unsqueeze(0) * m.any(0).view(1, a, 1))
            mask.append(m.any(0, keepdim=True))
            glob.append(window_global(enc["global_image_emb"]).cpu())
    n = len(dataset)
    d = int(model.config.embed_dim)
    return {"case_ids": list(dataset.case_ids),
            "image_emb": torch.cat(emb).numpy().astype(np.float32) if emb else np.zeros((n, a, d), np.float32),
            "anatomy_mask": torch.cat(mask).numpy().astype(bool) if mask else np.zeros((n, a), bool),
            "global_image_emb": torch.cat(glob).numpy().astype(np.float32) if glob else np.zeros((n, d), np.float32),
            "view": "dataset" if windows is None else "windows"}


def task_features(emb: dict[str, Any], row: int, readout: str = "anatomy") -> tuple[np.ndarray, np.ndarray]:
    """(X (N, D), present (N,) bool) of one task: the embedding of anatomy ``row`` (< 0: a whole-study task,
    the global embedding, every case present); ``readout="global"``: the global embedding, present where the
    anatomy is."""
    if readout not in ("anatomy", "global"):
        raise ValueError(f"readout must be anatomy or global, got {readout!r}")
    n = len(emb["global_image_emb"])
    if row < 0:
        return emb["global_image_emb"], np.ones(n, dtype=bool)
    present = np.asarray(emb["anatomy_mask"][:, row], dtype=bool)
    return (emb["global_image_emb"] if readout == "global" else emb["image_emb"][:, row]), present


@dataclass
class ProbeFit:
    """One task's probe: the fitted pipeline (None when skipped) and how it was chosen."""

    task: str
    row: int  #: anatomy row of the embedding (-1: whole study)
    features: str  #: "anatomy" (the anatomy's own embedding) or "global"
    n_pos: int  #: training positives used
    n_neg: int  #: training negatives used
    folds: int  #: cross-validation folds
    C: float | None = None  #: chosen inverse regularisation strength
    cv_auc: float | None = None  #: mean fold ROC AUC at that C (training cohort)
    cv_aucs: dict[str, float | None] = field(default_factory=dict)  #: mean fold AUC per C tried
    reason: str | None = None  #: why the task was skipped, else None
    notes: tuple[str, ...] = ()  #: e.g. convergence warnings
    estimator: Any = field(default=None, repr=False)  #: sklearn Pipeline(StandardScaler, LogisticRegression)
    fraction: float = 1.0  #: share of the task's labelled training cases drawn (``draw_fraction``)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("estimator")
        return out


def _pipeline(c: float, max_iter: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline([("scale", StandardScaler()), ("logreg", LogisticRegression(C=c, max_iter=max_iter))])


def draw_fraction(y: np.ndarray, fraction: float, seed: int, task: str, min_per_class: int = 2) -> np.ndarray:
    """Sorted indices into ``y`` (n,) of 0/1 labels: a stratified share ``fraction`` of each class, at least
    ``min_per_class`` of each (as many as there are, if fewer), drawn by ``default_rng([seed, crc32(task)])``
    (module docstring). ``fraction=1`` returns every index."""
    import zlib

    if not 0 < fraction <= 1:
        raise ValueError(f"a label fraction must be in (0, 1], got {fraction}")
    if min_per_class < 1:
        raise ValueError(f"min_per_class must be at least 1, got {min_per_class}")
    y = np.asarray(y).reshape(-1)
    if fraction >= 1:
        return np.arange(len(y))
    rng = np.random.default_rng([int(seed), zlib.crc32(task.encode("utf-8"))])
    out = []
    for c in (1, 0):  # positives first: a fixed order, so the draw is reproducible
        idx = np.flatnonzero(y == c)
        take = min(len(idx), max(min_per_class, int(round(fraction * len(idx)))))
        out.append(rng.choice(idx, size=take, replace=False) if take < len(idx) else idx)
    return np.sort(np.concatenate(out))


def fit_linear_probe(x: np.ndarray, y: np.ndarray, *, folds: int = 5, cs: Sequence[float] = C_GRID, seed: int = 0,
                     max_iter: int = 2000) -> dict[str, Any]:
    """Fit one probe on training features ``x`` (n, D) and binary labels ``y`` (n,) (module docstring).

    Returns ``{"estimator", "C", "cv_auc", "cv_aucs", "n_pos", "n_neg", "reason", "notes"}``; ``estimator``
    is None, with ``reason``, when a class has fewer than ``folds`` cases."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if not cs or any(c <= 0 for c in cs):
        raise ValueError(f"the C grid must be non-empty and positive, got {list(cs)}")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y).astype(int).reshape(-1)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"x must be (n, D) and y (n,), got {x.shape} and {y.shape}")
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    out: dict[str, Any] = {"estimator": None, "C": None, "cv_auc": None, "cv_aucs": {}, "n_pos": n_pos,
                           "n_neg": n_neg, "reason": None, "notes": ()}
    if n_pos + n_neg != len(y):
        raise ValueError("labels must be 0 or 1")
    if min(n_pos, n_neg) < folds:
        out["reason"] = (f"too few training cases for {folds}-fold cross-validation: {n_pos} positives, {n_neg} "
                         f"negatives (need >= {folds} of each)")
        return out
    cs = sorted(float(c) for c in cs)
    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y))
    notes: set[str] = set()
    fold_aucs = np.zeros((len(splits), len(cs)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        for k, (tr, va) in enumerate(splits):
            scaler = StandardScaler().fit(x[tr])  # fitted inside the fold
            xt, xv = scaler.transform(x[tr]), scaler.transform(x[va])
            logreg = LogisticRegression(max_iter=max_iter, warm_start=True)  # along the C path, increasing
            for m, c in enumerate(cs):
                logreg.set_params(C=c).fit(xt, y[tr])
                fold_aucs[k, m] = roc_auc_score(y[va], logreg.decision_function(xv))
        best = int(np.argmax(fold_aucs.mean(0)))  # first maximum: the smallest C among ties
        estimator = _pipeline(cs[best], max_iter).fit(x, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        notes.add(f"lbfgs did not converge in {max_iter} iterations for some fit")
    out.update(estimator=estimator, C=cs[best], cv_auc=float(fold_aucs.mean(0)[best]),
               cv_aucs={f"{c:g}": float(v) for c, v in zip(cs, fold_aucs.mean(0))}, notes=tuple(sorted(notes)))
    return out


def fit_probe(emb: dict[str, Any], labels: np.ndarray, rows: Sequence[int], task_names: Sequence[str], *,
              readout: str = "anatomy", folds: int = 5, cs: Sequence[float] = C_GRID, seed: int = 0,
              max_iter: int = 2000, fraction: float = 1.0, min_per_class: int = 2,
              min_folds: int | None = None) -> list[ProbeFit]:
    """One :class:`ProbeFit` per task: ``labels`` (N, T) of ``emb``'s cases (NaN: unknown), ``rows`` (T,) each
    task's anatomy row (< 0: whole study), features per :func:`task_features` with ``readout``.

    ``fraction`` < 1: each task is fitted on :func:`draw_fraction` of its labelled training cases (seed
    ``seed``); ``min_folds``: the folds shrink to ``min(folds, positives, negatives)`` but not below it (None:
    always ``folds``, a task with fewer of a class is skipped)."""
    if min_folds is not None and not 2 <= min_folds <= folds:
        raise ValueError(f"min_folds must be in [2, folds={folds}], got {min_folds}")
    labels = np.asarray(labels, dtype=np.float64)
    n = len(emb["global_image_emb"])
    if labels.shape != (n, len(task_names)) or len(rows) != len(task_names):
        raise ValueError(f"labels must be (cases, tasks) = ({n}, {len(task_names)}) with a row per task, got "
                         f"{labels.shape} and {len(rows)} rows")
    fits = []
    for j, (name, row) in enumerate(zip(task_names, rows)):
        x, present = task_features(emb, int(row), readout)
        keep = present & np.isfinite(labels[:, j])
        features = "global" if (readout == "global" or row < 0) else "anatomy"
        if not keep.any():
            fits.append(ProbeFit(name, int(row), features, 0, 0, folds,
                                 reason="no training case with this anatomy and a label", fraction=float(fraction)))
            continue
        idx = np.flatnonzero(keep)
        if fraction < 1:
            idx = idx[draw_fraction(labels[idx, j], fraction, seed, name, min_per_class)]
        k = folds
        if min_folds is not None:
            n_pos, n_neg = int((labels[idx, j] == 1).sum()), int((labels[idx, j] == 0).sum())
            k = max(min_folds, min(folds, n_pos, n_neg))
        r = fit_linear_probe(x[idx], labels[idx, j], folds=k, cs=cs, seed=seed, max_iter=max_iter)
        fits.append(ProbeFit(name, int(row), features, r["n_pos"], r["n_neg"], k, r["C"], r["cv_auc"],
                             r["cv_aucs"], r["reason"], r["notes"], r["estimator"], float(fraction)))
    return fits


def probe_scores(fits: Sequence[ProbeFit], emb: dict[str, Any]) -> np.ndarray:
    """(N, T) float64 decision-function scores of ``emb``'s cases, a column per fit; NaN where the task's
    anatomy is masked and for skipped tasks."""
    n = len(emb["global_image_emb"])
    out = np.full((n, len(fits)), np.nan)
    for j, f in enumerate(fits):
        if f.estimator is None:
            continue
        x, present = task_features(emb, f.row, f.features)
        if present.any():
            out[present, j] = f.estimator.decision_function(np.asarray(x[present], dtype=np.float64))
    return out


def probe_metrics(tasks: Sequence[Any], labels: np.ndarray, scores: np.ndarray, cases: np.ndarray,
                  summary: dict[str, Any], n_boot: int, seed: int) -> dict[str, Any]:
    """Per-task probe AUC with its bootstrap interval on ``cases`` (bool mask), and the macro over the zero-shot
    macro's included tasks, overall and per anatomy (:func:`pipelines.evaluate.ceiling.ceiling_metrics`)."""
    from pipelines.evaluate.ceiling import ceiling_metrics

    return ceiling_metrics(tasks, labels, scores, cases, summary, n_boot, seed, description=DESCRIPTION)
