"""``fvlm preprocess`` orchestration: discover -> plan (case ids, shard, joins) -> process cases -> tables.

One input series is one job. A job loads the volume (``volume.load_volume`` or the CT-RATE loader; both check
the file's integrity and fail NaN/inf voxels first, :mod:`pipelines.preprocess.integrity`), passes
it through the HU plausibility gate (``hu_check.gate_volume``, mode ``--hu-check fail|warn|off``: a volume
that does not hold plausible HU of a body fails its case, or is kept with a warning), gets its label map from
the segmenter, crops (``crop.crop_case``) and writes the case (``output.write_case``); the gate's measurements
go into ``case.json`` under ``intensity.hu_check`` (and into the manifest line of a case it failed).
A job never raises: whatever goes wrong becomes a ``failed`` manifest line with the reason, and the run
goes on. Series that discovery left out are ``skipped`` lines.

Resume: a case whose ``case.json`` is complete and names the same source (salted hash) is not redone;
its manifest line is the one stored with it, so a resumed run writes the same files as an uninterrupted
one. Failed cases are retried.

Locks: a run holds ``OUT/.lock`` (``OUT/.lock.shard-I-of-K`` for a shard) while it works: a second run of the
same shard into OUT is refused; shards of one job (different ``--shard-index``) write one OUT together.

Shards: job ``j`` belongs to shard ``int(sha256(source), 16) % num_shards`` (unsalted, so every machine
agrees without sharing a salt file first); skipped series are sharded the same way.

De-identification: case ids are ``c`` + 15 hex digits of ``sha256(salt | StudyInstanceUID)`` (the NIfTI
file stem for NIfTI input), or the match key itself (``case_id="key"``, for pseudonymous data), or looked
up in a user table. The salt is ``--salt`` or a random one generated once into ``OUT/.salt`` (exclusive create).
Match keys, UIDs, accession numbers and paths are never written to OUT or logged; reasons are scrubbed of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anatomy.catalog import AnatomySet, load_anatomy_set
from pipelines.atomic import FolderLock, FolderLocked, create_exclusive, folder_flock, live_locks
from pipelines.preprocess.crop import CropConfig, crop_case, load_crop_config
from pipelines.preprocess.ctrate import CTRATE_VERSIONS
from pipelines.preprocess.discover import Discovery, discover
from pipelines.preprocess.hu_check import HU_CHECK_MODES, HUCheckError, gate_volume
from pipelines.cases.format import (
    dumps,
    index_row,
    read_complete_case,
    shard_suffix,
    write_case,
    write_jsonl_atomic,
    write_text_atomic,
)
from pipelines.preprocess.segment import Segmenter, create_segmenter
from pipelines.preprocess.series import SeriesRef, SkippedSeries
from pipelines.preprocess.tables import (
    Table,
    TableSpec,
    labels_of,
    normalise_key,
    parse_report_sections,
    read_case_id_table,
    read_table,
    report_of,
    report_preset_for,
)

log = logging.getLogger(__name__)

MATCH_KEYS = ("folder", "study_uid", "accession")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class PreprocessConfig:
    """Everything one ``fvlm preprocess`` run needs (the CLI fills it)."""

    input: Path
    out: Path
    anatomy: str = "fvlm15"
    """Anatomy set preset or YAML path."""
    crop: str = "default"
    """Preprocessing parameters: ``configs/preprocess/<name>.yaml`` or a YAML path."""
    segmenter: str = "masks"
    segmenter_options: dict[str, Any] = field(default_factory=dict)
    reports: TableSpec | None = None
    labels: TableSpec | None = None
    match_key: str = "folder"
    case_id: str = "hash"
    """``hash`` (salted hash of the study UID), ``key`` (the match key) or a CSV path (key -> case id)."""
    salt: str | None = None
    write_key_map: Path | None = None
    workers: int = 1
    shard_index: int = 0
    num_shards: int = 1
    series_rule: str = "most_slices_thinnest"
    series_uid: str | None = None
    max_gap_slices: int = 1
    ct_rate_metadata: Path | None = None
    ct_rate_version: str = "auto"
    """CT-RATE release: ``1`` (raw stored values: apply the metadata rescale), ``2`` (HU: never apply it) or
    ``auto`` (decide per volume from the intensities; :mod:`pipelines.preprocess.ctrate`)."""
    hu_check: str = "fail"
    """HU plausibility gate: ``fail`` (an implausible volume is a failed case), ``warn`` (kept, logged and
    recorded) or ``off``."""
    fill_nonfinite: float | None = None
    """HU that NaN/inf voxels become (noted in ``case.json``); None: such a volume is a failed case."""
    pack: str = "npy"
    progress: bool = True
    overwrite: bool = False
    """When OUT was made with other case-shaping options: delete its cases and tables and start afresh (with the
    same options a run resumes either way)."""

    def __post_init__(self) -> None:
        self.input, self.out = Path(self.input), Path(self.out)
        if self.match_key not in MATCH_KEYS:
            raise ValueError(f"--match-key must be one of {', '.join(MATCH_KEYS)}, got {self.match_key!r}")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"--shard-index must lie in [0, --num-shards), got {self.shard_index} of {self.num_shards}")
        if self.hu_check not in HU_CHECK_MODES:
            raise ValueError(f"--hu-check must be one of {', '.join(HU_CHECK_MODES)}, got {self.hu_check!r}")
        if str(self.ct_rate_version) not in CTRATE_VERSIONS:
            raise ValueError(f"--ct-rate-version must be one of {', '.join(CTRATE_VERSIONS)}, "
                             f"got {self.ct_rate_version!r}")
        self.ct_rate_version = str(self.ct_rate_version)
        if self.case_id not in ("hash", "key") and not Path(self.case_id).is_file():
            raise ValueError(f"--case-id must be hash, key or a CSV file (key, case id), got {self.case_id!r}")
        if self.out.resolve() == self.input.resolve() or self.input.resolve() in self.out.resolve().parents:
            raise ValueError("OUT must not lie inside INPUT (its files would be read as input next time)")


@dataclass
class Job:
    """One selected series and what the run joined to it (built in the main process)."""

    ref: SeriesRef
    case_id: str | None
    key: str | None
    source: str
    report: dict | None = None
    labels: dict | None = None
    error: str | None = None
    """Set when the job fails before any image work (bad case id, unreadable report row, ...)."""
    report_requested: bool = False
    labels_requested: bool = False


@dataclass
class Context:
    """What every job needs; pickled once into each worker process."""

    out: Path
    anatomy_set: AnatomySet
    crop: CropConfig
    segmenter: Segmenter
    loader: Any
    pack: str
    scrub_terms: tuple[str, ...]
    key_is_id: bool
    report_preset: str | None = None
    hu_check: str = "fail"
    """Mode of the HU plausibility gate (:data:`pipelines.preprocess.hu_check.HU_CHECK_MODES`)."""


class DefaultLoader:
    """DICOM series and NIfTI files through :func:`pipelines.preprocess.volume.load_volume`."""

    def __init__(self, max_gap_slices: int = 1, fill_nonfinite: float | None = None) -> None:
        self.max_gap_slices = max_gap_slices
        self.fill_nonfinite = fill_nonfinite

    def load(self, ref: SeriesRef):
        from pipelines.preprocess.volume import load_volume

        return load_volume(ref, max_gap_slices=self.max_gap_slices, fill_nonfinite=self.fill_nonfinite)


@dataclass
class Summary:
    ok: int = 0
    reused: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.ok} ok ({self.reused} from an earlier run), {self.failed} failed, {self.skipped} skipped "
                f"in {self.seconds:.1f} s")


# ------------------------------------------------------------------------------------------ identifiers


def unsalted_hash(basis: str) -> str:
    return hashlib.sha256(basis.encode()).hexdigest()


def load_salt(cfg: PreprocessConfig) -> str:
    """``--salt``, or ``OUT/.salt``, created once with an exclusive create (shards started together agree)."""
    if cfg.salt:
        return cfg.salt
    path = cfg.out / ".salt"
    create_exclusive(path, secrets.token_hex(16) + "\n", 0o600)  # False: another run made it first
    salt = path.read_text(encoding="utf-8").strip()
    if not salt:
        raise ValueError(f"{path} is empty; restore it from a backup (the case ids of OUT depend on it) or "
                         "preprocess into a new OUT")
    return salt


def _skipped_basis(s: SkippedSeries) -> str:
    return s.series_uid or f"{s.folder_key}|{s.reason}"


def _ref_basis(ref: SeriesRef) -> str:
    return ref.series_uid or str(sorted(ref.files)[0])


def in_shard(basis: str, cfg: PreprocessConfig) -> bool:
    return int(unsalted_hash(basis), 16) % cfg.num_shards == cfg.shard_index


# ----------------------------------------------------------------------------------------------- plan


def plan_jobs(cfg: PreprocessConfig, found: Discovery, salt: str, anatomy_set: AnatomySet) -> tuple[list[Job], list[dict]]:
    """Case ids, joins and shard filter; returns the jobs and the skipped-series manifest lines."""
    reports = read_table(cfg.reports, "--reports") if cfg.reports else None
    labels = read_table(cfg.labels, "--labels") if cfg.labels else None
    id_table = read_case_id_table(Path(cfg.case_id)) if cfg.case_id not in ("hash", "key") else None
    jobs: list[Job] = []
    seen: dict[str, int] = {}
    for ref in found.selected:
        if not in_shard(_ref_basis(ref), cfg):
            continue
        key = ref.match_key(cfg.match_key)
        job = Job(ref, None, key, ref.source_hash(salt), report_requested=reports is not None,
                  labels_requested=labels is not None)
        job.case_id, job.error = _case_id(cfg, ref, key, salt, id_table)
        if job.case_id is not None:
            seen[job.case_id] = seen.get(job.case_id, 0) + 1
            if seen[job.case_id] > 1:
                job.error = "another selected series of this run has the same case id (one series per study/key)"
        if key is None and (reports or labels or cfg.segmenter == "masks"):
            job.error = job.error or f"series has no {cfg.match_key} to match reports, labels or masks by"
        if reports is not None and job.error is None:
            job.report, err = _join(report_of, reports, key)
            job.error = err
        if labels is not None and job.error is None:
            job.labels, job.error = _join(labels_of, labels, key)
        jobs.append(job)
    skipped = []
    for s in found.skipped:
        if not in_shard(_skipped_basis(s), cfg):
            continue
        skipped.append(manifest_line(None, "skipped", s.reason, hashlib.sha256(f"{salt}|{_skipped_basis(s)}".encode()).hexdigest()[:16],
                                     extra={"files": s.files, "description": s.description}))
    return jobs, skipped


def _join(fn, table: Table, key: str | None) -> tuple[dict | None, str | None]:
    return fn(table, key)


def _case_id(cfg: PreprocessConfig, ref: SeriesRef, key: str | None, salt: str,
             id_table: dict[str, str] | None) -> tuple[str | None, str | None]:
    if cfg.case_id == "hash":
        basis = ref.study_uid or normalise_key(ref.folder_key) or _ref_basis(ref)
        return "c" + hashlib.sha256(f"{salt}|{basis}".encode()).hexdigest()[:15], None
    value = normalise_key(key) if cfg.case_id == "key" else (id_table or {}).get(normalise_key(key) or "")
    if value is None:
        return None, ("series has no match key to use as case id" if cfg.case_id == "key"
                      else "series' match key is not in the --case-id table")
    if not _SAFE_ID.match(value):
        return None, "case id is not a safe file name ([A-Za-z0-9._-], at most 128 characters)"
    return value, None


def manifest_line(case_id: str | None, status: str, reason: str, source: str, extra: dict | None = None) -> dict:
    row = {"case_id": case_id, "status": status, "reason": reason, "source": source}
    row.update(extra or {})
    return row


# -------------------------------------------------------------------------------------------- one job


def _scrub(text: str, job: Job, ctx: Context) -> str:
    terms = list(ctx.scrub_terms)
    terms += [t for t in (job.ref.study_uid, job.ref.series_uid, job.ref.accession_number) if t]
    if not ctx.key_is_id:
        terms += [t for t in (job.key, job.ref.folder_key) if t]
    for f in job.ref.files[:1]:
        text = text.replace(str(f.parent), "<input>")
    for term in sorted({t for t in terms if t and len(t) >= 2}, key=len, reverse=True):
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(term)}(?![A-Za-z0-9])", "***", text)
    return " ".join(text.split())[:500]


def _job_extra(job: Job, present: int | None = None) -> dict:
    extra = {
        "report": ("yes" if job.report else "missing") if job.report_requested else "not requested",
        "labels": ("yes" if job.labels else "missing") if job.labels_requested else "not requested",
    }
    if present is not None:
        extra["anatomies"] = present
    return extra


def process_job(job: Job, ctx: Context) -> dict:
    """Run one job to a manifest line (never raises, except on KeyboardInterrupt/SystemExit)."""
    if job.error:
        return manifest_line(job.case_id, "failed", _scrub(job.error, job, ctx), job.source, _job_extra(job))
    try:
        if job.report is not None and "parsed" not in job.report:
            job.report["parsed"] = parse_report_sections(job.report, ctx.report_preset)
        vol = ctx.loader.load(job.ref)
        try:
            hu_record, hu_warning = gate_volume(vol, ctx.crop.hu_check, ctx.hu_check)
        except HUCheckError as e:  # fail mode: the measurements (and the CT-RATE decision) join the manifest line
            e.record = {**e.record, **({"ct_rate": vol.meta["ct_rate"]} if "ct_rate" in vol.meta else {})}
            raise
        if hu_warning:
            log.warning("case %s: %s", job.case_id, _scrub(hu_warning, job, ctx))
        labels = ctx.segmenter.segment(vol.image, job.key)
        crop = crop_case(vol.image, labels, ctx.anatomy_set, ctx.crop)
        del labels
        present = [s.name for s in crop.stats if s.present]
        absent = [s.name for s in crop.stats if not s.present]
        reasons = [f"anatomies absent from the label map: {', '.join(absent)}"] if absent else []
        reasons += [_scrub(hu_warning, job, ctx)] if hu_warning else []
        row = manifest_line(job.case_id, "ok", "; ".join(reasons), job.source, _job_extra(job, len(present)))
        intensity = {"hu_check": hu_record, **({"ct_rate": vol.meta["ct_rate"]} if "ct_rate" in vol.meta else {})}
        meta = case_meta(job, ctx, crop, vol.notes, row, intensity)
        write_case(ctx.out, job.case_id, crop.image, crop.anatomy, meta, ctx.pack)
        return row
    except (KeyboardInterrupt, SystemExit):
        raise
    except HUCheckError as e:
        extra = {**_job_extra(job), "hu_check": e.record}
        return manifest_line(job.case_id, "failed", _scrub(str(e), job, ctx), job.source, extra)
    except Exception as e:  # noqa: BLE001  (one case's failure must not stop the run)
        log.debug("case %s failed", job.case_id, exc_info=True)
        kind = "" if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: "
        return manifest_line(job.case_id, "failed", _scrub(kind + str(e), job, ctx), job.source, _job_extra(job))


def case_meta(job: Job, ctx: Context, crop, notes: list[str], row: dict, intensity: dict | None = None) -> dict:
    """The content of ``case.json`` (besides ``format``); ``intensity`` (the HU gate's record, the CT-RATE
    rescale decision) joins the ``intensity`` block."""
    aset = ctx.anatomy_set
    return {
        "case_id": job.case_id,
        "source": {"hash": job.source, "kind": job.ref.kind, "slices": job.ref.n_slices or None,
                   "notes": [_scrub(n, job, ctx) for n in notes]},
        "anatomy_set": aset.name,
        "labels_table": {str(a.label): a.name for a in aset.anatomies},
        "geometry": crop.geometry,
        "intensity": {"unit": "HU", "dtype": "int16", "clip_hu": list(ctx.crop.clip_hu), "pad_hu": ctx.crop.pad_hu,
                      "window_hu": list(ctx.crop.window_hu),
                      "window_note": "the loader maps window_hu to [0, 1]; stored values are HU",
                      **(intensity or {})},
        "anatomies": [s.to_dict() for s in crop.stats],
        "segmenter": ctx.segmenter.describe(),
        "preprocess": ctx.crop.name,
        "files": {"image": "image.nii.gz", "anatomy": "anatomy.nii.gz",
                  **({"image_npy": "image.npy", "anatomy_npy": "anatomy.npy"} if ctx.pack == "npy" else {})},
        "report": job.report,
        "labels": job.labels,
        "manifest": row,
    }


_CTX: Context | None = None


def _die_with_parent(parent: int) -> None:
    """A pool worker must not outlive the run (a ``kill -9`` of the parent would leave it writing into OUT): on
    Linux the kernel sends it SIGKILL when the parent dies (``prctl(PR_SET_PDEATHSIG)``); a parent that died
    before that call is caught by the ``getppid`` check."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            log.debug("prctl(PR_SET_PDEATHSIG) unavailable; pool workers may outlive a killed parent")
    if os.getppid() != parent:
        os._exit(1)


