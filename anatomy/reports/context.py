"""ConText (Harkema et al., J Biomed Inform 2009) over phrase matches: negation, uncertainty, history, hypothesis,
and findings of a previous study (PRIOR_STUDY: described for the earlier examination only).

The rules are data (``configs/reports/context.yaml``, medspaCy's rule vocabulary: category, direction,
phrases or patterns, ``max_words``). The algorithm is ConText's, run on character offsets of one sentence:

1. find modifiers (cue phrases) and terminations; a PSEUDO modifier ("no change") removes the modifiers it
   overlaps; a longer cue wins over a shorter one it overlaps ("no evidence of" over "no");
2. a modifier's scope runs FORWARD from its end to the next termination, clause boundary (``;``, ``:``) or the
   sentence end, BACKWARD from its start back to the previous one, or both ways (BIDIRECTIONAL), at most
   ``max_words`` words;
3. a target (a finding phrase) takes the categories of the modifiers whose scope holds it.

This is an equivalent of medspaCy's ``ConText`` component on plain strings: it avoids building spaCy docs
(the parser's speed target is hundreds of reports per second on one core) and makes scope termination by
conjunctions and by a new predicate ("A nodule is seen and no effusion is observed") explicit rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from configs.checks import ConfigError, read_yaml_mapping
from configs.paths import resolve_config

CATEGORIES = ("NEGATED_EXISTENCE", "POSSIBLE_EXISTENCE", "HISTORICAL", "PRIOR_STUDY", "HYPOTHETICAL", "PSEUDO")
DIRECTIONS = ("FORWARD", "BACKWARD", "BIDIRECTIONAL")


class ContextRuleError(ConfigError):
    """A ConText rule file is malformed; the message names the file and the rule."""


def phrase_pattern(phrase: str) -> str:
    """Regex for a literal phrase on normalised text: whole words, hyphens as spaces, any run of spaces."""
    words = phrase.lower().replace("-", " ").split()
    return r"\s+".join(re.escape(w) for w in words)


def normalise(text: str) -> str:
    """Lower case with hyphens as spaces; same length as ``text`` so offsets carry over."""
    return text.lower().replace("-", " ")


@dataclass(frozen=True)
class Modifier:
    """One cue found in a sentence."""

    category: str
    direction: str
    start: int
    end: int
    text: str
    max_words: int


@dataclass(frozen=True)
class _Rule:
    category: str
    direction: str
    max_words: int


class ContextRules:
    """Compiled ConText rules: one alternation for the modifiers, one for the terminations."""

    def __init__(
        self,
        rules: list[dict[str, Any]],
        terminations: dict[str, Any],
        source: str = "<rules>",
        normality: dict[str, list[str]] | None = None,
        carry_over_starts: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.source = source
        normality = normality or {}
        self.normal_re = _phrases_re(normality.get("normal") or [])
        """Cues of a normal statement ("normal", "unremarkable"), or None when the ``normality`` block lists none."""
        self.abnormal_re = _phrases_re(normality.get("abnormal") or [])
        """Words of an abnormality ("lesion", "dilated"): asserted, the sentence's anatomy is not normal."""
        self.weak_abnormal_re = _phrases_re(normality.get("weak_abnormal") or [])
        """Words of an abnormality only where their clause holds no normal cue ("linear densities are seen", not
        "parenchymal density is natural")."""
        self.carry_over_re = _phrases_re(carry_over_starts, anchored=True)
        alts: list[tuple[int, str, _Rule]] = []
        for i, r in enumerate(rules):
            where = f"{source}: modifier #{i + 1}"
            if not isinstance(r, dict):
                raise ContextRuleError(f"{where}: not a mapping")
            cat = r.get("category")
            if cat not in CATEGORIES:
                raise ContextRuleError(f"{where}: category {cat!r} is not one of {', '.join(CATEGORIES)}")
            direction = r.get("direction", "FORWARD")
            if direction not in DIRECTIONS:
                raise ContextRuleError(f"{where}: direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
            rule = _Rule(cat, direction, int(r.get("max_words", 20)))
            phrases = r.get("phrases") or []
            patterns = r.get("patterns") or []
            if not phrases and not patterns:
                raise ContextRuleError(f"{where}: needs `phrases` or `patterns`")
            for p in phrases:
                if not isinstance(p, str):
                    raise ContextRuleError(f"{where}: phrase {p!r} is not a string (quote YAML words such as \"no\")")
                alts.append((len(p), p, rule))
            for p in patterns:
                try:
                    re.compile(p)
                except re.error as e:
                    raise ContextRuleError(f"{where}: pattern {p!r} is not a valid regex: {e}") from e
                alts.append((len(p), _Regex(p), rule))
        self._phrases = PhraseIndex([(p, r) for _, p, r in alts if not isinstance(p, _Regex)])
        pats = [(p, r) for _, p, r in alts if isinstance(p, _Regex)]
        self._pattern_rules = [r for _, r in pats]
        self._pattern_re = re.compile("|".join(f"(?P<m{i}>{_bounded(p)})" for i, (p, _) in enumerate(pats))) \
            if pats else None
        term_phrases = [str(p) for p in (terminations.get("phrases") or [])]
        term = list(terminations.get("patterns") or [])
        for p in term:
            try:
                re.compile(p)
            except re.error as e:
                raise ContextRuleError(f"{source}: termination {p!r} is not a valid regex: {e}") from e
        forward_only = [str(p) for p in (terminations.get("forward_only") or [])]
        self._term_phrases = PhraseIndex([(p, False) for p in term_phrases] + [(p, True) for p in forward_only])
        self._term_re = re.compile("|".join(_bounded(p) for p in term) + r"|[;:]") if term else re.compile(r"[;:]")

    @classmethod
    def load(cls, names: list[str] | tuple[str, ...] | str) -> ContextRules:
        """Load and merge rule files by preset name (``context``) or path, from ``configs/reports/``."""
        if isinstance(names, str):
            names = [names]
        rules: list[dict[str, Any]] = []
        terms: dict[str, list[str]] = {"phrases": [], "patterns": [], "forward_only": []}
        normality: dict[str, list[str]] = {"normal": [], "abnormal": [], "weak_abnormal": []}
        carry: list[str] = []
        sources = []
        for name in names:
            path = resolve_config("reports", name)
            data = _read(path)
            rules += list(data.get("modifiers") or [])
            t = data.get("terminations") or {}
            terms["phrases"] += list(t.get("phrases") or [])
            terms["patterns"] += list(t.get("patterns") or [])
            terms["forward_only"] += list(t.get("forward_only") or [])
            for k in normality:
                normality[k] += list((data.get("normality") or {}).get(k) or [])
            carry += list(data.get("carry_over_starts") or [])
            sources.append(str(path))
        return cls(rules, terms, ", ".join(sources), normality, carry)

    def modifiers(self, norm: str) -> list[Modifier]:
        """Cues in the normalised text, PSEUDO ones removed with what they overlap."""
        found = [Modifier(r.category, r.direction, a, b, norm[a:b], r.max_words)
                 for a, b, r in self._phrases.finditer(norm)]
        if self._pattern_re is not None:
            for m in self._pattern_re.finditer(norm):
                r = self._pattern_rules[int(m.lastgroup[1:])]  # type: ignore[index]
                found.append(Modifier(r.category, r.direction, m.start(), m.end(), m.group(), r.max_words))
        # a longer cue wins over a shorter one it overlaps
        found.sort(key=lambda f: (f.start, -(f.end - f.start)))
        kept: list[Modifier] = []
        for f in found:
            if kept and f.start < kept[-1].end:
                if f.end - f.start > kept[-1].end - kept[-1].start:
                    kept[-1] = f
                continue
            kept.append(f)
        pseudo = [f for f in kept if f.category == "PSEUDO"]
        if pseudo:
            kept = [f for f in kept if f.category != "PSEUDO"]
        return kept

    def terminations(self, norm: str, backward: bool = False) -> list[tuple[int, int]]:
        """Scope terminations in the normalised text; ``backward=True`` leaves out the forward-only ones."""
        return [(a, b) for a, b, fwd in self.terminations_flagged(norm) if not (backward and fwd)]

    def terminations_flagged(self, norm: str) -> list[tuple[int, int, bool]]:
        """Scope terminations as ``(start, end, forward_only)``: a forward-only one ("accompanied by", "along
        with") joins noun phrases, so it ends a forward cue's scope ("no effusion accompanied by a nodule") but
        not a backward predicate's ("the consolidation accompanied by a halo has regressed")."""
        out = [(a, b, bool(fwd)) for a, b, fwd in self._term_phrases.finditer(norm)]
        out += [(m.start(), m.end(), False) for m in self._term_re.finditer(norm)]
        out.sort()
        return out


class _Regex(str):
    """A rule pattern (regex), as opposed to a literal phrase."""


_TOKEN = re.compile(r"[a-z0-9]+")


class PhraseIndex:
    """Literal phrases indexed by first word: matching costs one dictionary look-up per word of the text
    (a regex alternation of a few hundred phrases scans every character against each of them).

    Matches are whole words, leftmost and longest first, non-overlapping, as a sorted alternation would give.
    """

    def __init__(self, items: list[tuple[str, Any]]) -> None:
        by_first: dict[str, list[tuple[int, re.Pattern[str], Any]]] = {}
        for phrase, payload in items:
            words = phrase.lower().replace("-", " ").split()
            if not words:
                continue
            rx = re.compile(phrase_pattern(phrase) + r"(?![a-z0-9])")
            first = _TOKEN.match(words[0])
            key = first.group() if first else words[0]
            by_first.setdefault(key, []).append((len(phrase), rx, payload))
        self._by_first = {k: [(rx, p) for _, rx, p in sorted(v, key=lambda t: -t[0])] for k, v in by_first.items()}

    def finditer(self, norm: str, start: int = 0, end: int | None = None) -> list[tuple[int, int, Any]]:
        out: list[tuple[int, int, Any]] = []
        last = -1
        get = self._by_first.get
        for w in _TOKEN.finditer(norm, start, len(norm) if end is None else end):
            a = w.start()
            if a < last:
                continue
            cands = get(w.group())
            if not cands:
                continue
            for rx, payload in cands:
                m = rx.match(norm, a)
                if m:
                    out.append((a, m.end(), payload))
                    last = m.end()
                    break
        return out


def _phrases_re(phrases: list[str] | tuple[str, ...], anchored: bool = False) -> re.Pattern[str] | None:
    if not phrases:
        return None
    alts = sorted({phrase_pattern(str(p)) for p in phrases}, key=len, reverse=True)
    return re.compile(("^" if anchored else "") + _bounded("|".join(alts)))


def _bounded(p: str) -> str:
    """Whole-word match unless the pattern starts/ends with a non-word character itself."""
    return rf"(?<![a-z0-9])(?:{p})(?![a-z0-9])" if p[:1].isalnum() or p[:1] == "(" else f"(?:{p})"


def _read(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(path, ContextRuleError)


_WORD = re.compile(r"[a-z0-9]+")


def scope_categories(
    target: tuple[int, int],
    modifiers: list[Modifier],
    terms: list[tuple[int, int]],
    norm: str,
    sent_start: int,
    sent_end: int,
    back_terms: list[tuple[int, int]] | None = None,
) -> dict[str, Modifier]:
    """Categories whose modifier scope holds ``target`` -> the nearest such modifier.

    ``terms`` end forward scopes, ``back_terms`` (default: ``terms``) backward ones. A backward cue that opens its
    clause ("...nodule in the left lung; is stable", "; looks regressed") is a bare predicate of the clause before:
    the semicolon or colon right before it does not end its scope."""
    t0, t1 = target
    if back_terms is None:
        back_terms = terms
    out: dict[str, Modifier] = {}
    dist: dict[str, int] = {}
    for mod in modifiers:
        if mod.start < t1 and t0 < mod.end:
            continue  # a cue inside the finding phrase itself
        if mod.end <= t0 and mod.direction in ("FORWARD", "BIDIRECTIONAL"):
            # forward: no termination between the cue and the target
            if any(mod.end <= a and b <= t0 for a, b in terms) or _words(norm, mod.end, t0) > mod.max_words:
                continue
            d = t0 - mod.end
        elif mod.start >= t1 and mod.direction in ("BACKWARD", "BIDIRECTIONAL"):
            if any(t1 <= a and b <= mod.start and not (norm[a:b] in (";", ":") and _words(norm, b, mod.start) == 0)
                   for a, b in back_terms) or _words(norm, t1, mod.start) > mod.max_words:
                continue
            d = mod.start - t1
        else:
            continue
        if mod.category not in dist or d < dist[mod.category]:
            dist[mod.category] = d
            out[mod.category] = mod
    return out


def _words(norm: str, a: int, b: int) -> int:
    return len(_WORD.findall(norm, a, b)) if b > a else 0


__all__ = ["CATEGORIES", "ContextRuleError", "ContextRules", "Modifier", "normalise", "phrase_pattern",
           "scope_categories"]
