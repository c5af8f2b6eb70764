"""Prompt and label-sentence text: every sentence the text tower reads that the code writes rather than a
report. Strings in, strings out (no tokenizer, no torch); :mod:`fvlm.zeroshot` embeds the prompts into a prompt
bank, the ``prompt_context`` head (:mod:`fvlm.model.heads.prompt`) prepends its learned context to label
sentences, and the dataset extras ``label_text`` (``pipelines.train.extras.labels``) write the label sentences
of training.

Label sentences (the one format shared by training and zero-shot scoring, :func:`label_sentence`): the
lower-cased titles of the anatomy's positive tasks, catalog order, joined by ", " and ended with "."
("emphysema, lung nodule."), or ``"no abnormality."`` (:data:`NO_FINDING`) when the anatomy has none, at most
:data:`LABEL_MAX_LEN` tokens. At zero-shot time task t's positive prompt is ``[ctx] + "<title>."`` and its
negative ``[ctx] + "no abnormality."`` (:func:`task_prompts`): both are sentences training shows the head (a
case with only that finding; a case without any), while a "no <title>." sentence never occurs in training
(issue 22).

Catalog prompts by template set (:func:`select_prompts`, :data:`TEMPLATES`, default
:data:`DEFAULT_TEMPLATES`): ``"report"`` (:func:`report_prompts`, below), ``"all"`` (every stored catalog
prompt, ``Task.prompts``), ``"release"`` (the fVLM release style, ``"X."`` / ``"Not x."``), ``"ct-clip"``
(CT-CLIP's ``"X is present."`` / ``"X is not present."``), ``"structured"`` (the stored prompts plus the
task's structured sentences, :func:`structured_prompts`), or 0-based template indices into each task's stored
prompt lists.

Report-style zero-shot prompts (:func:`report_prompts`), written from a task's catalog words: the way radiology
reports state and deny a finding ("A 10 mm nodule is observed in the lung." / "No nodules are seen.", "The
lung is normal."). The words come from the task catalog (:mod:`anatomy.catalog`: synonyms, phrasings, the
optional ``prompt_nouns``), the sentence forms are the ``REPORT_*`` constants below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from anatomy.catalog import Anatomy, Prompts, Task
from fvlm.registry import Registry

__all__ = ["DEFAULT_TEMPLATES", "LABEL_MAX_LEN", "NO_FINDING", "REPORT_DENIALS", "REPORT_DENIALS_PER_NOUN",
           "REPORT_NORMAL", "REPORT_NOUNS", "REPORT_SLOT_VALUES", "REPORT_STATEMENTS", "ReportNoun",
           "TEMPLATES", "TEMPLATE_SETS", "label_phrase", "label_sentence", "report_nouns", "report_prompts", "select_prompts",
           "structured_prompts", "task_prompts"]

# ------------------------------------------------------------------------------------------ label sentences

#: token length of label sentences and learned prompts (fits base and tiny with a few dozen context vectors)
LABEL_MAX_LEN = 48
#: the label sentence of an anatomy without any positive task
NO_FINDING = "no abnormality."


def _lower_first(text: str) -> str:
    """First letter lower-cased, the rest kept (so acronyms survive): "Lung nodule" -> "lung nodule"."""
    return text[:1].lower() + text[1:]


def label_phrase(title: str) -> str:
    """A task title as it appears in a label sentence: white space collapsed, first letter lower-cased ("Lung
    nodule" -> "lung nodule"; the rest kept, so acronyms survive)."""
    return _lower_first(" ".join(str(title).split()))


def label_sentence(titles: Sequence[str]) -> str:
    """``"emphysema, lung nodule."`` for the titles of the positive tasks, ``"no abnormality."`` for none."""
    phrases = [label_phrase(t) for t in titles if str(t).strip()]
    return (", ".join(phrases) + ".") if phrases else NO_FINDING


def task_prompts(title: str) -> tuple[str, str]:
    """(positive, negative) text of a task for learned-context zero-shot scoring, in the training format of
    :func:`label_sentence`: the sentence of an anatomy with only this finding and that of an anatomy without
    any, ("emphysema.", "no abnormality.")."""
    return label_sentence([title]), label_sentence([])


# ------------------------------------------------------------------------------- catalog prompt template sets

#: the template set used when none is named
DEFAULT_TEMPLATES = "report"


def structured_prompts(task: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(positive, negative) prompts from a task's structured fields (``anatomy.catalog.Structured``).

    Positives: the definition, appearance, observation and verdict sentences the task has. Negatives: the
    verdict negated (``"X is present."`` -> ``"X is not present."``, ``"X are present."`` -> ``"X are not
    present."``; another verdict is not negated) and ``"No <title> is seen."``. ``((), ())`` for a task
    without structured fields.
    """
    st = getattr(task, "structured", None)
    if not st:
        return (), ()
    pos = st.sentences()
    neg: list[str] = []
    verdict = st.verdict.strip()
    for verb in (" is present.", " are present."):
        if verdict.lower().endswith(verb):
            neg.append(verdict[: -len(verb)] + verb.replace("present", "not present"))
            break
    neg.append(f"No {_lower_first(task.title)} is seen.")
    return pos, tuple(dict.fromkeys(neg))


#: template set name -> selector(task, anatomy) -> (positive, negative) prompt texts (:func:`select_prompts`)
TEMPLATES: Registry[Callable[[Any, Any], tuple[tuple[str, ...], tuple[str, ...]]]] = Registry("template set")


@TEMPLATES.register("report")
def _report(task: Any, anatomy: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Report-style sentences written from the task's catalog words (:func:`report_prompts`)."""
    generated = report_prompts(task, anatomy)
    return generated.positive, generated.negative


@TEMPLATES.register("all")
def _all(task: Any, anatomy: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Every stored catalog prompt of the task (``Task.prompts``)."""
    return tuple(task.prompts.positive), tuple(task.prompts.negative)


@TEMPLATES.register("release")
def _release(task: Any, anatomy: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The fVLM release style: short ``"X."`` positives, ``"Not x."`` negatives."""
    pos, neg = tuple(task.prompts.positive), tuple(task.prompts.negative)
    return (tuple(p for p in pos if "present" not in p.lower() and " no " not in f" {p.lower()} "
                  and len(p.split()) <= 6 and not p.lower().startswith("there is")),
            tuple(n for n in neg if n.lower().startswith("not ")))


@TEMPLATES.register("ct-clip")
def _ct_clip(task: Any, anatomy: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """CT-CLIP's ``"X is present."`` / ``"X is not present."``."""
    pos, neg = tuple(task.prompts.positive), tuple(task.prompts.negative)
    return (tuple(p for p in pos if p.lower().rstrip(".").endswith(" is present")),
            tuple(n for n in neg if n.lower().rstrip(".").endswith(" is not present")))


@TEMPLATES.register("structured")
def _structured(task: Any, anatomy: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The stored prompts plus the task's structured sentences (:func:`structured_prompts`)."""
    pos, neg = tuple(task.prompts.positive), tuple(task.prompts.negative)
    spos, sneg = structured_prompts(task)
    return tuple(dict.fromkeys(pos + spos)), tuple(dict.fromkeys(neg + sneg))


#: named template sets accepted by :func:`select_prompts` (and ``fvlm.zeroshot.encode_prompts``), in
#: registration order
TEMPLATE_SETS = tuple(TEMPLATES)


def select_prompts(task: Any, templates: str | Sequence[int] = DEFAULT_TEMPLATES,
                   anatomy: Any = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (positive, negative) prompt texts of ``task`` for a template set; ValueError when it selects none.

    ``anatomy``: the task's ``anatomy.catalog.Anatomy``, used by ``"report"`` (which nouns name the anatomy);
    None: the task's anatomy name alone.
    """
    pos, neg = tuple(task.prompts.positive), tuple(task.prompts.negative)
    if isinstance(templates, str):
        if templates not in TEMPLATES:
            raise ValueError(f"unknown template set {templates!r}; use one of {', '.join(TEMPLATES)} or indices")
        sel = TEMPLATES[templates](task, anatomy)
    else:
        idx = [int(i) for i in templates]
        sel = (tuple(pos[i] for i in idx if 0 <= i < len(pos)), tuple(neg[i] for i in idx if 0 <= i < len(neg)))
    if not sel[0] or not sel[1]:
        raise ValueError(f"task {task.name!r}: template set {templates!r} selects no positive or no negative prompt "
                         f"(catalog prompts: positive {list(pos)}, negative {list(neg)})")
    return sel


# ---------------------------------------------------------------------------------- report-style prompts

#: head words of a synonym that reads as an adjective ("emphysematous", "atelectatic", "consolidated"): not a noun
_ADJECTIVE_ENDINGS = ("ous", "ic", "ed", "ive", "al", "ary", "ular")
#: a synonym with a verb is a clause ("liver is enlarged", "heart size has increased"), not a noun phrase
_VERB = re.compile(r"\b(is|are|was|were|has|have|had)\b")
#: plural head words that do not follow the "-s" rule, and their singulars
_IRREGULAR_PLURALS = {"bullae": "bulla", "calculi": "calculus", "diverticula": "diverticulum", "foci": "focus",
                      "sequelae": "sequela", "septa": "septum", "metastases": "metastasis"}
#: head words ending in "s" that are not plurals
_SINGULAR_S = ("ss", "is", "us", "ascites", "hydrops", "pancreas")
#: head-word endings of findings that reports state without an article ("Consolidation is seen", "No
#: consolidation is seen", not "No consolidations are seen"), even when the catalog also lists a plural
_MASS_ENDINGS = ("ion", "sis", "itis", "ia", "pathy", "phy", "megaly", "ema", "ing", "ity", "ment", "fluid", "disease",
                 "thorax", "material", "glass")
#: count nouns among those endings
_COUNT_WORDS = frozenset({"lesion"})
_AN = re.compile(r"^(?:[aeio]|u(?!ni|ro|s[aeiu]))", re.I)
_HEDGE = re.compile(r"\s*\([^()]*\?\)")  # "(hemangioma?)": a phrasing's question, not part of the statement

#: the value of each phrasing slot in a report-style prompt (``{where}``: the anatomy, see report_prompts)
REPORT_SLOT_VALUES = {"size": "10", "side": "right"}
#: how many of a task's nouns (:func:`report_nouns`) the report-style prompts use
REPORT_NOUNS = 3
#: positive statements per noun; ``{state}`` is "a nodule", "pleural effusion" or "degenerative changes" and
#: ``{is}`` agrees with it; the second is used only where the task's phrasings place the finding in the anatomy
REPORT_STATEMENTS = ("{State} {is} observed.", "There {is} {state} in the {where}.")
#: denials; ``{deny}`` is the plural of a count noun ("nodules"), else the noun ("pleural effusion"). Noun k of
#: a task uses ``REPORT_DENIALS_PER_NOUN`` of them, starting at k x that number (so the forms rotate)
REPORT_DENIALS = ("No {deny} {is} seen.", "No {deny} {was} detected.", "There {is} no {deny}.",
                  "{Deny} {was} not observed.")
REPORT_DENIALS_PER_NOUN = 2
#: how reports describe the anatomy when it shows nothing: negatives of every task bound to an anatomy
REPORT_NORMAL = ("The {where} is normal.", "The {where} is unremarkable.", "The {where} is within normal limits.",
                 "No abnormality is seen in the {where}.", "No pathology was detected in the {where}.",
                 "The {where} appears natural.")


def _head(phrase: str) -> tuple[str, str, str]:
    """(words before the head, head word, rest from " in " / " of " on): ``"thickening of the wall"`` ->
    ``("", "thickening", " of the wall")``."""
    cut = min((i for i in (phrase.find(" in "), phrase.find(" of ")) if i >= 0), default=len(phrase))
    words = phrase[:cut].split()
    return " ".join(words[:-1]), (words[-1] if words else ""), phrase[cut:]


def _is_plural_word(word: str) -> bool:
    if word in _IRREGULAR_PLURALS:
        return True
    return word.endswith("s") and not word.endswith(_SINGULAR_S)


def _singular_candidates(word: str) -> list[str]:
    if word in _IRREGULAR_PLURALS:
        return [_IRREGULAR_PLURALS[word]]
    out = [word[:-1], word[:-2]]
    if word.endswith("ies"):
        out.append(word[:-3] + "y")
    if word.endswith("es"):
        out.append(word[:-2] + "is")  # atelectases -> atelectasis
    return out


@dataclass(frozen=True)
class ReportNoun:
    """One finding word of a task as reports use it: its singular and/or plural form and how it is counted."""

    singular: str | None
    """Singular form (None: the catalog lists the plural only, e.g. ``degenerative changes``)."""
    plural: str | None
    """Plural form (None: the catalog lists the singular only)."""
    count: bool
    """A count noun: stated with an article ("A nodule is observed") and denied in the plural when the catalog
    has one ("No nodules are seen"); otherwise the word is stated and denied bare ("Pleural effusion is
    observed", "No pleural effusion is seen")."""

    def state(self) -> tuple[str, bool]:
        """(the noun as a positive statement's subject, plural?): ("a nodule", False), ("degenerative
        changes", True)."""
        if self.singular is None:
            return str(self.plural), True
        if self.count:
            return ("an " if _AN.match(self.singular) else "a ") + self.singular, False
        return self.singular, False

    def deny(self) -> tuple[str, bool]:
        """(the noun after "No", plural?): ("nodules", True), ("pleural effusion", False)."""
        if self.plural is not None and (self.count or self.singular is None):
            return self.plural, True
        return str(self.singular), False


def report_nouns(task: Task, limit: int = REPORT_NOUNS) -> tuple[ReportNoun, ...]:
    """The first ``limit`` nouns of a task as report sentences use them, in catalog order.

    Taken from ``task.prompt_nouns`` when the catalog gives them (as they are), else from ``task.synonyms``,
    leaving out synonyms with a verb (``liver is enlarged``), whose head word reads as an adjective (ending
    ``-ous -ic -ed -ive -al -ary -ular``: ``emphysematous``, ``nodular``), single hyphenated words
    (``ground-glass``), and modifiers (a synonym that starts another one and has no plural: ``ground glass``
    of ``ground glass opacity``). A singular and its plural (``nodule``, ``nodules``; ``atelectasis``,
    ``atelectases``) make one noun; spellings that differ only by hyphens count once. The task title (lower
    case) stands in when nothing qualifies.
    """
    given = bool(task.prompt_nouns)
    syns = list(dict.fromkeys(s.strip().lower() for s in (task.prompt_nouns or task.synonyms) if s.strip()))
    known = set(syns)
    singular_of: dict[str, str] = {}  # plural synonym -> its singular, when the list has both
    for s in syns:
        pre, head, rest = _head(s)
        if _is_plural_word(head):
            candidates = (f"{pre} {c}{rest}".strip() for c in _singular_candidates(head))
            found = [f for f in candidates if f in known and f != s]
            if found:
                singular_of[s] = found[0]
    has_plural = set(singular_of.values())
    nouns: dict[str, dict[str, str]] = {}  # key (singular, hyphens as spaces) -> {"sg": ..., "pl": ...}
    for s in syns:
        head = _head(s)[1]
        if not given:
            if not head or _VERB.search(s) or head.endswith(_ADJECTIVE_ENDINGS) or ("-" in s and " " not in s):
                continue
            if not _is_plural_word(head) and s not in has_plural and any(p.startswith(s + " ") for p in syns):
                continue  # a modifier: "ground glass" of "ground glass opacity"
        key = singular_of.get(s, s).replace("-", " ")
        nouns.setdefault(key, {}).setdefault("pl" if _is_plural_word(head) else "sg", s)
    out = []
    for entry in list(nouns.values())[:limit]:
        sg, pl = entry.get("sg"), entry.get("pl")
        head = _head(sg)[1] if sg is not None else ""
        count = sg is not None and (head in _COUNT_WORDS or not head.endswith(_MASS_ENDINGS))
        out.append(ReportNoun(sg, pl, count))
    if not out:
        title = task.title.lower()
        plural = _is_plural_word(_head(title)[1])
        out.append(ReportNoun(None if plural else title, title if plural else None, False))
    return tuple(out)


def _fill(template: str, values: dict[str, str]) -> str:
    """``{slot}`` -> value, ``{Slot}`` -> the value capitalised; the sentence starts with a capital."""
    for k, v in values.items():
        template = template.replace("{" + k + "}", v).replace("{" + k.capitalize() + "}", v[:1].upper() + v[1:])
    template = " ".join(template.split())
    return template[:1].upper() + template[1:]


def report_prompts(task: Task, anatomy: Anatomy | None = None) -> Prompts:
    """Positive and negative zero-shot prompts of ``task`` written the way reports state and deny a finding.

    Reports, and the per-anatomy texts a model is trained on, say "No nodules are seen." or "Pleural effusion
    was not detected.", and describe a normal organ as "The liver is normal."; they never say "Not lung
    nodule." or "Lung nodule is not present.". Built from catalog data; with ``where`` the anatomy's name in
    words, singular ("lung", "adrenal gland"):

    * positives: the task's ``phrasings`` with their slots filled by neutral values (:data:`REPORT_SLOT_VALUES`,
      ``{where}``; a trailing question such as "(hemangioma?)" dropped; a phrasing with ``{where}`` skipped
      for a whole-study task), then per noun of :func:`report_nouns` the :data:`REPORT_STATEMENTS` ("A nodule
      is observed.", "Pleural effusion is observed.", "Degenerative changes are observed."; "There is a
      nodule in the lung." only where a phrasing places the finding in the anatomy with ``{where}`` and the
      noun does not itself name the anatomy);
    * negatives: per noun :data:`REPORT_DENIALS_PER_NOUN` of the :data:`REPORT_DENIALS`, rotating ("No
      nodules are seen.", "No nodules were detected."; "There is no nodular lesion.", "Nodular lesion was not
      observed."), then, for a task bound to an anatomy, its :data:`REPORT_NORMAL` statements ("The lung is
      normal.", ...), which is how the texts of most negative cases read.

    ``anatomy``: the task's :class:`Anatomy` (its synonyms tell which nouns name it); None for a whole-study
    task, or to use ``task.anatomy``'s name alone.
    """
    where = None
    if task.anatomy is not None:
        where = (anatomy.name if anatomy is not None else task.anatomy).replace("_", " ")
    place_words = ({where} | set(anatomy.synonyms if anatomy is not None else ())) if where else set()
    names_place = (re.compile(r"\b(?:" + "|".join(re.escape(w) for w in sorted(place_words, key=len, reverse=True))
                              + r")\b") if place_words else None)
    located = any("{where}" in text for text in task.phrasings)
    pos: list[str] = []
    for text in task.phrasings:
        if "{where}" in text and where is None:
            continue
        pos.append(_fill(_HEDGE.sub("", text), {**REPORT_SLOT_VALUES, "where": where or ""}))
    neg: list[str] = []
    per = REPORT_DENIALS_PER_NOUN
    for k, noun in enumerate(report_nouns(task)):
        state, plural = noun.state()
        in_place = located and where is not None and not (names_place and names_place.search(state))
        for template in REPORT_STATEMENTS if in_place else [t for t in REPORT_STATEMENTS if "{where}" not in t]:
            pos.append(_fill(template, {"state": state, "is": "are" if plural else "is", "where": where or ""}))
        deny, plural = noun.deny()
        for i in range(k * per, (k + 1) * per):
            neg.append(_fill(REPORT_DENIALS[i % len(REPORT_DENIALS)],
                             {"deny": deny, "is": "are" if plural else "is", "was": "were" if plural else "was"}))
    if where is not None:
        neg += [_fill(t, {"where": where}) for t in REPORT_NORMAL]
    return Prompts(tuple(dict.fromkeys(pos)), tuple(dict.fromkeys(neg)))
