"""The report parser's per-anatomy normal flag (``AnatomyReport.normal``) on synthetic and on real CT-RATE reports.

    .venv/bin/python -m benchmarks.normal_flag [--cases 1000] [--seed 0] [--label-noise 0.1]
                                               [--csv ../shared/data/ct-rate/train.csv] [--baseline REF] [--no-record]

The flag feeds fVLM's normal-pair false-negative correction (two normal anatomy samples count as a positive
pair), so it must be true for texts that state no finding and false for texts that do.

(a) Synthetic: ``--cases`` reports from the project's own report writer (:func:`pipelines.synth.reports.write_report`)
    on findings drawn as ``fvlm synth`` draws them (:func:`pipelines.synth.findings.sample_tasks`), without
    rendering images; parsed with the ``fvlm15`` preset. Truth per (case, anatomy): the text *states a finding*
    when the report mentions a task of that anatomy as present or hedged: a finding kept in the report, or a
    label-noise (spurious) mention; a finding the label noise left out of the report is invisible to the text
    and does not count. Targets: share flagged normal >= 0.99 over the mentioned finding-free texts, <= 0.01
    over the texts stating a finding (mentioned or not: a finding the parser fails to place in its anatomy
    leaves that anatomy unmentioned and flagged normal, and counts against the flag).
(b) CT-RATE: the 800 manually labelled reports of ``--csv`` with the ``ct-rate`` preset, per ct-rate4 anatomy;
    truth: all of the anatomy's manual labels are 0 (docs/architecture.md#ct-rate-labels: heart =
    cardiomegaly, pericardial effusion, coronary artery wall calcification; esophagus = hiatal hernia; aorta =
    arterial wall calcification; lung = the other eleven). Target agreement >= 0.95. Even and odd rows are given apart
    (the rules were tuned looking only at even rows).

With ``--baseline REF`` both are also computed with the parser (``anatomy/`` and ``configs/``) of git revision REF
on the same texts, e.g. the commit before the current rule. Writes one section, a table per part, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anatomy.catalog import TaskCatalog, load_task_catalog
from anatomy.reports import ReportParser
from benchmarks.record import ROOT, markdown_table, record

DEFAULT_CSV = ROOT.parent / "shared" / "data" / "ct-rate" / "train.csv"
CT_RATE_ANATOMY_LABELS = {
    "heart": ("Cardiomegaly", "Pericardial effusion", "Coronary artery wall calcification"),
    "esophagus": ("Hiatal hernia",),
    "aorta": ("Arterial wall calcification",),
    "lung": ("Emphysema", "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela",
             "Pleural effusion", "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation",
             "Bronchiectasis", "Interlobular septal thickening"),
}
"""ct-rate4 anatomy -> its CT-RATE label columns (medical material and lymphadenopathy have no anatomy)."""

# ------------------------------------------------------------------------------------------ synthetic cohort

_LOBES = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe")
_PATHS = {
    "aorta": ("ascending aorta", "aortic arch", "descending aorta", "abdominal aorta"),
    "esophagus": ("proximal esophagus", "mid esophagus", "distal esophagus"),
    "colon": ("cecum", "ascending colon", "transverse colon", "descending colon", "sigmoid colon"),
    "pancreas": ("pancreatic head", "pancreatic body", "pancreatic tail"),
    "stomach": ("gastric fundus", "gastric body", "gastric antrum"),
    "small_bowel": ("duodenum", "jejunum", "ileum"),
}
_VERTEBRAE = tuple(f"T{i}" for i in range(1, 13)) + tuple(f"L{i}" for i in range(1, 6))
_CORONARY = ("right coronary artery", "circumflex artery", "left anterior descending artery")
_CHEST = ("lung", "heart", "aorta", "esophagus", "bone")
_ABDOMEN = ("aorta", "liver", "gallbladder", "spleen", "pancreas", "kidney", "adrenal_gland", "stomach",
            "small_bowel", "colon", "urinary_bladder", "bone")


@dataclass(frozen=True)
class SynthText:
    """One synthetic report and what its text states per anatomy."""

    findings: str
    impression: str
    in_view: tuple[str, ...]
    stated: frozenset[str]
    """Anatomies of which the text states a finding (present or hedged; label-noise mentions included,
    omitted findings not)."""
    omitted: tuple[str, ...] = ()
    """Tasks in the case that label noise left out of the report."""
    spurious: tuple[str, ...] = ()
    """Tasks not in the case that label noise mentioned (mostly hedged)."""


def _place(rng: np.random.Generator, rule: str, side: str | None) -> tuple[str | None, str | None]:
    """(location, side) in report words, imitating :func:`pipelines.synth.signatures._where` without a canvas."""
    if rule == "lobe":
        loc = _LOBES[int(rng.integers(len(_LOBES)))]
        return loc, loc.split()[0]
    if rule == "liver_segment":
        return f"segment {int(rng.integers(1, 9))}", None
    if rule == "side_organ":
        return None, ("left", "right")[int(rng.integers(2))]
    if rule == "vertebra":
        return f"{_VERTEBRAE[int(rng.integers(len(_VERTEBRAE)))]} vertebra", None
    if rule == "coronary":
        return _CORONARY[int(rng.integers(len(_CORONARY)))], None
    if rule.startswith("path:"):
        opts = _PATHS.get(rule[5:])
        return (opts[int(rng.integers(len(opts)))] if opts else None), None
    if rule.startswith("text:"):
        return rule[5:], side
    return None, side


def synthetic_texts(cases: int, seed: int = 0, label_noise: float = 0.1,
                    catalog: TaskCatalog | None = None) -> Iterator[SynthText]:
    """``cases`` synthetic reports with their per-anatomy truth, drawn as ``fvlm synth`` draws findings
    (:func:`~pipelines.synth.findings.sample_tasks`, 30 % normal cases) but placed without rendering: field of view
    chest + abdomen (60 %), chest only or abdomen only; a finding whose anatomy is out of view is dropped."""
    from pipelines.synth.findings import findings_config, sample_tasks
    from pipelines.synth.reports import write_report
    from pipelines.synth.scene import Finding

    catalog = catalog or load_task_catalog("fvlm54")
    cfg = findings_config()
    everything = tuple(catalog.anatomy_set.names)
    for i in range(cases):
        rng = np.random.default_rng([seed, i])
        u = rng.random()
        view = everything if u < 0.6 else (_CHEST if u < 0.8 else _ABDOMEN)
        findings = []
        for task in sample_tasks(rng):
            spec = cfg.tasks[task]
            if spec.anatomy not in view:
                continue
            severity = float(rng.random())
            size = None
            if "size_mm" in spec.params:
                lo, hi = spec.params["size_mm"]
                size = round(float(lo + (hi - lo) * severity), 1)
            loc, side = _place(rng, str(spec.params.get("location", "none")), spec.params.get("side"))
            findings.append(Finding(task, spec.anatomy, len(findings) + 1, size, loc, side, round(severity, 3)))
        rep = write_report(rng, findings, view, catalog, label_noise=label_noise)
        tasks = ({f.task for f in findings} - set(rep.omitted)) | set(rep.spurious)
        stated = frozenset(a for a in (catalog[t].anatomy for t in tasks) if a)
        yield SynthText(rep.findings, rep.impression, tuple(view), stated, rep.omitted, rep.spurious)


# ------------------------------------------------------------------------------------------- measurements


@dataclass
class SynthCounts:
    """Per anatomy: mentioned finding-free texts and those flagged normal; texts stating a finding and those
    flagged normal; unmentioned finding-free anatomies (normal by construction)."""

    free: int = 0
    free_normal: int = 0
    free_catalog: int = 0
    """Finding-free texts flagged not normal because the parser reads a task of the anatomy (a label error)."""
    stated: int = 0
    stated_normal: int = 0
    stated_unmentioned: int = 0
    """Texts stating a finding flagged normal because no sentence went to the anatomy."""
    unmentioned: int = 0


def _share(k: int, n: int) -> str:
    return f"{k / n:.3f}" if n else "-"


def measure_synthetic(texts: list[SynthText], flags: list[dict[str, tuple[bool, bool]]], anatomies: list[str],
                      catalog_hit: list[dict[str, bool]] | None = None) -> dict[str, SynthCounts]:
    """Count per anatomy; ``flags[i][anatomy]`` is ``(mentioned, normal)`` of text ``i``, ``catalog_hit[i][anatomy]``
    whether the parser reads a task of the anatomy as present or hedged. An anatomy counts where it is in view or
    mentioned (a sentence the parser gives to an anatomy out of view is a text of it all the same)."""
    out = {a: SynthCounts() for a in anatomies}
    for i, (t, f) in enumerate(zip(texts, flags)):
        for a in anatomies:
            mentioned, normal = f[a]
            if a not in t.in_view and not mentioned:
                continue
            c = out[a]
            if a in t.stated:
                c.stated += 1
                c.stated_normal += normal
                c.stated_unmentioned += normal and not mentioned
            elif mentioned:
                c.free += 1
                c.free_normal += normal
                c.free_catalog += not normal and bool(catalog_hit and catalog_hit[i][a])
            else:
                c.unmentioned += 1
    return out


@dataclass
class CtRateCounts:
    """Per anatomy, truth "all the anatomy's manual labels are 0" against the flag."""

    normal_normal: int = 0
    """Labels all 0, flagged normal."""
    normal_flagged: int = 0
    """Labels all 0, flagged not normal ..."""
    flagged_catalog: int = 0
    """... of them because the parser reads one of the anatomy's catalog findings (present or hedged)."""
    abnormal_normal: int = 0
    """A label 1, flagged normal (the parser reads none of the anatomy's labelled findings)."""
    abnormal_flagged: int = 0
    even: list[int] = field(default_factory=lambda: [0, 0])
    """[agreeing, all] on even rows (0, 2, ...)."""
    odd: list[int] = field(default_factory=lambda: [0, 0])

    @property
    def n(self) -> int:
        return self.normal_normal + self.normal_flagged + self.abnormal_normal + self.abnormal_flagged

    @property
    def agreement(self) -> float:
        return (self.normal_normal + self.abnormal_flagged) / self.n if self.n else 0.0


