"""Synthetic radiology reports: the report half of ``fvlm synth``.

:func:`write_report` turns the ground-truth findings of one synthetic case into a free-text report in the style
of CT-RATE chest CT reports: a *Findings* section that walks the anatomies in view in reading order (airways,
mediastinum, heart, aorta, esophagus, lung parenchyma, pleura, then the upper abdomen / abdomen organs, then
bones), describing each with its findings or a normal statement, and an *Impression* that lists the main
abnormal findings (or says the study is normal).

The words live in ``configs/synth/report_grammar.yaml`` (phrase banks, reading order, probabilities); this module
holds the generation logic. The finding words come from the task catalog (``configs/tasks/fvlm54.yaml``): each
positive statement uses one of the task's synonyms or fills one of its phrasings, so a report parser built on the
same catalog can read the labels back.

Label noise (``label_noise`` in [0, 1]) imitates real report labels: each finding is left out of the report with
that probability (``SynthReport.omitted``), and with that probability per report one absent finding is mentioned,
usually hedged (``SynthReport.spurious``). All randomness comes from the ``rng`` argument.
"""

from __future__ import annotations

import bisect
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from anatomy.catalog import Task, TaskCatalog
from configs.checks import ConfigError, read_yaml_mapping, require, strings
from configs.paths import resolve_config
from pipelines.synth.scene import Finding

DEFAULT_GRAMMAR = "report_grammar"

_SLOT = re.compile(r"\{([A-Za-z_0-9]+)\}")
_VERB = re.compile(r"\b(is|are|was|were|has|have)\b")
_ADJ_ENDINGS = ("ous", "ic", "ed", "ive", "al", "ary")
_IRREGULAR_PLURALS = frozenset({"calculi", "bullae", "diverticula", "foci", "metastases"})
_NO_ARTICLE = ("segment", "both ", "bilateral", "the ", "multiple ", "all ")
_AN_BEFORE = re.compile(r"\b([Aa]) (?=(?:[aeio]|u(?!ni|ro|s[aeiu])|8|11(?![0-9])|18(?![0-9])))")


class GrammarError(ConfigError):
    """The report grammar file is malformed or names tasks the catalog lacks; the message names the entry."""


@dataclass(frozen=True)
class SynthReport:
    """One synthetic report."""

    findings: str
    """The Findings section."""
    impression: str
    """The Impression section."""
    omitted: tuple[str, ...] = ()
    """Task names present in the image but left out of the report by label noise."""
    spurious: tuple[str, ...] = ()
    """Task names mentioned (hedged or asserted) though absent from the image, by label noise."""

    @property
    def text(self) -> str:
        """Both sections with their headings, as one report text."""
        return f"Findings: {self.findings}\nImpression: {self.impression}"


# ----------------------------------------------------------------------------------------------- templates


class _Template:
    """A text with ``{slot}`` holes; ``{Slot}`` capitalises the value."""

    __slots__ = ("text", "parts", "slots")

    def __init__(self, text: str) -> None:
        self.text = text
        parts: list[tuple[str, str | None, bool]] = []
        pos = 0
        for m in _SLOT.finditer(text):
            name = m.group(1)
            parts.append((text[pos : m.start()], name.lower(), name[0].isupper()))
            pos = m.end()
        parts.append((text[pos:], None, False))
        self.parts = tuple(parts)
        self.slots = frozenset(p[1] for p in parts if p[1] is not None)

    def fits(self, values: dict[str, str | None]) -> bool:
        return all(values.get(s) is not None for s in self.slots)

    def fill(self, values: dict[str, str | None]) -> str:
        out: list[str] = []
        for literal, name, cap in self.parts:
            out.append(literal)
            if name is not None:
                v = values[name] or ""
                out.append(_cap(v) if cap else v)
        return "".join(out)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:] if s else s


def _finish(s: str, end: str = ".") -> str:
    """Tidy a filled sentence: spaces, punctuation, a/an, capital first letter, final punctuation."""
    s = " ".join(s.split())
    s = s.replace(" .", ".").replace(" ,", ",").replace(" ;", ";").replace("( ", "(").replace(" )", ")")
    s = s.replace(",.", ".").replace("..", ".")
    s = _AN_BEFORE.sub(lambda m: m.group(1) + "n ", s)
    s = _cap(s)
    if end and s and s[-1] not in ".;:?!":
        s += end
    return s


def _pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    return seq[int(rng.random() * len(seq))]


class _Weighted:
    """Words with weights (1 + rank)^-1.5: the catalog lists the common words first."""

    __slots__ = ("items", "cum")

    def __init__(self, items: Sequence[str]) -> None:
        self.items = tuple(items)
        total, cum = 0.0, []
        for i in range(len(self.items)):
            total += (1 + i) ** -1.5
            cum.append(total)
        self.cum = cum

    def pick(self, rng: np.random.Generator) -> str:
        i = bisect.bisect_right(self.cum, rng.random() * self.cum[-1])
        return self.items[min(i, len(self.items) - 1)]


