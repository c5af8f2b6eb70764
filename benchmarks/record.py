"""Shared by the benchmark entry points: the machine's description and appending a result to BENCHMARKS.md."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def machine() -> str:
    """One line naming the machine: CPU model, cores, memory, GPU if any, Python and torch versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores{mem}", f"Python {platform.python_version()}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
        if torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    except ImportError:
        pass
    return "; ".join(parts)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def format_block(title: str, table: str, notes: str = "", command: str | None = None) -> str:
    """The BENCHMARKS.md block of a result: ``### title``, command, date, this machine, table, notes."""
    command = command or "python -m " + " ".join(["benchmarks." + Path(sys.argv[0]).stem, *sys.argv[1:]])
    return (
        f"### {title}\n\n"
        f"- command: `{command}`\n"
        f"- date: {_dt.date.today().isoformat()}\n"
        f"- machine: {machine()}\n\n"
        f"{table}\n" + (f"\n{notes}\n" if notes else "")
    )


def record(title: str, table: str, notes: str = "", command: str | None = None) -> str:
    """Print a result and write it to BENCHMARKS.md under ``### title``, with command, date and machine.

    A block with the same title is replaced in place (the file keeps the latest figures of each
    benchmark); a new title is appended. Returns the block.
    """
    block = format_block(title, table, notes, command)
    print(block)
    write_block(title, block)
    return block


def write_block(title: str, block: str) -> None:
    """Put ``block`` (from :func:`format_block`, possibly made on another machine) into BENCHMARKS.md under
    ``### title``: in place of a block with that title, else at the end."""
    if not block.startswith(f"### {title}\n"):
        raise ValueError(f"the block does not start with the heading '### {title}'")
    text = BENCHMARKS_MD.read_text(encoding="utf-8") if BENCHMARKS_MD.exists() else (
        "# Benchmarks\n\nEvery figure here was written by a script under `benchmarks/`; the command that "
        "produced it is given with it.\n"
    )
    heading = f"### {title}\n"
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n### ", start + len(heading))
        text = text[:start] + block + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    tmp = BENCHMARKS_MD.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(BENCHMARKS_MD)
