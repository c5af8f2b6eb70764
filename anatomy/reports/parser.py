"""Report understanding: sentences -> anatomies -> findings with status -> per-anatomy text and labels.

    parser = ReportParser("ct-rate")
    result = parser.parse(findings_text, impression=impression_text)
    result.labels["Lung nodule"]  ...  # by task name: result.statuses["lung_nodule"] == "present"
    result.anatomies["lung"].text, .normal, .mentioned, .labels

Steps, each rule-based and driven by data (``configs/reports/``, the task catalog, the anatomy set):

1. clean and split (:mod:`anatomy.reports.text`); the impression is split the same way and its sentences
   follow the findings' ones, marked ``impression``;
2. find finding words (task synonyms + the preset's extra vocabulary, optional plural), organ words
   (the anatomy set's synonyms, and organ words outside the set) and ConText cues, one pass of a compiled
   alternation each over the whole text;
3. a finding word whose sentence names only organs outside its task's anatomy is dropped ("a nodule in the
   liver" is no lung nodule); a word shared by tasks of several anatomies ("atheroma") goes to the tasks whose
   anatomy the sentence names; a coordinated modifier is distributed ("pleural or pericardial effusion").
   Never a guess: a shared (or ``generic``) word whose sentence names none of its tasks' anatomies takes the
   anatomy carried from the sentence or organ heading before ("LIVER:" then "A 1 cm cyst.") only where its own
   sentence names no organ, else the preset's ``shared_default``, else no task: it is kept, with its status, in
   :attr:`ReportResult.unassigned_findings`, as is a finding the text places in an organ outside the set
   ("a nodule in the left lobe of the thyroid", "a calculus in the distal ureter"). Weak organ words ("lobe")
   name their anatomy only as the preset's ``weak_regions`` rule allows;
4. ConText gives each finding mention a status: NEGATED -> absent, POSSIBLE -> uncertain, HYPOTHETICAL ->
   not evidence, PRIOR_STUDY (a finding of the previous examination only) -> not evidence, HISTORICAL -> the
   preset's policy; otherwise present. A task's status over the report is the
   strongest of its mentions: present > uncertain > absent > not mentioned;
5. each sentence goes to every anatomy it names or whose finding it holds ("Liver, spleen and pancreas are
   normal" goes to all three); a sentence with no organ word of its own that starts "It ..." / "These ..."
   continues the previous sentence's anatomies; the rest is kept in ``unassigned``;
6. per anatomy: its sentences in report order (duplicates dropped), its task statuses and labels, and a normal
   flag; or, when no sentence concerns it, the preset's normal text with ``mentioned=False`` and ``normal=True``.

The normal flag (what fVLM's normal-pair correction reads): a mentioned anatomy is normal unless the report
asserts an abnormality of it, present or hedged: one of its tasks is present or uncertain (whatever the
uncertain policy), or one of its sentences holds an abnormal word of the ConText rules' ``normality`` block
("lesion", "thickening", "dilated", "wider than normal" ...; "densities" only in a clause without a normal cue)
that is not part of a catalog finding word, not denied or made no evidence by ConText (negated, hypothetical,
the previous study's), not inside a negation cue ("is not enlarged"), and not placed by the text in another
organ ("a cyst in the left kidney" is no lung abnormality). Negated findings, normal statements and neutral
sentences (technique, "trachea and both main bronchi are patent") leave it normal; an abnormality outside the
task catalog does not. The flag never changes labels.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Any

from anatomy.reports.context import ContextRules, Modifier, normalise, scope_categories
from anatomy.reports.preset import UNCERTAIN_POLICIES, ReportPreset, load_preset
from anatomy.reports.text import Span, clean_text, decode, split_sentences

PRESENT, ABSENT, UNCERTAIN, NOT_MENTIONED = "present", "absent", "uncertain", "not_mentioned"
STATUSES = (PRESENT, ABSENT, UNCERTAIN, NOT_MENTIONED)
_RANK = {NOT_MENTIONED: 0, ABSENT: 1, UNCERTAIN: 2, PRESENT: 3}
#: Longest report text parsed; the rest is cut (with a warning) so one odd row cannot stall a batch.
MAX_CHARS = 30_000


@dataclass(frozen=True)
class Evidence:
    """One mention of a task's finding: what was read where, and with which status."""

    task: str
    status: str
    """``present``, ``absent`` or ``uncertain`` (hypothetical mentions are not evidence)."""
    text: str
    """The finding phrase as written."""
    start: int
    end: int
    """Offsets in :attr:`ReportResult.text`."""
    sentence: int
    """Index into :attr:`ReportResult.sentences`."""
    cue: str = ""
    """The ConText cue behind the status ("was not observed", "?"), empty for a plain assertion."""

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "status": self.status, "text": self.text, "start": self.start,
                "end": self.end, "sentence": self.sentence, "cue": self.cue}


