"""Recipes that add heads train end to end on CPU: ``fvlm train`` a few steps with the tiny preset in a subprocess
(tests/pipelines/train/run_fixtures.py), each run in its own folder, on the shared 6-case cohort (tests/conftest.py).
The heads and objectives themselves are tested in tests/fvlm (test_entity.py, test_region.py, test_supervised.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fvlm.model import load_pretrained
from pipelines.train.run_log import read_metrics
from tests.pipelines.train.run_fixtures import train_tiny

pytestmark = pytest.mark.slow

SHAPE = (32, 64, 64)


# --------------------------------------------------------------------------------------------- entity


@pytest.mark.parametrize("recipe, contrastive", [("fvlm-entity", "anatomy_contrastive"),
                                                 ("fvlm-entity-disease", "disease_aware")])
def test_entity_recipes_train_three_steps_and_export_the_heads(cohort6, tmp_path: Path, recipe: str,
                                                               contrastive: str) -> None:
    run = tmp_path / "run"
    done = train_tiny(recipe, cohort6.prep, run, steps=3)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for term in (contrastive, "entity_mlm", "guided_reconstruction"):
        assert all(math.isfinite(r[term]) and r[term] > 0 for r in records), term
    model, _ = load_pretrained(run / "model")
    assert set(model.heads) == {"entity_mlm", "masked_reconstruction"}
    assert model.heads["masked_reconstruction"].norm_target


# --------------------------------------------------------------------------------------------- region


@pytest.fixture(scope="module")
def region_runs(cohort6, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    runs = {}
    for recipe in ("fvlm-region", "fvlm-region-disease"):
        run = tmp_path_factory.mktemp(recipe) / "run"
        done = train_tiny(recipe, cohort6.prep, run, steps=3, sets=("model.heads.region.k=4",))
        assert done.returncode == 0, done.stderr[-3000:]
        runs[recipe] = run
    return runs


@pytest.mark.parametrize("recipe, terms", [("fvlm-region", ("anatomy_contrastive", "region_contrastive")),
                                           ("fvlm-region-disease", ("disease_aware", "region_contrastive"))])
def test_region_recipes_train_three_steps_and_export_the_head(region_runs, recipe: str,
                                                              terms: tuple[str, ...]) -> None:
    run = region_runs[recipe]
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for term in terms:
        assert all(math.isfinite(r[term]) for r in records), term
    model, _ = load_pretrained(run / "model")
    assert "region" in model.heads and model.heads["region"].k == 4


def test_predict_writes_a_region_map_for_the_trained_export(region_runs, cohort6, tmp_path: Path) -> None:
    import SimpleITK as sitk

    from pipelines.cli import main

    synth = cohort6.synth
    truth = sorted((synth / "truth").glob("*.json"))
    case, finding = next((json.loads(p.read_text())["case_id"], f) for p in truth
                         for f in json.loads(p.read_text())["findings"])
    out, hm = tmp_path / "pred.json", tmp_path / "map.nii.gz"
    assert main(["predict", "--checkpoint", str(region_runs["fvlm-region"]), str(synth / "images" / f"{case}.nii.gz"),
                 "--masks", str(synth / "segmentations" / f"{case}.nii.gz"), "--preprocess", str(cohort6.config),
                 "--output", str(out), "--heatmap", finding["task"], "--heatmap-output", str(hm),
                 "--heatmap-mode", "region"]) == 0
    doc = json.loads(out.read_text())
    assert doc["heatmap"]["mode"] == "region" and doc["heatmap"]["anatomy"] == finding["anatomy"]
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(hm)))
    scan = sitk.ReadImage(str(synth / "images" / f"{case}.nii.gz"))
    assert arr.shape == sitk.GetArrayFromImage(scan).shape
    assert np.isfinite(arr).all() and 0.0 <= arr.min() and 0.0 < arr.max() <= 1.0 + 1e-6


# ----------------------------------------------------------------------------------------- supervised


def test_the_supervised_recipe_trains_three_steps_and_scores_from_the_export(cohort6, tmp_path: Path) -> None:
    from fvlm.supervised import supervised_scores
    from pipelines.cases.dataset import CaseDataset
    from pipelines.evaluate.run import evaluate

    prepared = cohort6.prep
    run = tmp_path / "run"
    done = train_tiny("supervised", prepared, run, steps=3)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["supervised"]) and 0 < r["supervised"] < 2 for r in records)
    model, tok = load_pretrained(run / "model")
    assert model.config.heads["task_classifier"]["tasks"]["lung"][0] == "lung_nodule"
    ds = CaseDataset(prepared, tok, crop_size_zyx=SHAPE, mode="resize", train=False, max_text_len=16)
    cases = [ds[i] for i in range(2)]
    image = torch.stack([c["image"] for c in cases])
    anatomy = torch.stack([c["anatomy"] for c in cases])
    cut = torch.stack([c["cut"] for c in cases])
    scores = supervised_scores(model, image, anatomy, cut, ["lung_nodule", "cardiomegaly"])
    assert scores.shape == (2, 2) and np.isfinite(scores[~np.isnan(scores)]).all()
    # fvlm evaluate scores a supervised run by its classifier (not by prompts), on every case of the central view
    ev = evaluate(run, prepared, "fvlm54", view_kind="windows", threshold_split=None, n_boot=10, min_positives=1)
    assert ev.info["readout"] == "classifier" and ev.ceiling is None
    assert ev.info["view"]["kind"] != "windows"
    j = ev.case_ids.index(ds.case_ids[0])
    k = [t.name for t in ev.tasks].index("lung_nodule")
    want = supervised_scores(model, image[:1], anatomy[:1], cut[:1], ["lung_nodule"])[0, 0]
    assert np.isnan(want) and np.isnan(ev.scores[j, k]) or ev.scores[j, k] == pytest.approx(want, abs=1e-5)
