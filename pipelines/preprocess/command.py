"""``fvlm preprocess``: DICOM archives, NIfTI folders or CT-RATE into anatomy-level training cases."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from configs.paths import presets_help
from pipelines.preprocess.segment import list_segmenters
from pipelines.preprocess.tables import TableSpec

EXAMPLE = """example:
  fvlm synth data/synth --cases 20
  fvlm preprocess data/synth/images data/prep --masks data/synth/segmentations \\
      --reports data/synth/reports.csv --labels data/synth/labels.csv --case-id key --workers 2
  fvlm preprocess /archive/dicom data/prep --segmenter totalsegmentator --device gpu \\
      --reports reports.csv --id-column AccessionNumber --text-column report --match-key accession
  fvlm preprocess ct-rate/train data/ct-rate --ct-rate train_metadata.csv --masks ct-rate/masks \\
      --reports train_reports.csv --labels train_predicted_labels.csv --shard-index 0 --num-shards 8
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preprocess",
        help="turn CT series (DICOM, NIfTI, CT-RATE) with reports into anatomy-level training cases",
        description="Find the CT series under INPUT (one per study), read them in HU, segment them "
        "(precomputed label maps or TotalSegmentator), group the classes into the anatomy set, crop and "
        "resample around the anatomies, and write de-identified cases with their reports and labels to OUT. "
        "Re-running the same command skips finished cases and retries failed ones.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", type=Path, help="DICOM folder tree, folder of NIfTI files, one series folder or file")
    p.add_argument("out", type=Path, help="output folder (created; reused to resume)")
    g = p.add_argument_group("anatomy and preprocessing")
    g.add_argument("--anatomy", default=None,
                   help=f"anatomy set: {presets_help('anatomy')} or a YAML file (default fvlm15)")
    g.add_argument("--config", default=None,
                   help=f"preprocessing parameters: {presets_help('preprocess')} or a YAML file")
    g = p.add_argument_group("segmentation")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--masks", type=Path, help="folder of label maps <key>.nii.gz (TotalSegmentator ids), or one file")
    src.add_argument("--segmenter", choices=list_segmenters(), help="segmenter (default masks when --masks is given)")
    g.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="TotalSegmentator: 3 mm fast model (default) or --no-fast for the 1.5 mm model")
    g.add_argument("--device", default="gpu", help="TotalSegmentator device: gpu, cpu, mps, gpu:N (default gpu)")
    g.add_argument("--weights-dir", type=Path, help="TotalSegmentator weights (default TOTALSEG_WEIGHTS_PATH / TOTALSEG_HOME_DIR)")
    g = p.add_argument_group("reports, labels, matching and case ids")
    g.add_argument("--reports", type=Path, help="report table (CSV/TSV), one row per key")
    g.add_argument("--id-column", help="key column of --reports/--labels (default: case_id, VolumeName, ... or the first)")
    g.add_argument("--text-column", help="report text column (default: findings + impression columns)")
    g.add_argument("--findings-column", help="findings column (default: findings, Findings_EN, ...)")
    g.add_argument("--impression-column", help="impression column (default: impression, Impressions_EN, ...)")
    g.add_argument("--labels", type=Path, help="ground-truth label table (CSV): key column and 0/1 columns")
    g.add_argument("--table-encoding", default="utf-8", help="text encoding of the tables (default utf-8)")
    g.add_argument("--match-key", choices=("folder", "study_uid", "accession"), default="folder",
                   help="what joins reports, labels and masks to a series (default: the series' folder name)")
    g.add_argument("--case-id", default=None,
                   help="hash (salted hash of the study UID; default), key (keep the match key: pseudonymous "
                        "data only) or a CSV mapping key -> case id")
    g.add_argument("--salt", help="secret salt of the case-id hash (default: generated once into OUT/.salt)")
    g.add_argument("--write-key-map", type=Path, metavar="CSV",
                   help="write key -> case id to this file (it links outputs to identifiers: keep it private)")
    g = p.add_argument_group("input selection")
    g.add_argument("--series-rule", default="most_slices_thinnest", help="one series per study: most_slices_thinnest or most_slices")
    g.add_argument("--series-uid", help="take exactly this SeriesInstanceUID")
    g.add_argument("--max-gap-slices", type=int, default=1, help="most missing slices in a row that are interpolated (default 1)")
    g.add_argument("--ct-rate", type=Path, metavar="METADATA_CSV",
                   help="INPUT is CT-RATE: its metadata CSV (spacing, rescale); sets CT-RATE defaults")
    g.add_argument("--ct-rate-version", choices=("1", "2", "auto"), default=None,
                   help="with --ct-rate: 1 (raw stored values: apply the metadata rescale), 2 (volumes already in "
                        "HU: never apply it) or auto (default: decide per volume from its intensities)")
    g = p.add_argument_group("intensity check")
    g.add_argument("--hu-check", choices=("fail", "warn", "off"), default="fail",
                   help="HU plausibility gate on every volume (air peak near -1000, soft tissue near 0-60 HU, little "
                        "outside [-1100, 3071]; thresholds in the --config file's hu_check): fail (default: an "
                        "implausible volume is a failed case naming the peaks and likely cause), warn (keep it, log "
                        "and record the failure) or off (no check)")
    g.add_argument("--fill-nonfinite", type=float, default=None, metavar="HU",
                   help="replace NaN/infinite voxels with this HU value (noted in case.json); default: a volume with "
                        "any is a failed case naming their count and location")
    g = p.add_argument_group("scale")
    g.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    g.add_argument("--shard-index", type=int, default=0, help="this machine's shard (0-based)")
    g.add_argument("--num-shards", type=int, default=1, help="number of shards the input is split into")
    g.add_argument("--pack", choices=("npy", "none"), default="npy",
                   help="packed copy for training: npy (uncompressed image.npy/anatomy.npy, default) or none")
    g.add_argument("--overwrite", action="store_true",
                   help="OUT was made with other options (anatomy set, config, segmenter, ...): delete its cases "
                        "and tables and start afresh (default: refuse, naming the differing options)")
    g.add_argument("--allow-failures", action="store_true", help="exit 0 even when cases failed")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _table(args: argparse.Namespace, path: Path | None, defaults: dict) -> TableSpec | None:
    if path is None:
        return None
    return TableSpec(
        path,
        id_column=args.id_column or defaults.get("id_column"),
        text_column=args.text_column,
        findings_column=args.findings_column or (None if args.text_column else defaults.get("findings_column")),
        impression_column=args.impression_column or (None if args.text_column else defaults.get("impression_column")),
        encoding=args.table_encoding,
    )


