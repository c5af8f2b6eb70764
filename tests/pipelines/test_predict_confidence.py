"""``fvlm predict`` confidence from the uncertainty head (issue 8): the fvlm-uncertainty recipe trains 3 steps
on CPU through ``fvlm train`` (tiny model, a synthetic cohort), and its exported model's predictions carry a
per-anatomy confidence and mean variance; a model without the head has no such fields."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--set", "model.preset=tiny", "--set", "data.crop_size=[32,64,64]", "--set", "data.mode=resize",
        "--set", "data.batch_size=4", "--set", "data.workers=0", "--set", "deepspeed=zero0",
        "--set", "logging.progress=false", "--set", "logging.tensorboard=false", "--set", "logging.every=1",
        "--set", "checkpoint.every=3"]


@pytest.fixture(scope="module")
def trained(cohort8, tmp_path_factory, pytestconfig: pytest.Config) -> dict:
    """The shared 8-case cohort and fvlm-uncertainty trained 3 steps on it in a subprocess (DeepSpeed keeps
    process-wide state that must not leak into other tests), in a folder of its own."""
    root = cohort8.root
    synth, fast = cohort8.synth, cohort8.config
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(pytestconfig.cache.mkdir("torch_extensions")))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    run = tmp_path_factory.mktemp("uncertainty") / "run"
    proc = subprocess.run([sys.executable, "-m", "pipelines", "train", "--config", "fvlm-uncertainty", "--data",
                           str(cohort8.prep), "--output", str(run), "--max-steps", "3", *TINY],
                          env=env, cwd=ROOT, timeout=400, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    image = sorted((synth / "images").glob("*.nii.gz"))[0]
    return {"root": root, "run": run, "fast": fast, "image": image,
            "masks": synth / "segmentations" / image.name}


@pytest.mark.slow
def test_the_recipe_trains_three_steps_with_every_term(trained) -> None:
    from pipelines.train.run_log import read_metrics

    records = read_metrics(trained["run"] / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    terms = ("uncertainty_inter", "uncertainty_intra_image", "uncertainty_intra_text", "uncertainty_variance")
    for r in records:
        assert all(math.isfinite(r[t]) for t in terms) and math.isfinite(r["loss"])
        assert r["loss"] == pytest.approx(sum(r[t] for t in terms), rel=1e-5)
        assert r["uncertainty_inter"] > 0 and r["uncertainty_intra_image"] > 0 and r["uncertainty_intra_text"] > 0
    from fvlm.model.export import read_config

    assert read_config(trained["run"] / "model").heads["uncertainty"]["intra_image"] is True  # saved with the model


@pytest.mark.slow
def test_predict_reports_a_confidence_per_anatomy(trained, tmp_path: Path, capsys) -> None:
    from pipelines.cli import main

    out = tmp_path / "pred.json"
    assert main(["predict", "--checkpoint", str(trained["run"]), str(trained["image"]), "--masks",
                 str(trained["masks"]), "--preprocess", str(trained["fast"]), "--output", str(out)]) == 0
    table = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert "initial_variance" in doc["uncertainty"] and doc["uncertainty"]["initial_variance"] == pytest.approx(1 / 32)
    scored = [a for a in doc["anatomies"].values() if a["scored"]]
    assert scored
    for name, a in doc["anatomies"].items():
        assert list(a)[:5] == ["present", "cut", "scored", "confidence", "variance"]
        if a["scored"]:
            assert 0.0 < a["confidence"] < 1.0 and a["variance"] > 0.0, name
            assert a["confidence"] == pytest.approx(1 / (1 + a["variance"] / doc["uncertainty"]["initial_variance"]))
        else:
            assert a["confidence"] is None and a["variance"] is None, name
    # after 3 steps the variances sit near the initial one, but differ between anatomies
    confs = [a["confidence"] for a in scored]
    assert all(0.2 < c < 0.8 for c in confs) and max(confs) > min(confs)
    header = next(line for line in table.splitlines() if line.startswith("anatomy"))
    assert "confidence" in header
    first = next(n for n, a in doc["anatomies"].items() if a["scored"])
    row = next(line for line in table.splitlines() if line.startswith(first))
    assert f"{doc['anatomies'][first]['confidence']:.3f}" in row


@pytest.mark.slow
def test_absent_anatomies_have_no_confidence(trained, tmp_path: Path) -> None:
    import numpy as np
    import SimpleITK as sitk

    from pipelines.predict.run import predict

    lab = sitk.ReadImage(str(trained["masks"]))
    arr = sitk.GetArrayFromImage(lab)
    kept = np.where(np.isin(arr, [10, 11, 12, 13, 14]), arr, 0).astype(arr.dtype)  # lung lobes only
    small = sitk.GetImageFromArray(kept)
    small.CopyInformation(lab)
    masks = tmp_path / "lungs.nii.gz"
    sitk.WriteImage(small, str(masks))
    doc = predict(trained["run"], trained["image"], masks=masks, preprocess=str(trained["fast"]))
    json.dumps(doc, allow_nan=False)
    absent = [a for a in doc["anatomies"].values() if not a["present"]]
    assert absent and all(a["confidence"] is None for a in absent)
    assert doc["anatomies"]["lung"]["confidence"] is not None


@pytest.mark.slow
def test_a_model_without_the_head_has_no_confidence(trained, tmp_path: Path, capsys) -> None:
    from anatomy.catalog import load_anatomy_set
    from fvlm.model import create_model, load_pretrained, save_pretrained
    from pipelines.cli import main

    _, tok = load_pretrained(trained["run"] / "model")
    torch.manual_seed(0)
    plain = create_model("tiny", anatomy_names=tuple(load_anatomy_set("fvlm15").names), text={"vocab_size": len(tok)})
    save_pretrained(plain, tok, tmp_path / "plain")
    out = tmp_path / "pred.json"
    assert main(["predict", "--checkpoint", str(tmp_path / "plain"), str(trained["image"]), "--masks",
                 str(trained["masks"]), "--preprocess", str(trained["fast"]), "--mode", "resize", "--crop-size",
                 "32", "64", "64", "--output", str(out)]) == 0
    table = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert "uncertainty" not in doc and "confidence" not in table
    assert all("confidence" not in a and "variance" not in a for a in doc["anatomies"].values())


def test_format_table_columns() -> None:
    from pipelines.predict.run import format_table

    base = {"model": {"name": "m"}, "tasks": {"catalog": "c", "n_tasks": 2}, "whole_study": {"w": 0.25},
            "anatomies": {"lung": {"present": True, "cut": False, "tasks": {"t1": 0.5, "t2": None}},
                          "liver": {"present": False, "cut": False, "tasks": {}}}}
    plain = format_table(base)
    assert "confidence" not in plain
    with_conf = json.loads(json.dumps(base))
    with_conf["uncertainty"] = {"initial_variance": 0.03}
    with_conf["anatomies"]["lung"]["confidence"] = 0.625
    with_conf["anatomies"]["liver"]["confidence"] = None
    lines = format_table(with_conf).splitlines()
    header = next(line for line in lines if line.startswith("anatomy"))
    col = header.index("task")
    lung = [line for line in lines if "t1" in line or "t2" in line]
    assert "0.625" in lung[0] and "0.625" not in lung[1]
    assert all(line.index(t) == col for line, t in zip(lung, ("t1", "t2")))  # columns stay aligned
    whole = next(line for line in lines if line.startswith("(whole study)"))
    assert whole.index("w ") == col
    assert next(line for line in lines if line.startswith("liver")).rstrip().endswith("-")
