"""Synthetic phantoms (`fvlm synth`, image half): geometry, anatomy, HU, every fvlm54 finding, determinism.

Visibility of a finding is judged against the same case rendered without it (same seed: the anatomy, the
texture and the noise do not depend on the findings requested), so differences are the signature alone.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
from scipy import ndimage

from anatomy.catalog import load_anatomy_set, load_task_catalog
from anatomy.totalseg import total_class_ids, total_classes
from pipelines.synth.findings import findings_config, sample_tasks
from pipelines.synth.phantom import render_case
from pipelines.synth.shapes import Capsules, Grid
from pipelines.synth.signatures import SIGNATURES

FULL_RANGE_SEED = 0  # a case whose scan range holds all 15 anatomies
CUT_SEED = 4  # a case whose scan range misses the pelvis (no urinary bladder)
PHASES = ("native", "portal_venous")
SHAPE_SIGNATURES = {"enlarge", "dilate", "hernia", "fracture"}
ANATOMY = load_anatomy_set("fvlm15")
IDS = total_class_ids()
TASKS = list(findings_config().tasks)

# Mean HU inside each anatomy's label mask, (native, contrast-enhanced) ranges.
HU_RANGES = {
    "lung": ((-900, -780), (-900, -780)),
    "heart": ((25, 60), (80, 220)),
    "aorta": ((20, 60), (110, 380)),
    "esophagus": ((-350, 80), (-350, 90)),
    "liver": ((50, 85), (70, 140)),
    "gallbladder": ((0, 45), (0, 60)),
    "spleen": ((38, 65), (90, 160)),
    "pancreas": ((25, 65), (70, 140)),
    "kidney": ((5, 40), (90, 200)),
    "adrenal_gland": ((5, 45), (35, 80)),
    "stomach": ((-350, 20), (-350, 30)),
    "small_bowel": ((-120, 60), (-120, 70)),
    "colon": ((-550, -50), (-550, -40)),
    "urinary_bladder": ((0, 45), (0, 50)),
    "bone": ((250, 600), (250, 600)),
}


@lru_cache(maxsize=None)
def _case(seed: int, tasks: tuple[str, ...] = (), phase: str | None = None, sex: str | None = None):
    return render_case(np.random.default_rng(seed), list(tasks), phase=phase, sex=sex)


def _mask(vol, anatomy: str) -> np.ndarray:
    return np.isin(vol.labels, [IDS[c] for c in ANATOMY[anatomy].classes])


# ------------------------------------------------------------------------------------------------ geometry
def test_small_case_geometry() -> None:
    vol = _case(FULL_RANGE_SEED)
    nz, ny, nx = vol.hu.shape
    assert (ny, nx) == (128, 128) and 56 <= nz <= 72
    assert vol.hu.dtype == np.int16 and vol.labels.dtype == np.uint8 and vol.lesions.dtype == np.uint8
    assert vol.hu.shape == vol.labels.shape == vol.lesions.shape
    sz, sy, sx = vol.spacing
    assert sy == sx and 2.5 <= sx <= 4.5 and 5.0 <= sz <= 13.0
    assert all(np.isfinite(vol.origin)) and vol.sex in ("M", "F")
    assert vol.hu.min() >= -1024 and vol.hu.max() <= 3071
    assert abs(float(vol.hu[:, :3, :3].mean()) + 1000) < 30, "air around the patient"
    assert not vol.lesions.any() and vol.findings == []
    assert set(np.unique(vol.labels)) <= {0, *total_classes()}


def test_all_fvlm15_anatomies_in_a_full_range_case() -> None:
    vol = _case(FULL_RANGE_SEED)
    assert vol.anatomies_in_view == tuple(ANATOMY.names)
    voxel_ml = float(np.prod(vol.spacing)) / 1000
    for a in ANATOMY.names:
        assert _mask(vol, a).sum() * voxel_ml > 2.0, f"{a} too small"
    for cls in ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
                "lung_lower_lobe_right", "trachea", "heart", "atrial_appendage_left", "pulmonary_vein", "duodenum",
                "vertebrae_T1", "vertebrae_L5", "vertebrae_S1", "sacrum", "rib_left_6", "rib_right_11", "sternum",
                "costal_cartilages"):
        assert (vol.labels == IDS[cls]).any(), f"class {cls} missing"
    # Plausible sizes (mL) of a few organs.
    for a, lo, hi in (("liver", 900, 2600), ("spleen", 80, 400), ("heart", 350, 1100), ("lung", 3500, 9000)):
        assert lo < _mask(vol, a).sum() * voxel_ml < hi, a


@pytest.mark.parametrize("phase", PHASES)
def test_mean_hu_per_anatomy(phase: str) -> None:
    vol = _case(FULL_RANGE_SEED, phase=phase)
    assert vol.contrast == (phase != "native")
    for a, ranges in HU_RANGES.items():
        lo, hi = ranges[phase != "native"]
        mean = float(vol.hu[_mask(vol, a)].mean())
        assert lo <= mean <= hi, f"{phase}: mean HU of {a} is {mean:.0f}, expected [{lo}, {hi}]"


def test_patient_and_scan_vary_between_cases() -> None:
    vols = [_case(s) for s in range(4)]
    assert len({v.spacing for v in vols}) == 4
    assert len({v.hu.shape[0] for v in vols}) > 1
    assert len({v.origin for v in vols}) == 4


# ------------------------------------------------------------------------------------------------ findings
def test_findings_config_covers_fvlm54() -> None:
    catalog = load_task_catalog("fvlm54")
    cfg = findings_config()
    assert sorted(cfg.tasks) == sorted(catalog.names)
    for t in catalog.tasks:
        spec = cfg.tasks[t.name]
        assert spec.anatomy == t.anatomy and spec.signature in SIGNATURES and spec.prevalence > 0


def _visible(task: str, vol, normal, lesion: np.ndarray) -> None:
    spec = findings_config().tasks[task]
    anat = _mask(vol, spec.anatomy)
    if spec.signature in SHAPE_SIGNATURES:
        if spec.signature == "fracture":
            cls = IDS[f"vertebrae_{vol.findings[0].location.split()[0]}"]
            ratio = (vol.labels == cls).sum() / (normal.labels == cls).sum()
        else:  # organ volume around the lesion, abnormal / normal
            box = ndimage.find_objects(lesion.astype(np.uint8))[0]
            ratio = anat[box].sum() / _mask(normal, spec.anatomy)[box].sum()
        assert ratio >= 1.1 or ratio <= 0.9, f"{task}: organ volume ratio {ratio:.2f} is not visibly changed"
        return
    diff = vol.hu[lesion].astype(float) - normal.hu[lesion]
    assert np.abs(diff).mean() >= 15, f"{task}: lesion differs from the normal case by {np.abs(diff).mean():.1f} HU"
    if spec.signature == "blob" and "tissues" in spec.params and not spec.params.get("pv"):
        # A focal lesion against the normal organ tissue it replaced (its part inside the organ).
        inside = lesion & np.isin(normal.labels, [IDS[c] for c in spec.params["host"]])
        if inside.sum() >= 4:
            contrast = float(vol.hu[inside].mean() - normal.hu[inside].mean())
            assert abs(contrast) >= 15, f"{task}: lesion vs the {spec.anatomy} tissue it replaced: {contrast:.1f} HU"


@pytest.mark.slow  # one phantom per finding and phase
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("task", TASKS)
def test_finding_lands_in_its_anatomy_and_shows(task: str, phase: str) -> None:
    spec = findings_config().tasks[task]
    vol = _case(FULL_RANGE_SEED, (task,), phase, "M")
    if spec.requires_contrast and phase == "native":
        assert vol.findings == [] and not vol.lesions.any(), "a contrast-only finding must be dropped in a native case"
        return
    normal = _case(FULL_RANGE_SEED, (), phase, "M")
    assert [f.task for f in vol.findings] == [task]
    f = vol.findings[0]
    assert f.anatomy == spec.anatomy and f.lesion_id == 1
    assert 0.0 <= f.severity <= 1.0 and f.side in (None, "left", "right", "bilateral")
    assert f.size_mm is None or f.size_mm > 0
    assert f.location is None or (isinstance(f.location, str) and f.location.strip())
    lesion = vol.lesions == 1
    assert lesion.any() and set(np.unique(vol.lesions)) == {0, 1}
    dist = ndimage.distance_transform_edt(~_mask(vol, spec.anatomy), sampling=vol.spacing)
    assert dist[lesion].max() <= 10.0, f"{task}: lesion reaches {dist[lesion].max():.1f} mm outside {spec.anatomy}"
    _visible(task, vol, normal, lesion)


def test_several_findings_in_one_case() -> None:
    tasks = ("lung_nodule", "hepatic_cyst", "renal_cyst", "aortic_calcification", "osteopenia", "splenomegaly")
    vol = _case(FULL_RANGE_SEED, tasks, "portal_venous", "M")
    assert [f.task for f in vol.findings] == list(tasks)
    assert [f.lesion_id for f in vol.findings] == list(range(1, len(tasks) + 1))
    for f in vol.findings:
        assert (vol.lesions == f.lesion_id).any()


def test_out_of_view_finding_is_dropped() -> None:
    normal = _case(CUT_SEED)
    assert "urinary_bladder" not in normal.anatomies_in_view and "lung" in normal.anatomies_in_view
    vol = _case(CUT_SEED, ("bladder_stone", "lung_nodule"))
    assert [f.task for f in vol.findings] == ["lung_nodule"]
    assert vol.findings[0].lesion_id == 1 and set(np.unique(vol.lesions)) == {0, 1}


def test_prostatomegaly_dropped_in_female() -> None:
    vol = _case(FULL_RANGE_SEED, ("prostatomegaly",), None, "F")
    assert vol.sex == "F" and vol.findings == [] and not vol.lesions.any()
    assert not (vol.labels == IDS["prostate"]).any()


def test_contrast_only_finding_makes_a_drawn_phase_enhanced() -> None:
    vol = _case(FULL_RANGE_SEED, ("aortic_dissection",))
    assert vol.contrast and [f.task for f in vol.findings] == ["aortic_dissection"]


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="unknown synthetic finding"):
        render_case(np.random.default_rng(0), ["lung_nodul"])
    with pytest.raises(ValueError, match="size"):
        render_case(np.random.default_rng(0), [], size="huge")
    with pytest.raises(ValueError, match="sex"):
        render_case(np.random.default_rng(0), [], sex="X")
    with pytest.raises(ValueError, match="normal_share"):
        sample_tasks(np.random.default_rng(0), normal_share=1.5)


# ------------------------------------------------------------------------------------------------ determinism
def test_same_seed_same_bytes_different_seed_different() -> None:
    tasks = ["lung_nodule", "pleural_effusion", "hepatomegaly"]
    a = render_case(np.random.default_rng(21), tasks)
    b = render_case(np.random.default_rng(21), tasks)
    c = render_case(np.random.default_rng(22), tasks)
    for name in ("hu", "labels", "lesions"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes()
    assert a.findings == b.findings and a.spacing == b.spacing and a.origin == b.origin
    assert a.hu.shape != c.hu.shape or not np.array_equal(a.hu, c.hu)


def test_findings_do_not_change_the_anatomy_elsewhere() -> None:
    a, n = _case(FULL_RANGE_SEED, ("lung_nodule",), "native", "M"), _case(FULL_RANGE_SEED, (), "native", "M")
    changed = a.hu != n.hu
    assert changed.any() and not (changed & (a.lesions == 0)).any()


# ------------------------------------------------------------------------------------------------ sampler
def test_sample_tasks_prevalence_exclusions_and_limits() -> None:
    cfg = findings_config()
    rng = np.random.default_rng(5)
    draws = [sample_tasks(rng, normal_share=0.3, max_findings=4) for _ in range(600)]
    normal = sum(not d for d in draws) / len(draws)
    assert 0.24 <= normal <= 0.36
    assert max(len(d) for d in draws) == 4 and any(len(d) > 1 for d in draws)
    for d in draws:
        assert len(set(d)) == len(d) and set(d) <= set(cfg.tasks)
        for group in cfg.exclusive:
            assert len(group & set(d)) <= 1, f"exclusive findings drawn together: {group & set(d)}"
    counts = {t: sum(t in d for d in draws) for t in cfg.tasks}
    assert counts["lung_nodule"] > counts["aortic_dissection"]
    assert sample_tasks(np.random.default_rng(3)) == sample_tasks(np.random.default_rng(3))
    assert all(sample_tasks(np.random.default_rng(i), normal_share=1.0) == [] for i in range(5))
    assert all(sample_tasks(np.random.default_rng(i), normal_share=0.0, max_findings=1) for i in range(5))


# ------------------------------------------------------------------------------------------------ shapes
def test_capsule_distance_matches_plain_reference() -> None:
    grid = Grid((9, 11, 13), (3.0, 2.0, 2.0), (-12.0, -10.0, -12.0))
    caps = Capsules.path([[-8.0, -5.0, -6.0], [4.0, 3.0, 5.0], [9.0, -4.0, 10.0]], [3.0, 5.0, 2.0])
    box = grid.box(*caps.bounds())
    d = caps.sdf(*grid.coords(box), pad=50.0)
    x, y, z = (a.astype(float) for a in np.broadcast_arrays(*grid.coords(box)))
    p = np.stack([x, y, z], axis=-1)
    ref = np.full(x.shape, np.inf)
    for a, b, ra, rb in zip(caps.a, caps.b, caps.ra, caps.rb):
        t = np.clip(((p - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)
        ref = np.minimum(ref, np.linalg.norm(p - (a + t[..., None] * (b - a)), axis=-1) - (ra + (rb - ra) * t))
    np.testing.assert_allclose(d, ref, atol=1e-3)