def _head_word(s: str) -> str:
    head = s.split(" in ")[0].split(" of ")[0].split()
    return head[-1] if head else s


def _is_plural(s: str) -> bool:
    w = _head_word(s)
    if w in _IRREGULAR_PLURALS:
        return True
    return w.endswith("s") and not w.endswith(("ss", "sis", "us", "is", "ys"))


# ----------------------------------------------------------------------------------------------- grammar


@dataclass(frozen=True)
class _Statement:
    text: str
    negates: frozenset[str] | None
    """Tasks the sentence denies; None = every task of its block (a whole-block normal statement)."""
    covers: tuple[str, ...]


@dataclass(frozen=True)
class _BlockSpec:
    id: str
    anatomy: str | None
    region: str
    when: str | None
    requires_any: tuple[str, ...]
    tasks: tuple[str, ...] | None
    main: bool
    header: bool
    common: tuple[str, ...]
    where: dict[str, tuple[str | None, ...]]
    of: tuple[str, ...]
    descriptors: tuple[str, ...]
    normal: tuple[_Statement, ...]
    second: tuple[str, ...]
    group: tuple[str, ...]
    in_: tuple[str, ...]


@dataclass(frozen=True)
class _Grammar:
    source: str
    p: dict[str, float]
    impression_max_items: int
    regions: dict[str, frozenset[str]]
    preambles: tuple[str, ...]
    lung_window_headers: tuple[str, ...]
    abdomen_headers: dict[str, tuple[str, ...]]
    catch_all: dict[str, dict[str, tuple[str, ...]]]
    group_templates: tuple[_Template, ...]
    out_of_view: tuple[_Template, ...]
    neg_single: tuple[_Template, ...]
    neg_pair: tuple[_Template, ...]
    positive: dict[str, tuple[_Template, ...]]
    hedged: dict[str, tuple[_Template, ...]]
    degree_words: dict[str, tuple[str, ...]]
    imp_normal: dict[str, tuple[str, ...]]
    imp_items: dict[str, tuple[_Template, ...]]
    imp_hedged: dict[str, tuple[_Template, ...]]
    imp_closings: tuple[str, ...]
    avoid_synonyms: frozenset[str]
    sized_tasks: tuple[str, ...]
    spurious_size_mm: tuple[float, float]
    spurious_exclude: tuple[str, ...]
    blocks: tuple[_BlockSpec, ...]


_PROBABILITIES = (
    "preamble", "skip_normal", "second_normal", "lung_window_header", "abdomen_header", "catch_all",
    "group_normals", "pertinent_negative", "pair_negatives", "normal_first", "catalog_phrasing", "degree_word",
    "hedge_subtle", "hedge_conspicuous", "impression_subtle", "impression_closing", "out_of_view_note",
    "spurious_asserted",
)  # fmt: skip


