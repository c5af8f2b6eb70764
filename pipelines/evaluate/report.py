"""Outputs of ``fvlm evaluate``: metrics.csv, metrics.json, report.md and a self-contained report.html
(per-anatomy table, ROC curves as base64 PNG data URIs; no external reference of any kind).

Beside each image AUC, the text readout ceiling (``pipelines.evaluate.ceiling``) when it was computed:
metrics.csv columns ``text_ceiling_auc``, ``text_ceiling_ci_low``, ``text_ceiling_ci_high``; metrics.json
``text_ceiling`` (``macro``, ``per_anatomy``, ``tasks``, counts); a "text ceiling" column in both reports'
per-anatomy and per-task tables and a macro line in their header. The linear probe
(``pipelines.evaluate.probe``) likewise when it was computed: metrics.csv ``probe_auc``, ``probe_ci_low``,
``probe_ci_high``, ``probe_skipped`` (empty without a probe); metrics.json ``probe`` (the same blocks plus each
task's fit); a "probe" column and a macro line in the reports.

Every AUC (image, ceilings, ROC curves) counts every evaluated case; the validation-threshold metrics are
reported on the cases outside the threshold split."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.atomic import atomic_path, open_atomic, write_text_atomic


def _f(v: Any, nd: int = 3) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _ceiling(ev: Any) -> dict[str, Any] | None:
    return getattr(ev, "ceiling", None)


def _probe(ev: Any) -> dict[str, Any] | None:
    return getattr(ev, "probe", None)


def task_rows(ev: Any) -> list[dict[str, Any]]:
    rows = []
    ceiling, probe = _ceiling(ev), _probe(ev)
    for j, t in enumerate(ev.tasks):
        r = ev.results[t.name]
        c = (ceiling or {}).get("tasks", {}).get(t.name) or {}
        pr = (probe or {}).get("tasks", {}).get(t.name) or {}
        row = {"task": t.name, "title": t.title, "anatomy": t.anatomy or "whole_study", "auc": r.auc.auc,
               "auc_ci_low": r.auc.ci_low, "auc_ci_high": r.auc.ci_high, "text_ceiling_auc": c.get("auc"),
               "text_ceiling_ci_low": c.get("ci_low"), "text_ceiling_ci_high": c.get("ci_high"),
               "probe_auc": pr.get("auc"), "probe_ci_low": pr.get("ci_low"), "probe_ci_high": pr.get("ci_high"),
               "probe_skipped": (probe or {}).get("tasks_skipped", {}).get(t.name) or "", "n_pos": r.n_pos,
               "n_neg": r.n_neg, "n_missing": r.n_missing, "missing_scores": ev.info["missing_scores"][t.name],
               "flag": r.flag or ""}
        for kind in ("validation", "optimistic"):
            m = getattr(r, kind)
            for k in ("threshold", "accuracy", "f1_weighted", "precision", "sensitivity", "specificity"):
                row[f"{kind}_{k}"] = getattr(m, k) if m is not None else None
        rows.append(row)
    return rows


def _roc_png(ev: Any, names: list[str], title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    for j, t in enumerate(ev.tasks):
        if t.name not in names:
            continue
        y, s = ev.labels[:, j], ev.scores[:, j]  # every evaluated case, as the AUC
        keep = ~(np.isnan(y) | np.isnan(s))
        if keep.sum() < 2 or len(np.unique(y[keep])) < 2:
            continue
        fpr, tpr, _ = roc_curve(y[keep], s[keep])
        auc = ev.results[t.name].auc.auc
        ax.plot(fpr, tpr, lw=1, label=f"{t.name} ({_f(auc, 2)})")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def anatomy_rows(ev: Any) -> list[dict[str, Any]]:
    out = []
    ceiling = (_ceiling(ev) or {}).get("per_anatomy", {})
    probe = (_probe(ev) or {}).get("per_anatomy", {})
    for g, block in ev.summary.get("groups", {}).items():
        m = block["macro"]
        ci = m.get("auc_ci") or {}
        out.append({"anatomy": g, "n_included": len(block["included"]), "n_excluded": len(block["excluded"]),
                    "auc": m["auc"], "ci_low": ci.get("ci_low"), "ci_high": ci.get("ci_high"),
                    "text_ceiling": (ceiling.get(g) or {}).get("auc"), "probe": (probe.get(g) or {}).get("auc"),
                    "val_accuracy": m["validation"]["accuracy"], "opt_accuracy": m["optimistic"]["accuracy"]})
    return out


def _macro_clause(m: dict[str, Any], what: str) -> str:
    """"macro AUC 0.812 (95% CI a to b) over n of the same task(s)[; no WHAT AUC for ...]" of a ceiling's macro."""
    ci = m.get("auc_ci") or {}
    without = f"; no {what} AUC for {', '.join(m['tasks_without'])}" if m["tasks_without"] else ""
    return (f"macro AUC {_f(m['auc']) or 'n/a'} (95% CI {_f(ci.get('ci_low'))} to {_f(ci.get('ci_high'))}) over "
            f"{m['n_tasks']} of the same task(s){without}")


