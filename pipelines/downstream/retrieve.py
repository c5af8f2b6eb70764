"""``fvlm retrieve``: image -> report and report -> image retrieval over a held-out ``fvlm embed`` export.

Case level (each case one image and one report; ``pipelines.evaluate.readout`` decides which embeddings, as
``fvlm evaluate`` reads a run):

* ``anatomy`` readout (the anatomy-level recipes): the case's image is the mean of its embedded anatomies'
  image embeddings, its report the mean of its anatomy texts' embeddings (as the model forms a case-level text
  when it has no report), each L2-normalised::

      v_i = normalize( sum_a m_ia e_ia / sum_a m_ia )      m: anatomy_mask (image) or text_mask (report)

  Two reports count as the same answer when their anatomy texts are identical (the same ``text_group`` for
  every anatomy).
* ``global`` readout (``clip``): the whole-scan embedding against the whole-report embedding; two reports are
  the same answer when their texts are identical (``report_group``).

Cases without an image (no anatomy embedded) or without a report text are left out. Anatomy level: for each
anatomy, its image embedding against its report text over the cases that have both; identical texts (e.g.
"The liver is normal.") are all correct answers. Under the ``global`` readout the per-anatomy embeddings never
met a loss, and the anatomy level says so.

Metrics (``fvlm.retrieval``): recall@k and median rank per direction, with their chance level (a random
ordering of the same gallery). Image -> report ranks the distinct reports, one per group of identical texts
(:func:`both_directions`: identical texts embed identically, so no model can rank copies apart, and a gallery
with a block of identical normal texts would give a chance level no model reaches); report -> image ranks
every image, the images of identical reports all right. The anatomy level reports each
anatomy and the mean over anatomies with at least ``--min-cases`` cases.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

EXAMPLE = """example:
  fvlm embed --checkpoint runs/fvlm --data data/prep-test --output emb/test
  fvlm retrieve --embeddings emb/test --output reports/retrieval
  fvlm retrieve --embeddings emb/test --readout global --ks 1,5,10,50
"""

DIRECTIONS = ("image->report", "report->image")


def _ks(text: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ks must be comma-separated integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"--ks must be positive integers, got {text!r}")
    return ks


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrieve", help="image <-> report retrieval on held-out embeddings: recall@k and median rank vs chance",
        description="Retrieve each held-out case's report from its image and its image from its report (case "
        "level), and each anatomy's text from its image region (anatomy level), over an fvlm embed export: "
        "recall@k and median rank, each beside its chance level.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", required=True, type=Path, help="held-out cohort's fvlm embed output")
    p.add_argument("--readout", choices=("auto", "anatomy", "global"), default="auto",
                   help="case-level embeddings: anatomy (mean of present anatomies), global (whole scan and whole "
                   "report), auto (default: as fvlm embed recorded from the run's recipe; global for clip)")
    p.add_argument("--ks", type=_ks, default=[1, 5, 10], help="recall cut-offs (default 1,5,10)")
    p.add_argument("--min-cases", type=int, default=2,
                   help="cases an anatomy needs to enter the anatomy-level mean (default 2)")
    p.add_argument("--output", type=Path, default=None,
                   help="folder for retrieval.json, retrieval.csv and report.md (default: print only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    res = retrieve(args.embeddings, readout=args.readout, ks=args.ks, min_cases=args.min_cases)
    print("\n".join(text_lines(res)))
    if args.output is not None:
        files = write_outputs(res, args.output)
        print(f"outputs: {', '.join(str(p) for p in files.values())}")
    return 0


def _mean_rows(emb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, D) L2-normalised mean of ``emb`` (N, A, D) over the rows where ``mask`` (N, A); zero where none."""
    m = mask.astype(np.float64)[..., None]  # (N, A, 1)
    v = (emb.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1.0)  # (N, D)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def case_level(emb: dict[str, Any], readout: str) -> tuple[np.ndarray, np.ndarray, list[Any], np.ndarray]:
    """(images (N, D), reports (N, D), report group keys (N,), kept (N,) bool) at the case level (module
    docstring)."""
    if readout == "global":
        keep = np.asarray(emb["report_mask"], bool) & np.asarray(emb["anatomy_mask"], bool).any(1)
        groups = [int(g) for g in emb["report_group"]]
        return emb["global_image_emb"], emb["report_emb"], groups, keep
    if readout != "anatomy":
        raise ValueError(f"readout must be anatomy or global, got {readout!r}")
    image_mask, text_mask = np.asarray(emb["anatomy_mask"], bool), np.asarray(emb["text_mask"], bool)
    keep = image_mask.any(1) & text_mask.any(1)
    groups = [tuple(int(g) for g in row) for row in np.where(text_mask, emb["text_group"], -1)]
    return _mean_rows(emb["image_emb"], image_mask), _mean_rows(emb["text_emb"], text_mask), groups, keep


