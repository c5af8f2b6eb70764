"""The model's view of a case (``pipelines.cases.view``) through ``CaseDataset``: image and anatomy map on one
grid in crop and resize modes, flipped and not; laterality of the texts follows a left-right flip; the recipe's
data section reaches the dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipelines.cases.augment import swap_laterality
from pipelines.cases.dataset import CaseDataset
from pipelines.cases.hashing import text_id
from pipelines.cases.view import as_windows, resize_view, window, windows

WINDOW = (-1150.0, 350.0)
STEP_HU = 50.0  # label k is stored as HU -1100 + 50 k: inside the window, so the window is linear on it


def _decode(image01: torch.Tensor) -> torch.Tensor:
    """The label a windowed image voxel encodes (image = its own label map)."""
    hu = image01.double() * (WINDOW[1] - WINDOW[0]) + WINDOW[0]
    return torch.round((hu + 1100.0) / STEP_HU).to(torch.int64)


def _slabs(shape: tuple[int, int, int], axis: int, n_labels: int, rng: np.random.Generator) -> np.ndarray:
    """Labels 1..n in slabs of random thickness along ``axis`` (neighbours differ by 1: a trilinear sample
    between two slabs rounds to the label of the nearer voxel centre, so the exact agreement is testable)."""
    cuts = np.sort(rng.choice(np.arange(1, shape[axis]), size=n_labels - 1, replace=False))
    lab1d = np.searchsorted(cuts, np.arange(shape[axis]), side="right") + 1
    view = [1, 1, 1]
    view[axis] = shape[axis]
    return np.broadcast_to(lab1d.reshape(view), shape).astype(np.uint8).copy()


@pytest.fixture()
def label_image_case(prep: Path, tmp_path: Path):
    """A copy of the prepared cohort whose first case's image IS its anatomy map (slabs along a given axis)."""

    def make(axis: int, seed: int = 0) -> Path:
        out = tmp_path / f"prep-{axis}-{seed}"
        shutil.copytree(prep, out)
        cid = sorted(p.name for p in (out / "cases").iterdir())[0]
        folder = out / "cases" / cid
        shape = np.load(folder / "anatomy.npy").shape
        anat = _slabs(shape, axis, min(15, shape[axis] - 1), np.random.default_rng(seed))
        np.save(folder / "anatomy.npy", anat)
        np.save(folder / "image.npy", (-1100.0 + STEP_HU * anat).astype(np.int16))
        case = json.loads((folder / "case.json").read_text())
        counts = np.bincount(anat.reshape(-1), minlength=16)
        for k, entry in enumerate(case["anatomies"], 1):  # every slab's anatomy present, its voxels counted
            entry["present"], entry["crop_voxels"] = bool(counts[k]), int(counts[k])
        (folder / "case.json").write_text(json.dumps(case))
        return out

    return make


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("mode,size", [("resize", (8, 12, 10)), ("resize", (24, 40, 56)), ("crop", (6, 12, 12))])
@pytest.mark.parametrize("flipped", [False, True])
def test_image_and_anatomy_agree_voxel_for_voxel(label_image_case, tok, axis, mode, size, flipped) -> None:
    data = label_image_case(axis)
    ds = CaseDataset(data, tok, crop_size_zyx=size, mode=mode, train=True, seed=1,
                     flip_axes=(0, 1, 2), flip_prob=1.0 if flipped else 0.0)
    i = 0  # the rewritten case
    for epoch in range(2):
        s = ds[(epoch, i)]
        decoded = _decode(s["image"][0])
        assert s["anatomy"].max() >= 2  # several slabs in view
        assert torch.equal(decoded, s["anatomy"]), (
            f"{int((decoded != s['anatomy']).sum())} of {decoded.numel()} voxels disagree")


#: Three input windows that each keep every slab's HU (-1100 .. -350) inside, so each channel decodes exactly.
WINDOWS = ((-1150.0, 350.0), (-1200.0, -300.0), (-2000.0, 1000.0))


@pytest.mark.parametrize("mode,size", [("resize", (24, 40, 56)), ("crop", (6, 12, 12))])
@pytest.mark.parametrize("flipped", [False, True])
def test_each_input_window_is_one_channel_on_the_anatomy_grid(label_image_case, tok, mode, size, flipped) -> None:
    """``windows_hu``: one channel per window, each ``clip((hu - lo) / (hi - lo), 0, 1)`` of the same voxels,
    flipped with the anatomy map (a flip of the spatial axes, never of the channel axis)."""
    data = label_image_case(2)
    ds = CaseDataset(data, tok, crop_size_zyx=size, mode=mode, train=True, seed=1, flip_axes=(0, 1, 2),
                     flip_prob=1.0 if flipped else 0.0, windows_hu=[list(w) for w in WINDOWS])
    s = ds[(0, 0)]
    assert s["image"].shape == (len(WINDOWS), *size)
    for c, (lo, hi) in enumerate(WINDOWS):
        hu = s["image"][c].double() * (hi - lo) + lo
        decoded = torch.round((hu + 1100.0) / STEP_HU).to(torch.int64)
        assert torch.equal(decoded, s["anatomy"]), f"channel {c} ({lo}, {hi}) is off the anatomy grid"


