"""Atomic training checkpoints: DeepSpeed's own per-rank files inside a temp-folder + rename scheme.

Layout under ``RUN/checkpoints/``::

    step-000300/            a complete checkpoint (renamed into place only once every rank has written)
        state/              engine.save_checkpoint(tag="state"): module, optimizer (ZeRO partitions per
                            rank), LR scheduler, DeepSpeed counters
        rank-00000.rng.json this rank's RNG states (python, numpy, torch, cuda) as JSON - one file per rank
        trainer.json        step, epoch, batch position in the epoch, sampler state, consecutive skips
    latest                  the name of the newest complete checkpoint; written last (temp file + rename)
    .tmp-step-000400/       a save in progress (or interrupted: ignored, removed at the next start)

Why DeepSpeed's save/load: it handles ZeRO 0-3 (the optimizer state is partitioned per rank) and bf16
master weights the same way; wrapping it in temp + rename makes it atomic. A process killed during a save
leaves ``latest`` pointing at the previous, complete checkpoint. The rename needs the run directory on a
file system every rank sees (one node, or a shared file system across nodes).

No code runs from a checkpoint on resume: RNG and trainer state are JSON, and DeepSpeed's own files
(``state/*.pt``, which are pickles) are read with ``torch.load(weights_only=True)`` through the engine's
checkpoint engine, with an allow-list of the few DeepSpeed classes they hold (:data:`DEEPSPEED_SAFE_GLOBALS`).
A file that needs anything else is refused with its name and the class; ``FVLM_CHECKPOINT_ALLOW`` names more
classes to permit (comma-separated ``module.Class``), still weights-only: nothing is ever unpickled fully. Older checkpoints' ``rank-*.pt`` are read
the same way (weights-only, numpy arrays allowed).
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fvlm import distributed as dist_utils

log = logging.getLogger(__name__)

__all__ = ["CheckpointManager", "DEEPSPEED_SAFE_GLOBALS", "load_weights_only", "rng_from_json", "rng_state",
           "rng_to_json", "set_rng_state"]

#: DeepSpeed classes its checkpoint pickles hold (ZeRO 1/2 optimizer states, loss scaler), allowed by
#: :func:`load_weights_only`; tensors, dicts, lists and numbers are allowed by torch itself.
DEEPSPEED_SAFE_GLOBALS: tuple[str, ...] = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
#: numpy objects of an older checkpoint's ``rank-*.pt`` (the numpy RNG state).
_NUMPY_SAFE_GLOBALS: tuple[str, ...] = ("numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
                                        "numpy.dtypes.UInt32DType")
#: Extra classes a weights-only load may construct (comma-separated ``module.Class``), e.g. a DeepSpeed class of
#: a GPU (bf16, ZeRO-3) checkpoint that :data:`DEEPSPEED_SAFE_GLOBALS` does not list.
ALLOW_ENV = "FVLM_CHECKPOINT_ALLOW"

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


def rng_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """:func:`rng_state` as plain JSON (tensors as base64 bytes)."""
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    out = {"python": [version, list(internal), gauss],
           "numpy": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
           "torch": base64.b64encode(state["torch"].numpy().tobytes()).decode()}
    if "cuda" in state:
        out["cuda"] = [base64.b64encode(t.cpu().numpy().tobytes()).decode() for t in state["cuda"]]
    return out


def rng_from_json(data: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`rng_to_json`."""
    def tensor(b64: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8).clone()

    version, internal, gauss = data["python"]
    name, keys, pos, has_gauss, cached = data["numpy"]
    state = {"python": (version, tuple(internal), gauss),
             "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
             "torch": tensor(data["torch"])}
    if "cuda" in data:
        state["cuda"] = [tensor(b) for b in data["cuda"]]
    return state