def _init_worker(ctx: Context, parent: int | None = None) -> None:
    global _CTX
    if parent is not None:
        _die_with_parent(parent)
    _CTX = ctx
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _run_in_worker(job: Job) -> dict:
    assert _CTX is not None
    return process_job(job, _CTX)


# --------------------------------------------------------------------------------------------- the run


def build_context(cfg: PreprocessConfig, anatomy_set: AnatomySet, salt: str) -> Context:
    options = dict(cfg.segmenter_options)
    if cfg.segmenter == "totalsegmentator":
        options.setdefault("classes", sorted({c for a in anatomy_set.anatomies for c in a.classes}))
    segmenter = create_segmenter(cfg.segmenter, **options)
    crop = load_crop_config(cfg.crop)
    if cfg.ct_rate_metadata:
        from pipelines.preprocess.ctrate import CtRateLoader

        loader: Any = CtRateLoader(cfg.ct_rate_metadata, version=cfg.ct_rate_version, hu_check=crop.hu_check,
                                   fill_nonfinite=cfg.fill_nonfinite)
    else:
        loader = DefaultLoader(cfg.max_gap_slices, cfg.fill_nonfinite)
    terms = tuple(t for t in (str(cfg.input.resolve()), str(cfg.input)) if t)
    return Context(cfg.out, anatomy_set, crop, segmenter, loader, cfg.pack, terms,
                   cfg.case_id == "key", report_preset_for(anatomy_set.name), cfg.hu_check)


