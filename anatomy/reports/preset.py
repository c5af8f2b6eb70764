"""Report parser presets: ``configs/reports/<name>.yaml`` -> :class:`ReportPreset`.

A preset names a task catalog (and through it an anatomy set), the ConText rule files, the normal text of an
unmentioned anatomy, the default uncertain / historical policies, and the parser's own vocabulary: extra or
removed finding words per task (phrasings reports use that the catalog does not list), organ words outside
the anatomy set, context words that route a word shared by several tasks, and generic words that only count
next to one of them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any


from anatomy.catalog import TaskCatalog, load_anatomy_set, load_task_catalog
from configs.checks import ConfigError, read_yaml_mapping
from configs.paths import resolve_config

UNCERTAIN_POLICIES = ("positive", "negative")
HISTORICAL_POLICIES = ("present", "uncertain", "ignore")


class PresetError(ConfigError):
    """A report parser preset is malformed; the message names the file and the entry."""


@dataclass(frozen=True)
class ReportPreset:
    """Everything the report parser needs besides the text."""

    name: str
    """Preset name (``fvlm15``, ``ct-rate``)."""
    catalog: TaskCatalog
    """Tasks to label; its anatomy set gives the anatomies."""
    context: tuple[str, ...] = ("context",)
    """ConText rule files (names under ``configs/reports/`` or paths)."""
    normal_text: str = "{anatomy} shows no significant abnormalities."
    """Text of an anatomy the report never mentions; ``{anatomy}`` is the anatomy's title."""
    uncertain: str = "positive"
    """Label of an uncertain finding: ``positive`` (1) or ``negative`` (0)."""
    historical: str = "present"
    """A finding under a history cue: ``present``, ``uncertain`` or ``ignore`` (not evidence)."""
    task_terms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Task name -> finding words (catalog synonyms + ``tasks_extra.add`` - ``tasks_extra.remove``)."""
    other_regions: dict[str, str] = field(default_factory=dict)
    """Organ word outside the anatomy set -> organ name."""
    context_words: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Task name -> words that tie a shared word to it (default: its anatomy's synonyms)."""
    shared_default: tuple[str, ...] = ()
    """Tasks a shared word goes to when the sentence names none of its tasks' context words."""
    generic: tuple[str, ...] = ()
    """Words that only count where the sentence names one of their tasks' context words."""
    task_patterns: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Task name -> regexes (on lower-cased text, hyphens as spaces) for phrasings a word list cannot hold:
    a finding word and its anatomy word a few words apart, in either order ("increase in the thickness of the
    peribronchial wall")."""
    unspecific: dict[str, tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]] = field(default_factory=dict)
    """Task name -> groups of (words, unless): ``words`` name the task only where their sentence gives them no other
    explanation, i.e. names none of ``unless`` ("density increases ... consistent with sequelae" is a
    sequela, not an opacity)."""
    not_findings: tuple[str, ...] = ()
    """Phrases that hold a finding word but name no finding of any task ("lymph node stations", "pleural nodule"):
    they claim their text (longest match first) and count for nothing."""
    weak_regions: tuple[str, ...] = ()
    """Organ words of the anatomy set that other organs share ("lobe", "parenchyma"): they name their anatomy
    only where their sentence names no organ outside the set ("the right lobe of the liver")."""
    weak_regions_need_organ: bool = False
    """Stricter rule for ``weak_regions``: a weak word names its anatomy only where its own sentence, the sentence
    before it or the section heading above it also names that anatomy by a word of its own ("lobe" is the lung's
    in "The lungs are clear. A nodule in the left lobe", the thyroid's in "Thyroid: nodule in the left lobe")."""
    carry_generic: bool = False
    """Whether a ``generic`` word in a sentence naming no organ takes the anatomy carried from the sentence or
    heading before ("Liver: normal size. A 1 cm cyst is seen."); off, it needs a context word in its own sentence."""
    region_words: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Anatomy name -> extra organ words of that anatomy of the set (branch names, parts: "lad" -> heart,
    "caudate lobe" -> liver); they also tie shared finding words to the anatomy's tasks."""
    source: str = ""

    def __post_init__(self) -> None:
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise PresetError(f"{self.source or self.name}: uncertain {self.uncertain!r} is not one of "
                              f"{', '.join(UNCERTAIN_POLICIES)}")
        if self.historical not in HISTORICAL_POLICIES:
            raise PresetError(f"{self.source or self.name}: historical {self.historical!r} is not one of "
                              f"{', '.join(HISTORICAL_POLICIES)}")
        if "{anatomy}" not in self.normal_text:
            raise PresetError(f"{self.source or self.name}: normal_text must hold the slot {{anatomy}}")


