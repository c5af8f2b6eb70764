"""``fvlm demo``: the config loader's errors, and a tiny end-to-end run whose every stage hands its outputs to
the next (synth -> preprocess -> train -> evaluate -> comparison), then resumes without redoing work.

The AUC values of a 3-step run mean nothing; the test checks the plumbing, not the quality (that is
``benchmarks/quality.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from pipelines.demo.config import DemoError, load_demo_config

TINY = {
    "name": "ci",
    "description": "CI: the whole path on a handful of cases.",
    "cohort": {"train_cases": 8, "test_cases": 8, "seed": 5, "normal_share": 0.2, "max_findings": 6},
    "workers": {"synth": 1, "preprocess": 1},
    "preprocess": "demo",
    "recipes": ["fvlm-disease", "clip"],
    "comparisons": [["fvlm-disease", "clip"]],
    "seeds": [0],
    "train": {"workers": 0, "overrides": {
        "deepspeed": "zero0", "model.preset": "tiny", "data.mode": "resize", "data.crop_size": [32, 64, 64],
        "data.batch_size": 4, "optim.max_steps": 3, "optim.warmup_steps": 1, "checkpoint.every": 100,
        "logging.tensorboard": False, "logging.progress": False}},
    "evaluate": {"n_boot": 20, "min_positives": 1, "threshold_split": 0.0, "probe": True, "probe_folds": 2},
}


def _write(tmp_path: Path, data: dict, name: str = "demo.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data), encoding="utf-8")
    return p


def test_shipped_configs_load() -> None:
    d = load_demo_config("default")
    assert d.recipes == ("fvlm-disease", "clip") and d.comparisons == (("fvlm-disease", "clip"),)
    q = load_demo_config("quality")
    assert {"clip", "fvlm-plain", "fvlm", "fvlm-disease"} <= set(q.recipes) and len(q.seeds) >= 3
    assert {"fvlm-uncertainty", "fvlm-unified", "fvlm-region", "fvlm-region-disease", "fvlm-entity",
            "fvlm-entity-disease"} <= set(q.recipes)  # the related methods: rows beside the fVLM recipes
    # the same budget for every recipe: one list of overrides, the seed appended last
    assert q.train_args("clip", 2)[-2:] == ["--set", "seed=2"]
    # the quality benchmark uses the demo's geometry and schedule shape, with half its steps
    assert [o for o in d.train_overrides if "max_steps" not in o] == [o for o in q.train_overrides if "max_steps" not in o]


@pytest.mark.parametrize("change, words", [
    ({"colour": 1}, ["unknown field", "colour"]),
    ({"recipes": ["clip", "clip"]}, ["twice"]),
    ({"comparisons": [["fvlm", "clip"]]}, ["'fvlm' is not one of the recipes"]),
    ({"seeds": [1, 1]}, ["seeds"]),
    ({"cohort": {"train_cases": 0}}, ["train_cases"]),
    ({"train": {"overrides": {"optim.lr": -1}}}, ["recipe 'fvlm-disease'", "optim.lr"]),
    ({"train": {"overrides": {"seed": 3}}}, ["seeds"]),
    ({"evaluate": {"probe": "yes"}}, ["probe", "true or false"]),
    ({"evaluate": {"probe_folds": 1}}, ["probe_folds"]),
    ({"evaluate": {"visible": "no-such-geometry"}}, ["visible", "no-such-geometry"]),
    ({"evaluate": {"view": "sideways"}}, ["view", "windows or center"]),
])
def test_config_errors_name_the_field(tmp_path: Path, change: dict, words: list[str]) -> None:
    with pytest.raises(DemoError) as e:
        load_demo_config(_write(tmp_path, {**TINY, **change}))
    for w in words:
        assert w in str(e.value)


@pytest.mark.slow
def test_tiny_demo_end_to_end_then_resume(tmp_path: Path, capsys, monkeypatch) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = tmp_path / "demo"
    cfg = _write(tmp_path, TINY)
    assert main(["demo", str(out), "--config", str(cfg)]) == 0
    printed = capsys.readouterr().out

    # synth -> preprocess: every case of each cohort preprocessed, with labels and parsed reports
    for split in ("train", "test"):
        assert json.loads((out / "cohort" / split / "cohort.json").read_text())["cases"] == 8
        index = [json.loads(x) for x in (out / "prep" / split / "index.jsonl").read_text().splitlines()]
        assert len(index) == 8
    # preprocess -> train -> evaluate: each recipe trained its 3 steps on the training cohort, exported, and
    # was scored on all held-out cases
    for recipe in ("fvlm-disease", "clip"):
        run = out / "runs" / recipe
        assert (run / "model" / "model.safetensors").is_file()
        steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
        assert max(steps) == 3
        assert yaml.safe_load((run / "config.yaml").read_text())["objectives"][0]["name"] == (
            "disease_aware" if recipe == "fvlm-disease" else "clip_global")
        metrics = json.loads((out / "eval" / recipe / "metrics.json").read_text())
        assert metrics["info"]["n_cases"] == 8 and metrics["info"]["data"] == str(out / "prep" / "test")
        assert (out / "eval" / recipe / "report.html").is_file()
        # the whole-scan recipe is read from its global embedding (readout auto), the others per anatomy
        assert metrics["info"]["readout"] == ("global" if recipe == "clip" else "anatomy")
        # evaluate.probe: the linear probe fitted on the training cohort
        assert metrics["probe"]["data"] == str(out / "prep" / "train") and metrics["probe"]["n_train_cases"] == 8

    # evaluate -> comparison: summary.json, report.html and the printed table agree with the evaluations
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["recipes"]) == ["fvlm-disease", "clip"]
    for recipe in ("fvlm-disease", "clip"):
        metrics = json.loads((out / "eval" / recipe / "metrics.json").read_text())
        block = summary["recipes"][recipe]
        assert block["macro_auc"] == metrics["macro"]["auc"]
        assert set(block["per_anatomy"]) == set(metrics["per_anatomy"])
        assert block["probe_macro_auc"] == metrics["probe"]["macro"]["auc"]
        assert block["text_ceiling_macro_auc"] == metrics["text_ceiling"]["macro"]["auc"]
        assert recipe in printed
    (comp,) = summary["comparisons"]
    assert comp["recipe"] == "fvlm-disease" and comp["reference"] == "clip"
    assert summary["recipes"]["clip"]["macro_auc"] is not None
    assert comp["delta"] == pytest.approx(summary["recipes"]["fvlm-disease"]["macro_auc"]
                                          - summary["recipes"]["clip"]["macro_auc"])
    html = (out / "report.html").read_text()
    assert 'href="eval/fvlm-disease/report.html"' in html and 'href="eval/clip/report.html"' in html
    assert "MACRO" in printed and str((out / "report.html").resolve()) in printed
    assert "text readout ceiling" in printed  # the ceilings' rows under MACRO
    if any(summary["recipes"][r]["probe_macro_auc"] is not None for r in summary["recipes"]):
        assert "linear probe" in printed and "linear probe" in (out / "report.md").read_text()

    # a second run keeps the cohorts, the finished training runs and their evaluations, and reports the same
    assert main(["demo", str(out), "--config", str(cfg)]) == 0
    again = capsys.readouterr().out
    assert again.count(": done earlier (8 cases") == 2 and again.count("trained earlier") == 2
    assert "fvlm train" not in again
    assert again.count("evaluated earlier") == 2
    assert json.loads((out / "summary.json").read_text())["recipes"] == summary["recipes"]

    # a change to the code that scores (its digest) evaluates afresh; so does a broken cache
    import pipelines.demo.run as demo_run

    monkeypatch.setattr(demo_run, "_source_digest", lambda: "changed")
    (out / "eval" / "clip" / "evaluation.pkl").write_bytes(b"not a pickle")
    assert main(["demo", str(out), "--config", str(cfg)]) == 0
    third = capsys.readouterr().out
    assert "evaluated earlier" not in third and third.count("evaluated in") == 2
    assert json.loads((out / "summary.json").read_text())["recipes"] == summary["recipes"]


def test_headline_tasks_are_the_included_ones_visible_at_the_geometry(tmp_path: Path) -> None:
    from pipelines.demo.summary import headline_tasks
    from pipelines.synth.findings import findings_config

    cfg = load_demo_config(_write(tmp_path, {**TINY, "evaluate": {**TINY["evaluate"], "visible": "bench-6x6x10"}}))
    tasks = findings_config().tasks
    seen = [n for n in tasks if tasks[n].visible][:3]
    hidden = [n for n in tasks if tasks[n].visible is False][:2]
    assert seen and hidden
    assert headline_tasks(cfg, hidden + seen) == seen
    plain = load_demo_config(_write(tmp_path, TINY, "plain.yaml"))
    assert headline_tasks(plain, hidden + seen) == hidden + seen


def test_evaluation_cache_reader_runs_no_code_from_the_file(tmp_path: Path) -> None:
    """A cache file handed over with the folder cannot run code: only numpy arrays, plain containers and this
    project's dataclasses are rebuilt; anything else is refused (and the evaluation recomputed)."""
    import io
    import pickle

    import numpy as np

    from fvlm.metrics import TaskMetrics
    from pipelines.demo.run import _EvaluationUnpickler

    marker = tmp_path / "ran"

    class Crafted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        _EvaluationUnpickler(io.BytesIO(pickle.dumps(Crafted()))).load()
    assert not marker.exists()

    fields = {f: None for f in TaskMetrics.__dataclass_fields__}
    data = {"scores": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.int64(3), "ids": {"a", "b"},
            "metrics": TaskMetrics(**fields)}
    back = _EvaluationUnpickler(io.BytesIO(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))).load()
    assert np.array_equal(back["scores"], data["scores"]) and back["n"] == 3 and back["ids"] == {"a", "b"}
    assert isinstance(back["metrics"], TaskMetrics)