def both_directions(images: np.ndarray, reports: np.ndarray, groups: Sequence[Any], ks: Sequence[int]
                    ) -> dict[str, dict[str, Any]]:
    """``fvlm.retrieval.retrieval_metrics`` of image -> report and report -> image over paired rows.

    Image -> report ranks the *distinct* reports (one gallery item per group of identical texts): identical
    texts have identical embeddings under any model, so a model can only order distinct texts, and a chance
    level that shuffles the copies apart (a block of 700 identical normal texts interleaved with the rest) is
    one no model can reach. Report -> image ranks every image (images are distinct); the images of every
    report identical to the query's are right."""
    from fvlm.retrieval import cosine_similarity, group_match, retrieval_metrics

    first: dict[Any, int] = {}
    for i, g in enumerate(groups):
        first.setdefault(g, i)
    distinct = list(first.values())  # one row per group of identical reports
    sim_i2r = cosine_similarity(images, reports[distinct])  # (N, U): image i against distinct report u
    match_i2r = group_match(groups, [groups[i] for i in distinct])  # (N, U)
    sim = cosine_similarity(images, reports)  # (N, N): image i against report j
    match = group_match(groups, groups)  # (N, N): report j is as right as report i
    return {"image->report": retrieval_metrics(sim_i2r, match_i2r, ks),
            "report->image": retrieval_metrics(sim.T, match.T, ks)}


def retrieve(embeddings: Path, *, readout: str = "auto", ks: Sequence[int] = (1, 5, 10), min_cases: int = 2
             ) -> dict[str, Any]:
    """Case- and anatomy-level retrieval metrics of an export (module docstring)."""
    from pipelines.downstream.store import read_embeddings

    if min_cases < 2:
        raise ValueError(f"--min-cases must be at least 2, got {min_cases}")
    emb = read_embeddings(embeddings, "--embeddings")
    if readout not in ("auto", "anatomy", "global"):
        raise ValueError(f"--readout must be auto, anatomy or global, got {readout!r}")
    read = emb["meta"].get("readout", "anatomy") if readout == "auto" else readout
    images, reports, groups, keep = case_level(emb, read)
    if keep.sum() < 2:
        raise ValueError(f"--embeddings {embeddings}: {int(keep.sum())} case(s) with both an embedded image and a "
                         "report text; retrieval needs at least 2")
    idx = np.flatnonzero(keep)
    case = {"readout": read, "n_cases": int(len(idx)), "n_left_out": int((~keep).sum()),
            "n_distinct_reports": len(set(groups[i] for i in idx)),
            **both_directions(images[idx], reports[idx], [groups[i] for i in idx], ks)}
    per: dict[str, Any] = {}
    for a, name in enumerate(emb.anatomy_names):
        have = np.flatnonzero(np.asarray(emb["anatomy_mask"][:, a], bool) & np.asarray(emb["text_mask"][:, a], bool))
        if len(have) < min_cases:
            per[name] = {"n_cases": int(len(have)), "reason": f"fewer than {min_cases} cases with image and text"}
            continue
        g = [int(x) for x in emb["text_group"][have, a]]
        per[name] = {"n_cases": int(len(have)), "n_distinct_texts": len(set(g)),
                     **both_directions(emb["image_emb"][have, a], emb["text_emb"][have, a], g, ks)}
    scored = [n for n, b in per.items() if "reason" not in b]
    mean: dict[str, Any] = {"n_anatomies": len(scored), "anatomies": scored}
    for d in DIRECTIONS:
        if scored:
            keys = [k for k in per[scored[0]][d] if k not in ("n_queries", "n_gallery")]
            mean[d] = {k: float(np.mean([per[n][d][k] for n in scored])) for k in keys}
    anatomy = {"per_anatomy": per, "mean": mean,
               "note": ("global readout: the per-anatomy embeddings of a whole-scan recipe never met a loss; the "
                        "anatomy level reads an untrained pooling head") if read == "global" else ""}
    info = {"embeddings": str(embeddings), "model": emb["meta"].get("model"), "n_cases": emb.n, "ks": list(ks),
            "readout": read, "readout_source": "command line" if readout != "auto" else "fvlm embed's meta.json",
            "view": emb["meta"].get("view", {}).get("kind"), "min_cases": min_cases}
    return {"info": info, "case": case, "anatomy": anatomy}


