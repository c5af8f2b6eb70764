"""Dataset extra ``entity_mlm``: entity-aware masking of each anatomy text for masked language modelling.

After entity-centred context-aware pre-training (ECAMP, Wang et al. 2024: finding words and their modifiers
are what an image-conditioned language model should have to recover; boilerplate is not), transferred to the
per-anatomy texts of fVLM (docs/methods.md#origins, issue 9).

1. Character categories of an anatomy text (:meth:`EntityLexicon.categories`), highest first:

   ``ENTITY``    finding words: the report parser's evidence spans (the run's parser preset parses the
                 anatomy text again: ``case.json`` keeps the per-anatomy texts but not the evidence offsets;
                 a ``report.parsed.evidence`` list, when a case has one, adds its phrases) and every match
                 of the preset's finding vocabulary (the task catalog's synonyms plus the preset's extra
                 words, optional plural) - plus their modifiers: size, severity, laterality, location and
                 appearance words (:data:`MODIFIER_WORDS`) and numbers / measurements ("21x19 mm") in a
                 sentence that holds a finding word;
   ``CUE``       the negation cue of a finding the sentence names and denies: in "No pleural effusion." the
                 word "No", in "Pleural effusion was not detected." the ConText cue "was not detected" (with
                 the report parser: the cue of an absent mention and the negation words, in a sentence whose
                 findings are all absent; without it: the negation words of a sentence that holds a finding
                 word). It is the one image-dependent word of such a sentence - the finding words the text
                 gives away, whether the finding is there only the image can tell - so it is asked at the rate
                 of a finding word (``cue_prob`` 0.5) with full weight (issue 22);
   ``NEGATION``  boilerplate in a *normal* sentence without a finding word: the words of
                 :data:`NEGATION_WORDS` ("no", "not", "without", "unremarkable", "normal", ...);
   ``BASE``      everything else.

2. Words. The fast tokenizer's offsets map tokens to characters and its ``word_ids`` group word pieces into
   words; a word's category is the highest of its characters'. Whole words are masked (all pieces of a
   word together: a masked "##ule" next to a visible "nod" would be trivial to recover).

3. Draw (the extra's own ``rng``; evaluation, where ``rng`` is None, uses ``default_rng([seed, index, h])``
   so that a validation pass is the same every time). Word w of category c is masked with probability
   ``p_c`` (``entity_prob`` 0.5, ``cue_prob`` 0.5, ``base_prob`` 0.15, ``negation_prob`` 0.05); a text with maskable words
   but no masked word gets one, drawn with probability proportional to ``p_c`` (``min_masked``). Every
   token of a masked word is replaced BERT-style: by ``[MASK]`` with probability 0.8, by a random
   non-special token with 0.1, kept with 0.1.

Fields (A anatomies, L = the dataset's ``max_text_len``; the same tokenisation as ``input_ids``)::

    mlm_input_ids  (A, L) int64    input_ids with the masked tokens replaced
    mlm_labels     (A, L) int64    the original token where masked, -100 elsewhere
    mlm_weights    (A, L) float32  loss weight of each masked token (0 elsewhere): ``entity_weight`` 1.0,
                                   ``cue_weight`` 1.0, ``base_weight`` 1.0, ``negation_weight`` 0.1

Other probabilities or weights: the ``entity_mlm`` head's option ``masking`` (a mapping of
:class:`EntityMasking` fields, in the recipe: ``configs/train/fvlm-entity.yaml``) asks for the extra
``entity_mlm?cue_prob=...`` (``fvlm.model.heads.extra_name``), built here by :func:`make_entity_mlm`; or
register another extra and name it in the head's ``extra`` option.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from pipelines.train.extras import register_extra, register_extra_factory

__all__ = [
    "BASE", "NEGATION", "ENTITY", "CUE", "EntityMasking", "EntityLexicon", "MODIFIER_WORDS", "NEGATION_WORDS",
    "tokenize_categories", "draw_mlm", "make_entity_mlm",
]

log = logging.getLogger(__name__)

BASE, NEGATION, ENTITY, CUE = 0, 1, 2, 3

#: Words that qualify a finding (size, severity, number, laterality, location, appearance, course).
MODIFIER_WORDS = (
    "small", "large", "tiny", "minimal", "mild", "mildly", "moderate", "moderately", "severe", "severely",
    "marked", "markedly", "massive", "extensive", "slight", "slightly", "prominent", "significant",
    "diffuse", "diffusely", "focal", "multifocal", "multiple", "numerous", "several", "single", "solitary",
    "scattered", "few", "bilateral", "unilateral", "left", "right", "upper", "lower", "middle", "anterior",
    "posterior", "lateral", "medial", "superior", "inferior", "apical", "basal", "proximal", "distal",
    "central", "peripheral", "subpleural", "lobe", "lobes", "segment", "segments", "calcified",
    "noncalcified", "spiculated", "cystic", "solid", "hypodense", "hyperdense", "hypoattenuating",
    "hyperattenuating", "enhancing", "nodular", "irregular", "lobulated", "acute", "chronic", "new",
    "enlarged", "dilated", "thickened", "mm", "cm", "millimeter", "millimeters", "centimeter", "centimeters",
)
#: Boilerplate of normal statements, down-weighted in a sentence without a present or uncertain finding.
NEGATION_WORDS = (
    "no", "not", "without", "unremarkable", "normal", "normally", "natural", "absent", "negative", "free",
    "none", "nor", "neither", "preserved", "intact",
)
_NUMBER = re.compile(r"(?<![a-z])\d+(?:[.,]\d+)?(?:\s*[x*]\s*\d+(?:[.,]\d+)?)*", re.IGNORECASE)
_SENTENCE = re.compile(r"[^.;!?]+[.;!?]*")


def _words_re(words: Iterable[str], plural: bool = False) -> re.Pattern[str] | None:
    """Case-insensitive alternation of ``words`` (longest first), word-bounded, optional plural ``s``/``es``."""
    words = sorted({w.strip().lower() for w in words if w and w.strip()}, key=lambda w: (-len(w), w))
    if not words:
        return None
    body = "|".join(r"\s+".join(re.escape(p) for p in w.replace("-", " ").split()) for w in words)
    tail = r"(?:e?s)?" if plural else ""
    return re.compile(rf"(?<![a-z0-9])(?:{body}){tail}(?![a-z0-9])", re.IGNORECASE)


# ------------------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class EntityMasking:
    """Masking probabilities and loss weights per word category (module docstring)."""

    entity_prob: float = 0.5
    base_prob: float = 0.15
    negation_prob: float = 0.05
    cue_prob: float = 0.5
    """Negation cues of named findings: the image answers them (module docstring, ``CUE``)."""
    entity_weight: float = 1.0
    base_weight: float = 1.0
    negation_weight: float = 0.1
    cue_weight: float = 1.0
    mask_share: float = 0.8
    """Share of masked tokens replaced by ``[MASK]``."""
    random_share: float = 0.1
    """Share replaced by a random non-special token (the rest keep their token)."""
    min_masked: int = 1
    """A text with maskable words gets at least this many masked words."""

    def __post_init__(self) -> None:
        for name in ("entity_prob", "base_prob", "negation_prob", "cue_prob", "mask_share", "random_share"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"EntityMasking.{name} must lie in [0, 1], got {v}")
        for name in ("entity_weight", "base_weight", "negation_weight", "cue_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"EntityMasking.{name} must be >= 0, got {getattr(self, name)}")
        if self.mask_share + self.random_share > 1.0:
            raise ValueError(f"EntityMasking: mask_share + random_share must be <= 1, got "
                             f"{self.mask_share} + {self.random_share}")
        if self.min_masked < 0:
            raise ValueError(f"EntityMasking.min_masked must be >= 0, got {self.min_masked}")

    @property
    def probs(self) -> np.ndarray:
        """(4,) masking probability of BASE, NEGATION, ENTITY, CUE."""
        return np.array([self.base_prob, self.negation_prob, self.entity_prob, self.cue_prob])

    @property
    def weights(self) -> np.ndarray:
        """(4,) loss weight of BASE, NEGATION, ENTITY, CUE."""
        return np.array([self.base_weight, self.negation_weight, self.entity_weight, self.cue_weight],
                        dtype=np.float32)


# ---------------------------------------------------------------------------------------------- lexicon


class EntityLexicon:
    """Character categories of a text from finding words, an optional report parser, modifiers and negations.

    Args:
        finding_terms: finding words and phrases (the preset's ``task_terms`` / the catalog's synonyms).
        parser: an ``anatomy.reports.ReportParser`` whose evidence spans (and statuses and cues) are used;
            None: finding words by ``finding_terms`` only, and a sentence is normal when it holds a
            negation word or no finding word.
        modifiers, negations: word lists (default :data:`MODIFIER_WORDS`, :data:`NEGATION_WORDS`).
    """

    def __init__(self, finding_terms: Iterable[str], parser: Any = None,
                 modifiers: Sequence[str] = MODIFIER_WORDS, negations: Sequence[str] = NEGATION_WORDS) -> None:
        self.parser = parser
        self._finding = _words_re(finding_terms, plural=True)
        self._modifier = _words_re(modifiers)
        self._negation = _words_re(negations)

    @classmethod
    def from_preset(cls, preset: str) -> "EntityLexicon":
        """The lexicon of a report parser preset: its finding vocabulary and its parser."""
        return _preset_lexicon(preset)

    def categories(self, text: str, phrases: Iterable[str] = ()) -> np.ndarray:
        """(len(text),) uint8 category of each character (BASE / NEGATION / ENTITY / CUE); ``phrases``: further
        finding phrases of this text (a case's stored evidence)."""
        cat = np.zeros(len(text), dtype=np.uint8)
        if not text:
            return cat
        findings: list[tuple[int, int]] = []
        positive: list[int] = []  # offsets of present / uncertain mentions
        cues: list[tuple[int, str]] = []  # (offset, cue) of absent mentions
        absent: list[int] = []  # offsets of absent mentions
        sentences: list[tuple[int, int]] = []
        if self.parser is not None:
            result = self.parser.parse(text)
            if result.text == text:  # offsets index our text (the parser only cleans what is not clean)
                sentences = [(s.start, s.end) for s in result.sentences]
                # finding words the parser tied to no anatomy are still finding words (masking asks for the
                # finding, whatever organ it is in)
                for e in (*result.evidence, *result.unassigned_findings):
                    findings.append((e.start, e.end))
                    if e.status in ("present", "uncertain"):
                        positive.append(e.start)
                    else:
                        absent.append(e.start)
                        if e.cue:
                            cues.append((e.start, e.cue))
            else:  # pragma: no cover - texts of fvlm preprocess are clean; keep the phrases at least
                phrases = [*phrases, *(e.text for e in result.evidence)]
        if not sentences:
            sentences = [(m.start(), m.end()) for m in _SENTENCE.finditer(text)]
        for rx in (self._finding, _words_re(phrases, plural=True)):
            if rx is not None:
                findings.extend((m.start(), m.end()) for m in rx.finditer(text))
        for a, b in findings:
            cat[a:b] = ENTITY
        for s, e in sentences:
            sentence = text[s:e]
            has_finding = any(s <= a < e for a, _ in findings)
            negations = [] if self._negation is None else [(s + m.start(), s + m.end())
                                                          for m in self._negation.finditer(sentence)]
            if self.parser is not None:
                normal = not any(s <= p < e for p in positive)
            else:
                normal = bool(negations) or not has_finding
            if has_finding:  # modifiers and measurements of the sentence's finding
                for rx in (self._modifier, _NUMBER):
                    for m in rx.finditer(sentence) if rx is not None else ():
                        cat[s + m.start():s + m.end()] = ENTITY
            if normal:
                # a sentence that names a finding and denies it: its negation words are the image's question;
                # in a sentence without a finding word they are boilerplate
                denies = any(s <= p < e for p in absent) if self.parser is not None else has_finding
                label = CUE if denies else NEGATION
                for a, b in negations:
                    seg = cat[a:b]
                    seg[seg == BASE] = label
                # the parser's cue of an absent mention (only in a sentence without a present one: "no change
                # in the size of the nodule" must not turn "no" into a question about the nodule)
                for pos, cue in cues:
                    if s <= pos < e:
                        k = sentence.lower().find(cue.lower())
                        if k >= 0:
                            seg = cat[s + k:s + k + len(cue)]
                            seg[seg == BASE] = CUE
        return cat


@lru_cache(maxsize=8)
def _preset_lexicon(preset: str) -> EntityLexicon:
    from anatomy.reports import ReportParser

    parser = ReportParser(preset)
    terms = [w for words in parser.preset.task_terms.values() for w in words]
    return EntityLexicon(terms, parser)


# ------------------------------------------------------------------------------------- tokens and draws


def tokenize_categories(tokenizer: Any, texts: Sequence[str], length: int, lexicon: EntityLexicon,
                        phrases: Sequence[Iterable[str]] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenise ``texts`` as the dataset does and give each token its word and category.

    Returns ``ids`` (T, L) int64, ``words`` (T, L) int64 (the word index, -1 for special and padding
    tokens) and ``cats`` (T, L) uint8 (the word's category: the highest over its pieces' characters).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the entity_mlm dataset extra needs a fast tokenizer (return_offsets_mapping); "
                         f"got {type(tokenizer).__name__}: load the tokenizer with use_fast=True")
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=length,
                    return_attention_mask=True, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)  # (T, L)
    words = np.full(ids.shape, -1, dtype=np.int64)
    cats = np.zeros(ids.shape, dtype=np.uint8)
    for t, text in enumerate(texts):
        char_cat = lexicon.categories(text, phrases[t] if phrases is not None else ())
        word_ids = enc.word_ids(t)
        for j, (w, (a, b)) in enumerate(zip(word_ids, enc["offset_mapping"][t])):
            if w is None or b <= a:
                continue
            words[t, j] = w
            cats[t, j] = char_cat[a:b].max(initial=BASE)
        for w in set(words[t][words[t] >= 0].tolist()):  # a word takes the highest category of its pieces
            sel = words[t] == w
            cats[t, sel] = cats[t, sel].max()
    return ids, words, cats


