"""Evaluation windows around each anatomy (docs/architecture.md#zero-shot: "evaluation crops a window around
each anatomy").

For every anatomy present in a case, one window of the model's input size (z, y, x) centred on that anatomy's
bounding box (computed from the case's ``anatomy.npy``), shifted to lie inside the case where the case is
larger than the window, and padded with air (the case's ``pad_hu``) where the case is smaller. Windows with
the same origin are evaluated once. In a window, an anatomy *counts* when at least ``min_inside`` (default
0.5) of its voxels lie inside; otherwise it is passed to the model as cut, so its embedding is masked.
Truncation by the scan range is metadata, as in training (``pipelines.cases.view``).

Scores of a case (``score_case_windows``):

* a task bound to an anatomy: the mean of its zero-shot probability over the windows in which that anatomy
  counts. Usually that is only its own window, but a neighbour's window that holds most of the anatomy too
  (e.g. the heart inside the lung window) adds its score to the mean. No window in which it counts: NaN.
* a whole-study task: the global image embedding averaged over all windows of the case (and L2-renormalised),
  then scored once.
* with the global readout (``readout="global"``, whole-scan recipes such as ``clip``): every task from that
  window-averaged global embedding, NaN where the anatomy readout is NaN (the same cases).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pipelines.cases.view import windows


@dataclass
class CaseWindows:
    """The windows of one case: inputs for ``FVLM.encode_image`` and what each window is for."""

    image: torch.Tensor  #: (W, C, Z, Y, X) float in [0, 1], one channel per input window
    anatomy: torch.Tensor  #: (W, Z, Y, X) int64 labels
    cut: torch.Tensor  #: (W, A) bool: present anatomies that do not count in the window
    origins: list[tuple[int, int, int]]  #: window origin (z, y, x) in case voxels (may be negative: padded)
    centred_on: list[list[str]]  #: the anatomies each window was centred on


def anatomy_boxes(labels: np.ndarray, n: int) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
    """label -> (lo, hi inclusive, voxel count) for labels 1..n present in ``labels`` (one pass over the array)."""
    flat = np.asarray(labels).reshape(-1)
    idx = np.flatnonzero((flat > 0) & (flat <= n))
    if idx.size == 0:
        return {}
    lab = flat[idx]
    order = np.argsort(lab, kind="stable")
    lab, idx = lab[order], idx[order]
    coords = np.stack(np.unravel_index(idx, labels.shape), axis=1)
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    lo = np.minimum.reduceat(coords, starts, axis=0)
    hi = np.maximum.reduceat(coords, starts, axis=0)
    counts = np.diff(np.r_[starts, lab.size])
    return {int(lab[s]): (lo[i], hi[i], int(counts[i])) for i, s in enumerate(starts)}


def window_origin(lo: np.ndarray, hi: np.ndarray, shape: Sequence[int], size: Sequence[int]) -> tuple[int, int, int]:
    """Origin of a ``size`` window centred on the box [lo, hi], moved inside ``shape`` where the case allows;
    an axis shorter than the window is centred on the case (padded on both sides)."""
    out = []
    for l, h, s, c in zip(lo, hi, shape, size):
        if s <= c:
            out.append(-((c - s) // 2))
        else:
            centre = (int(l) + int(h) + 1) // 2
            out.append(int(min(max(centre - c // 2, 0), s - c)))
    return tuple(out)  # type: ignore[return-value]


def _extract(arr: np.ndarray, origin: Sequence[int], size: Sequence[int], fill: float, dtype) -> np.ndarray:
    out = np.full(tuple(size), fill, dtype=dtype)
    src, dst = [], []
    for o, c, s in zip(origin, size, arr.shape):
        a, b = max(o, 0), min(o + c, s)
        src.append(slice(a, b))
        dst.append(slice(a - o, b - o))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def case_windows(ds: Any, index: int, size_zyx: Sequence[int], min_inside: float = 0.5) -> CaseWindows | None:
    """The windows of case ``index`` of a ``CaseDataset`` (None when no anatomy is present)."""
    row = ds.rows[index]
    case = ds.case_json(index)
    names = list(ds.anatomy_names)
    a = len(names)
    stats = {s.get("name"): s for s in case.get("anatomies") or []}
    wins = ds.windows_hu or (ds.case_window(case),)
    pad_hu = float((case.get("intensity") or {}).get("pad_hu", ds.run["preprocess"].get("pad_hu", -1024)))
    present = np.array([bool((stats.get(n) or {}).get("present")) for n in names])
    image_np, anat_np = ds._load_arrays(row)
    lab_full = np.asarray(anat_np)
    lut = np.zeros(256, dtype=np.uint8)
    lut[1:a + 1] = np.where(present, np.arange(1, a + 1), 0)
    if not present.all():
        lab_full = lut[lab_full]
    boxes = anatomy_boxes(lab_full, a)
    if not boxes:
        return None
    size = tuple(int(s) for s in size_zyx)
    by_origin: dict[tuple[int, int, int], list[str]] = {}
    for k in sorted(boxes):
        lo, hi, _ = boxes[k]
        by_origin.setdefault(window_origin(lo, hi, lab_full.shape, size), []).append(names[k - 1])
    totals = np.zeros(a)
    for k, (_, _, cnt) in boxes.items():
        totals[k - 1] = cnt
    imgs, anats, cuts = [], [], []
    for origin in by_origin:
        img = _extract(image_np, origin, size, pad_hu, np.float32)
        lab = _extract(lab_full, origin, size, 0, lab_full.dtype)
        inside = np.bincount(lab.reshape(-1), minlength=a + 1)[1:a + 1]
        frac = np.divide(inside, totals, out=np.zeros(a), where=totals > 0)
        cuts.append(torch.from_numpy(present & (frac < min_inside)))
        imgs.append(windows(img, wins))  # (C, Z, Y, X)
        anats.append(torch.from_numpy(lab.astype(np.int64)))
    return CaseWindows(torch.stack(imgs), torch.stack(anats), torch.stack(cuts), list(by_origin),
                       list(by_origin.values()))


def dataset_window_scores(dataset: Any, size_zyx: Sequence[int], min_inside: float, n_tasks: int,
                          score_case: Callable[[CaseWindows], np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """(N, T) scores of every case of ``dataset`` from its windows, and the number of windows per case:
    ``score_case(windows)`` gives a case's (T,) scores; a case with no anatomy present has no window and a NaN
    row (never 0). The loop that ``fvlm evaluate``'s pooled path and every recipe scorer share."""
    out, n_windows = [], []
    for i in range(len(dataset)):
        cw = case_windows(dataset, i, size_zyx, min_inside)
        if cw is None:
            out.append(np.full(n_tasks, np.nan))
            n_windows.append(0)
            continue
        out.append(score_case(cw))
        n_windows.append(int(cw.image.shape[0]))
    return (np.stack(out) if out else np.zeros((0, n_tasks))), n_windows