def ceiling_lines(ev: Any) -> list[str]:
    """Header lines (markdown list items) on the text readout ceiling; [] when it was not computed."""
    c = _ceiling(ev)
    if c is None:
        return []
    m = c["macro"]
    lines = [f"- text readout ceiling (the same prompts scored against each case's own report texts through the "
             f"text tower: what a perfect image tower could reach): {_macro_clause(m, 'ceiling')}; "
             f"{c['n_cases_with_text']} case(s) with report texts, {c['n_texts_encoded']} distinct text(s) encoded"]
    low = [n for n in m["tasks"] if c["tasks"][n]["auc"] is not None and c["tasks"][n]["auc"] < 0.5]
    if low:
        lines.append(f"- tasks the prompts read inverted even from the texts (ceiling AUC < 0.5): {', '.join(low)}")
    return lines


def probe_lines(ev: Any) -> list[str]:
    """Header lines (markdown list items) on the linear probe; [] when it was not computed."""
    p = _probe(ev)
    if p is None:
        return []
    lines = [f"- linear probe (a logistic regression per task on the frozen image embeddings, {p['readout']} "
             f"features, fitted on the labels of {p['n_train_cases']} training case(s) of `{p['data']}` with C chosen "
             f"by {p['folds']}-fold cross-validation on them): {_macro_clause(p['macro'], 'probe')}; "
             f"{len(p['tasks_skipped'])} task(s) skipped (too few training positives or negatives)"]
    if p.get("n_overlap_cases"):
        lines.append(f"- WARNING: {p['n_overlap_cases']} evaluated case(s) are also probe training cases: the probe "
                     "is not held out for them")
    return lines


def write_maps(ev: Any, out: Path) -> list[dict[str, Any]]:
    """``evaluate --maps``: each map as ``maps/<n>_<case>_<task>.png`` (CT slice, map overlay, anatomy outline;
    matplotlib) or, without matplotlib, the slice arrays as ``.npz``; returns rows for the report sections."""
    rows: list[dict[str, Any]] = []
    if not getattr(ev, "maps", None):
        return rows
    (out / "maps").mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    for n, m in enumerate(ev.maps):
        stem = f"{n:02d}_{m['case_id']}_{m['task']}".replace("/", "_")
        row = {k: m[k] for k in ("case_id", "task", "anatomy", "score", "method", "z")}
        if plt is None:
            with atomic_path(out / "maps" / f"{stem}.npz") as tmp:
                np.savez_compressed(tmp, image=m["image"], map=m["map"], anatomy=m["anatomy_mask"])
            row["file"], row["uri"] = f"maps/{stem}.npz", None
        else:
            fig, ax = plt.subplots(figsize=(3, 3), dpi=80)
            ax.imshow(m["image"], cmap="gray", vmin=0, vmax=1)
            peak = max(float(m["map"].max()), 1e-6)
            ax.imshow(np.ma.masked_where(m["map"] <= 0, m["map"]), cmap="hot", alpha=0.5, vmin=0, vmax=peak)
            if m["anatomy_mask"].any() and not m["anatomy_mask"].all():
                ax.contour(m["anatomy_mask"].astype(float), levels=[0.5], colors="cyan", linewidths=0.6)
            ax.set_title(f"{m['task']} ({_f(m['score'], 2)}), z={m['z']}", fontsize=7)
            ax.axis("off")
            buf = io.BytesIO()
            fig.savefig(buf, format="png", bbox_inches="tight")
            plt.close(fig)
            with atomic_path(out / "maps" / f"{stem}.png") as tmp:
                tmp.write_bytes(buf.getvalue())
            row["file"] = f"maps/{stem}.png"
            row["uri"] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        rows.append(row)
    return rows


