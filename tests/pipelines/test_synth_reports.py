"""Synthetic report writer (pipelines/synth/reports.py): mentions, negations, field of view, label noise."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import yaml

from anatomy.catalog import Task, load_task_catalog
from configs.paths import config_dir
from pipelines.synth.reports import GrammarError, SynthReport, write_report
from pipelines.synth.scene import Finding

CATALOG = load_task_catalog("fvlm54")
ANATOMIES = CATALOG.anatomy_set
ALL_IN_VIEW = tuple(ANATOMIES.names)
CHEST_ONLY = ("lung", "heart", "aorta", "esophagus", "bone")
ABDOMEN_ONLY = ("aorta", "liver", "gallbladder", "spleen", "pancreas", "kidney", "adrenal_gland", "stomach",
                "small_bowel", "colon", "urinary_bladder", "bone")  # fmt: skip

NEGATION = re.compile(r"\b(no|not|neither|nor|without)\b", re.I)
HEDGE = re.compile(r"\?|\b(possible|cannot be excluded|suspicious|suspected|equivocal|may be compatible)\b", re.I)
LOCATIONS = {
    "lung": ("right upper lobe", "right"),
    "liver": ("segment 7", None),
    "kidney": ("left kidney", "left"),
    "adrenal_gland": ("right adrenal gland", "right"),
    "pancreas": ("pancreatic head", None),
    "colon": ("sigmoid colon", None),
    "bone": ("L1 vertebra", None),
    "aorta": ("ascending aorta", None),
}


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.;!])\s+|\n", text) if s.strip()]


def word_pattern(words) -> re.Pattern[str]:
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b", re.I)


SYNONYMS = {t.name: word_pattern(t.synonyms) for t in CATALOG.tasks}
PHRASINGS = {
    t.name: [re.compile(re.sub(r"\\\{\w+\\\}", ".+?", re.escape(p)), re.I) for p in t.phrasings]
    for t in CATALOG.tasks
}
_counts = Counter(s for t in CATALOG.tasks for s in set(t.synonyms))
SPECIFIC = {
    t.name: word_pattern([s for s in t.synonyms if _counts[s] == 1] or ["@@none@@"]) for t in CATALOG.tasks
}
ALL_SYNONYMS = word_pattern({s for t in CATALOG.tasks for s in t.synonyms})


def mentions(task: str, text: str) -> bool:
    """The text names the task through one of its catalog synonyms or phrasings."""
    return bool(SYNONYMS[task].search(text)) or any(p.search(text) for p in PHRASINGS[task])


def positive_sentences(pattern: re.Pattern[str], text: str) -> list[str]:
    """Sentences naming a word of ``pattern`` without any negation cue."""
    return [s for s in sentences(text) if pattern.search(s) and not NEGATION.search(s)]


def sized(task: Task) -> bool:
    return any("{size}" in p for p in task.phrasings)


def finding_for(task: Task, lesion_id: int = 1, severity: float = 0.9, located: bool = True) -> Finding:
    loc, side = LOCATIONS.get(task.anatomy, (None, None)) if located else (None, None)
    return Finding(task.name, task.anatomy, lesion_id, 12.3 if sized(task) else None, loc, side, severity)


def report(seed: int, findings=(), view=ALL_IN_VIEW, noise: float = 0.0) -> SynthReport:
    return write_report(np.random.default_rng(seed), list(findings), view, CATALOG, label_noise=noise)


# ----------------------------------------------------------------------------------------------- basics


def test_deterministic_for_the_rng():
    fs = [finding_for(CATALOG["lung_nodule"]), finding_for(CATALOG["hepatic_cyst"], 2, 0.2)]
    a, b = report(7, fs, noise=0.3), report(7, fs, noise=0.3)
    assert a == b
    assert isinstance(a.findings, str) and isinstance(a.impression, str)
    others = {report(s, fs, noise=0.3).findings for s in range(8, 20)}
    assert len(others) == 12


def test_every_task_is_reported_by_a_synonym_or_phrasing():
    for i, task in enumerate(CATALOG.tasks):
        for seed in range(4):
            f = finding_for(task, severity=(0.9, 0.2)[seed % 2], located=seed < 2)
            r = report(100 * i + seed, [f])
            assert mentions(task.name, r.findings), (task.name, seed, r.findings)
            assert SYNONYMS[task.name].search(r.impression) or task.title.lower() in r.impression.lower(), (
                task.name,
                r.impression,
            )
            assert r.omitted == () and r.spurious == ()


def test_sizes_are_written_like_reports():
    task = CATALOG["lung_nodule"]
    hits = 0
    for seed in range(60):
        r = report(seed, [finding_for(task)])
        hits += bool(re.search(r"\b12(x\d+(\.\d+)?)? mm\b", r.findings))
    assert hits >= 48
    big = Finding("hepatic_mass", "liver", 1, 46.0, "segment 7", None, 0.9)
    texts = " ".join(report(s, [big]).findings for s in range(60))
    assert re.search(r"\b46(x\d+)? mm\b", texts) and re.search(r"\b4\.6(x\d\.\d)? cm\b", texts)


# ----------------------------------------------------------------------------------------------- normal studies


def test_normal_study_has_a_normal_impression_and_no_positive_mention():
    impressions = set()
    for seed in range(60):
        r = report(seed)
        assert r.omitted == () and r.spurious == ()
        assert not positive_sentences(ALL_SYNONYMS, r.findings), r.findings
        assert not ALL_SYNONYMS.search(r.impression), r.impression
        assert re.search(r"normal|unremarkable|no significant pathology", r.impression, re.I), r.impression
        assert NEGATION.search(r.findings)
        impressions.add(r.impression)
    assert len(impressions) >= 3


def test_negations_take_several_forms():
    text = " ".join(report(s, [finding_for(CATALOG["lung_nodule"])]).findings for s in range(150))
    forms = [
        r"\bNo [a-z -]+ (was|were) detected\b",
        r"\b(was|were) not (observed|detected|seen)\b",
        r"\bNo evidence of\b",
        r"\bNo [a-z -]+ or [a-z -]+ (is|was) (seen|detected)\b",
        r"\bNeither\b.*\bnor\b",
    ]
    for form in forms:
        assert re.search(form, text), form


def test_findings_walk_in_reading_order_with_lung_window_header():
    fs = [finding_for(CATALOG["osteopenia"], 1), finding_for(CATALOG["hepatic_cyst"], 2),
          finding_for(CATALOG["lung_nodule"], 3)]  # fmt: skip
    headers = 0
    for seed in range(30):
        r = report(seed, fs)
        pos = [min(m.start() for m in SYNONYMS[t].finditer(r.findings)) for t in ("lung_nodule", "hepatic_cyst")]
        bone = max(m.start() for m in SYNONYMS["osteopenia"].finditer(r.findings))
        assert pos[0] < pos[1] < bone, r.findings
        headers += bool(re.search(r"(lung|parenchyma\w*) window|lung parenchyma;", r.findings, re.I))
    assert 5 <= headers <= 28


# ----------------------------------------------------------------------------------------------- field of view

_GENERIC = {"lobe", "lobes", "parenchyma", "parenchymal", "upper lobe", "lower lobe", "middle lobe", "apical",
            "hilar", "bone", "bones", "valve"}  # fmt: skip


def _out_of_view_words(view) -> re.Pattern[str]:
    return word_pattern({s for a in ANATOMIES.anatomies if a.name not in view for s in a.synonyms} - _GENERIC)


@pytest.mark.parametrize("view", [CHEST_ONLY, ABDOMEN_ONLY])
def test_out_of_view_anatomies_are_not_described(view):
    words = _out_of_view_words(view)
    tasks = [t for t in CATALOG.tasks if t.anatomy in view]
    for seed in range(40):
        picks = [tasks[(seed * 7 + k * 13) % len(tasks)] for k in range(2)]
        fs = [finding_for(t, k + 1) for k, t in enumerate(dict.fromkeys(picks))]
        r = report(seed, fs, view=view, noise=0.3)
        for s in sentences(r.findings) + sentences(r.impression):
            if re.search(r"not included|outside the|remained outside", s):
                continue
            assert not words.search(s), (view, s)
        for t in r.spurious:
            assert CATALOG[t].anatomy in view


def test_finding_outside_the_view_is_refused():
    with pytest.raises(ValueError, match="not in view"):
        report(0, [finding_for(CATALOG["hepatic_cyst"])], view=CHEST_ONLY)
    with pytest.raises(ValueError, match="label_noise"):
        report(0, noise=1.5)


# ----------------------------------------------------------------------------------------------- label noise


def test_no_noise_means_no_omission_or_spurious_mention():
    fs = [finding_for(CATALOG["emphysema"], 1), finding_for(CATALOG["renal_cyst"], 2)]
    for seed in range(50):
        r = report(seed, fs)
        assert r.omitted == () and r.spurious == ()
        assert mentions("emphysema", r.findings) and mentions("renal_cyst", r.findings)


def test_full_noise_omits_every_finding_and_adds_one_spurious_mention():
    for i, task in enumerate(CATALOG.tasks):
        r = report(1000 + i, [finding_for(task)], noise=1.0)
        assert r.omitted == (task.name,)
        assert len(r.spurious) == 1 and r.spurious[0] != task.name
        spurious = r.spurious[0]
        assert mentions(spurious, r.findings), (spurious, r.findings)
        # the omitted task is at most denied, never stated (sentences about the spurious task aside)
        text = " ".join(s for s in sentences(r.findings) if not mentions(spurious, s))
        assert not positive_sentences(SPECIFIC[task.name], text), (task.name, r.findings)
        assert not any(p.search(text) for p in PHRASINGS[task.name]), (task.name, r.findings)


def test_partial_noise_rates():
    fs = [finding_for(CATALOG["lung_nodule"], 1), finding_for(CATALOG["pleural_effusion"], 2),
          finding_for(CATALOG["nephrolithiasis"], 3)]  # fmt: skip
    omitted = spurious = 0
    n = 300
    for seed in range(n):
        r = report(seed, fs, noise=0.25)
        omitted += len(r.omitted)
        spurious += len(r.spurious)
        for t in r.omitted:
            assert t in {f.task for f in fs}
        for t in {f.task for f in fs} - set(r.omitted):
            assert mentions(t, r.findings)
        assert not set(r.spurious) & {f.task for f in fs}
    assert 0.18 < omitted / (3 * n) < 0.32
    assert 0.17 < spurious / n < 0.33


def test_repeated_task_is_omitted_only_when_every_instance_is():
    fs = [Finding("lung_nodule", "lung", k, 6.0, loc, None, 0.9) for k, loc in
          ((1, "right upper lobe"), (2, "left lower lobe"))]  # fmt: skip
    seen_partial = False
    for seed in range(200):
        r = report(seed, fs, noise=0.5)
        if "lung_nodule" not in r.omitted:
            assert mentions("lung_nodule", r.findings)
            seen_partial = True
    assert seen_partial


def test_subtle_findings_are_hedged_more_often():
    task = CATALOG["ground_glass_opacity"]

    def hedge_rate(severity: float) -> float:
        hedged = 0
        for seed in range(150):
            r = report(seed, [finding_for(task, severity=severity)])
            hedged += any(HEDGE.search(s) for s in sentences(r.findings) if mentions(task.name, s))
        return hedged / 150

    subtle, clear = hedge_rate(0.15), hedge_rate(0.9)
    assert subtle > 0.45 and clear < 0.2 and subtle > clear + 0.3


# ----------------------------------------------------------------------------------------------- variety, speed


def test_reports_are_diverse():
    normals = [report(seed) for seed in range(200)]
    assert len({r.findings for r in normals}) == 200
    liver = Counter(s for r in normals for s in sentences(r.findings) if re.search(r"\bliver\b", s, re.I))
    assert len(liver) >= 8, liver
    assert sum(liver.values()) >= 60
    grouped = [s for r in normals for s in sentences(r.findings) if re.search(r"\b(and|,)\b.*\b(are|show)\b", s)]
    assert any(re.search(r"\b(spleen|pancreas|kidneys|adrenal glands)\b.*\band\b", s) for s in grouped)
    fs = [finding_for(CATALOG["lung_nodule"], 1), finding_for(CATALOG["cholelithiasis"], 2)]
    impressions = [report(seed, fs).impression for seed in range(100)]
    assert any(re.match(r"1\. ", i) for i in impressions)
    assert any(not re.match(r"1\. ", i) for i in impressions)
    positives = Counter(
        s for i in range(100) for s in sentences(report(i, fs).findings) if mentions("cholelithiasis", s)
    )
    assert len(positives) >= 25


def test_grammar_naming_an_unknown_task_is_refused(tmp_path):
    data = yaml.safe_load((config_dir() / "synth" / "report_grammar.yaml").read_text())
    data["blocks"][2]["common"] = ["not_a_task"]
    path = tmp_path / "bad_grammar.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(GrammarError, match="not_a_task"):
        write_report(np.random.default_rng(0), [], ALL_IN_VIEW, CATALOG, grammar=path)