def measure_ct_rate(rows: list[dict[str, str]], flags: list[dict[str, tuple[bool, bool]]],
                    catalog_hit: list[dict[str, bool]] | None = None) -> dict[str, CtRateCounts]:
    """Agreement of the flag with "all of the anatomy's manual labels are 0", overall and on even / odd rows
    (``[agree, n]``); ``catalog_hit[i][anatomy]``: the parser reads a catalog finding of the anatomy."""
    out = {a: CtRateCounts() for a in CT_RATE_ANATOMY_LABELS}
    for i, (row, f) in enumerate(zip(rows, flags)):
        for a, labels in CT_RATE_ANATOMY_LABELS.items():
            truth = all(row[label] == "0" for label in labels)
            normal = f[a][1]
            c = out[a]
            if truth and normal:
                c.normal_normal += 1
            elif truth:
                c.normal_flagged += 1
                c.flagged_catalog += bool(catalog_hit and catalog_hit[i][a])
            elif normal:
                c.abnormal_normal += 1
            else:
                c.abnormal_flagged += 1
            half = c.even if i % 2 == 0 else c.odd
            half[0] += truth == normal
            half[1] += 1
    return out


def _flags(parser: ReportParser, reports: list[tuple[str, str]]) -> tuple[list[dict], list[dict]]:
    flags, hits = [], []
    for findings, impression in reports:
        r = parser.parse(findings, impression=impression or None)
        flags.append({a: (x.mentioned, x.normal) for a, x in r.anatomies.items()})
        hits.append({a: any(st in ("present", "uncertain") for st in x.statuses.values())
                     for a, x in r.anatomies.items()})
    return flags, hits