def combine_window_scores(window_scores: np.ndarray, bank: Any, global_scores: np.ndarray) -> np.ndarray:
    """(T,) case scores from (W, T) per-window scores (NaN where the anatomy does not count in the window):
    anatomy tasks the mean over windows where they have a score; whole-study tasks from ``global_scores``
    (T,), the score of the window-averaged global embedding."""
    w = np.asarray(window_scores, dtype=np.float64)
    n = (~np.isnan(w)).sum(0)
    mean = np.divide(np.nansum(w, 0), n, out=np.full(w.shape[1], np.nan), where=n > 0)
    whole = np.array([i < 0 for i in bank.anatomy_index], dtype=bool)
    mean[whole] = np.asarray(global_scores, dtype=np.float64)[whole]
    return mean


@torch.no_grad()
def encode_case_windows(model: Any, cw: CaseWindows, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """``FVLM.encode_image`` of one case's windows, concatenated: ``image_emb`` (W, A, D), ``anatomy_mask``
    (W, A) (the anatomy counts in the window) and ``global_image_emb`` (W, D), float32 on the model's device."""
    device = next(model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {"image_emb": [], "anatomy_mask": [], "global_image_emb": []}
    for s in range(0, cw.image.shape[0], batch_size):
        enc = model.encode_image(cw.image[s:s + batch_size].to(device), cw.anatomy[s:s + batch_size].to(device),
                                 cw.cut[s:s + batch_size].to(device))
        for k, v in parts.items():
            v.append(enc[k].float() if k != "anatomy_mask" else enc[k].bool())
    return {k: torch.cat(v) for k, v in parts.items()}


def window_global(global_image_emb: torch.Tensor) -> torch.Tensor:
    """(1, D) the case's global embedding: the windows' global embeddings (W, D) averaged, L2-renormalised."""
    return torch.nn.functional.normalize(global_image_emb.float().mean(0, keepdim=True), dim=-1)


@torch.no_grad()
def score_case_windows(model: Any, cw: CaseWindows, bank: Any, logit_scale: float, batch_size: int = 4,
                       readout: str = "anatomy") -> tuple[np.ndarray, np.ndarray]:
    """(case scores (T,), per-window anatomy-readout scores (W, T)) of one case's windows.

    ``readout="global"``: every task is scored from the case's window-averaged global embedding (as whole-study
    tasks always are), on the same cases as the anatomy readout: NaN where its anatomy counts in no window."""
    from fvlm.zeroshot import score_cases

    if readout not in ("anatomy", "global"):
        raise ValueError(f"readout must be anatomy or global, got {readout!r}")
    enc = encode_case_windows(model, cw, batch_size)
    per_w = score_cases(enc["image_emb"], enc["anatomy_mask"], bank, logit_scale, enc["global_image_emb"])
    g = window_global(enc["global_image_emb"])  # (1, D)
    a = cw.cut.shape[1]
    if readout == "global":  # every anatomy row is the global embedding, every anatomy counts
        rows, mask = g.unsqueeze(1).expand(1, a, g.shape[-1]), torch.ones(1, a, dtype=torch.bool, device=g.device)
    else:  # only whole-study tasks read the global embedding
        rows, mask = torch.zeros(1, a, g.shape[-1], device=g.device), torch.zeros(1, a, dtype=torch.bool,
                                                                                 device=g.device)
    glob = score_cases(rows, mask, bank, logit_scale, g)[0]  # (T,)
    combined = combine_window_scores(per_w, bank, glob)
    if readout == "global":
        combined = np.where(np.isnan(combined), np.nan, glob)
    return combined, per_w
