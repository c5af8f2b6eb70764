"""Predict one scan: INPUT (one DICOM series folder or one NIfTI file) -> per-anatomy presence and per-task
zero-shot probabilities, and optionally a NIfTI heatmap of one finding on the scan's grid.

Steps, all in memory and reusing the preprocess and inference code: series discovery and assembly
(``discover``, ``load_volume``), the HU plausibility gate of ``fvlm preprocess`` (``hu_check.gate_volume`` with
the preset's ``hu_check`` thresholds; ``hu_check="fail"`` refuses a scan whose intensities are not plausible HU
of a body, naming the measured peaks and the likely cause; ``warn`` goes on and logs it; the measurements are
in the output's ``scan.hu_check``), segmentation (``create_segmenter``: ``masks`` or a registered model),
anatomy grouping and crop (``crop_case`` with a preprocess preset, by default ``default``: give the preset
the model's training data used), the evaluation view of the model's run (``data_view``: central crop or
whole-crop resize, window ``window_hu`` -> [0, 1]; an anatomy with less than half its voxels in the crop is
``cut``; :func:`crop_input`, the one view of ``pipelines.cases.view.case_view`` that evaluation's dataset uses
too), the model and zero-shot scores (``encode_prompts`` and the recipe's scorer, ``fvlm.scoring``, found
as ``fvlm evaluate`` finds it: ``pipelines.inference.scoring.resolve_scorer``; the output's ``tasks.scorer``
says which). A task whose anatomy is absent or cut has probability ``None`` (never 0).

A model with the ``uncertainty`` head (``fvlm.model.heads.uncertainty``) adds, per scored anatomy, the mean
variance ``vbar = mean_d exp(v_d)`` of its image Gaussian and a ``confidence`` ``1 / (1 + vbar / v_0)``
(``v_0`` the head's initial variance: 0.5 there, towards 1 as the variance shrinks); ``None`` for an absent or
cut anatomy, and no such fields without the head.

No patient identifier reaches the output: the JSON holds no names, IDs, UIDs, dates or paths of the input.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class ModelInput:
    image: torch.Tensor  #: (1, C, Z, Y, X) in [0, 1], one channel per input window
    anatomy: torch.Tensor  #: (1, Z, Y, X) int64
    cut: torch.Tensor  #: (1, A) bool
    mode: str
    crop_shape_zyx: tuple[int, int, int]
    box: tuple[slice, ...] | None = None  #: crop mode: region of the crop array that was taken
    pad_before: tuple[int, int, int] = (0, 0, 0)  #: crop mode: padding before each axis of the model input


def crop_input(crop: Any, names: list[str], view: dict, window_hu, pad_hu: float) -> ModelInput:
    """The deterministic evaluation view of ``CaseDataset(train=False)`` for one in-memory crop (``crop_case``'s
    ``Crop``), as a batch of one: :func:`pipelines.cases.view.case_view` of its arrays and anatomy stats (the
    ``case.json`` ``anatomies`` that preprocess would write), central crop or resize, no flips. ``window_hu``:
    one ``[lo, hi]`` window or the model's list (``vision.input_windows_hu``), one input channel each."""
    import SimpleITK as sitk

    from pipelines.cases.view import case_view

    hu = sitk.GetArrayFromImage(crop.image)  # (Z, Y, X) int16 HU
    anat = sitk.GetArrayFromImage(crop.anatomy)  # (Z, Y, X) uint8
    v = case_view(hu, anat, [s.to_dict() for s in crop.stats], names, view["crop_size_zyx"], mode=view["mode"],
                  window_hu=window_hu, pad_hu=pad_hu)
    return ModelInput(v.image.to(torch.float32).contiguous()[None], v.anatomy.to(torch.int64)[None],
                      torch.from_numpy(v.cut)[None], view["mode"], tuple(hu.shape), v.box,  # type: ignore[arg-type]
                      v.pad_before)


