"""``fvlm demo``: the main job end to end on a synthetic cohort, fVLM against CLIP, in one command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from configs.paths import presets_help

EXAMPLE = """example:
  fvlm demo data/demo                       # the default: fvlm-disease vs clip on 2 CPU cores (= make demo)
  fvlm demo data/quality --config quality   # the quality benchmark: supervised ceiling + ten recipes x three seeds
Re-running the same command resumes (finished stages are kept). Configs: configs/demo/ or a YAML file.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="end to end: synthetic cohort -> preprocess -> train recipes -> zero-shot evaluation -> report",
        description="Generate a synthetic training cohort and an independent held-out cohort, preprocess both, "
        "train every recipe of the demo config with the same budget, evaluate each zero-shot on the held-out "
        "cases, and write OUT/report.html and OUT/summary.json comparing them (macro AUC with 95% bootstrap "
        "intervals, per anatomy; the paired difference against the baseline recipe).",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output folder (created; reused to resume)")
    p.add_argument("--config", default="default", help=f"demo config: {presets_help('demo')} or a YAML file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.demo.config import load_demo_config
    from pipelines.demo.run import StageError, run_demo
    from pipelines.demo.summary import format_table, write_summary

    cfg = load_demo_config(args.config)
    try:
        result = run_demo(cfg, args.out)
    except StageError as e:  # the child printed its own error above; this names the stage and its log
        print(f"fvlm demo: {e}. Fix the cause and run the same command again to resume.", file=sys.stderr)
        return 1
    files, summary = write_summary(cfg, result)
    print()
    print(format_table(summary))
    print()
    print(f"report:  {files['report.html'].resolve()}")
    print(f"summary: {files['summary.json'].resolve()}")
    print(f"total {result.stage_seconds['total'] / 60:.1f} min")
    return 0
