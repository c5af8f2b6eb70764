"""One preprocess OUT, one set of options, one writer per shard (issue 17 items 2 and 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.cli import main
from tests.pipelines.preprocess.preprocess_fixtures import cohort, fast_config, manifest, tree_digest


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cohort(tmp_path_factory.mktemp("synth"), cases=2, fmt="nifti")


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fast_config(tmp_path_factory.mktemp("cfg"))


def _args(synth: Path, out: Path, cfg: Path, *extra: str) -> list[str]:
    return ["preprocess", str(synth / "images"), str(out), "--masks", str(synth / "segmentations"),
            "--config", str(cfg), "--case-id", "key", "--no-progress", *extra]


@pytest.mark.slow  # preprocesses several times
def test_other_options_are_refused_naming_them_and_overwrite_starts_afresh(synth, cfg_file, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(_args(synth, out, cfg_file)) == 0
    before = tree_digest(out)
    capsys.readouterr()
    assert main(_args(synth, out, cfg_file, "--hu-check", "warn", "--max-gap-slices", "2")) == 2
    err = capsys.readouterr().err
    assert "hu_check 'fail' -> 'warn'" in err and "max_gap_slices 1 -> 2" in err
    assert "--overwrite" in err and "new OUT" in err and len(err.strip().splitlines()) == 1
    assert tree_digest(out) == before  # nothing added, nothing rewritten
    assert main(_args(synth, out, cfg_file)) == 0  # the same options resume
    assert all(r["status"] == "ok" for r in manifest(out))
    assert main(_args(synth, out, cfg_file, "--hu-check", "warn", "--overwrite")) == 0
    assert json.loads((out / "preprocess.json").read_text())["hu_check"] == "warn"
    cases = [json.loads(p.read_text()) for p in (out / "cases").glob("*/case.json")]
    assert len(cases) == 2 and all(c["intensity"]["hu_check"]["mode"] == "warn" for c in cases)  # redone


def test_options_are_recorded_before_the_first_case(synth, cfg_file, tmp_path, monkeypatch) -> None:
    """A run killed before its end still leaves its options, so a differing re-run is refused."""
    from pipelines.preprocess import run as run_mod

    def crash(job, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "process_job", crash)
    out = tmp_path / "out"
    assert main(_args(synth, out, cfg_file)) == 130  # interrupted
    monkeypatch.undo()
    assert json.loads((out / "preprocess.json").read_text())["hu_check"] == "fail"
    assert main(_args(synth, out, cfg_file, "--hu-check", "off")) == 2


def _hold(path: Path, pid: int) -> None:
    import socket

    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "now", "what": "other run"}))


def test_a_second_writer_is_refused_and_other_shards_go_on(synth, cfg_file, tmp_path, capsys) -> None:
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _hold(out / ".lock.shard-00000-of-00002", sleeper.pid)  # shard 0 is being written by a live process
        assert main(_args(synth, out, cfg_file, "--shard-index", "0", "--num-shards", "2")) == 2
        err = capsys.readouterr().err
        assert f"in use by process {sleeper.pid}" in err and len(err.strip().splitlines()) == 1
        assert main(_args(synth, out, cfg_file, "--shard-index", "1", "--num-shards", "2")) == 0  # another shard
        assert (out / "manifest.shard-00001-of-00002.jsonl").is_file()
        assert not (out / ".lock.shard-00001-of-00002").exists()  # released at the end
        # --overwrite never deletes cases another live run is writing
        assert main(_args(synth, out, cfg_file, "--shard-index", "1", "--num-shards", "2", "--hu-check", "warn",
                          "--overwrite")) == 2
        assert "is being written by process" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder died: its lock is stale and taken over
    assert main(_args(synth, out, cfg_file, "--shard-index", "0", "--num-shards", "2")) == 0
    assert not (out / ".lock.shard-00000-of-00002").exists()


def test_concurrent_shards_share_one_salt_and_one_out(synth, cfg_file, tmp_path) -> None:
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[3]
    procs = [subprocess.Popen([sys.executable, "-m", "pipelines", *_args(synth, out, cfg_file, "--case-id", "hash",
                                                                        "--shard-index", str(i), "--num-shards", "2")],
                              cwd=root, env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    rows = [r for i in range(2) for r in manifest(out, f"manifest.shard-{i:05d}-of-00002.jsonl")]
    assert sorted(r["status"] for r in rows) == ["ok", "ok"]
    assert (out / ".salt").stat().st_mode & 0o777 == 0o600
    assert not list(out.glob(".lock*")) and not list((out / "cases").glob(".*"))


def test_key_map_is_private_like_the_salt(synth, cfg_file, tmp_path) -> None:
    out, key_map = tmp_path / "out", tmp_path / "keys.csv"
    assert main(_args(synth, out, cfg_file, "--case-id", "hash", "--write-key-map", str(key_map))) == 0
    assert key_map.stat().st_mode & 0o777 == 0o600 and (out / ".salt").stat().st_mode & 0o777 == 0o600


def test_a_number_saved_as_an_integer_is_the_same_option_as_its_float(tmp_path: Path) -> None:
    """An OUT whose ``preprocess.json`` holds ``-1100`` resumes under a config read as ``-1100.0`` (the typed
    loader reads HU thresholds as the floats their fields say; older runs saved what the YAML wrote)."""
    from pipelines.preprocess.run import check_same_options

    record = {"crop": {"hu_check": {"air_peak_hu": [-1100.0, -700.0], "bin_hu": 10.0}, "pad_hu": -1024}}
    (tmp_path / "preprocess.json").write_text(json.dumps(
        {"crop": {"hu_check": {"air_peak_hu": [-1100, -700], "bin_hu": 10}, "pad_hu": -1024}}))
    check_same_options(tmp_path, record)  # no error: the same values
    with pytest.raises(ValueError, match=r"crop.hu_check.bin_hu 10.0 -> 5.0"):
        check_same_options(tmp_path, {"crop": {"hu_check": {"air_peak_hu": [-1100.0, -700.0], "bin_hu": 5.0},
                                               "pad_hu": -1024}})
