"""``fvlm predict`` on one synthetic DICOM scan with an untrained tiny model (issue 6, item 4)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> dict:
    from anatomy.catalog import load_anatomy_set
    from fvlm.model import create_model, save_pretrained, train_wordpiece
    from pipelines.synth.cohort import SynthConfig, make_cohort
    from tests.pipelines.preprocess.preprocess_fixtures import fast_config

    root = tmp_path_factory.mktemp("predict")
    make_cohort(root / "synth", SynthConfig(cases=1, seed=2, format="dicom", normal_share=0.0))
    synth = root / "synth"
    case = sorted(p for p in (synth / "images").iterdir() if p.is_dir())[0]
    texts = ["no abnormality", "lung nodule is present", "not lung nodule", "there is a mass in the liver"] * 5
    tok = train_wordpiece(texts, vocab_size=200, min_frequency=1)
    torch.manual_seed(0)
    model = create_model("tiny", anatomy_names=tuple(load_anatomy_set("fvlm15").names), text={"vocab_size": len(tok)})
    save_pretrained(model, tok, root / "model")
    return {"root": root, "case": case, "masks": synth / "segmentations" / f"{case.name}.nii.gz",
            "truth": json.loads((synth / "truth" / f"{case.name}.json").read_text()),
            "model": root / "model", "fast": fast_config(root)}


def _strings(obj) -> list[str]:
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in (str(k), *_strings(v))]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [str(obj)]


def _identifiers(truth: dict) -> list[str]:
    keys = ("name", "id", "uid", "accession", "birth", "date")
    out = []
    for k, v in truth.items():
        if isinstance(v, dict):
            out += _identifiers(v)
        elif isinstance(v, str) and any(w in k.lower() for w in keys) and len(v) >= 4:
            out.append(v)
    return out


def test_predict_json_and_heatmap(scan, tmp_path: Path, capsys) -> None:
    import SimpleITK as sitk

    from anatomy.catalog import load_task_catalog
    from pipelines.cli import main
    from pipelines.preprocess.discover import discover
    from pipelines.preprocess.volume import load_volume

    out, hm = tmp_path / "pred.json", tmp_path / "map.nii.gz"
    assert main(["predict", "--checkpoint", str(scan["model"]), str(scan["case"]), "--masks", str(scan["masks"]),
                 "--preprocess", str(scan["fast"]), "--mode", "resize", "--crop-size", "32", "64", "64",
                 "--output", str(out), "--heatmap", "lung_nodule", "--heatmap-output", str(hm)]) == 0
    table = capsys.readouterr().out
    assert "lung" in table and "probability" in table
    raw = out.read_text()
    doc = json.loads(raw)
    catalog = load_task_catalog("fvlm54")
    assert len(doc["anatomies"]) == 15 and set(doc["predictions"]) == {t.name for t in catalog.tasks}
    assert doc["model"]["name"] and doc["tasks"]["catalog"] == catalog.name
    for name, a in doc["anatomies"].items():
        for t, p in a["tasks"].items():
            if not a["present"] or a["cut"]:
                assert p is None, (name, t)
            else:
                assert p is None or 0.0 <= p <= 1.0
    assert any(p is not None for p in (r["probability"] for r in doc["predictions"].values()))
    ids = [v for v in scan["truth"]["identifiers"].values() if isinstance(v, str) and len(v) >= 4]
    ids += _identifiers(scan["truth"])
    assert ids, "the synthetic truth lists fake identifiers"
    for ident in ids:
        assert ident not in raw and ident not in table, ident
    assert str(scan["case"]) not in raw
    # heatmap on the scan's grid
    scan_img = load_volume(discover(scan["case"]).selected[0]).image
    m = sitk.ReadImage(str(hm))
    assert m.GetSize() == scan_img.GetSize()
    for got, want in ((m.GetOrigin(), scan_img.GetOrigin()), (m.GetSpacing(), scan_img.GetSpacing()),
                      (m.GetDirection(), scan_img.GetDirection())):
        assert all(math.isclose(g, w, abs_tol=1e-4) for g, w in zip(got, want))
    arr = sitk.GetArrayFromImage(m)
    assert arr.min() >= 0.0 and arr.max() <= 1.0 and arr.max() > 0.0


def test_predict_crop_mode_and_absent_anatomy(scan, tmp_path: Path) -> None:
    import numpy as np
    import SimpleITK as sitk

    from pipelines.predict.run import predict

    lab = sitk.ReadImage(str(scan["masks"]))
    arr = sitk.GetArrayFromImage(lab)
    kept = np.where(np.isin(arr, [10, 11, 12, 13, 14]), arr, 0).astype(arr.dtype)  # lung lobes only
    small = sitk.GetImageFromArray(kept)
    small.CopyInformation(lab)
    masks = tmp_path / "lungs.nii.gz"
    sitk.WriteImage(small, str(masks))
    doc = predict(scan["model"], scan["case"], masks=masks, preprocess=str(scan["fast"]), mode="crop",
                  crop_size=(16, 32, 32), heatmap="lung_nodule", heatmap_mode="cosine")
    image = doc.pop("_heatmap")
    json.dumps(doc, allow_nan=False)
    absent = [n for n, a in doc["anatomies"].items() if not a["present"]]
    assert absent and all(p is None for n in absent for p in doc["anatomies"][n]["tasks"].values())
    hm = sitk.GetArrayFromImage(image)
    assert hm.shape == sitk.GetArrayFromImage(lab).shape and np.abs(hm).max() <= 1.0 + 1e-5


def test_predict_feeds_a_multi_window_model_its_channels(scan, tmp_path: Path) -> None:
    """A model with ``vision.input_windows_hu`` gets one channel per window from ``fvlm predict`` (the view
    training and evaluation use), and the output records the windows."""
    from anatomy.catalog import load_anatomy_set
    from fvlm.model import create_model, load_pretrained, save_pretrained
    from pipelines.predict.run import predict

    wins = [[-1150, 350], [-160, 240], [-300, 1200]]
    _, tok = load_pretrained(scan["model"])
    torch.manual_seed(0)
    model = create_model("tiny", anatomy_names=tuple(load_anatomy_set("fvlm15").names),
                         text={"vocab_size": len(tok)}, vision={"input_windows_hu": wins})
    save_pretrained(model, tok, tmp_path / "model3")
    doc = predict(tmp_path / "model3", scan["case"], masks=scan["masks"], preprocess=str(scan["fast"]),
                  mode="resize", crop_size=(32, 64, 64))
    doc.pop("_heatmap", None)
    assert doc["preprocess"]["input_windows_hu"] == [[float(a), float(b)] for a, b in wins]
    probs = [p for a in doc["anatomies"].values() for p in a["tasks"].values() if p is not None]
    assert probs and all(0.0 <= p <= 1.0 for p in probs)


def test_predict_feeds_a_model_with_anatomy_channels_the_map(scan, tmp_path: Path) -> None:
    """A model with ``vision.anatomy_channels`` gets the scan's anatomy map as input from ``fvlm predict``, for
    the probabilities and for the heatmap (the tower refuses an input without those channels)."""
    import numpy as np
    import SimpleITK as sitk

    from anatomy.catalog import load_anatomy_set
    from fvlm.model import create_model, load_pretrained, save_pretrained
    from pipelines.predict.run import predict

    _, tok = load_pretrained(scan["model"])
    torch.manual_seed(0)
    model = create_model("tiny", anatomy_names=tuple(load_anatomy_set("fvlm15").names),
                         text={"vocab_size": len(tok)}, vision={"stem": "conv", "anatomy_channels": 3})
    save_pretrained(model, tok, tmp_path / "anat")
    kw = dict(preprocess=str(scan["fast"]), mode="resize", crop_size=(32, 64, 64), heatmap="lung_nodule")
    doc = predict(tmp_path / "anat", scan["case"], masks=scan["masks"], **kw)
    hm = sitk.GetArrayFromImage(doc.pop("_heatmap"))
    probs = [p for a in doc["anatomies"].values() for p in a["tasks"].values() if p is not None]
    assert probs and all(0.0 <= p <= 1.0 for p in probs) and np.isfinite(hm).all()


def test_predict_clear_errors(scan, tmp_path: Path, capsys) -> None:
    from pipelines.cli import main

    assert main(["predict", "--checkpoint", str(scan["model"]), str(tmp_path / "nope"), "--masks",
                 str(scan["masks"])]) == 2
    assert "INPUT" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(scan["model"]), str(scan["case"]), "--masks", str(scan["masks"]),
                 "--heatmap", "no_such_task", "--heatmap-output", str(tmp_path / "m.nii.gz")]) == 2
    assert "no_such_task" in capsys.readouterr().err


@pytest.mark.slow  # predicts on the scan more than once
def test_predict_applies_the_hu_check_to_its_input(scan, tmp_path: Path, capsys) -> None:
    """A scan whose rescale tags were stripped (raw stored values) is refused naming the cause; --hu-check warn
    goes on and records the failed check; the normal scan's check passes."""
    import pydicom

    from pipelines.cli import main
    from pipelines.predict.run import predict

    raw = tmp_path / "raw"
    raw.mkdir()
    for f in sorted(scan["case"].glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.RescaleIntercept = "0"
        ds.save_as(raw / f.name)
    args = ["predict", "--checkpoint", str(scan["model"]), str(raw), "--masks", str(scan["masks"]),
            "--preprocess", str(scan["fast"]), "--mode", "resize", "--crop-size", "32", "64", "64"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "INPUT: implausible HU" in err and "looks like raw stored values: add the rescale" in err
    assert "--hu-check warn" in err
    doc = predict(scan["model"], raw, masks=scan["masks"], preprocess=str(scan["fast"]), mode="resize",
                  crop_size=(32, 64, 64), hu_check="warn")
    check = doc["scan"]["hu_check"]
    assert check["status"] == "fail" and check["cause"] == "raw_stored_values" and check["mode"] == "warn"
    doc = predict(scan["model"], scan["case"], masks=scan["masks"], preprocess=str(scan["fast"]), mode="resize",
                  crop_size=(32, 64, 64))
    assert doc["scan"]["hu_check"]["status"] == "pass" and -1050 <= doc["scan"]["hu_check"]["air_peak_hu"] <= -950


@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_predict_refuses_a_damaged_or_nan_scan_with_one_line(scan, tmp_path: Path, capsys, damage) -> None:
    """Issue 17 item 1: a half .nii.gz or a NaN block is exit 2 with one line, not a prediction on zeros."""
    import numpy as np
    import SimpleITK as sitk

    from pipelines.cli import main
    from pipelines.preprocess.discover import discover
    from pipelines.preprocess.volume import load_volume

    img = sitk.Cast(load_volume(discover(scan["case"]).selected[0]).image, sitk.sitkFloat32)
    path = tmp_path / "scan.nii.gz"
    if damage == "nan":
        arr = sitk.GetArrayFromImage(img)
        arr[2:4] = np.nan
        bad = sitk.GetImageFromArray(arr)
        bad.CopyInformation(img)
        img = bad
    sitk.WriteImage(img, str(path), True)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out = tmp_path / "pred.json"
    args = ["predict", "--checkpoint", str(scan["model"]), str(path), "--masks", str(scan["masks"]),
            "--preprocess", str(scan["fast"]), "--mode", "resize", "--crop-size", "32", "64", "64",
            "--output", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not out.exists()
    assert ("truncated gzip stream" in err) if damage == "truncated" else ("NaN" in err and "slices z=2-3" in err)
    if damage == "nan":  # opt-in fill: a prediction, and the JSON says what was filled
        assert main([*args, "--fill-nonfinite", "-1024"]) == 0
        doc = json.loads(out.read_text())
        assert "-1024 HU" in doc["preprocess"]["fill_nonfinite"][0]
