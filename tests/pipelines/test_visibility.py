"""Visibility as data (issue 15): the findings config's ``visible``/``visibility`` fields, and the measures of
``benchmarks/visibility.py`` (lesion volume and CNR, effect AUC, token-set separation) on hand-made volumes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from configs.paths import config_dir
from benchmarks.visibility import (GEOMETRIES, MIN_CNR, MIN_EFFECT_AUC, MIN_VOLUME_VOX, contained_in, effect_auc,
                                   lesion_measures, main, purity, token_counts, token_sets, verdict, write_config)
from pipelines.synth.findings import VISIBILITY_MEASURES, findings_config, load_findings_config, visible_tasks

SOURCE = config_dir() / "synth" / "findings.yaml"


def _config_with(tmp_path: Path, task: str, **fields) -> Path:
    data = yaml.safe_load(SOURCE.read_text(encoding="utf-8"))
    for k, v in fields.items():
        if v is None:
            data["tasks"][task].pop(k, None)
        else:
            data["tasks"][task][k] = v
    path = tmp_path / "findings.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ the config
def test_loader_reads_visibility_and_keeps_it_out_of_params(tmp_path: Path) -> None:
    vis = {"geometry": "bench-6x6x10", "measure": "cnr", "value": 2.5, "volume_vox": 3.0}
    cfg = load_findings_config(_config_with(tmp_path, "lung_nodule", visible=True, visibility=vis))
    spec = cfg.tasks["lung_nodule"]
    assert spec.visible is True and spec.visibility == vis
    assert "visible" not in spec.params and "visibility" not in spec.params
    cfg = load_findings_config(_config_with(tmp_path, "lung_nodule", visible=None, visibility=None))
    assert cfg.tasks["lung_nodule"].visible is None and cfg.tasks["lung_nodule"].visibility is None


@pytest.mark.parametrize("fields, message", [
    ({"visible": "yes"}, "visible must be true or false"),
    ({"visible": True, "visibility": {"geometry": "g", "measure": "snr", "value": 1.0}}, "visibility.measure"),
    ({"visible": True, "visibility": {"geometry": "g", "measure": "cnr", "value": "high"}}, "visibility.value"),
    ({"visible": True, "visibility": {"geometry": "g", "measure": "cnr", "value": True}}, "visibility.value"),
    ({"visible": True, "visibility": {"geometry": "", "measure": "cnr", "value": 1.0}}, "visibility.geometry"),
    ({"visible": True, "visibility": {"geometry": "g", "measure": "cnr", "value": 1.0, "p": 0.1}}, "unknown keys"),
    ({"visible": True, "visibility": [1, 2]}, "must be a mapping"),
    ({"visible": None, "visibility": {"geometry": "g", "measure": "cnr", "value": 1.0}}, "without visible"),
])
def test_loader_rejects_bad_visibility_naming_file_and_task(tmp_path: Path, fields: dict, message: str) -> None:
    path = _config_with(tmp_path, "hepatic_cyst", **fields)
    with pytest.raises(ValueError, match=message) as err:
        load_findings_config(path)
    assert str(path) in str(err.value) and "'hepatic_cyst'" in str(err.value)


def test_project_config_verdicts_follow_the_rule() -> None:
    """Each measured task's ``visible`` is what the rule gives for its recorded value."""
    measured = {n: s for n, s in findings_config().tasks.items() if s.visibility is not None}
    for name, spec in measured.items():
        v = spec.visibility
        assert v["measure"] in VISIBILITY_MEASURES
        if v["measure"] == "cnr":
            expected = v["value"] >= MIN_CNR and v.get("volume_vox", 0.0) >= MIN_VOLUME_VOX
        else:
            expected = v["value"] >= MIN_EFFECT_AUC
        assert spec.visible == expected, f"{name}: visible={spec.visible} but {v}"
    for geometry in {s.visibility["geometry"] for s in measured.values()}:
        tasks = visible_tasks(geometry)
        assert tasks == [n for n, s in measured.items() if s.visible and s.visibility["geometry"] == geometry]
    assert set(visible_tasks("no-such-geometry")) == set()


