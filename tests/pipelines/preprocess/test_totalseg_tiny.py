"""The real TotalSegmentator path, run end to end on a real CT with tiny random weights.

Every other segmenter test replaces ``totalsegmentator()`` with a stand-in; here nothing is replaced:
``fvlm preprocess --segmenter totalsegmentator --device cpu --weights-dir W`` runs TotalSegmentator's API,
its 6 mm crop model and its 3 mm ``fast`` model through nnU-Net's predictor, on
``../shared/data/totalsegmentator/example_ct_sm.nii.gz``, with tiny randomly initialised nnU-Net v2 models
laid out as the released weights are (``totalseg_weights.py``). The label maps are noise; what is checked
is the plumbing: the weights folder fvlm passes is the one used, nothing is fetched from the network, the
label map comes back on the image's grid (size, origin, spacing, direction) in TotalSegmentator ``total``
ids restricted to the anatomy set's classes, a reoriented copy of the image gets the same label map in
physical space, the five-part full-resolution model maps part ids to ``total`` ids, and the case is
written.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("totalsegmentator", reason="TotalSegmentator is not installed (the 'segment' extra)")
pytest.importorskip("nnunetv2", reason="nnU-Net v2 is not installed (the 'segment' extra)")

from anatomy.catalog import load_anatomy_set  # noqa: E402
from anatomy.totalseg import total_class_ids, total_classes  # noqa: E402
from pipelines.cli import main  # noqa: E402
from pipelines.preprocess.segment import TotalSegmentatorSegmenter, create_segmenter  # noqa: E402
from tests.pipelines.preprocess.preprocess_fixtures import case_json, fast_config, manifest  # noqa: E402
from tests.pipelines.preprocess.totalseg_weights import total_task_table, write_tiny_total_weights  # noqa: E402

DATA = Path(__file__).resolve().parents[4] / "shared" / "data" / "totalsegmentator"
CT = DATA / "example_ct_sm.nii.gz"

pytestmark = [
    pytest.mark.slow,
    # expected: the tiny plans use the released v2.0.0 weights' plans format, which nnU-Net 2.6 converts on load
    pytest.mark.filterwarnings("ignore:Detected old nnU-Net plans format:UserWarning"),
    pytest.mark.skipif(not CT.is_file(), reason=f"real CT {CT.name} not found in {DATA} (shared data not mounted)"),
]

ANATOMY = "fvlm15"


def _classes() -> list[str]:
    aset = load_anatomy_set(ANATOMY)
    return sorted({c for a in aset.anatomies for c in a.classes})


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny models for every ``total`` task (fast 297, crop 298, parts 291-295), favouring fvlm15's classes."""
    return write_tiny_total_weights(tmp_path_factory.mktemp("totalseg") / "weights", task_ids=sorted(total_task_table()),
                                    favour=_classes())


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory):
    """TotalSegmentator's home (config.json, default weights) in a temporary folder, and every internet
    (IPv4/IPv6) connection attempt from this process recorded and refused; local sockets (multiprocessing's
    listeners) pass."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("totalseg-home")
    mp.setenv("TOTALSEG_HOME_DIR", str(home))
    mp.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    attempts: list[object] = []

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guard(real):
        def connect(self, address, *args, **kwargs):
            if self.family in (socket.AF_INET, socket.AF_INET6):
                attempts.append(address)
                raise OSError(f"network access attempted during a test: {address!r}")
            return real(self, address, *args, **kwargs)

        return connect

    mp.setattr(socket.socket, "connect", guard(real_connect))
    mp.setattr(socket.socket, "connect_ex", guard(real_connect_ex))
    yield {"home": home, "attempts": attempts}
    mp.undo()


@pytest.fixture(scope="module")
def e2e(weights: Path, offline: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One ``fvlm preprocess --segmenter totalsegmentator`` run of the real CT; the images the segmenter got
    and the label maps it returned are recorded by a spy around the real ``segment``."""
    tmp = tmp_path_factory.mktemp("e2e")
    seen: list[tuple[sitk.Image, sitk.Image]] = []
    real = TotalSegmentatorSegmenter.segment

    def spy(self, image, key):
        labels = real(self, image, key)
        seen.append((image, labels))
        return labels

    mp = pytest.MonkeyPatch()
    mp.setattr(TotalSegmentatorSegmenter, "segment", spy)
    try:
        rc = main(["preprocess", str(CT), str(tmp / "out"), "--segmenter", "totalsegmentator", "--device", "cpu",
                   "--weights-dir", str(weights), "--anatomy", ANATOMY, "--config", str(fast_config(tmp)),
                   "--case-id", "key", "--no-progress"])
    finally:
        mp.undo()
    return {"rc": rc, "out": tmp / "out", "seen": seen}


