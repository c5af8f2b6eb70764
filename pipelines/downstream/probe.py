"""``fvlm probe``: label-efficient linear probing of frozen embeddings (``fvlm embed`` exports).

Per task of a catalog, the linear probe of ``fvlm evaluate`` (``pipelines.evaluate.probe``: an L2 logistic
regression on the standardised embedding of the task's anatomy, the whole-scan embedding for whole-study tasks
and under the ``global`` readout, C chosen by stratified cross-validation on the training side only) is fitted
on a share ``f`` of the training cohort's labels and scored on the held-out cohort:

* fractions and seeds: for each ``f`` in ``--fractions`` and each of ``--seeds`` seeds ``s = seed, seed + 1,
  ...``, every task draws its own stratified share (``draw_fraction``: ``round(f n_c)`` of each class c, at
  least ``--min-per-class``), and cross-validation shrinks to the folds the draw allows (at least 2); at
  ``f = 1`` every seed sees every case and only the folds differ.
* per task and fraction: ``AUC_f = (1/S) sum_s AUC(y_test, score_{f,s})``, with a percentile bootstrap
  interval over the held-out cases (the same resampled cases for every seed: ``fvlm.metrics.macro_auc_with_ci``
  over the S seed columns), and the seeds' spread (sd); per anatomy and macro: the mean over the included
  tasks and the seeds, with the joint interval over cases (tasks x seeds columns).
* included tasks: at least ``--min-positives`` positives and negatives among the held-out cases where the
  task's embedding is present, and fitted (not skipped) at every fraction and seed, so every fraction's macro
  is over the same tasks; the others are listed with the reason.

Outputs (``--output``), in the formats of ``fvlm evaluate``: ``metrics.csv`` (a row per fraction and task),
``metrics.json`` (everything, with each seed's fit), ``report.md`` and a self-contained ``report.html``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from configs.paths import presets_help

log = logging.getLogger(__name__)

EXAMPLE = """example:
  fvlm embed --checkpoint runs/fvlm --data data/prep-train --output emb/train
  fvlm embed --checkpoint runs/fvlm --data data/prep-test --output emb/test
  fvlm probe --embeddings emb/train --eval-embeddings emb/test --tasks fvlm54 --fractions 0.01,0.1,1.0 \\
      --seeds 3 --output reports/probe
  fvlm probe ... --labels train_labels.csv --eval-labels test_labels.csv   # label tables, as fvlm evaluate --labels