def _words(where: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PresetError(f"{where}: expected a list of strings")
    return tuple(v.lower().replace("-", " ").strip() for v in value)


def parse_preset(data: dict[str, Any], source: str) -> ReportPreset:
    """Build a :class:`ReportPreset` from parsed YAML, checking every task it names."""
    name = data.get("name")
    if not isinstance(name, str):
        raise PresetError(f"{source}: needs a string `name`")
    if not isinstance(data.get("tasks"), str):
        raise PresetError(f"{source}: needs `tasks`, the task catalog (preset name or path)")
    catalog = load_task_catalog(data["tasks"])
    known = set(catalog.names)

    def check_task(where: str, t: str) -> None:
        if t not in known:
            raise PresetError(f"{where}: unknown task {t!r} (catalog {catalog.name!r} has {', '.join(catalog.names)})")

    extra = data.get("tasks_extra") or {}
    if not isinstance(extra, dict):
        raise PresetError(f"{source}: `tasks_extra` must map task names to {{add: [...], remove: [...]}}")
    terms: dict[str, tuple[str, ...]] = {}
    for t in catalog.tasks:
        words = [s.replace("-", " ") for s in t.synonyms]
        e = extra.get(t.name) or {}
        removed = set(_words(f"{source}: tasks_extra.{t.name}.remove", e.get("remove")))
        words = [w for w in words if w not in removed]
        words += [w for w in _words(f"{source}: tasks_extra.{t.name}.add", e.get("add")) if w not in words]
        terms[t.name] = tuple(dict.fromkeys(words))
    patterns: dict[str, tuple[str, ...]] = {}
    for t in catalog.tasks:
        pats = (extra.get(t.name) or {}).get("patterns") or []
        if not isinstance(pats, list) or not all(isinstance(p, str) for p in pats):
            raise PresetError(f"{source}: tasks_extra.{t.name}.patterns: expected a list of regex strings")
        for p in pats:
            try:
                re.compile(p)
            except re.error as e:
                raise PresetError(f"{source}: tasks_extra.{t.name}.patterns: {p!r} is not a valid regex: {e}") from e
        if pats:
            patterns[t.name] = tuple(pats)
    for t in extra:
        check_task(f"{source}: tasks_extra", t)
    unspecific: dict[str, tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]] = {}
    for t, entries in (data.get("unspecific") or {}).items():
        check_task(f"{source}: unspecific", t)
        groups = []
        for j, entry in enumerate(entries if isinstance(entries, list) else [entries]):
            where = f"{source}: unspecific.{t}[{j}]"
            if not isinstance(entry, dict):
                raise PresetError(f"{where}: expected {{words: [...], unless: [...]}}")
            words = _words(f"{where}.words", entry.get("words"))
            unless = _words(f"{where}.unless", entry.get("unless"))
            if not words or not unless:
                raise PresetError(f"{where}: needs non-empty `words` and `unless`")
            groups.append((words, unless))
            terms[t] = tuple(dict.fromkeys(list(terms[t]) + list(words)))
        unspecific[t] = tuple(groups)

    other: dict[str, str] = {}
    regions = data.get("other_regions") or {}
    own = set(catalog.anatomy_set.names)
    own_words = {s.replace("-", " ") for a in catalog.anatomy_set.anatomies for s in a.synonyms}
    for set_name in regions.get("anatomy_sets") or []:
        for a in load_anatomy_set(set_name).anatomies:
            if a.name in own:
                continue
            for s in a.synonyms:
                s = s.replace("-", " ")
                if s not in own_words:
                    other.setdefault(s, a.name)
    for w in _words(f"{source}: other_regions.words", regions.get("words")):
        if w not in own_words:
            other.setdefault(w, w)
    # organ groups outside the set: {region name: [words]} ("carotid artery": [carotid, carotids, ...])
    groups = regions.get("groups") or {}
    if not isinstance(groups, dict):
        raise PresetError(f"{source}: other_regions.groups must map a region name to a list of its words")
    for region, words in groups.items():
        for w in _words(f"{source}: other_regions.groups.{region}", words):
            if w in own_words:
                raise PresetError(f"{source}: other_regions.groups.{region}: {w!r} is a word of the anatomy set; "
                                  f"remove it here or from the anatomy set")
            other.setdefault(w, str(region))
    region_words: dict[str, tuple[str, ...]] = {}
    for anatomy, words in (data.get("region_words") or {}).items():
        if anatomy not in own:
            raise PresetError(f"{source}: region_words: unknown anatomy {anatomy!r} (anatomy set "
                              f"{catalog.anatomy_set.name!r} has {', '.join(catalog.anatomy_set.names)})")
        region_words[anatomy] = _words(f"{source}: region_words.{anatomy}", words)
    flags = {}
    for key in ("weak_regions_need_organ", "carry_generic"):
        flags[key] = data.get(key, False)
        if not isinstance(flags[key], bool):
            raise PresetError(f"{source}: {key} must be true or false, not {flags[key]!r}")

    context_words = {}
    for t, words in (data.get("context_words") or {}).items():
        check_task(f"{source}: context_words", t)
        context_words[t] = _words(f"{source}: context_words.{t}", words)
    shared = _words(f"{source}: shared_default", data.get("shared_default"))
    for t in shared:
        check_task(f"{source}: shared_default", t)
    ctx = data.get("context", ["context"])
    return ReportPreset(
        name=name,
        catalog=catalog,
        context=tuple([ctx] if isinstance(ctx, str) else ctx),
        normal_text=str(data.get("normal_text", ReportPreset.normal_text)),
        uncertain=str(data.get("uncertain", "positive")),
        historical=str(data.get("historical", "present")),
        task_terms=terms,
        other_regions=other,
        context_words=context_words,
        shared_default=tuple(s.replace(" ", "_") for s in shared),
        generic=_words(f"{source}: generic", data.get("generic")),
        task_patterns=patterns,
        unspecific=unspecific,
        not_findings=_words(f"{source}: not_findings", data.get("not_findings")),
        weak_regions=_words(f"{source}: weak_regions", data.get("weak_regions")),
        weak_regions_need_organ=flags["weak_regions_need_organ"],
        carry_generic=flags["carry_generic"],
        region_words=region_words,
        source=source,
    )


def load_preset(name_or_path: str | os.PathLike) -> ReportPreset:
    """Load a report parser preset by name (``fvlm15``, ``ct-rate``) or YAML path."""
    return _load(str(resolve_config("reports", name_or_path)))


@lru_cache(maxsize=None)
def _load(path: str) -> ReportPreset:
    return parse_preset(read_yaml_mapping(path, PresetError), path)


__all__ = ["HISTORICAL_POLICIES", "UNCERTAIN_POLICIES", "PresetError", "ReportPreset", "load_preset", "parse_preset"]
