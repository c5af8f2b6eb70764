"""The CPU benchmark geometry (issue 15 item 1): configs/preprocess/bench.yaml puts every case on one fixed
6 x 6 x 10 mm grid padded to the training crop, and its 8 x 8 x 8-voxel tokens separate anatomies that the
old per-case resize to 32 x 64 x 64 with 8 x 16 x 16 tokens pooled from another anatomy's tokens."""

from __future__ import annotations

import pytest
import SimpleITK as sitk
import torch

from anatomy.catalog import load_anatomy_set
from fvlm.model.pooling import touch_mask
from fvlm.model.vision import patchify
from pipelines.cases.view import crop_box, crop_view, resize_view
from pipelines.preprocess.crop import crop_case, load_crop_config

CROP = (72, 48, 64)  # the benchmark's training crop (z, y, x)
WINDOW = (-1150.0, 350.0)


@pytest.fixture(scope="module")
def case(synthetic):
    root = synthetic(2, seed=11)
    out = []
    for i in range(2):
        image = sitk.ReadImage(str(root / "images" / f"synth_{i:05d}.nii.gz"))
        labels = sitk.ReadImage(str(root / "segmentations" / f"synth_{i:05d}.nii.gz"))
        out.append((image, labels))
    return out


def _separation(lab: torch.Tensor, patch: tuple[int, int, int], n: int) -> tuple[int, int]:
    """(anatomies whose token set lies inside another's, tokens where the heart is the most common label)."""
    touch = touch_mask(lab[None].long(), n, patch)[0]  # (A, N)
    present = [a for a in range(n) if touch[a].any()]
    inside = sum(any(bool((touch[a] <= touch[b]).all()) for b in present if b != a) for a in present)
    voxels = patchify(lab[None, None].float(), patch)[0].long()  # (N, P)
    counts = torch.stack([torch.bincount(v, minlength=n + 1)[1:] for v in voxels])  # (N, A)
    heart = load_anatomy_set("fvlm15")["heart"].label - 1
    own = int(((counts.argmax(1) == heart) & (counts.sum(1) > 0)).sum())
    return inside, own


def test_bench_grid_is_fixed_spacing_and_fits_the_crop(case) -> None:
    cfg = load_crop_config("bench")
    aset = load_anatomy_set("fvlm15")
    for image, labels in case:
        crop = crop_case(image, labels, aset, cfg)
        assert crop.image.GetSpacing() == pytest.approx((6.0, 6.0, 10.0))
        shape = sitk.GetArrayViewFromImage(crop.image).shape
        assert all(s >= c for s, c in zip(shape, CROP)), shape  # padded to at least the training crop


def test_bench_tokens_separate_anatomies_better_than_the_resize_grid(case) -> None:
    """Fewer anatomies whose tokens all belong to another anatomy's set (spleen, kidney, pancreas were pooled
    from liver/bone tokens at the old geometry), and tokens of the heart's own (where it is the commonest
    label) instead of at most one."""
    aset = load_anatomy_set("fvlm15")
    for image, labels in case:
        crop = crop_case(image, labels, aset, load_crop_config("bench"))
        hu = sitk.GetArrayFromImage(crop.image)
        anat = sitk.GetArrayFromImage(crop.anatomy)
        _, lab, _ = crop_view(hu, anat, CROP, crop_box(hu.shape, CROP, None), (False,) * 3, WINDOW, -1024)
        bench = _separation(lab, (8, 8, 8), len(aset))
        demo = crop_case(image, labels, aset, load_crop_config("demo"))
        _, lab = resize_view(sitk.GetArrayFromImage(demo.image), sitk.GetArrayFromImage(demo.anatomy), (32, 64, 64),
                             WINDOW)
        old = _separation(lab, (8, 16, 16), len(aset))
        assert bench[0] < old[0], (bench, old)
        assert bench[1] >= 2 and bench[1] > old[1], (bench, old)
