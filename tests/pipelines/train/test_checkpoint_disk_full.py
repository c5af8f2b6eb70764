"""A full disk during a checkpoint save: a clear error naming the folder, the previous checkpoint intact."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from pipelines.train.checkpoint import CheckpointDiskFull, CheckpointManager


class _Engine:
    """Stands in for a DeepSpeed engine: ``save_checkpoint`` writes a file, or raises ``fail``."""

    def __init__(self) -> None:
        self.fail: BaseException | None = None

    def save_checkpoint(self, folder: str, tag: str, save_latest: bool) -> None:
        (Path(folder) / tag).mkdir(parents=True, exist_ok=True)
        (Path(folder) / tag / "half.pt").write_bytes(b"x" * 10)
        if self.fail is not None:
            raise self.fail


def _wrapped() -> RuntimeError:
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as e:
        try:
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 128 vs 64") from e
        except RuntimeError as r:
            return r


@pytest.mark.parametrize("fail", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 128 vs 64"),
    "wrapped",
], ids=["oserror", "torch-message", "torch-wrapping"])
def test_disk_full_names_the_folder_and_keeps_the_previous_checkpoint(tmp_path, fail) -> None:
    mgr, engine = CheckpointManager(tmp_path / "checkpoints"), _Engine()
    first = mgr.save(engine, 10, {"epoch": 0})
    engine.fail = _wrapped() if fail == "wrapped" else fail
    with pytest.raises(CheckpointDiskFull) as err:
        mgr.save(engine, 20, {"epoch": 0})
    msg = str(err.value)
    assert err.value.errno == errno.ENOSPC
    assert msg.startswith("no space left on device") and str(tmp_path / "checkpoints") in msg
    assert "previous checkpoint step-000010 is intact" in msg and "\n" not in msg
    assert mgr.latest() == first
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the partial save is removed


def test_other_errors_pass_through(tmp_path) -> None:
    mgr, engine = CheckpointManager(tmp_path / "checkpoints"), _Engine()
    engine.fail = RuntimeError("CUDA error: an illegal memory access")
    with pytest.raises(RuntimeError, match="illegal memory"):
        mgr.save(engine, 10, {})


def test_cli_reports_a_full_disk_in_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import pipelines.train.command as command
    from pipelines.cli import main
    from pipelines.train.checkpoint import CheckpointDiskFull

    def full(args):
        raise CheckpointDiskFull("no space left on device while saving the checkpoint of step 3 in RUN/checkpoints")

    monkeypatch.setattr(command, "run", full)
    assert main(["train", "--config", "tiny", "--data", "d", "--output", "o"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fvlm train: error: no space left on device while saving the checkpoint of step 3 in RUN/checkpoints"]
