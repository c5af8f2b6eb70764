"""``fvlm synth``: write a synthetic CT-and-report cohort (the embedded default data set)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.synth.cohort import FORMATS, SIZES, SynthConfig, make_cohort

EXAMPLE = """example:
  fvlm synth data/synth --cases 200 --seed 0 --workers 2
  fvlm synth data/synth-full --cases 3 --size full --format nifti --label-noise 0.1
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic cohort: CT series, label maps, lesion maps, reports, labels",
        description="Write a synthetic cohort of torso CTs with fvlm54 findings, their TotalSegmentator-id "
        "label maps, lesion maps, free-text reports and labels. Deterministic for a seed.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = SynthConfig()
    p.add_argument("out", type=Path, help="output folder (must be empty or absent)")
    p.add_argument("--cases", type=int, default=d.cases, help=f"number of cases (default {d.cases})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"cohort seed (default {d.seed})")
    p.add_argument("--size", choices=SIZES, default=d.size,
                   help="small: about 128x128x64 voxels (default); full: 512x512x200+")
    p.add_argument("--format", choices=FORMATS, default=d.format,
                   help="dicom: one CT series folder per case (default); nifti: one .nii.gz per case")
    p.add_argument("--normal-share", type=float, default=d.normal_share,
                   help=f"share of cases without findings (default {d.normal_share})")
    p.add_argument("--max-findings", type=int, default=d.max_findings,
                   help=f"most findings per case (default {d.max_findings})")
    p.add_argument("--prevalence-mix", type=float, default=d.prevalence_mix,
                   help="0: the catalog's task prevalences (default); 1: every task equally often; between: a blend")
    p.add_argument("--label-noise", type=float, default=d.label_noise,
                   help="chance that a report leaves a present finding out, or mentions an absent one (default 0)")
    p.add_argument("--workers", type=int, default=d.workers, help="parallel processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder, replacing cases")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = SynthConfig(
        cases=args.cases,
        seed=args.seed,
        size=args.size,
        format=args.format,
        normal_share=args.normal_share,
        max_findings=args.max_findings,
        prevalence_mix=args.prevalence_mix,
        label_noise=args.label_noise,
        workers=args.workers,
    )
    summary = make_cohort(args.out, cfg, overwrite=args.overwrite)
    out = args.out
    n = summary["cases"]
    print(f"fvlm synth: wrote {n} cases ({summary['normal_cases']} normal, {summary['findings']} findings) "
          f"in {summary['seconds']:.1f} s to {out}")
    images = f"{out}/images/<case_id>/*.dcm" if cfg.format == "dicom" else f"{out}/images/<case_id>.nii.gz"
    print(f"  images         {images}")
    print(f"  label maps     {out}/segmentations/<case_id>.nii.gz  (TotalSegmentator 'total' ids)")
    print(f"  lesion maps    {out}/lesions/<case_id>.nii.gz")
    print(f"  ground truth   {out}/truth/<case_id>.json")
    print(f"  reports        {out}/reports.csv")
    print(f"  labels         {out}/labels.csv  ({len(summary['task_counts'])} tasks)")
    print(f"  summary        {out}/cohort.json")
    return 0
