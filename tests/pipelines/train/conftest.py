"""Fixtures shared by the trainer tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def in_process_trainer(pytestconfig: pytest.Config):
    """CPU DeepSpeed, a shared op cache, and a one-rank process group for the in-process trainers of a module
    (``pytestmark = pytest.mark.usefixtures("in_process_trainer")``); the group is torn down after the module."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(pytestconfig.cache.mkdir("torch_extensions")))
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    from fvlm import distributed as dist_utils

    dist_utils.destroy()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