def run(cfg: PreprocessConfig) -> Summary:
    """Preprocess ``cfg.input`` into ``cfg.out``; see the module docstring."""
    t0 = time.perf_counter()
    anatomy_set = load_anatomy_set(cfg.anatomy)
    cfg.out.mkdir(parents=True, exist_ok=True)
    # One writer per shard: shards of one job (different --shard-index) share OUT, two runs of one shard do not.
    with FolderLock(cfg.out / f".lock{shard_suffix(cfg.shard_index, cfg.num_shards)}",
                    f"fvlm preprocess shard {cfg.shard_index} of {cfg.num_shards}") as lock:
        return _run_locked(cfg, anatomy_set, t0, lock)


def _run_locked(cfg: PreprocessConfig, anatomy_set: AnatomySet, t0: float, lock: FolderLock) -> Summary:
    salt = load_salt(cfg)
    ctx = build_context(cfg, anatomy_set, salt)  # fails fast: unknown segmenter, missing weights/masks
    with folder_flock(cfg.out):  # shards starting together compare, clear and record one after the other
        check_same_options(cfg.out, run_record(cfg, ctx), cfg.overwrite, lock.path.name)  # before any case
    found = discover(cfg.input, cfg.series_rule, cfg.series_uid)
    jobs, skipped_rows = plan_jobs(cfg, found, salt, anatomy_set)
    rows: dict[int, dict] = {}
    todo: list[tuple[int, Job]] = []
    summary = Summary()
    for i, job in enumerate(jobs):
        done = read_complete_case(cfg.out, job.case_id) if job.case_id and not job.error else None
        if done is not None and done.get("source", {}).get("hash") == job.source and "manifest" in done:
            rows[i] = done["manifest"]
            summary.reused += 1
        else:
            todo.append((i, job))
    log.info("%d series selected, %d skipped by discovery, %d cases to do, %d done earlier (shard %d of %d)",
             len(jobs), len(skipped_rows), len(todo), summary.reused, cfg.shard_index, cfg.num_shards)
    for i, row in _execute(todo, ctx, cfg):
        rows[i] = row
    ordered = [rows[i] for i in range(len(jobs))]
    if not found.selected and not found.skipped:
        ordered.append(manifest_line(None, "failed", "the input holds no DICOM or NIfTI series", ""))
    manifest = ordered + skipped_rows
    sfx = shard_suffix(cfg.shard_index, cfg.num_shards)
    write_jsonl_atomic(cfg.out / f"manifest{sfx}.jsonl", manifest)
    index = []
    for row in ordered:
        if row["status"] == "ok":
            case = read_complete_case(cfg.out, row["case_id"])
            if case is not None:
                index.append(index_row(case, cfg.pack))
    write_jsonl_atomic(cfg.out / f"index{sfx}.jsonl", index)
    write_text_atomic(cfg.out / "preprocess.json", dumps(run_record(cfg, ctx)))
    if cfg.write_key_map:
        write_key_map(cfg.write_key_map, jobs, rows)
    summary.ok = sum(r["status"] == "ok" for r in manifest)
    summary.failed = sum(r["status"] == "failed" for r in manifest)
    summary.skipped = sum(r["status"] == "skipped" for r in manifest)
    summary.rows = manifest
    summary.seconds = time.perf_counter() - t0
    return summary


