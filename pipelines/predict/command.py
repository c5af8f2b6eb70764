"""``fvlm predict``: zero-shot predictions for one CT scan (one DICOM series folder or one NIfTI file)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from configs.paths import presets_help

EXAMPLE = """example:
  fvlm predict --checkpoint runs/tiny scans/patient1/ --masks scans/patient1_total.nii.gz --output pred.json
  fvlm predict --checkpoint runs/fvlm/model scan.nii.gz --segmenter totalsegmentator --tasks ct-rate \\
      --heatmap lung_nodule --heatmap-output lung_nodule.nii.gz
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="zero-shot predictions (and a finding heatmap) for one scan",
        description="Preprocess one scan in memory (series assembly, segmentation, anatomy grouping, crop), run the "
        "model and print, per anatomy, whether it is present and each task's probability (null when the anatomy "
        "is absent or cut); write them as JSON with --output. No patient identifier is written.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="training run folder (uses RUN/model) or export")
    p.add_argument("input", type=Path, metavar="INPUT", help="one DICOM series folder or one NIfTI file")
    seg = p.add_mutually_exclusive_group(required=True)
    seg.add_argument("--masks", type=Path, help="label map of the scan (TotalSegmentator total ids), or a folder of them")
    seg.add_argument("--segmenter", help="registered segmenter, e.g. totalsegmentator")
    p.add_argument("--tasks", default="fvlm54",
                   help=f"task catalog: {presets_help('tasks')} or a YAML file (default fvlm54)")
    p.add_argument("--anatomy", default=None, help="anatomy set the model was trained on (default fvlm15)")
    p.add_argument("--preprocess", default="default",
                   help="preprocess preset or YAML the model's training data used (default: default)")
    p.add_argument("--templates", default=None,
                   help="prompt template set: report (default, report-style sentences), all, release, ct-clip, "
                        "structured (as fvlm evaluate)")
    p.add_argument("--mode", choices=("crop", "resize"), default=None,
                   help="input view (default: the run's recipe, else a central crop of the model's size)")
    p.add_argument("--crop-size", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"))
    p.add_argument("--output", type=Path, default=None, help="write the predictions as JSON here")
    p.add_argument("--heatmap", default=None, metavar="TASK", help="task whose token similarity map to write")
    p.add_argument("--heatmap-output", type=Path, default=None, metavar="MAP.nii.gz",
                   help="NIfTI for --heatmap, on the scan's grid")
    p.add_argument("--heatmap-mode", choices=("probability", "cosine", "region"), default="probability",
                   help="probability: per-token softmax positive side (default); cosine: cosine with positive - "
                   "negative; region: the region head's map (the task's positive prompts attend to the anatomy's tokens under "
                   "the scorer's selection; models trained with fvlm-region*)")
    p.add_argument("--hu-check", choices=("fail", "warn", "off"), default="fail",
                   help="HU plausibility gate on INPUT, as in fvlm preprocess: fail (default: refuse a scan whose "
                        "intensities are not plausible HU, naming the peaks and the likely cause), warn (go on and "
                        "log it) or off")
    p.add_argument("--fill-nonfinite", type=float, default=None, metavar="HU",
                   help="replace NaN/infinite voxels of INPUT with this HU value (noted in the JSON); default: refuse "
                        "such a scan, naming their count and location")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.predict.run import format_table, predict

    if (args.heatmap is None) != (args.heatmap_output is None):
        raise ValueError("--heatmap TASK and --heatmap-output MAP.nii.gz go together")
    doc = predict(args.checkpoint, args.input, masks=args.masks, segmenter=args.segmenter, tasks=args.tasks,
                  anatomy=args.anatomy, preprocess=args.preprocess, templates=args.templates, mode=args.mode,
                  crop_size=tuple(args.crop_size) if args.crop_size else None, heatmap=args.heatmap,
                  heatmap_mode=args.heatmap_mode, hu_check=args.hu_check,
                  fill_nonfinite=args.fill_nonfinite)
    image = doc.pop("_heatmap", None)
    if image is not None:
        import SimpleITK as sitk

        from pipelines.atomic import atomic_path

        with atomic_path(args.heatmap_output) as tmp:  # temporary sibling, fsync, rename
            sitk.WriteImage(image, str(tmp), True)
    text = json.dumps(doc, indent=2, allow_nan=False)
    if args.output is not None:
        from pipelines.atomic import write_text_atomic

        write_text_atomic(args.output, text + "\n")
    print(text if args.json else format_table(doc), file=sys.stdout)
    return 0
