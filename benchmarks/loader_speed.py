"""Training loader speed: cases/s through ``pipelines.cases`` (crop and resize modes) with 0, 1 and 2
DataLoader workers, on a small synthetic cohort preprocessed at the default 1 x 1 x 3 mm grid.

    .venv/bin/python -m benchmarks.loader_speed --cases 8 --epochs 2
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from benchmarks.record import markdown_table, record  # noqa: E402
from fvlm.model.tokenizer import train_wordpiece  # noqa: E402
from pipelines.cases.dataset import CaseDataset  # noqa: E402
from pipelines.cases.format import corpus_texts  # noqa: E402
from pipelines.cases.loader import ResumableSampler, build_loader  # noqa: E402
from pipelines.preprocess.run import PreprocessConfig, run as run_preprocess  # noqa: E402
from pipelines.preprocess.tables import TableSpec  # noqa: E402
from pipelines.synth.cohort import SynthConfig, make_cohort  # noqa: E402

SETTINGS = {"crop": (112, 256, 352), "resize": (32, 64, 64)}


def prepare(root: Path, cases: int) -> Path:
    synth, out = root / "synth", root / "prep"
    make_cohort(synth, SynthConfig(cases=cases, seed=0, workers=min(4, os.cpu_count() or 1)))
    run_preprocess(PreprocessConfig(
        input=synth / "images", out=out, segmenter="masks", segmenter_options={"path": synth / "segmentations"},
        reports=TableSpec(synth / "reports.csv"), labels=TableSpec(synth / "labels.csv"), case_id="key",
        progress=False, workers=min(4, os.cpu_count() or 1)))
    return out


def measure(data: Path, tok, mode: str, workers: int, epochs: int, batch: int) -> list[object]:
    ds = CaseDataset(data, tok, crop_size_zyx=SETTINGS[mode], mode=mode, train=True, max_text_len=128)
    sampler = ResumableSampler(len(ds), batch_size=batch, seed=0)
    loader = build_loader(ds, sampler, batch_size=batch, workers=workers)
    sampler.set_epoch(0)
    for _ in loader:  # warm-up epoch: worker start, imports, page cache
        pass
    n, t0 = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch)
        for b in loader:
            n += int(b["index"].shape[0])
    dt = time.perf_counter() - t0
    rate = n / dt
    return [mode, "x".join(map(str, SETTINGS[mode])), workers, n, f"{rate:.1f}",
            f"{rate / max(workers, 1):.1f}", f"{dt / n * 1e3:.0f}"]


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare(Path(tmp), args.cases)
        tok = train_wordpiece(corpus_texts(data), vocab_size=2000, max_length=128)
        rows = [measure(data, tok, mode, w, args.epochs, args.batch) for mode in SETTINGS for w in args.workers]
    table = markdown_table(["mode", "output size (z, y, x)", "workers", "cases timed", "cases/s", "cases/s per worker",
                            "ms/case"], rows)
    record("Training data loader (CPU)", table,
           notes="Synthetic cohort (`fvlm synth`, small) preprocessed at the default 1 x 1 x 3 mm grid (about "
                 "112-230 x 270 x 352 voxels a case), npy memory maps in the page cache; one warm-up epoch, "
                 "then timed epochs; train mode (random crop/flips), batch 2, texts tokenised to 128. "
                 "workers 0 = loading in the main process (per-worker column = that process). "
                 "torch threads 1 per process.")


if __name__ == "__main__":
    main()