def _execute(todo: list[tuple[int, Job]], ctx: Context, cfg: PreprocessConfig):
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="case", desc="preprocess", disable=not cfg.progress or not todo,
               file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    failed = 0

    def note(row: dict) -> None:
        nonlocal failed
        if row["status"] == "failed":
            failed += 1
            log.warning("case %s failed: %s", row["case_id"] or "(no id)", row["reason"])
        else:
            log.debug("case %s: %s", row["case_id"], row["status"])
        bar.update(1)
        bar.set_postfix(failed=failed, refresh=False)

    try:
        if cfg.workers == 1 or len(todo) <= 1:
            for i, job in todo:
                row = process_job(job, ctx)
                note(row)
                yield i, row
            return
        with ProcessPoolExecutor(max_workers=cfg.workers, initializer=_init_worker,
                                 initargs=(ctx, os.getpid())) as pool:
            pending = {}
            queue = list(todo)
            # Keep at most 2 jobs per worker queued so that memory and interrupt latency stay bounded.
            while queue or pending:
                while queue and len(pending) < 2 * cfg.workers:
                    i, job = queue.pop(0)
                    pending[pool.submit(_run_in_worker, job)] = i
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    i = pending.pop(fut)
                    row = fut.result()
                    note(row)
                    yield i, row
    finally:
        bar.close()


