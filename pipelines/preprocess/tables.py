"""Report and label tables joined to cases by match key (``--reports``, ``--labels``, ``--case-id TABLE``).

Tables are CSV (or TSV by suffix ``.tsv``), one row per key. Keys are compared after stripping spaces
and a trailing ``.nii.gz`` / ``.nii`` (so CT-RATE's ``VolumeName`` matches the NIfTI stem). Columns left
unnamed are detected: the id column is the first of :data:`ID_COLUMNS` present (else the first column),
report text is ``--text-column`` or the findings and impression columns (:data:`FINDINGS_COLUMNS`,
:data:`IMPRESSION_COLUMNS`), labels are every other column of the labels table.

Text is decoded with the table's encoding (UTF-8 by default, a BOM is ignored); a row holding bytes that
do not decode is kept as an error for its key only (the case fails with that reason; other rows are fine).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ID_COLUMNS = ("case_id", "VolumeName", "AccessionNo", "AccessionNumber", "StudyInstanceUID", "id", "key")
FINDINGS_COLUMNS = ("findings", "Findings_EN", "Findings", "report_text", "report", "text")
IMPRESSION_COLUMNS = ("impression", "Impressions_EN", "Impression", "impressions")
_SURROGATE = re.compile("[\udc80-\udcff]")


def normalise_key(key: str | None) -> str | None:
    if key is None:
        return None
    key = str(key).strip()
    for suffix in (".nii.gz", ".nii"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    return key or None


@dataclass(frozen=True)
class TableSpec:
    """Where a table is and which columns to read (None: detect)."""

    path: Path
    id_column: str | None = None
    text_column: str | None = None
    findings_column: str | None = None
    impression_column: str | None = None
    encoding: str = "utf-8"


@dataclass
class Table:
    """A keyed table: key -> row (column -> text), and key -> error for rows that cannot be used."""

    spec: TableSpec
    columns: list[str]
    id_column: str
    rows: dict[str, dict[str, str]]
    errors: dict[str, str]


def read_table(spec: TableSpec, what: str) -> Table:
    """Read a CSV/TSV table keyed by its id column. ``what`` names it in errors (``--reports``)."""
    path = Path(spec.path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    raw = path.read_bytes()
    enc = "utf-8-sig" if spec.encoding.lower().replace("_", "-") in ("utf-8", "utf8") else spec.encoding
    text = raw.decode(enc, errors="surrogateescape")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise ValueError(f"{what} {path}: empty table") from None
    header = [h.strip() for h in header]
    id_col = spec.id_column or next((c for c in ID_COLUMNS if c in header), header[0])
    if id_col not in header:
        raise ValueError(f"{what} {path}: no column {id_col!r}; columns: {', '.join(header)}")
    for col in (spec.text_column, spec.findings_column, spec.impression_column):
        if col and col not in header:
            raise ValueError(f"{what} {path}: no column {col!r}; columns: {', '.join(header)}")
    idx = header.index(id_col)
    rows: dict[str, dict[str, str]] = {}
    errors: dict[str, str] = {}
    for line_no, values in enumerate(reader, start=2):
        if not values or all(not v.strip() for v in values):
            continue
        if idx >= len(values):
            continue
        key = normalise_key(values[idx])
        if key is None or _SURROGATE.search(key):
            continue
        if key in rows or key in errors:
            errors[key] = f"{what} has several rows for this case (line {line_no} and an earlier one)"
            rows.pop(key, None)
            continue
        row = dict(zip(header, values))
        bad = [c for c, v in row.items() if _SURROGATE.search(v)]
        if bad:
            errors[key] = (f"{what} row (line {line_no}) is not valid {spec.encoding} text in column "
                           f"{bad[0]!r}; pass the table's encoding with --table-encoding (e.g. cp1252)")
            continue
        rows[key] = row
    return Table(spec, header, id_col, rows, errors)


def _column(table: Table, given: str | None, candidates: tuple[str, ...]) -> str | None:
    if given:
        return given
    return next((c for c in candidates if c in table.columns and c != table.id_column), None)


def _row(table: Table, key: str | None) -> tuple[dict[str, str] | None, str | None]:
    """(row, error) of ``key`` in ``table``: the row, or the reason it could not be read, or (None, None)."""
    key = normalise_key(key)
    if key is None:
        return None, None
    if key in table.errors:
        return None, table.errors[key]
    return table.rows.get(key), None


def report_of(table: Table, key: str | None) -> tuple[dict[str, str] | None, str | None]:
    """(report, error) for ``key``: report = {text, findings, impression}; (None, None) when there is none."""
    row, error = _row(table, key)
    if row is None:
        return None, error
    spec = table.spec
    findings = impression = ""
    if spec.text_column:
        text = row[spec.text_column].strip()
    else:
        fcol = _column(table, spec.findings_column, FINDINGS_COLUMNS)
        icol = _column(table, spec.impression_column, IMPRESSION_COLUMNS)
        if fcol is None and icol is None:
            raise ValueError(f"--reports {spec.path}: no report text column found; pass --text-column or "
                             f"--findings-column/--impression-column (columns: {', '.join(table.columns)})")
        findings = row.get(fcol, "").strip() if fcol else ""
        impression = row.get(icol, "").strip() if icol else ""
        text = "\n\n".join(p for p in (f"Findings: {findings}" if findings else "",
                                       f"Impression: {impression}" if impression else "") if p)
    if not text:
        return None, None
    return {"text": text, "findings": findings, "impression": impression}, None


def labels_of(table: Table, key: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """(labels, error) for ``key``: every column but the id column, numbers as int/float, empty as None."""
    row, error = _row(table, key)
    if row is None:
        return None, error
    out: dict[str, Any] = {}
    for col, value in row.items():
        if col == table.id_column:
            continue
        v = value.strip()
        if v == "":
            out[col] = None
            continue
        try:
            f = float(v)
        except ValueError:
            return None, f"--labels value {v[:20]!r} in column {col!r} is not a number"
        out[col] = int(f) if f.is_integer() else f
    return out, None


#: Report parser preset for each anatomy set (``configs/reports/<preset>.yaml``).
REPORT_PRESETS = {"fvlm15": "fvlm15", "ct-rate4": "ct-rate"}


def report_preset_for(anatomy_set_name: str) -> str | None:
    return REPORT_PRESETS.get(anatomy_set_name)


def parse_report_sections(report: dict[str, str], preset: str | None) -> dict[str, Any] | None:
    """Per-anatomy texts and labels of a report: THE one place where preprocessing parses reports.

    Calls :func:`anatomy.reports.parse_report` with the given parser preset (None: no parse, e.g. for an
    anatomy set of your own without a preset) and returns its JSON form without the evidence offsets:
    ``{preset, labels, statuses, anatomies: {name: {text, mentioned, normal, statuses, labels, sentences}},
    sentences, unassigned, warnings}``. The raw text is stored with every case regardless, so cases can be
    re-parsed later without preprocessing again.
    """
    if preset is None:
        return None
    from anatomy.reports import parse_report

    if report.get("findings") or report.get("impression"):
        result = parse_report(report.get("findings") or "", report.get("impression") or None, preset=preset)
    else:
        result = parse_report(report["text"], None, preset=preset)
    data = result.to_dict()
    data.pop("evidence", None)
    return data


def read_case_id_table(path: Path) -> dict[str, str]:
    """A user's mapping table: first column the match key, second column the case id (header row first)."""
    table = read_table(TableSpec(Path(path)), "--case-id table")
    if len(table.columns) < 2:
        raise ValueError(f"--case-id table {path}: needs two columns (match key, case id)")
    col = table.columns[1] if table.columns[0] == table.id_column else table.columns[0]
    if table.errors:
        key = next(iter(table.errors))
        raise ValueError(f"--case-id table {path}: {table.errors[key]}")
    return {k: row[col].strip() for k, row in table.rows.items()}
