"""HU plausibility gate (``pipelines/preprocess/hu_check.py``): its cost per 512 x 512 x 300 volume against
the preprocessing of the same volume, and its accuracy on the real CTs in ``../shared/data/totalsegmentator/``
(should pass) and on the same volumes in the wrong units (should fail, with the right cause): shifted by -1024
(rescaled twice), scaled to raw stored values (HU + 1024, as uint16; and with intercept -1000), windowed to
[0, 1]; plus the CT-RATE adapter's per-volume rescale decision on each real CT stored as the first release
(raw values) and the second (HU), both with the metadata intercept -1024, and the synthetic cohort.

    .venv/bin/python -m benchmarks.hu_check

Target (issue 21): a small fraction of the preprocessing time; every verdict and cause right.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from benchmarks.record import markdown_table, record  # noqa: E402
from pipelines.preprocess.ctrate import decide_rescale  # noqa: E402
from pipelines.preprocess.hu_check import HUCheckConfig, check_sample, gate_volume, image_sample  # noqa: E402
from pipelines.preprocess.series import Volume  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalsegmentator"
REAL_CTS = ("example_ct_sm.nii.gz", "example_ct.nii.gz")
#: name -> (transform of an HU array, expected status, expected cause)
VARIANTS = {
    "as stored (HU)": (lambda hu: hu, "pass", None),
    "shifted by -1024": (lambda hu: hu - 1024, "fail", "rescaled_twice"),
    "raw stored values (HU + 1024, uint16)": (lambda hu: np.clip(hu + 1024, 0, 65535).astype(np.uint16), "fail",
                                              "raw_stored_values"),
    "raw stored values (HU + 1000)": (lambda hu: np.clip(hu + 1000, 0, None), "fail", "raw_stored_values"),
    "windowed to [0, 1]": (lambda hu: np.clip((hu + 1150) / 1500, 0, 1).astype(np.float32), "fail", "not_ct"),
}


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cost(repeats: int) -> tuple[list[list[object]], float]:
    """Seconds per 512 x 512 x 300 volume: the gate on int16 and float32 (pass), the diagnosis of a failing
    volume, the CT-RATE decision; and one preprocessed case of the same size for comparison."""
    from benchmarks.preprocess_speed import measure_case, phantom

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    cfg = HUCheckConfig()
    hu, _ = phantom((300, 512, 512))
    img16 = sitk.GetImageFromArray(hu)
    img32 = sitk.GetImageFromArray(hu.astype(np.float32))
    raw = sitk.GetImageFromArray((hu.astype(np.int32) + 1024).astype(np.uint16))
    del hu
    assert gate_volume(Volume(img16), cfg)[0]["status"] == "pass"
    t_pass16 = _median_seconds(lambda: gate_volume(Volume(img16), cfg), repeats)
    t_pass32 = _median_seconds(lambda: gate_volume(Volume(img32), cfg), repeats)
    t_fail = _median_seconds(lambda: gate_volume(Volume(raw), cfg, "warn"), repeats)
    t_decide = _median_seconds(lambda: decide_rescale(image_sample(img32, cfg), 1.0, -1024.0, "auto", False, cfg),
                               repeats)
    sampled = image_sample(img16, cfg).size
    case = measure_case((300, 512, 512))["total"]
    timed = [("gate, passing volume, int16 (DICOM path)", t_pass16),
             ("gate, passing volume, float32 (CT-RATE / float NIfTI)", t_pass32),
             ("gate, failing volume with diagnosis (raw stored values)", t_fail),
             ("CT-RATE auto decision (as stored + after rescale)", t_decide),
             ("preprocessing of one case (read + HU, mask, crop, write; 1 core)", case)]
    rows = [[name, f"{t * 1000:.0f}", f"{100 * t / case:.1f} %"] for name, t in timed]
    return rows, sampled


def accuracy() -> tuple[list[list[object]], int, int]:
    """Verdict, cause and peaks per real CT and variant; (rows, right, total)."""
    cfg = HUCheckConfig()
    rows, right, total = [], 0, 0
    for ct in REAL_CTS:
        hu = sitk.GetArrayFromImage(sitk.ReadImage(str(REAL / ct))).astype(np.float32)
        for name, (fn, want_status, want_cause) in VARIANTS.items():
            arr = fn(hu)
            r = check_sample(image_sample(sitk.GetImageFromArray(arr), cfg), cfg)
            ok = r.status == want_status and r.cause == want_cause
            right += ok
            total += 1
            s = r.stats
            peak = "-" if s.air_peak_hu is None else f"{s.air_peak_hu:.0f}"
            tissue = "-" if s.tissue_peak_hu is None else f"{s.tissue_peak_hu:.0f}"
            rows.append([ct, name, r.status, r.cause or "-", peak, tissue, f"{100 * s.outside_share:.1f}",
                         "yes" if ok else "**no**"])
        for release, stored in ((1, hu + 1024), (2, hu)):
            apply, rec = decide_rescale(image_sample(sitk.GetImageFromArray(stored), cfg), 1.0, -1024.0, "auto",
                                        False, cfg)
            ok = apply == (release == 1) and rec["release"] == release
            right += ok
            total += 1
            rows.append([ct, f"CT-RATE release {release} layout, --ct-rate-version auto",
                         "rescale applied" if apply else "rescale not applied", f"release {rec['release']}", "", "",
                         "", "yes" if ok else "**no**"])
    return rows, right, total


def synthetic(cases: int) -> tuple[int, int]:
    """(passed, cases) of a synthetic cohort's volumes (``fvlm synth``, small, NIfTI)."""
    from pipelines.synth.cohort import SynthConfig, make_cohort

    cfg = HUCheckConfig()
    with tempfile.TemporaryDirectory() as tmp:
        make_cohort(Path(tmp) / "s", SynthConfig(cases=cases, seed=7, format="nifti", normal_share=0.3))
        passed = 0
        for f in sorted((Path(tmp) / "s" / "images").glob("*.nii.gz")):
            passed += check_sample(image_sample(sitk.ReadImage(str(f)), cfg), cfg).passed
    return passed, cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats (median)")
    ap.add_argument("--synth-cases", type=int, default=10, help="synthetic cohort volumes checked")
    args = ap.parse_args()
    if not (REAL / REAL_CTS[0]).is_file():
        raise SystemExit(f"real CTs not found in {REAL}")
    cost_rows, sampled = cost(args.repeats)
    acc_rows, right, total = accuracy()
    passed, cases = synthetic(args.synth_cases)
    table = markdown_table(["512x512x300 volume (78.6 M voxels)", "ms", "of preprocessing"], cost_rows)
    table += "\n\n" + markdown_table(["real CT", "variant", "verdict", "cause", "air peak HU", "soft-tissue peak HU",
                                      "% outside [-1100, 3071]", "right"], acc_rows)
    table += f"\n\nRight: {right} of {total}. Synthetic cohort (`fvlm synth`, small): {passed} of {cases} volumes pass."
    record("HU plausibility gate: cost and accuracy", table,
           notes=f"The gate measures a strided sample ({sampled:,} voxels of the 512x512x300 volume: every 4th voxel "
                 "per axis) and never copies the volume; its cost is the sample's float32 copy, one histogram and "
                 "a percentile; a failing volume is re-measured under the usual rescales to name the cause. The "
                 "preprocessing row is one case of `benchmarks.preprocess_speed` (DICOM series, precomputed mask, "
                 "default config) run in a fresh single-threaded process in the same run. Real CTs: "
                 "TotalSegmentator's test volumes (3 mm, 122x101x30 and 122x101x112); the variants are computed "
                 "from them in memory. Peaks are histogram bin centres (10 HU bins).")


if __name__ == "__main__":
    main()
