"""``fvlm evaluate`` end to end on a tiny synthetic cohort with an untrained tiny model (issue 6, items 1-3); the
report-style default prompts and the text readout ceiling (issue #14 item 4)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _run(args: list[str]) -> int:
    from pipelines.cli import main

    return main(["evaluate", *args])


def test_evaluate_writes_all_four_outputs(eval_cohort, tmp_path: Path) -> None:
    prep, model, _ = eval_cohort
    out = tmp_path / "out"
    assert _run(["--checkpoint", str(model), "--data", str(prep), "--tasks", "fvlm54", "--mode", "resize",
                 "--crop-size", "32", "64", "64", "--threshold-split", "0.3", "--n-boot", "1000",
                 "--min-positives", "1", "--output", str(out)]) == 0
    for name in ("metrics.csv", "metrics.json", "report.md", "report.html"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 54 and {"auc", "auc_ci_low", "n_pos", "n_neg", "validation_accuracy",
                                "optimistic_accuracy", "flag"} <= set(rows[0])
    assert {"text_ceiling_auc", "text_ceiling_ci_low", "text_ceiling_ci_high"} <= set(rows[0])
    doc = json.loads((out / "metrics.json").read_text())
    assert "auc" in doc["macro"] and "lung" in doc["per_anatomy"]
    assert doc["info"]["labels"]["kind"] == "ground_truth" and doc["info"]["n_boot"] == 1000
    assert doc["info"]["templates"] == "report" and doc["info"]["prompts"] == "catalog"
    # the text readout ceiling: per task, macro over the image macro's tasks, per anatomy
    ceiling = doc["text_ceiling"]
    assert {"description", "macro", "per_anatomy", "tasks", "missing_scores", "n_cases_with_text",
            "n_texts_encoded", "max_text_len", "report_max_len", "length_source"} <= set(ceiling)
    assert set(ceiling["tasks"]) == {r["task"] for r in rows} and ceiling["n_cases_with_text"] == 8
    assert 0 < ceiling["n_texts_encoded"] <= 8 * 15
    macro = ceiling["macro"]
    assert set(macro["tasks"]) | set(macro["tasks_without"]) == set(doc["included"])
    assert macro["auc"] is None or 0 <= macro["auc"] <= 1
    assert set(ceiling["per_anatomy"]) == set(doc["per_anatomy"])
    by_task = {r["task"]: r for r in rows}
    for name, auc in ceiling["tasks"].items():
        assert (by_task[name]["text_ceiling_auc"] or None) == (None if auc["auc"] is None else str(auc["auc"]))
    md = (out / "report.md").read_text()
    assert "text readout ceiling" in md and "| AUC | 95% CI | text ceiling |" in md
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "text readout ceiling" in html and "<th>text ceiling</th>" in html
    low = html.lower()
    assert "http" not in low and "<link" not in low and "<script" not in low and "url(" not in low


@pytest.mark.slow  # evaluates the whole cohort
def test_labels_table_with_missing_cases_is_reported_as_partial(eval_cohort, tmp_path: Path) -> None:
    prep, model, labels = eval_cohort
    rows = list(csv.DictReader(open(labels)))
    cols = [c for c in rows[0] if c != "lung_mass"]
    part = tmp_path / "labels.csv"
    with open(part, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows[1:])
    out = tmp_path / "out"
    assert _run(["--checkpoint", str(model), "--data", str(prep), "--tasks", "fvlm54", "--mode", "resize",
                 "--crop-size", "32", "64", "64", "--labels", str(part), "--n-boot", "50", "--output", str(out)]) == 0
    info = json.loads((out / "metrics.json").read_text())["info"]["labels"]
    assert info["missing_cases"] == [rows[0]["case_id"]] and info["missing_tasks"] == ["lung_mass"]
    assert "partial coverage" in (out / "report.md").read_text()


def test_clear_errors(eval_cohort, tmp_path: Path, capsys) -> None:
    prep, model, _ = eval_cohort
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(["--checkpoint", str(model), "--data", str(empty), "--tasks", "fvlm54", "--output",
                 str(tmp_path / "o")]) == 2
    assert "index" in capsys.readouterr().err
    assert _run(["--checkpoint", str(tmp_path), "--data", str(prep), "--tasks", "fvlm54", "--output",
                 str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.slow  # evaluates the whole cohort
def test_windows_view_scores_each_anatomy_in_its_window_and_averages(eval_cohort, tmp_path: Path) -> None:
    """Default view: a window of the model's input size around each anatomy; the case score of a task is the
    mean over the windows where its anatomy counts (checked against per-window scores recomputed here)."""
    import numpy as np

    from anatomy.catalog import load_task_catalog
    from fvlm.zeroshot import encode_prompts
    from pipelines.cases.dataset import CaseDataset
    from pipelines.evaluate.run import evaluate
    from pipelines.inference.model import load_model
    from pipelines.inference.windows import case_windows, score_case_windows

    prep, model_dir, _ = eval_cohort
    ev = evaluate(model_dir, prep, "fvlm54", n_boot=20, threshold_split=None, min_positives=1)
    assert ev.info["view"]["kind"] == "windows" and "windows around each anatomy" in ev.info["view_note"]
    assert all(n >= 1 for n in ev.info["windows_per_case"].values())

    model, tok, _ = load_model(model_dir)
    ds = CaseDataset(prep, tok, crop_size_zyx=model.config.vision.image_size, mode="crop", train=False)
    bank = encode_prompts(model, tok, load_task_catalog("fvlm54"))
    scale = float(model.logit_scale().detach())
    cw = case_windows(ds, 0, model.config.vision.image_size)
    case_scores, per_window = score_case_windows(model, cw, bank, scale)
    np.testing.assert_allclose(case_scores, ev.scores[0], rtol=1e-5, equal_nan=True)
    names = list(ds.anatomy_names)
    checked = 0
    for w, centred in enumerate(cw.centred_on):
        for name in centred:
            k = names.index(name)
            if cw.cut[w, k]:
                continue  # cut by the scan boundary / preprocess crop: masked in every window
            cols = [j for j, i in enumerate(bank.anatomy_index) if i == k]
            assert cols and not np.isnan(per_window[w, cols]).any(), name  # it counts in its own window
            counts_in = ~cw.cut[:, k].numpy()
            for j in cols:
                np.testing.assert_allclose(case_scores[j], per_window[counts_in, j].mean(), rtol=1e-6)
            checked += 1
    assert checked >= 3


def test_combine_window_scores_means_over_counting_windows_and_uses_global_for_whole_study() -> None:
    import numpy as np
    from types import SimpleNamespace

    from pipelines.inference.windows import combine_window_scores, window_origin

    bank = SimpleNamespace(anatomy_index=(0, 1, -1))
    per = np.array([[0.2, np.nan, 0.9], [0.4, 0.7, 0.1], [np.nan, np.nan, 0.5]])
    out = combine_window_scores(per, bank, np.array([np.nan, np.nan, 0.33]))
    np.testing.assert_allclose(out, [0.3, 0.7, 0.33])
    assert np.isnan(combine_window_scores(np.full((2, 3), np.nan), bank, np.zeros(3))[0])
    # centred on the box, moved inside the case, centred (padded) where the case is smaller than the window
    assert window_origin(np.array([40, 0, 90]), np.array([49, 9, 99]), (100, 50, 100), (20, 64, 32)) == (35, -7, 68)


@pytest.mark.slow  # evaluates the whole cohort
def test_text_ceiling_scores_the_same_cases_and_can_be_turned_off(eval_cohort, tmp_path: Path) -> None:
    import numpy as np

    from pipelines.evaluate.run import evaluate

    prep, model_dir, _ = eval_cohort
    ev = evaluate(model_dir, prep, "fvlm54", n_boot=20, threshold_split=None, mode="resize", crop_size=(32, 64, 64))
    assert ev.text_scores.shape == ev.scores.shape
    assert np.isnan(ev.text_scores[np.isnan(ev.scores)]).all()  # no ceiling where the image has no score
    assert np.isfinite(ev.text_scores).any()
    out = tmp_path / "out"
    assert _run(["--checkpoint", str(model_dir), "--data", str(prep), "--tasks", "fvlm54", "--mode", "resize",
                 "--crop-size", "32", "64", "64", "--n-boot", "20", "--templates", "release", "--no-text-ceiling",
                 "--output", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["text_ceiling"] is None and doc["info"]["templates"] == "release"
    assert "text readout ceiling" not in (out / "report.md").read_text()


def test_learned_prompts_keep_working_with_the_ceiling(eval_cohort, tmp_path: Path) -> None:
    """--prompts learned (a model with the prompt_context head): the learned bank scores images and texts."""
    import numpy as np

    from fvlm.model import create_model, load_tokenizer, save_pretrained
    from pipelines.evaluate.run import evaluate

    prep, model_dir, _ = eval_cohort
    tok = load_tokenizer(model_dir / "tokenizer")
    names = tuple(json.loads((model_dir / "config.json").read_text())["config"]["anatomy_names"])
    torch.manual_seed(0)
    save_pretrained(create_model("tiny", anatomy_names=names, text={"vocab_size": len(tok)},
                                 heads={"prompt_context": {"n_ctx": 4}}), tok, tmp_path / "learned")
    ev = evaluate(tmp_path / "learned", prep, "fvlm54", n_boot=20, threshold_split=None, mode="resize",
                  crop_size=(32, 64, 64), prompts="learned")
    assert ev.info["templates"] == "learned" and ev.ceiling is not None
    assert np.isfinite(ev.text_scores).any()


@pytest.mark.slow  # evaluates the whole cohort
@pytest.mark.parametrize("view", ["windows", "resize"])
def test_a_multi_window_model_is_evaluated_on_its_channels(eval_cohort, tmp_path: Path, view: str) -> None:
    """A model with ``vision.input_windows_hu`` is scored on one channel per window in both views (the
    evaluation dataset and the anatomy windows take the windows from the checkpoint's config)."""
    import numpy as np

    from fvlm.model import create_model, load_tokenizer, save_pretrained
    from pipelines.evaluate.run import evaluate

    prep, model_dir, _ = eval_cohort
    tok = load_tokenizer(model_dir / "tokenizer")
    names = tuple(json.loads((model_dir / "config.json").read_text())["config"]["anatomy_names"])
    torch.manual_seed(0)
    save_pretrained(create_model("tiny", anatomy_names=names, text={"vocab_size": len(tok)},
                                 vision={"input_windows_hu": [[-1150, 350], [-160, 240]]}), tok, tmp_path / "win2")
    kw = {"mode": "resize", "crop_size": (32, 64, 64)} if view == "resize" else {}
    ev = evaluate(tmp_path / "win2", prep, "fvlm54", n_boot=20, threshold_split=None, min_positives=1, **kw)
    assert np.isfinite(ev.scores).any()


@pytest.mark.slow  # evaluates the whole cohort
def test_a_model_with_anatomy_channels_is_evaluated_on_the_map(eval_cohort, tmp_path: Path) -> None:
    """A model with ``vision.anatomy_channels`` is scored in the windows view (each anatomy window with its own
    crop of the anatomy map as input; the tower refuses an input without those channels)."""
    import numpy as np

    from fvlm.model import create_model, load_tokenizer, save_pretrained
    from pipelines.evaluate.run import evaluate

    prep, model_dir, _ = eval_cohort
    tok = load_tokenizer(model_dir / "tokenizer")
    names = tuple(json.loads((model_dir / "config.json").read_text())["config"]["anatomy_names"])
    torch.manual_seed(0)
    save_pretrained(create_model("tiny", anatomy_names=names, text={"vocab_size": len(tok)},
                                 vision={"stem": "conv", "anatomy_channels": 3}), tok, tmp_path / "anat")
    ev = evaluate(tmp_path / "anat", prep, "fvlm54", n_boot=20, threshold_split=None, min_positives=1)
    assert np.isfinite(ev.scores).any()


def test_text_ceiling_of_texts_equal_to_the_prompts_is_perfect() -> None:
    """Cases whose texts are the positive prompt (positives) or the negative prompt (negatives), through a tiny
    text tower: ceiling AUC 1. No report, or an empty anatomy text: NaN; an image NaN stays NaN."""
    import numpy as np

    from anatomy.catalog import load_task_catalog
    from fvlm.metrics import auc_with_ci
    from fvlm.model import create_model, train_wordpiece
    from fvlm.zeroshot import encode_prompts
    from pipelines.evaluate.ceiling import case_texts, ceiling_scores

    catalog = load_task_catalog("ct-rate")
    names = ("lung", "heart", "esophagus", "aorta")
    tasks = ["lung_nodule", "cardiomegaly", "medical_material"]
    texts = [p for n in tasks for p in (*catalog[n].prompts.positive, *catalog[n].prompts.negative)]
    tok = train_wordpiece(texts, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = create_model("tiny", anatomy_names=names, num_anatomies=4, text={"vocab_size": 300}).eval()
    bank = encode_prompts(model, tok, catalog, templates=[0], tasks=tasks)  # "X." / "Not x."
    pos = {n: catalog[n].prompts.positive[0] for n in tasks}
    neg = {n: catalog[n].prompts.negative[0] for n in tasks}
    labels = np.array([1, 0, 1, 0, 0, 1])

    def case(y):
        side = pos if y else neg
        return {"report": {"text": side["medical_material"], "parsed": {"anatomies": {
            "lung": {"text": side["lung_nodule"]}, "heart": {"text": side["cardiomegaly"]}, "aorta": {"text": ""}}}}}

    cases = [case(y) for y in labels] + [{"labels": {"lung_nodule": 1}}]  # the last: no report
    assert case_texts(cases[0], names) == ([pos["lung_nodule"], pos["cardiomegaly"], "", ""], pos["medical_material"])
    image = np.zeros((7, 3))
    image[0, 1] = np.nan
    lengths = {"max_text_len": model.config.text.max_length, "report_max_len": model.config.text.max_length}
    scores, info = ceiling_scores(model, tok, cases, names, bank, lengths, image)
    assert scores.shape == (7, 3) and np.isnan(scores[6]).all() and np.isnan(scores[0, 1])
    assert info["n_cases_with_text"] == 6 and info["n_texts_encoded"] == 6  # 2 lung, 2 heart, 2 reports
    for j in range(3):
        keep = np.isfinite(scores[:6, j])
        assert auc_with_ci(labels[keep], scores[:6, j][keep], n_boot=0).auc == 1.0, tasks[j]


@pytest.mark.slow  # evaluates the whole cohort
def test_windows_fall_back_to_resize_view(eval_cohort) -> None:
    from pipelines.evaluate.run import evaluate

    prep, model_dir, _ = eval_cohort
    ev = evaluate(model_dir, prep, "fvlm54", n_boot=20, threshold_split=None, mode="resize", crop_size=(32, 64, 64))
    assert ev.info["view"]["kind"] == "resize" and "do not apply" in ev.info["view_note"]
    ev = evaluate(model_dir, prep, "fvlm54", n_boot=20, threshold_split=None, view_kind="center")
    assert ev.info["view"]["kind"] == "center" and ev.info["windows_per_case"] is None


def test_checkpoint_of_another_architecture_is_a_clear_error(eval_cohort, tmp_path: Path, capsys) -> None:
    from fvlm.model import create_model, load_tokenizer, save_pretrained

    prep, model_dir, _ = eval_cohort
    tok = load_tokenizer(model_dir / "tokenizer")
    # weights of a tiny model with a 16-d embedding under a config that says 32-d
    other = create_model("tiny", anatomy_names=("lung", "heart", "esophagus", "aorta"), num_anatomies=4,
                         embed_dim=16,
                         text={"vocab_size": len(tok)})
    save_pretrained(other, tok, tmp_path / "other")
    cfg = json.loads((model_dir / "config.json").read_text())
    (tmp_path / "other" / "config.json").write_text(json.dumps(cfg))
    assert _run(["--checkpoint", str(tmp_path / "other"), "--data", str(prep), "--tasks", "fvlm54", "--output",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "weights do not fit" in err or "architecture" in err, err
    # a well-formed model with 4 anatomies against data with 15
    save_pretrained(other, tok, tmp_path / "four")
    assert _run(["--checkpoint", str(tmp_path / "four"), "--data", str(prep), "--tasks", "fvlm54", "--output",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "lacks" in err or "differ" in err, err


@pytest.mark.slow  # evaluates the whole cohort
def test_silver_labels_are_marked(eval_cohort, tmp_path: Path) -> None:
    import shutil

    prep, model, _ = eval_cohort
    silver = tmp_path / "prep"
    shutil.copytree(prep, silver)
    for cj in (silver / "cases").glob("*/case.json"):
        doc = json.loads(cj.read_text())
        doc.pop("labels", None)
        cj.write_text(json.dumps(doc))
    out = tmp_path / "out"
    assert _run(["--checkpoint", str(model), "--data", str(silver), "--tasks", "fvlm54", "--mode", "resize",
                 "--crop-size", "32", "64", "64", "--n-boot", "20", "--output", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["info"]["labels"]["kind"] == "silver"
    assert "SILVER" in (out / "report.md").read_text()


def test_ct_rate_label_table_and_16_or_18_task_selection(tmp_path: Path) -> None:
    """CT-RATE preset: the multi-abnormality CSV (VolumeName + the 18 title columns) is read by title, case ids
    match VolumeName with or without .nii.gz; 16 = anatomy-bound labels, 18 = all."""
    from anatomy.catalog import load_task_catalog
    from pipelines.evaluate.run import read_labels_table, select_tasks

    cat = load_task_catalog("ct-rate")
    assert len(cat.tasks) == 18
    sixteen, eighteen = select_tasks(cat, 16), select_tasks(cat, 18)
    assert len(sixteen) == 16 and len(eighteen) == 18
    assert {"medical_material", "lymphadenopathy"} == set(eighteen) - set(sixteen)
    assert select_tasks(load_task_catalog("fvlm54"), 16) == [t.name for t in load_task_catalog("fvlm54").tasks]
    with pytest.raises(ValueError, match="16 or 18"):
        select_tasks(cat, 17)
    path = tmp_path / "valid_predicted_labels.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["VolumeName", *[t.title for t in cat.tasks]])
        w.writerow(["valid_1_a_1.nii.gz", *[1 if i % 2 else 0 for i in range(18)]])
        w.writerow(["valid_2_a_1.nii.gz", *[0] * 18])
    tasks = [cat[n] for n in eighteen]
    y, info = read_labels_table(path, ["valid_1_a_1", "valid_2_a_1.nii.gz", "valid_3_a_1"], tasks)
    assert y.shape == (3, 18) and list(y[0]) == [1.0 if i % 2 else 0.0 for i in range(18)]
    assert list(y[1]) == [0.0] * 18 and info["missing_cases"] == ["valid_3_a_1"] and not info["missing_tasks"]


@pytest.mark.slow
def test_ct_rate_preset_end_to_end_on_a_ct_rate4_cohort(tmp_path: Path) -> None:
    """--tasks ct-rate --ct-rate-labels 16|18 with CT-RATE's labels CSV on a cohort preprocessed with the
    4-anatomy set (windows view)."""
    from anatomy.catalog import load_task_catalog
    from fvlm.model import create_model, save_pretrained, train_wordpiece
    from pipelines.cases.format import corpus_texts, read_run
    from pipelines.synth.cohort import SynthConfig, make_cohort
    from tests.pipelines.preprocess.preprocess_fixtures import fast_config

    make_cohort(tmp_path / "synth", SynthConfig(cases=6, seed=2, format="nifti", normal_share=0.3))
    synth, prep = tmp_path / "synth", tmp_path / "prep"
    assert _run_cli(["preprocess", str(synth / "images"), str(prep), "--anatomy", "ct-rate4",
                     "--masks", str(synth / "segmentations"), "--reports", str(synth / "reports.csv"),
                     "--config", str(fast_config(tmp_path)), "--case-id", "key", "--no-progress"]) == 0
    tok = train_wordpiece(corpus_texts(prep), vocab_size=400, min_frequency=1)
    run = read_run(prep)
    names = tuple(run["anatomies"][str(i)] for i in range(1, len(run["anatomies"]) + 1))
    assert names == ("lung", "heart", "esophagus", "aorta")
    torch.manual_seed(0)
    save_pretrained(create_model("tiny", anatomy_names=names, num_anatomies=4, text={"vocab_size": len(tok)}),
                    tok, tmp_path / "model")
    cat = load_task_catalog("ct-rate")
    case_ids = sorted(p.name for p in (prep / "cases").iterdir() if p.is_dir())
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["VolumeName", *[t.title for t in cat.tasks]])
        for i, cid in enumerate(case_ids):
            w.writerow([f"{cid}.nii.gz", *[(i + k) % 2 for k in range(18)]])
    for n in (16, 18):
        out = tmp_path / f"out{n}"
        assert _run(["--checkpoint", str(tmp_path / "model"), "--data", str(prep), "--tasks", "ct-rate",
                     "--ct-rate-labels", str(n), "--labels", str(tmp_path / "labels.csv"), "--n-boot", "20",
                     "--min-positives", "1", "--threshold-split", "0", "--output", str(out)]) == 0
        doc = json.loads((out / "metrics.json").read_text())
        assert len(list(csv.DictReader(open(out / "metrics.csv")))) == n
        assert doc["info"]["ct_rate_labels"] == n and doc["info"]["view"]["kind"] == "windows"
        assert doc["info"]["labels"]["kind"] == "table" and not doc["info"]["labels"]["missing_cases"]
        assert ("whole_study" in doc["per_anatomy"]) == (n == 18)


def _run_cli(args: list[str]) -> int:
    from pipelines.cli import main

    return main(args)


@pytest.mark.slow
def test_a_trained_tiny_run_evaluates_end_to_end(eval_cohort, tmp_path: Path, pytestconfig: pytest.Config) -> None:
    """The issue's path: fvlm train (tiny recipe, a few steps) then fvlm evaluate on the RUN folder itself.
    Training runs in a subprocess: DeepSpeed keeps process-wide communication state that must not leak into
    the other tests of this session."""
    prep, _, _ = eval_cohort
    run = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(pytestconfig.cache.mkdir("torch_extensions")))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    subprocess.run([sys.executable, "-m", "pipelines", "train", "--config", "tiny", "--data", str(prep),
                    "--output", str(run), "--set", "optim.max_steps=4", "--set", "logging.progress=false"],
                   env=env, check=True, timeout=300, capture_output=True)
    out = tmp_path / "out"
    assert _run(["--checkpoint", str(run), "--data", str(prep), "--tasks", "fvlm54", "--n-boot", "1000",
                 "--min-positives", "1", "--output", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["info"]["view"]["kind"] == "resize"  # the tiny recipe's data view, read from the run
    assert doc["text_ceiling"]["length_source"] == "recipe config.yaml"  # texts tokenised as the run trained them
    assert doc["info"]["readout"] == "anatomy" and doc["info"]["readout_source"].startswith("auto: recipe")
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 54 and any(r["auc"] not in ("", "None", "nan") for r in rows)
    assert (out / "report.html").is_file() and (out / "report.md").is_file()


@pytest.mark.slow  # evaluates the whole cohort
def test_auc_counts_every_case_and_the_split_only_sets_thresholds(eval_cohort) -> None:
    """Issue #15 item 6: with a threshold split every case still counts in the AUCs; the validation share only
    chooses the thresholds, whose metrics are reported on the other cases."""
    from pipelines.evaluate.run import evaluate

    prep, model_dir, _ = eval_cohort
    kw = dict(n_boot=20, min_positives=1, mode="resize", crop_size=(32, 64, 64), text_ceiling=False)
    split = evaluate(model_dir, prep, "fvlm54", threshold_split=0.4, **kw)
    whole = evaluate(model_dir, prep, "fvlm54", threshold_split=None, **kw)
    info = split.info
    assert info["n_cases"] == info["n_eval"] == 8 and 0 < info["n_validation"] < 8
    assert info["n_validation"] + info["n_threshold_eval"] == 8 and whole.info["n_validation"] == 0
    assert split.threshold_mask.sum() == info["n_threshold_eval"]
    with_threshold = 0
    for t in split.tasks:
        r, w = split.results[t.name], whole.results[t.name]
        assert r.n_pos + r.n_neg + r.n_missing == 8  # every case counted in the AUC
        assert r.auc == w.auc and r.flag == w.flag and r.optimistic == w.optimistic
        assert r.val_n_pos + r.val_n_neg + r.val_n_missing == info["n_validation"]
        if r.validation is not None:
            m = r.validation
            assert m.tp + m.fp + m.tn + m.fn + m.n_missing == info["n_threshold_eval"]
            with_threshold += 1
        assert w.validation is None and w.val_n_pos is None
    assert with_threshold > 0
    assert split.summary["macro"]["auc"] == whole.summary["macro"]["auc"]
    assert split.summary["macro"]["auc_ci"] == whole.summary["macro"]["auc_ci"]


@pytest.mark.slow  # evaluates the whole cohort
def test_global_readout_scores_every_task_from_the_whole_scan_on_the_same_cases(eval_cohort) -> None:
    import numpy as np

    from anatomy.catalog import load_task_catalog
    from fvlm.zeroshot import encode_prompts, score_cases
    from pipelines.evaluate.probe import embed_cases
    from pipelines.evaluate.run import evaluate
    from pipelines.inference.model import eval_dataset, load_model

    prep, model_dir, _ = eval_cohort
    kw = dict(n_boot=20, threshold_split=None, min_positives=1)
    resized = None
    for view in (dict(mode="resize", crop_size=(32, 64, 64)), dict(view_kind="windows")):
        anat = evaluate(model_dir, prep, "fvlm54", readout="anatomy", **view, **kw)
        glob = evaluate(model_dir, prep, "fvlm54", readout="global", **view, **kw)
        resized = resized or glob
        assert glob.info["readout"] == "global" and glob.info["readout_source"] == "command line"
        assert anat.info["readout"] == "anatomy" and "global readout" in glob.info["view_note"]
        np.testing.assert_array_equal(np.isnan(anat.scores), np.isnan(glob.scores))  # the same cases
        assert not np.allclose(anat.scores[np.isfinite(anat.scores)], glob.scores[np.isfinite(glob.scores)])
        assert glob.ceiling["readout"] == "global"
        np.testing.assert_array_equal(np.isnan(glob.text_scores[np.isnan(glob.scores)]), True)
    # resize view: each task's score is the global embedding against the task's prompts
    model, tok, _ = load_model(model_dir)
    view = {"mode": "resize", "crop_size_zyx": [32, 64, 64]}
    ds = eval_dataset(prep, tok, model, view, 0, 0.5)
    emb = embed_cases(model, ds)
    bank = encode_prompts(model, tok, load_task_catalog("fvlm54"))
    g = torch.from_numpy(emb["global_image_emb"])
    a = emb["anatomy_mask"].shape[1]
    want = score_cases(g.unsqueeze(1).expand(-1, a, -1), torch.ones(len(g), a, dtype=torch.bool), bank,
                       float(model.logit_scale().detach()), g)
    keep = np.isfinite(resized.scores)
    np.testing.assert_allclose(resized.scores[keep], want[keep], rtol=1e-5)


@pytest.mark.slow  # evaluates the whole cohort
def test_embed_cases_matches_the_zero_shot_view(eval_cohort) -> None:
    """The probe's embeddings are the scoring view's: zero-shot scores recomputed from them equal score_dataset's,
    and the windows view gives an embedding wherever the windows scoring has a score."""
    import numpy as np

    from anatomy.catalog import load_task_catalog
    from fvlm.zeroshot import encode_prompts
    from pipelines.evaluate.probe import embed_cases
    from pipelines.evaluate.run import score_embeddings, score_windows
    from pipelines.inference.model import eval_dataset, load_model

    prep, model_dir, _ = eval_cohort
    model, tok, _ = load_model(model_dir)
    bank = encode_prompts(model, tok, load_task_catalog("fvlm54"))
    scale = float(model.logit_scale().detach())
    size = list(model.config.vision.image_size)
    ds = eval_dataset(prep, tok, model, {"mode": "crop", "crop_size_zyx": size}, 0, 0.5)
    emb = embed_cases(model, ds, batch_size=3)
    n, a, d = len(ds), model.config.num_anatomies, model.config.embed_dim
    assert emb["image_emb"].shape == (n, a, d) and emb["image_emb"].dtype == np.float32
    assert emb["anatomy_mask"].shape == (n, a) and emb["global_image_emb"].shape == (n, d)
    assert emb["case_ids"] == ds.case_ids and emb["view"] == "dataset"
    assert not emb["image_emb"][~emb["anatomy_mask"]].any()  # masked rows are zero
    s = score_embeddings(emb, bank, scale)
    rows = np.array(bank.anatomy_index)
    np.testing.assert_array_equal(np.isnan(s[:, rows >= 0]), ~emb["anatomy_mask"][:, rows[rows >= 0]])
    win = embed_cases(model, ds, windows=(size, 0.5))
    scores, _ = score_windows(model, ds, bank, size, 0.5)
    assert win["view"] == "windows" and win["image_emb"].shape == (n, a, d)
    np.testing.assert_array_equal(np.isnan(scores[:, rows >= 0]), ~win["anatomy_mask"][:, rows[rows >= 0]])
    norms = np.linalg.norm(win["image_emb"][win["anatomy_mask"]], axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


@pytest.mark.slow  # evaluates the whole cohort
def test_probe_end_to_end_writes_its_rows_beside_the_zero_shot_ones(eval_cohort, tmp_path: Path) -> None:
    """--probe-data: probe AUC per task in metrics.csv, the probe block (macro over the zero-shot macro's tasks,
    per anatomy, per task, fits) in metrics.json, a probe column and a macro line in report.md / report.html."""
    prep, model, _ = eval_cohort
    out = tmp_path / "out"
    assert _run(["--checkpoint", str(model), "--data", str(prep), "--tasks", "fvlm54", "--mode", "resize",
                 "--crop-size", "32", "64", "64", "--n-boot", "20", "--min-positives", "1", "--probe-data", str(prep),
                 "--probe-folds", "2", "--output", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert {"probe_auc", "probe_ci_low", "probe_ci_high", "probe_skipped"} <= set(rows[0])
    doc = json.loads((out / "metrics.json").read_text())
    probe = doc["probe"]
    assert doc["info"]["probe"] is True and probe["readout"] == "anatomy" and probe["folds"] == 2
    assert probe["n_train_cases"] == 8 and probe["n_overlap_cases"] == 8 and probe["data"] == str(prep)
    assert set(probe["tasks"]) == set(probe["fits"]) == {r["task"] for r in rows}
    assert set(probe["macro"]["tasks"]) | set(probe["macro"]["tasks_without"]) == set(doc["included"])
    assert set(probe["per_anatomy"]) == set(doc["per_anatomy"])
    fitted = [n for n, f in probe["fits"].items() if f["reason"] is None]
    assert fitted and set(probe["tasks_skipped"]) == set(probe["fits"]) - set(fitted)
    by_task = {r["task"]: r for r in rows}
    for name, auc in probe["tasks"].items():
        assert (by_task[name]["probe_auc"] or None) == (None if auc["auc"] is None else str(auc["auc"]))
    assert any(by_task[n]["probe_auc"] for n in fitted)
    md = (out / "report.md").read_text()
    assert "linear probe" in md and "| text ceiling | probe |" in md and "not held out" in md
    assert "<th>probe</th>" in (out / "report.html").read_text()


@pytest.mark.slow  # evaluates the whole cohort
def test_probe_fit_never_sees_the_evaluated_labels(eval_cohort, tmp_path: Path) -> None:
    """The probe is fitted on --probe-data's labels only: shuffling the evaluated cases' labels (--labels)
    changes their AUCs, never the fitted C or the probe scores."""
    import numpy as np

    from pipelines.evaluate.run import evaluate

    prep, model_dir, labels = eval_cohort
    rows = list(csv.DictReader(open(labels)))
    cols = list(rows[0])
    perm = np.random.default_rng(0).permutation(len(rows))
    shuffled = tmp_path / "shuffled.csv"
    with open(shuffled, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for i, r in enumerate(rows):
            w.writerow({**{c: rows[perm[i]][c] for c in cols}, "case_id": r["case_id"]})
    kw = dict(n_boot=20, threshold_split=None, min_positives=1, mode="resize", crop_size=(32, 64, 64),
              text_ceiling=False, probe_data=prep, probe_folds=2)
    a = evaluate(model_dir, prep, "fvlm54", labels=labels, **kw)
    b = evaluate(model_dir, prep, "fvlm54", labels=shuffled, **kw)
    assert not np.array_equal(a.labels, b.labels, equal_nan=True)
    assert a.probe["fits"] == b.probe["fits"]
    np.testing.assert_array_equal(a.probe_scores, b.probe_scores)
    with pytest.raises(ValueError, match="--probe-labels needs --probe-data"):
        evaluate(model_dir, prep, "fvlm54", probe_labels=labels, n_boot=20)


@pytest.mark.slow  # evaluates the whole cohort
def test_a_recipe_scorer_is_used_by_evaluate_and_predict_alike(eval_cohort, tmp_path: Path) -> None:
    """Issue 22: an export with the uncertainty head (no recipe beside it: the head declares the scorer) is
    scored with the 2-Wasserstein scorer in both views of ``fvlm evaluate``, with the numbers of
    ``fvlm.scoring`` recomputed here, and ``fvlm predict`` declares and describes the same scorer."""
    import numpy as np

    from anatomy.catalog import load_task_catalog
    from fvlm.model import create_model, load_pretrained, save_pretrained
    from fvlm.scoring import create_scorer
    from fvlm.zeroshot import encode_prompts
    from pipelines.cases.dataset import CaseDataset
    from pipelines.evaluate.run import evaluate
    from pipelines.inference.scoring import scorer_window_scores
    from pipelines.inference.windows import case_windows
    from pipelines.predict.run import predict

    prep, model_dir, labels = eval_cohort
    plain, tok = load_pretrained(model_dir)
    torch.manual_seed(1)
    model = create_model("tiny", anatomy_names=plain.config.anatomy_names, text={"vocab_size": len(tok)},
                         heads={"uncertainty": {}})
    with torch.no_grad():  # spread the variances, so the distance differs from the cosine
        model.heads["uncertainty"].image.weight.mul_(30.0)
    save_pretrained(model, tok, tmp_path / "unc")
    model, tok = load_pretrained(tmp_path / "unc")
    centre = evaluate(tmp_path / "unc", prep, "fvlm54", n_boot=5, threshold_split=None, min_positives=1,
                      view_kind="center", text_ceiling=False)
    assert centre.info["scorer"]["name"] == "wasserstein" and "model's uncertainty head" in centre.info["scorer"][
        "reason"]
    ds = CaseDataset(prep, tok, crop_size_zyx=model.config.vision.image_size, mode="crop", train=False)
    bank = encode_prompts(model, tok, load_task_catalog("fvlm54"), tasks=list(centre.info["task_names"]))
    scorer = create_scorer("wasserstein")
    prompts = scorer.prepare(model, tok, bank)
    item = ds[0]
    want = scorer.score_images(model, prompts, item["image"][None], item["anatomy"][None], item["cut"][None])[0]
    np.testing.assert_allclose(centre.scores[0], want, atol=2e-4, equal_nan=True)  # batch of 4 vs 1: fp32 rounding
    pooled = create_scorer("pooled").score_images(model, {"bank": bank}, item["image"][None], item["anatomy"][None],
                                                  item["cut"][None])[0]
    assert not np.allclose(np.nan_to_num(pooled), np.nan_to_num(want))  # the distance is not the cosine

    windows = evaluate(tmp_path / "unc", prep, "fvlm54", n_boot=5, threshold_split=None, min_positives=1,
                       text_ceiling=False)
    assert windows.info["view"]["kind"] == "windows" and windows.info["scorer"] == centre.info["scorer"]
    got, _ = scorer_window_scores(model, scorer, prompts, ds, model.config.vision.image_size)
    np.testing.assert_allclose(windows.scores, got, atol=2e-4, equal_nan=True)
    assert case_windows(ds, 0, model.config.vision.image_size) is not None

    synth = Path(labels).parent
    image = sorted((synth / "images").glob("*.nii.gz"))[0]
    fast = next(Path(prep).parent.glob("fast.yaml"))
    doc = predict(tmp_path / "unc", image, masks=synth / "segmentations" / image.name, preprocess=str(fast))
    assert doc["tasks"]["scorer"] == centre.info["scorer"] and doc["tasks"]["score"] == centre.info["scorer"]["score"]

    # the calibration check of the reported confidence runs on the evaluation's arrays
    from fvlm.calibration import task_confidence_check
    from pipelines.inference.scoring import case_confidences

    conf = case_confidences(model, ds)
    assert conf.shape == (len(ds), 15) and np.isfinite(conf[~np.isnan(conf)]).all()
    check = task_confidence_check(centre.scores, centre.labels, conf, bank.anatomy_index, n_boot=10)
    assert check.n > 0 and len(check.bins) >= 1


def test_the_scorer_is_declared_by_the_run_recipe(tmp_path: Path) -> None:
    """A run folder: the recipe's objectives declare the scorer, with the recipe's options (the export alone
    falls back to the heads)."""
    import shutil

    import yaml

    from configs.paths import config_dir
    from fvlm.model import create_model
    from pipelines.inference.scoring import resolve_scorer

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    recipe = yaml.safe_load((config_dir() / "train" / "fvlm-region.yaml").read_text())
    recipe["objectives"][1]["options"]["zeroshot_pooled_weight"] = 0.25
    (run / "config.yaml").write_text(yaml.safe_dump(recipe))
    model = create_model("tiny", heads={"region": {"k": 2}})
    for where in (run, run / "model"):
        scorer, spec, source = resolve_scorer(where, model)
        assert (spec.name, spec.options, scorer.pooled_weight) == ("region", {"pooled_weight": 0.25}, 0.25)
        assert "config.yaml" in source
    scorer, spec, source = resolve_scorer(tmp_path / "export_only", model)
    assert spec.options == {"pooled_weight": 0.0} and "heads" in source
    shutil.rmtree(run)



@pytest.mark.slow  # evaluates the whole cohort
def test_calibration_benchmark_runs_on_an_uncertainty_export(eval_cohort, tmp_path: Path, capsys) -> None:
    """``benchmarks.calibration`` (issue 22): the check on an uncertainty export, printed without touching
    BENCHMARKS.md; a model without the uncertainty head is a clear error."""
    from benchmarks.calibration import main
    from fvlm.model import create_model, load_pretrained, save_pretrained

    prep, model_dir, _ = eval_cohort
    plain, tok = load_pretrained(model_dir)
    torch.manual_seed(1)
    model = create_model("tiny", anatomy_names=plain.config.anatomy_names, text={"vocab_size": len(tok)},
                         heads={"uncertainty": {}})
    with torch.no_grad():
        model.heads["uncertainty"].image.weight.mul_(30.0)
    save_pretrained(model, tok, tmp_path / "unc")
    assert main(["--run", str(tmp_path / "unc"), "--data", str(prep), "--min-positives", "1", "--n-boot", "10",
                 "--no-record"]) == 0
    out = capsys.readouterr().out
    assert "discrimination AUROC(right, confidence)" in out and "| confidence bin |" in out
    with pytest.raises(ValueError, match="uncertainty head"):
        main(["--run", str(model_dir), "--data", str(prep), "--min-positives", "1", "--no-record"])
