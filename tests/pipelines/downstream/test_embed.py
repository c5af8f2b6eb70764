"""``fvlm embed`` on the tiny synthetic cohort of the evaluate tests: the export reads back without fvlm and
equals the evaluation's embeddings, resumes after an interruption, refuses another model's folder; and a tiny
trained run goes end to end through embed -> probe -> retrieve and the downstream benchmark script."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import main

VIEW = ["--view", "center", "--mode", "resize", "--crop-size", "32", "64", "64"]


def test_export_reads_back_without_fvlm_and_equals_the_evaluation_view(eval_cohort, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from pipelines.evaluate.ceiling import case_texts
    from pipelines.evaluate.probe import embed_cases
    from pipelines.inference.model import eval_dataset, load_model

    prep, model_dir, _ = eval_cohort
    out = tmp_path / "emb"
    assert main(["embed", "--checkpoint", str(model_dir), "--data", str(prep), "--output", str(out), *VIEW,
                 "--batch-size", "3", "--no-progress"]) == 0
    arrays = load_file(str(out / "embeddings.safetensors"))  # plain safetensors + csv + json
    cases = list(csv.DictReader(open(out / "cases.csv")))
    meta = json.loads((out / "meta.json").read_text())
    model, tok, _ = load_model(model_dir)
    ds = eval_dataset(prep, tok, model, {"mode": "resize", "crop_size_zyx": [32, 64, 64]}, 0, 0.5)
    n, a, d = len(ds), model.config.num_anatomies, model.config.embed_dim
    assert [c["case_id"] for c in cases] == ds.case_ids and meta["n_cases"] == n
    assert arrays["image_emb"].shape == arrays["text_emb"].shape == (n, a, d)
    assert arrays["anatomy_mask"].dtype == np.bool_ and arrays["text_group"].dtype == np.int32
    want = embed_cases(model, ds, batch_size=2)
    np.testing.assert_allclose(arrays["image_emb"], want["image_emb"], atol=1e-5)
    np.testing.assert_allclose(arrays["global_image_emb"], want["global_image_emb"], atol=1e-5)
    np.testing.assert_array_equal(arrays["anatomy_mask"], want["anatomy_mask"])
    assert not (arrays["anatomy_mask"] & ~arrays["anatomy_present"]).any()
    np.testing.assert_array_equal(arrays["anatomy_cut"], arrays["anatomy_present"] & ~arrays["anatomy_mask"])
    for i in range(n):
        texts, report = case_texts(ds.case_json(i), ds.anatomy_names)
        np.testing.assert_array_equal(arrays["text_mask"][i], [bool(t) for t in texts])
        assert bool(arrays["report_mask"][i]) == bool(report)
        assert (arrays["text_group"][i] >= 0).tolist() == [bool(t) for t in texts]
    # equal group ids <-> identical texts <-> identical embeddings
    flat = [(t, g) for i in range(n) for t, g in zip(case_texts(ds.case_json(i), ds.anatomy_names)[0],
                                                     arrays["text_group"][i]) if t]
    assert len({t for t, _ in flat}) == len({g for _, g in flat}) == len(set(flat))
    norms = np.linalg.norm(arrays["text_emb"][arrays["text_mask"]], axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    labels = list(csv.DictReader(open(out / "labels.csv")))
    assert [r["case_id"] for r in labels] == ds.case_ids and meta["labels_kind"] == "ground_truth"
    assert meta["readout"] == "anatomy" and meta["anatomy_names"] == list(ds.anatomy_names)
    assert not (out / "parts").exists()
    stored = b"".join(p.read_bytes() for p in out.iterdir())  # no text, no input path: only ids and numbers
    assert str(prep).encode() not in stored
    for i in range(n):
        texts, report = case_texts(ds.case_json(i), ds.anatomy_names)
        assert all(t.encode() not in stored for t in [*texts, report] if len(t) > 8)


@pytest.mark.slow  # embeds the cohort, interrupted, then resumed
def test_embed_resumes_after_an_interruption_and_guards_its_folder(eval_cohort, tmp_path: Path, monkeypatch,
                                                                   capsys) -> None:
    from safetensors.numpy import load_file

    from pipelines.downstream import embed as E

    prep, model_dir, _ = eval_cohort
    full, out = tmp_path / "full", tmp_path / "resumed"
    kw = dict(view_kind="center", mode="resize", crop_size=(32, 64, 64), chunk_size=3, progress=False)
    assert E.embed(model_dir, prep, full, **dict(kw, chunk_size=100))["n_embedded"] == 8  # one chunk
    real, calls = E.embed_chunk, []

    def dying(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(E, "embed_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        E.embed(model_dir, prep, out, **kw)
    assert sorted(p.name for p in (out / "parts").glob("part-*")) == ["part-00000.safetensors",
                                                                       "part-00001.safetensors"]
    assert not (out / "meta.json").exists()
    assert main(["probe", "--embeddings", str(out), "--eval-embeddings", str(full), "--output",
                 str(tmp_path / "p")]) == 2
    assert "unfinished" in capsys.readouterr().err
    monkeypatch.setattr(E, "embed_chunk", real)
    done = E.embed(model_dir, prep, out, **dict(kw, chunk_size=5))  # resumes with the chunks it started with
    assert done["n_embedded"] == 2 and not done["skipped"]  # only the last chunk (cases 6, 7)
    a, b = load_file(str(full / "embeddings.safetensors")), load_file(str(out / "embeddings.safetensors"))
    for k in a:  # chunks of 3 (resumed) give what one chunk gives: each chunk is its own cases
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
    assert E.embed(model_dir, prep, out, **kw)["skipped"]  # complete: nothing to do
    assert E.embed(model_dir, prep, out, **dict(kw, chunk_size=5))["skipped"]
    other = dict(kw, crop_size=(32, 32, 32))
    with pytest.raises(FileExistsError, match="another checkpoint, cohort or view"):
        E.embed(model_dir, prep, out, **other)
    assert E.embed(model_dir, prep, out, **other, overwrite=True)["n_embedded"] == 8


@pytest.mark.slow  # embeds the whole cohort in the windows view
def test_windows_view_is_the_default_and_invalid_options_are_clear_errors(eval_cohort, tmp_path: Path,
                                                                          capsys) -> None:
    from pipelines.downstream.store import read_embeddings

    prep, model_dir, _ = eval_cohort
    assert main(["embed", "--checkpoint", str(model_dir), "--data", str(prep), "--output", str(tmp_path / "w"),
                 "--no-progress"]) == 0
    emb = read_embeddings(tmp_path / "w")
    assert emb["meta"]["view"]["kind"] == "windows"
    norms = np.linalg.norm(emb["image_emb"][emb["anatomy_mask"]], axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    assert main(["embed", "--checkpoint", str(model_dir), "--data", str(tmp_path / "nope"), "--output",
                 str(tmp_path / "x")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["embed", "--checkpoint", str(model_dir), "--data", str(prep), "--output", str(tmp_path / "x"),
                 "--chunk-size", "0"]) == 2
    assert "--chunk-size" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_runs(eval_cohort, tmp_path_factory, pytestconfig: pytest.Config) -> Path:
    """RUNS/tiny: fvlm train (tiny recipe, 4 steps) in a subprocess, as the evaluate tests train."""
    prep, _, _ = eval_cohort
    runs = tmp_path_factory.mktemp("downstream") / "runs"
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(pytestconfig.cache.mkdir("torch_extensions")))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    subprocess.run([sys.executable, "-m", "pipelines", "train", "--config", "tiny", "--data", str(prep),
                    "--output", str(runs / "tiny"), "--set", "optim.max_steps=4", "--set", "logging.progress=false"],
                   env=env, check=True, timeout=300, capture_output=True)
    return runs


@pytest.mark.slow
def test_a_trained_tiny_run_goes_through_embed_probe_retrieve(eval_cohort, trained_runs: Path, tmp_path: Path,
                                                              capsys) -> None:
    prep, _, _ = eval_cohort
    run = trained_runs / "tiny"
    emb = tmp_path / "emb"
    assert main(["embed", "--checkpoint", str(run), "--data", str(prep), "--output", str(emb), "--no-progress"]) == 0
    meta = json.loads((emb / "meta.json").read_text())
    assert meta["view"]["kind"] == "resize" and meta["readout"] == "anatomy"  # the tiny recipe's view, read from it
    assert meta["text_lengths"]["length_source"] == "recipe config.yaml"
    capsys.readouterr()
    assert main(["probe", "--embeddings", str(emb), "--eval-embeddings", str(emb), "--fractions", "0.5,1",
                 "--seeds", "2", "--folds", "2", "--min-positives", "1", "--n-boot", "20",
                 "--output", str(tmp_path / "probe")]) == 0
    assert "macro AUC by label fraction" in capsys.readouterr().out
    doc = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert doc["info"]["n_overlap_cases"] == 8 and set(doc["fractions"]) == {"0.5", "1"}
    assert any(t["auc"] is not None for t in doc["fractions"]["1"]["tasks"].values())
    assert "not held out" in (tmp_path / "probe" / "report.md").read_text()
    assert main(["retrieve", "--embeddings", str(emb), "--output", str(tmp_path / "ret")]) == 0
    printed = capsys.readouterr().out
    assert "case level:" in printed and "anatomy level:" in printed and "(chance)" in printed
    res = json.loads((tmp_path / "ret" / "retrieval.json").read_text())
    assert res["case"]["n_cases"] == 8 and 1 <= res["case"]["image->report"]["median_rank"] <= 8


@pytest.mark.slow
def test_downstream_benchmark_runs_on_the_tiny_fixtures(eval_cohort, trained_runs: Path, tmp_path: Path,
                                                        monkeypatch) -> None:
    from benchmarks import downstream
    from benchmarks import record as rec

    prep, _, labels = eval_cohort
    md = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(rec, "BENCHMARKS_MD", md)
    assert downstream.main(["--runs", str(trained_runs), "--train", str(prep), "--test", str(prep),
                            "--train-labels", str(labels), "--test-labels", str(labels), "--out", str(tmp_path / "o"),
                            "--fractions", "0.5,1", "--seeds", "2", "--folds", "2", "--n-boot", "20",
                            "--min-positives", "1"]) == 0
    text = md.read_text()
    assert "### Downstream: linear probe and retrieval of tiny" in text
    assert "probe 0.5 labels" in text and "case R@5 image->report (chance)" in text and "| tiny | tiny |" in text
    assert (tmp_path / "o" / "probe" / "tiny" / "report.html").is_file()
    assert (tmp_path / "o" / "retrieve" / "tiny" / "retrieval.csv").is_file()
