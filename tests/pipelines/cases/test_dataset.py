"""The dataset: samples of the packed preprocess output (``pipelines.cases.dataset``), and the loader over it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.cases.dataset import SAMPLE_KEYS, CaseDataset, DataConfig
from pipelines.cases.format import DataError, corpus_texts
from pipelines.cases.hashing import normalise_text, text_id
from pipelines.cases.loader import ResumableSampler, build_loader

WINDOW = (-1150.0, 350.0)


def _case(prep: Path, cid: str) -> dict:
    return json.loads((prep / "cases" / cid / "case.json").read_text())


def _arrays(prep: Path, cid: str) -> tuple[np.ndarray, np.ndarray]:
    return np.load(prep / "cases" / cid / "image.npy"), np.load(prep / "cases" / cid / "anatomy.npy")


def _window(hu: np.ndarray) -> np.ndarray:
    return np.clip((hu.astype(np.float32) - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)


def test_keys_shapes_dtypes_in_both_modes(prep: Path, tok) -> None:
    for mode, size in (("crop", (8, 16, 24)), ("resize", (8, 16, 16))):
        ds = CaseDataset(prep, tok, crop_size_zyx=size, mode=mode, max_text_len=24, report_max_len=40)
        a, k = ds.num_anatomies, ds.max_tasks
        assert (a, k) == (15, 8) and len(ds) == 4
        s = ds[0]
        assert tuple(s) == SAMPLE_KEYS
        expect = {
            "image": ((1, *size), torch.float32), "anatomy": (size, torch.int64),
            "input_ids": ((a, 24), torch.int64), "attention_mask": ((a, 24), torch.int64),
            "report_input_ids": ((40,), torch.int64), "report_attention_mask": ((40,), torch.int64),
            "cut": ((a,), torch.bool), "normal": ((a,), torch.bool), "text_id": ((a,), torch.int64),
            "anatomy_labels": ((a, k), torch.float32), "case_id": ((), torch.int64), "index": ((), torch.int64),
        }
        for key, (shape, dtype) in expect.items():
            assert tuple(s[key].shape) == tuple(shape) and s[key].dtype == dtype, key
        assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
        assert 0 <= s["anatomy"].min() and s["anatomy"].max() <= a
        assert (s["attention_mask"].sum(-1) >= 2).all()  # every anatomy has a text ([CLS] ... [SEP])


def test_hu_window_and_air_padding(prep: Path, tok) -> None:
    ds = CaseDataset(prep, tok, crop_size_zyx=(1, 1, 1), mode="crop", train=False)
    cid = ds.case_ids[0]
    hu, anat = _arrays(prep, cid)
    assert _case(prep, cid)["intensity"]["window_hu"] == list(WINDOW)
    exact = CaseDataset(prep, tok, crop_size_zyx=hu.shape, mode="crop", train=False)[0]
    np.testing.assert_allclose(exact["image"][0].numpy(), _window(hu), atol=1e-6)
    big = tuple(n + 4 for n in hu.shape)
    padded = CaseDataset(prep, tok, crop_size_zyx=big, mode="crop", train=False)[0]
    inner = padded["image"][0, 2:-2, 2:-2, 2:-2].numpy()
    np.testing.assert_allclose(inner, _window(hu), atol=1e-6)
    assert np.allclose(padded["image"][0, :2].numpy(), _window(np.array(-1024)))  # air
    assert (padded["anatomy"][:2] == 0).all()


def test_flips_move_image_and_anatomy_together(prep: Path, tok) -> None:
    kw = dict(crop_size_zyx=(10, 20, 24), mode="crop", train=True, seed=3)
    plain = CaseDataset(prep, tok, flip_prob=0.0, **kw)
    flipped = CaseDataset(prep, tok, flip_prob=1.0, flip_axes=(0, 1, 2), **kw)
    for i in range(len(plain)):
        p, f = plain[i], flipped[i]  # same (seed, epoch, index): same crop origin
        assert torch.equal(f["image"], torch.flip(p["image"], (1, 2, 3)))
        assert torch.equal(f["anatomy"], torch.flip(p["anatomy"], (0, 1, 2)))
        for lab in p["anatomy"].unique().tolist():  # each anatomy keeps its intensities
            a = p["image"][0][p["anatomy"] == lab].double().mean()
            b = f["image"][0][f["anatomy"] == lab].double().mean()
            assert torch.isclose(a, b)
    # a random crop+flip sample is a region of the case: its anatomy voxels carry the case's intensities
    cid = plain.case_ids[0]
    hu, anat = _arrays(prep, cid)
    s = CaseDataset(prep, tok, flip_prob=0.5, **kw)[0]
    for lab in s["anatomy"].unique().tolist():
        vals = set(np.round(_window(hu[anat == lab]), 5).tolist())
        got = set(np.round(s["image"][0][s["anatomy"] == lab].numpy(), 5).tolist())
        assert got <= vals


def test_cut_marks_anatomies_the_crop_leaves_out(prep: Path, tok) -> None:
    size = (3, 16, 16)
    ds = CaseDataset(prep, tok, crop_size_zyx=size, mode="crop", train=False, min_visible_fraction=0.5)
    seen_crop_cut = False
    for i, cid in enumerate(ds.case_ids):
        case = _case(prep, cid)
        _, anat = _arrays(prep, cid)
        box = tuple(slice((n - c) // 2, (n - c) // 2 + c) if n > c else slice(0, n) for n, c in zip(anat.shape, size))
        s = ds[i]
        for k, st in enumerate(case["anatomies"]):
            total = (anat == st["label"]).sum()
            inside = (anat[box] == st["label"]).sum()
            by_crop = st["present"] and inside < 0.5 * total
            assert bool(s["cut"][k]) == bool(by_crop), (cid, st["name"])
            seen_crop_cut |= by_crop
            if not st["present"]:
                assert not (s["anatomy"] == st["label"]).any()  # erased: too small to pool from
    assert seen_crop_cut
    # truncation by the scan range is metadata: such an anatomy still counts (a chest CT always cuts the
    # esophagus; the report describes what the scan shows)
    whole = CaseDataset(prep, tok, crop_size_zyx=(8, 16, 16), mode="resize", train=False)
    assert any(a["present"] and a["cut_by_scan_boundary"] for cid in whole.case_ids for a in _case(prep, cid)["anatomies"])
    assert not any(whole[i]["cut"].any() for i in range(len(whole)))


def test_normal_labels_and_text_ids_follow_the_parsed_report(prep: Path, tok) -> None:
    ds = CaseDataset(prep, tok, crop_size_zyx=(8, 16, 16), mode="resize", train=False)
    by_text: dict[str, int] = {}
    for i, cid in enumerate(ds.case_ids):
        parsed = _case(prep, cid)["report"]["parsed"]["anatomies"]
        s = ds[i]
        for k, name in enumerate(ds.anatomy_names):
            entry = parsed[name]
            assert bool(s["normal"][k]) == entry["normal"]
            labels = [entry["labels"][t] for t in ds.task_names[k]]
            assert s["anatomy_labels"][k].tolist() == [float(v) for v in labels] + [0.0] * (ds.max_tasks - len(labels))
            key = normalise_text(entry["text"])
            assert by_text.setdefault(key, int(s["text_id"][k])) == int(s["text_id"][k])
            ids = s["input_ids"][k][s["attention_mask"][k].bool()].tolist()
            assert ids[:-1] == tok(entry["text"], truncation=True, max_length=ds.max_text_len)["input_ids"][:-1]
    assert len(set(by_text.values())) == len(by_text)  # distinct texts, distinct ids
    assert text_id("The Liver  is normal.") == text_id("the liver is normal.") != text_id("The liver is big.")
    assert 0 <= text_id("x") < 2**63


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in SAMPLE_KEYS)


def test_items_are_reproducible_across_instances_epochs_and_workers(prep: Path, tok) -> None:
    kw = dict(crop_size_zyx=(6, 12, 12), mode="crop", train=True, seed=11)
    d1, d2 = CaseDataset(prep, tok, **kw), CaseDataset(prep, tok, **kw)
    for i in range(len(d1)):
        assert _same(d1[(2, i)], d2[(2, i)])
    assert not all(_same(d1[(0, i)], d1[(1, i)]) for i in range(len(d1)))  # new epoch, new crops
    assert not _same(CaseDataset(prep, tok, **{**kw, "seed": 12})[(0, 0)], d1[(0, 0)])
    d1.set_epoch(2)
    assert _same(d1[1], d2[(2, 1)])

    sampler = ResumableSampler(len(d1), batch_size=2, seed=4)
    loader = build_loader(d1, sampler, batch_size=2, workers=2)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = sampler.epoch_indices(epoch)
        batches = list(loader)
        assert len(batches) == 2
        for b, batch in enumerate(batches):
            assert tuple(batch) == SAMPLE_KEYS
            want = [d2[(epoch, i)] for i in order[2 * b:2 * b + 2]]
            for key in SAMPLE_KEYS:
                assert torch.equal(batch[key], torch.stack([w[key] for w in want])), key


def test_corpus_texts_and_config(prep: Path) -> None:
    texts = corpus_texts(prep)
    assert len(texts) == 4 * 16  # 15 anatomy texts + the report, per case
    cfg = DataConfig(mode="resize", crop_size_zyx=[32, 64, 64], workers=2)
    assert cfg.crop_size_zyx == (32, 64, 64) and cfg.flip_axes == () and cfg.swap_laterality
    with pytest.raises(DataError, match="distinct spatial axes"):
        DataConfig(flip_axes=(2, 2))


def test_clear_errors_and_skipped_cases(prep: Path, tok, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        CaseDataset(tmp_path / "nope", tok, crop_size_zyx=(8, 8, 8))
    (tmp_path / "raw").mkdir()
    with pytest.raises(DataError, match="not an `fvlm preprocess` output"):
        CaseDataset(tmp_path / "raw", tok, crop_size_zyx=(8, 8, 8))

    copy = tmp_path / "copy"
    shutil.copytree(prep, copy)
    rows = [json.loads(line) for line in (copy / "index.jsonl").read_text().splitlines()]
    rows[1]["report"] = False
    (copy / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (copy / "index.shard-00001-of-00002.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2:]))
    with pytest.warns(UserWarning, match="1 of 4 case"):
        ds = CaseDataset(copy, tok, crop_size_zyx=(8, 8, 8))
    assert len(ds) == 3 and ds.skipped == [(rows[1]["case_id"], "no report: cannot pair image and text")]
    assert rows[3]["case_id"] in ds.case_ids  # read from the shard index

    case = copy / "cases" / rows[0]["case_id"]
    data = json.loads((case / "case.json").read_text())
    data["report"]["parsed"] = None
    (case / "case.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning):
        ds = CaseDataset(copy, tok, crop_size_zyx=(8, 8, 8))
    with pytest.raises(DataError, match="no parsed per-anatomy texts"):
        ds[0]

    (case / "image.npy").unlink()
    with pytest.raises(DataError, match="lack image/anatomy files"), pytest.warns(UserWarning):
        CaseDataset(copy, tok, crop_size_zyx=(8, 8, 8))

    run = json.loads((copy / "preprocess.json").read_text())
    run["report_parser_preset"] = None
    (copy / "preprocess.json").write_text(json.dumps(run))
    with pytest.raises(DataError, match="parsed no report"), pytest.warns(UserWarning):
        CaseDataset(copy, tok, crop_size_zyx=(8, 8, 8))


def test_resize_mode_caches_the_resized_case_without_changing_items(prep: Path, tok) -> None:
    kw = dict(crop_size_zyx=(8, 16, 16), mode="resize", train=True, seed=3, flip_axes=(0, 1, 2))
    cached = CaseDataset(prep, tok, **kw)
    first = cached[(0, 1)]
    first["image"].add_(1.0)  # a caller that edits its sample must not edit the cache
    first["input_ids"].zero_()
    again = cached[(0, 1)]
    fresh = CaseDataset(prep, tok, **kw)[(0, 1)]
    assert 1 in cached._resized and {(1, False), (1, True)} & set(cached._text_cache)
    for k in fresh:
        assert torch.equal(again[k], fresh[k]), k
    # the random flips still differ between epochs (the cache holds the unflipped case)
    assert any(not torch.equal(cached[(e, 1)]["image"], fresh["image"]) for e in range(1, 8))


def test_dataset_extras_add_fields_from_their_own_random_stream(prep: Path, tok) -> None:
    from pipelines.train.extras import get_extra, register_extra

    def second_flip_view(ds, index, sample, case, rng):
        img, anat, _ = ds.image_view(index, case, rng)
        return {"image_view2": img, "draw": torch.tensor(rng.random() if rng is not None else -1.0)}

    register_extra("test_view", second_flip_view, overwrite=True)
    assert get_extra("test_view") is second_flip_view
    plain = CaseDataset(prep, tok, crop_size_zyx=(16, 32, 32), mode="crop", train=True, seed=3)
    extra = CaseDataset(prep, tok, crop_size_zyx=(16, 32, 32), mode="crop", train=True, seed=3, extras=["test_view"])
    a, b = plain[(1, 2)], extra[(1, 2)]
    assert set(b) == set(a) | {"image_view2", "draw"}
    assert _same(a, {k: b[k] for k in a})  # turning an extra on leaves the base sample's draws alone
    assert b["image_view2"].shape == b["image"].shape
    assert float(extra[(1, 2)]["draw"]) == float(b["draw"]) and float(extra[(2, 2)]["draw"]) != float(b["draw"])
    with pytest.raises(ValueError, match="unknown dataset extra 'nope'"):
        CaseDataset(prep, tok, crop_size_zyx=(16, 32, 32), extras=["nope"])

    register_extra("test_clash", lambda ds, i, s, c, r: {"image": s["image"]}, overwrite=True)
    clash = CaseDataset(prep, tok, crop_size_zyx=(16, 32, 32), extras=["test_clash"])
    with pytest.raises(RuntimeError, match="extra 'test_clash' produced 'image'"):
        clash[0]
