"""Shared by the tests that train a recipe for a few steps: ``fvlm train`` in a subprocess (DeepSpeed keeps
process-wide state that must not leak into other tests), tiny model, whole cases resized, CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

#: the tiny CPU budget every such test trains with (``--set`` overrides)
TINY_SETS = ("model.preset=tiny", "data.mode=resize", "data.crop_size=[32,64,64]", "data.batch_size=3",
             "data.workers=0", "deepspeed=zero0", "optim.warmup_steps=1", "logging.progress=false",
             "logging.tensorboard=false", "logging.every=1")


def train_tiny(recipe: str, data: Path, run: Path, steps: int = 3, sets: tuple[str, ...] = (),
               timeout: int = 600) -> subprocess.CompletedProcess:
    """``fvlm train --config RECIPE`` for ``steps`` steps with :data:`TINY_SETS` then ``sets`` (later wins)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = [sys.executable, "-m", "pipelines", "train", "--config", recipe, "--data", str(data), "--output", str(run),
            "--max-steps", str(steps)]
    for s in (*TINY_SETS, *sets):
        args += ["--set", s]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