def _cells(m: dict[str, Any], ks: Sequence[int]) -> list[str]:
    return ([f"{m[f'recall@{k}']:.3f} ({m[f'chance_recall@{k}']:.3f})" for k in ks]
            + [f"{m['median_rank']:.1f} ({m['chance_median_rank']:.1f})"])


def tables(res: dict[str, Any]) -> dict[str, list[list[str]]]:
    """Rows (header first) of the case-level and anatomy-level tables: value (chance) per metric."""
    ks = res["info"]["ks"]
    header = ["level", "direction", "queries"] + [f"R@{k} (chance)" for k in ks] + ["median rank (chance)"]
    case = [header] + [["case", d, str(res["case"][d]["n_queries"]), *_cells(res["case"][d], ks)] for d in DIRECTIONS]
    anat = [header]
    mean = res["anatomy"]["mean"]
    for d in DIRECTIONS:
        if d in mean:
            anat.append([f"mean of {mean['n_anatomies']} anatomies", d, "", *_cells(mean[d], ks)])
    for name, b in res["anatomy"]["per_anatomy"].items():
        if "reason" not in b:
            anat += [[name, d, str(b[d]["n_queries"]), *_cells(b[d], ks)] for d in DIRECTIONS]
    return {"case": case, "anatomy": anat}


def text_lines(res: dict[str, Any]) -> list[str]:
    """The printed summary: the two tables as aligned text."""
    c = res["case"]
    lines = [f"retrieval over {c['n_cases']} held-out case(s) ({c['n_left_out']} without an image or a report left "
             f"out, {c['n_distinct_reports']} distinct report(s)); case level: {res['info']['readout']} readout"]
    for name, rows in tables(res).items():
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines.append(f"{name} level:")
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    if res["anatomy"]["note"]:
        lines.append(f"note: {res['anatomy']['note']}")
    return lines


def write_outputs(res: dict[str, Any], out: Path) -> dict[str, Path]:
    """retrieval.json (everything), retrieval.csv (a row per level, anatomy and direction) and report.md."""
    from pipelines.atomic import open_atomic, write_text_atomic
    from pipelines.evaluate.report import md_table

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "retrieval.json", json.dumps(res, indent=2) + "\n")
    ks = res["info"]["ks"]
    fields = ["level", "anatomy", "direction", "n_queries", "n_gallery", "mean_matches"]
    fields += [x for k in ks for x in (f"recall@{k}", f"chance_recall@{k}")]
    fields += ["median_rank", "chance_median_rank", "mean_rank"]
    items = [("case", "", d, res["case"][d]) for d in DIRECTIONS]
    items += [("anatomy", n, d, b[d]) for n, b in res["anatomy"]["per_anatomy"].items() if "reason" not in b
              for d in DIRECTIONS]
    with open_atomic(out / "retrieval.csv", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for level, name, d, m in items:
            w.writerow({"level": level, "anatomy": name, "direction": d, **{k: m[k] for k in fields[3:]}})
    md = [f"# Retrieval: {res['info']['embeddings']}", ""] + [f"- {line}" for line in text_lines(res)[:1]]
    if res["anatomy"]["note"]:
        md.append(f"- note: {res['anatomy']['note']}")
    for name, rows in tables(res).items():
        cols = [(h, (lambda i: lambda r: r[i])(i)) for i, h in enumerate(rows[0])]
        md += ["", f"## {name.capitalize()} level", ""] + md_table(cols, rows[1:])
    write_text_atomic(out / "report.md", "\n".join(md) + "\n")
    return {k: out / k for k in ("retrieval.json", "retrieval.csv", "report.md")}
