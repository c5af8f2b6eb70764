"""Two costs around ``fvlm preprocess``'s inputs and its segmenter (issue 16):

1. Multi-frame DICOM: discovery and read (HU volume) of one Legacy Converted Enhanced CT file against the
   same series as single-frame files, uncompressed and JPEG 2000 lossless. The multi-frame files are built
   from the single-frame series as the tests build them (``tests/pipelines/preprocess/dicom_fixtures.py``),
   and each read is checked against the single-frame read.
2. TotalSegmentator plumbing: ``create_segmenter("totalsegmentator", fast=True, device="cpu")`` on the real
   CTs of ``../shared/data/totalsegmentator/`` with tiny random weights
   (``tests/pipelines/preprocess/totalseg_weights.py``), so that the network costs almost nothing and what
   is left is the plumbing: fvlm's own steps (CT to NIfTI, label map back, alignment on the image's grid),
   TotalSegmentator's (reorientation, resampling to 3 mm and 6 mm, the crop model for ``roi_subset``) and
   nnU-Net's (model loading, spawned preprocessing and export processes, sliding window).

    .venv/bin/python -m benchmarks.segment_speed --slices 120 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from benchmarks.record import markdown_table, record

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalsegmentator"
CASES = ("example_ct_sm.nii.gz", "example_ct.nii.gz")


def _best(fn, repeats: int) -> tuple[float, object]:
    """Fastest of ``repeats`` calls of ``fn`` (seconds) and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


# ------------------------------------------------------------------------------------------ multi-frame


def measure_multiframe(slices: int, size: int, repeats: int) -> list[list[str]]:
    """Rows: layout, files, MiB on disk, discovery s, read s (fastest of ``repeats``)."""
    from pydicom import uid

    from benchmarks.preprocess_speed import phantom
    from pipelines.preprocess.discover import discover
    from pipelines.preprocess.volume import load_volume
    from tests.pipelines.preprocess.dicom_fixtures import LEGACY_ENHANCED_CT, write_ct_series, write_multiframe

    hu, _ = phantom((slices, size, size))  # (Z, Y, X) int16, a torso-like volume (compresses like a CT)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, syntax in (("uncompressed", uid.ExplicitVRLittleEndian), ("JPEG 2000 lossless", uid.JPEG2000Lossless)):
            single = Path(tmp) / name / "single"
            paths = write_ct_series(single, hu, transfer_syntax=syntax)
            multi = write_multiframe(Path(tmp) / name / "multi" / "ct.dcm", paths, sop_class=LEGACY_ENHANCED_CT,
                                     transfer_syntax=syntax)
            reference = None
            for layout, folder in (("single-frame", single), ("Legacy Converted Enhanced", multi.parent)):
                t_disc, found = _best(lambda f=folder: discover(f), repeats)
                (ref,) = found.selected
                t_read, vol = _best(lambda r=ref: load_volume(r), repeats)
                arr = sitk.GetArrayFromImage(vol.image)
                if reference is None:
                    reference = arr
                np.testing.assert_array_equal(arr, reference)  # the same HU volume either way
                files = sorted(p for p in folder.iterdir() if p.is_file())
                mib = sum(p.stat().st_size for p in files) / 2**20
                rows.append([f"{layout}, {name}", len(files), f"{mib:.1f}", f"{t_disc:.3f}", f"{t_read:.3f}",
                             f"{t_disc + t_read:.3f}"])
    return rows


# ------------------------------------------------------------------------------------- TotalSegmentator


def _cpu_seconds() -> float:
    """CPU seconds of this process plus its finished children (nnU-Net's spawned workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class _NetworkTimer:
    """Seconds spent in nnU-Net's sliding-window network evaluation (``predict_logits_from_preprocessed_data``)."""

    def __init__(self) -> None:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        self.cls, self.real, self.seconds, self.calls = nnUNetPredictor, nnUNetPredictor.predict_logits_from_preprocessed_data, 0.0, 0

        def timed(predictor, data):
            t0 = time.perf_counter()
            try:
                return self.real(predictor, data)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        nnUNetPredictor.predict_logits_from_preprocessed_data = timed

    def take(self) -> tuple[float, int]:
        out, self.seconds, self.calls = (self.seconds, self.calls), 0.0, 0
        return out

    def close(self) -> None:
        self.cls.predict_logits_from_preprocessed_data = self.real


def _own_steps(image: sitk.Image, labels: sitk.Image, repeats: int) -> float:
    """fvlm's steps around TotalSegmentator, timed alone: the CT written as NIfTI, the returned label map
    saved by nibabel and read back by SimpleITK, and aligned on the image's grid."""
    import nibabel as nib

    from pipelines.preprocess.segment import resample_labels_onto

    with tempfile.TemporaryDirectory() as tmp:
        sitk.WriteImage(labels, str(Path(tmp) / "ref.nii.gz"))
        seg = nib.load(str(Path(tmp) / "ref.nii.gz"))
        seg = nib.Nifti1Image(np.asarray(seg.dataobj), seg.affine)

        def steps():
            sitk.WriteImage(image, str(Path(tmp) / "ct.nii.gz"))
            nib.save(seg, str(Path(tmp) / "seg.nii.gz"))
            return resample_labels_onto(sitk.ReadImage(str(Path(tmp) / "seg.nii.gz")), image, copy=False)

        t, _ = _best(steps, repeats)
    return t


