"""Anatomy sets and diagnosis-task catalogs: typed views of ``configs/anatomy/*.yaml`` and ``configs/tasks/*.yaml``.

An *anatomy set* groups TotalSegmentator ``total`` classes into anatomies (fVLM groups its 117 classes into
15). Anatomy ``k`` of a set (1-based, in file order) is label ``k`` of that set's anatomy label map; 0 is
background. A *task catalog* lists diagnosis tasks, each bound to one anatomy of a set (or to none, for a
whole-study label such as CT-RATE's "Medical material"), with the words reports use for it and the prompts
zero-shot scoring uses: those stored in the file (report-style ones are written from the task's words and
phrasings by :mod:`fvlm.prompts`).

Every check names the file and the entry at fault, e.g.
``configs/anatomy/x.yaml: anatomy 'heart': unknown TotalSegmentator class 'hart'``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any


from configs.checks import ConfigError, read_yaml_mapping, require, strings
from configs.paths import resolve_config
from anatomy.totalseg import total_class_ids

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class CatalogError(ConfigError):
    """A catalog file is malformed; the message names the file and the entry."""


@dataclass(frozen=True)
class Anatomy:
    """One anatomy of a set."""

    name: str
    """Identifier, lower snake case (``lung``, ``adrenal_gland``)."""
    label: int
    """1-based label of this anatomy in the set's anatomy label map (file order)."""
    classes: tuple[str, ...]
    """TotalSegmentator ``total`` class names grouped into this anatomy."""
    synonyms: tuple[str, ...]
    """Words and phrases reports use for it (lower case), used to assign sentences to anatomies."""
    title: str = ""
    """Human-readable name (``Adrenal glands``); defaults to the name with spaces."""

    def __post_init__(self) -> None:
        if not self.title:
            object.__setattr__(self, "title", self.name.replace("_", " ").capitalize())


@dataclass(frozen=True)
class AnatomySet:
    """An ordered set of anatomies, loaded from one YAML file."""

    name: str
    """Preset name (the file's ``name`` field)."""
    anatomies: tuple[Anatomy, ...]
    """Anatomies in label order."""
    description: str = ""
    """One paragraph on what the set covers and where it comes from."""
    source: str = ""
    """The file it was loaded from."""

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.anatomies]

    def __len__(self) -> int:
        return len(self.anatomies)

    def __getitem__(self, name: str) -> Anatomy:
        for a in self.anatomies:
            if a.name == name:
                return a
        raise KeyError(f"anatomy set {self.name!r} has no anatomy {name!r}; it has {', '.join(self.names)}")

    def __contains__(self, name: object) -> bool:
        return any(a.name == name for a in self.anatomies)

    def class_to_anatomy(self) -> dict[str, str]:
        """TotalSegmentator class name -> anatomy name, for the classes the set uses."""
        return {c: a.name for a in self.anatomies for c in a.classes}

    def total_id_to_label(self) -> dict[int, int]:
        """TotalSegmentator ``total`` label id -> this set's anatomy label (1..len)."""
        ids = total_class_ids()
        return {ids[c]: a.label for a in self.anatomies for c in a.classes}


