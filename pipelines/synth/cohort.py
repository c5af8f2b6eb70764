"""The synthetic cohort: N cases of CT + label map + lesion map + report + labels, written to one folder.

Layout of ``OUT`` (``<id>`` is the case id, e.g. ``synth_00007``)::

    images/<id>/IM0001.dcm ...     one axial CT series per case (``--format dicom``), or
    images/<id>.nii.gz             the CT volume in HU (``--format nifti``)
    segmentations/<id>.nii.gz      ground-truth label map, TotalSegmentator ``total`` class ids, CT grid
    lesions/<id>.nii.gz            lesion map: one id per injected finding, CT grid
    truth/<id>.json                the case's findings (task, anatomy, lesion id, size, location), geometry,
                                   the fake patient identifiers written into its DICOM header
    reports.csv                    case_id, findings, impression
    labels.csv                     case_id and one 0/1 column per fvlm54 task (image ground truth)
    cohort.json                    how the cohort was made (seed, size, counts, catalog)

Determinism: case ``i`` draws everything from ``numpy.random.default_rng([seed, i])`` (one child stream
each for findings, image, report and identifiers), so a case does not depend on how many others are
made or in which process, and two runs with the same seed write identical files.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from anatomy.catalog import TaskCatalog, load_task_catalog
from pipelines.synth.phantom import render_case, sample_tasks
from pipelines.synth.reports import write_report
from pipelines.synth.scene import SynthVolume
from pipelines.synth.writers import StudyMeta, write_csv_atomic, write_dicom_series, write_nifti, write_text_atomic

log = logging.getLogger(__name__)

FORMATS = ("dicom", "nifti")
SIZES = ("small", "full")

_FIRST = ["JOHN", "JANE", "ALEX", "MARIA", "AHMET", "AYSE", "WEI", "FATIMA", "OLGA", "PEDRO", "SARA", "KENJI"]
_LAST = ["DOE", "SMITH", "YILMAZ", "GARCIA", "MUELLER", "NGUYEN", "KOWALSKI", "ROSSI", "DUBOIS", "TANAKA"]
_INSTITUTIONS = ["GENERAL HOSPITAL", "UNIVERSITY MEDICAL CENTER", "CITY CLINIC", "ST. EXAMPLE HOSPITAL"]


@dataclass(frozen=True)
class SynthConfig:
    """What ``fvlm synth`` makes."""

    cases: int = 20
    """Number of cases."""
    seed: int = 0
    """Seed of the whole cohort; case i uses the stream ``[seed, i]``."""
    size: str = "small"
    """``small`` (about 128 x 128 x 64 voxels, CI) or ``full`` (512 x 512 x 200+, benchmarks)."""
    format: str = "dicom"
    """``dicom`` (one series folder per case) or ``nifti`` (one ``.nii.gz`` per case)."""
    normal_share: float = 0.3
    """Share of cases without any finding."""
    max_findings: int = 4
    """Most findings in one case."""
    prevalence_mix: float = 0.0
    """Blend of the catalog's task prevalences (0) and equal weights (1), :func:`sample_tasks`."""
    label_noise: float = 0.0
    """Report noise: chance a present finding is left out of a report, and that a report mentions one
    absent finding. Labels stay the image truth."""
    catalog: str = "fvlm54"
    """Task catalog the findings and labels come from."""
    workers: int = 1
    """Processes generating cases in parallel."""
    id_prefix: str = "synth"
    """Case ids are ``<prefix>_<5-digit index>``."""

    def __post_init__(self) -> None:
        if self.cases < 1:
            raise ValueError(f"--cases must be at least 1, got {self.cases}")
        if self.size not in SIZES:
            raise ValueError(f"--size must be one of {', '.join(SIZES)}, got {self.size!r}")
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 0.0 <= self.normal_share <= 1.0:
            raise ValueError(f"--normal-share must lie in [0, 1], got {self.normal_share}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"--label-noise must lie in [0, 1], got {self.label_noise}")
        if not 0.0 <= self.prevalence_mix <= 1.0:
            raise ValueError(f"--prevalence-mix must lie in [0, 1], got {self.prevalence_mix}")
        if self.max_findings < 1:
            raise ValueError(f"--max-findings must be at least 1, got {self.max_findings}")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")

    def case_id(self, index: int) -> str:
        return f"{self.id_prefix}_{index:05d}"


@dataclass(frozen=True)
class CaseRecord:
    """What one generated case contributes to the cohort tables."""

    case_id: str
    tasks: tuple[str, ...]
    findings_text: str
    impression_text: str
    seconds: float


def _fake_identity(rng: np.random.Generator, cfg: SynthConfig, index: int, sex: str, contrast: bool) -> StudyMeta:
    case_id = cfg.case_id(index)
    year = int(rng.integers(1935, 2005))
    study_year = int(rng.integers(2015, 2025))
    key = (cfg.seed, index)
    return StudyMeta(
        case_id=case_id,
        patient_name=f"{rng.choice(_LAST)}^{rng.choice(_FIRST)}",
        patient_id=f"P{int(rng.integers(10**6, 10**7))}",
        birth_date=f"{year:04d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        sex=sex,
        accession_number=f"A{int(rng.integers(10**8, 10**9))}",
        study_date=f"{study_year:04d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        study_time=f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
        institution=str(rng.choice(_INSTITUTIONS)),
        referring_physician=f"{rng.choice(_LAST)}^{rng.choice(_FIRST)}^^DR",
        study_uid=StudyMeta.uid("study", *key),
        series_uid=StudyMeta.uid("series", *key),
        frame_uid=StudyMeta.uid("frame", *key),
        kvp=float(rng.choice([100.0, 120.0, 140.0])),
        contrast=contrast,
    )


def _truth(vol: SynthVolume, meta: StudyMeta, cfg: SynthConfig, omitted: tuple[str, ...], spurious: tuple[str, ...]) -> dict:
    return {
        "case_id": meta.case_id,
        "shape_zyx": list(vol.hu.shape),
        "spacing_zyx_mm": [float(s) for s in vol.spacing],
        "origin_xyz_mm": [float(o) for o in vol.origin],
        "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1],
        "sex": vol.sex,
        "contrast": meta.contrast,
        "anatomies_in_view": list(vol.anatomies_in_view),
        "findings": [asdict(f) for f in vol.findings],
        "report_omitted": list(omitted),
        "report_spurious": list(spurious),
        "identifiers": {
            "PatientName": meta.patient_name,
            "PatientID": meta.patient_id,
            "PatientBirthDate": meta.birth_date,
            "AccessionNumber": meta.accession_number,
            "InstitutionName": meta.institution,
            "ReferringPhysicianName": meta.referring_physician,
            "StudyInstanceUID": meta.study_uid,
            "SeriesInstanceUID": meta.series_uid,
        },
        "generator": {"seed": cfg.seed, "index": int(meta.case_id.rsplit("_", 1)[1]), "size": cfg.size},
    }


def generate_case(out: Path, cfg: SynthConfig, index: int, catalog: TaskCatalog | None = None) -> CaseRecord:
    """Render, describe and write case ``index`` of the cohort; returns its table rows."""
    t0 = time.perf_counter()
    catalog = catalog or load_task_catalog(cfg.catalog)
    streams = np.random.default_rng([cfg.seed, index]).spawn(4)  # findings, image, report, identity
    tasks = sample_tasks(streams[0], normal_share=cfg.normal_share, max_findings=cfg.max_findings,
                         prevalence_mix=cfg.prevalence_mix)
    vol = render_case(streams[1], tasks, size=cfg.size)
    report = write_report(streams[2], vol.findings, vol.anatomies_in_view, catalog, label_noise=cfg.label_noise)
    meta = _fake_identity(streams[3], cfg, index, vol.sex, vol.contrast)

    cid = meta.case_id
    if cfg.format == "dicom":
        write_dicom_series(out / "images" / cid, vol.hu, vol.spacing, vol.origin, meta)
    else:
        write_nifti(out / "images" / f"{cid}.nii.gz", vol.hu, vol.spacing, vol.origin)
    write_nifti(out / "segmentations" / f"{cid}.nii.gz", vol.labels, vol.spacing, vol.origin)
    write_nifti(out / "lesions" / f"{cid}.nii.gz", vol.lesions, vol.spacing, vol.origin)
    truth = _truth(vol, meta, cfg, report.omitted, report.spurious)
    write_text_atomic(out / "truth" / f"{cid}.json", json.dumps(truth, indent=1) + "\n")
    return CaseRecord(
        case_id=cid,
        tasks=tuple(sorted({f.task for f in vol.findings})),
        findings_text=report.findings,
        impression_text=report.impression,
        seconds=time.perf_counter() - t0,
    )


def _worker(args: tuple[Path, SynthConfig, int]) -> CaseRecord:
    out, cfg, index = args
    return generate_case(out, cfg, index)


def iter_cases(out: Path, cfg: SynthConfig) -> Iterator[CaseRecord]:
    """Generate all cases (in parallel when ``cfg.workers > 1``), yielding records in case order."""
    jobs = [(out, cfg, i) for i in range(cfg.cases)]
    if cfg.workers == 1:
        catalog = load_task_catalog(cfg.catalog)
        for _, c, i in jobs:
            yield generate_case(out, c, i, catalog)
        return
    # Each worker runs single-threaded numpy so that N workers use N cores, not N x threads.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
        yield from pool.map(_worker, jobs, chunksize=1)


def make_cohort(out: Path, cfg: SynthConfig, overwrite: bool = False) -> dict:
    """Write the whole cohort into ``out`` and return the summary that is also saved as ``cohort.json``.

    ``out`` must be empty or absent unless ``overwrite`` is set (a cohort is never mixed with another).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose another folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    catalog = load_task_catalog(cfg.catalog)
    t0 = time.perf_counter()
    records: list[CaseRecord] = []
    for rec in iter_cases(out, cfg):
        records.append(rec)
        log.info("case %s: %d finding(s) in %.2f s (%d/%d)", rec.case_id, len(rec.tasks), rec.seconds,
                 len(records), cfg.cases)
    elapsed = time.perf_counter() - t0

    write_csv_atomic(out / "reports.csv", ["case_id", "findings", "impression"],
                     ([r.case_id, r.findings_text, r.impression_text] for r in records))
    write_csv_atomic(out / "labels.csv", ["case_id", *catalog.names],
                     ([r.case_id, *(int(t in r.tasks) for t in catalog.names)] for r in records))
    prevalence = {t: sum(t in r.tasks for r in records) for t in catalog.names}
    summary = {
        # workers changes how fast, not what: left out so that serial and parallel runs write equal files
        "config": {k: v for k, v in asdict(cfg).items() if k != "workers"},
        "cases": len(records),
        "normal_cases": sum(not r.tasks for r in records),
        "findings": sum(len(r.tasks) for r in records),
        "task_counts": prevalence,
        "catalog": catalog.name,
        "anatomy_set": catalog.anatomy_set.name,
        "layout": {
            "images": "images/<case_id>/" if cfg.format == "dicom" else "images/<case_id>.nii.gz",
            "segmentations": "segmentations/<case_id>.nii.gz (TotalSegmentator total ids)",
            "lesions": "lesions/<case_id>.nii.gz",
            "truth": "truth/<case_id>.json",
            "reports": "reports.csv",
            "labels": "labels.csv",
        },
    }
    write_text_atomic(out / "cohort.json", json.dumps(summary, indent=1) + "\n")
    summary["seconds"] = elapsed
    return summary
