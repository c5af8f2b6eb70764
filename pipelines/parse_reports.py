"""``fvlm parse-reports``: label a table of radiology reports per task and split them by anatomy.

Writes ``OUT.csv`` (the id column, then one 0/1 column per task titled as in the catalog, so a ct-rate run
lines up with CT-RATE's label CSV, then an ``error`` column) and ``OUT.jsonl`` beside it (one record per
report: per-anatomy texts, normal and mentioned flags, statuses, evidence spans, unassigned sentences).
A row that cannot be parsed gets empty labels and its error; the batch never stops on a row. Both files are
written atomically (temporary sibling, fsync, rename).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from anatomy.reports import ReportParser, load_preset
from pipelines.atomic import open_atomic

log = logging.getLogger(__name__)

EXAMPLE = """example:
  fvlm parse-reports ../shared/data/ct-rate/train.csv --preset ct-rate --id-column AccessionNo \\
      --text-column report_text --output out/ct-rate-labels.csv
  fvlm parse-reports reports.csv --preset fvlm15 --id-column case_id --text-column findings \\
      --impression-column impression --uncertain negative --output out/labels.csv
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "parse-reports",
        help="label reports per task and split them into per-anatomy texts (CSV + JSONL)",
        description="Parse a CSV/TSV table of radiology reports: per-task 0/1 labels (present / absent / "
        "uncertain / not mentioned through ConText negation, uncertainty, history and hypothesis rules), and "
        "per-anatomy texts with normal flags and evidence spans.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("table", type=Path, help="CSV (or .tsv) file with one report per row")
    p.add_argument("--preset", default="fvlm15", help="parser preset under configs/reports/ (fvlm15, ct-rate) "
                   "or a YAML path (default fvlm15)")
    p.add_argument("--id-column", required=True, help="column holding the report / case id")
    p.add_argument("--text-column", help="column holding the report text (findings, or the whole report)")
    p.add_argument("--findings-column", help="column holding the findings (alternative to --text-column)")
    p.add_argument("--impression-column", help="column holding a separate impression, merged into the anatomies")
    p.add_argument("--uncertain", choices=("positive", "negative"), default=None,
                   help="label of an uncertain finding (default: the preset's, positive for both presets)")
    p.add_argument("--table-encoding", default="utf-8",
                   help="text encoding of the table (default utf-8; e.g. latin-1, cp1252), as in fvlm preprocess")
    p.add_argument("--output", type=Path, required=True, help="output CSV; the JSONL is written beside it")
    p.set_defaults(func=run)


def _read_table(path: Path, encoding: str = "utf-8") -> tuple[list[str], list[dict[str, Any]]]:
    if not path.is_file():
        raise FileNotFoundError(f"report table {path} does not exist")
    import codecs

    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"--table-encoding {encoding!r}: unknown encoding (e.g. utf-8, latin-1, cp1252)") from None
    raw = path.read_bytes()
    text = raw.decode(encoding, errors="surrogateescape")  # keep invalid bytes per row, report them there
    delim = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    csv.field_size_limit(sys.maxsize)
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delim)
    columns = list(reader.fieldnames or [])
    return columns, list(reader)


def _cell(row: dict[str, Any], col: str | None) -> tuple[str | bytes | None, bool]:
    """Cell value; invalid UTF-8 bytes come back as bytes (the parser replaces them and warns)."""
    if not col:
        return None, False
    v = row.get(col)
    if v is None:
        return None, False
    try:
        v.encode("utf-8")
        return v, False
    except UnicodeEncodeError:
        return v.encode("utf-8", errors="surrogateescape"), True


def run(args: argparse.Namespace) -> int:
    text_col = args.text_column or args.findings_column
    if not text_col:
        raise ValueError("give the report text column: --text-column (or --findings-column)")
    if args.text_column and args.findings_column:
        raise ValueError("give --text-column or --findings-column, not both")
    parser = ReportParser(load_preset(args.preset), uncertain=args.uncertain)
    columns, rows = _read_table(args.table, args.table_encoding)
    for flag, col in (("--id-column", args.id_column), ("--text-column", text_col),
                      ("--impression-column", args.impression_column)):
        if col and col not in columns:
            raise ValueError(f"{args.table}: no column {col!r} ({flag}); the columns are: {', '.join(columns)}")
    tasks = parser.catalog.tasks
    out_csv = args.output
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    out_jsonl = out_csv.with_suffix(".jsonl")
    errors = 0
    undecodable: list[int] = []  # rows holding bytes invalid in --table-encoding
    t0 = time.perf_counter()
    # Both files are written to temporary siblings and renamed into place at the end (JSONL, then CSV): a killed
    # run leaves no partial file at either final path.
    with open_atomic(out_csv, newline="", encoding="utf-8") as fc, open_atomic(out_jsonl, encoding="utf-8") as fj:
        w = csv.writer(fc)
        w.writerow([args.id_column, *[t.title for t in tasks], "error"])
        for i, row in enumerate(rows):
            rid = str(row.get(args.id_column) or f"row{i + 1}").encode("utf-8", "replace").decode("utf-8")
            text, bad1 = _cell(row, text_col)
            imp, bad2 = _cell(row, args.impression_column)
            if bad1 or bad2:
                undecodable.append(i + 1)
            try:
                res = parser.parse(text, impression=imp)
            except Exception as e:  # a row never stops the batch
                errors += 1
                log.warning("row %d (%s): %s", i + 1, rid, e)
                w.writerow([rid, *["" for _ in tasks], f"{type(e).__name__}: {e}"])
                fj.write(json.dumps({"id": rid, "error": f"{type(e).__name__}: {e}"}) + "\n")
                continue
            err = "" if res.sentences else "; ".join(res.warnings) or "no text"
            w.writerow([rid, *[res.labels[t.name] for t in tasks], err])
            rec = {"id": rid, "error": err or None, **res.to_dict()}
            fj.write(json.dumps(rec, ensure_ascii=False) + "\n")
    dt = time.perf_counter() - t0
    if undecodable:
        print(f"fvlm parse-reports: warning: {len(undecodable)} row(s) are not valid {args.table_encoding} (first: row "
              f"{undecodable[0]}); their invalid bytes were replaced. Pass --table-encoding with the table's "
              "encoding (e.g. latin-1 or cp1252)", file=sys.stderr)
    print(f"fvlm parse-reports: {len(rows)} reports ({errors} errors) in {dt:.1f} s "
          f"({len(rows) / max(dt, 1e-9):.0f} reports/s) -> {out_csv} and {out_jsonl}")
    return 0