def _single_series(input: Path):
    from pipelines.preprocess.discover import discover

    input = Path(input)
    if not input.exists():
        raise FileNotFoundError(f"INPUT {input}: no such file or folder")
    found = discover(input)
    if not found.selected:
        reasons = sorted({s.reason for s in found.skipped}) or ["no DICOM or NIfTI series found"]
        raise ValueError(f"INPUT holds no usable CT series ({'; '.join(reasons)[:300]})")
    if len(found.selected) > 1:
        raise ValueError(f"INPUT holds {len(found.selected)} studies; give one DICOM series folder or one NIfTI file")
    return found.selected[0]


def _anatomy_set_for(model: Any, anatomy: str | None):
    from anatomy.catalog import load_anatomy_set

    names = list(model.config.anatomy_names or ())
    aset = load_anatomy_set(anatomy or "fvlm15")
    if names and list(aset.names) != names:
        raise ValueError(f"anatomy set {aset.name!r} ({len(aset.names)} anatomies) is not the model's "
                         f"({len(names)}: {', '.join(names[:5])}, ...); pass --anatomy with the set the model used")
    if len(aset.names) != model.config.num_anatomies:
        raise ValueError(f"anatomy set {aset.name!r} has {len(aset.names)} anatomies, the model "
                         f"{model.config.num_anatomies}")
    return aset


