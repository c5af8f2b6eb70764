"""DeepSpeed engine set-up: process group from the environment, config resolution, optimizer, schedule.

- :func:`setup_distributed` reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (torchrun and
  the deepspeed launcher set them); a plain single process gets a one-rank group on localhost, so one code
  path serves 1 CPU process and N GPU nodes (DeepSpeed would otherwise look for MPI).
- :func:`deepspeed_config` reads ``configs/deepspeed/NAME.json`` (or a file) and fills in what the recipe
  owns: micro-batch, accumulation, global batch, clipping; bf16 only on GPU (fp32 on CPU).
- :class:`SkippableAdamW` is torch's AdamW whose next ``step()`` can be turned into a no-op: the trainer
  uses it to skip the update of a step with a non-finite loss while every rank still runs forward, backward
  and DeepSpeed's ``step()`` (so all collectives stay aligned). Under ZeRO the DeepSpeed optimizer wraps it
  and copies the unchanged fp32 partitions back, so the parameters do not move either.
- :func:`lr_lambda`: linear warm-up to the peak, then cosine decay to ``min_lr_ratio``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn

from configs.paths import config_dir
from fvlm import distributed as dist_utils
from pipelines.config.recipe import OptimSection, RecipeError

__all__ = ["setup_distributed", "deepspeed_config", "SkippableAdamW", "param_groups", "lr_lambda",
           "build_engine", "device_for_rank"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup_distributed() -> None:
    """Initialise the default process group (gloo on CPU, nccl on GPU) from the launcher's environment,
    or a one-rank group for a plain single process. Idempotent."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist_utils.init_from_env()


def device_for_rank() -> torch.device:
    """This rank's device: its local GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_deepspeed_file(name_or_path: str | os.PathLike) -> Path:
    """``zero2`` -> ``configs/deepspeed/zero2.json``; an existing file is taken as is."""
    p = Path(name_or_path)
    if p.suffix == ".json" or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"DeepSpeed config {p} does not exist")
        return p
    folder = config_dir() / "deepspeed"
    path = folder / f"{name_or_path}.json"
    if not path.is_file():
        names = ", ".join(sorted(q.stem for q in folder.glob("*.json")))
        raise FileNotFoundError(f"unknown DeepSpeed config {str(name_or_path)!r}; presets: {names} (or a JSON file)")
    return path


def deepspeed_config(name_or_path: str | os.PathLike, *, micro_batch: int, grad_accum: int, world_size: int,
                     grad_clip: float, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for this run (see the module docstring for what the recipe overrides)."""
    path = resolve_deepspeed_file(name_or_path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    for owned in ("optimizer", "scheduler"):
        if owned in cfg:
            raise RecipeError(f"{path}: remove the {owned!r} block; the training recipe's optim section owns it")
    cfg["train_micro_batch_size_per_gpu"] = int(micro_batch)
    cfg["gradient_accumulation_steps"] = int(grad_accum)
    cfg["train_batch_size"] = int(micro_batch) * int(grad_accum) * int(world_size)
    cfg["gradient_clipping"] = float(grad_clip)
    cfg["zero_allow_untested_optimizer"] = True
    cfg.setdefault("steps_per_print", 10**9)
    if not on_gpu:  # DeepSpeed on CPU: fp32 (bf16 matmuls on CPU are slow and change the numerics)
        cfg["bf16"] = {"enabled": False}
        cfg["fp16"] = {"enabled": False}
    return cfg


class SkippableAdamW(torch.optim.AdamW):
    """torch AdamW whose next ``step()`` does nothing when ``skip_next_step`` is set (then it is reset)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip_next_step = False

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if self.skip_next_step:
            self.skip_next_step = False
            return None
        return super().step(closure)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: weight matrices with decay; biases, norms, 1-d scales and the temperature without."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_steps(optim: OptimSection, total_steps: int) -> int:
    """Warm-up length: ``warmup_steps`` or ``warmup_ratio`` x the schedule."""
    if optim.warmup_steps is not None:
        return min(optim.warmup_steps, total_steps)
    return int(round(optim.warmup_ratio * total_steps))


def lr_lambda(step: int, *, total_steps: int, warmup: int, min_lr_ratio: float) -> float:
    """LR multiplier of optimizer step ``step`` (0-based; the LR used by the step's update).

    warm-up:  (step + 1) / warmup                                            for step < warmup
    cosine:   m + (1 - m) * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))   afterwards,
    m = min_lr_ratio; past ``total_steps`` it stays at m.
    """
    if step < warmup:
        return (step + 1) / warmup
    decay = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_engine(model: nn.Module, optim: OptimSection, ds_config: dict[str, Any], total_steps: int):
    """``deepspeed.initialize`` with a SkippableAdamW and the warm-up + cosine LambdaLR.

    Returns ``(engine, optimizer, scheduler)``; ``optimizer`` is the client SkippableAdamW.
    """
    import deepspeed

    optimizer = SkippableAdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas,
                               eps=optim.eps)
    warm = warmup_steps(optim, total_steps)

    def fn(step: int) -> float:
        return lr_lambda(step, total_steps=total_steps, warmup=warm, min_lr_ratio=optim.min_lr_ratio)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
    with _zero_dim_broadcast_fix():
        # The trainer steps the scheduler itself (once per optimizer step, skipped or not): not given to DS.
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                               dist_init_required=False)
    return engine, optimizer, scheduler


@contextlib.contextmanager
def _zero_dim_broadcast_fix():
    """DeepSpeed 0.19's initial broadcast views every parameter as bytes, which fails for 0-dim parameters
    (the model's log temperature): during ``initialize``, such parameters are broadcast as shape (1,)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._broadcast_model

    def broadcast(self) -> None:
        scalars = [p for p in self.module.parameters() if p.dim() == 0]
        for p in scalars:
            p.data = p.data.reshape(1)
        try:
            original(self)
        finally:
            for p in scalars:
                p.data = p.data.reshape(())

    DeepSpeedEngine._broadcast_model = broadcast
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model = original