@dataclass(frozen=True)
class UnassignedFinding:
    """A finding word the parser read but gave to no task: the text does not tie it to an anatomy of the set
    (no organ word in its sentence, none carried from the sentence or heading before), or places it in an organ
    outside the set ("a nodule in the left lobe of the thyroid"). Kept with its status, never guessed."""

    text: str
    """The finding phrase as written."""
    status: str
    """``present``, ``absent`` or ``uncertain``."""
    start: int
    end: int
    """Offsets in :attr:`ReportResult.text`."""
    sentence: int
    """Index into :attr:`ReportResult.sentences`."""
    candidates: tuple[str, ...]
    """Tasks the word could name, had the text placed it in their anatomy."""
    region: str = ""
    """The organ outside the anatomy set the text places it in ("thyroid", "carotid artery"), else empty."""
    cue: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "status": self.status, "start": self.start, "end": self.end,
                "sentence": self.sentence, "candidates": list(self.candidates), "region": self.region,
                "cue": self.cue}


@dataclass(frozen=True)
class AnatomyReport:
    """What a report says about one anatomy."""

    name: str
    title: str
    text: str
    """Its sentences in report order, or the preset's normal text when the report never mentions it."""
    mentioned: bool
    """Whether any sentence concerns it (False: ``text`` is the generated normal text)."""
    normal: bool
    """No sentence asserts an abnormality of it, present or hedged, of the catalog or not: negated findings, normal
    statements and neutral sentences only (True when not mentioned; see the module doc)."""
    statuses: dict[str, str]
    """Task name -> status, for the tasks of this anatomy."""
    labels: dict[str, int]
    """Task name -> 0/1 under the parser's uncertain policy."""
    sentences: tuple[int, ...] = ()
    """Indices into :attr:`ReportResult.sentences`."""

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "mentioned": self.mentioned, "normal": self.normal,
                "statuses": self.statuses, "labels": self.labels, "sentences": list(self.sentences)}