def draw_mlm(ids: np.ndarray, words: np.ndarray, cats: np.ndarray, rng: np.random.Generator, cfg: EntityMasking,
             mask_id: int, random_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One masking draw (module docstring, step 3) -> ``mlm_input_ids``, ``mlm_labels``, ``mlm_weights``.

    ``ids``, ``words``, ``cats`` (T, L) from :func:`tokenize_categories`; ``random_ids`` the token ids a
    random replacement is drawn from. Draw order (fixed, so a seed gives the same masks): per text, one
    uniform per word (in word order), then the forced word if any, then one uniform per masked token.
    """
    probs, weights = cfg.probs, cfg.weights
    inputs, labels = ids.copy(), np.full(ids.shape, -100, dtype=np.int64)
    wts = np.zeros(ids.shape, dtype=np.float32)
    for t in range(ids.shape[0]):
        row_words = words[t]
        uniq = np.unique(row_words[row_words >= 0])  # (W,) word indices in order
        if uniq.size == 0:
            continue
        first = np.array([np.flatnonzero(row_words == w)[0] for w in uniq])
        p = probs[cats[t, first]]  # (W,)
        chosen = rng.random(uniq.size) < p
        if chosen.sum() < cfg.min_masked and p.sum() > 0:
            need = min(cfg.min_masked, int((p > 0).sum())) - int(chosen.sum())
            if need > 0:
                free = np.flatnonzero(~chosen & (p > 0))
                pick = rng.choice(free, size=need, replace=False, p=p[free] / p[free].sum())
                chosen[pick] = True
        tokens = np.flatnonzero(np.isin(row_words, uniq[chosen]))  # (M,) positions of masked tokens
        if tokens.size == 0:
            continue
        labels[t, tokens] = ids[t, tokens]
        wts[t, tokens] = weights[cats[t, tokens]]
        r = rng.random(tokens.size)
        to_mask = tokens[r < cfg.mask_share]
        to_rand = tokens[(r >= cfg.mask_share) & (r < cfg.mask_share + cfg.random_share)]
        inputs[t, to_mask] = mask_id
        if to_rand.size:
            inputs[t, to_rand] = rng.choice(random_ids, size=to_rand.size)
    return torch.from_numpy(inputs), torch.from_numpy(labels), torch.from_numpy(wts)


# ------------------------------------------------------------------------------------------ the extra

#: per dataset: index -> (ids, words, cats) (the texts of a case never change), "vocab" -> _vocab(tokenizer)
_CACHE: "weakref.WeakKeyDictionary[Any, dict[Any, tuple]]" = weakref.WeakKeyDictionary()


def _vocab(tokenizer: Any) -> tuple[int, np.ndarray]:
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise ValueError("the entity_mlm dataset extra needs a tokenizer with a mask token ([MASK])")
    special = set(tokenizer.all_special_ids)
    random_ids = np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)
    return int(mask_id), random_ids


def _lexicon_for(dataset: Any) -> EntityLexicon:
    preset = (getattr(dataset, "run", None) or {}).get("report_parser_preset")
    if preset:
        try:
            return _preset_lexicon(preset)
        except Exception as e:  # noqa: BLE001 - a custom preset that is gone: masking without finding words
            log.warning("entity_mlm: report parser preset %r not loadable (%s); no finding words known, only "
                        "the base and negation categories are used", preset, e)
    return EntityLexicon(())


def make_entity_mlm(cfg: EntityMasking = EntityMasking()):
    """A dataset-extra producer drawing entity-aware MLM masks with ``cfg``."""
    from pipelines.cases.hashing import stable_hash63

    salt = stable_hash63("entity_mlm")

    def produce(dataset: Any, index: int, sample: dict[str, torch.Tensor], case: dict,
                rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        cache = _CACHE.setdefault(dataset, {})
        if index not in cache:
            parsed = ((case.get("report") or {}).get("parsed") or {})
            entries = parsed.get("anatomies") or {}
            texts = [str((entries.get(n) or {}).get("text") or "") for n in dataset.anatomy_names]
            stored = [str(e.get("text")) for e in parsed.get("evidence") or [] if isinstance(e, dict) and e.get("text")]
            length = int(sample["input_ids"].shape[-1])
            ids, words, cats = tokenize_categories(dataset.tokenizer, texts, length, _lexicon_for(dataset),
                                                   [stored] * len(texts))
            if not np.array_equal(ids, sample["input_ids"].numpy()):
                raise RuntimeError(f"entity_mlm: case {index}: the re-tokenised anatomy texts differ from the "
                                   "sample's input_ids (tokenizer or max_text_len changed?)")
            cache[index] = (ids, words, cats)
        ids, words, cats = cache[index]
        draw = rng if rng is not None else np.random.default_rng([int(getattr(dataset, "seed", 0)), index, salt])
        if "vocab" not in cache:
            cache["vocab"] = _vocab(dataset.tokenizer)
        mask_id, random_ids = cache["vocab"]
        mlm_ids, labels, weights = draw_mlm(ids, words, cats, draw, cfg, mask_id, random_ids)
        return {"mlm_input_ids": mlm_ids, "mlm_labels": labels, "mlm_weights": weights}

    return produce


register_extra("entity_mlm", make_entity_mlm(), keys=("mlm_input_ids", "mlm_labels", "mlm_weights"),
               help="entity-aware MLM masks of the anatomy texts (mlm_input_ids, mlm_labels, mlm_weights)")
# the head's ``masking`` option (recipe data) -> the extra "entity_mlm?cue_prob=...&..." (module docstring)
register_extra_factory("entity_mlm", lambda **masking: make_entity_mlm(EntityMasking(**masking)))
