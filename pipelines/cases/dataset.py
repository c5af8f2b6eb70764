"""The cases of an ``fvlm preprocess`` output as samples for training and evaluation (:class:`CaseDataset`).

What a sample is (:class:`CaseDataset`, one case of ``index*.jsonl``): the CT crop with its anatomy map and,
for each of the A anatomies of the run's anatomy set (``preprocess.json``), the tokenised report text about
that anatomy (``case.json`` ``report.parsed.anatomies[name].text``; an anatomy the report never mentions has
the parser's normal text), its normal flag, its parsed task labels and a hash of its text; plus the whole
report, tokenised. Keys and shapes (B is added by the collate of :func:`pipelines.cases.loader.build_loader`):

==========================  ================  ====================================================
key                         shape, dtype      meaning
==========================  ================  ====================================================
``image``                   (C, Z, Y, X) f32  HU windowed to [0, 1], one channel per window (``windows_hu``,
                                              default the case's ``intensity.window_hu``: C = 1)
``anatomy``                 (Z, Y, X) i64     anatomy labels 0 (background) .. A
``input_ids``               (A, L) i64        each anatomy's text, ``[CLS] ... [SEP]`` + padding
``attention_mask``          (A, L) i64
``report_input_ids``        (L_r,) i64        the whole report (``report.text``), truncated
``report_attention_mask``   (L_r,) i64
``cut``                     (A,) bool         anatomy unusable in this crop (see below)
``normal``                  (A,) bool         ``report.parsed.anatomies[name].normal``
``text_id``                 (A,) i64          63-bit hash of the normalised anatomy text
``anatomy_labels``          (A, K) f32        parsed labels of the anatomy's tasks, catalog order,
                                              zero-padded to K = most tasks of one anatomy
``case_id``                 () i64            63-bit hash of the case id string
``index``                   () i64            dataset index
==========================  ================  ====================================================

``cut`` is True for an anatomy that is present but not usable whole: when this sample crops the volume
(``mode="crop"``, random in training, central in evaluation), one with less than ``min_visible_fraction``
(default 0.5) of its voxels inside the crop (the reference's rule). Truncation by the scan range or by the
preprocess crop (``case.json``'s ``cut_by_scan_boundary`` / ``cut_by_crop``) is metadata only: the report
describes what the scan shows, and a chest CT truncates the esophagus (and often a lung apex) every time.
Anatomies that ``case.json`` marks not present (fewer voxels than the preprocess ``min_voxels``) are erased
from the anatomy map (label 0), so the model sees them as absent, and are never ``cut``.

Modes (the view itself is :func:`pipelines.cases.view.case_view`, shared with ``fvlm predict``). ``crop``:
a crop of ``crop_size_zyx`` read from the memory-mapped ``image.npy``, padded centred with air
(``intensity.pad_hu``; anatomy 0) where the case is smaller. The crop origin is drawn uniformly among the
positions that keep the crop inside the volume, as MONAI's ``RandSpatialCrop`` with a random centre does; crop
and flips are one strided copy out of the memory map (only the crop's bytes are read; MONAI's ``RandFlipd`` on
the copied crop costs about 0.2 s per 112 x 256 x 352 sample, more than all the rest). Evaluation
(``train=False``) takes the central crop and never flips. ``resize``: the whole case resized to
``crop_size_zyx`` (trilinear image, ``nearest-exact`` anatomy map: both sample the same voxel centres), for tiny
CPU recipes where the whole torso must fit a 32 x 64 x 64-ish input.

Flips (:mod:`pipelines.cases.augment`): none by default. ``flip_axes`` names the axes to flip, each with
``flip_prob`` (one draw shared by image and anatomy). Axis 2 is the patient's left-right: with
``swap_laterality`` (default) a sample flipped in x has "right" and "left" exchanged in its anatomy texts and
report, so text and image agree. Head-foot (0) and front-back (1) flips are allowed but show the model torsos
that evaluation never shows.

Reproducibility: every random draw of item ``index`` in epoch ``epoch`` (crop origin in crop mode, then one
flip draw per axis of ``flip_axes``) comes from ``numpy.random.default_rng([seed, epoch, index])``, so the same
(seed, epoch, index) gives the same tensors in any process or worker. The epoch reaches the workers with
each index: :func:`pipelines.cases.loader.build_loader` feeds the dataset ``(epoch, index)`` pairs tagged
with the sampler's epoch (a plain ``int`` index uses ``dataset.epoch``, set by :meth:`CaseDataset.set_epoch`).

Cases without a report (``index.jsonl`` ``"report": false``) cannot train a contrastive model: they are
left out when the dataset is built, listed in ``dataset.skipped`` (case id, reason) and counted in one
warning. Label-only cases (``allow_label_only``, turned on by the dataset extras that allow it, e.g.
``label_text``): a case without a report but with ground-truth labels (``case.json`` ``labels``, from
preprocess ``--labels``, keyed by task name or title) is kept; its anatomy texts are empty (attention mask all
0), ``anatomy_labels`` are its ground-truth labels, ``normal`` is "no positive label", and the objectives
must leave its report-text pairs out (the ``has_report`` field of those extras). A case whose ``case.json``
holds a report but no parsed per-anatomy texts (a preprocess run
without a report parser preset) is an error: the whole run is checked at start (``preprocess.json``
``report_parser_preset``), and a single such case raises :class:`DataError` when it is loaded.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipelines.cases.augment import LATERAL_AXIS, swap_laterality
from pipelines.cases.format import (
    DataError,
    load_packed,
    read_case,
    read_index,
    read_run,
    run_anatomy_names,
    run_task_names,
)
from pipelines.cases.hashing import stable_hash63, text_id
from pipelines.cases.view import as_windows, case_view

#: Exactly the keys of one sample (and of a collated batch).
SAMPLE_KEYS = (
    "image", "anatomy", "input_ids", "attention_mask", "report_input_ids", "report_attention_mask",
    "cut", "normal", "text_id", "anatomy_labels", "case_id", "index",
)
MODES = ("crop", "resize")

#: Bytes of resized cases each CaseDataset (each loader process) keeps in resize mode.
RESIZE_CACHE_BYTES = 2 * 1024**3


# ------------------------------------------------------------------------------------------------- config


@dataclass
class DataConfig:
    """The checked options of a :class:`CaseDataset` (a training recipe's ``data`` section sets them)."""

    mode: str = "crop"
    crop_size_zyx: tuple[int, int, int] = (112, 256, 352)
    flip_axes: tuple[int, ...] = ()
    flip_prob: float = 0.5
    swap_laterality: bool = True
    min_visible_fraction: float = 0.5
    max_text_len: int = 128
    report_max_len: int | None = None
    workers: int = 4
    pin_memory: bool = False

    def __post_init__(self) -> None:
        self.crop_size_zyx = tuple(int(v) for v in self.crop_size_zyx)  # type: ignore[assignment]
        self.flip_axes = tuple(int(v) for v in self.flip_axes)
        if self.mode not in MODES:
            raise DataError(f"data mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if len(self.crop_size_zyx) != 3 or min(self.crop_size_zyx) < 1:
            raise DataError(f"crop_size_zyx must be three positive sizes (z, y, x), got {self.crop_size_zyx}")
        if any(a not in (0, 1, 2) for a in self.flip_axes) or len(set(self.flip_axes)) != len(self.flip_axes):
            raise DataError(f"flip_axes must be distinct spatial axes 0 (z), 1 (y), 2 (x), got {self.flip_axes}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise DataError(f"flip_prob must lie in [0, 1], got {self.flip_prob}")
        if not 0.0 <= self.min_visible_fraction <= 1.0:
            raise DataError(f"min_visible_fraction must lie in [0, 1], got {self.min_visible_fraction}")
        if self.max_text_len < 2 or (self.report_max_len is not None and self.report_max_len < 2):
            raise DataError("max_text_len and report_max_len must be at least 2 ([CLS] and [SEP])")
        if self.workers < 0:
            raise DataError(f"workers must be >= 0, got {self.workers}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}



# ---------------------------------------------------------------------------------------------- the dataset


class CaseDataset(Dataset):
    """The cases of an ``fvlm preprocess`` output as training samples (module docstring: keys, modes, cut).

    Args:
        data_dir: the preprocess OUT folder (``index*.jsonl``, ``preprocess.json``, ``cases/``).
        tokenizer: a ``transformers`` tokenizer (``fvlm.model.tokenizer.train_wordpiece`` / ``load_tokenizer``).
        crop_size_zyx: model input size (z, y, x).
        mode: ``crop`` or ``resize``.
        train: random crop and flips (True) or central crop / plain resize (False).
        max_text_len: token length L of each anatomy text; ``report_max_len`` (default the same) of the report.
        seed: the data seed; item randomness is ``default_rng([seed, epoch, index])``.
        flip_axes, flip_prob: random flips in training, each axis independently with ``flip_prob`` (default:
            none; module docstring).
        swap_laterality: exchange right/left in the texts of a sample flipped in x (axis 2).
        min_visible_fraction: in crop mode, an anatomy with less of its voxels inside the crop is ``cut``.
        extras: names of dataset extras (``pipelines.train.extras``) that add fields to every sample (the
            model heads' ``data_extras``); each draws from ``default_rng([seed, epoch, index, hash(name)])``.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        tokenizer: Any,
        *,
        crop_size_zyx: Sequence[int],
        mode: str = "crop",
        train: bool = True,
        max_text_len: int = 128,
        report_max_len: int | None = None,
        seed: int = 0,
        flip_axes: Sequence[int] = (),
        flip_prob: float = 0.5,
        swap_laterality: bool = True,
        min_visible_fraction: float = 0.5,
        extras: Sequence[str] = (),
        allow_label_only: bool = False,
        windows_hu: Sequence[Sequence[float]] | None = None,
    ) -> None:
        self._extras: list[tuple[str, Any]] = []
        if extras:  # the registry of the training extras, only when asked for
            from pipelines.train.extras import get_extra

            self._extras = [(name, get_extra(name)) for name in dict.fromkeys(extras)]
        # label-only cases (module docstring): on request, or when an extra can use them (``label_text``)
        self.allow_label_only = bool(allow_label_only) or any(
            getattr(p, "allows_label_only", False) for _, p in self._extras)
        cfg = DataConfig(mode=mode, crop_size_zyx=tuple(crop_size_zyx), flip_axes=tuple(flip_axes),
                         flip_prob=flip_prob, swap_laterality=swap_laterality, min_visible_fraction=min_visible_fraction,
                         max_text_len=max_text_len, report_max_len=report_max_len)
        self.data_dir = Path(data_dir)
        self.tokenizer = tokenizer
        self.mode, self.train, self.seed = cfg.mode, bool(train), int(seed)
        self.crop_size_zyx: tuple[int, int, int] = cfg.crop_size_zyx  # type: ignore[assignment]
        self.flip_axes, self.flip_prob, self.swap_laterality = cfg.flip_axes, cfg.flip_prob, cfg.swap_laterality
        self.min_visible_fraction = cfg.min_visible_fraction
        # the model's input windows (``vision.input_windows_hu``); None: the case's preprocess window, 1 channel
        self.windows_hu = as_windows(windows_hu) if windows_hu is not None else None
        self.max_text_len = cfg.max_text_len
        self.report_max_len = cfg.report_max_len or cfg.max_text_len
        self.epoch = 0
        # resize mode: the resized case is the same every epoch (only the flips are random), so each
        # process keeps it: (img float32, anat uint8) per index, up to RESIZE_CACHE_BYTES
        self._resized: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._text_cache: dict[tuple[int, bool], tuple] = {}  # (index, swapped) -> tokens, flags, labels, ids
        if tokenizer is None:
            raise DataError("CaseDataset needs a tokenizer (fvlm.model.tokenizer.load_tokenizer / train_wordpiece)")

        rows = read_index(self.data_dir)
        self.run = read_run(self.data_dir)
        self.anatomy_names = run_anatomy_names(self.run)
        self.skipped: list[tuple[str, str]] = []
        self.rows: list[dict] = []
        for row in rows:
            if row.get("report") is False and not (self.allow_label_only and row.get("labels")):
                self.skipped.append((row["case_id"], "no report: cannot pair image and text"))
            else:
                self.rows.append(row)
        if self.skipped:
            warnings.warn(f"{self.data_dir}: {len(self.skipped)} of {len(rows)} case(s) have no report and are "
                          "left out (listed in dataset.skipped)", stacklevel=2)
        if not self.rows:
            raise DataError(f"{self.data_dir}: no case with a report to train on ({len(rows)} case(s) in the index)")
        if not self.run.get("report_parser_preset"):
            raise DataError(
                f"{self.data_dir}/preprocess.json: the run parsed no report (no report parser preset for anatomy "
                f"set {self.run.get('anatomy_set')!r}); per-anatomy texts are needed: preprocess with an anatomy "
                "set that has a preset in configs/reports/ (fvlm15, ct-rate4)"
            )
        missing = [r["case_id"] for r in self.rows if not (self.data_dir / r["image"]).is_file()
                   or not (self.data_dir / r["anatomy"]).is_file()]
        if missing:
            raise DataError(f"{self.data_dir}: {len(missing)} case(s) of the index lack image/anatomy files "
                            f"(first: cases/{missing[0]}); re-run `fvlm preprocess` on the same OUT to redo them")
        self.task_names = run_task_names(self.run, self.anatomy_names, self.data_dir, self.rows)
        self.max_tasks = max(1, max(len(t) for t in self.task_names))

    # -- public helpers
    @property
    def num_anatomies(self) -> int:
        return len(self.anatomy_names)

    @property
    def case_ids(self) -> list[str]:
        return [r["case_id"] for r in self.rows]

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for plain ``int`` indices (the loader of :func:`pipelines.cases.loader.build_loader` passes
        it with each index)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def case_json(self, i: int) -> dict:
        row = self.rows[i]
        return read_case(self.data_dir, row["case_id"])

    # -- pieces
    def _load_arrays(self, row: dict) -> tuple[np.ndarray, np.ndarray]:
        try:
            return load_packed(self.data_dir, row, mmap=True)
        except FileNotFoundError as e:
            raise DataError(f"{self.data_dir}/cases/{row['case_id']}: missing {Path(e.filename or '').name or 'array'};"
                            " re-run `fvlm preprocess` on the same OUT to redo the case") from e
        except (OSError, ValueError) as e:
            raise DataError(f"{self.data_dir}/cases/{row['case_id']}: cannot read the arrays: {e}") from e

    def _label_only_entries(self, labels: dict) -> dict[str, dict]:
        """Per anatomy of a label-only case: no text, its ground-truth labels (columns by task name or
        title, e.g. ``lung_nodule`` or ``Lung nodule``), normal when none is positive."""
        by_key = {re.sub(r"[^a-z0-9]+", "_", str(k).lower()).strip("_"): v for k, v in labels.items()}
        out = {}
        for k, name in enumerate(self.anatomy_names):
            lab = {t: by_key.get(t) for t in self.task_names[k]}
            positive = any(v is not None and float(v) > 0.5 for v in lab.values())
            out[name] = {"text": "", "normal": not positive, "labels": lab}
        return out

    def _tokens(self, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=length,
                             return_attention_mask=True)
        return (torch.tensor(enc["input_ids"], dtype=torch.int64),
                torch.tensor(enc["attention_mask"], dtype=torch.int64))

    def case_window(self, case: dict) -> tuple[float, float]:
        """The case's preprocess training window ``(lo, hi)`` HU (``case.json`` ``intensity.window_hu``, else
        the run's ``preprocess.json``): the one input channel when the model names no windows."""
        lo, hi = (case.get("intensity") or {}).get("window_hu") or self.run["preprocess"]["window_hu"]
        return float(lo), float(hi)

    def image_view(self, index: int, case: dict, rng: np.random.Generator | None
                   ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """One view of case ``index``: (image (C, Z, Y, X) f32 in [0, 1], anatomy (Z, Y, X), cut (A,) bool),
        cropped / resized and flipped with the draws of ``rng`` (None: central crop, no flips)."""
        img, anat, cut, _ = self._view(index, case, rng)
        return img, anat, cut

    def _view(self, index: int, case: dict, rng: np.random.Generator | None
              ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, tuple[bool, bool, bool]]:
        """:meth:`image_view` and the flips it drew (per axis z, y, x): :func:`pipelines.cases.view.case_view`
        of the case's arrays (memory-mapped) and ``case.json`` stats; resize mode keeps each resized case."""
        window_hu = self.windows_hu or self.case_window(case)
        pad_hu = (case.get("intensity") or {}).get("pad_hu", self.run["preprocess"].get("pad_hu", -1024))
        # resize mode: the resized case is the same every epoch (only the flips are random), so it is kept
        cached = self._resized.get(index) if self.mode == "resize" else None
        image_np, anat_np = self._load_arrays(self.rows[index]) if cached is None else (None, None)
        view = case_view(image_np, anat_np, case.get("anatomies") or [], self.anatomy_names, self.crop_size_zyx,
                         mode=self.mode, window_hu=window_hu, pad_hu=pad_hu, rng=rng, flip_axes=self.flip_axes,
                         flip_prob=self.flip_prob, min_visible_fraction=self.min_visible_fraction, resized=cached)
        if cached is None and view.resized is not None:
            img, anat = view.resized
            if (len(self._resized) + 1) * (img.numel() * 4 + anat.numel()) <= RESIZE_CACHE_BYTES:
                self._resized[index] = view.resized
        return view.image, view.anatomy, view.cut, view.flips

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        if isinstance(item, (tuple, list)):
            epoch, index = int(item[0]), int(item[1])
        else:
            epoch, index = self.epoch, int(item)
        if not 0 <= index < len(self.rows):
            raise IndexError(f"index {index} out of range for {len(self.rows)} cases")
        row = self.rows[index]
        cid = row["case_id"]
        case = self.case_json(index)
        report = case.get("report") or {}
        parsed = report.get("parsed")
        if not report and self.allow_label_only and isinstance(case.get("labels"), dict):
            parsed = {"anatomies": self._label_only_entries(case["labels"])}  # empty texts, ground-truth labels
        if not isinstance(parsed, dict) or not isinstance(parsed.get("anatomies"), dict):
            raise DataError(f"{self.data_dir}/cases/{cid}/case.json: the report has no parsed per-anatomy texts; "
                            "re-run `fvlm preprocess` with reports and a report parser preset")
        rng = np.random.default_rng([self.seed, epoch, index]) if self.train else None
        img, anat, cut, flips = self._view(index, case, rng)
        a = self.num_anatomies
        # a sample mirrored left-right reads its texts with right and left exchanged (module docstring)
        swapped = bool(flips[LATERAL_AXIS] and self.swap_laterality)
        side = swap_laterality if swapped else (lambda t: t)

        if (index, swapped) not in self._text_cache:  # the texts of a case never change: tokenize once
            texts, normal, labels = [], np.zeros(a, dtype=bool), np.zeros((a, self.max_tasks), dtype=np.float32)
            for k, name in enumerate(self.anatomy_names):
                entry = parsed["anatomies"].get(name) or {}
                texts.append(side(str(entry.get("text") or "")))
                normal[k] = bool(entry.get("normal", False))
                lab = entry.get("labels") or {}
                for t, task in enumerate(self.task_names[k]):
                    v = lab.get(task, 0)
                    labels[k, t] = float(v) if v is not None else 0.0
            ids, mask = self._tokens(texts, self.max_text_len)
            if not report:  # a label-only case: no text, nothing to attend
                mask.zero_()
            rids, rmask = self._tokens([side(str(report.get("text") or ""))], self.report_max_len)
            if not report:
                rmask.zero_()
            tids = torch.tensor([text_id(t) for t in texts], dtype=torch.int64)
            self._text_cache[(index, swapped)] = (ids, mask, rids, rmask, normal, labels, tids)
        ids, mask, rids, rmask, normal, labels, tids = (
            v.clone() if isinstance(v, torch.Tensor) else v.copy() for v in self._text_cache[(index, swapped)])
        sample = {
            "image": img.to(torch.float32).contiguous(),  # (C, Z, Y, X)
            "anatomy": anat.to(torch.int64).contiguous(),
            "input_ids": ids,
            "attention_mask": mask,
            "report_input_ids": rids[0],
            "report_attention_mask": rmask[0],
            "cut": torch.from_numpy(cut),
            "normal": torch.from_numpy(normal),
            "text_id": tids,
            "anatomy_labels": torch.from_numpy(labels),
            "case_id": torch.tensor(stable_hash63(cid), dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
        }
        for name, produce in self._extras:
            # each extra draws from its own stream, so turning one on never changes the base sample's draws
            xrng = np.random.default_rng([self.seed, epoch, index, stable_hash63(name)]) if self.train else None
            for key, value in produce(self, index, sample, case, xrng).items():
                if key in sample:
                    raise RuntimeError(f"dataset extra {name!r} produced {key!r}, which the sample already has")
                sample[key] = value
        return sample

    @classmethod
    def from_config(cls, data_dir: str | os.PathLike, tokenizer: Any, cfg: DataConfig, *, train: bool = True,
                    seed: int = 0) -> "CaseDataset":
        return cls(data_dir, tokenizer, crop_size_zyx=cfg.crop_size_zyx, mode=cfg.mode, train=train,
                   max_text_len=cfg.max_text_len, report_max_len=cfg.report_max_len, seed=seed,
                   flip_axes=cfg.flip_axes, flip_prob=cfg.flip_prob, swap_laterality=cfg.swap_laterality,
                   min_visible_fraction=cfg.min_visible_fraction)


def truncated_text_shares(dataset: CaseDataset, cases: int = 200) -> dict[str, tuple[float, int]]:
    """Per anatomy: (share of its texts longer than ``dataset.max_text_len`` tokens, longest in tokens), over
    the first ``cases`` cases. A text longer than the limit loses its end, where reports often put the
    finding (a lung text walks airways, parenchyma, pleura), so a high share is a signal-path error."""
    out: dict[str, tuple[float, int]] = {}
    texts: dict[str, list[str]] = {n: [] for n in dataset.anatomy_names}
    for i in range(min(cases, len(dataset))):
        parsed = ((dataset.case_json(i).get("report") or {}).get("parsed") or {}).get("anatomies") or {}
        for n in dataset.anatomy_names:
            t = str((parsed.get(n) or {}).get("text") or "")
            if t:
                texts[n].append(t)
    for n, ts in texts.items():
        if ts:
            lengths = [len(ids) for ids in dataset.tokenizer(ts, truncation=False, verbose=False)["input_ids"]]
            out[n] = (sum(k > dataset.max_text_len for k in lengths) / len(lengths), max(lengths))
    return out
