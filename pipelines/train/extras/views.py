"""Dataset extras ``image_view2`` and ``text_view2``: a second augmented view of each crop and a second
phrasing of each anatomy text, for the intra-modal terms of ``uncertainty_contrastive`` (the ``uncertainty``
head encodes them; docs/methods.md#origins).

``image_view2`` -> ``image_view2`` (C, Z, Y, X) f32, ``anatomy_view2`` (Z, Y, X) i64, ``cut_view2`` (A,) bool:
:meth:`CaseDataset.image_view` drawn with the extra's own generator (crop mode: another random crop origin and
flips; resize mode: other flips), then a mild intensity jitter, so that the two views differ even when the
flips agree (resize mode has no other randomness)::

    x' = clip( c * (x - m) + m + d, 0, 1 ),   c ~ U(1 - CONTRAST, 1 + CONTRAST),  d ~ U(-SHIFT, SHIFT),
    m  = mean of x                                     (draws after those of the view itself)

``text_view2`` -> ``input_ids_view2``, ``attention_mask_view2`` (A, L): each anatomy's text (the same
``case.json`` text as ``input_ids``) split into sentences by the report parser's splitter
(:func:`anatomy.reports.text.split_sentences`: "Approx. 3 mm nodule." and "3.5 cm" stay whole, a full stop
before a lower-case word does not end a sentence); with two or more, their order is permuted (never the
identity) and, with at least ``DROP_MIN_SENTENCES`` sentences, one of them is dropped with probability
``DROP_PROB``; re-tokenised with the dataset's tokenizer to the dataset's length L. One-sentence texts stay
as they are. A text the base sample does not attend (``attention_mask`` all 0: a label-only case) gets an
all-0 ``attention_mask_view2`` too. Draws per anatomy, in anatomy order: the permutation, then the drop.

``text_view2_structured`` -> the same fields, the second phrasing written from the case's findings instead of
reordered (issue 22; D-MLM's structured reports as training text): for an anatomy with positive tasks
(``anatomy_labels > LABEL_THRESHOLD``) that have structured catalog sentences (``appearance``, ``observation``,
``verdict``; ``anatomy.catalog.Structured``), one sentence per such task, the field drawn at random, in random
task order (evaluation: the verdicts, catalog order): ``"Emphysema is present. A nodule is seen in the lung."``.
So the intra-text term of ``uncertainty_contrastive`` pulls the report's words for a finding towards the
catalog's per-finding statements of it. Anatomies without such a task keep the reordered phrasing above.

Both are deterministic: the generator is the extra's own ``default_rng([seed, epoch, index, hash(name)])``
(``CaseDataset``), so turning one on changes neither the base sample nor the other extra. In evaluation
(no generator) the second view is the evaluation view itself and the texts are unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from anatomy.reports.text import split_sentences
from pipelines.train.extras import register_extra

__all__ = ["image_view2", "text_view2", "text_view2_structured", "rephrase", "structured_text", "CONTRAST", "SHIFT",
           "DROP_PROB", "DROP_MIN_SENTENCES"]

#: half-width of the contrast factor's range around 1
CONTRAST = 0.1
#: half-width of the brightness shift's range (windowed intensities in [0, 1])
SHIFT = 0.05
#: probability of dropping one sentence of a text that has at least DROP_MIN_SENTENCES of them
DROP_PROB = 0.5
#: fewest sentences a text needs before one may be dropped (two sentences only swap)
DROP_MIN_SENTENCES = 3

def rephrase(text: str, rng: np.random.Generator | None) -> str:
    """A second phrasing of ``text`` (module docstring); ``text`` itself when ``rng`` is None or it has one
    sentence."""
    sentences = [s.text for s in split_sentences(str(text).strip())]
    if rng is None or len(sentences) < 2:
        return text
    n = len(sentences)
    order = rng.permutation(n)
    if np.array_equal(order, np.arange(n)):
        order = np.roll(order, 1)  # a permutation, never the identity
    if n >= DROP_MIN_SENTENCES and rng.random() < DROP_PROB:
        order = np.delete(order, int(rng.integers(n)))
    return " ".join(sentences[i] for i in order)


@register_extra("image_view2", keys=("image_view2", "anatomy_view2", "cut_view2"))
def image_view2(dataset: Any, index: int, sample: dict, case: dict, rng: np.random.Generator | None
                ) -> dict[str, torch.Tensor]:
    """Second augmented view of the crop: ``image_view2``, ``anatomy_view2``, ``cut_view2``."""
    img, anat, cut = dataset.image_view(index, case, rng)
    img = img.to(torch.float32)
    if rng is not None:
        c = float(rng.uniform(1.0 - CONTRAST, 1.0 + CONTRAST))
        d = float(rng.uniform(-SHIFT, SHIFT))
        m = float(img.mean())
        img = ((img - m) * c + m + d).clamp_(0.0, 1.0)
    return {
        "image_view2": img.contiguous(),  # (C, Z, Y, X)
        "anatomy_view2": anat.to(torch.int64).contiguous(),  # (Z, Y, X)
        "cut_view2": torch.from_numpy(np.asarray(cut, dtype=bool)),  # (A,)
    }


@register_extra("text_view2", keys=("input_ids_view2", "attention_mask_view2"))
def text_view2(dataset: Any, index: int, sample: dict, case: dict, rng: np.random.Generator | None
               ) -> dict[str, torch.Tensor]:
    """Second phrasing of every anatomy text, tokenised like ``input_ids``: ``input_ids_view2``,
    ``attention_mask_view2`` (A, L)."""
    parsed = (((case.get("report") or {}).get("parsed") or {}).get("anatomies")) or {}
    texts = [rephrase(str((parsed.get(name) or {}).get("text") or ""), rng) for name in dataset.anatomy_names]
    ids, mask = dataset._tokens(texts, dataset.max_text_len)  # (A, L) each, the dataset's tokenizer and length
    # a text the base sample leaves unattended (a label-only case: no report) stays unattended in its second
    # phrasing, whatever the tokenizer gives an empty string ([CLS] [SEP] with mask 1)
    empty = sample["attention_mask"].sum(-1) == 0  # (A,)
    mask[empty] = 0
    return {"input_ids_view2": ids, "attention_mask_view2": mask}


def structured_text(text: str, positive: list[tuple[str, tuple[str, ...]]], rng: np.random.Generator | None) -> str:
    """The structured second phrasing of one anatomy text (module docstring): ``positive`` lists the anatomy's
    positive tasks as (title, structured sentences in the order appearance, observation, verdict); those with
    sentences give one each (a random field and order with ``rng``, the last field - the verdict - without);
    none: :func:`rephrase` of ``text``."""
    rows = [sentences for _, sentences in positive if sentences]
    if not rows:
        return rephrase(text, rng)
    if rng is None:
        return " ".join(s[-1] for s in rows)
    order = rng.permutation(len(rows))
    return " ".join(rows[i][int(rng.integers(len(rows[i])))] for i in order)


@register_extra("text_view2_structured", keys=("input_ids_view2", "attention_mask_view2"))
def text_view2_structured(dataset: Any, index: int, sample: dict, case: dict, rng: np.random.Generator | None
                          ) -> dict[str, torch.Tensor]:
    """Second phrasing from the case's findings' structured sentences: ``input_ids_view2``,
    ``attention_mask_view2`` (A, L) (module docstring)."""
    from pipelines.train.extras.labels import LABEL_THRESHOLD, anatomy_tasks

    parsed = (((case.get("report") or {}).get("parsed") or {}).get("anatomies")) or {}
    labels = sample["anatomy_labels"].numpy()  # (A, K)
    tasks = anatomy_tasks(dataset)
    texts = []
    for k, name in enumerate(dataset.anatomy_names):
        row = tasks[k] if k < len(tasks) else ()
        positive = [row[t] for t in range(min(len(row), labels.shape[1])) if labels[k, t] > LABEL_THRESHOLD]
        texts.append(structured_text(str((parsed.get(name) or {}).get("text") or ""), positive, rng))
    ids, mask = dataset._tokens(texts, dataset.max_text_len)  # (A, L) each
    mask[sample["attention_mask"].sum(-1) == 0] = 0  # unattended stays unattended (label-only cases)
    return {"input_ids_view2": ids, "attention_mask_view2": mask}