@dataclass(frozen=True)
class ReportResult:
    """The parse of one report."""

    preset: str
    text: str
    """The cleaned text (findings, then impression); evidence offsets index it."""
    sentences: tuple[Span, ...]
    statuses: dict[str, str]
    """Task name -> status over the whole report (every task of the catalog)."""
    labels: dict[str, int]
    """Task name -> 0/1 under :attr:`uncertain`."""
    anatomies: dict[str, AnatomyReport]
    """Anatomy name -> its report, every anatomy of the set in set order."""
    evidence: tuple[Evidence, ...]
    unassigned: tuple[int, ...]
    """Sentences that concern no anatomy of the set (kept, not lost)."""
    uncertain: str = "positive"
    warnings: tuple[str, ...] = ()
    unassigned_findings: tuple[UnassignedFinding, ...] = ()
    """Finding words given to no task (see :class:`UnassignedFinding`), with their status, in text order."""

    def labels_with(self, uncertain: str) -> dict[str, int]:
        """Labels under another uncertain policy (``positive`` or ``negative``)."""
        if uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(f"uncertain policy {uncertain!r} is not one of {', '.join(UNCERTAIN_POLICIES)}")
        return {t: _label(s, uncertain) for t, s in self.statuses.items()}

    @property
    def unassigned_text(self) -> tuple[str, ...]:
        return tuple(self.sentences[i].text for i in self.unassigned)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the ``.jsonl`` record of ``fvlm parse-reports``)."""
        return {
            "preset": self.preset,
            "labels": self.labels,
            "statuses": self.statuses,
            "anatomies": {k: a.to_dict() for k, a in self.anatomies.items()},
            "evidence": [e.to_dict() for e in self.evidence],
            "sentences": [{"text": s.text, "start": s.start, "end": s.end, "section": s.section}
                          for s in self.sentences],
            "unassigned": list(self.unassigned_text),
            "unassigned_findings": [u.to_dict() for u in self.unassigned_findings],
            "warnings": list(self.warnings),
        }


def _label(status: str, uncertain: str) -> int:
    return int(status == PRESENT or (status == UNCERTAIN and uncertain == "positive"))


def _alternation(words: list[str], plural: bool) -> re.Pattern[str]:
    """Whole-word regex for literal phrases (hyphens as spaces, any run of spaces between words), longest first.

    The phrases are compiled as a character trie ("calcif(?:ication|ied (?:focus|plaque))"): a flat alternation
    of a thousand phrases tries each of them at every word, the trie only the branches its letters allow."""
    phrases = sorted({" ".join(w.lower().replace("-", " ").split()) for w in words if w.strip()})
    trie: dict[str, Any] = {}
    for ph in phrases:
        node = trie
        for ch in ph:
            node = node.setdefault(ch, {})
        node[""] = {}
    suffix = r"(?:s|es)?" if plural else ""
    return re.compile(rf"(?<![a-z0-9])(?:{_trie_regex(trie)}){suffix}(?![a-z0-9])")


def _trie_regex(node: dict[str, Any]) -> str:
    """Regex of a character trie; a phrase that ends where longer ones go on is an optional tail (greedy, so the
    longer phrase wins where it matches)."""
    end = "" in node
    alts = [(r"\s+" if ch == " " else re.escape(ch)) + _trie_regex(child)
            for ch, child in sorted(node.items()) if ch]
    if not alts:
        return ""
    body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
    if end:
        return "(?:" + body + ")?"
    return body


def _key(s: str) -> str:
    return " ".join(s.split())


@dataclass
class _Mention:
    tasks: tuple[str, ...]
    start: int
    end: int
    text: str
    sentence: int
    generic: bool = False
    mods: dict[str, Modifier] = field(default_factory=dict)
    pattern: bool = False
    """Matched by a task pattern, which names its anatomy itself (several tasks: one phrase, several organs)."""


class ReportParser:
    """A compiled report parser for one preset; reuse one instance across reports (compiling takes ~50 ms)."""

    def __init__(self, preset: str | ReportPreset = "fvlm15", uncertain: str | None = None,
                 max_chars: int = MAX_CHARS) -> None:
        self.preset = preset if isinstance(preset, ReportPreset) else load_preset(preset)
        self.uncertain = uncertain or self.preset.uncertain
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(f"uncertain policy {self.uncertain!r} is not one of {', '.join(UNCERTAIN_POLICIES)}")
        self.max_chars = max_chars
        self.catalog = self.preset.catalog
        self.anatomy_set = self.catalog.anatomy_set
        self.rules = ContextRules.load(self.preset.context)
        self._task_anatomy = {t.name: t.anatomy for t in self.catalog.tasks}
        self._task_title = {t.name: t.title for t in self.catalog.tasks}

        self._term_tasks: dict[str, list[str]] = {}
        for task, words in self.preset.task_terms.items():
            for w in words:
                self._term_tasks.setdefault(_key(w), []).append(task)
        # phrases that hold a finding word but name no finding ("lymph node stations", "intrapulmonary lymph
        # node"): matched like finding words, so the longest match claims the text, and then dropped
        # a phrase ending in a consonant + "y" also names its plural in "-ies" ("nodular opacities")
        for k in list(self._term_tasks):
            if len(k) > 2 and k.endswith("y") and k[-2] not in "aeiou" and self._term_tasks[k]:
                self._term_tasks.setdefault(k[:-1] + "ies", list(self._term_tasks[k]))
        # a singular and its plural listed for different tasks ("nodule" adrenal, "nodules" lung) name them all
        for k in list(self._term_tasks):
            for suf in ("s", "es"):
                base = k[: -len(suf)]
                if k.endswith(suf) and base in self._term_tasks:
                    merged = list(dict.fromkeys(self._term_tasks[base] + self._term_tasks[k]))
                    self._term_tasks[base] = self._term_tasks[k] = merged
        for w in self.preset.not_findings:
            self._term_tasks.setdefault(_key(w), [])
        self._finding_re = _alternation(list(self._term_tasks), plural=True)
        self._weak: dict[str, str] = {_key(w): _key(w) for w in self.preset.weak_regions}
        self._generic = set(self.preset.generic)
        # regex phrasings per task (a finding word and its anatomy word a few words apart)
        # (one regex listed for several tasks counts for all of them: "hepatosplenomegaly")
        by_pattern: dict[str, list[str]] = {}
        for t, ps in self.preset.task_patterns.items():
            for p in ps:
                by_pattern.setdefault(p, []).append(t)
        pats = list(by_pattern.items())
        self._pattern_tasks = [tuple(ts) for _, ts in pats]
        self._pattern_re = re.compile("(?<![a-z0-9])(?=[a-z0-9])(?:" + "|".join(
            f"(?P<p{i}>(?:{p})(?![a-z0-9]))" for i, (p, _) in enumerate(pats)) + ")") if pats else None
        # unspecific words: (task, word) -> the words that explain them away in their sentence
        self._unspecific: dict[tuple[str, str], re.Pattern[str]] = {}
        for t, groups in self.preset.unspecific.items():
            for words, unless in groups:
                rx = _alternation(list(unless), plural=True)
                for w in words:
                    self._unspecific[(t, _key(w))] = rx

        self._region: dict[str, str] = {}
        for a in self.anatomy_set.anatomies:
            for s in a.synonyms:
                self._region.setdefault(_key(s.replace("-", " ")), a.name)
        for a_name, words in self.preset.region_words.items():
            for w in words:
                self._region.setdefault(_key(w), a_name)
        for w, organ in self.preset.other_regions.items():
            self._region.setdefault(_key(w), "~" + organ)  # "~": an organ outside the set
        self._region_re = _alternation(list(self._region), plural=True)
        # context words per task: a shared word goes to the tasks whose context words the sentence names
        self._context_words: dict[str, set[str]] = {}
        for t in self.catalog.tasks:
            words = self.preset.context_words.get(t.name)
            if words is None:
                words = (tuple(self.anatomy_set[t.anatomy].synonyms) + self.preset.region_words.get(t.anatomy, ())
                         if t.anatomy else ())
            self._context_words[t.name] = {_key(w.replace("-", " ")) for w in words}
        cw = sorted({w for ws in self._context_words.values() for w in ws})
        self._all_context = {w: w for w in cw}
        self._context_re = _alternation(cw, plural=True) if cw else None

    # ------------------------------------------------------------------------------------------------ API

    def parse(self, text: str | bytes | None, impression: str | bytes | None = None) -> ReportResult:
        """Parse one report: ``text`` is the findings (or the whole report), ``impression`` an optional
        separate impression, merged into the anatomies it concerns. Never raises on odd text: empty, HTML,
        invalid bytes or very long input give a result (possibly all not mentioned) with warnings."""
        warnings: list[str] = []
        body, w = decode(text)
        warnings += w
        imp, w = decode(impression)
        warnings += w
        body, w = clean_text(body, self.max_chars)
        warnings += w
        imp, w = clean_text(imp, self.max_chars)
        warnings += w
        sentences = split_sentences(body)
        full = body
        if imp:
            offset = len(body) + 2
            full = body + "\n\n" + imp
            sentences += [Span(s.start + offset, s.end + offset, s.text, "impression")
                          for s in split_sentences(imp, "impression")]
        if not sentences:
            warnings.append("no text to parse" if not full else "no sentence with words found")
        return self._analyse(full, sentences, warnings)

    def __call__(self, text: str | bytes | None, impression: str | bytes | None = None) -> ReportResult:
        return self.parse(text, impression)

    # ------------------------------------------------------------------------------------------- internals

    def _analyse(self, text: str, sentences: list[Span], warnings: list[str]) -> ReportResult:
        norm = normalise(text)
        starts = [s.start for s in sentences]

        def sentence_of(pos: int) -> int:
            i = bisect.bisect_right(starts, pos) - 1
            return i if i >= 0 and pos < sentences[i].end else -1

        n = len(sentences)
        regions: list[set[str]] = [set() for _ in range(n)]
        region_spans: list[list[tuple[int, int, str]]] = [[] for _ in range(n)]
        weak_spans: list[list[tuple[int, int, str]]] = [[] for _ in range(n)]
        for m in self._region_re.finditer(norm):
            i = sentence_of(m.start())
            if i >= 0:
                organ = self._lookup(self._region, m.group()) or ""
                if self._weak and self._strip_plural(m.group(), self._weak) in self._weak:
                    weak_spans[i].append((m.start(), m.end(), organ))
                    continue
                regions[i].add(organ)
                region_spans[i].append((m.start(), m.end(), organ))
        heading = self._headings(norm, sentences, regions)
        # a weak organ word ("lobe", "parenchyma") is the organ's only where its sentence names no organ outside
        # the set ("the right lobe of the liver", "left lobe" of a thyroid); with weak_regions_need_organ, only
        # where the sentence, the one before or the heading above also names that organ by a word of its own
        weak_rejected = [False] * n
        for i in range(n):
            if not weak_spans[i]:
                continue
            ok = [] if any(r.startswith("~") for r in regions[i]) else list(weak_spans[i])
            if self.preset.weak_regions_need_organ:
                near = regions[i] | (regions[i - 1] if i > 0 else set()) | heading[i]
                ok = [sp for sp in ok if sp[2] in near]
            weak_rejected[i] = len(ok) < len(weak_spans[i])
            for sp in ok:
                regions[i].add(sp[2])
            region_spans[i] = sorted(region_spans[i] + ok)
        ctx_words: list[set[str]] = [set() for _ in range(n)]
        if self._context_re is not None:
            for m in self._context_re.finditer(norm):
                i = sentence_of(m.start())
                # a context word inside the name of an organ outside the set ("splenic" in "splenic artery",
                # "aortic" in "aortic valve") ties nothing to the set's tasks
                if i >= 0 and not any(o.startswith("~") and a <= m.start() and m.end() <= b
                                      for a, b, o in region_spans[i]):
                    ctx_words[i].add(self._strip_plural(m.group(), self._all_context))
        if self.preset.weak_regions_need_organ:
            for i in range(n):
                if weak_rejected[i]:
                    ctx_words[i] -= self._weak.keys()
        # the anatomy a sentence without organ words of its own continues: the previous sentence's organs, or
        # the heading above it ("LIVER:" then "Multiple cysts, the largest 2 cm.")
        carried = [(regions[i - 1] if i > 0 and regions[i - 1] else heading[i]) for i in range(n)]
        mods: list[list[Modifier]] = [[] for _ in range(n)]
        terms: list[list[tuple[int, int]]] = [[] for _ in range(n)]
        back_terms: list[list[tuple[int, int]]] = [[] for _ in range(n)]
        for mod in self.rules.modifiers(norm):
            i = sentence_of(mod.start)
            if i >= 0:
                mods[i].append(mod)
        for a, b, fwd in self.rules.terminations_flagged(norm):
            i = sentence_of(a)
            if i >= 0:
                terms[i].append((a, b))
                if not fwd:
                    back_terms[i].append((a, b))

        mentions = self._mentions(text, norm, sentence_of, sentences)

        # anatomy carry-over for sentences with no organ word
        own = set(self.anatomy_set.names)
        evidence: list[Evidence] = []
        status: dict[str, str] = {t: NOT_MENTIONED for t in self.catalog.names}
        sent_tasks: list[dict[str, str]] = [{} for _ in range(n)]
        prev_anat: set[str] = set()
        # catalog finding words that count for a task: the normal flag leaves them to the tasks' statuses
        claimed: list[list[tuple[int, int]]] = [[] for _ in range(n)]
        unplaced: list[UnassignedFinding] = []
        unplaced_at: set[tuple[int, int]] = set()
        for mention in mentions:
            s_i = mention.sentence
            tasks, region = self._route(mention, region_spans[s_i], ctx_words[s_i], carried[s_i], norm,
                                        regions[s_i])
            s = sentences[s_i]
            cats = scope_categories((mention.start, mention.end), mods[s_i], terms[s_i], norm, s.start, s.end,
                                    back_terms[s_i])
            st, cue = self._status(cats, norm)
            if not tasks:
                # never guessed: kept at report level with its status
                if st is not None and mention.tasks and (mention.start, mention.end) not in unplaced_at:
                    unplaced_at.add((mention.start, mention.end))
                    unplaced.append(UnassignedFinding(text[mention.start:mention.end], st, mention.start, mention.end,
                                                      s_i, mention.tasks, region, cue))
                continue
            claimed[s_i].append((mention.start, mention.end))
            if st is None:
                continue
            for t in tasks:
                evidence.append(Evidence(t, st, text[mention.start:mention.end], mention.start, mention.end, s_i, cue))
                if _RANK[st] > _RANK[status[t]]:
                    status[t] = st
                if _RANK[st] > _RANK.get(sent_tasks[s_i].get(t, NOT_MENTIONED), 0):
                    sent_tasks[s_i][t] = st

        # sentences -> anatomies
        assigned: list[set[str]] = []
        for s_i, s in enumerate(sentences):
            anat = {r for r in regions[s_i] if r in own}
            anat |= {self._task_anatomy[t] for t in sent_tasks[s_i] if self._task_anatomy[t]}
            if not anat and not regions[s_i] and self.rules.carry_over_re is not None \
                    and self.rules.carry_over_re.match(norm, s.start, s.end):
                anat = set(prev_anat)
            elif not anat and not regions[s_i] and heading[s_i]:
                anat = {r for r in heading[s_i] if r in own}
            assigned.append(anat)
            prev_anat = anat
        labels = {t: _label(st, self.uncertain) for t, st in status.items()}
        by_anatomy = self.catalog.by_anatomy()
        anatomies: dict[str, AnatomyReport] = {}
        for a in self.anatomy_set.anatomies:
            idx = [i for i in range(n) if a.name in assigned[i]]
            a_tasks = [t.name for t in by_anatomy.get(a.name, [])]
            a_status = {t: status[t] for t in a_tasks}
            a_labels = {t: labels[t] for t in a_tasks}
            if not idx:
                anatomies[a.name] = AnatomyReport(a.name, a.title, self.preset.normal_text.format(anatomy=a.title),
                                                  False, True, a_status, a_labels)
                continue
            seen: set[str] = set()
            parts = []
            for i in idx:
                k = _key(norm[sentences[i].start:sentences[i].end])
                if k not in seen:
                    seen.add(k)
                    parts.append(_finish(sentences[i].text))
            normal = not any(st in (PRESENT, UNCERTAIN) for st in a_status.values()) and not any(
                self._asserts_abnormality(norm, sentences[i], a.name, mods[i], terms[i], back_terms[i],
                                          region_spans[i], claimed[i]) for i in idx)
            anatomies[a.name] = AnatomyReport(a.name, a.title, " ".join(parts), True, normal, a_status, a_labels,
                                              tuple(idx))
        unassigned = tuple(i for i in range(n) if not assigned[i])
        evidence.sort(key=lambda e: (e.start, e.task))
        return ReportResult(self.preset.name, text, tuple(sentences), status, labels, anatomies, tuple(evidence),
                            unassigned, self.uncertain, tuple(warnings), tuple(unplaced))

    def _headings(self, norm: str, sentences: list[Span], regions: list[set[str]]) -> list[set[str]]:
        """Per sentence, the organs of the heading it stands under: a sentence of a few words naming organs and
        ending in a colon ("LIVER:", "Kidneys and ureters:") heads the sentences after it until the next heading
        or a new report section; empty where none applies."""
        out: list[set[str]] = []
        cur: set[str] = set()
        section = None
        for i, s in enumerate(sentences):
            if s.section != section:
                cur, section = set(), s.section
            body = norm[s.start:s.end].rstrip()
            if body.endswith(":") and regions[i] and len(_WORD.findall(body)) <= 6:
                cur = set(regions[i])
            out.append(set(cur))
        return out

    @staticmethod
    def _strip_plural(s: str, table: dict[str, Any]) -> str:
        k = _key(s)
        if k in table:
            return k
        for suf in ("es", "s"):
            if k.endswith(suf) and k[: -len(suf)] in table:
                return k[: -len(suf)]
        return k

    def _lookup(self, table: dict[str, Any], s: str) -> Any:
        return table.get(self._strip_plural(s, table))

    def _mentions(self, text: str, norm: str, sentence_of: Any, sentences: list[Span]) -> list[_Mention]:
        out: list[_Mention] = []
        for m in self._finding_re.finditer(norm):
            s_i = sentence_of(m.start())
            if s_i < 0:
                continue
            k = self._strip_plural(m.group(), self._term_tasks)
            tasks = self._term_tasks.get(k)
            if not tasks:
                continue
            if self._unspecific:
                s = sentences[s_i]
                tasks = [t for t in tasks if (t, k) not in self._unspecific
                         or not self._unspecific[(t, k)].search(norm, s.start, s.end)]
                if not tasks:
                    continue
            out.append(_Mention(tuple(tasks), m.start(), m.end(), text[m.start():m.end()], s_i, k in self._generic))
            # coordination: "pleural or pericardial effusion" -> also "pleural effusion"
            words = k.split()
            if len(words) >= 2:
                before = norm[max(0, m.start() - 40):m.start()]
                c = _COORD.search(before)
                if c:
                    alt = _key(c.group(1) + " " + " ".join(words[1:]))
                    alt_tasks = self._term_tasks.get(alt)
                    if alt_tasks and alt != k:
                        a0 = m.start() - len(before) + c.start(1)
                        out.append(_Mention(tuple(alt_tasks), a0, m.end(), text[a0:m.end()], s_i))
        if self._pattern_re is not None:
            for m in self._pattern_re.finditer(norm):
                s_i = sentence_of(m.start())
                if s_i >= 0:
                    ts = self._pattern_tasks[int(m.lastgroup[1:])]  # type: ignore[index]
                    out.append(_Mention(ts, m.start(), m.end(), text[m.start():m.end()], s_i, pattern=True))
            out.sort(key=lambda x: x.start)
        return out

    def _route(self, mention: _Mention, region_spans: list[tuple[int, int, str]], ctx: set[str],
               prev_regions: set[str], norm: str,
               sent_regions: set[str] | frozenset[str] = frozenset()) -> tuple[list[str], str]:
        """Tasks a finding word counts for in its sentence (see the module doc, step 3), and, when it counts for
        none, the organ outside the set the text places it in ("" when the text places it nowhere).

        Never a guess: a word shared by tasks of several anatomies (or a ``generic`` one) whose sentence names
        none of their context words goes to the anatomy carried from the sentence or heading before (shared
        words, then the preset's ``shared_default``), else to no task."""
        tasks = list(mention.tasks)
        outside = sorted(r[1:] for r in sent_regions if r.startswith("~"))
        if (len(tasks) > 1 and not mention.pattern) or mention.generic:
            named = [t for t in tasks if self._context_words.get(t, set()) & ctx]
            if named:
                tasks = named
            else:
                # the anatomy before carries only into a sentence that names no organ of its own: "A low-density
                # lesion in the liver" after a spleen sentence is no splenic lesion
                carry = not sent_regions and (self.preset.carry_generic or not mention.generic)
                prev = [t for t in tasks if self._task_anatomy[t] in prev_regions] if carry else []
                default = [] if mention.generic else [t for t in tasks if t in self.preset.shared_default]
                tasks = prev[:1] or default[:1]
                if not tasks:
                    return [], outside[0] if outside else ""
        where = _location(mention, region_spans, norm)
        if where is None:
            if sent_regions and all(r.startswith("~") for r in sent_regions if r):
                # the sentence names organs, all outside the set, and the text does not place the finding: it
                # is one of those organs' ("a nodule ... is observed in the right adrenal gland"), unless the
                # sentence names one of the task's own context words
                kept = [t for t in tasks if self._task_anatomy[t] is None
                        or (self._context_words.get(t, set()) & ctx) - self._weak.keys()]
                return kept, "" if kept else (outside[0] if outside else "")
            return tasks, ""
        kept = [t for t in tasks if self._task_anatomy[t] is None or self._task_anatomy[t] in where]
        return kept, "" if kept else next(iter(sorted(r[1:] for r in where if r.startswith("~"))), "")

    def _status(self, cats: dict[str, Modifier], norm: str = "") -> tuple[str | None, str]:
        if "HYPOTHETICAL" in cats:
            return None, cats["HYPOTHETICAL"].text
        if "PRIOR_STUDY" in cats and "NEGATED_EXISTENCE" not in cats:
            # described for the previous examination only ("in the previous examination there was X", "the
            # areas previously observed as X"): no evidence of a current finding either way
            return None, cats["PRIOR_STUDY"].text
        neg, pos = cats.get("NEGATED_EXISTENCE"), cats.get("POSSIBLE_EXISTENCE")
        if neg and pos:
            if _negates_hedge(neg, pos, norm):
                # "no finding suggestive of X", "no appearance that could be evaluated in favor of X"
                return ABSENT, neg.text
            # the nearer cue wins
            return (ABSENT, neg.text) if _near(neg) >= _near(pos) else (UNCERTAIN, pos.text)
        if neg:
            return ABSENT, neg.text
        if pos:
            return UNCERTAIN, pos.text
        if "HISTORICAL" in cats:
            h = self.preset.historical
            if h == "ignore":
                return None, cats["HISTORICAL"].text
            return (PRESENT if h == "present" else UNCERTAIN), cats["HISTORICAL"].text
        return PRESENT, ""

    def _asserts_abnormality(self, norm: str, s: Span, anatomy: str, mods: list[Modifier],
                             terms: list[tuple[int, int]], back_terms: list[tuple[int, int]],
                             region_spans: list[tuple[int, int, str]], claimed: list[tuple[int, int]]) -> bool:
        """Whether sentence ``s`` asserts (present or hedged) an abnormality of ``anatomy`` outside the catalog.

        An abnormal word (the rules' ``normality.abnormal``: "lesion", "thickening", "dilated" ...; a
        ``weak_abnormal`` one, "densities", only where its clause holds no normal cue) counts unless it is part of
        a catalog finding word that counts for a task (that task's status decides), ConText makes it absent or
        no evidence (negated, hypothetical, the previous study's), it lies inside a negation cue ("is not
        enlarged"), or the text places it in another organ ("a cyst in the left kidney" is no lung
        abnormality)."""
        found = []
        if self.rules.abnormal_re is not None:
            found += [(m.start(), m.end()) for m in self.rules.abnormal_re.finditer(norm, s.start, s.end)]
        if self.rules.weak_abnormal_re is not None:
            for m in self.rules.weak_abnormal_re.finditer(norm, s.start, s.end):
                c0, c1 = _clause(norm, s, m.start())
                if self.rules.normal_re is None or not self.rules.normal_re.search(norm, c0, c1):
                    found.append((m.start(), m.end()))
        for a, b in found:
            if any(c0 < b and a < c1 for c0, c1 in claimed):
                continue
            if any(x.category == "NEGATED_EXISTENCE" and x.start <= a and b <= x.end for x in mods):
                continue
            st, _ = self._status(scope_categories((a, b), mods, terms, norm, s.start, s.end, back_terms), norm)
            if st not in (PRESENT, UNCERTAIN):
                continue
            where = _abnormal_location(a, b, region_spans, norm)
            if where is None or anatomy in where:
                return True
        return False


_WORD = re.compile(r"[a-z0-9]+")
_LOCATIVE = re.compile(r"(?<![a-z])(?:in|at|of|on|within|involving|along|around|inside|into|to|from|near)(?![a-z])")
_STOP = re.compile(r"[.;:]")
#: Between two organ words of one location list ("in the aortic arch, ascending and descending aorta, and partially
#: in the coronary arteries"): a few words, none of them a verb or a clause opener.
_LIST_GAP = re.compile(r"^[\s,/]*(?:(?!(?:was|were|is|are|be|been|has|have|had|with|without|which|that|where|while|"
                       r"no|not|nor|but|observed|seen|noted|detected)\b)[a-z0-9]+[\s,/]*){0,5}$")


def _location(mention: _Mention, region_spans: list[tuple[int, int, str]], norm: str) -> set[str] | None:
    """The organ a finding word is placed in: an organ word right before it ("thyroid nodule", "right lung
    nodule") or the first organ word after it behind a locative preposition ("a nodule in the liver"), within
    a few words; None when the text does not place it."""
    for a, b, organ in reversed(region_spans):
        if b <= mention.start:
            gap = norm[b:mention.start]
            if not gap.strip():
                return {organ}
            break
    return _placed_after(mention.end, region_spans, norm)


def _placed_after(end: int, region_spans: list[tuple[int, int, str]], norm: str) -> set[str] | None:
    """The organs named after ``end`` behind a locative preposition within a few words ("... in the left
    kidney"), with the organs listed after that one ("in the aortic arch and the coronary arteries")."""
    found: set[str] = set()
    last = end
    for a, b, organ in region_spans:
        if a < end:
            continue
        gap = norm[last:a]
        if not found:
            if len(gap.split()) > 8 or _STOP.search(gap) or not _LOCATIVE.search(gap):
                break
        elif not _LIST_GAP.match(gap):
            break
        found.add(organ)
        last = b
    return found or None


#: Between a clause's subject organ and its abnormal word: a verb, a few words, no second clause ("the liver is
#: diffusely hypodense", "the gallbladder wall is thickened"; not "the heart is normal and a cyst").
_COPULA_GAP = re.compile(r"^(?![a-z0-9 ]*(?<![a-z])(?:and|or|with|but|while|whereas|normal|natural)(?![a-z]))"
                         r"[a-z0-9 ]*(?<![a-z])(?:is|are|was|were|appears?|seems?|looks?|shows?|showed|has|have|"
                         r"contains?|became|becomes)(?![a-z])[a-z0-9 ]*$")


def _abnormal_location(a: int, b: int, region_spans: list[tuple[int, int, str]], norm: str) -> set[str] | None:
    """The organ an abnormal word ``norm[a:b]`` is said of, for the normal flag; None when the text does not say.

    Organ words written together count as one, named by the first ("splenic parenchyma" is the spleen's). In
    order: the organ word right after it ("enlarged lymph nodes", "thickened pleura") or right before it ("renal
    cyst"); the subject of its clause, an organ word a few words before behind a verb ("the liver is diffusely
    hypodense", "the gallbladder wall is thickened"); an organ word behind a locative preposition after it
    ("a cyst in the left kidney"), with the organs listed after that one."""
    spans: list[tuple[int, int, str]] = []
    for s0, s1, organ in region_spans:
        if spans and not norm[spans[-1][1]:s0].strip():
            spans[-1] = (spans[-1][0], s1, spans[-1][2])
        else:
            spans.append((s0, s1, organ))
    before = [sp for sp in spans if sp[1] <= a]
    after = [sp for sp in spans if sp[0] >= b]
    if after and not norm[b:after[0][0]].strip():
        return {after[0][2]}
    if before:
        gap = norm[before[-1][1]:a]
        if not gap.strip() or (len(gap.split()) <= 5 and _COPULA_GAP.match(gap)):
            return {before[-1][2]}
    return _placed_after(b, after, norm)


_CLAUSE_BREAK = re.compile(r"[;:]|(?<![a-z])(?:but|however|whereas|while|although|except)(?![a-z])")


def _clause(norm: str, s: Span, pos: int) -> tuple[int, int]:
    """The clause of sentence ``s`` around offset ``pos``: between semicolons, colons and contrast words."""
    a = s.start
    for m in _CLAUSE_BREAK.finditer(norm, s.start, pos):
        a = m.end()
    m = _CLAUSE_BREAK.search(norm, pos, s.end)
    return a, (m.start() if m else s.end)


_COORD = re.compile(r"(?<![a-z0-9])([a-z]+)\s*(?:,|/|\bor\b|\band\b|\band/or\b)\s*$")


_HEDGE_GAP = re.compile(r"^[a-z0-9 ]*$")


def _negates_hedge(neg: Modifier, pos: Modifier, norm: str) -> bool:
    """A forward negation shortly before a forward hedge governs it: the hedge is part of what is denied."""
    if neg.direction == "BACKWARD" or pos.direction == "BACKWARD" or neg.end > pos.start:
        return False
    gap = norm[neg.end:pos.start]
    return len(gap.split()) <= 5 and bool(_HEDGE_GAP.match(gap))


def _near(m: Modifier) -> int:
    # Modifiers carry no distance; scope_categories keeps the nearest per category, so compare positions:
    # a later-starting forward cue / earlier backward cue is nearer. Ties go to negation.
    return m.start


def _finish(s: str) -> str:
    """A sentence as it goes into an anatomy text: closed by a period unless it ends in one of ``.!?`` or is a
    heading ending in a colon ("KIDNEYS:", then its sentences)."""
    s = s.strip()
    return s if s[-1:] in ".!?:" else s + "."


_DEFAULT: dict[str, ReportParser] = {}


def parse_report(text: str | bytes | None, impression: str | bytes | None = None,
                 parser: ReportParser | None = None, preset: str = "fvlm15") -> ReportResult:
    """Parse one report with ``parser`` (or a cached parser of ``preset``). See :class:`ReportParser`."""
    if parser is None:
        parser = _DEFAULT.get(preset)
        if parser is None:
            parser = _DEFAULT[preset] = ReportParser(preset)
    return parser.parse(text, impression)


__all__ = ["ABSENT", "NOT_MENTIONED", "PRESENT", "STATUSES", "UNCERTAIN", "AnatomyReport", "Evidence",
           "ReportParser", "ReportResult", "UnassignedFinding", "parse_report"]
