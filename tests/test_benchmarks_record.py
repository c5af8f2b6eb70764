"""benchmarks.record keeps one block per benchmark title in BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import record as rec


def test_record_replaces_a_block_with_the_same_title(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    md = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(rec, "BENCHMARKS_MD", md)
    monkeypatch.setattr(rec, "machine", lambda: "test machine")
    rec.record("A", "| x |\n|---|\n| 1 |", command="a")
    rec.record("B", "| y |\n|---|\n| 2 |", command="b")
    rec.record("A", "| x |\n|---|\n| 3 |", command="a")
    text = md.read_text()
    assert text.count("### A") == 1 and text.count("### B") == 1
    assert "| 3 |" in text and "| 1 |" not in text and "| 2 |" in text
    assert text.index("### A") < text.index("### B"), "a replaced block keeps its place"