"""


def parse_fractions(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fractions must be comma-separated numbers, got {text!r}") from None
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"--fractions must be in (0, 1], got {text!r}")
    return sorted(set(vals))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe", help="label-efficient linear probe on frozen embeddings: AUC at 1%%/10%%/100%% of the labels",
        description="Fit a logistic regression per task on the frozen embeddings of a training export (fvlm embed) "
        "with a fraction of its labels, several seeds per fraction, C chosen by cross-validation on the training "
        "side only, and score a held-out export: AUC with bootstrap intervals per task, per anatomy and macro, "
        "in metrics.csv, metrics.json, report.md and report.html.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", required=True, type=Path, help="training cohort's fvlm embed output")
    p.add_argument("--eval-embeddings", required=True, type=Path, help="held-out cohort's fvlm embed output")
    p.add_argument("--tasks", default="fvlm54",
                   help=f"task catalog: {presets_help('tasks')} or a YAML file (default fvlm54)")
    p.add_argument("--ct-rate-labels", type=int, choices=(16, 18), default=16,
                   help="with --tasks ct-rate: the 16 anatomy-bound labels (default) or all 18")
    p.add_argument("--labels", type=Path, default=None,
                   help="training labels: CSV keyed by case_id, a column per task name or title (default: the "
                   "labels fvlm embed stored from the cases, --embeddings/labels.csv)")
    p.add_argument("--eval-labels", type=Path, default=None, help="held-out labels, as --labels")
    p.add_argument("--fractions", type=parse_fractions, default=[0.01, 0.1, 1.0],
                   help="shares of the training labels, comma-separated (default 0.01,0.1,1.0)")
    p.add_argument("--seeds", type=int, default=3, help="draws per fraction (default 3)")
    p.add_argument("--seed", type=int, default=0, help="first seed (the draws use seed, seed+1, ...; default 0)")
    p.add_argument("--folds", type=int, default=5,
                   help="cross-validation folds choosing C (fewer when a draw has fewer of a class; default 5)")
    p.add_argument("--min-per-class", type=int, default=2,
                   help="positives and negatives each draw keeps at least (default 2)")
    p.add_argument("--readout", choices=("auto", "anatomy", "global"), default="auto",
                   help="features: anatomy (the task's anatomy embedding), global (whole scan), auto (default: "
                   "the readout fvlm embed recorded from the run's recipe)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--min-positives", type=int, default=10,
                   help="held-out positives and negatives a task needs to enter the means (default 10)")
    p.add_argument("--output", required=True, type=Path, help="folder for the outputs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    res = probe(args.embeddings, args.eval_embeddings, args.tasks, labels=args.labels, eval_labels=args.eval_labels,
                fractions=args.fractions, seeds=args.seeds, seed=args.seed, folds=args.folds,
                min_per_class=args.min_per_class, readout=args.readout, n_boot=args.n_boot,
                min_positives=args.min_positives, ct_rate_labels=args.ct_rate_labels)
    files = write_outputs(res, args.output)
    macro = ", ".join(f"{f:g}: {_f(res['fractions'][_key(f)]['macro']['auc'])}" for f in res["info"]["fractions"])
    print(f"linear probe on {res['info']['n_train_cases']} training / {res['info']['n_eval_cases']} held-out case(s), "
          f"{res['info']['readout']} features, {args.seeds} seed(s); macro AUC by label fraction ({macro}) over "
          f"{len(res['included'])} task(s); outputs: {', '.join(str(p) for p in files.values())}")
    return 0


def _f(v: Any, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _key(f: float) -> str:
    return f"{f:g}"


def task_rows_of(tasks: list[Any], names: list[str]) -> list[int]:
    """Each task's row in the export's anatomies (-1: whole study)."""
    rows = []
    for t in tasks:
        if t.anatomy is None:
            rows.append(-1)
        elif t.anatomy in names:
            rows.append(names.index(t.anatomy))
        else:
            raise ValueError(f"--tasks: task {t.name} belongs to anatomy {t.anatomy!r}, which the embeddings do not "
                             f"have (anatomies: {', '.join(names)})")
    return rows


def _block(y: np.ndarray, cols: list[np.ndarray], n_boot: int, seed: int, names: list[str]) -> dict[str, Any]:
    """Mean AUC over the columns ``cols`` (each (N,) scores against ``y``'s matching column) with the joint
    bootstrap interval over cases (``fvlm.metrics.macro_auc_with_ci``)."""
    from fvlm import metrics as M

    if not cols:
        return {"auc": None, "ci_low": None, "ci_high": None, "n_columns": 0}
    r = M.macro_auc_with_ci(y, np.stack(cols, axis=1), n_boot=n_boot, seed=seed, task_names=names)
    return {"auc": r.auc, "ci_low": r.ci_low, "ci_high": r.ci_high, "n_columns": len(cols),
            "reason": r.reason}


def probe(embeddings: Path, eval_embeddings: Path, tasks_name: str, *, labels: Path | None = None,
          eval_labels: Path | None = None, fractions: list[float] = (0.01, 0.1, 1.0), seeds: int = 3, seed: int = 0,
          folds: int = 5, min_per_class: int = 2, readout: str = "auto", n_boot: int = 1000,
          min_positives: int = 10, ct_rate_labels: int = 16) -> dict[str, Any]:
    """The probe (module docstring) of the exports ``embeddings`` (training) and ``eval_embeddings``
    (held-out). Returns ``info``, ``tasks`` (catalog entries), ``included``, ``excluded`` (name -> reason),
    ``fractions`` (fraction key -> ``macro``, ``per_anatomy``, ``tasks``), ``fits`` and ``scores``
    (fraction key -> (S, N, T) held-out decision scores)."""
    from anatomy.catalog import load_task_catalog
    from fvlm import metrics as M
    from pipelines.downstream.store import read_embeddings, read_labels
    from pipelines.evaluate.probe import C_GRID, fit_probe, probe_scores
    from pipelines.evaluate.run import read_labels_table, select_tasks

    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    if folds < 2:
        raise ValueError(f"--folds must be at least 2, got {folds}")
    if min_per_class < 2:
        raise ValueError(f"--min-per-class must be at least 2 (cross-validation needs 2 of each class), got "
                         f"{min_per_class}")
    if n_boot < 1:
        raise ValueError(f"--n-boot must be at least 1, got {n_boot}")
    fractions = sorted(set(float(f) for f in fractions))
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"--fractions must be in (0, 1], got {fractions}")
    train = read_embeddings(embeddings, "--embeddings")
    test = read_embeddings(eval_embeddings, "--eval-embeddings")
    if train.anatomy_names != test.anatomy_names or train["image_emb"].shape[2] != test["image_emb"].shape[2]:
        raise ValueError(f"--eval-embeddings {eval_embeddings}: anatomies or embedding size differ from "
                         f"--embeddings {embeddings}: embed both cohorts with the same model")
    if train["meta"].get("model_sha256") != test["meta"].get("model_sha256"):
        raise ValueError(f"--eval-embeddings {eval_embeddings}: embedded by another model than --embeddings "
                         f"{embeddings} (weights fingerprints differ): embed both cohorts with the same checkpoint")
    if readout not in ("auto", "anatomy", "global"):
        raise ValueError(f"--readout must be auto, anatomy or global, got {readout!r}")
    read = train["meta"].get("readout", "anatomy") if readout == "auto" else readout
    catalog = load_task_catalog(tasks_name)
    tasks = [catalog[n] for n in select_tasks(catalog, ct_rate_labels)]
    names = [t.name for t in tasks]
    rows = task_rows_of(tasks, train.anatomy_names)
    if labels is not None:
        y_train, train_info = read_labels_table(labels, train["case_ids"], tasks, option="--labels")
    else:
        y_train, train_info = read_labels(embeddings, train["case_ids"], tasks, "--embeddings")
    if eval_labels is not None:
        y_test, test_info = read_labels_table(eval_labels, test["case_ids"], tasks, option="--eval-labels")
    else:
        y_test, test_info = read_labels(eval_embeddings, test["case_ids"], tasks, "--eval-embeddings")
    # a case id of both exports is the same case when its scan embeds alike (two synthetic cohorts number their
    # cases alike; the export stores no source hash)
    t_row, e_row = {c: i for i, c in enumerate(train["case_ids"])}, {c: i for i, c in enumerate(test["case_ids"])}
    overlap = sorted(c for c in set(t_row) & set(e_row) if np.allclose(
        train["global_image_emb"][t_row[c]], test["global_image_emb"][e_row[c]], atol=1e-5))
    if overlap:
        log.warning("%d case id(s) are in both exports (e.g. %s): the probe is not held out for them", len(overlap),
                    overlap[0])
    seed_list = [seed + k for k in range(seeds)]
    fits: dict[str, list[list[Any]]] = {}
    scores: dict[str, np.ndarray] = {}
    for f in fractions:
        fits[_key(f)], per_seed = [], []
        for s in seed_list:
            log.info("probe: fraction %g, seed %d: fitting %d task(s)", f, s, len(tasks))
            fs = fit_probe(train, y_train, rows, names, readout=read, folds=folds, seed=s, fraction=f,
                           min_per_class=min_per_class, min_folds=2)
            fits[_key(f)].append(fs)
            per_seed.append(probe_scores(fs, test))  # (N, T)
        scores[_key(f)] = np.stack(per_seed)  # (S, N, T)
    present = np.stack([np.ones(test.n, bool) if r < 0 else test["anatomy_mask"][:, r] for r in rows], axis=1)
    y_eval = np.where(present, y_test, np.nan)  # (N, T): a task counts only where its embedding is present
    excluded: dict[str, str] = {}
    for j, n in enumerate(names):
        pos, neg = int((y_eval[:, j] == 1).sum()), int((y_eval[:, j] == 0).sum())
        skipped = {fit[j].reason for fs in fits.values() for fit in fs if fit[j].reason}
        if min(pos, neg) < min_positives:
            excluded[n] = f"{pos} held-out positive(s) and {neg} negative(s) (< {min_positives})"
        elif skipped:
            excluded[n] = f"not fitted at every fraction and seed: {sorted(skipped)[0]}"
    included = [n for n in names if n not in excluded]
    groups: dict[str, list[str]] = {}
    for t in tasks:
        if t.name in included:
            groups.setdefault(t.anatomy or "whole_study", []).append(t.name)
    col = {n: j for j, n in enumerate(names)}
    blocks: dict[str, Any] = {}
    for f in fractions:
        sc = scores[_key(f)]  # (S, N, T)
        tasks_out = {}
        for j, n in enumerate(names):
            per = [M.auc_with_ci(y_eval[:, j], sc[k, :, j], n_boot=0).auc for k in range(seeds)]  # per seed
            fitted = all(fs[j].estimator is not None for fs in fits[_key(f)])
            block = (_block(np.repeat(y_eval[:, [j]], seeds, axis=1), [sc[k, :, j] for k in range(seeds)], n_boot,
                            seed, [f"{n}/seed{s}" for s in seed_list]) if fitted and all(a is not None for a in per)
                     else {"auc": None, "ci_low": None, "ci_high": None, "n_columns": 0})
            fs = [fit[j] for fit in fits[_key(f)]]
            tasks_out[n] = {**block, "seed_aucs": per,
                            "sd": statistics.stdev(per) if len(per) > 1 and all(a is not None for a in per) else None,
                            "n_train_pos": statistics.fmean(x.n_pos for x in fs),
                            "n_train_neg": statistics.fmean(x.n_neg for x in fs),
                            "n_eval_pos": int((y_eval[:, j] == 1).sum()), "n_eval_neg": int((y_eval[:, j] == 0).sum()),
                            "skipped": next((x.reason for x in fs if x.reason), None)}

        def macro(task_names: list[str]) -> dict[str, Any]:
            cols = [sc[k, :, col[n]] for n in task_names for k in range(seeds)]
            y = np.stack([y_eval[:, col[n]] for n in task_names for _ in range(seeds)], axis=1) if cols else None
            out = _block(y, cols, n_boot, seed, [f"{n}/seed{s}" for n in task_names for s in seed_list])
            return {**out, "n_tasks": len(task_names), "tasks": list(task_names)}

        blocks[_key(f)] = {"fraction": f, "macro": macro(included),
                           "per_anatomy": {g: macro(ns) for g, ns in groups.items()}, "tasks": tasks_out}
    info = {"embeddings": str(embeddings), "eval_embeddings": str(eval_embeddings), "tasks": catalog.name,
            "task_names": names, "model": train["meta"].get("model"), "readout": read,
            "readout_source": ("command line" if readout != "auto"
                               else "auto: recorded by fvlm embed from the run's recipe"),
            "view": train["meta"].get("view", {}).get("kind"), "n_train_cases": train.n, "n_eval_cases": test.n,
            "n_overlap_cases": len(overlap), "labels": train_info, "eval_labels": test_info,
            "fractions": fractions, "seeds": seed_list, "folds": folds, "min_per_class": min_per_class,
            "c_grid": list(C_GRID), "n_boot": n_boot, "min_positives": min_positives}
    return {"info": info, "tasks": tasks, "included": included, "excluded": excluded, "fractions": blocks,
            "fits": {k: [[x.to_dict() for x in fs] for fs in v] for k, v in fits.items()}, "scores": scores}


def write_outputs(res: dict[str, Any], out: Path) -> dict[str, Path]:
    """metrics.csv, metrics.json, report.md and report.html (``fvlm evaluate``'s table writers)."""
    from pipelines.atomic import open_atomic, write_text_atomic
    from pipelines.evaluate.report import html_head, html_table, md_table

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info, fr = res["info"], res["fractions"]
    keys = [_key(f) for f in info["fractions"]]
    seeds = info["seeds"]
    rows = []
    for k in keys:
        for t in res["tasks"]:
            b = fr[k]["tasks"][t.name]
            rows.append({"fraction": fr[k]["fraction"], "task": t.name, "title": t.title,
                         "anatomy": t.anatomy or "whole_study", "included": int(t.name in res["included"]),
                         "auc": b["auc"], "ci_low": b["ci_low"], "ci_high": b["ci_high"], "sd_seeds": b["sd"],
                         **{f"auc_seed{s}": a for s, a in zip(seeds, b["seed_aucs"])},
                         "n_train_pos": b["n_train_pos"], "n_train_neg": b["n_train_neg"],
                         "n_eval_pos": b["n_eval_pos"], "n_eval_neg": b["n_eval_neg"],
                         "excluded": res["excluded"].get(t.name, ""), "skipped": b["skipped"] or ""})
    with open_atomic(out / "metrics.csv", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["fraction", "task"])
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    doc = {"info": info, "included": res["included"], "excluded": res["excluded"], "fractions": fr,
           "fits": res["fits"]}
    write_text_atomic(out / "metrics.json", json.dumps(doc, indent=2, default=float) + "\n")

    def ci(b: dict[str, Any]) -> str:
        return f"{_f(b['auc'])} ({_f(b['ci_low'])}-{_f(b['ci_high'])})" if b["auc"] is not None else "n/a"

    lab = info["labels"]
    head = [f"# Linear probe: {info['tasks']}", "",
            f"- training embeddings: `{info['embeddings']}` ({info['n_train_cases']} cases); held-out: "
            f"`{info['eval_embeddings']}` ({info['n_eval_cases']} cases); model {info['model']}, {info['view']} view",
            f"- features: {info['readout']} ({info['readout_source']}); labels: {lab['kind']} from {lab['source']}",
            f"- per task, a logistic regression on the standardised embedding, C from {info['c_grid']} by "
            f"cross-validation on the drawn training cases only (up to {info['folds']} folds); each label fraction "
            f"drawn per task and seed (seeds {', '.join(map(str, seeds))}), stratified, at least "
            f"{info['min_per_class']} of each class",
            f"- AUC: mean over seeds, 95% bootstrap interval over the held-out cases ({info['n_boot']} resamples); "
            f"{len(res['included'])} task(s) in the means, {len(res['excluded'])} excluded",
            *([f"- WARNING: {info['n_overlap_cases']} case(s) are in both exports: not held out"]
              if info["n_overlap_cases"] else []),
            ""]
    mcols = [("label fraction", lambda k: k), ("macro AUC (95% CI)", lambda k: ci(fr[k]["macro"])),
             ("tasks", lambda k: str(fr[k]["macro"]["n_tasks"]))]
    groups = list(fr[keys[0]]["per_anatomy"]) if keys else []
    acols = [("anatomy", lambda g: g)] + [(f"{k}", (lambda kk: lambda g: ci(fr[kk]["per_anatomy"][g])
                                                    )(k)) for k in keys]
    tcols = [("task", lambda t: t.name), ("anatomy", lambda t: t.anatomy or "whole_study")]
    tcols += [(f"{k}", (lambda kk: lambda t: ci(fr[kk]["tasks"][t.name]))(k)) for k in keys]
    first = fr[keys[0]]["tasks"] if keys else {}
    tcols += [("held-out pos/neg", lambda t: f"{first[t.name]['n_eval_pos']}/{first[t.name]['n_eval_neg']}"),
              ("excluded", lambda t: res["excluded"].get(t.name, ""))]
    md = head + ["## Macro AUC by label fraction", ""] + md_table(mcols, keys)
    md += ["", "## Per anatomy (AUC by label fraction)", ""] + md_table(acols, groups)
    md += ["", "## Per task (AUC by label fraction)", ""] + md_table(tcols, res["tasks"])
    write_text_atomic(out / "report.md", "\n".join(md) + "\n")
    import html

    parts = html_head("fvlm linear probe")
    parts.append(f"<h1>Linear probe: {html.escape(info['tasks'])}</h1><ul>")
    parts += [f"<li>{html.escape(line[2:])}</li>" for line in head[2:] if line.startswith("- ")]
    parts.append("</ul><h2>Macro AUC by label fraction</h2>")
    parts += html_table(mcols, keys) + ["</table><h2>Per anatomy</h2>"]
    parts += html_table(acols, groups) + ["</table><h2>Per task</h2>"]
    parts += html_table(tcols, res["tasks"]) + ["</table></body></html>"]
    write_text_atomic(out / "report.html", "\n".join(parts) + "\n")
    return {k: out / k for k in ("metrics.csv", "metrics.json", "report.md", "report.html")}
