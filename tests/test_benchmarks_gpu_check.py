"""benchmarks.gpu_check: the vision-tower FLOP formula against torch's counter, and the whole check in its CPU
dry run (every stage with the tiny model), including a stage that fails and one stopped at its budget."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check as gc
from benchmarks.gpu_check_stages import count_flops, peak_bf16_tflops, vision_flops
from fvlm.model import load_model_config
from fvlm.model.registry import create_vision_encoder

ROOT = Path(__file__).resolve().parents[1]


def test_base_flops_match_the_issue_anchor() -> None:
    f = vision_flops(load_model_config("base").vision, (112, 256, 352))
    assert f["tokens"] == 7 * 16 * 11
    assert f["stem"] == pytest.approx(2 * 1232 * 8192 * 768)
    assert f["block"] == pytest.approx(8 * 1232 * 768**2 + 4 * 1232 * 768 * 3072 + 4 * 1232**2 * 768)
    assert f["train"] == pytest.approx(3 * 12 * f["block"] + 2 * f["stem"])
    assert 0.8e12 < f["train"] < 0.85e12  # "about 0.8 TFLOP per volume" (issue 19)


@pytest.mark.parametrize("preset", ["tiny", "tiny-conv"])
@pytest.mark.parametrize("crop", [None, (48, 64, 96)])
def test_flop_formula_equals_torch_flop_counter(preset: str, crop) -> None:
    cfg = load_model_config(preset).vision
    crop = tuple(crop or cfg.image_size)
    torch.manual_seed(0)
    tower = create_vision_encoder(cfg)
    x = torch.rand(2, cfg.in_channels, *crop)
    assert count_flops(tower, x) == pytest.approx(2 * vision_flops(cfg, crop)["train"], rel=1e-6)


def test_peak_table_and_override() -> None:
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3")[0] == pytest.approx(989.4)
    assert peak_bf16_tflops("NVIDIA H100 PCIe")[0] == pytest.approx(756.0)
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB")[0] == pytest.approx(312.0)
    assert peak_bf16_tflops("cpu")[0] is None
    assert peak_bf16_tflops("cpu", 1.5) == (1.5, "--peak-tflops")


@pytest.mark.parametrize("argv, message", [
    (["out", "--budget", "loader=soon"], "STAGE=SECONDS"),
    (["out", "--budget", "loader=-1"], "STAGE=SECONDS"),
    (["out", "--stages", "trian_zero0"], "unknown stage 'trian_zero0'"),
    (["out", "--no-ckpt", "--stages", "train_zero0_ckpt"], "unknown stage"),
])
def test_bad_arguments_are_refused(argv, message, capsys) -> None:
    with pytest.raises(SystemExit):
        gc.parse_args(argv)
    assert message in capsys.readouterr().err


def test_report_of_a_check_that_measured_nothing() -> None:
    doc = {"mode": "GPU", "recipe": "fvlm", "sets": [], "stages": {
        "env": {"status": "timeout", "budget_s": 40, "error": "stopped"},
        "train_zero0": {"status": "error", "budget_s": 75, "error": "RuntimeError: x", "result": {"batch": 14}},
        "loader": {"status": "skipped", "budget_s": 60}}}
    doc["summary"] = gc.summarise(doc)
    table, notes = gc.markdown(doc)
    assert "| env | timeout |" in table and "| train_zero0 | error |" in table and "| loader | skipped |" in table
    assert doc["summary"]["best_train_samples_per_s"] is None and "target 15x" in notes


def _run(tmp: Path, pytestconfig: pytest.Config, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(pytestconfig.cache.mkdir("torch_extensions")))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", str(tmp), "--cpu-dry-run", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    path = tmp / "gpu_check.json"
    assert path.is_file(), f"no gpu_check.json\n{proc.stderr[-3000:]}"
    return proc, json.loads(path.read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, pytestconfig):
    bench = ROOT / "BENCHMARKS.md"
    before = bench.read_bytes() if bench.exists() else None
    out = tmp_path_factory.mktemp("gpu_check")
    proc, doc = _run(out, pytestconfig)
    after = bench.read_bytes() if bench.exists() else None
    return out, proc, doc, before == after


@pytest.mark.slow
def test_dry_run_runs_every_stage(dry_run) -> None:
    out, proc, doc, bench_untouched = dry_run
    stages = doc["stages"]
    assert list(stages) == gc.stage_names(["zero0", "zero2"], True)
    bad = {s: (v["status"], v.get("error"), v.get("traceback", [])[-3:])
           for s, v in stages.items() if v["status"] != "ok"}
    assert not bad, f"{bad}\n{(out / 'worker.log').read_text()[-3000:]}"
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert bench_untouched, "the dry run must not write BENCHMARKS.md"
    r = {s: v["result"] for s, v in stages.items()}
    assert r["env"]["torch"] == torch.__version__ and r["env"]["device"] == "cpu"
    assert r["env"]["sdpa"]["kernel"] in ("flash", "memory-efficient", "cudnn", "math")
    assert r["env"]["sdpa"]["backends"]["math"] == "ok"
    assert r["mfu"]["flops_counter_ratio"] == pytest.approx(1.0, rel=1e-6)
    assert [run["grad_checkpointing"] for run in r["mfu"]["runs"]] == [False, True]
    assert all(run["achieved_tflops"] > 0 for run in r["mfu"]["runs"])
    for name in ("train_zero0", "train_zero2", "train_zero0_ckpt", "train_zero2_ckpt"):
        t = r[name]
        assert t["zero"] == name.split("_")[1] and t["grad_checkpointing"] == name.endswith("_ckpt")
        assert t["dtype"] == "fp32" and t["batch"] == 2 and t["timed_steps"] == 2
        assert math.isfinite(t["samples_per_s"]) and t["peak_mib"] > 0 and t["recipe_batch_fits"]
        assert t["largest_batch"] >= t["batch"] and math.isfinite(t["largest_batch_samples_per_s"])
        assert all(tr["fits"] for tr in t["tries"])
    assert [run["workers"] for run in r["loader"]["runs"]] == [0, 1]
    assert all(math.isfinite(run["cases_per_s"]) for run in r["loader"]["runs"])  # measured (speeds: benchmarks)
    assert r["loader"]["crop"] == [32, 64, 64]
    zs = r["zeroshot"]["runs"]
    assert [z["device"] for z in zs] == ["cpu"] and zs[0]["windows"] > 0 and zs[0]["tasks"] == 54
    assert math.isfinite(r["predict"]["runs"][0]["seconds"]) and r["predict"]["runs"][0]["tasks"] == 54
    assert math.isfinite(doc["summary"]["best_train_samples_per_s"]) and doc["summary"]["loading_is_the_limit"] is not None
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("### GPU check (CPU dry run, tiny model)") and "| train_zero2_ckpt | ok |" in md
    assert "SDPA kernel" in md and "loader workers" in md


@pytest.mark.slow
def test_a_failing_stage_and_a_stage_over_budget_do_not_stop_the_others(tmp_path, pytestconfig) -> None:
    proc, doc = _run(tmp_path, pytestconfig, "--zero", "zero0", "nope", "--no-ckpt",
                     "--stages", "train_nope", "loader", "predict", "--budget", "loader=0.5")
    st = doc["stages"]
    assert list(st) == ["train_nope", "loader", "predict"]
    assert st["train_nope"]["status"] == "error" and "unknown DeepSpeed config 'nope'" in st["train_nope"]["error"]
    assert st["train_nope"]["traceback"]
    assert st["loader"]["status"] == "timeout" and "stopped after its budget of 0.5 s" in st["loader"]["error"]
    assert st["predict"]["status"] == "ok", st["predict"]
    assert st["predict"]["result"]["runs"][0]["tasks"] == 54
    assert proc.returncode == 1
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| train_nope | error |" in md and "| loader | timeout |" in md and "| predict | ok |" in md


def test_record_from_puts_a_gpu_block_into_benchmarks_md(tmp_path, monkeypatch, capsys) -> None:
    from benchmarks import record as rec

    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n### Other\n\nkept\n")
    monkeypatch.setattr(rec, "BENCHMARKS_MD", md)
    monkeypatch.setattr(rec, "machine", lambda: "a GPU box")
    run = tmp_path / "run"
    run.mkdir()
    (run / "gpu_check.md").write_text(rec.format_block("GPU check: NVIDIA H100 80GB HBM3", "| a |\n|---|\n| 1 |",
                                                       "notes", command="c"))
    assert gc.main(["--record-from", str(run)]) == 0
    text = md.read_text()
    assert "### Other\n\nkept" in text and "### GPU check: NVIDIA H100 80GB HBM3" in text and "a GPU box" in text
    (run / "gpu_check.md").write_text(rec.format_block("GPU check (CPU dry run, tiny model)", "| a |", command="c"))
    with pytest.raises(ValueError, match="dry run is not recorded"):
        gc.main(["--record-from", str(run)])
    with pytest.raises(SystemExit):
        gc.parse_args([])
