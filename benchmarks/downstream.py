"""Downstream benchmark: label-efficient linear probe and image <-> report retrieval of every run of the quality
benchmark (``benchmarks.quality``), beside its zero-shot AUC, through the real commands' functions
(``fvlm embed`` -> ``fvlm probe`` -> ``fvlm retrieve``).

Per run folder under RUNS (each with ``model/config.json``): embed the training and the held-out cohorts, fit
the probe at each label fraction (1%, 10%, 100% by default, 3 seeds each) on the training embeddings and score
the held-out ones, and retrieve over the held-out embeddings. Prints and records in BENCHMARKS.md: per run,
its recipe, zero-shot macro AUC (from ``EVAL/NAME/metrics.json`` when the quality benchmark wrote it), probe
macro AUC per fraction (with its 95% interval) and retrieval recall@5 at the case level (both directions) and
the anatomy level (mean over anatomies, image -> text), each with its chance level; then the mean per recipe.

    .venv/bin/python -m benchmarks.downstream --runs data/bench-quality/runs \\
        --train data/bench-quality/prep/train --test data/bench-quality/prep/test
    .venv/bin/python -m benchmarks.downstream ... --train-labels train.csv --test-labels test.csv --out /tmp/ds

Re-running resumes: finished embeddings are kept (``fvlm embed`` skips a complete export).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.record import markdown_table, record


def _f(v: Any, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def run_folders(runs: Path) -> list[Path]:
    """The training runs (or model exports) under ``runs``, in name order."""
    runs = Path(runs)
    if not runs.is_dir():
        raise FileNotFoundError(f"--runs {runs}: no such folder (give the quality benchmark's OUT/runs)")
    found = sorted(p for p in runs.iterdir()
                   if (p / "model" / "config.json").is_file() or (p / "config.json").is_file())
    if not found:
        raise ValueError(f"--runs {runs}: no run folder with model/config.json inside")
    return found


def recipe_of(run: Path) -> str:
    """The recipe name of a run (``config.yaml`` ``name``), else the folder name."""
    cfg = run / "config.yaml"
    if cfg.is_file():
        from pipelines.config.recipe import load_recipe

        return load_recipe(cfg).name
    return run.name


def zero_shot(eval_dir: Path | None, name: str) -> float | None:
    """Macro zero-shot AUC of ``EVAL/NAME/metrics.json`` (None when absent)."""
    path = eval_dir / name / "metrics.json" if eval_dir is not None else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))["macro"]["auc"]


def evaluate_run(run: Path, args: argparse.Namespace) -> dict[str, Any]:
    """embed (train, test) -> probe -> retrieve for one run; its row's figures."""
    from pipelines.downstream import probe as P
    from pipelines.downstream import retrieve as R
    from pipelines.downstream.embed import embed

    emb = args.out / "emb" / run.name
    t0 = time.perf_counter()
    for split, data in (("train", args.train), ("test", args.test)):
        embed(run, data, emb / split, batch_size=args.batch_size, view_kind=args.view, progress=False)
    t_embed = time.perf_counter() - t0
    res = P.probe(emb / "train", emb / "test", args.tasks, labels=args.train_labels, eval_labels=args.test_labels,
                  fractions=args.fractions, seeds=args.seeds, folds=args.folds, n_boot=args.n_boot,
                  min_positives=args.min_positives)
    P.write_outputs(res, args.out / "probe" / run.name)
    ret = R.retrieve(emb / "test", ks=(1, 5, 10))
    R.write_outputs(ret, args.out / "retrieve" / run.name)
    return {"name": run.name, "recipe": recipe_of(run), "zero_shot": zero_shot(args.eval, run.name),
            "probe": {k: b["macro"] for k, b in res["fractions"].items()}, "n_probe_tasks": len(res["included"]),
            "readout": res["info"]["readout"], "case": ret["case"], "anatomy": ret["anatomy"]["mean"],
            "seconds": time.perf_counter() - t0, "embed_seconds": t_embed}