def _same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def test_preprocess_runs_totalsegmentator_end_to_end(e2e: dict, weights: Path, offline: dict) -> None:
    assert e2e["rc"] == 0
    (row,) = manifest(e2e["out"])
    assert row["status"] == "ok", row
    meta = case_json(e2e["out"], row["case_id"])
    assert meta["segmenter"] == {"name": "totalsegmentator", "task": "total", "fast": True, "device": "cpu",
                                 "roi_subset": _classes()}
    case = e2e["out"] / "cases" / row["case_id"]
    anatomy = np.load(case / "anatomy.npy")
    n_anatomies = len(load_anatomy_set(ANATOMY).anatomies)
    assert anatomy.any() and anatomy.max() <= n_anatomies  # anatomy-set ids, grouped from the total ids
    assert any(a["present"] for a in meta["anatomies"])
    assert str(weights) not in (case / "case.json").read_text()  # no local path in the case
    # Nothing was fetched: no connection attempt, nothing written into TotalSegmentator's home but its config.
    assert offline["attempts"] == []
    assert sorted(p.name for p in offline["home"].iterdir()) == ["config.json"]
    assert not list(weights.rglob("*.zip"))


def test_label_map_is_on_the_image_grid_in_total_ids(e2e: dict) -> None:
    (image, labels), = e2e["seen"]
    assert image.GetSize() == (122, 101, 30)  # the CT as fvlm read it, handed to the segmenter unchanged
    _same_grid(labels, image)
    assert labels.GetPixelID() == sitk.sitkUInt8
    ids = set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist())
    wanted = {total_class_ids()[c] for c in _classes()}
    assert ids - {0}, "the tiny model's prediction came back empty"
    assert ids <= wanted | {0}, f"ids outside the requested classes: {sorted(ids - wanted - {0})}"
    assert {total_classes()[i] for i in ids - {0}} <= set(_classes())


def test_reoriented_image_gets_the_same_label_map_in_physical_space(e2e: dict, weights: Path, offline: dict) -> None:
    """TotalSegmentator brings every image to the closest canonical orientation before the network, so a
    copy with axes permuted and flipped (same voxels in physical space) must get the same labels back:
    a transposed or mirrored hand-over between fvlm and TotalSegmentator would break this."""
    (image, labels), = e2e["seen"]
    moved = sitk.Flip(sitk.PermuteAxes(image, [1, 0, 2]), [True, False, True])
    assert moved.GetDirection() != image.GetDirection()
    seg = create_segmenter("totalsegmentator", classes=_classes(), fast=True, device="cpu", weights_dir=weights)
    moved_labels = seg.segment(moved, None)
    _same_grid(moved_labels, moved)
    back = sitk.Resample(moved_labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(labels))
    assert offline["attempts"] == []


def test_full_resolution_part_models_map_to_total_ids(weights: Path, offline: dict) -> None:
    """``--no-fast``: the 1.5 mm model is five part models whose label ids are not ``total`` ids (aorta is 2 in
    the cardiac part, 52 in ``total``); with ``roi_subset`` only the parts holding requested classes run."""
    image = sitk.RegionOfInterest(sitk.ReadImage(str(CT)), (48, 40, 12), (37, 30, 9))  # a small block: 1.5 mm is 8x
    seg = create_segmenter("totalsegmentator", classes=["aorta"], fast=False, device="cpu", weights_dir=weights)
    labels = seg.segment(image, None)
    _same_grid(labels, image)
    ids = set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist())
    assert ids == {0, total_class_ids()["aorta"]} or ids == {total_class_ids()["aorta"]}, sorted(ids)
    assert offline["attempts"] == []


def test_weights_folder_is_used_by_nnunet_even_after_another_one(weights: Path, offline: dict, tmp_path: Path) -> None:
    """nnU-Net reads its folders from the environment once, at import; a second weights folder in the same
    process must still be the one used (the first one is gone)."""
    import shutil

    other = write_tiny_total_weights(tmp_path / "other", task_ids=(297, 298), favour=["liver"], seed=7)
    image = sitk.RegionOfInterest(sitk.ReadImage(str(CT)), (40, 32, 12), (40, 30, 9))
    seg = create_segmenter("totalsegmentator", classes=["liver"], fast=True, device="cpu", weights_dir=other)
    first = sitk.GetArrayFromImage(seg.segment(image, None))
    assert set(np.unique(first).tolist()) <= {0, total_class_ids()["liver"]}
    moved = tmp_path / "moved"
    shutil.move(str(other), str(moved))
    seg = create_segmenter("totalsegmentator", classes=["liver"], fast=True, device="cpu", weights_dir=moved)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seg.segment(image, None)), first)
    json.dumps(seg.describe())  # options stay plain data (pickled into workers, written to case.json)
