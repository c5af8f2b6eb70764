"""Zero-shot evaluation speed on CPU: cases/s of the tiny and the base model (untrained) through the real
``fvlm evaluate`` scoring path (``CaseDataset`` eval view, ``pipelines.inference.windows`` windows around each
anatomy or the central crop, ``FVLM.encode_image``, ``fvlm.zeroshot.score_cases``) on a synthetic cohort
preprocessed by ``fvlm preprocess``; the base model at its full input size (112 x 256 x 352, the small
synthetic cases padded with air). Prompt encoding (once per run) and the metrics (bootstrap CIs, thresholds;
measured on the tiny model's scores with 1,000 resamples) are shown separately.

    .venv/bin/python -m benchmarks.eval_speed                    # tiny: 8 cases, base: 2 cases
    .venv/bin/python -m benchmarks.eval_speed --base-cases 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.record import markdown_table, record


def cohort(root: Path, cases: int) -> Path:
    from pipelines.cli import main
    from pipelines.synth.cohort import SynthConfig, make_cohort
    from tests.pipelines.preprocess.preprocess_fixtures import fast_config

    make_cohort(root / "synth", SynthConfig(cases=cases, seed=1, format="nifti", normal_share=0.25))
    synth = root / "synth"
    assert main(["preprocess", str(synth / "images"), str(root / "prep"), "--masks", str(synth / "segmentations"),
                 "--reports", str(synth / "reports.csv"), "--labels", str(synth / "labels.csv"),
                 "--config", str(fast_config(root)), "--case-id", "key", "--no-progress"]) == 0
    return root / "prep"


def bench(size: str, prep: Path, n_cases: int, view: str) -> dict:
    from anatomy.catalog import load_task_catalog
    from fvlm.model import count_parameters, create_model, train_wordpiece
    from fvlm.zeroshot import encode_prompts
    from pipelines.cases.dataset import CaseDataset
    from pipelines.cases.format import corpus_texts, read_run
    from pipelines.evaluate.run import score_dataset, score_windows

    tok = train_wordpiece(corpus_texts(prep), vocab_size=400, min_frequency=1)
    names = tuple(read_run(prep)["anatomies"][str(i)] for i in range(1, 16))
    torch.manual_seed(0)
    model = create_model(size, anatomy_names=names, text={"vocab_size": len(tok)}).eval()
    size_zyx = tuple(model.config.vision.image_size)
    t0 = time.perf_counter()
    bank = encode_prompts(model, tok, load_task_catalog("fvlm54"))
    t_prompts = time.perf_counter() - t0
    ds = CaseDataset(prep, tok, crop_size_zyx=size_zyx, mode="crop", train=False)

    class Head(torch.utils.data.Dataset):
        rows, case_json, _load_arrays = ds.rows[:n_cases], ds.case_json, ds._load_arrays
        anatomy_names, run = ds.anatomy_names, ds.run

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return ds[i]

    sub = Head()
    t0 = time.perf_counter()
    if view == "windows":
        scores, n_win = score_windows(model, sub, bank, size_zyx, 0.5, batch_size=4)
    else:
        scores, n_win = score_dataset(model, sub, bank, batch_size=4), [1] * len(sub)
    dt = time.perf_counter() - t0
    return {"size": size, "params": count_parameters(model)["total"], "input": "x".join(map(str, size_zyx)),
            "view": view, "cases": len(sub), "windows": int(sum(n_win)), "seconds": dt,
            "cases_s": len(sub) / dt, "windows_s": sum(n_win) / dt, "prompts_s": t_prompts, "scores": scores}


def metrics_seconds(scores: np.ndarray, n_boot: int = 1000) -> tuple[float, int]:
    from fvlm import metrics as M

    rng = np.random.default_rng(0)
    y = (rng.random(scores.shape) < 0.4).astype(float)
    t0 = time.perf_counter()
    for j in range(scores.shape[1]):
        M.evaluate_task(y[:, j], scores[:, j], min_positives=1, n_boot=n_boot, seed=0)
    return time.perf_counter() - t0, scores.shape[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny-cases", type=int, default=8)
    ap.add_argument("--base-cases", type=int, default=2)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        prep = cohort(Path(tmp), max(args.tiny_cases, args.base_cases))
        runs = [bench("tiny", prep, args.tiny_cases, "windows"), bench("tiny", prep, args.tiny_cases, "center")]
        if args.base_cases > 0:
            runs += [bench("base", prep, args.base_cases, "windows"), bench("base", prep, args.base_cases, "center")]
        m_s, n_tasks = metrics_seconds(runs[0]["scores"])
    rows = [[r["size"], f"{r['params'] / 1e6:.1f} M", r["input"], r["view"], r["cases"], r["windows"],
             f"{r['seconds']:.2f}", f"{r['cases_s']:.3g}", f"{r['windows_s']:.3g}", f"{r['prompts_s']:.2f}"]
            for r in runs]
    table = markdown_table(["model", "params", "input (z x y x x)", "view", "cases", "windows", "scoring s",
                            "cases/s", "windows/s", "prompt encoding s (once)"], rows)
    notes = (f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch 4 windows; untrained "
             "models (speed does not depend on the weights); synthetic cases preprocessed by `fvlm preprocess` "
             "with the test config (small volumes, so the base model's windows are mostly air padding). "
             "windows: one window per distinct anatomy-centred origin (15-anatomy set). Metrics, separately: "
             f"{m_s:.2f} s for {n_tasks} tasks x {runs[0]['cases']} cases at 1,000 bootstrap resamples "
             "(grows with cases x resamples, not with the model).")
    if args.no_record:
        print(table + "\n\n" + notes)
    else:
        record("Zero-shot evaluation speed (CPU)", table, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