def _none_if_nan(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def predict(checkpoint: Path, input: Path, *, masks: Path | None = None, segmenter: str | None = None,
            tasks: str = "fvlm54", anatomy: str | None = None, preprocess: str = "default",
            templates: str | None = None, mode: str | None = None, crop_size=None,
            heatmap: str | None = None, heatmap_mode: str = "probability", hu_check: str = "fail",
            fill_nonfinite: float | None = None) -> dict[str, Any]:
    """Run the whole prediction; returns the JSON document (and ``_heatmap``: a SimpleITK image, when asked).
    ``hu_check``: ``fail``, ``warn`` or ``off``, the HU plausibility gate on the input (see the module docstring).
    ``fill_nonfinite``: HU for NaN/inf voxels (noted); None refuses such a scan."""
    from anatomy.catalog import load_task_catalog
    from fvlm.zeroshot import encode_prompts
    from pipelines.inference.model import data_view, load_model
    from pipelines.inference.scoring import resolve_scorer, scorer_info
    from pipelines.preprocess.crop import crop_case, load_crop_config
    from pipelines.preprocess.hu_check import HU_CHECK_MODES, HUCheckError, gate_volume
    from pipelines.preprocess.segment import create_segmenter
    from pipelines.preprocess.volume import load_volume

    if (masks is None) == (segmenter is None):
        raise ValueError("give exactly one of --masks PATH or --segmenter NAME")
    if hu_check not in HU_CHECK_MODES:
        raise ValueError(f"--hu-check must be one of {', '.join(HU_CHECK_MODES)}, got {hu_check!r}")
    model, tok, model_dir = load_model(Path(checkpoint))
    model.eval()
    aset = _anatomy_set_for(model, anatomy)
    names = list(aset.names)
    catalog = load_task_catalog(tasks)
    if heatmap is not None and heatmap not in [t.name for t in catalog.tasks]:
        raise ValueError(f"--heatmap {heatmap!r}: not a task of catalog {catalog.name!r} "
                         f"(e.g. {', '.join(t.name for t in list(catalog.tasks)[:5])})")
    if heatmap is not None and heatmap_mode == "region":
        from fvlm.localize import region_head

        region_head(model)  # a clear error before any preprocessing when the model has no region head
        if catalog[heatmap].anatomy is None:
            raise ValueError(f"--heatmap {heatmap!r} --heatmap-mode region: a whole-study task has no anatomy to "
                             "localise in; use --heatmap-mode probability")
    crop_cfg = load_crop_config(preprocess)
    if masks is not None:
        seg = create_segmenter("masks", path=masks)
    else:
        opts: dict[str, Any] = {}
        if segmenter == "totalsegmentator":
            opts["classes"] = sorted({c for a in aset.anatomies for c in a.classes})
        seg = create_segmenter(segmenter, **opts)

    ref = _single_series(Path(input))
    vol = load_volume(ref, fill_nonfinite=fill_nonfinite)  # integrity checked: gzip CRC/length, no NaN/inf
    try:
        hu_record, hu_warning = gate_volume(vol, crop_cfg.hu_check, hu_check)
    except HUCheckError as e:
        raise ValueError(f"INPUT: {e}") from None
    if hu_warning:
        log.warning("INPUT: %s", hu_warning)
    labels = seg.segment(vol.image, ref.match_key("folder"))
    crop = crop_case(vol.image, labels, aset, crop_cfg)
    del labels
    view = data_view(Path(checkpoint), model, mode, crop_size)
    inp = crop_input(crop, names, view, model.config.vision.input_windows_hu or crop_cfg.window_hu, crop_cfg.pad_hu)

    from fvlm.prompts import DEFAULT_TEMPLATES

    bank = encode_prompts(model, tok, catalog, templates=templates or DEFAULT_TEMPLATES)
    scale = float(model.logit_scale().detach())
    scorer, spec, spec_source = resolve_scorer(Path(checkpoint), model)
    unc = _uncertainty_head(model)
    with torch.no_grad():
        enc = model.encode_image(inp.image, inp.anatomy, inp.cut, return_context=unc is not None)
        if unc is not None:
            confidence, variance = unc.confidence(unc.image_logvar(enc["pooled"]))  # (1, A) each
        # the same scorer and path as fvlm evaluate (the pooled one reads the embeddings above)
        feats = scorer.encode(model, inp.image, inp.anatomy, inp.cut) if spec.name != "pooled" else {
            "image_emb": enc["image_emb"].float(), "anatomy_mask": enc["anatomy_mask"].bool(),
            "global_image_emb": enc["global_image_emb"].float()}
        probs = scorer.score(model, feats, scorer.prepare(model, tok, bank))[0]
    used = enc["anatomy_mask"][0].tolist()

    by_name = {s.name: s for s in crop.stats}
    anatomies = {}
    for k, n in enumerate(names):
        s = by_name.get(n)
        anatomies[n] = {
            "present": bool(getattr(s, "present", False)),
            "cut": bool(inp.cut[0, k]),
            "scored": bool(used[k]),
        }
        if unc is not None:  # the uncertainty head's per-anatomy confidence; None when not scored
            anatomies[n]["confidence"] = float(confidence[0, k]) if used[k] else None
            anatomies[n]["variance"] = float(variance[0, k]) if used[k] else None
        anatomies[n]["tasks"] = {}
    whole: dict[str, Any] = {}
    task_rows = {}
    for j, t in enumerate(catalog.tasks):
        p = _none_if_nan(float(probs[j]))
        task_rows[t.name] = {"title": getattr(t, "title", t.name), "anatomy": t.anatomy, "probability": p}
        (anatomies[t.anatomy]["tasks"] if t.anatomy else whole)[t.name] = p
    doc: dict[str, Any] = {
        "format": "fvlm-predict/1",
        "model": {"name": model.config.name, "checkpoint": Path(model_dir).name, "num_anatomies": len(names),
                  "logit_scale": scale},
        "tasks": {"catalog": catalog.name, "n_tasks": len(bank), "templates": bank.templates,
                  "score": scorer.describe(), "scorer": scorer_info(scorer, spec, spec_source)},
        "preprocess": {"anatomy_set": aset.name, "preset": crop_cfg.name, "segmenter": seg.describe(),
                       "view": view, "window_hu": list(crop_cfg.window_hu),
                       **({"input_windows_hu": [list(w) for w in model.config.vision.input_windows_hu]}
                          if model.config.vision.input_windows_hu else {}),
                       "crop_shape_zyx": list(inp.crop_shape_zyx), "notes": len(vol.notes),
                       **({"fill_nonfinite": [n for n in vol.notes if "--fill-nonfinite" in n]}
                          if fill_nonfinite is not None else {})},
        "scan": {"kind": ref.kind, "size_xyz": list(vol.image.GetSize()),
                 "spacing_xyz_mm": [round(float(v), 4) for v in vol.image.GetSpacing()], "hu_check": hu_record},
        "anatomies": anatomies,
        "whole_study": whole,
        "predictions": task_rows,
    }
    if unc is not None:
        doc["uncertainty"] = {"confidence": "1 / (1 + mean variance / initial variance) of the anatomy's image "
                                            "Gaussian (uncertainty head); 0.5 at the initial variance",
                              "initial_variance": math.exp(unc.init_logvar)}
    if heatmap is not None:
        doc["_heatmap"] = heatmap_image(model, inp, bank, heatmap, crop, vol.image, heatmap_mode, tokenizer=tok)
        doc["heatmap"] = {"task": heatmap, "mode": heatmap_mode,
                          "anatomy": task_rows[heatmap]["anatomy"],
                          "note": ("region head map (fvlm.localize: the positive prompts' tokens attend to the "
                                   "anatomy's tokens under the scorer's selection; peak 1)" if heatmap_mode == "region"
                                   else "token similarity (fvlm.heatmap)") + ", trilinear to the crop grid, linear "
                                  "onto the scan grid; 0 outside the crop and on tokens not touching the anatomy"}
    return doc


def heatmap_image(model: Any, inp: ModelInput, bank: Any, task: str, crop: Any, scan: Any, mode: str,
                  tokenizer: Any = None):
    """The task's token map on ``scan``'s grid (a float32 SimpleITK image with the scan's geometry); ``mode``
    ``region`` uses the region head (``fvlm.localize``, needs ``tokenizer``), else ``fvlm.heatmap``."""
    import SimpleITK as sitk

    from fvlm.heatmap import task_heatmap, upsample_to_input

    j = list(bank.task_names).index(task)
    a = bank.anatomy_index[j]
    if mode == "region":
        from fvlm.localize import prompt_tokens, region_map

        ids, mask = prompt_tokens(model, tokenizer, bank.prompts[j][0])
        tmap, _ = region_map(model, inp.image, inp.anatomy, ids, mask, a)
    else:
        tmap, _ = task_heatmap(model, inp.image, inp.anatomy, bank.positive[j], bank.negative[j], a, mode)
    size = tuple(inp.image.shape[2:])
    up = upsample_to_input(tmap, size)[0].numpy()  # (Z, Y, X) on the model input
    shape = inp.crop_shape_zyx
    if inp.mode == "crop":
        on_crop = np.zeros(shape, np.float32)
        inner = tuple(slice(b, b + (sl.stop - sl.start)) for b, sl in zip(inp.pad_before, inp.box))
        on_crop[inp.box] = up[inner]
    else:
        on_crop = upsample_to_input(torch.from_numpy(up)[None], shape)[0].numpy()
    img = sitk.GetImageFromArray(on_crop.astype(np.float32))
    img.CopyInformation(crop.anatomy)
    return sitk.Resample(img, scan, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def _uncertainty_head(model: Any) -> Any:
    """The model's ``uncertainty`` head, or None."""
    heads = getattr(model, "heads", None)
    return heads["uncertainty"] if heads is not None and "uncertainty" in heads else None


def format_table(doc: dict) -> str:
    """A readable text table: anatomy, present/cut, (the uncertainty head's confidence,) then each task's
    probability."""
    lines = [f"model {doc['model']['name']} | tasks {doc['tasks']['catalog']} ({doc['tasks']['n_tasks']})", ""]
    conf = "uncertainty" in doc  # a confidence column only for a model with the uncertainty head
    lines.append(f"{'anatomy':<22} {'status':<10} " + (f"{'confidence':<10} " if conf else "")
                 + f"{'task':<34} probability")
    for name, a in doc["anatomies"].items():
        status = "absent" if not a["present"] else ("cut" if a["cut"] else "present")
        c = a.get("confidence")
        cell = (f"{'-' if c is None else f'{c:.3f}':<10} " if conf else "")
        if not a["tasks"]:
            lines.append(f"{name:<22} {status:<10} {cell}".rstrip())
        for i, (t, p) in enumerate(a["tasks"].items()):
            lines.append(f"{name if i == 0 else '':<22} {status if i == 0 else '':<10} "
                         f"{cell if i == 0 else ' ' * len(cell)}{t:<34} {'-' if p is None else f'{p:.3f}'}")
    for t, p in doc["whole_study"].items():
        lines.append(f"{'(whole study)':<22} {'':<10} {' ' * 11 if conf else ''}{t:<34} "
                     f"{'-' if p is None else f'{p:.3f}'}")
    return "\n".join(lines)
