"""Fault injection (issue 17 items 5 and 7): ``kill -9`` of ``parse-reports`` and ``evaluate`` in the middle of
writing leaves no partial file at a final path (an earlier output stays whole); the next run removes the
temporary siblings the killed one left; a preprocess pool does not outlive its killed parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Runs ``fvlm ARGS`` and SIGKILLs itself on the N-th call of MODULE:ATTR.METHOD (argv: module attr method n args).
KILLER = """
import importlib, os, signal, sys
module, cls, method, n = sys.argv[1:5]
owner = getattr(importlib.import_module(module), cls)
orig = getattr(owner, method)
calls = [0]
def hook(*a, **k):
    calls[0] += 1
    if calls[0] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(*a, **k)
setattr(owner, method, hook)
from pipelines.cli import main
sys.exit(main(sys.argv[5:]))
"""


def _killed(hook: tuple[str, str, str, int], args: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, *map(str, hook), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode


def _table(path: Path, n: int = 12) -> Path:
    rows = [f"r{i},The liver shows a {i} mm hypodense lesion. No pleural effusion." for i in range(n)]
    path.write_text("id,text\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.slow
def test_parse_reports_killed_mid_write_leaves_no_partial_output(tmp_path: Path) -> None:
    from pipelines.cli import main

    table = _table(tmp_path / "reports.csv")
    out = tmp_path / "labels.csv"
    args = ["parse-reports", str(table), "--preset", "fvlm15", "--id-column", "id", "--text-column", "text",
            "--output", str(out)]
    assert _killed(("anatomy.reports", "ReportParser", "parse", 5), args) == -signal.SIGKILL
    assert not out.exists() and not out.with_suffix(".jsonl").exists()
    assert list(tmp_path.glob(".labels.*.tmp-*"))  # what the killed run wrote is only in hidden temporaries
    assert main(args) == 0
    first = out.read_text(), out.with_suffix(".jsonl").read_text()
    assert len(first[0].splitlines()) == 13 and len(first[1].splitlines()) == 12
    assert not list(tmp_path.glob(".labels.*.tmp-*"))  # the killed run's temporaries are cleaned
    # a second run killed mid-write leaves the first run's files whole
    assert _killed(("anatomy.reports", "ReportParser", "parse", 5), args) == -signal.SIGKILL
    assert (out.read_text(), out.with_suffix(".jsonl").read_text()) == first


@pytest.fixture(scope="module")
def eval_inputs(cohort4, tmp_path_factory) -> tuple[Path, Path]:
    import torch

    from fvlm.model import create_model, save_pretrained, train_wordpiece
    from pipelines.cases.format import corpus_texts, read_run

    root = tmp_path_factory.mktemp("killeval")
    prep = cohort4.prep
    tok = train_wordpiece(corpus_texts(prep), vocab_size=300, min_frequency=1)
    names = tuple(read_run(prep)["anatomies"][str(i)] for i in range(1, 16))
    torch.manual_seed(0)
    save_pretrained(create_model("tiny", anatomy_names=names, text={"vocab_size": len(tok)}), tok, root / "model")
    return prep, root / "model"


@pytest.mark.slow
def test_evaluate_killed_mid_write_leaves_no_partial_output(eval_inputs, tmp_path: Path) -> None:
    prep, model = eval_inputs
    out = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", str(model), "--data", str(prep), "--tasks", "fvlm54", "--mode", "resize",
            "--crop-size", "32", "64", "64", "--n-boot", "10", "--min-positives", "1", "--no-text-ceiling",
            "--output", str(out)]
    assert _killed(("csv", "DictWriter", "writerow", 10), args) == -signal.SIGKILL  # metrics.csv, 10th row
    assert not (out / "metrics.csv").exists() and not (out / "metrics.json").exists()
    assert list(out.glob(".metrics.csv.tmp-*"))
    from pipelines.cli import main

    assert main(args) == 0
    assert len((out / "metrics.csv").read_text().splitlines()) == 55 and not list(out.glob(".*.tmp-*"))


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_preprocess_pool_dies_with_its_killed_parent(tmp_path: Path) -> None:
    from tests.pipelines.preprocess.preprocess_fixtures import cohort, fast_config

    synth = cohort(tmp_path / "synth", cases=8, fmt="nifti")
    cmd = [sys.executable, "-m", "pipelines", "preprocess", str(synth / "images"), str(tmp_path / "out"), "--masks",
           str(synth / "segmentations"), "--config", str(fast_config(tmp_path)), "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    workers: list[int] = []
    while time.time() < deadline and len(workers) < 2 and proc.poll() is None:
        workers = _children(proc.pid)
        time.sleep(0.05)
    assert workers, "the pool never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_running(w) for w in workers):
        time.sleep(0.1)
    alive = [w for w in workers if _running(w)]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, "pool workers outlived their killed parent"


def _running(pid: int) -> bool:
    """The process exists and is no zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