def run(args: argparse.Namespace) -> int:
    from pipelines.preprocess.ctrate import CTRATE_DEFAULTS
    from pipelines.preprocess.run import PreprocessConfig, run as run_preprocess

    defaults = CTRATE_DEFAULTS if args.ct_rate else {}
    if args.ct_rate_version is not None and not args.ct_rate:
        raise ValueError("--ct-rate-version applies to CT-RATE input only: give --ct-rate METADATA_CSV too")
    segmenter = args.segmenter or "masks"
    options: dict = {}
    if segmenter == "masks":
        if args.masks is None:
            raise ValueError("give --masks PATH (precomputed label maps) or --segmenter totalsegmentator")
        options = {"path": args.masks}
    elif segmenter == "totalsegmentator":
        options = {"fast": args.fast, "device": args.device, "weights_dir": args.weights_dir}
    cfg = PreprocessConfig(
        input=args.input,
        out=args.out,
        anatomy=args.anatomy or defaults.get("anatomy", "fvlm15"),
        crop=args.config or defaults.get("crop", "default"),
        segmenter=segmenter,
        segmenter_options=options,
        reports=_table(args, args.reports, defaults),
        labels=_table(args, args.labels, {"id_column": defaults.get("id_column")}),
        match_key=args.match_key,
        case_id=args.case_id or defaults.get("case_id", "hash"),
        salt=args.salt,
        write_key_map=args.write_key_map,
        workers=args.workers,
        shard_index=args.shard_index,
        num_shards=args.num_shards,
        series_rule=args.series_rule,
        series_uid=args.series_uid,
        max_gap_slices=args.max_gap_slices,
        ct_rate_metadata=args.ct_rate,
        ct_rate_version=args.ct_rate_version or "auto",
        hu_check=args.hu_check,
        fill_nonfinite=args.fill_nonfinite,
        pack=args.pack,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    summary = run_preprocess(cfg)
    print(f"fvlm preprocess: {summary.line()}; manifest and cases in {args.out}")
    for row in summary.rows:
        if row["status"] == "failed":
            logging.getLogger("fvlm.preprocess").debug("failed: %s %s", row["case_id"], row["reason"])
    failed = [r for r in summary.rows if r["status"] == "failed"]
    for row in failed[:5]:  # the reasons, not only the count (they are in manifest.jsonl too; no identifiers)
        print(f"fvlm preprocess: failed: {row['case_id'] or '(no case id)'}: {row['reason'] or 'no reason recorded'}",
              file=sys.stderr)
    if len(failed) > 5:
        print(f"fvlm preprocess: ... and {len(failed) - 5} more failed case(s)", file=sys.stderr)
    if summary.failed and not args.allow_failures:
        print(f"fvlm preprocess: {summary.failed} case(s) failed (reasons in manifest.jsonl); "
              "fix and re-run to retry them, or pass --allow-failures", flush=True)
        return 1
    return 0