def test_write_config_edits_only_the_visibility_fields(tmp_path: Path) -> None:
    path = tmp_path / "findings.yaml"
    path.write_text(SOURCE.read_text(encoding="utf-8"), encoding="utf-8")
    verdicts = {"lung_nodule": (True, {"geometry": "g1", "measure": "cnr", "value": 4.2, "volume_vox": 6.5}),
                "pancreatic_duct_dilatation": (False, {"geometry": "g1", "measure": "effect_auc", "value": 0.61})}
    assert sorted(write_config(path, verdicts)) == sorted(verdicts)
    once = path.read_text(encoding="utf-8")
    assert all(len(line) <= 120 for line in once.splitlines() if "visib" in line)
    cfg = load_findings_config(path)
    for name, (visible, vis) in verdicts.items():
        assert cfg.tasks[name].visible is visible and cfg.tasks[name].visibility == vis
        assert cfg.tasks[name].params == findings_config().tasks[name].params
    verdicts["lung_nodule"] = (False, {"geometry": "g2", "measure": "cnr", "value": 0.4, "volume_vox": 0.5})
    write_config(path, verdicts)  # replaces, does not add
    assert load_findings_config(path).tasks["lung_nodule"].visibility["geometry"] == "g2"
    assert path.read_text(encoding="utf-8").count("visible:") == once.count("visible:")


# ------------------------------------------------------------------------------------------------ measures
def _planted(contrast: float, noise: float, fraction_value: float = 1.0):
    """A 20^3 host (value 0.5 + a +-noise checkerboard: std exactly ``noise``) with a 4^3 lesion of mean
    0.5 + ``contrast`` at [8, 12) on each axis; (image, fraction, host)."""
    z, y, x = np.indices((20, 20, 20))
    image = 0.5 + noise * np.where((z + y + x) % 2 == 0, 1.0, -1.0)
    fraction = np.zeros((20, 20, 20), np.float32)
    fraction[8:12, 8:12, 8:12] = fraction_value
    image[fraction > 0] = 0.5 + contrast
    return image.astype(np.float32), fraction, np.ones((20, 20, 20), bool)


def test_cnr_and_volume_of_a_planted_cube() -> None:
    image, fraction, host = _planted(contrast=0.03, noise=0.01)
    volume, cnr = lesion_measures(image, fraction, host, (10.0, 6.0, 6.0))
    assert volume == pytest.approx(64.0)
    assert cnr == pytest.approx(3.0, rel=0.01)
    image, fraction, host = _planted(contrast=-0.005, noise=0.01)  # darker, half a std: below the rule
    assert lesion_measures(image, fraction, host, (10.0, 6.0, 6.0))[1] == pytest.approx(0.5, rel=0.01)


def test_partial_volume_lesion_and_out_of_view() -> None:
    image, fraction, host = _planted(contrast=0.03, noise=0.01, fraction_value=0.25)
    volume, cnr = lesion_measures(image, fraction, host, (6.0, 6.0, 6.0))
    assert volume == pytest.approx(16.0)  # 64 voxels a quarter lesion each
    assert cnr == pytest.approx(3.0, rel=0.01)  # no core >= 0.5: the most lesion-filled voxel
    assert lesion_measures(image, np.zeros_like(fraction), host, (6.0, 6.0, 6.0)) == (0.0, 0.0)
    tiny_host = np.zeros_like(host)
    tiny_host[8:12, 8:12, 8:12] = True  # the lesion fills its host: nothing to compare against
    assert math.isnan(lesion_measures(image, np.where(tiny_host, 1.0, 0.0), tiny_host, (6.0, 6.0, 6.0))[1])


def test_background_is_the_host_interior_near_the_lesion() -> None:
    image, fraction, _ = _planted(contrast=0.03, noise=0.01)
    host = np.zeros((20, 20, 20), bool)
    host[6:14, 6:14, 6:14] = True  # one voxel of host around the interior [7, 13) that holds the lesion
    image[~host] = 0.0  # air around the host, and far host voxels: not counted
    edge = host & ~np.pad(np.ones((6, 6, 6), bool), 7)
    image[edge] = 0.2  # partial volume on the host's edge (within 30 mm: 3 voxels of 10 mm)
    assert lesion_measures(image, fraction, host, (10.0, 10.0, 10.0))[1] == pytest.approx(3.0, rel=0.01)


def test_effect_auc_folds_and_needs_cases() -> None:
    auc, se = effect_auc(np.array([5.0, 6, 7]), np.array([1.0, 2, 3, 4]))
    assert auc == 1.0 and se == 0.0
    assert effect_auc(np.array([1.0, 2, 3]), np.array([5.0, 6, 7]))[0] == 1.0  # smaller in positives
    assert effect_auc(np.array([1.0, 2, 3, 4]), np.array([1.0, 2, 3, 4]))[0] == 0.5
    assert math.isnan(effect_auc(np.array([1.0, 2]), np.array([1.0, 2, 3]))[0])