def md_table(cols: list, items: list[Any]) -> list[str]:
    """Markdown table lines: ``cols`` a list of (header, cell function of an item)."""
    return (["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
            + ["| " + " | ".join(fn(x) for _, fn in cols) + " |" for x in items])


def html_table(cols: list, items: list[Any]) -> list[str]:
    """HTML table parts (the caller closes it with ``</table>``): ``cols`` as :func:`md_table`, escaped."""
    e = html.escape
    head_row = "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h, _ in cols) + "</tr>"
    return [head_row] + ["<tr>" + "".join(f"<td>{e(fn(x))}</td>" for _, fn in cols) + "</tr>" for x in items]


def html_head(title: str) -> list[str]:
    """The opening parts of a self-contained report page (inline style, no external reference)."""
    return [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid "
            "#ccc;padding:2px 6px;font-size:13px}img{margin:4px}</style></head><body>"]


def write_outputs(ev: Any, out: Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = task_rows(ev)
    with open_atomic(out / "metrics.csv", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["task"])
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    doc = {"info": ev.info, "macro": ev.summary["macro"], "included": ev.summary["included"],
           "excluded": ev.summary["excluded"], "per_anatomy": ev.summary.get("groups", {}),
           "tasks": {t.name: ev.results[t.name].to_dict() for t in ev.tasks}, "text_ceiling": _ceiling(ev),
           "probe": _probe(ev)}
    write_text_atomic(out / "metrics.json", json.dumps(doc, indent=2, default=float) + "\n")

    macro = ev.summary["macro"]
    ci = macro.get("auc_ci") or {}
    lab = ev.info["labels"]
    silver = " (SILVER labels: parsed from the reports)" if lab["kind"] in ("silver", "mixed") else ""
    head = [
        f"# Zero-shot evaluation: {ev.info['tasks']}",
        "",
        f"- checkpoint: `{ev.info['checkpoint']}`; data: `{ev.info['data']}`",
        f"- cases: {ev.info['n_cases']}, all of them in every AUC; "
        + (f"validation thresholds chosen on {ev.info['n_validation']} of them, their metrics reported on the other "
           f"{ev.info['n_threshold_eval']}" if ev.info["n_validation"] else "no validation split for thresholds"),
        f"- labels: {lab['kind']} from {lab['source']}{silver}",
        f"- partial coverage: {len(lab['missing_cases'])} case(s) and {len(lab['missing_tasks'])} task(s) "
        f"missing from the labels" + (f": tasks {', '.join(lab['missing_tasks'])}" if lab["missing_tasks"] else ""),
        f"- prompts: {ev.info.get('prompts', 'catalog')}, template set {ev.info.get('templates')}",
        f"- view: {ev.info['view']['mode']} {ev.info['view']['crop_size_zyx']} ({ev.info['view']['source']}); "
        f"{ev.info['view_note']}",
        f"- readout: {ev.info['readout']} ({ev.info['readout_source']})",
        f"- macro AUC over {macro['n_tasks']} task(s): {_f(macro['auc'])} "
        f"(95% CI {_f(ci.get('ci_low'))} to {_f(ci.get('ci_high'))}; {ev.info['n_boot']} resamples, seed "
        f"{ev.info['seed']})",
        *ceiling_lines(ev),
        *probe_lines(ev),
        f"- flagged / excluded from the means: {len(ev.summary['excluded'])} task(s)",
        "- 'optimistic' metrics use a threshold chosen on the very cases they score (the reference's practice)",
        "",
    ]
    arows = anatomy_rows(ev)
    has_probe = _probe(ev) is not None
    # (header, cell) per column; the probe column only when the probe was computed
    acols = [("anatomy", lambda a: a["anatomy"]), ("tasks", lambda a: str(a["n_included"])),
             ("excluded", lambda a: str(a["n_excluded"])), ("AUC", lambda a: _f(a["auc"])),
             ("95% CI", lambda a: f"{_f(a['ci_low'])}-{_f(a['ci_high'])}"),
             ("text ceiling", lambda a: _f(a["text_ceiling"]))]
    acols += [("probe", lambda a: _f(a["probe"]))] if has_probe else []
    acols += [("acc (val thr)", lambda a: _f(a["val_accuracy"])), ("acc (optimistic)", lambda a: _f(a["opt_accuracy"]))]
    tcols = [("task", lambda r: r["task"]), ("anatomy", lambda r: r["anatomy"]), ("AUC", lambda r: _f(r["auc"])),
             ("95% CI", lambda r: f"{_f(r['auc_ci_low'])}-{_f(r['auc_ci_high'])}"),
             ("text ceiling", lambda r: _f(r["text_ceiling_auc"]))]
    tcols += [("probe", lambda r: _f(r["probe_auc"]))] if has_probe else []
    tcols += [("pos", lambda r: str(r["n_pos"])), ("neg", lambda r: str(r["n_neg"])),
              ("missing", lambda r: str(r["n_missing"])), ("flag", lambda r: r["flag"])]
    tcols_md = tcols + [("sens (val)", lambda r: _f(r["validation_sensitivity"])),
                        ("spec (val)", lambda r: _f(r["validation_specificity"])),
                        ("sens (optimistic)", lambda r: _f(r["optimistic_sensitivity"])),
                        ("spec (optimistic)", lambda r: _f(r["optimistic_specificity"]))]

    md = head + ["## Per anatomy", ""] + md_table(acols, arows)
    md += ["", "## Per task", ""] + md_table(tcols_md, rows)
    map_rows = write_maps(ev, out)
    if map_rows:
        md += ["", "## Localisation maps", "", "Top-scoring positive finding of the first cases with one; axial slice "
               "through the map's peak on the evaluation view (central crop or resize).", "",
               "| case | task | anatomy | score | map | slice z | file |", "|---|---|---|---|---|---|---|"]
        md += [f"| {r['case_id']} | {r['task']} | {r['anatomy']} | {_f(r['score'])} | {r['method']} | {r['z']} | "
               f"[{r['file']}]({r['file']}) |" for r in map_rows]
    write_text_atomic(out / "report.md", "\n".join(md) + "\n")

    e = html.escape
    parts = html_head("fvlm zero-shot evaluation")
    parts.append(f"<h1>Zero-shot evaluation: {e(ev.info['tasks'])}</h1><ul>")
    parts += [f"<li>{e(line[2:])}</li>" for line in head[2:] if line.startswith("- ")]

    long_names = {"acc (val thr)": "accuracy (validation threshold)", "acc (optimistic)": "accuracy (optimistic)"}
    hcols = [(long_names.get(h, h), fn) for h, fn in acols]
    parts.append("</ul><h2>Per anatomy</h2>")
    parts += html_table(hcols, arows)
    parts.append("</table><h2>ROC curves (every evaluated case)</h2><div>")
    by: dict[str, list[str]] = {}
    for t in ev.tasks:
        by.setdefault(t.anatomy or "whole_study", []).append(t.name)
    for g, names in by.items():
        parts.append(f'<img alt="ROC {e(g)}" src="{_roc_png(ev, names, g)}">')
    parts.append("</div><h2>Per task</h2>")
    parts += html_table(tcols, rows)
    parts.append("</table>")
    if map_rows:
        parts.append("<h2>Localisation maps</h2><p>Top-scoring positive finding of the first cases with one; axial "
                     "slice through the map's peak on the evaluation view.</p><div>")
        parts += [f'<figure style="display:inline-block"><img alt="{e(r["task"])}" src="{r["uri"]}"><figcaption>'
                  f'{e(r["case_id"])}: {e(r["task"])} ({e(r["method"])})</figcaption></figure>' if r["uri"] else
                  f"<p>{e(r['case_id'])}: {e(r['task'])}: arrays in {e(r['file'])}</p>" for r in map_rows]
        parts.append("</div>")
    parts.append("</body></html>")
    write_text_atomic(out / "report.html", "\n".join(parts) + "\n")
    return {k: out / k for k in ("metrics.csv", "metrics.json", "report.md", "report.html")}
