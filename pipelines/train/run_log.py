"""Run-directory logging on rank 0: ``metrics.jsonl``, TensorBoard scalars, a tqdm progress bar.

``metrics.jsonl`` holds one JSON object per logged optimizer step: ``step``, ``epoch``, ``loss`` (the
weighted total), each loss term by name, ``lr``, ``samples_per_s`` (global samples over the step's wall
time) and ``skipped: true`` when the step's loss was non-finite and its update skipped. On resume, lines
past the checkpoint's step are dropped first, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "read_metrics"]


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf: "nan", "inf"
    return v


class MetricsLogger:
    """Writes metrics on the main process only; every method is a no-op elsewhere."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, progress: bool, total_steps: int,
                 start_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        self.bar = None
        if not enabled:
            return
        records = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
        tmp = self.path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, self.path)
        self.file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")
        self.file.flush()
        if self.writer is not None:
            step = record["step"]
            for k, v in record.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"train/{k}", v, step)

    def progress(self, step: int, loss: float, samples_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_per_s:.2f}", refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.file.close()