@dataclass(frozen=True)
class Prompts:
    """Zero-shot prompt texts of one task: positive (finding present) and negative (absent)."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]


#: The optional structured-prompt fields of a task, in the order a prompt set lists them.
STRUCTURED_FIELDS = ("definition", "appearance", "observation", "verdict")


@dataclass(frozen=True)
class Structured:
    """Structured description of a finding (D-MLM style; docs/methods.md#origins), each one short sentence or "".

    ``definition`` what the finding is (textbook); ``appearance`` what it looks like on CT; ``observation`` a
    report-style statement of it; ``verdict`` the plain positive statement ("Emphysema is present.").
    """

    definition: str = ""
    appearance: str = ""
    observation: str = ""
    verdict: str = ""

    def sentences(self, fields: tuple[str, ...] = STRUCTURED_FIELDS) -> tuple[str, ...]:
        """The non-empty sentences of ``fields``, in that order."""
        return tuple(getattr(self, f) for f in fields if getattr(self, f))

    def __bool__(self) -> bool:
        return any(getattr(self, f) for f in STRUCTURED_FIELDS)


@dataclass(frozen=True)
class Task:
    """One diagnosis task of a catalog."""

    name: str
    """Identifier, lower snake case (``lung_nodule``)."""
    title: str
    """Display name, also the column name in label tables (``Lung nodule``)."""
    anatomy: str | None
    """Anatomy the finding belongs to, or None for a whole-study label."""
    synonyms: tuple[str, ...]
    """Words and phrases reports use for the finding (lower case)."""
    phrasings: tuple[str, ...]
    """Typical positive statements as templates; slots ``{where}``, ``{size}``, ``{side}`` may appear."""
    prompts: Prompts
    """Zero-shot prompts."""
    structured: Structured = Structured()
    """Optional structured sentences (``definition``, ``appearance``, ``observation``, ``verdict`` fields of
    the task entry): extra zero-shot templates (``fvlm.prompts`` template set ``structured``) and label-text
    augmentation in training (``pipelines.train.extras.labels``)."""
    prompt_nouns: tuple[str, ...] = ()
    """Optional nouns (lower case) for the report-style prompts (:func:`fvlm.prompts.report_prompts`), in place of the
    first usable ``synonyms``: for a task whose first synonyms name normal anatomy ("lymph nodes")."""


@dataclass(frozen=True)
class TaskCatalog:
    """A list of diagnosis tasks over one anatomy set, loaded from one YAML file."""

    name: str
    anatomy_set: AnatomySet
    tasks: tuple[Task, ...]
    description: str = ""
    source: str = ""

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"task catalog {self.name!r} has no task {name!r}")

    def by_anatomy(self) -> dict[str | None, list[Task]]:
        """Anatomy name (None for whole-study tasks) -> its tasks, anatomies in set order."""
        out: dict[str | None, list[Task]] = {a: [] for a in self.anatomy_set.names}
        for t in self.tasks:
            out.setdefault(t.anatomy, []).append(t)
        return out


# ----------------------------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(path, CatalogError)


def _require(where: str, entry: dict[str, Any], key: str, kind: type) -> Any:
    return require(where, entry, key, kind, CatalogError)


def _strings(where: str, entry: dict[str, Any], key: str, required: bool = True) -> tuple[str, ...]:
    return strings(where, entry, key, required, CatalogError)


def _check_name(where: str, name: str) -> None:
    if not _NAME.match(name):
        raise CatalogError(f"{where}: name {name!r} must be lower snake case ([a-z][a-z0-9_]*)")


def _duplicates(values: list[str]) -> list[str]:
    return sorted(v for v, n in Counter(values).items() if n > 1)


def parse_anatomy_set(data: dict[str, Any], source: str) -> AnatomySet:
    """Build an :class:`AnatomySet` from parsed YAML, validating every entry."""
    name = _require(source, data, "name", str)
    entries = _require(source, data, "anatomies", list)
    if not entries:
        raise CatalogError(f"{source}: no anatomies")
    known = total_class_ids()
    anatomies: list[Anatomy] = []
    owner: dict[str, str] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CatalogError(f"{source}: anatomy #{i + 1} is not a mapping")
        aname = _require(f"{source}: anatomy #{i + 1}", entry, "name", str)
        where = f"{source}: anatomy {aname!r}"
        _check_name(where, aname)
        if aname in owner.values() or any(a.name == aname for a in anatomies):
            raise CatalogError(f"{source}: duplicate anatomy {aname!r}")
        classes = _strings(where, entry, "classes")
        for c in classes:
            if c not in known:
                close = [k for k in known if c.split("_")[0] in k][:5]
                hint = f" (did you mean one of {', '.join(close)}?)" if close else ""
                raise CatalogError(f"{where}: unknown TotalSegmentator class {c!r}{hint}")
            if c in owner:
                raise CatalogError(f"{where}: class {c!r} is already grouped into anatomy {owner[c]!r}")
            owner[c] = aname
        synonyms = tuple(s.lower() for s in _strings(where, entry, "synonyms"))
        dup = _duplicates(list(synonyms))
        if dup:
            raise CatalogError(f"{where}: duplicate synonyms {dup}")
        title = entry.get("title", "")
        anatomies.append(Anatomy(aname, len(anatomies) + 1, classes, synonyms, title))
    return AnatomySet(name, tuple(anatomies), str(data.get("description", "")).strip(), source)


def _structured(where: str, entry: dict[str, Any]) -> Structured:
    """The optional structured-prompt fields of a task entry: each absent, or one non-empty string."""
    values = {}
    for key in STRUCTURED_FIELDS:
        if key not in entry or entry[key] is None:
            continue
        value = entry[key]
        if not isinstance(value, str):
            raise CatalogError(f"{where}: field {key!r} must be a string (one sentence), got {type(value).__name__}")
        if not value.strip():
            raise CatalogError(f"{where}: field {key!r} is empty; give a sentence or leave the field out")
        values[key] = " ".join(value.split())
    return Structured(**values)


def parse_task_catalog(data: dict[str, Any], source: str, anatomy_set: AnatomySet | None = None) -> TaskCatalog:
    """Build a :class:`TaskCatalog` from parsed YAML; its ``anatomy_set`` field names the set it uses."""
    name = _require(source, data, "name", str)
    if anatomy_set is None:
        anatomy_set = load_anatomy_set(_require(source, data, "anatomy_set", str))
    entries = _require(source, data, "tasks", list)
    if not entries:
        raise CatalogError(f"{source}: no tasks")
    tasks: list[Task] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CatalogError(f"{source}: task #{i + 1} is not a mapping")
        tname = _require(f"{source}: task #{i + 1}", entry, "name", str)
        where = f"{source}: task {tname!r}"
        _check_name(where, tname)
        if any(t.name == tname for t in tasks):
            raise CatalogError(f"{source}: duplicate task {tname!r}")
        title = _require(where, entry, "title", str)
        anat = entry.get("anatomy")
        if anat is not None and anat not in anatomy_set:
            raise CatalogError(
                f"{where}: anatomy {anat!r} is not in anatomy set {anatomy_set.name!r} "
                f"({', '.join(anatomy_set.names)})"
            )
        synonyms = tuple(s.lower() for s in _strings(where, entry, "synonyms"))
        phrasings = _strings(where, entry, "phrasings", required=False)
        prompts = _require(where, entry, "prompts", dict)
        pos = _strings(f"{where} prompts", prompts, "positive")
        neg = _strings(f"{where} prompts", prompts, "negative")
        structured = _structured(where, entry)
        nouns = tuple(s.lower() for s in _strings(where, entry, "prompt_nouns", required=False))
        tasks.append(Task(tname, title, anat, synonyms, phrasings, Prompts(pos, neg), structured, nouns))
    dup = _duplicates([t.title for t in tasks])
    if dup:
        raise CatalogError(f"{source}: duplicate task titles {dup}")
    return TaskCatalog(name, anatomy_set, tuple(tasks), str(data.get("description", "")).strip(), source)


def load_anatomy_set(name_or_path: str | os.PathLike) -> AnatomySet:
    """Load an anatomy set by preset name (``fvlm15``, ``ct-rate4``) or YAML path."""
    return _load_anatomy_set(str(resolve_config("anatomy", name_or_path)))


def load_task_catalog(name_or_path: str | os.PathLike) -> TaskCatalog:
    """Load a task catalog by preset name (``fvlm54``, ``ct-rate``) or YAML path."""
    return _load_task_catalog(str(resolve_config("tasks", name_or_path)))


@lru_cache(maxsize=None)
def _load_anatomy_set(path: str) -> AnatomySet:
    return parse_anatomy_set(_read_yaml(Path(path)), path)


@lru_cache(maxsize=None)
def _load_task_catalog(path: str) -> TaskCatalog:
    return parse_task_catalog(_read_yaml(Path(path)), path)


__all__ = [
    "Anatomy",
    "AnatomySet",
    "CatalogError",
    "Prompts",
    "STRUCTURED_FIELDS",
    "Structured",
    "Task",
    "TaskCatalog",
    "load_anatomy_set",
    "load_task_catalog",
    "parse_anatomy_set",
    "parse_task_catalog",
]
