"""Resume safety (issue 17): the recipe of a resumed run is compared with its saved config.yaml (item 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config.recipe import diff_mappings, load_recipe, resume_drift
from tests.pipelines.train.standin import run_standin

pytestmark = pytest.mark.usefixtures("in_process_trainer")  # tests/pipelines/train/conftest.py


def test_diff_mappings_names_dotted_keys_and_honours_the_allow_list() -> None:
    old = {"optim": {"lr": 1e-3, "max_steps": 10}, "logging": {"every": 1}, "data": {"crop": [1, 2]}}
    new = {"optim": {"lr": 5e-4, "max_steps": 20}, "logging": {"every": 5}, "data": {"crop": [1, 3]}, "x": 1}
    assert diff_mappings(old, new, ("optim.max_steps", "logging.*")) == [
        ("data.crop", [1, 2], [1, 3]), ("optim.lr", 1e-3, 5e-4), ("x", "<absent>", 1)]


def test_resume_drift_allows_only_the_listed_keys() -> None:
    saved = {**load_recipe("tiny").to_dict(), "resolved": {"deepspeed": {"zero_optimization": {"stage": 0}}}}
    allowed = load_recipe("tiny", ["optim.max_steps=99", "logging.every=7", "checkpoint.keep=9", "data.workers=0"])
    assert resume_drift(saved, allowed, {"deepspeed": {"zero_optimization": {"stage": 0}}}) == []
    changed = load_recipe("tiny", ["optim.lr=5e-4", "seed=3"])
    keys = [k for k, _, _ in resume_drift(saved, changed, {"deepspeed": {"zero_optimization": {"stage": 1}}})]
    assert keys == ["optim.lr", "seed", "resolved.deepspeed.zero_optimization.stage"]


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("drift") / "run"
    run_standin(run, steps=3)  # checkpoint at step 3
    return run


@pytest.mark.slow
def test_resume_with_a_changed_lr_is_refused_naming_the_key(checkpointed: Path) -> None:
    before = (checkpointed / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"--resume: the recipe differs .* optim\.lr 0\.001 -> 0\.0005"):
        run_standin(checkpointed, steps=4, resume=True, sets=("optim.lr=5e-4",))
    assert (checkpointed / "config.yaml").read_text() == before  # the run's record is unchanged


@pytest.mark.slow
def test_resume_with_another_zero_stage_is_refused(checkpointed: Path) -> None:
    with pytest.raises(ValueError, match=r"resolved\.deepspeed\.zero_optimization\.stage 0 -> 1"):
        run_standin(checkpointed, steps=4, resume=True, stage="zero1")


@pytest.mark.slow
def test_resume_may_change_logging_and_checkpointing(checkpointed: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpointed, run)
    records = run_standin(run, steps=4, resume=True, sets=("logging.every=2", "checkpoint.keep=5"))
    assert records[-1]["step"] == 4


# ---------------------------------------------------------------------------------- item 3: one writer per run


@pytest.mark.slow
def test_a_second_trainer_into_a_locked_run_folder_is_refused(tmp_path: Path) -> None:
    import json
    import socket
    import subprocess
    import sys

    from pipelines.atomic import FolderLocked

    run = tmp_path / "run"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "since": "now",
                                               "what": "fvlm train"}))
        with pytest.raises(FolderLocked, match=f"in use by process {sleeper.pid}"):
            run_standin(run, steps=1)
        assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow
def test_stale_lock_and_interrupted_export_are_cleaned_on_resume(checkpointed: Path, tmp_path: Path, caplog) -> None:
    import json
    import logging
    import shutil
    import socket
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(checkpointed, run)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    (run / ".model.tmp-abc123").mkdir()
    (run / ".model.tmp-abc123" / "model.safetensors").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING):
        run_standin(run, steps=4, resume=True)
    assert f"stale lock of process {dead.pid}" in caplog.text
    assert not (run / ".model.tmp-abc123").exists() and not (run / ".lock").exists()


# ------------------------------------------------------------------------ item 4: no code runs from a checkpoint


class _Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_rng_state_round_trips_through_json() -> None:
    import json
    import random

    import numpy as np
    import torch

    from pipelines.train.checkpoint import rng_from_json, rng_state, rng_to_json, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = json.loads(json.dumps(rng_to_json(rng_state())))
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(rng_from_json(saved))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["state/mp_rank_00_model_states.pt", "rank-00000.pt"])
def test_a_pickle_in_a_checkpoint_is_refused_and_never_run(checkpointed: Path, tmp_path: Path, victim: str) -> None:
    import pickle
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(checkpointed, run)
    step = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    marker = tmp_path / "marker"
    if victim == "rank-00000.pt":  # an older checkpoint's RNG pickle, handed over with a payload
        (step / "rank-00000.rng.json").unlink()
        torch.save({"python": _Payload(marker)}, step / victim)
    else:
        good = torch.load(step / victim, weights_only=True)
        torch.save({**good, "extra": _Payload(marker)}, step / victim)
    with pytest.raises(pickle.UnpicklingError, match=r"refused to unpickle.*FVLM_CHECKPOINT_ALLOW"):
        run_standin(run, steps=4, resume=True)
    assert not marker.exists()


@pytest.mark.slow
def test_zero1_resume_loads_weights_only(tmp_path: Path) -> None:
    """The allow-list covers ZeRO's optimizer state files (loss scaler, stage enum, fragment addresses)."""
    run = tmp_path / "run"
    run_standin(run, steps=3, stage="zero1")
    assert list((run / "checkpoints").glob("step-*/state/zero_pp_rank_*_optim_states.pt"))
    records = run_standin(run, steps=4, resume=True, stage="zero1")
    assert records[-1]["step"] == 4


@pytest.mark.slow
def test_an_older_checkpoints_rng_pickle_still_resumes_weights_only(checkpointed: Path, tmp_path: Path) -> None:
    import json
    import shutil

    import torch

    from pipelines.train.checkpoint import rng_from_json

    run = tmp_path / "run"
    shutil.copytree(checkpointed, run)
    step = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    rng = rng_from_json(json.loads((step / "rank-00000.rng.json").read_text()))
    (step / "rank-00000.rng.json").unlink()
    torch.save(rng, step / "rank-00000.pt")  # the format written before issue 17
    assert run_standin(run, steps=4, resume=True)[-1]["step"] == 4


class Box:
    """Plain data of a class no allow-list names."""

    def __init__(self, value: int) -> None:
        self.value = value


@pytest.mark.slow
def test_an_allowed_class_loads_weights_only_and_a_payload_stays_refused(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    import torch

    from pipelines.train.checkpoint import ALLOW_ENV, load_weights_only

    torch.save({"box": Box(3)}, tmp_path / "box.pt")
    with pytest.raises(pickle.UnpicklingError, match=r"box\.pt: refused to unpickle.*Box"):
        load_weights_only(tmp_path / "box.pt")
    monkeypatch.setenv(ALLOW_ENV, f"{__name__}.Box")
    assert load_weights_only(tmp_path / "box.pt")["box"].value == 3
    marker = tmp_path / "marker"
    torch.save({"x": _Payload(marker)}, tmp_path / "payload.pt")  # allowing Box never admits other code
    with pytest.raises(pickle.UnpicklingError, match="refused to unpickle"):
        load_weights_only(tmp_path / "payload.pt")
    assert not marker.exists()
