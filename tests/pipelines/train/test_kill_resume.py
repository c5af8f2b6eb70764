"""A real kill: `fvlm train` is SIGKILLed mid-run, then `--resume` must give the loss sequence of an
uninterrupted run (the issue's "kill and --resume" check, through the command line and real data)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.train.run_log import read_metrics

pytestmark = pytest.mark.slow  # fvlm train in subprocesses, one killed

STEPS, EVERY = 8, 2


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.cli import main
    from pipelines.synth.cohort import SynthConfig, make_cohort
    from tests.pipelines.preprocess.preprocess_fixtures import fast_config

    root = tmp_path_factory.mktemp("kill")
    synth = root / "synth"
    make_cohort(synth, SynthConfig(cases=4, seed=2, format="nifti", normal_share=0.25))
    assert main(["preprocess", str(synth / "images"), str(root / "prep"), "--masks", str(synth / "segmentations"),
                 "--reports", str(synth / "reports.csv"), "--labels", str(synth / "labels.csv"),
                 "--config", str(fast_config(root)), "--case-id", "key", "--no-progress"]) == 0
    return root / "prep"


def _command(data: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipelines", "train", "--config", "tiny", "--data", str(data), "--output", str(run),
            "--set", f"optim.max_steps={STEPS}", "--set", f"checkpoint.every={EVERY}",
            "--set", "logging.progress=false", *extra]


def _env(pytestconfig: pytest.Config) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(pytestconfig.cache.mkdir("torch_extensions")))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}


def test_sigkill_then_resume_gives_the_uninterrupted_loss_sequence(
    prepared: Path, tmp_path: Path, pytestconfig: pytest.Config
) -> None:
    env = _env(pytestconfig)
    straight = tmp_path / "straight"
    subprocess.run(_command(prepared, straight), env=env, check=True, timeout=300, capture_output=True)
    expected = _losses(straight)
    assert sorted(expected) == list(range(1, STEPS + 1))

    run = tmp_path / "killed"
    proc = subprocess.Popen(_command(prepared, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        # Kill once a checkpoint exists and training has gone past it (steps after it are lost and redone).
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = run / "metrics.jsonl"
            if (run / "checkpoints" / "latest").exists() and metrics.exists() and len(_losses(run)) >= EVERY + 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed; make it longer"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(_losses(run)) < STEPS

    subprocess.run(_command(prepared, run, "--resume"), env=env, check=True, timeout=300, capture_output=True)
    resumed = _losses(run)  # steps redone after the checkpoint overwrite the lost ones
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), step
