"""The supervised-ceiling probe's plumbing: overrides of a variant, the training subset, the macro AUCs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from benchmarks.ceiling_probe import VARIANTS, VIEWS, final_loss, macro, subset, train_overrides


def _sets(args: list[str]) -> dict:
    assert args[::2] == ["--set"] * (len(args) // 2)
    return {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args[1::2])}


def test_variants_change_one_thing_of_the_configs_budget() -> None:
    from pipelines.demo.config import load_demo_config

    cfg = load_demo_config("quality-core")
    base = _sets(train_overrides(cfg.raw, VARIANTS["base"][1], 0))
    assert base == {**{k: v for k, v in cfg.raw["train"]["overrides"].items()}, "seed": 0}
    x4 = _sets(train_overrides(cfg.raw, VARIANTS["steps-x4"][1], 1))
    assert x4["optim.max_steps"] == 4 * base["optim.max_steps"] and x4["seed"] == 1
    assert {k: v for k, v in x4.items() if k not in ("optim.max_steps", "seed")} == \
        {k: v for k, v in base.items() if k not in ("optim.max_steps", "seed")}
    assert _sets(train_overrides(cfg.raw, VARIANTS["steps-x16"][1], 0))["optim.max_steps"] == 16 * base["optim.max_steps"]
    anat = _sets(train_overrides(cfg.raw, VARIANTS["anatomy-input"][1], 0))
    vision = anat["model.overrides"]["vision"]
    assert vision["anatomy_channels"] == 4 and vision["stem"] == base["model.overrides"]["vision"]["stem"]
    assert anat["model.overrides"]["text"] == base["model.overrides"]["text"]
    wide = _sets(train_overrides(cfg.raw, VARIANTS["wide"][1], 0))["model.overrides"]["vision"]
    assert (wide["width"], wide["depth"]) == (128, 4)
    assert wide["patch_size"] == base["model.overrides"]["vision"]["patch_size"]
    assert "anatomy_channels" not in base["model.overrides"]["vision"]  # merging never leaks into the config
    assert _sets(train_overrides(cfg.raw, VARIANTS["lr-x3"][1], 0))["optim.lr"] == pytest.approx(3 * base["optim.lr"])
    assert _sets(train_overrides(cfg.raw, VARIANTS["no-clip"][1], 0))["optim.grad_clip"] == 0.0
    assert _sets(train_overrides(cfg.raw, VARIANTS["batch-x2"][1], 0))["data.batch_size"] == 2 * base["data.batch_size"]


def test_subset_links_the_first_cases(tmp_path: Path) -> None:
    prep = tmp_path / "prep"
    ids = [f"c{i}" for i in range(5)]
    for c in ids:
        (prep / "cases" / c).mkdir(parents=True)
        (prep / "cases" / c / "image.npy").write_bytes(b"x")
    (prep / "index.jsonl").write_text("".join(json.dumps({"case_id": c}) + "\n" for c in ids))
    (prep / "manifest.jsonl").write_text("".join(json.dumps({"case_id": c, "status": "ok"}) + "\n"
                                                 for c in reversed(ids)))
    (prep / "preprocess.json").write_text("{}")
    out = subset(prep, tmp_path / "sub", 3)
    assert sorted(p.name for p in (out / "cases").iterdir()) == ids[:3]
    assert (out / "cases" / "c1" / "image.npy").read_bytes() == b"x"
    assert [json.loads(x)["case_id"] for x in (out / "index.jsonl").read_text().splitlines()] == ids[:3]
    assert {json.loads(x)["case_id"] for x in (out / "manifest.jsonl").read_text().splitlines()} == set(ids[:3])
    assert subset(prep, tmp_path / "sub", 3) == out  # made once


def test_macro_counts_tasks_with_enough_of_both_classes(tmp_path: Path) -> None:
    def task(auc, pos, neg):
        return {"auc": {"auc": auc}, "n_pos": pos, "n_neg": neg}

    m = {"tasks": {"a": task(0.9, 10, 90), "b": task(0.5, 10, 90), "c": task(0.99, 2, 98), "d": task(0.7, 10, 90)}}
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    vis, allm, n = macro(tmp_path / "metrics.json", {"a", "c"}, 5)
    assert (vis, n) == (0.9, 1) and allm == pytest.approx((0.9 + 0.5 + 0.7) / 3)
    vis, allm, n = macro(tmp_path / "metrics.json", set(), 50)
    assert n == 0 and vis != vis and allm != allm  # nothing counts: NaN, not an error


def test_final_loss_averages_the_last_steps(tmp_path: Path) -> None:
    rows = [{"step": s, "loss": float(s)} for s in range(10, 110, 10)] + [{"step": 100, "eval": 1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert final_loss(tmp_path, last=30) == pytest.approx((80 + 90 + 100) / 3)


def test_view_variants_take_the_base_steps_voxels_and_tokens() -> None:
    import math

    from pipelines.demo.config import load_demo_config

    cfg = load_demo_config("quality-core")
    base = _sets(train_overrides(cfg.raw, VARIANTS["base"][1], 0))
    for name, (size, _) in VIEWS.items():
        views = _sets(train_overrides(cfg.raw, VARIANTS[name][1], 0))
        assert views["data.crop_size"] == views["model.overrides"]["vision"]["image_size"] == list(size)
        assert views["optim.max_steps"] == base["optim.max_steps"]
        # the same patch size, so the same voxels per step are the same tokens per step
        assert "patch_size" not in VARIANTS[name][1]["model.overrides"]["vision"]
        assert views["data.batch_size"] * math.prod(size) == base["data.batch_size"] * math.prod(base["data.crop_size"])
