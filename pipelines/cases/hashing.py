"""Stable 63-bit ids of texts and cases: the same text or case id gives the same number in any process, on any
machine and in any version (the ``text_id`` and ``case_id`` fields of a sample, :mod:`pipelines.cases.dataset`)."""

from __future__ import annotations

import hashlib
import re

__all__ = ["normalise_text", "stable_hash63", "text_id"]

_MASK63 = (1 << 63) - 1


def normalise_text(text: str) -> str:
    """Lower case, whitespace collapsed, stripped: identical reports texts up to case and spacing match."""
    return re.sub(r"\s+", " ", str(text)).strip().lower()


def stable_hash63(text: str) -> int:
    """A non-negative 63-bit hash of ``text`` (blake2b), stable across processes, machines and versions."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def text_id(text: str) -> int:
    """The ``text_id`` of an anatomy text: :func:`stable_hash63` of :func:`normalise_text`."""
    return stable_hash63(normalise_text(text))