def tables(rows: list[dict[str, Any]], fractions: list[float]) -> str:
    keys = [f"{f:g}" for f in fractions]

    def r5(block: dict[str, Any] | None, d: str) -> tuple[float | None, float | None]:
        m = (block or {}).get(d) or {}
        return m.get("recall@5"), m.get("chance_recall@5")

    body = []
    for r in rows:
        probe = [f"{_f(r['probe'][k]['auc'])} ({_f(r['probe'][k]['ci_low'])}-{_f(r['probe'][k]['ci_high'])})"
                 for k in keys]
        ret = [f"{_f(v)} ({_f(c)})" for v, c in (r5(r["case"], "image->report"), r5(r["case"], "report->image"),
                                                  r5(r["anatomy"], "image->report"))]
        body.append([r["recipe"], r["name"], r["readout"], _f(r["zero_shot"]), *probe, *ret, f"{r['seconds']:.0f}"])
    head = (["recipe", "run", "readout", "zero-shot macro AUC"]
            + [f"probe {k} labels: macro AUC (95% CI)" for k in keys]
            + ["case R@5 image->report (chance)", "case R@5 report->image (chance)",
               "anatomy R@5 image->text, mean (chance)", "s / run"])
    runs = markdown_table(head, body)
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["recipe"], []).append(r)

    def mean(xs: list[float | None]) -> float | None:
        xs = [x for x in xs if x is not None]
        return statistics.fmean(xs) if xs else None

    recipes = [[name, str(len(rs)), _f(mean([r["zero_shot"] for r in rs])),
                *[_f(mean([r["probe"][k]["auc"] for r in rs])) for k in keys],
                _f(mean([r5(r["case"], "image->report")[0] for r in rs])),
                _f(mean([r5(r["case"], "report->image")[0] for r in rs])),
                _f(mean([r5(r["anatomy"], "image->report")[0] for r in rs]))] for name, rs in by.items()]
    per_recipe = markdown_table(["recipe", "runs", "zero-shot"] + [f"probe {k}" for k in keys]
                                + ["case R@5 i->r", "case R@5 r->i", "anatomy R@5 i->t"], recipes)
    return runs + "\n\nMean per recipe (over its runs):\n\n" + per_recipe


def main(argv=None) -> int:
    from pipelines.downstream.probe import parse_fractions

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, required=True, help="the quality benchmark's OUT/runs")
    ap.add_argument("--train", type=Path, required=True, help="training cohort's preprocess folder (probe fit)")
    ap.add_argument("--test", type=Path, required=True, help="held-out cohort's preprocess folder")
    ap.add_argument("--train-labels", type=Path, default=None, help="label CSV of --train (default: stored labels)")
    ap.add_argument("--test-labels", type=Path, default=None, help="label CSV of --test (default: stored labels)")
    ap.add_argument("--eval", type=Path, default=None,
                    help="folder of the zero-shot reports, EVAL/NAME/metrics.json (default: RUNS/../eval)")
    ap.add_argument("--tasks", default="fvlm54")
    ap.add_argument("--out", type=Path, default=Path("data/bench-downstream"))
    ap.add_argument("--fractions", type=parse_fractions, default=[0.01, 0.1, 1.0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--min-positives", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--view", choices=("windows", "center"), default="windows")
    ap.add_argument("--no-record", dest="record", action="store_false", help="print only, leave BENCHMARKS.md")
    args = ap.parse_args(argv)
    args.eval = args.eval if args.eval is not None else args.runs.parent / "eval"
    runs = run_folders(args.runs)
    t0 = time.perf_counter()
    rows = [evaluate_run(run, args) for run in runs]
    table = tables(rows, args.fractions)
    notes = "\n".join([
        f"- runs: {len(rows)} under `{args.runs}`; probe fitted on `{args.train}`; probe scored and retrieval on "
        f"`{args.test}`",
        f"- probe: per task a logistic regression on the frozen embeddings of the task's anatomy (the whole scan for "
        f"`clip`: the readout of `fvlm evaluate`), C by {args.folds}-fold cross-validation on the training side only; "
        f"label fractions {', '.join(f'{f:g}' for f in args.fractions)}, {args.seeds} seeds each; macro over the tasks "
        f"with >= {args.min_positives} held-out positives and negatives fitted at every fraction "
        f"({', '.join(str(r['n_probe_tasks']) for r in rows)} per run)",
        "- retrieval: case level = mean of the embedded anatomies (anatomy readout) or whole scan vs whole report "
        "(clip); identical report texts count as correct; chance = a random ordering of the same gallery",
        f"- wall time {(time.perf_counter() - t0) / 60:.1f} min; outputs under `{args.out}` (emb/, probe/, retrieve/)",
    ])
    title = f"Downstream: linear probe and retrieval of {', '.join(dict.fromkeys(r['recipe'] for r in rows))}"
    if args.record:
        record(title, table, notes)
    else:
        print(f"### {title}\n\n{table}\n\n{notes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
