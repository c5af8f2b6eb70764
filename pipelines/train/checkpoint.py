"""Atomic training checkpoints: DeepSpeed's own per-rank files inside a temp-folder + rename scheme.

Layout under ``RUN/checkpoints/``::

    step-000300/            a complete checkpoint (renamed into place only once every rank has written)
        state/              engine.save_checkpoint(tag="state"): module, optimizer (ZeRO partitions per
                            rank), LR scheduler, DeepSpeed counters
        rank-00000.pt       this rank's RNG states (python, numpy, torch, cuda) - one file per rank
        trainer.json        step, epoch, batch position in the epoch, sampler state, consecutive skips
    latest                  the name of the newest complete checkpoint; written last (temp file + rename)
    .tmp-step-000400/       a save in progress (or interrupted: ignored, removed at the next start)

Why DeepSpeed's save/load: it handles ZeRO 0-3 (the optimizer state is partitioned per rank) and bf16
master weights the same way; wrapping it in temp + rename makes it atomic. A process killed during a save
leaves ``latest`` pointing at the previous, complete checkpoint. The rename needs the run directory on a
file system every rank sees (one node, or a shared file system across nodes).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fvlm import distributed as dist_utils

log = logging.getLogger(__name__)

__all__ = ["CheckpointManager", "rng_state", "set_rng_state"]

_NAME = re.compile(r"^step-(\d{6,})$")
TAG = "state"


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    """Save / find / load checkpoints of a DeepSpeed engine under ``folder`` (see the module docstring).

    ``fault`` is a test hook called between the per-rank writes and the rename (to simulate a crash).
    """

    def __init__(self, folder: str | os.PathLike, keep: int = 3) -> None:
        self.folder = Path(folder)
        self.keep = keep
        self.fault: Callable[[Path], None] | None = None

    # ---------------------------------------------------------------------------------------- queries
    def latest(self) -> Path | None:
        """The newest complete checkpoint (per the ``latest`` pointer), or None."""
        pointer = self.folder / "latest"
        if not pointer.is_file():
            return None
        name = pointer.read_text(encoding="utf-8").strip()
        path = self.folder / name
        if not _NAME.match(name) or not (path / "trainer.json").is_file():
            raise RuntimeError(f"{pointer} names {name!r}, which is not a complete checkpoint; "
                               "point it at one of the step-* folders or start a new run")
        return path

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if _NAME.match(p.name) and (p / "trainer.json").is_file()]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))

    def clean_partial(self) -> None:
        """Remove interrupted saves (``.tmp-*``); rank 0 at start-up."""
        if dist_utils.is_main_process() and self.folder.is_dir():
            for p in self.folder.glob(".tmp-*"):
                log.warning("removing an interrupted checkpoint save: %s", p)
                shutil.rmtree(p, ignore_errors=True)
        dist_utils.barrier()

    # ------------------------------------------------------------------------------------------- save
    def save(self, engine: Any, step: int, trainer_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the final checkpoint folder."""
        name = f"step-{step:06d}"
        final = self.folder / name
        tmp = self.folder / f".tmp-{name}"
        if dist_utils.is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist_utils.barrier()
        engine.save_checkpoint(str(tmp), tag=TAG, save_latest=False)
        torch.save(rng_state(), tmp / f"rank-{dist_utils.rank():05d}.pt")
        dist_utils.barrier()
        if dist_utils.is_main_process():
            with open(tmp / "trainer.json", "w", encoding="utf-8") as f:
                json.dump({**trainer_state, "step": step, "world_size": dist_utils.world_size()}, f, indent=2)
            if self.fault is not None:
                self.fault(tmp)
            _fsync_tree(tmp)
            if final.exists():  # re-saving the same step (e.g. end of a run that just checkpointed)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(self.folder / "latest", name + "\n")
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist_utils.barrier()
        return final

    # ------------------------------------------------------------------------------------------- load
    def load(self, engine: Any, path: Path) -> dict[str, Any]:
        """Restore engine (module, optimizer, scheduler) and this rank's RNG; returns trainer.json."""
        state = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
        if state.get("world_size") != dist_utils.world_size():
            raise RuntimeError(
                f"{path} was written by {state.get('world_size')} processes but this run has "
                f"{dist_utils.world_size()}; resume with the same number of processes"
            )
        load_path, _ = engine.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"{path}: DeepSpeed could not load the checkpoint in {path / TAG}")
        rng_file = path / f"rank-{dist_utils.rank():05d}.pt"
        set_rng_state(torch.load(rng_file, weights_only=False))
        return state