_BASELINE_SCRIPT = """
import json, sys
from anatomy.reports import ReportParser
jobs = json.load(open(sys.argv[1]))
out = {}
for preset, reports in jobs.items():
    p = ReportParser(preset)
    out[preset] = [{a: [x.mentioned, x.normal] for a, x in p.parse(f, impression=i or None).anatomies.items()}
                   for f, i in reports]
json.dump(out, open(sys.argv[2], "w"))
"""


def baseline_flags(ref: str, jobs: dict[str, list[tuple[str, str]]]) -> dict[str, list[dict]]:
    """The flags of the parser (``anatomy/`` and ``configs/``) at git revision ``ref`` on the same texts, run in a
    subprocess on a copy of that revision (the rule before this one: ``--baseline <commit>``)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "anatomy", "configs"],
                                 capture_output=True, check=False)
        if archive.returncode != 0:
            raise SystemExit(f"--baseline {ref}: git archive failed: {archive.stderr.decode(errors='replace')}")
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        src, dst = Path(tmp) / "jobs.json", Path(tmp) / "flags.json"
        src.write_text(json.dumps(jobs), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FVLM_CONFIG_DIR")}
        env["PYTHONPATH"] = tmp
        subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT, str(src), str(dst)], cwd=tmp, env=env, check=True)
        got = json.loads(dst.read_text(encoding="utf-8"))
    return {k: [{a: tuple(x) for a, x in f.items()} for f in v] for k, v in got.items()}


# ------------------------------------------------------------------------------------------------ entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000, help="synthetic reports (default 1000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic reports")
    ap.add_argument("--label-noise", type=float, default=0.1,
                    help="the report writer's label noise: omitted findings and spurious (mostly hedged) mentions")
    ap.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="CT-RATE-style CSV with report_text + labels")
    ap.add_argument("--baseline", metavar="REF",
                    help="also give the flags of the parser at git revision REF (e.g. the commit before the rule)")
    ap.add_argument("--no-record", action="store_true", help="print only, do not write to BENCHMARKS.md")
    args = ap.parse_args()
    if not args.csv.is_file():
        raise SystemExit(f"{args.csv} does not exist; pass --csv")
    if args.cases < 1:
        raise SystemExit(f"--cases must be at least 1, got {args.cases}")

    catalog = load_task_catalog("fvlm54")
    texts = list(synthetic_texts(args.cases, args.seed, args.label_noise, catalog))
    syn_reports = [(t.findings, t.impression) for t in texts]
    rows = list(csv.DictReader(open(args.csv, newline="", encoding="utf-8")))
    ct_reports = [(r["report_text"], "") for r in rows]
    syn_flags, syn_hits = _flags(ReportParser("fvlm15"), syn_reports)
    ct_flags, ct_hits = _flags(ReportParser("ct-rate"), ct_reports)
    old = baseline_flags(args.baseline, {"fvlm15": syn_reports, "ct-rate": ct_reports}) if args.baseline else None

    names = list(catalog.anatomy_set.names)
    syn = measure_synthetic(texts, syn_flags, names, syn_hits)
    syn_old = measure_synthetic(texts, old["fvlm15"], names) if old else None
    total, total_old = SynthCounts(), SynthCounts()
    rows_a = []
    for a in names + ["**all**"]:
        if a == "**all**":
            c, o = total, total_old
        else:
            c, o = syn[a], (syn_old[a] if syn_old else SynthCounts())
            for k in vars(total):
                setattr(total, k, getattr(total, k) + getattr(c, k))
                setattr(total_old, k, getattr(total_old, k) + getattr(o, k))
        row = [a, c.free, _share(c.free_normal, c.free), c.stated, _share(c.stated_normal, c.stated)]
        if old:
            row += [_share(o.free_normal, o.free), _share(o.stated_normal, o.stated)]
        rows_a.append(row)
    head_a = ["anatomy", "finding-free texts", "flagged normal (>= 0.99)", "texts stating a finding",
              "flagged normal (<= 0.01)"]
    if old:
        head_a += [f"finding-free normal, {args.baseline}", f"stating a finding normal, {args.baseline}"]
    table_a = markdown_table(head_a, rows_a)

    ct = measure_ct_rate(rows, ct_flags, ct_hits)
    ct_old = measure_ct_rate(rows, old["ct-rate"]) if old else None
    rows_b = []
    for a, c in ct.items():
        row = [a, c.normal_normal + c.normal_flagged, c.abnormal_normal + c.abnormal_flagged, f"{c.agreement:.3f}",
               f"{c.even[0] / c.even[1]:.3f}", f"{c.odd[0] / c.odd[1]:.3f}", c.normal_normal,
               f"{c.normal_flagged} ({c.flagged_catalog} / {c.normal_flagged - c.flagged_catalog})",
               c.abnormal_normal, c.abnormal_flagged]
        kept = c.n - (c.normal_flagged - c.flagged_catalog)
        row.insert(6, f"{(c.normal_normal + c.abnormal_flagged) / kept:.3f}")
        if ct_old:
            row.append(f"{ct_old[a].agreement:.3f}")
        rows_b.append(row)
    head_b = ["anatomy", "labels all 0", "a label 1", "agreement (>= 0.95)", "even rows", "odd rows",
              "agreement, out-of-catalog texts left out",
              "all 0, normal", "all 0, not normal (catalog / other)", "a label 1, normal", "a label 1, not normal"]
    if ct_old:
        head_b.append(f"agreement, {args.baseline}")
    table_b = markdown_table(head_b, rows_b)

    unmentioned = total.unmentioned
    below = ", ".join(f"{a} ({c.agreement:.3f})" for a, c in ct.items() if c.agreement < 0.95)
    notes = (
        f"(a) {args.cases} synthetic reports (seed {args.seed}, label noise {args.label_noise}), preset fvlm15. "
        f"A text *states a finding* of an anatomy when the report mentions one of its tasks as present or hedged "
        f"(kept findings and label-noise mentions; findings the noise left out do not count). Finding-free texts "
        f"are the mentioned ones ({unmentioned} unmentioned finding-free anatomies in view get the generated normal "
        f"text and are normal by construction); texts stating a finding count whether or not the parser placed "
        f"the finding in its anatomy. Of the {total.free - total.free_normal} finding-free texts flagged not "
        f"normal, {total.free_catalog} are the parser reading one of the anatomy's catalog findings that the "
        f"text does not state (a label error, which the flag follows); of the {total.stated_normal} texts stating a "
        f"finding flagged normal, {total.stated_unmentioned} are anatomies no sentence went to (the report does "
        f"not name the organ).\n\n"
        f"(b) {len(rows)} CT-RATE reports of {args.csv.name} (findings and impression in one text), preset ct-rate; "
        f"truth normal = all of the anatomy's manual labels are 0. \"all 0, not normal\" splits into texts where "
        f"the parser reads one of the anatomy's catalog findings (a disagreement between the parser's labels and "
        f"the manual ones, not the flag's) and texts asserting an abnormality outside the 18 labels (a dilated "
        f"aorta, an esophageal mass: not normal by the rule, normal by the labels). \"a label 1, normal\" are "
        f"findings the parser does not read. Rules tuned looking only at even rows. Below the 0.95 target: "
        f"{below or 'none'}."
    )
    if old:
        notes += (f" Columns marked {args.baseline} give the previous rule (an anatomy normal only when every "
                  f"sentence is a recognised normal statement), the parser at that revision on the same texts.")
    table = "**(a) synthetic reports, fvlm15**\n\n" + table_a + "\n\n**(b) CT-RATE, ct-rate**\n\n" + table_b
    if args.no_record:
        print(table + "\n\n" + notes)
    else:
        record("Normal flag: synthetic reports and CT-RATE", table, notes)


if __name__ == "__main__":
    main()
