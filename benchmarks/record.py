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


def record(title: str, table: str, notes: str = "", command: str | None = None) -> None:
    """Print a result and append it to BENCHMARKS.md under its title, with command, date and machine."""
    command = command or "python -m " + " ".join(["benchmarks." + Path(sys.argv[0]).stem, *sys.argv[1:]])
    block = (
        f"\n### {title}\n\n"
        f"- command: `{command}`\n"
        f"- date: {_dt.date.today().isoformat()}\n"
        f"- machine: {machine()}\n\n"
        f"{table}\n" + (f"\n{notes}\n" if notes else "")
    )
    print(block)
    if not BENCHMARKS_MD.exists():
        BENCHMARKS_MD.write_text("# Benchmarks\n\nEvery figure here was appended by a script under `benchmarks/`; "
                                 "the command that produced it is given with it.\n")
    with open(BENCHMARKS_MD, "a", encoding="utf-8") as f:
        f.write(block)
