"""The comparison of the recipes a demo run trained: ``summary.json``, ``report.md``, ``report.html`` and the
table printed at the end.

Per run (recipe x seed): macro AUC over the tasks with enough positives and negatives in the held-out
cohort (the same tasks for every recipe: the flags depend on the labels only), its 95% bootstrap interval
over cases, the macro AUC per anatomy with its interval, the text readout ceiling of the same prompts
(``text_ceiling_macro_auc``; ``pipelines.evaluate.ceiling``) and, with ``evaluate.probe``, the linear probe
(``probe_macro_auc``; ``pipelines.evaluate.probe``), both over the same tasks and cases. Per recipe: the mean
over seeds (and the standard deviation across seeds when there are several); the tables show the ceilings
as rows under the macro AUC. With ``evaluate.visible`` (a geometry of ``configs/synth/findings.yaml``) the
headline is the macro over the included tasks visible at that geometry (``visible_macro_auc``, a "MACRO visible"
row), and the comparisons are over those tasks. For each of the config's ``comparisons`` (recipe, reference): the paired
bootstrap difference of the macro AUC on the same held-out cases, every one of them
(:func:`fvlm.metrics.paired_macro_auc_difference`), per seed.
"""

from __future__ import annotations

import html
import json
import math
import platform
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from fvlm.metrics import macro_auc_with_ci, paired_macro_auc_difference
from pipelines.evaluate.report import anatomy_rows
from pipelines.atomic import write_text_atomic
from pipelines.demo.config import DemoConfig
from pipelines.demo.run import DemoResult, RunKey, run_key_name

__all__ = ["build_summary", "write_summary", "format_table"]


def _f(v: float | None, nd: int = 3, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:+.{nd}f}" if sign else f"{v:.{nd}f}"