def _need(where: str, data: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    return require(where, data, key, kind, GrammarError)


def _texts(where: str, data: dict[str, Any], key: str, required: bool = True) -> tuple[str, ...]:
    return strings(where, data, key, required, GrammarError)


def _templates(where: str, data: dict[str, Any], key: str, required: bool = True) -> tuple[_Template, ...]:
    return tuple(_Template(t) for t in _texts(where, data, key, required))


def _template_groups(where: str, data: dict[str, Any], key: str, groups: Sequence[str]) -> dict[str, tuple]:
    section = _need(where, data, key, dict)
    return {g: _templates(f"{where} {key}", section, g, required=False) for g in groups}


def _parse_block(source: str, i: int, entry: Any) -> _BlockSpec:
    if not isinstance(entry, dict):
        raise GrammarError(f"{source}: block #{i + 1} is not a mapping")
    bid = _need(f"{source}: block #{i + 1}", entry, "id", str)
    where = f"{source}: block {bid!r}"
    anatomy = entry.get("anatomy")
    region = _need(where, entry, "region", str)
    if region not in ("chest", "abdomen", "bone"):
        raise GrammarError(f"{where}: region {region!r} must be chest, abdomen or bone")
    when = entry.get("when")
    if when not in (None, "chest", "no_chest"):
        raise GrammarError(f"{where}: when {when!r} must be chest or no_chest")
    tasks = entry.get("tasks")
    if tasks is not None and not isinstance(tasks, list):
        raise GrammarError(f"{where}: field 'tasks' must be a list")
    normal: list[_Statement] = []
    for j, st in enumerate(_need(where, entry, "normal", list)):
        if isinstance(st, str):
            normal.append(_Statement(st, None, ()))
        elif isinstance(st, dict):
            text = _need(f"{where} normal #{j + 1}", st, "text", str)
            neg = frozenset(_texts(f"{where} normal #{j + 1}", st, "negates", required=False))
            covers = _texts(f"{where} normal #{j + 1}", st, "covers", required=False)
            normal.append(_Statement(text, neg, covers))
        else:
            raise GrammarError(f"{where}: normal #{j + 1} must be a string or a mapping")
    if not normal:
        raise GrammarError(f"{where}: no normal statements")
    where_map: dict[str, tuple[str | None, ...]] = {}
    for side, opts in (entry.get("where") or {}).items():
        if not isinstance(opts, list) or not opts:
            raise GrammarError(f"{where}: where.{side} must be a non-empty list")
        where_map[str(side)] = tuple(opts)
    return _BlockSpec(
        id=bid,
        anatomy=anatomy,
        region=region,
        when=when,
        requires_any=_texts(where, entry, "requires_any", required=False),
        tasks=tuple(tasks) if tasks is not None else None,
        main=bool(entry.get("main", False)),
        header=bool(entry.get("header", False)),
        common=_texts(where, entry, "common", required=False),
        where=where_map,
        of=_texts(where, entry, "of", required=False),
        descriptors=_texts(where, entry, "descriptors", required=False) or ("finding",),
        normal=tuple(normal),
        second=_texts(where, entry, "second", required=False),
        group=_texts(where, entry, "group", required=False),
        in_=_texts(where, entry, "in", required=False),
    )


def parse_report_grammar(data: dict[str, Any], source: str) -> _Grammar:
    """Build the grammar from parsed YAML, validating its structure (task names are checked per catalog)."""
    probs = _need(source, data, "probabilities", dict)
    p: dict[str, float] = {}
    for k in _PROBABILITIES:
        v = _need(f"{source}: probabilities", probs, k, (int, float))
        if not 0.0 <= float(v) <= 1.0:
            raise GrammarError(f"{source}: probabilities: {k} = {v} is outside [0, 1]")
        p[k] = float(v)
    regions = {k: frozenset(v) for k, v in _need(source, data, "regions", dict).items()}
    for k in ("chest", "abdomen", "lower_abdomen"):
        if k not in regions:
            raise GrammarError(f"{source}: regions: missing {k!r}")
    ab = _need(source, data, "abdomen_headers", dict)
    ca = _need(source, data, "catch_all", dict)
    neg = _need(source, data, "negation", dict)
    imp = _need(source, data, "impression", dict)
    inorm = _need(f"{source}: impression", imp, "normal", dict)
    deg = _need(source, data, "degree_words", dict)
    size_range = _need(source, data, "spurious_size_mm", list)
    if len(size_range) != 2 or not all(isinstance(x, (int, float)) for x in size_range):
        raise GrammarError(f"{source}: spurious_size_mm must be [low, high]")
    blocks = tuple(_parse_block(source, i, e) for i, e in enumerate(_need(source, data, "blocks", list)))
    ids = [b.id for b in blocks]
    if len(set(ids)) != len(ids):
        raise GrammarError(f"{source}: duplicate block ids")
    for b in blocks:
        for st in b.normal:
            for c in st.covers:
                if c not in ids:
                    raise GrammarError(f"{source}: block {b.id!r}: covers unknown block {c!r}")
    return _Grammar(
        source=source,
        p=p,
        impression_max_items=int(data.get("impression_max_items", 6)),
        regions=regions,
        preambles=_texts(source, data, "preambles"),
        lung_window_headers=_texts(source, data, "lung_window_headers"),
        abdomen_headers={k: _texts(f"{source}: abdomen_headers", ab, k) for k in ("upper", "full")},
        catch_all={
            m: {k: _texts(f"{source}: catch_all {m}", _need(f"{source}: catch_all", ca, m, dict), k)
                for k in ("upper", "full")}
            for m in ("first", "other")
        },  # fmt: skip
        group_templates=_templates(source, data, "group_templates"),
        out_of_view=_templates(source, data, "out_of_view"),
        neg_single=_templates(f"{source}: negation", neg, "single"),
        neg_pair=_templates(f"{source}: negation", neg, "pair"),
        positive=_template_groups(source, data, "positive", ("sized", "located", "plain")),
        hedged=_template_groups(source, data, "hedged", ("sized", "located", "plain")),
        degree_words={k: tuple(str(w) for w in _need(f"{source}: degree_words", deg, k, list))
                      for k in ("subtle", "moderate", "marked")},  # fmt: skip
        imp_normal={k: _texts(f"{source}: impression normal", inorm, k) for k in ("chest", "abdomen", "both")},
        imp_items=_template_groups(f"{source}: impression", imp, "items", ("sized", "located", "plain")),
        imp_hedged=_template_groups(f"{source}: impression", imp, "hedged_items", ("located", "plain")),
        imp_closings=_texts(f"{source}: impression", imp, "closings"),
        avoid_synonyms=frozenset(s.lower() for s in _texts(source, data, "avoid_synonyms", required=False)),
        sized_tasks=_texts(source, data, "sized_tasks", required=False),
        spurious_size_mm=(float(size_range[0]), float(size_range[1])),
        spurious_exclude=_texts(source, data, "spurious_exclude", required=False),
        blocks=blocks,
    )


def load_report_grammar(name_or_path: str | os.PathLike = DEFAULT_GRAMMAR) -> _Grammar:
    """Load the report grammar by preset name (``report_grammar`` under ``configs/synth/``) or YAML path."""
    return _load_grammar(str(resolve_config("synth", name_or_path)))


@lru_cache(maxsize=None)
def _load_grammar(path: str) -> _Grammar:
    return parse_report_grammar(read_yaml_mapping(path, GrammarError), path)


# ----------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class _Phrasing:
    template: _Template
    has_digits: bool
    both_sides: bool


@dataclass(frozen=True)
class _TaskWords:
    task: Task
    nouns: _Weighted
    """Synonyms usable as the noun of a generated sentence."""
    specific: _Weighted
    """Those no other task of the catalog shares (fall back to ``nouns``)."""
    sized: _Weighted
    """Singular count nouns for "a 12 mm X" (fall back to ``nouns``)."""
    negated: _Weighted
    """Words for negations: specific ones among the first four nouns."""
    phrasings: tuple[_Phrasing, ...]


@dataclass(frozen=True)
class _Block:
    spec: _BlockSpec
    tasks: frozenset[str]
    normal: tuple[_Statement, ...]
    """Normal statements with ``negates`` resolved (whole-block ones deny the block's tasks)."""


@dataclass(frozen=True)
class _Plan:
    grammar: _Grammar
    catalog: TaskCatalog
    blocks: tuple[_Block, ...]
    task_blocks: dict[str, tuple[int, ...]]
    """Task -> indices of the blocks that may describe it (the first applicable one does)."""
    words: dict[str, _TaskWords]
    anatomy_words: dict[str, re.Pattern[str]]
    other_block: _Block


_PLANS: dict[tuple[str, int], tuple[TaskCatalog, _Plan]] = {}


def _plan_for(grammar: _Grammar, catalog: TaskCatalog) -> _Plan:
    key = (grammar.source, id(catalog))
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is catalog:
        return hit[1]
    plan = _build_plan(grammar, catalog)
    _PLANS[key] = (catalog, plan)
    return plan


def _build_plan(g: _Grammar, catalog: TaskCatalog) -> _Plan:
    names = set(catalog.names)
    src = g.source

    def check(where: str, tasks: Sequence[str]) -> None:
        for t in tasks:
            if t not in names:
                raise GrammarError(f"{src}: {where}: task {t!r} is not in task catalog {catalog.name!r}")

    check("sized_tasks", g.sized_tasks)
    check("spurious_exclude", g.spurious_exclude)
    anatomies = set(catalog.anatomy_set.names)
    explicit: dict[str, list[int]] = {}
    main_of: dict[str, int] = {}
    for i, b in enumerate(g.blocks):
        if b.anatomy is not None and b.anatomy not in anatomies:
            raise GrammarError(
                f"{src}: block {b.id!r}: anatomy {b.anatomy!r} is not in anatomy set {catalog.anatomy_set.name!r}"
            )
        check(f"block {b.id!r} common", b.common)
        for st in b.normal:
            check(f"block {b.id!r} normal {st.text!r}", sorted(st.negates or ()))
        if b.tasks is not None:
            check(f"block {b.id!r} tasks", b.tasks)
            for t in b.tasks:
                explicit.setdefault(t, []).append(i)
        if b.anatomy is not None and (b.main or b.anatomy not in main_of):
            if b.main or b.tasks is None:
                main_of[b.anatomy] = i
    task_blocks: dict[str, tuple[int, ...]] = {}
    block_tasks: dict[int, set[str]] = {i: set() for i in range(len(g.blocks))}
    for t in catalog.tasks:
        idx = explicit.get(t.name)
        if idx is None:
            m = main_of.get(t.anatomy) if t.anatomy is not None else None
            idx = [m] if m is not None else []
        task_blocks[t.name] = tuple(idx)
        for i in idx:
            block_tasks[i].add(t.name)
    blocks = []
    for i, b in enumerate(g.blocks):
        own = frozenset(block_tasks[i])
        normal = tuple(
            _Statement(st.text, own if st.negates is None else st.negates, st.covers) for st in b.normal
        )
        blocks.append(_Block(b, own, normal))
    other_spec = _BlockSpec(
        "other", None, "bone", None, (), (), False, False, (), {}, (), ("finding",),
        (_Statement("No other pathology was detected.", frozenset(), ()),), (), (), (),
    )  # fmt: skip

    counts: dict[str, int] = {}
    for t in catalog.tasks:
        for s in set(t.synonyms):
            counts[s] = counts.get(s, 0) + 1
    words: dict[str, _TaskWords] = {}
    for t in catalog.tasks:
        nouns = []
        for s in t.synonyms:
            if s in g.avoid_synonyms or _VERB.search(s):
                continue
            if _head_word(s).endswith(_ADJ_ENDINGS):
                continue
            nouns.append(s)
        if not nouns:
            nouns = [t.title.lower()]
        specific = [s for s in nouns if counts.get(s, 0) <= 1] or nouns
        sized = [s for s in nouns if not _is_plural(s) and not _head_word(s).endswith("sis")] or nouns
        phr = tuple(
            _Phrasing(
                _Template(text),
                bool(re.search(r"\d", _SLOT.sub("", text))),
                bool(re.search(r"\b(both|bilateral)\b", text, re.I)),
            )
            for text in t.phrasings
            if _Template(text).slots <= {"where", "size", "side"}
        )
        negs = [s for s in nouns[:4] if counts.get(s, 0) <= 1] or specific[:1]
        words[t.name] = _TaskWords(
            t, _Weighted(nouns), _Weighted(specific), _Weighted(sized), _Weighted(negs), phr
        )
    anatomy_words = {a.name: _word_pattern(a.synonyms) for a in catalog.anatomy_set.anatomies}
    other = _Block(other_spec, frozenset(), other_spec.normal)
    return _Plan(g, catalog, tuple(blocks), task_blocks, words, anatomy_words, other)


def _word_pattern(words: Sequence[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(r"\b(" + alternatives + r")\b")


# ----------------------------------------------------------------------------------------------- writing


@dataclass
class _Item:
    finding: Finding
    words: _TaskWords
    block: _Block
    hedged: bool
    spurious: bool
    slots: dict[str, str | None]


def _fmt_number(rng: np.random.Generator, mm: float) -> str:
    if mm < 10:
        if rng.random() < 0.6:
            v = round(mm, 1)
            return f"{v:.1f}".rstrip("0").rstrip(".")
        return str(max(1, int(round(mm))))
    return str(int(round(mm)))


def _size_texts(rng: np.random.Generator, mm: float) -> tuple[str, str]:
    """(text with unit for the grammar's own templates, number-only mm text for catalog phrasings)."""
    mm = max(float(mm), 0.5)
    two = rng.random() < 0.35
    mm2 = mm * (0.55 + 0.4 * rng.random()) if two else 0.0
    num = _fmt_number(rng, mm) + (f"x{_fmt_number(rng, mm2)}" if two else "")
    if mm >= 30 and rng.random() < 0.5:
        cm = f"{mm / 10:.1f}" + (f"x{mm2 / 10:.1f}" if two else "")
        return f"{cm} cm", num
    return f"{num} mm", num


def _where(rng: np.random.Generator, plan: _Plan, block: _Block, f: Finding) -> tuple[str | None, bool]:
    """Noun phrase for where the finding is (with its article), or None where a block names no place; and
    whether it says more than the anatomy (a location or a side)."""
    if f.location and f.location.strip():
        loc = " ".join(f.location.strip().split())
        low = loc.lower()
        pattern = plan.anatomy_words.get(block.spec.anatomy or "")
        if block.spec.of and pattern is not None and not pattern.search(low):
            loc = f"{loc} {_pick(rng, block.spec.of)}"
        return (loc if low.startswith(_NO_ARTICLE) else f"the {loc}"), True
    sided = block.spec.where.get(f.side) if f.side else None
    opts = sided or block.spec.where.get("none")
    if not opts:
        return None, False
    return _pick(rng, opts), bool(sided)


def _degree(rng: np.random.Generator, g: _Grammar, f: Finding) -> str:
    if f.severity < 0.35:
        return _pick(rng, g.degree_words["subtle"]) if g.degree_words["subtle"] else ""
    if f.severity < 0.7:
        return _pick(rng, g.degree_words["moderate"]) if g.degree_words["moderate"] else ""
    return _pick(rng, g.degree_words["marked"]) if g.degree_words["marked"] else ""


def _item_slots(rng: np.random.Generator, plan: _Plan, block: _Block, f: Finding, w: _TaskWords) -> dict:
    g = plan.grammar
    where, informative = _where(rng, plan, block, f)
    size = num = None
    if f.size_mm is not None and f.size_mm > 0:
        size, num = _size_texts(rng, f.size_mm)
    pool = w.sized if size is not None else (w.nouns if where is not None else w.specific)
    syn = pool.pick(rng)
    names_place = plan.anatomy_words.get(block.spec.anatomy or "")
    if where is not None and not informative and names_place is not None and names_place.search(syn):
        where = None  # "splenomegaly", not "splenomegaly in the spleen"
    dsyn = syn
    if size is None and rng.random() < g.p["degree_word"]:
        d = _degree(rng, g, f)
        if d:
            dsyn = f"{d} {syn}"
    plural = _is_plural(syn)
    bare = where[4:] if where is not None and where.startswith("the ") else where
    return {
        "syn": syn,
        "dsyn": dsyn,
        "size": size,
        "size_num": num,
        "where": where,
        "where_bare": bare,
        "in_where": f"in {where}" if where is not None else None,
        "descriptor": _pick(rng, block.spec.descriptors),
        "title": w.task.title,
        "is": "are" if plural else "is",
        "was": "were" if plural else "was",
        "side": f.side,
    }


def _fit(templates: Sequence[_Template], values: dict[str, str | None]) -> list[_Template]:
    return [t for t in templates if t.fits(values)]


def _catalog_sentence(rng: np.random.Generator, item: _Item) -> str | None:
    """Fill one of the task's catalog phrasings consistent with the finding, or None if none fits."""
    f, s = item.finding, item.slots
    has_size = s["size_num"] is not None
    fits = []
    for ph in item.words.phrasings:
        slots = ph.template.slots
        if "size" in slots and not has_size:
            continue
        if "side" in slots and f.side is None:
            continue
        if "where" in slots and s["where"] is None:
            continue
        if ph.has_digits and has_size:
            continue
        if f.location and "where" not in slots:
            continue
        if ph.both_sides and f.side in ("left", "right"):
            continue
        fits.append(ph)
    if not fits:
        return None
    ph = _pick(rng, fits)
    bare = s["where_bare"] or ""
    text = ph.template.text
    if s["where"] is not None and not s["where"].startswith("the "):
        # "segment 4 of the liver", "both kidneys": drop the phrasing's own article
        text = text.replace("the {where}", "{where}").replace("The {where}", "{Where}")
    return _Template(text).fill({"where": bare, "size": s["size_num"] or "", "side": f.side or ""})


def _positive_sentence(rng: np.random.Generator, g: _Grammar, item: _Item) -> str:
    s = item.slots
    if item.hedged:
        with_size = s["size"] is not None and rng.random() < 0.6
        order = ("sized", "located", "plain") if with_size else ("located", "plain")
        for kind in order:
            fits = _fit(g.hedged[kind], s)
            if fits:
                return _finish(_pick(rng, fits).fill(s))
    elif rng.random() < g.p["catalog_phrasing"]:
        text = _catalog_sentence(rng, item)
        if text is not None:
            return _finish(text)
    order = ("sized", "located", "plain") if s["size"] is not None else ("located", "plain")
    for kind in order:
        fits = _fit(g.positive[kind], s)
        if fits:
            return _finish(_pick(rng, fits).fill(s))
    return _finish(f"{_cap(s['syn'])} {s['is']} observed")


def _negation_sentences(
    rng: np.random.Generator, plan: _Plan, block: _Block, tasks: list[str], negated: set[str]
) -> list[str]:
    g = plan.grammar
    out: list[str] = []
    in_phrase = _pick(rng, block.spec.in_) if block.spec.in_ else None
    names_place = plan.anatomy_words.get(block.spec.anatomy or "")
    i = 0
    while i < len(tasks):
        a = plan.words[tasks[i]]
        syn = a.negated.pick(rng)
        plural = _is_plural(syn)
        values: dict[str, str | None] = {
            "syn": syn,
            "in": None if names_place is not None and names_place.search(syn) else in_phrase,
            "was": "were" if plural else "was",
            "is": "are" if plural else "is",
        }
        if i + 1 < len(tasks) and rng.random() < g.p["pair_negatives"]:
            values["syn2"] = plan.words[tasks[i + 1]].negated.pick(rng)
            out.append(_finish(_pick(rng, g.neg_pair).fill(values)))
            negated.update(tasks[i : i + 2])
            i += 2
            continue
        fits = _fit(g.neg_single, values)
        out.append(_finish(_pick(rng, fits).fill(values)))
        negated.add(tasks[i])
        i += 1
    return out


def _pertinent(
    rng: np.random.Generator, plan: _Plan, block: _Block, reported: set[str], negated: set[str], p: float
) -> list[str]:
    cands = [t for t in block.spec.common if t not in reported and t not in negated and rng.random() < p]
    return _negation_sentences(rng, plan, block, cands, negated) if cands else []


def _normal_sentences(
    rng: np.random.Generator, plan: _Plan, block: _Block, reported: set[str], negated: set[str], whole: bool
) -> tuple[list[str], tuple[str, ...]]:
    """Normal statement(s) of a block; ``whole`` = the block has no finding (second sentences allowed)."""
    g = plan.grammar
    ok = [st for st in block.normal if not (st.negates & reported)]
    if not whole:
        ok = [st for st in ok if st.negates != block.tasks or not block.tasks]
    if not ok:
        return [], ()
    first = _pick(rng, ok)
    out, covers = [_finish(first.text)], first.covers
    if first.negates != block.tasks:
        negated.update(first.negates)
    if whole and rng.random() < g.p["second_normal"]:
        extra = [st for st in ok if st.negates != first.negates and not st.covers] + list(block.spec.second)
        if extra:
            second = _pick(rng, extra)
            if isinstance(second, _Statement):
                if second.negates != block.tasks:
                    negated.update(second.negates)
                second = second.text
            out.append(_finish(second))
    return out, covers


def _join_list(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _impression(rng: np.random.Generator, g: _Grammar, items: list[_Item], view_kind: str) -> str:
    if not items:
        return _pick(rng, g.imp_normal[view_kind])
    chosen = [it for it in items if not it.hedged or rng.random() < g.p["impression_subtle"]]
    if not chosen:
        chosen = [max(items, key=lambda it: it.finding.severity)]
    chosen = chosen[: g.impression_max_items]
    texts = []
    for it in chosen:
        s = it.slots
        groups = (
            (g.imp_hedged["located"], g.imp_hedged["plain"])
            if it.hedged
            else ((g.imp_items["sized"],) if s["size"] is not None and rng.random() < 0.6 else ())
            + (g.imp_items["located"], g.imp_items["plain"])
        )
        text = None
        for templates in groups:
            fits = _fit(templates, s)
            if fits:
                text = _finish(_pick(rng, fits).fill(s), end="")
                break
        texts.append(text or _cap(s["syn"]))
    style = _pick(rng, ("numbered", "numbered", "bullets", "sentences", "inline"))
    if style == "inline" and len(texts) > 3:
        style = "sentences"

    def end(t: str) -> str:
        return t if t.endswith(("?", ".")) else t + "."

    if style == "numbered":
        out = "\n".join(f"{i + 1}. {end(t)}" for i, t in enumerate(texts))
    elif style == "bullets":
        mark = _pick(rng, ("-", "•"))
        out = "\n".join(f"{mark} {end(t)}" for t in texts)
    elif style == "sentences":
        out = " ".join(end(t) for t in texts)
    else:
        parts = [texts[0]] + [t[:1].lower() + t[1:] for t in texts[1:]]
        out = end(_join_list(parts))
    if rng.random() < g.p["impression_closing"]:
        out += ("\n" if style in ("numbered", "bullets") else " ") + _pick(rng, g.imp_closings)
    return out


def write_report(
    rng: np.random.Generator,
    findings: Sequence[Finding],
    anatomies_in_view: Sequence[str],
    catalog: TaskCatalog,
    label_noise: float = 0.0,
    grammar: str | os.PathLike = DEFAULT_GRAMMAR,
) -> SynthReport:
    """Write one report for a synthetic case.

    ``findings`` are the case's ground truth (tasks of ``catalog``), ``anatomies_in_view`` the anatomies of the
    catalog's anatomy set with any voxel in the volume: only those are described. ``label_noise`` in [0, 1]
    leaves each finding out with that probability (a task counts as omitted when none of its findings is
    reported) and, with that probability per report, mentions one absent task of an in-view anatomy
    (usually hedged). ``grammar`` names the phrase-bank file (``configs/synth/<name>.yaml`` or a path).
    """
    if not 0.0 <= float(label_noise) <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    g = load_report_grammar(grammar)
    plan = _plan_for(g, catalog)
    view = {a for a in anatomies_in_view}
    for f in findings:
        if f.task not in plan.words:
            raise ValueError(f"finding task {f.task!r} is not in task catalog {catalog.name!r}")
        anat = plan.words[f.task].task.anatomy
        if anat is not None and anat not in view:
            raise ValueError(
                f"finding {f.task!r} (lesion {f.lesion_id}) lies in anatomy {anat!r}, which is not in view "
                f"({', '.join(sorted(view)) or 'none'})"
            )
    chest = bool(view & g.regions["chest"])

    def applicable(b: _Block) -> bool:
        s = b.spec
        if s.when == "chest" and not chest or s.when == "no_chest" and chest:
            return False
        if s.anatomy is not None:
            return s.anatomy in view
        return bool(set(s.requires_any) & view) if s.requires_any else True

    active = [b for b in plan.blocks if applicable(b)]
    active_ids = {b.spec.id for b in active}

    def block_of(task: str) -> _Block:
        for i in plan.task_blocks.get(task, ()):
            if plan.blocks[i].spec.id in active_ids:
                return plan.blocks[i]
        return plan.other_block

    # ---- label noise
    noise = float(label_noise)
    kept: list[Finding] = []
    dropped: list[Finding] = []
    for f in findings:
        (dropped if noise > 0 and rng.random() < noise else kept).append(f)
    kept_tasks = {f.task for f in kept}
    omitted = tuple(dict.fromkeys(f.task for f in dropped if f.task not in kept_tasks))
    spurious_f: Finding | None = None
    if noise > 0 and rng.random() < noise:
        present = {f.task for f in findings}
        excluded = set(g.spurious_exclude)
        cands = [
            t
            for t in catalog.tasks
            if t.name not in present
            and t.name not in excluded
            and t.anatomy in view
            and block_of(t.name) is not plan.other_block
        ]
        if cands:
            t = _pick(rng, cands)
            b = block_of(t.name)
            sides = [k for k in b.spec.where if k != "none"]
            side = _pick(rng, sides) if sides and rng.random() < 0.7 else None
            size = None
            if t.name in g.sized_tasks:
                lo, hi = g.spurious_size_mm
                size = round(lo + (hi - lo) * rng.random(), 1)
            spurious_f = Finding(t.name, t.anatomy or "", 0, size, None, side, 0.1 + 0.24 * rng.random())

    # ---- items per block
    items_by_block: dict[str, list[_Item]] = {}
    for f, is_spurious in [(f, False) for f in kept] + ([(spurious_f, True)] if spurious_f else []):
        b = block_of(f.task)
        w = plan.words[f.task]
        if is_spurious:
            hedged = rng.random() >= g.p["spurious_asserted"]
        else:
            hedged = rng.random() < (g.p["hedge_subtle"] if f.subtle else g.p["hedge_conspicuous"])
        item = _Item(f, w, b, hedged, is_spurious, _item_slots(rng, plan, b, f, w))
        items_by_block.setdefault(b.spec.id, []).append(item)
    reported = {it.finding.task for its in items_by_block.values() for it in its}
    negated: set[str] = set()

    # ---- abdomen: catch-all sentence or grouped normals
    abd = [b for b in active if b.spec.region == "abdomen"]
    normal_abd = [b for b in abd if b.spec.id not in items_by_block]
    extent = "full" if view & g.regions["lower_abdomen"] else "upper"
    covered: set[str] = set()
    catch_first = catch_last = None
    group_at: dict[str, list[_Block]] = {}
    if normal_abd and rng.random() < g.p["catch_all"]:
        keep = [b for b in normal_abd if rng.random() < 0.35]
        has_abnormal = len(normal_abd) < len(abd)
        if not has_abnormal and (not keep or rng.random() < 0.5):
            catch_first = _pick(rng, g.catch_all["first"][extent])
        else:
            catch_last = _pick(rng, g.catch_all["other"][extent])
        covered.update(b.spec.id for b in normal_abd if b not in keep)
    else:
        groupable = [b for b in normal_abd if b.spec.group]
        if len(groupable) >= 2 and rng.random() < g.p["group_normals"]:
            k = 2 + int(rng.random() * (min(5, len(groupable)) - 1))
            idx = sorted(int(i) for i in rng.permutation(len(groupable))[:k])
            members = [groupable[i] for i in idx]
            group_at[members[0].spec.id] = members
            covered.update(b.spec.id for b in members)

    # ---- findings section
    sentences: list[str] = []
    if rng.random() < g.p["preamble"] and chest:
        sentences.append(_pick(rng, g.preambles))
    emitted: list[_Item] = []
    in_abdomen = False
    for b in active + ([plan.other_block] if "other" in items_by_block else []):
        bid = b.spec.id
        items = items_by_block.get(bid, [])
        if b.spec.region == "abdomen" and not in_abdomen:
            in_abdomen = True
            if catch_first is not None:
                sentences.append(_finish(catch_first))
            elif rng.random() < g.p["abdomen_header"]:
                sentences.append(_pick(rng, g.abdomen_headers[extent]))
        elif b.spec.region != "abdomen" and in_abdomen:
            in_abdomen = False
            if catch_last is not None:
                sentences.append(_finish(catch_last))
                catch_last = None
        if bid in group_at:
            members = group_at[bid]
            template = _pick(rng, g.group_templates)
            names = [_pick(rng, m.spec.group) for m in members]
            if template.text.startswith("{List}") and rng.random() < 0.5:
                names = [n[4:] if n.startswith("the ") else n for n in names]
            sentences.append(_finish(template.fill({"list": _join_list(names)})))
            continue
        if not items and bid in covered:
            continue
        if not items:
            if rng.random() < g.p["skip_normal"]:
                continue
            if b.spec.header and rng.random() < g.p["lung_window_header"]:
                sentences.append(_pick(rng, g.lung_window_headers))
            normals, covers = _normal_sentences(rng, plan, b, reported, negated, whole=True)
            covered.update(covers)
            sentences += normals
            sentences += _pertinent(rng, plan, b, reported, negated, 0.5 * g.p["pertinent_negative"])
            continue
        if b.spec.header and rng.random() < g.p["lung_window_header"]:
            sentences.append(_pick(rng, g.lung_window_headers))
        positives = [_positive_sentence(rng, g, it) for it in items]
        emitted += items
        context: list[str] = []
        if rng.random() < 0.6:
            context, covers = _normal_sentences(rng, plan, b, reported, negated, whole=False)
            covered.update(covers)
        context += _pertinent(rng, plan, b, reported, negated, g.p["pertinent_negative"])
        sentences += context + positives if rng.random() < g.p["normal_first"] else positives + context
    if catch_last is not None:
        sentences.append(_finish(catch_last))
    outside = [a for a in catalog.anatomy_set.anatomies if a.name not in view]
    if outside and rng.random() < g.p["out_of_view_note"]:
        a = _pick(rng, outside)
        plural = a.title.endswith("s")
        sentences.append(
            _finish(_pick(rng, g.out_of_view).fill({"title": a.title, "was": "were" if plural else "was"}))
        )

    if not sentences:
        sentences.append("None of the assessed organs is included in the sections.")
    view_kind = "both" if chest and view & g.regions["abdomen"] else ("chest" if chest else "abdomen")
    impression = _impression(rng, g, emitted, view_kind)
    return SynthReport(
        findings=" ".join(sentences),
        impression=impression,
        omitted=omitted,
        spurious=(spurious_f.task,) if spurious_f is not None else (),
    )


__all__ = [
    "DEFAULT_GRAMMAR",
    "GrammarError",
    "SynthReport",
    "load_report_grammar",
    "parse_report_grammar",
    "write_report",
]
