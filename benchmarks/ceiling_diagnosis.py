"""Why a task's text readout ceiling is low: where the trained text tower puts the held-out anatomy texts
between the task's positive and negative prompts, split by what the report says about the task.

The text readout ceiling (``fvlm evaluate``; ``pipelines/evaluate/ceiling.py``) scores each case's own anatomy
text against the task's prompts: score = softmax([s_neg, s_pos] * scale)[pos]. For each task this benchmark
groups the texts of the anatomy by the parser's status of the task (``case.json`` ``statuses``, what the
report says; the ground-truth label decides the AUC):

* ``present``: the text asserts the finding (or hedges it);
* ``denied``: the text names the finding and negates it ("No hepatic steatosis was detected.");
* ``silent``: the text does not name the finding (other sentences, normal statements).

and reports each group's mean score, the AUC of present vs denied (does the tower read negation?) and of
present vs silent (does it read the finding words at all?). A ceiling below 0.5 with present ~ denied means the
tower embeds a negated mention like an asserted one; present ~ silent means the finding words barely move the
embedding.

    .venv/bin/python -m benchmarks.ceiling_diagnosis --run data/bench-quality/runs/fvlm-disease-s0 \\
        --data data/bench-quality/prep/test --below 0.70
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.record import markdown_table, record


def diagnose(run: Path, data: Path, tasks_name: str = "fvlm54", templates: str = "report") -> list[dict]:
    from anatomy.catalog import load_task_catalog
    from fvlm import metrics as M
    from fvlm.model import load_pretrained
    from fvlm.zeroshot import encode_prompts
    from pipelines.cases.format import read_index, read_run, run_anatomy_names
    from pipelines.evaluate.ceiling import ceiling_scores, text_lengths

    model, tok = load_pretrained(run / "model")
    model.eval()
    catalog = load_task_catalog(tasks_name)
    names = run_anatomy_names(read_run(data))
    rows = read_index(data)
    cases = [json.loads((data / "cases" / r["case_id"] / "case.json").read_text()) for r in rows]
    tasks = [t for t in catalog.tasks if t.anatomy in names]
    bank = encode_prompts(model, tok, catalog, templates=templates, tasks=[t.name for t in tasks])
    scores, _ = ceiling_scores(model, tok, cases, names, bank, text_lengths(run, model))  # (N, T)
    out = []
    for j, t in enumerate(tasks):
        truth = np.array([float((c.get("labels") or {}).get(t.name, np.nan)) for c in cases])
        status = [((c["report"]["parsed"]["anatomies"].get(t.anatomy) or {}).get("statuses") or {}).get(t.name)
                  for c in cases]
        s = scores[:, j]
        groups = {g: np.array([k for k, st in enumerate(status) if st in sts and not np.isnan(s[k])])
                  for g, sts in (("present", ("present", "uncertain")), ("denied", ("absent",)),
                                 ("silent", ("not_mentioned",)))}

        def auc(a: str, b: str) -> float | None:
            ia, ib = groups[a], groups[b]
            if not len(ia) or not len(ib):
                return None
            y = np.r_[np.ones(len(ia)), np.zeros(len(ib))]
            return M.auc_with_ci(y, np.r_[s[ia], s[ib]], n_boot=0).auc

        ceiling = M.auc_with_ci(truth, s, n_boot=0).auc if np.nansum(truth) >= 1 else None
        out.append({"task": t.name, "anatomy": t.anatomy, "positives": int(np.nansum(truth)), "ceiling": ceiling,
                    **{f"n_{g}": len(v) for g, v in groups.items()},
                    **{f"mean_{g}": float(s[v].mean()) if len(v) else None for g, v in groups.items()},
                    "present_vs_denied": auc("present", "denied"), "present_vs_silent": auc("present", "silent")})
    return out


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--tasks", default="fvlm54")
    ap.add_argument("--min-positives", type=int, default=5)
    ap.add_argument("--below", type=float, default=0.70)
    args = ap.parse_args(argv)
    res = [r for r in diagnose(args.run, args.data, args.tasks) if r["positives"] >= args.min_positives]
    res.sort(key=lambda r: (r["ceiling"] is None, r["ceiling"] or 0.0))
    rows = [[r["task"], r["anatomy"], r["positives"], _f(r["ceiling"]), f"{r['n_present']}/{r['n_denied']}/{r['n_silent']}",
             _f(r["mean_present"]), _f(r["mean_denied"]), _f(r["mean_silent"]), _f(r["present_vs_denied"]),
             _f(r["present_vs_silent"])] for r in res]
    table = markdown_table(["task", "anatomy", "positives", "ceiling AUC", "texts present/denied/silent",
                            "mean score present", "denied", "silent", "AUC present vs denied",
                            "AUC present vs silent"], rows)
    low = [r for r in res if r["ceiling"] is not None and r["ceiling"] < args.below]
    negation = [r["task"] for r in low if r["present_vs_denied"] is not None and r["present_vs_denied"] < 0.6]
    words = [r["task"] for r in low if r["present_vs_silent"] is not None and r["present_vs_silent"] < 0.6]
    notes = (f"- run `{args.run}`, held-out cases `{args.data}`, template set report; tasks with at least "
             f"{args.min_positives} positives; groups by the parser's status of the task in the anatomy text\n"
             f"- ceiling below {args.below:.2f}: {len(low)} of {len(res)} tasks; of those, the tower scores a "
             f"denied mention about like an asserted one (present vs denied < 0.6) for "
             f"{', '.join(negation) or 'none'}; and it scores a text that never names the finding about like one "
             f"that asserts it (present vs silent < 0.6) for {', '.join(words) or 'none'}")
    record(f"Text readout ceiling: why tasks are low ({args.run.name})", table, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
