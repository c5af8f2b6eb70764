"""Synthetic cohort generation speed: cases per second on one core, per size, with the time split into
rendering (phantom + findings), report writing and file writing.

    .venv/bin/python -m benchmarks.synth_speed --cases 20 --full-cases 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the figure claims

import numpy as np  # noqa: E402

from anatomy.catalog import load_task_catalog  # noqa: E402
from benchmarks.record import markdown_table, record  # noqa: E402
from pipelines.synth.cohort import SynthConfig, generate_case  # noqa: E402
from pipelines.synth.phantom import render_case, sample_tasks  # noqa: E402
from pipelines.synth.reports import write_report  # noqa: E402


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(size: str, fmt: str, cases: int, seed: int = 0) -> list[object]:
    catalog = load_task_catalog("fvlm54")
    cfg = SynthConfig(cases=cases, seed=seed, size=size, format=fmt)
    render = report = 0.0
    voxels = 0
    for i in range(cases):  # the stages alone, same streams as generate_case
        streams = np.random.default_rng([seed, i]).spawn(4)
        t0 = time.perf_counter()
        vol = render_case(streams[1], sample_tasks(streams[0]), size=size)
        t1 = time.perf_counter()
        write_report(streams[2], vol.findings, vol.anatomies_in_view, catalog)
        report += time.perf_counter() - t1
        render += t1 - t0
        voxels += vol.hu.size
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for i in range(cases):
            generate_case(Path(tmp), cfg, i, catalog)
        total = time.perf_counter() - t0
    return [size, fmt, cases, f"{voxels / cases / 1e6:.2f}", f"{cases / total:.2f}", f"{total / cases:.2f}",
            f"{render / cases:.2f}", f"{report / cases * 1e3:.1f}", f"{_peak_rss_mib():.0f}"]


def main() -> None:
    if hasattr(os, "sched_setaffinity"):  # one core, whatever the machine has
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=20, help="cases at the default (small) size")
    ap.add_argument("--full-cases", type=int, default=2, help="cases at full size (0 to skip)")
    args = ap.parse_args()
    rows = [measure("small", "dicom", args.cases), measure("small", "nifti", args.cases)]
    if args.full_cases:
        rows.append(measure("full", "dicom", args.full_cases))
    table = markdown_table(
        ["size", "format", "cases", "Mvoxels/case", "cases/s", "s/case", "render s/case", "report ms/case",
         "peak RSS MiB"],
        rows,
    )
    record("Synthetic cohort generation (one core)", table,
           notes="Pinned to one core (sched_setaffinity). s/case is the whole case written to disk (render + report + DICOM/NIfTI files); "
                 "render and report are the stages alone.")


if __name__ == "__main__":
    main()