def test_verdict_rule() -> None:
    assert verdict("lesion", 3.0, 2.0, float("nan")) == (True, {"measure": "cnr", "value": 2.0, "volume_vox": 3.0})
    assert verdict("lesion", 0.5, 9.0, 0.6)[0] is False  # too small to own a voxel
    assert verdict("lesion", 50.0, 0.1, 0.9) == (True, {"measure": "effect_auc", "value": 0.9})
    assert verdict("organ", 500.0, float("nan"), 0.7) == (False, {"measure": "effect_auc", "value": 0.7})


# ------------------------------------------------------------------------------------------------ token sets
def test_token_sets_and_containment() -> None:
    lab = np.zeros((16, 16, 16), np.uint8)  # tokens of 8^3: a 2 x 2 x 2 grid, index 4 z + 2 y + x
    lab[:8] = 1  # anatomy 1: the four tokens of z < 8
    lab[1:3, 1:3, 1:3] = 2  # anatomy 2: inside token 0 only
    lab[6:10, 0:2, 0:2] = 3  # anatomy 3: tokens 0 and 4 (straddles z = 8)
    lab[12:14, 12:14, 12:14] = 4  # anatomy 4: token 7 alone
    sets = token_sets(lab, (8, 8, 8), 4)
    assert sets.shape == (5, 8)
    assert np.flatnonzero(sets[1]).tolist() == [0, 1, 2, 3]
    assert np.flatnonzero(sets[2]).tolist() == [0]
    assert np.flatnonzero(sets[3]).tolist() == [0, 4]
    assert np.flatnonzero(sets[4]).tolist() == [7]
    assert contained_in(sets) == {1: [], 2: [1, 3], 3: [], 4: []}
    counts = token_counts(lab, (8, 8, 8), 4)
    assert counts.sum() == lab.size and counts[3].tolist() == [8, 0, 0, 0, 8, 0, 0, 0]
    # token 0: 496 voxels of 1, 8 of 2, 8 of 3; token 4: 8 of 3; token 7: 8 of 4
    assert purity(counts) == pytest.approx([(4 * 512 - 16) / (4 * 512), 8 / 512, 16 / 520, 1.0])


def test_geometries_are_consistent() -> None:
    assert GEOMETRIES["A"].grid_zyx == (4, 4, 4) and GEOMETRIES["B"].grid_zyx == (9, 6, 8)
    assert GEOMETRIES["B"].name == "bench-6x6x10"
    with pytest.raises(ValueError, match="not a multiple of token size"):
        type(GEOMETRIES["B"])("x", (6.0, 6.0, 10.0), (0, 0, 0), (70, 48, 64), (70, 48, 64), (8, 8, 8), True)


# ------------------------------------------------------------------------------------------------ end to end
def test_entry_point_on_a_tiny_cohort(tmp_path: Path) -> None:
    from pipelines.synth.cohort import SynthConfig, make_cohort

    cohort = tmp_path / "cohort"
    make_cohort(cohort, SynthConfig(cases=2, seed=3, format="nifti", normal_share=0.0, max_findings=4,
                                    prevalence_mix=1.0))
    main([str(cohort), "--out", str(tmp_path / "out"), "--geometries", "A,B"])
    out = json.loads((tmp_path / "out" / "visibility.json").read_text(encoding="utf-8"))
    assert out["cases"] == 2 and set(out["geometries"]) == {"A", "B"}
    truth = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((cohort / "truth").glob("*.json"))]
    tasks = {f["task"] for t in truth for f in t["findings"]}
    for g in out["geometries"].values():
        assert set(g["tasks"]) == tasks and set(g["anatomies"]) >= {"lung", "liver", "bone"}
        for r in g["tasks"].values():
            assert r["volume_vox"] >= 0 and isinstance(r["visible"], bool)
    assert (tmp_path / "out" / "benchmarks.md").read_text(encoding="utf-8").startswith("### ")


def test_resize_is_the_loaders() -> None:
    """The benchmark's resize (torch only) equals the training loader's resize mode (MONAI)."""
    from benchmarks.visibility import WINDOW_HU, resize
    from pipelines.cases.view import resize_view, window

    rng = np.random.default_rng(0)
    hu = rng.uniform(-1100, 400, (13, 21, 17)).astype(np.float32)
    lab = rng.integers(0, 16, (13, 21, 17)).astype(np.uint8)
    img_ref, lab_ref = resize_view(hu, lab, (8, 16, 16), WINDOW_HU)  # image (1, Z, Y, X): one window
    img, lab_out, fr = resize(window(hu, WINDOW_HU).numpy(), lab, {1: hu}, (8, 16, 16))
    np.testing.assert_allclose(img, img_ref[0].numpy(), atol=1e-6)
    np.testing.assert_array_equal(lab_out, lab_ref.numpy())
    assert fr[1].shape == (8, 16, 16)