def run_record(cfg: PreprocessConfig, ctx: Context) -> dict:
    """``preprocess.json``: the run's parameters, without paths or identifiers."""
    return {
        "anatomy_set": ctx.anatomy_set.name,
        "anatomies": {str(a.label): a.name for a in ctx.anatomy_set.anatomies},
        "preprocess": ctx.crop.to_dict(),
        "segmenter": ctx.segmenter.describe(),
        "match_key": cfg.match_key,
        "case_id": cfg.case_id if cfg.case_id in ("hash", "key") else "table",
        "series_rule": cfg.series_rule,
        "input_format": "ct-rate" if cfg.ct_rate_metadata else "dicom/nifti",
        **({"ct_rate_version": cfg.ct_rate_version} if cfg.ct_rate_metadata else {}),
        "hu_check": cfg.hu_check,
        "fill_nonfinite": cfg.fill_nonfinite,
        "max_gap_slices": cfg.max_gap_slices,
        "reports": cfg.reports is not None,
        "labels": cfg.labels is not None,
        "pack": cfg.pack,
        "report_parser_preset": ctx.report_preset,
        "num_shards": cfg.num_shards,
    }


#: ``preprocess.json`` keys that may differ between the runs that fill one OUT (they do not shape the cases).
OPTIONS_MAY_DIFFER: tuple[str, ...] = ("segmenter.device",)


