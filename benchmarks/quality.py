"""Quality benchmark: zero-shot AUC of clip, fvlm-plain, fvlm and fvlm-disease on the same synthetic cohort,
with the same budget, for three training seeds (``configs/demo/quality.yaml``), through the real ``fvlm demo``
path (synth -> preprocess -> train -> evaluate). Prints and records in BENCHMARKS.md: macro AUC per recipe
(mean and sd over seeds, each seed's value with its bootstrap interval) beside its ceilings (the text readout
ceiling; the linear probe when the config sets ``evaluate.probe``), macro AUC per anatomy, the paired
differences of the config's comparisons, and whether each target is met:

* ``fvlm-disease`` at least 0.10 macro AUC above ``clip`` (mean over seeds of the paired difference);
* each false-negative correction not worse than the recipe without it: ``fvlm`` >= ``fvlm-plain`` and
  ``fvlm-disease`` >= ``fvlm`` (mean paired difference >= 0).

    .venv/bin/python -m benchmarks.quality                      # OUT defaults to data/bench-quality
    .venv/bin/python -m benchmarks.quality --out /tmp/q --config quality

For every run whose model has learnable prompt context (the ``prompt_context`` head, ``fvlm-unified``) the
held-out cases are scored a second time with the learned prompts instead of the catalog's (``fvlm evaluate
--prompts learned``), and the paired difference learned - catalog on the same cases is reported.

Re-running resumes (finished cohorts and training runs are kept); ``--config`` takes any demo config.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.record import markdown_table, record

TARGETS = (("fvlm-disease", "clip", 0.10), ("fvlm", "fvlm-plain", 0.0), ("fvlm-disease", "fvlm", 0.0))


def _f(v, nd=3, sign=False) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.{nd}f}" if sign else f"{v:.{nd}f}"


def tables(summary: dict) -> tuple[str, list[str]]:
    recipes = list(summary["recipes"])
    seeds = [str(s) for s in summary["seeds"]]
    rows = []
    for r in recipes:
        b = summary["recipes"][r]
        per_seed = [b["runs"][s] for s in seeds if s in b["runs"]]
        beside = []
        for key in ("text_ceiling_macro_auc", "probe_macro_auc"):  # the ceilings, same tasks and cases
            vals = [x.get(key) for x in per_seed]
            mean = statistics.fmean(c for c in vals if c is not None) if any(c is not None for c in vals) else None
            beside.append(f"{_f(mean)} ({', '.join(_f(c) for c in vals)})")
        vis = ([f"{_f(b.get('visible_macro_auc'))} ± {_f(b.get('visible_macro_auc_sd'))} "
                f"({', '.join(_f(x.get('visible_macro_auc')) for x in per_seed)})"] if summary.get("visible") else [])
        rows.append([r] + vis + [f"{_f(b['macro_auc'])} ± {_f(b['macro_auc_sd'])}"] +
                    [f"{_f(x['macro_auc'])} ({_f(x['ci_low'])}-{_f(x['ci_high'])})" for x in per_seed] + beside +
                    [f"{statistics.fmean(x['train_seconds'] for x in per_seed):.0f}"])
    vis_head = ([f"visible tasks ({len(summary['tasks_headline'])}): macro AUC, mean ± sd (per seed)"]
                if summary.get("visible") else [])
    main = markdown_table(["recipe"] + vis_head + ["macro AUC (all included), mean ± sd"] + [f"seed {s} (95% CI)" for s in seeds] +
                          ["text readout ceiling, mean (per seed)", "linear probe, mean (per seed)",
                           "train s / run"], rows)
    anatomies = list(summary["recipes"][recipes[0]]["per_anatomy"]) if recipes else []
    arows = [[g, str(summary["recipes"][recipes[0]]["per_anatomy"][g]["n_tasks"])] +
             [_f(summary["recipes"][r]["per_anatomy"][g]["auc"]) for r in recipes] for g in anatomies]
    per_anatomy = markdown_table(["anatomy", "tasks"] + [f"{r} (mean)" for r in recipes], arows)

    crows, verdicts = [], []
    pairs = dict.fromkeys((c["recipe"], c["reference"]) for c in summary["comparisons"])
    for a, b in pairs:
        cs = [c for c in summary["comparisons"] if (c["recipe"], c["reference"]) == (a, b)]
        mean = statistics.fmean(c["delta"] for c in cs if c["delta"] is not None) if cs else None
        crows.append([f"{a} - {b}", _f(mean, sign=True)] +
                     [f"{_f(c['delta'], sign=True)} ({_f(c['ci_low'], sign=True)} to {_f(c['ci_high'], sign=True)})"
                      for c in cs])
        for ta, tb, need in TARGETS:
            if (ta, tb) == (a, b) and mean is not None:
                verdicts.append(f"- target {a} - {b} >= {need:+.2f}: measured {mean:+.3f} (mean over seeds): "
                                f"**{'met' if mean >= need else 'MISSED'}**")
    comparisons = markdown_table(["difference", "mean"] + [f"seed {s} (95% paired CI)" for s in seeds], crows)
    text = (main + f"\n\nMacro AUC per anatomy (mean over seeds):\n\n{per_anatomy}\n\n"
            f"Paired differences on the same held-out cases:\n\n{comparisons}")
    return text, verdicts


def ceiling_tasks(result, recipe: str = "fvlm-disease", below: float = 0.70) -> str:
    """Markdown: per task, the text readout ceiling of ``recipe``'s runs (mean over seeds) and the image AUC,
    with every task whose ceiling is below ``below`` marked ("" when the recipe has no run with a ceiling)."""
    per: dict[str, list[tuple[float | None, float | None]]] = {}
    anatomy: dict[str, str] = {}
    for key, ev in result.evaluations.items():
        ceiling = getattr(ev, "ceiling", None)
        if key.recipe != recipe or not ceiling:
            continue
        where = {t.name: t.anatomy or "whole study" for t in ev.tasks}
        for name, t in ceiling["tasks"].items():
            if name in ev.summary["included"]:
                per.setdefault(name, []).append((t.get("auc"), ev.results[name].auc.auc))
                anatomy[name] = where.get(name, "")
    if not per:
        return ""
    mean = lambda xs: statistics.fmean(x for x in xs if x is not None) if any(x is not None for x in xs) else None  # noqa: E731
    rows = sorted(([n, anatomy[n], mean([c for c, _ in v]), mean([i for _, i in v])] for n, v in per.items()),
                  key=lambda r: (r[2] is None, r[2] if r[2] is not None else 0.0))
    table = markdown_table(["task", "anatomy", "text readout ceiling", "image AUC", f"ceiling < {below:.2f}"],
                           [[n, a, _f(c), _f(i), "**yes**" if c is not None and c < below else ""]
                            for n, a, c, i in rows])
    return (f"Text readout ceiling per scored task, {recipe} (mean over seeds), with its image AUC:\n\n" + table)


def learned_prompt_rows(cfg, result, summary: dict) -> str:
    """Markdown table: per run with a ``prompt_context`` head, macro AUC with the learned prompts, with the
    catalog prompts, and their paired difference on the same held-out cases ("" when no run has the head)."""
    from fvlm.metrics import paired_macro_auc_difference
    from fvlm.model import read_config
    from pipelines.demo.run import run_key_name
    from pipelines.demo.summary import _test_arrays
    from pipelines.evaluate.report import write_outputs
    from pipelines.evaluate.run import evaluate

    rows = []
    for key, ev in result.evaluations.items():
        name = run_key_name(key, cfg)
        run = result.out / "runs" / name
        if "prompt_context" not in read_config(run / "model").heads or not ev.summary["included"]:
            continue
        learned = evaluate(run, result.out / "prep" / "test", cfg.tasks, prompts="learned",
                           threshold_split=cfg.evaluate.threshold_split or None, n_boot=cfg.evaluate.n_boot, seed=0,
                           min_positives=cfg.evaluate.min_positives)
        write_outputs(learned, result.out / "eval" / f"{name}-learned")
        names = list(ev.summary["included"])
        y, s_learned = _test_arrays(learned, names)
        _, s_catalog = _test_arrays(ev, names)
        d = paired_macro_auc_difference(y, s_learned, s_catalog, n_boot=cfg.evaluate.n_boot, seed=0)
        rows.append([name, _f(d["macro_a"]), _f(d["macro_b"]),
                     f"{_f(d['delta'], sign=True)} ({_f(d['ci_low'], sign=True)} to {_f(d['ci_high'], sign=True)})"])
    if not rows:
        return ""
    return ("Learned prompt context (`--prompts learned`) against the catalog prompts, same runs and cases:\n\n"
            + markdown_table(["run", "learned prompts", "catalog prompts", "learned - catalog (95% paired CI)"],
                             rows))


def main(argv=None) -> int:
    from pipelines.demo.config import load_demo_config
    from pipelines.demo.run import run_demo
    from pipelines.demo.summary import write_summary

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data/bench-quality"))
    ap.add_argument("--config", default="quality")
    args = ap.parse_args(argv)
    cfg = load_demo_config(args.config)
    t0 = time.perf_counter()
    result = run_demo(cfg, args.out)
    files, summary = write_summary(cfg, result)
    minutes = (time.perf_counter() - t0) / 60
    table, verdicts = tables(summary)
    by_task = ceiling_tasks(result)
    if by_task:
        table += "\n\n" + by_task
    learned = learned_prompt_rows(cfg, result, summary)
    if learned:
        table += "\n\n" + learned
    notes = "\n".join([
        f"- cohort: {cfg.cohort.train_cases} training cases (synth seed {cfg.cohort.seed}), {cfg.cohort.test_cases} "
        f"held-out (seed {cfg.cohort.seed + 1}), all {summary['n_test_cases']} in every AUC (a "
        f"{cfg.evaluate.threshold_split:g} validation share only chooses the thresholds of the threshold metrics); "
        f"{len(summary['tasks_included'])} of the 54 tasks have at least {cfg.evaluate.min_positives} positives "
        "and enter the macro AUC",
        f"- budget (every recipe, every seed): {', '.join(cfg.train_overrides)}",
        f"- wall time {minutes:.1f} min for the whole benchmark (stages: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items() if k != "total") + ")",
        *verdicts,
        f"- summary: `{files['summary.json']}`",
    ])
    record(f"Quality: zero-shot AUC of {', '.join(cfg.recipes)} (synthetic, {len(cfg.seeds)} seeds)", table, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
