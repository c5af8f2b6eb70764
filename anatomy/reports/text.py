"""Report text clean-up and sentence / clause splitting, robust to real CT report style.

Real reports are not well-formed prose: CT-RATE-style translated reports use headers ending in a semicolon
("When examined in the lung parenchyma window; Aeration of both lungs is normal"), quotes as impression
bullets (``" Hydrothorax on the left " Consolidation in the right lower lobe``), numbered lists, run-on
sentences and decimal numbers ("3.3 cm"); exports carry HTML remnants (``<br>``, ``&nbsp;``) and control
characters. The splitter is rule based and fast (regular expressions, no model): spaCy's statistical
sentence splitters need a pretrained pipeline, and medspaCy's PyRuSH splitter is an order of magnitude slower
than this on long reports while knowing nothing of these conventions.

Offsets: every :class:`Span` indexes :func:`clean_text`'s output, the text a parse result keeps.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

#: Abbreviations after which a period does not end a sentence (lower case, without the period).
ABBREVIATIONS = frozenset(
    "e.g i.e vs etc approx dr mr mrs ms no nr fig cf al ca st inc min max mm cm ml ap lat ant post sup inf "
    "seg segm resp incl dept univ jr sr prof hr".split()
)

_TAG = re.compile(r"<\s*(/?)\s*([a-zA-Z][a-zA-Z0-9]*)[^<>]{0,400}>|<!--.*?-->", re.S)
_BLOCK_TAGS = frozenset("br p div li tr td th h1 h2 h3 h4 h5 h6 ul ol table hr".split())
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
                         "\u2018": "'", "\u2019": "'", "\u2013": "-", "\u2014": "-", "\u2212": "-",
                         "\r": "\n", "\u2022": "\n- ", "\u00b7": "\n- "})

#: Section headers that open a report part; the key is the section the text after them belongs to.
SECTION_HEADERS = {
    "findings": "findings", "finding": "findings", "report": "findings", "description": "findings",
    "impression": "impression", "impressions": "impression", "conclusion": "impression",
    "conclusions": "impression", "opinion": "impression", "result": "impression", "results": "impression",
    "summary": "impression", "diagnosis": "impression", "assessment": "impression",
    "technique": "technique", "clinical information": "history", "clinical history": "history",
    "history": "history", "indication": "history", "comparison": "history",
}
_HEADER = re.compile(
    r"\s*(" + "|".join(sorted((re.escape(k) for k in SECTION_HEADERS), key=len, reverse=True)) + r")\s*[:\-]\s*",
    re.I,
)
_BULLET = re.compile(r"\s*(?:\(?\d{1,2}[.)]|[-*\u2022>]|[a-h][.)])\s+")

# Sentence boundaries: end punctuation then space then a sentence start; a newline; a semicolon or colon before
# a capitalised word (headers such as "...window; Aeration"); a standalone quote used as a bullet.
_BOUNDARY = re.compile(
    r"(?P<end>[.!?]+)(?P<q>[\"')\]]*)\s+(?=[\"'(\[]?[A-Z0-9\-\u00c0-\u024f])"
    r"|(?P<nl>\s*\n\s*)"
    r"|(?P<semi>[;:])\s+(?=[\"']?[A-Z])"
    r"|(?P<quote>(?:(?<=\s)|^)\"(?=\s|[A-Z])|(?<=[.!?])\"|\"(?=\s*$))"
)
_CLAUSE = re.compile(r"\s*;\s*|\s*:\s+")


@dataclass(frozen=True)
class Span:
    """A piece of the cleaned report: ``text == cleaned[start:end]``."""

    start: int
    end: int
    text: str
    section: str = "findings"
    """``findings`` or ``impression`` (or ``technique`` / ``history`` where a header says so)."""


def decode(value: bytes | str | None) -> tuple[str, list[str]]:
    """Text from bytes or str; invalid UTF-8 bytes are replaced (U+FFFD), with a warning."""
    warnings: list[str] = []
    if value is None:
        return "", warnings
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), warnings
        except UnicodeDecodeError:
            warnings.append("invalid UTF-8 bytes replaced")
            return value.decode("utf-8", errors="replace"), warnings
    if not isinstance(value, str):
        return str(value), warnings
    if "\ufffd" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value[:0]):
        warnings.append("text holds replacement characters (invalid bytes in the source)")
    return value, warnings


def _tag(m: re.Match[str]) -> str:
    name = (m.group(2) or "").lower()
    return "\n" if name in _BLOCK_TAGS else " "


def clean_text(text: str, max_chars: int | None = None) -> tuple[str, list[str]]:
    """Strip HTML remnants and control characters, normalise quotes, dashes and spaces.

    Returns the cleaned text and warnings (HTML removed, text truncated to ``max_chars``).
    """
    warnings: list[str] = []
    if "<" in text and _TAG.search(text):
        text = _TAG.sub(_tag, text)
        warnings.append("HTML tags removed")
    if "&" in text:
        text = html.unescape(text)
    text = _CONTROL.sub(" ", text.translate(_QUOTES))
    text = _SPACES.sub(" ", text)
    text = re.sub(r" *\n[ \n]*", "\n", text).strip()
    if max_chars is not None and len(text) > max_chars:
        cut = text.rfind(".", 0, max_chars)
        text = text[: cut + 1 if cut > max_chars // 2 else max_chars]
        warnings.append(f"text truncated to {len(text)} of its characters (max_chars={max_chars})")
    return text, warnings


def _ends_in_abbreviation(text: str, dot: int) -> bool:
    """Whether the period at ``dot`` closes an abbreviation or a single letter ("e.g.", "Dr.", "A.")."""
    i = dot
    while i > 0 and (text[i - 1].isalpha() or text[i - 1] == "."):
        i -= 1
    word = text[i:dot].lower()
    return word in ABBREVIATIONS or (len(word) == 1 and word.isalpha() and word not in "ai")


def split_sentences(text: str, section: str = "findings") -> list[Span]:
    """Split cleaned text into sentences (see the module doc for the conventions handled).

    Section headers ("IMPRESSION:", "Findings -") switch the section of the sentences after them and are not
    sentences themselves; bullets and list numbers are stripped from sentence starts.
    """
    spans: list[Span] = []
    start = 0

    def emit(a: int, b: int) -> None:
        nonlocal section
        while a < b and text[a] in " \"'\n":
            a += 1
        while b > a and text[b - 1] in " \"\n":
            b -= 1
        while a < b:
            h = _HEADER.match(text, a, b)
            if h and (h.end() - a) < 40:
                section = SECTION_HEADERS[h.group(1).lower()]
                a = h.end()
                continue
            m = _BULLET.match(text, a, b)
            if m:
                a = m.end()
                continue
            break
        if b - a >= 2 and any(c.isalnum() for c in text[a:b]):
            spans.append(Span(a, b, text[a:b], section))

    for m in _BOUNDARY.finditer(text):
        if m.group("end"):
            dot = m.start("end")
            if m.group("end") == "." and _ends_in_abbreviation(text, dot) \
                    and "\n" not in text[m.end("q"):m.end()]:
                continue  # "2 cm. The" goes on; "2 cm.\nSPLEEN:" is a line break, a boundary
            cut = m.end("q")
        elif m.group("semi"):
            # a header before a semicolon/colon is a sentence of its own only when it is short
            cut = m.end("semi")
        else:
            cut = m.start()
            if m.group("nl") is not None and cut < len(text) and m.end() < len(text) and text[m.end()].islower() \
                    and cut > 0 and text[cut - 1] not in ".;:!?":
                continue  # a wrapped line
        emit(start, cut)
        start = m.end()
    emit(start, len(text))
    return spans


def split_clauses(sentence: Span) -> list[Span]:
    """Clauses of a sentence at semicolons and colons (list items, header + statement)."""
    out: list[Span] = []
    a = 0
    s = sentence.text
    for m in _CLAUSE.finditer(s):
        if m.start() > a:
            out.append(Span(sentence.start + a, sentence.start + m.start(), s[a:m.start()], sentence.section))
        a = m.end()
    if a < len(s):
        out.append(Span(sentence.start + a, sentence.end, s[a:], sentence.section))
    return out or [sentence]


__all__ = ["ABBREVIATIONS", "SECTION_HEADERS", "Span", "clean_text", "decode", "split_clauses", "split_sentences"]