def test_windows_clip_each_channel_and_accept_one_window() -> None:
    hu = np.array([[-2000.0, -160.0, 40.0, 240.0, 3000.0]], dtype=np.float32)
    out = windows(hu, [(-160, 240), (-1150, 350)])  # (2, 1, 5)
    assert out.shape == (2, 1, 5)
    assert torch.allclose(out[0, 0], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert torch.allclose(out[1, 0], window(hu, (-1150, 350))[0])
    assert as_windows((-160, 240)) == ((-160.0, 240.0),) and windows(hu, (-160, 240)).shape == (1, 1, 5)


def _centroids(lab: np.ndarray, n: int) -> np.ndarray:
    idx = np.indices(lab.shape).reshape(3, -1).astype(np.float64)
    flat = lab.reshape(-1)
    out = np.full((n, 3), np.nan)
    for k in range(1, n + 1):
        m = flat == k
        if m.any():
            out[k - 1] = idx[:, m].mean(1)
    return out


def test_resized_anatomy_centroids_stay_put(prep: Path) -> None:
    """Each anatomy's centroid in the resized map lies where the resampling puts the original centroid,
    c_out = (c_in + 0.5) n_out / n_in - 0.5, on average within 0.1 output voxel on every axis (the old
    ``nearest`` rule was about half a voxel off in z at these zooms)."""
    offsets = []
    for cid in sorted(p.name for p in (prep / "cases").iterdir()):
        anat = np.load(prep / "cases" / cid / "anatomy.npy")
        hu = np.load(prep / "cases" / cid / "image.npy")
        for size in ((8, 16, 16), (12, 24, 20)):
            _, lab = resize_view(hu, anat, size, WINDOW)
            scale = np.array(size, dtype=np.float64) / np.array(anat.shape)
            want = (_centroids(anat, 15) + 0.5) * scale - 0.5
            got = _centroids(lab.numpy(), 15)
            ok = ~np.isnan(want).any(1) & ~np.isnan(got).any(1)
            offsets.append(got[ok] - want[ok])
    off = np.concatenate(offsets)  # (anatomies x cases x sizes, 3)
    assert len(off) > 40
    assert np.all(np.abs(off.mean(0)) < 0.1), off.mean(0)


def test_swap_laterality_words() -> None:
    text = "A nodule in the Right upper lobe; LEFT kidney normal. Rt hilum. Bright, leftover, dextrocardia."
    assert swap_laterality(text) == ("A nodule in the Left upper lobe; RIGHT kidney normal. Lt hilum. "
                                     "Bright, leftover, dextrocardia.")
    assert swap_laterality(swap_laterality(text)) == text


def test_default_has_no_flips(prep: Path, tok) -> None:
    plain = CaseDataset(prep, tok, crop_size_zyx=(8, 16, 16), mode="resize", train=True, seed=2)
    ev = CaseDataset(prep, tok, crop_size_zyx=(8, 16, 16), mode="resize", train=False)
    assert plain.flip_axes == ()
    for i in range(len(plain)):
        for epoch in range(3):
            s = plain[(epoch, i)]
            assert torch.equal(s["image"], ev[i]["image"]) and torch.equal(s["input_ids"], ev[i]["input_ids"])


def _texts(ds: CaseDataset, i: int) -> list[str]:
    parsed = ds.case_json(i)["report"]["parsed"]["anatomies"]
    return [str((parsed.get(n) or {}).get("text") or "") for n in ds.anatomy_names]


@pytest.mark.parametrize("swap", [True, False])
def test_left_right_flip_swaps_the_texts_laterality(prep: Path, tok, swap: bool) -> None:
    kw = dict(crop_size_zyx=(8, 16, 16), mode="resize", train=True, seed=2, max_text_len=32)
    plain = CaseDataset(prep, tok, **kw)
    lr = CaseDataset(prep, tok, flip_axes=(2,), flip_prob=1.0, swap_laterality=swap, **kw)
    sided = 0
    for i in range(len(plain)):
        p, f = plain[i], lr[i]
        assert torch.equal(f["image"], torch.flip(p["image"], (3,)))
        texts = _texts(plain, i)
        want = [swap_laterality(t) for t in texts] if swap else texts
        sided += sum(w != t for w, t in zip(want, texts))
        enc = tok(want, padding="max_length", truncation=True, max_length=32)
        assert torch.equal(f["input_ids"], torch.tensor(enc["input_ids"]))
        assert f["text_id"].tolist() == [text_id(t) for t in want]
        assert torch.equal(f["normal"], p["normal"]) and torch.equal(f["anatomy_labels"], p["anatomy_labels"])
    if swap:
        assert sided > 0  # the cohort's reports do name sides


def test_recipe_data_section_reaches_the_dataset(prep: Path, tok) -> None:
    from pipelines.config.recipe import RecipeError, load_recipe
    from pipelines.train.trainer import build_data

    cfg = load_recipe("tiny", ["data.flip_axes=[2]", "data.flip_prob=0.25", "data.swap_laterality=false",
                               "data.min_visible_fraction=0.3"])
    ds = build_data(cfg, prep, tok, 32).dataset
    assert (ds.flip_axes, ds.flip_prob, ds.swap_laterality, ds.min_visible_fraction) == ((2,), 0.25, False, 0.3)
    assert build_data(load_recipe("tiny"), prep, tok, 32).dataset.flip_axes == ()
    for bad in ("data.flip_axes=[3]", "data.flip_axes=[2, 2]", "data.flip_prob=1.5", "data.swap_laterality=3"):
        with pytest.raises(RecipeError, match="data\\."):
            load_recipe("tiny", [bad])


def test_truncated_text_shares_name_the_anatomies_a_short_limit_cuts(prep: Path, tok) -> None:
    from pipelines.cases.dataset import truncated_text_shares

    short = truncated_text_shares(CaseDataset(prep, tok, crop_size_zyx=(8, 16, 16), mode="resize", max_text_len=8))
    long = truncated_text_shares(CaseDataset(prep, tok, crop_size_zyx=(8, 16, 16), mode="resize", max_text_len=4096))
    assert set(short) == set(long) and short["lung"][0] > 0.5 and short["lung"][1] > 8
    assert all(share == 0.0 for share, _ in long.values())
    assert {n: m for n, (_, m) in short.items()} == {n: m for n, (_, m) in long.items()}


def test_measuring_text_lengths_does_not_warn_about_the_tokenizer_limit(prep: Path, capfd) -> None:
    """The full-length count behind the truncated shares is a measurement, not model input: no "Token indices
    sequence length is longer than the specified maximum" warning in every training log."""
    from fvlm.model.tokenizer import train_wordpiece
    from pipelines.cases.dataset import truncated_text_shares
    from pipelines.cases.format import corpus_texts

    short_limit = train_wordpiece(corpus_texts(prep), vocab_size=400, max_length=4)  # every text is longer
    capfd.readouterr()
    shares = truncated_text_shares(CaseDataset(prep, short_limit, crop_size_zyx=(8, 16, 16), mode="resize",
                                               max_text_len=8))
    assert shares and "Token indices sequence length" not in capfd.readouterr().err


@pytest.mark.parametrize("mode,size", [("crop", (6, 12, 12)), ("crop", (64, 10, 200)), ("resize", (8, 16, 16))])
@pytest.mark.parametrize("windows_hu", [None, ((-1000.0, 400.0), (-160.0, 240.0))])
def test_predict_sees_what_the_evaluation_dataset_sees(prep: Path, tok, tmp_path: Path, mode, size,
                                                        windows_hu) -> None:
    """Issue 18: ``fvlm predict``'s input of an in-memory crop (``crop_input``: the ``Crop`` of ``crop_case``)
    and the evaluation dataset's sample (``CaseDataset(train=False)``) of the same case written by preprocess
    are one view, bit for bit: image channels, anatomy map (an anatomy marked not present erased) and cut."""
    import SimpleITK as sitk

    from pipelines.predict.run import crop_input
    from pipelines.preprocess.crop import AnatomyStats

    data = tmp_path / "prep"
    shutil.copytree(prep, data)
    cid = sorted(p.name for p in (data / "cases").iterdir())[0]
    path = data / "cases" / cid / "case.json"
    case = json.loads(path.read_text())
    gone = next(a for a in case["anatomies"] if a["present"])
    gone["present"] = False  # the view erases it from the map, in both paths
    path.write_text(json.dumps(case))

    ds = CaseDataset(data, tok, crop_size_zyx=size, mode=mode, train=False, allow_label_only=True,
                     windows_hu=windows_hu)
    i = ds.case_ids.index(cid)
    sample = ds[i]
    crop = SimpleNamespace(image=sitk.ReadImage(str(data / "cases" / cid / "image.nii.gz")),
                           anatomy=sitk.ReadImage(str(data / "cases" / cid / "anatomy.nii.gz")),
                           stats=[AnatomyStats(**a) for a in case["anatomies"]])
    inp = crop_input(crop, ds.anatomy_names, {"mode": mode, "crop_size_zyx": list(size)},
                     windows_hu or ds.case_window(case), case["intensity"]["pad_hu"])
    assert inp.image.shape == (1, 1 if windows_hu is None else 2, *size) and inp.image.dtype == torch.float32
    assert torch.equal(inp.image[0], sample["image"])
    assert torch.equal(inp.anatomy[0], sample["anatomy"])
    assert torch.equal(inp.cut[0], sample["cut"])
    assert not (sample["anatomy"] == ds.anatomy_names.index(gone["name"]) + 1).any()
    if mode == "crop":
        assert inp.crop_shape_zyx == tuple(np.load(data / "cases" / cid / "image.npy").shape)
