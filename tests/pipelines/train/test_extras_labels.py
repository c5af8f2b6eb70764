"""Dataset extras label_text / label_text_structured on a real (synthetic, preprocessed) cohort where two cases
have labels but no report; and the fvlm-unified recipe end to end: 3 CPU steps on the tiny preset through
``fvlm train`` (a subprocess: DeepSpeed keeps global state), then ``fvlm evaluate --prompts learned``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fvlm.prompts import LABEL_MAX_LEN
from pipelines.cases.dataset import CaseDataset
from pipelines.train.extras.labels import STRUCTURED_PROB, anatomy_tasks, label_texts

ROOT = Path(__file__).resolve().parents[3]
SIZE = (32, 64, 64)
LABEL_ONLY = 2  # cases whose report is dropped


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    from fvlm.model import train_wordpiece
    from pipelines.cases.format import corpus_texts
    from pipelines.cli import main
    from pipelines.synth.cohort import SynthConfig, make_cohort
    from tests.pipelines.preprocess.preprocess_fixtures import fast_config

    root = tmp_path_factory.mktemp("labelcohort")
    make_cohort(root / "synth", SynthConfig(cases=8, seed=1, format="nifti", normal_share=0.25))
    synth = root / "synth"
    with open(synth / "reports.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    key = next(iter(rows[0]))
    label_only = sorted(r[key] for r in rows)[:LABEL_ONLY]
    kept = [r for r in rows if r[key] not in label_only]
    with open(root / "reports.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(kept)
    assert main(["preprocess", str(synth / "images"), str(root / "prep"), "--masks", str(synth / "segmentations"),
                 "--reports", str(root / "reports.csv"), "--labels", str(synth / "labels.csv"),
                 "--config", str(fast_config(root)), "--case-id", "key", "--no-progress"]) == 0
    prep = root / "prep"
    with open(synth / "labels.csv", newline="", encoding="utf-8") as f:
        labels = {r["case_id"]: r for r in csv.DictReader(f)}
    tok = train_wordpiece(corpus_texts(prep), vocab_size=400, min_frequency=1)
    return {"root": root, "prep": prep, "label_only": label_only, "labels": labels, "tok": tok}


def _dataset(cohort, extras=(), train=False) -> CaseDataset:
    return CaseDataset(cohort["prep"], cohort["tok"], crop_size_zyx=SIZE, mode="resize", train=train,
                       max_text_len=32, extras=extras)


def test_label_texts_format_and_augmentation():
    tasks = ((("Emphysema", ("Low-attenuation areas.", "Emphysema is present.")), ("Lung nodule", ())),
             (("Cardiomegaly", ("The heart is enlarged.",)),))
    labels = np.array([[1, 1], [0, 0]], dtype=np.float32)
    assert label_texts(labels, tasks) == ["emphysema, lung nodule.", "no abnormality."]
    rng = np.random.default_rng(0)
    seen = [label_texts(labels, tasks, rng, 1.0)[0] for _ in range(20)]
    assert set(seen) == {"emphysema, lung nodule. Low-attenuation areas.", "emphysema, lung nodule. Emphysema is present."}
    assert label_texts(labels, tasks, rng, 1.0)[1] == "no abnormality."  # nothing positive: never augmented
    assert label_texts(labels, tasks, None, 1.0) == label_texts(labels, tasks)  # no generator: evaluation


def test_label_only_cases_are_left_out_without_the_extra_and_kept_with_it(cohort):
    plain = _dataset(cohort)
    assert sorted(c for c, _ in plain.skipped) == cohort["label_only"]
    assert len(plain) == 8 - LABEL_ONLY and not plain.allow_label_only
    with_labels = _dataset(cohort, extras=("label_text",))
    assert with_labels.allow_label_only and with_labels.skipped == [] and len(with_labels) == 8


def test_label_only_sample_has_no_text_and_its_ground_truth_labels(cohort):
    ds = _dataset(cohort, extras=("label_text",))
    tasks = anatomy_tasks(ds)
    tok = cohort["tok"]
    seen_label_only = 0
    for i, cid in enumerate(ds.case_ids):
        s = ds[i]
        assert tuple(s["label_input_ids"].shape) == (15, LABEL_MAX_LEN) == tuple(s["label_attention_mask"].shape)
        assert s["has_report"].dtype == torch.bool and s["has_report"].shape == ()
        truth = cohort["labels"][cid]
        if cid in cohort["label_only"]:
            seen_label_only += 1
            assert not bool(s["has_report"])
            assert int(s["attention_mask"].sum()) == 0 and int(s["report_attention_mask"].sum()) == 0
            for k, names in enumerate(ds.task_names):
                want = [float(truth[t]) for t in names]
                assert s["anatomy_labels"][k, :len(names)].tolist() == want, (cid, ds.anatomy_names[k])
                assert bool(s["normal"][k]) == (not any(want))
        else:
            assert bool(s["has_report"]) and int(s["attention_mask"].sum()) > 0
        # the label sentence of each anatomy is built from anatomy_labels and the catalog titles
        texts = label_texts(s["anatomy_labels"].numpy(), tasks)
        enc = tok(texts, padding="max_length", truncation=True, max_length=LABEL_MAX_LEN)
        assert s["label_input_ids"].tolist() == enc["input_ids"]
    assert seen_label_only == LABEL_ONLY
    # a label-only case with a finding says so in its label sentence, with the catalog title
    lung = ds.anatomy_names.index("lung")
    for cid in cohort["label_only"]:
        s = ds[ds.case_ids.index(cid)]
        pos = [tasks[lung][t][0] for t, v in enumerate(s["anatomy_labels"][lung].tolist()) if v > 0.5]
        want = ", ".join(p[:1].lower() + p[1:] for p in pos) + "." if pos else "no abnormality."
        assert label_texts(s["anatomy_labels"].numpy(), tasks)[lung] == want


def test_structured_augmentation_in_training_only(cohort):
    plain = _dataset(cohort, extras=("label_text",))
    evaluation = _dataset(cohort, extras=("label_text_structured",))
    for i in range(len(plain)):  # no generator in evaluation: identical label sentences
        assert torch.equal(plain[i]["label_input_ids"], evaluation[i]["label_input_ids"])
    train = _dataset(cohort, extras=("label_text_structured",), train=True)
    changed = total = 0
    for epoch in range(3):
        for i in range(len(train)):
            a, b = train[(epoch, i)], plain[i]
            positive = (a["anatomy_labels"] > 0.5).any(-1)  # (A,)
            diff = (a["label_input_ids"] != b["label_input_ids"]).any(-1)  # (A,)
            assert not (diff & ~positive).any()  # only anatomies with a finding are augmented
            changed += int(diff.sum())
            total += int(positive.sum())
            assert torch.equal(a["image"], train[(epoch, i)]["image"])  # reproducible
    assert total > 0 and 0.25 * total < changed < 0.75 * total, (changed, total, STRUCTURED_PROB)


@pytest.mark.slow
def test_fvlm_unified_trains_three_steps_and_evaluates_with_learned_prompts(cohort, tmp_path, pytestconfig):
    run = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(pytestconfig.cache.mkdir("torch_extensions")))}
    sets = ["model.preset=tiny", "deepspeed=zero0", "data.mode=resize", "data.crop_size=[32, 64, 64]",
            "data.batch_size=4", "optim.max_steps=3", "optim.warmup_steps=1", "checkpoint.every=100",
            "logging.tensorboard=false", "logging.progress=false", "logging.every=1"]
    cmd = [sys.executable, "-m", "pipelines", "train", "--config", "fvlm-unified", "--data", str(cohort["prep"]),
           "--output", str(run), "--workers", "0"] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert {"disease_aware", "label_unified", "label_unified_text"} <= set(r)
        assert all(np.isfinite(r[k]) for k in ("loss", "disease_aware", "label_unified", "label_unified_text"))

    from fvlm.model import load_pretrained

    model, _ = load_pretrained(run / "model")
    head = model.heads["prompt_context"]
    assert tuple(head.context.shape) == (15, 8, model.config.text.hidden_size) and head.text_augment

    from pipelines.cli import main

    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(cohort["prep"]), "--tasks", "fvlm54",
                 "--prompts", "learned", "--n-boot", "20", "--min-positives", "1", "--threshold-split", "0",
                 "--output", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["info"]["prompts"] == "learned" and doc["info"]["templates"] == "learned"
    assert doc["info"]["n_cases"] == 8  # zero-shot scoring needs no report: label-only cases are evaluated too
    # the same export scored with the catalog prompts gives other scores
    out2 = tmp_path / "eval-catalog"
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(cohort["prep"]), "--tasks", "fvlm54",
                 "--n-boot", "20", "--min-positives", "1", "--threshold-split", "0", "--output", str(out2)]) == 0
    learned = json.loads((out / "metrics.json").read_text())
    catalog = json.loads((out2 / "metrics.json").read_text())
    assert catalog["info"]["prompts"] == "catalog"
    aucs = [[r["auc"] for r in csv.DictReader(open(folder / "metrics.csv"))] for folder in (out, out2)]
    assert aucs[0] != aucs[1]