def _resolve(name: str) -> Any:
    import importlib

    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def load_weights_only(path: str | os.PathLike, map_location: Any = None,
                      allow: tuple[str, ...] = DEEPSPEED_SAFE_GLOBALS) -> Any:
    """``torch.load(path, weights_only=True)`` with the classes named in ``allow`` (and in the environment variable
    ``FVLM_CHECKPOINT_ALLOW``) permitted; a file that needs another class is refused (``pickle.UnpicklingError``)
    naming the file, the class and the way out. Never a full unpickle: a pickle is code."""
    extra = tuple(n.strip() for n in os.environ.get(ALLOW_ENV, "").split(",") if n.strip())
    found = [(obj, name) for name in allow + extra if (obj := _resolve(name)) is not None]
    try:
        with torch.serialization.safe_globals(found):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL ([\w.]+)", str(e))
        detail = f"it needs {named.group(1)}" if named else str(e).split("\n")[0][:300]
        raise pickle.UnpicklingError(
            f"{path}: refused to unpickle: the file holds objects outside the allow-list of plain tensors and known "
            f"DeepSpeed classes ({detail}). A checkpoint is code when unpickled fully, so fvlm never does; if the "
            f"class is plain data you trust, name it in {ALLOW_ENV}=module.Class (still weights-only); otherwise "
            "do not resume from this checkpoint") from None


def _restrict_engine_loads(engine: Any) -> None:
    """Make DeepSpeed's checkpoint engine read its files weights-only (see :func:`load_weights_only`)."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        return
    if type(ce).__name__ != "TorchCheckpointEngine":
        log.warning("DeepSpeed checkpoint engine %s: its files are loaded as full pickles (a checkpoint is code)",
                    type(ce).__name__)
        return
    ce.load = lambda path, map_location=None: load_weights_only(path, map_location)


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


class CheckpointDiskFull(OSError):
    """A checkpoint save ran out of disk space (errno ENOSPC); the message names the folder."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.args[1])


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, or a torch/DeepSpeed error wrapping it (its cause chain, or "unexpected pos" / "No space left")."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        text = str(seen)
        if "No space left" in text or "unexpected pos" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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
        """Collective: every rank calls it. Returns the final checkpoint folder.

        A full disk (``OSError`` ENOSPC, or torch's/DeepSpeed's ``RuntimeError`` wrapping it, e.g. "unexpected
        pos") removes the partial save and raises :class:`CheckpointDiskFull` naming the folder; ``latest``
        still names the previous checkpoint."""
        try:
            return self._save(engine, step, trainer_state)
        except (OSError, RuntimeError) as e:
            if not _is_disk_full(e):
                raise
            shutil.rmtree(self.folder / f".tmp-step-{step:06d}", ignore_errors=True)
            previous = self.latest() if (self.folder / "latest").is_file() else None
            kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointDiskFull(
                f"no space left on device while saving the checkpoint of step {step} in {self.folder}; "
                f"the partial save was removed and {kept} (latest); free space and resume with --resume"
            ) from e

    def _save(self, engine: Any, step: int, trainer_state: dict[str, Any]) -> Path:
        name = f"step-{step:06d}"
        final = self.folder / name
        tmp = self.folder / f".tmp-{name}"
        if dist_utils.is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist_utils.barrier()
        engine.save_checkpoint(str(tmp), tag=TAG, save_latest=False)
        _write_atomic(tmp / f"rank-{dist_utils.rank():05d}.rng.json", json.dumps(rng_to_json(rng_state())))
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
        _restrict_engine_loads(engine)
        load_path, _ = engine.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"{path}: DeepSpeed could not load the checkpoint in {path / TAG}")
        rng_file = path / f"rank-{dist_utils.rank():05d}.rng.json"
        if rng_file.is_file():
            set_rng_state(rng_from_json(json.loads(rng_file.read_text(encoding="utf-8"))))
        else:  # a checkpoint written before the JSON format: its pickle, weights-only
            set_rng_state(load_weights_only(rng_file.with_name(f"rank-{dist_utils.rank():05d}.pt"),
                                            allow=_NUMPY_SAFE_GLOBALS))
        return state
