"""Confidence calibration of the uncertainty recipe (issue 22): is the confidence ``fvlm predict`` reports higher
on the cases the model scores right?

For a trained ``fvlm-uncertainty`` run and a labelled held-out cohort:

1. zero-shot scores and labels from ``fvlm evaluate``'s path (``pipelines.evaluate.run.evaluate``: the recipe's
   scorer, here the trained 2-Wasserstein distance; the view given by ``--view``);
2. per case and anatomy the head's confidence ``c = 1 / (1 + vbar / v_0)``
   (``pipelines.inference.scoring.case_confidences``) on the same view and cases;
3. ``fvlm.calibration.task_confidence_check``: a (case, task) pair is *right* when ``[s >= theta_t] == y``
   (theta_t the ROC point closest to (0, 1)); discrimination = AUROC(right, c) with a bootstrap interval, the
   mean confidence of right and wrong pairs, and a reliability table over equal-count confidence bins.

Usage::

    python -m benchmarks.calibration --run RUNS/fvlm-uncertainty --data PREP_TEST [--view center] [--no-record]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.record import record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a trained fvlm-uncertainty run (or its export)")
    ap.add_argument("--data", type=Path, required=True, help="held-out preprocess folder with labels")
    ap.add_argument("--tasks", default="fvlm54")
    ap.add_argument("--view", choices=("windows", "center"), default="center")
    ap.add_argument("--bins", type=int, default=5)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--min-positives", type=int, default=5)
    ap.add_argument("--no-record", action="store_true", help="print only, leave BENCHMARKS.md")
    args = ap.parse_args(argv)

    from fvlm.calibration import task_confidence_check
    from pipelines.evaluate.run import evaluate
    from pipelines.inference.model import data_view, eval_dataset, load_model
    from pipelines.inference.scoring import case_confidences

    ev = evaluate(args.run, args.data, args.tasks, threshold_split=None, n_boot=200, view_kind=args.view,
                  text_ceiling=False, min_positives=args.min_positives)
    model, tok, _ = load_model(args.run)
    view = data_view(Path(args.run), model, None, None)
    ds = eval_dataset(args.data, tok, model, view, 0, 0.5)
    ids = [r["case_id"] for r in ds.rows]
    if ids != list(ev.case_ids):
        raise SystemExit(f"the confidence view's cases differ from the evaluation's ({len(ids)} vs {len(ev.case_ids)})")
    conf = case_confidences(model, ds)  # (N, A)
    names = list(ds.anatomy_names)  # the data's anatomy rows (eval_dataset checked them against the model's)
    scored = [j for j, t in enumerate(ev.tasks) if ev.results[t.name].flag is None]  # tasks with enough positives
    rows = [names.index(ev.tasks[j].anatomy) if ev.tasks[j].anatomy in names else -1 for j in scored]
    chk = task_confidence_check(ev.scores[:, scored], ev.labels[:, scored], conf, rows, bins=args.bins,
                                n_boot=args.n_boot)
    if chk.discrimination is None:
        print(f"no calibration figure: {chk.reason}", file=sys.stderr)
        return 1
    lines = ["| pairs | right | discrimination AUROC(right, confidence) (95% CI) | mean confidence right | "
             "mean confidence wrong | accuracy gap (top - bottom bin) |", "|---|---|---|---|---|---|",
             f"| {chk.n} | {chk.accuracy:.3f} | {chk.discrimination:.3f} ({chk.ci_low:.3f}-{chk.ci_high:.3f}) | "
             f"{chk.mean_confidence_correct:.4f} | {chk.mean_confidence_wrong:.4f} | {chk.accuracy_gap:+.3f} |",
             "", "| confidence bin | pairs | accuracy | mean confidence |", "|---|---|---|---|"]
    lines += [f"| {b.low:.4f}-{b.high:.4f} | {b.n} | {b.accuracy:.3f} | {b.mean_confidence:.4f} |" for b in chk.bins]
    spread = float(np.nanmax(conf) - np.nanmin(conf)) if np.isfinite(conf).any() else float("nan")
    notes = (f"- run `{args.run}`, data `{args.data}` ({len(ids)} cases), {len(scored)} tasks with at least "
             f"{args.min_positives} positives, view {args.view}, scorer {ev.info.get('scorer', {}).get('name', '?')}; "
             f"a pair is right when the score is on the label's side of the task's ROC-corner threshold. Confidence "
             f"range over all case anatomies: {spread:.4f}. Discrimination 0.5 means the confidence says nothing "
             "about being right.")
    cmd = "python -m benchmarks.calibration " + " ".join(argv if argv is not None else sys.argv[1:])
    title = "Confidence calibration of fvlm-uncertainty (issue 22)"
    if args.no_record:
        print("\n".join(lines))
        print(notes)
    else:
        record(title, "\n".join(lines), notes, command=cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