def _run_entry(ev: Any, seconds: float, report: Path) -> dict[str, Any]:
    macro = ev.summary["macro"]
    ci = macro.get("auc_ci") or {}
    per = {r["anatomy"]: {"auc": r["auc"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "n_tasks": r["n_included"]}
           for r in anatomy_rows(ev)}
    ceiling = getattr(ev, "ceiling", None)  # the text readout ceiling of the same prompts (fvlm evaluate)
    probe = getattr(ev, "probe", None)  # the linear probe on the frozen image embeddings (fvlm evaluate)
    return {"macro_auc": macro["auc"], "ci_low": ci.get("ci_low"), "ci_high": ci.get("ci_high"),
            "n_tasks": macro["n_tasks"], "per_anatomy": per, "train_seconds": round(seconds, 1),
            "text_ceiling_macro_auc": ceiling["macro"]["auc"] if ceiling else None,
            "probe_macro_auc": probe["macro"]["auc"] if probe else None,
            "readout": ev.info.get("readout"), "report": str(report)}


#: the ceilings beside each zero-shot macro AUC: (run entry key, label)
CEILINGS = (("text_ceiling_macro_auc", "text readout ceiling"), ("probe_macro_auc", "linear probe"))


def _ceiling_note(run: dict[str, Any]) -> str:
    """" (text readout ceiling 0.912; linear probe 0.850)" for the ceilings the run's evaluation computed."""
    notes = [f"{label} {_f(run[k])}" for k, label in CEILINGS if run.get(k) is not None]
    return f" ({'; '.join(notes)})" if notes else ""


def _test_arrays(ev: Any, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) (N, len(names)) of every held-out case: the cases the AUCs count."""
    cols = [next(j for j, t in enumerate(ev.tasks) if t.name == n) for n in names]
    return ev.labels[:, cols], ev.scores[:, cols]


def headline_tasks(cfg: DemoConfig, included: list[str]) -> list[str]:
    """The tasks of the headline macro AUC and the comparisons: the included ones, restricted to those visible at
    ``cfg.evaluate.visible``'s geometry when set (``configs/synth/findings.yaml``)."""
    if not cfg.evaluate.visible:
        return list(included)
    from pipelines.synth.findings import visible_tasks

    visible = set(visible_tasks(cfg.evaluate.visible))
    return [t for t in included if t in visible]


def _visible_entry(ev: Any, names: list[str], n_boot: int) -> dict[str, Any]:
    """Macro AUC over ``names`` (every held-out case) with its joint bootstrap interval."""
    if not names:
        return {"visible_macro_auc": None, "visible_ci_low": None, "visible_ci_high": None, "visible_n_tasks": 0}
    y, s = _test_arrays(ev, names)
    m = macro_auc_with_ci(y, s, n_boot=n_boot, seed=0, task_names=names)
    return {"visible_macro_auc": m.auc, "visible_ci_low": m.ci_low, "visible_ci_high": m.ci_high,
            "visible_n_tasks": len(names)}


def build_summary(cfg: DemoConfig, result: DemoResult) -> dict[str, Any]:
    """The JSON-ready comparison (module docstring)."""
    recipes: dict[str, Any] = {}
    first = next(iter(result.evaluations.values()), None)
    headline = headline_tasks(cfg, list(first.summary["included"])) if first is not None else []
    for key, ev in result.evaluations.items():
        name = run_key_name(key, cfg)
        entry = _run_entry(ev, result.train_seconds.get(key, 0.0), result.out / "eval" / name / "report.html")
        if cfg.evaluate.visible:
            entry.update(_visible_entry(ev, headline, cfg.evaluate.n_boot))
        recipes.setdefault(key.recipe, {"runs": {}})["runs"][str(key.seed)] = entry
    for r, block in recipes.items():
        runs = list(block["runs"].values())
        vals = [x["macro_auc"] for x in runs if x["macro_auc"] is not None]
        block["macro_auc"] = statistics.fmean(vals) if vals else None
        block["macro_auc_sd"] = statistics.stdev(vals) if len(vals) > 1 else None
        if cfg.evaluate.visible:
            vv = [x["visible_macro_auc"] for x in runs if x.get("visible_macro_auc") is not None]
            block["visible_macro_auc"] = statistics.fmean(vv) if vv else None
            block["visible_macro_auc_sd"] = statistics.stdev(vv) if len(vv) > 1 else None
            if len(runs) == 1:
                block["visible_ci_low"], block["visible_ci_high"] = runs[0]["visible_ci_low"], runs[0]["visible_ci_high"]
        for k, _ in CEILINGS:
            cv = [x[k] for x in runs if x.get(k) is not None]
            block[k] = statistics.fmean(cv) if cv else None
            block[f"{k}_sd"] = statistics.stdev(cv) if len(cv) > 1 else None
        if len(runs) == 1:  # one seed: the run's own bootstrap interval
            block["ci_low"], block["ci_high"] = runs[0]["ci_low"], runs[0]["ci_high"]
        per: dict[str, Any] = {}
        for g in runs[0]["per_anatomy"]:
            gv = [x["per_anatomy"][g]["auc"] for x in runs if x["per_anatomy"].get(g, {}).get("auc") is not None]
            per[g] = {"auc": statistics.fmean(gv) if gv else None,
                      "sd": statistics.stdev(gv) if len(gv) > 1 else None,
                      "n_tasks": runs[0]["per_anatomy"][g]["n_tasks"]}
            if len(runs) == 1:
                per[g].update(ci_low=runs[0]["per_anatomy"][g]["ci_low"], ci_high=runs[0]["per_anatomy"][g]["ci_high"])
        block["per_anatomy"] = per

    comparisons = []
    for recipe, ref_name in cfg.comparisons:
        for seed in cfg.seeds:
            ev, ref = result.evaluations.get(RunKey(recipe, seed)), result.evaluations.get(RunKey(ref_name, seed))
            if ev is None or ref is None or not ref.summary["included"]:
                continue
            names = headline_tasks(cfg, list(ref.summary["included"]))
            if not names:
                continue
            y, s_a = _test_arrays(ev, names)
            _, s_b = _test_arrays(ref, names)
            d = paired_macro_auc_difference(y, s_a, s_b, n_boot=cfg.evaluate.n_boot, seed=0)
            comparisons.append({"recipe": recipe, "reference": ref_name, "seed": seed, "n_tasks": len(names), **d})
    return {
        "config": cfg.name, "config_file": cfg.source, "output": str(result.out),
        "cohort": {"train_cases": cfg.cohort.train_cases, "test_cases": cfg.cohort.test_cases,
                   "seed": cfg.cohort.seed, "test_seed": cfg.cohort.seed + 1},
        "tasks": cfg.tasks, "n_test_cases": first.info["n_eval"] if first is not None else 0,
        "tasks_included": list(first.summary["included"]) if first is not None else [],
        "tasks_excluded": dict(first.summary["excluded"]) if first is not None else {},
        "visible": cfg.evaluate.visible, "tasks_headline": headline,
        "train_overrides": list(cfg.train_overrides), "seeds": list(cfg.seeds),
        "recipes": recipes, "comparisons": comparisons,
        "seconds": {k: round(v, 1) for k, v in result.stage_seconds.items()},
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
    }


def _cell(block: dict[str, Any], multi: bool) -> str:
    if block.get("auc", block.get("macro_auc")) is None:
        return "n/a"
    v = block.get("auc", block.get("macro_auc"))
    if multi:
        sd = block.get("sd", block.get("macro_auc_sd"))
        return f"{v:.3f} ± {sd:.3f}" if sd is not None else f"{v:.3f}"
    return f"{v:.3f} ({_f(block.get('ci_low'))}-{_f(block.get('ci_high'))})"


def table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    recipes = list(summary["recipes"])
    multi = len(summary["seeds"]) > 1
    header = ["anatomy", "tasks"] + recipes
    rows = []
    first = summary["recipes"][recipes[0]] if recipes else {"per_anatomy": {}}
    for g, b in first["per_anatomy"].items():
        rows.append([g, str(b["n_tasks"])] + [_cell(summary["recipes"][r]["per_anatomy"].get(g, {}), multi)
                                              for r in recipes])
    rows.append(["MACRO", str(len(summary["tasks_included"]))] + [_cell(summary["recipes"][r], multi) for r in recipes])
    if summary.get("visible"):  # the headline: the included tasks visible at the benchmark geometry
        rows.append(["MACRO visible", str(len(summary["tasks_headline"]))] +
                    [_cell({"auc": summary["recipes"][r].get("visible_macro_auc"),
                            "sd": summary["recipes"][r].get("visible_macro_auc_sd"),
                            "ci_low": summary["recipes"][r].get("visible_ci_low"),
                            "ci_high": summary["recipes"][r].get("visible_ci_high")}, multi) for r in recipes])
    for k, label in CEILINGS:  # same tasks and cases as MACRO
        blocks = [summary["recipes"][r] for r in recipes]
        if any(b.get(k) is not None for b in blocks):
            rows.append([label, str(len(summary["tasks_included"]))] +
                        [_cell({"auc": b.get(k), "sd": b.get(f"{k}_sd")}, True) for b in blocks])
    return header, rows


def comparison_lines(summary: dict[str, Any]) -> list[str]:
    out = []
    for c in summary["comparisons"]:
        over = f" over the {c['n_tasks']} visible tasks" if summary.get("visible") and "n_tasks" in c else ""
        out.append(f"{c['recipe']} - {c['reference']} (seed {c['seed']}): {_f(c['delta'], sign=True)} macro AUC{over}, "
                   f"95% CI {_f(c['ci_low'], sign=True)} to {_f(c['ci_high'], sign=True)} (paired bootstrap over "
                   f"all {summary['n_test_cases']} held-out cases)")
    return out


def format_table(summary: dict[str, Any]) -> str:
    """The plain-text table printed at the end of ``fvlm demo``."""
    header, rows = table_rows(summary)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    what = ("mean ± sd over seeds " + ", ".join(map(str, summary["seeds"])) if len(summary["seeds"]) > 1
            else "AUC (95% bootstrap interval)")
    ceilings = [label for k, label in CEILINGS if any(b.get(k) is not None for b in summary["recipes"].values())]
    beside = f"; {' and '.join(ceilings)}: macro over the same tasks" if ceilings else ""
    out = [f"zero-shot AUC on {summary['n_test_cases']} held-out synthetic cases, {what}; per anatomy = macro "
           f"over its tasks with enough positives{beside}", line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out += comparison_lines(summary)
    return "\n".join(out)


def write_summary(cfg: DemoConfig, result: DemoResult) -> tuple[dict[str, Path], dict[str, Any]]:
    """summary.json, report.md and report.html in the demo's output folder; returns (files, summary)."""
    summary = build_summary(cfg, result)
    out = result.out
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, default=float) + "\n")
    header, rows = table_rows(summary)
    md = [f"# fvlm demo: {cfg.name}", "", cfg.description, "",
          f"- cohorts: {cfg.cohort.train_cases} training cases (seed {cfg.cohort.seed}), "
          f"{cfg.cohort.test_cases} held-out cases (seed {cfg.cohort.seed + 1}); {summary['n_test_cases']} scored, "
          f"every one in the AUCs",
          f"- same budget for every recipe: {', '.join(cfg.train_overrides)}; seeds {', '.join(map(str, cfg.seeds))}",
          f"- tasks: {len(summary['tasks_included'])} of {cfg.tasks} with enough positives; "
          f"{len(summary['tasks_excluded'])} excluded (listed in each run's report)",
          "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += [""] + [f"- {c}" for c in comparison_lines(summary)]
    md += ["", "## Runs", ""]
    for r, block in summary["recipes"].items():
        for seed, run in block["runs"].items():
            md.append(f"- {r} seed {seed}: macro AUC {_f(run['macro_auc'])}{_ceiling_note(run)}, trained in "
                      f"{run['train_seconds']:.0f} s, report `{Path(run['report']).relative_to(out)}`")
    write_text_atomic(out / "report.md", "\n".join(md) + "\n")

    e = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>fvlm demo</title><style>body{font-family:"
             "sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;"
             "font-size:13px}</style></head><body>", f"<h1>fvlm demo: {e(cfg.name)}</h1><p>{e(cfg.description)}</p><ul>"]
    parts += [f"<li>{e(line[2:])}</li>" for line in md if line.startswith("- cohorts") or line.startswith("- same")
              or line.startswith("- tasks")]
    parts.append("</ul><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
    parts.append("</table><ul>" + "".join(f"<li>{e(c)}</li>" for c in comparison_lines(summary)) + "</ul><h2>Runs</h2><ul>")
    for r, block in summary["recipes"].items():
        for seed, run in block["runs"].items():
            rel = Path(run["report"]).relative_to(out).as_posix()
            parts.append(f"<li>{e(r)} seed {e(seed)}: macro AUC {_f(run['macro_auc'])}{e(_ceiling_note(run))}, "
                         f"trained in {run['train_seconds']:.0f} s: <a href=\"{e(rel)}\">{e(rel)}</a></li>")
    parts.append("</ul></body></html>")
    write_text_atomic(out / "report.html", "\n".join(parts) + "\n")
    return {k: out / k for k in ("summary.json", "report.md", "report.html")}, summary
