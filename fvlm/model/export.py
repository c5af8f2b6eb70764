"""Model export: ``save_pretrained`` / ``load_pretrained`` of a trained fVLM in safetensors.

An export folder holds

    model.safetensors   the model's state dict (tensors only, no pickle)
    config.json         {"format": "fvlm-model", "version": 1, "config": ModelConfig.to_dict()}
    tokenizer/          the tokenizer's save_pretrained files

and is written atomically: into a temporary sibling folder, then renamed into place, so a crash leaves
either the previous export or none, never a half-written one. Loading needs neither the trainer nor
DeepSpeed nor the pretrained text folder the model was first built from.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fvlm.model.config import ModelConfig

FORMAT = "fvlm-model"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer"


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def save_pretrained(model: nn.Module, tokenizer: Any, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` (an FVLM, or a wrapper holding it as ``.module``) and ``tokenizer`` to ``path``.

    ``overwrite=False`` refuses an existing ``path``; with ``overwrite=True`` it is replaced (the old
    export stays intact until the new one is complete).
    """
    from safetensors.torch import save_model

    model = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    config: ModelConfig = model.config
    if tokenizer is not None and len(tokenizer) > config.text.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the text encoder's vocab_size is {config.text.vocab_size}"
        )
    dest = Path(path)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; pass overwrite=True to replace the export")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        with open(tmp / CONFIG, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "version": VERSION, "config": config.to_dict()}, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER))
        _fsync_tree(tmp)
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The :class:`ModelConfig` of an export folder."""
    file = Path(path) / CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG}; is this an fvlm model export (save_pretrained output)?")
    data = json.loads(file.read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        raise ValueError(f"{file}: not an fvlm model config (format {data.get('format')!r})")
    if data.get("version", 0) > VERSION:
        raise ValueError(f"{file}: export version {data['version']} is newer than this fvlm ({VERSION}); upgrade fvlm")
    return ModelConfig.from_dict(data["config"], where=str(file))


def _check_weights_file(weights: Path) -> None:
    """A ``ValueError`` naming ``weights`` and the first tensor whose bytes it does not hold (a truncated
    file), or why its header is unreadable. Format: 8-byte little-endian header length, JSON header
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, then the tensor bytes."""
    size = weights.stat().st_size
    with open(weights, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ValueError(f"{weights}: truncated or not a safetensors file ({size} bytes; header unreadable)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{weights}: corrupt safetensors header ({e})") from e
    available = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        end = int((info.get("data_offsets") or [0, 0])[1])
        if end > available:
            raise ValueError(
                f"{weights}: truncated: tensor {name} ends at byte {end} of the data, the file holds {available}; "
                "export the model again"
            )


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Load an export: ``(model in eval mode, tokenizer or None)``."""
    from safetensors.torch import load_model

    from fvlm.model.fvlm import FVLM
    from fvlm.model.tokenizer import load_tokenizer

    folder = Path(path)
    config = read_config(folder)
    model = FVLM(config)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS}")
    from safetensors import SafetensorError

    _check_weights_file(weights)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    except SafetensorError as e:
        raise ValueError(f"{weights}: corrupt safetensors file ({e}); export the model again") from e
    if missing or unexpected:
        missing, unexpected = sorted(missing), sorted(unexpected)  # safetensors returns sets
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"{weights}: weights do not fit the config: missing tensor(s) {', '.join(missing[:5]) or 'none'}{more}; "
            f"unexpected tensor(s) {', '.join(unexpected[:5]) or 'none'}"
        )
    model.to(device).eval()
    tokenizer = load_tokenizer(folder / TOKENIZER) if (folder / TOKENIZER).is_dir() else None
    return model, tokenizer