def check_same_options(out: Path, record: dict, overwrite: bool = False, own_lock: str = "") -> None:
    """One OUT, one set of options: compare ``record`` (:func:`run_record`) with OUT's ``preprocess.json`` and
    refuse a difference (naming the options) unless ``overwrite``, which deletes OUT's cases and tables first.
    Then writes ``record`` as ``preprocess.json`` (so that even a run killed early leaves its options)."""
    from pipelines.config.recipe import describe_diff, diff_mappings

    path = Path(out) / "preprocess.json"
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict):
        # a key the earlier run did not record (an older fvlm) is unknown, not a difference
        diff = [d for d in diff_mappings(old, json.loads(json.dumps(record)), OPTIONS_MAY_DIFFER)
                if d[1] != "<absent>"]
        if diff and not overwrite:
            raise ValueError(
                f"OUT {out} was made with other options ({describe_diff(diff)}): adding cases would mix two "
                "preprocessings in one folder. Re-run with the options in its preprocess.json to resume, pass "
                "--overwrite to delete its cases and start afresh, or choose a new OUT")
        others = [h for h in live_locks(Path(out)) if h["file"] != own_lock]
        if diff and others:
            h = others[0]
            raise FolderLocked(f"--overwrite: OUT {out} is being written by process {h.get('pid')} on "
                               f"{h.get('host')} ({h.get('what', '?')}); wait for it to finish before deleting its cases")
        if diff:
            log.warning("--overwrite: OUT was made with other options (%s); deleting its cases and tables",
                        describe_diff(diff))
            clear_outputs(Path(out))
    write_text_atomic(path, dumps(record))


def clear_outputs(out: Path) -> None:
    """Delete what a preprocess run wrote to ``out`` (cases, manifests, indexes, preprocess.json); the salt stays."""
    import shutil

    shutil.rmtree(out / "cases", ignore_errors=True)
    for pattern in ("manifest*.jsonl", "index*.jsonl", "preprocess.json"):
        for p in out.glob(pattern):
            p.unlink(missing_ok=True)


def write_key_map(path: Path, jobs: list[Job], rows: dict[int, dict]) -> None:
    """key -> case id (and source hash, status) as CSV: the only file that links outputs to identifiers."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["key", "case_id", "source", "status"])
    for i, job in enumerate(jobs):
        w.writerow([job.key or "", job.case_id or "", job.source, rows.get(i, {}).get("status", "")])
    write_text_atomic(Path(path), buf.getvalue(), mode=0o600)  # private, like OUT/.salt