def measure_totalseg(repeats: int) -> list[list[str]]:
    """Rows per real CT: fvlm ``segment()`` and the TotalSegmentator API called directly on the same NIfTI,
    interleaved (so that a shared machine's load falls on both alike), wall and CPU seconds (process + spawned
    workers) as medians of ``repeats``; the first call of the process; the network evaluation; fvlm's own
    steps timed alone."""
    from anatomy.catalog import load_anatomy_set
    from pipelines.preprocess.segment import create_segmenter, nnunet_weights_at
    from tests.pipelines.preprocess.totalseg_weights import write_tiny_total_weights

    classes = sorted({c for a in load_anatomy_set("fvlm15").anatomies for c in a.classes})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TOTALSEG_HOME_DIR"] = str(Path(tmp) / "home")  # TotalSegmentator's config.json goes here
        weights = write_tiny_total_weights(Path(tmp) / "weights", task_ids=(297, 298), favour=classes)
        seg = create_segmenter("totalsegmentator", classes=classes, fast=True, device="cpu", weights_dir=weights)
        timer, first = None, None
        for name in CASES:
            if not (DATA / name).is_file():
                continue
            image = sitk.ReadImage(str(DATA / name))
            src = Path(tmp) / "ct.nii.gz"
            sitk.WriteImage(image, str(src))

            def fvlm_call():
                return seg.segment(image, None)

            def api_call():
                from totalsegmentator.python_api import totalsegmentator

                with nnunet_weights_at(weights):
                    return totalsegmentator(src, None, ml=True, fast=True, roi_subset=classes, device="cpu",
                                            quiet=True, nr_thr_resamp=1, nr_thr_saving=1, skip_saving=True)

            if first is None:  # the first call of the process: imports of torch, nnU-Net, TotalSegmentator
                t0 = time.perf_counter()
                fvlm_call()
                first = time.perf_counter() - t0
                timer = _NetworkTimer()
            timed: dict[str, list[tuple[float, float, float]]] = {"fvlm": [], "api": []}
            labels = None
            for _ in range(repeats):
                for key, call in (("fvlm", fvlm_call), ("api", api_call)):
                    c0, t0 = _cpu_seconds(), time.perf_counter()
                    out = call()
                    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
                    timed[key].append((wall, cpu, timer.take()[0]))
                    if key == "fvlm":
                        labels = out
            assert labels is not None and labels.GetSize() == image.GetSize()
            own = _own_steps(image, labels, repeats)

            def med(key: str, i: int) -> float:
                return statistics.median(t[i] for t in timed[key])

            rows.append([name, "x".join(map(str, image.GetSize())),
                         f"{first:.1f}" if name == CASES[0] else "-",
                         f"{med('fvlm', 0):.1f}", f"{med('fvlm', 1):.1f}", f"{med('api', 0):.1f}",
                         f"{med('api', 1):.1f}", f"{med('fvlm', 2):.1f}", f"{own:.2f}"])
        if timer is not None:
            timer.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=120, help="slices of the multi-frame test series")
    ap.add_argument("--size", type=int, default=512, help="rows = columns of the multi-frame test series")
    ap.add_argument("--repeats", type=int, default=3, help="repeats per measurement")
    ap.add_argument("--note", default="", help="a line added to the notes (e.g. what else ran on the machine)")
    args = ap.parse_args()

    load0 = os.getloadavg()[0]
    mf = measure_multiframe(args.slices, args.size, args.repeats)
    table = markdown_table(
        [f"{args.size}x{args.size}x{args.slices} CT series", "files", "MiB", "discover s", "read s", "total s"], mf)
    ts = measure_totalseg(args.repeats)
    if ts:
        table += "\n\n" + markdown_table(
            ["CT (3 mm)", "voxels (x y z)", "first call s", "fvlm segment() s", "its CPU s",
             "TotalSegmentator API s", "its CPU s", "network s", "fvlm's own steps s"], ts)
    notes = (
        "Multi-frame: fastest of the repeats; `discover` reads headers (single-frame: one per file; multi-frame: "
        "one file whose per-frame functional groups give every slice's position and rescale), `read` assembles "
        "the HU volume through the same assembly; every read is checked equal to the single-frame one. "
        "TotalSegmentator: fast setting (3 mm model 297) with `roi_subset` = fvlm15's classes, so its 6 mm "
        "crop model 298 runs first; tiny random nnU-Net models (3 stages, 4-16 features, 118 outputs), "
        "`--device cpu`, one resampling thread. `fvlm segment()` = fvlm's segmenter call; `TotalSegmentator "
        "API` = `totalsegmentator()` called directly on the same NIfTI with the same options, the two "
        "interleaved; medians of the repeats, CPU seconds of the process plus its finished children (nnU-Net's "
        "spawned workers). `first call` = the first `segment()` of the process, which adds the imports of "
        "torch, nnU-Net and TotalSegmentator. `network` = nnU-Net's sliding-window evaluation of both models "
        "within `segment()`; `fvlm's own steps` = writing the CT as NIfTI, reading the label map back and "
        "aligning it on the image's grid, timed alone. The rest of `segment()` (`segment()` minus `network`) is "
        "TotalSegmentator's and nnU-Net's plumbing: for each of the two models nnU-Net loads the checkpoint "
        "and starts a preprocessing and an export process with the `spawn` start method, each importing torch "
        "and nnU-Net afresh, which dominates with a tiny network. With real weights the network term grows "
        "(nnU-Net's default plans have 32 to 320 features per stage, not 4 to 16) and the plumbing stays."
    )
    load = f"1-minute load average {load0:.1f} at the start and {os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores"
    notes += f"\n\nMachine load while measuring: {load}." + (f" {args.note}" if args.note else "")
    command = "python -m benchmarks.segment_speed " + shlex.join(sys.argv[1:])
    record("Multi-frame DICOM read and TotalSegmentator plumbing (CPU, tiny model)", table, notes=notes,
           command=command)


if __name__ == "__main__":
    main()
