"""Training speed on CPU: samples/s, seconds per optimizer step and peak RSS of the tiny recipe and of the base
model, through the real trainer loop (``pipelines.train.trainer.Trainer.train``: DeepSpeed engine, the
recipe's objective, backward, clipping, AdamW step, LR schedule, metrics).

    .venv/bin/python -m benchmarks.train_speed                       # tiny + base (112 x 256 x 352, batch 2)
    .venv/bin/python -m benchmarks.train_speed --base-crop 64 128 160 --base-steps 3

Each size runs in its own process (so peak RSS is that size's alone) on in-memory cases shaped like the
loader's items (image, anatomy map, 15 anatomy texts of ``max_text_len`` tokens, labels): the figures are
the model step; the loader's own speed is ``benchmarks.loader_speed``. Checkpoints and the final export are
switched off (they are disk speed, not training speed). The first ``--warmup`` steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
A, K = 15, 8  # anatomies (fvlm15), labels per anatomy


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Cases:
    """``n`` in-memory cases shaped like ``CaseDataset`` items at ``shape`` (z, y, x), ``length`` tokens per text."""

    def __init__(self, n: int, shape: tuple[int, int, int], length: int, vocab: int) -> None:
        import torch

        g = torch.Generator().manual_seed(0)
        self.n = n
        self.images = torch.rand((n, 1, *shape), generator=g)
        grids = [torch.arange(s) * 4 // s for s in shape]
        cell = (grids[0].view(-1, 1, 1) * 16 + grids[1].view(1, -1, 1) * 4 + grids[2].view(1, 1, -1)) % (A + 1)
        self.anatomy = cell.expand(*shape).clone()
        self.ids = torch.randint(5, vocab, (n, A, length), generator=g)
        self.normal = torch.rand((n, A), generator=g) < 0.5
        self.labels = (torch.rand((n, A, K), generator=g) < 0.3).float() * (~self.normal).unsqueeze(-1)
        self.length = length

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item):
        import torch

        i = int(item[1]) if isinstance(item, tuple) else int(item)
        ids = self.ids[i]
        return {"image": self.images[i].clone(), "anatomy": self.anatomy.clone(), "input_ids": ids,
                "attention_mask": torch.ones_like(ids), "report_input_ids": ids[0],
                "report_attention_mask": torch.ones(self.length, dtype=torch.int64),
                "cut": torch.zeros(A, dtype=torch.bool), "normal": self.normal[i].clone(),
                "text_id": ids[:, 0] * 100_000 + ids[:, 1], "anatomy_labels": self.labels[i].clone(),
                "case_id": torch.tensor(i), "index": torch.tensor(i)}


def worker(size: str, crop: list[int], batch: int, steps: int, warmup: int) -> dict:
    """One size in this process: train ``warmup + steps`` steps, time the last ``steps``."""
    import torch

    from fvlm import distributed as dist_utils
    from fvlm.model import count_parameters, train_wordpiece
    from pipelines.cases.loader import ResumableSampler, build_loader
    from pipelines.config.recipe import load_recipe
    from pipelines.train.engine import setup_distributed
    from pipelines.train.run_log import read_metrics
    from pipelines.train.trainer import DataSource, Trainer, model_config_for

    total = warmup + steps
    recipe = "tiny" if size == "tiny" else "fvlm-disease"
    sets = [f"data.batch_size={batch}", f"data.crop_size=[{crop[0]}, {crop[1]}, {crop[2]}]", "data.workers=0",
            f"optim.max_steps={total}", "logging.every=1", "logging.progress=false", "logging.tensorboard=false",
            f"checkpoint.every={total + 1}"]
    if size != "tiny":
        sets.append(f"model.preset={size}")  # position embeddings adapt to a crop other than image_size
    setup_distributed()
    cfg = load_recipe(recipe, sets)
    model_cfg = model_config_for(cfg)
    length = cfg.data.max_text_len or model_cfg.text.max_length
    tok = train_wordpiece([f"word{i} lung normal" for i in range(60)], vocab_size=100, min_frequency=1)
    data = DataSource(Cases(max(2 * batch, 4), tuple(crop), length, model_cfg.text.vocab_size), ResumableSampler,
                      build_loader)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", data=data, tokenizer=tok, model_config=model_cfg, workers=0)
        trainer.save = lambda: None  # disk speed is not training speed
        trainer.export = lambda: None
        params = count_parameters(trainer.engine.module)
        try:
            trainer.train()
        finally:
            trainer.close()
        records = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
    dist_utils.destroy()
    timed = records[warmup:]
    seconds = sum(batch / r["samples_per_s"] for r in timed)
    return {"size": size, "recipe": recipe, "crop": crop, "batch": batch, "steps": len(timed),
            "params": params, "samples_per_s": batch * len(timed) / seconds, "s_per_step": seconds / len(timed),
            "loss_first": records[0]["loss"], "loss_last": records[-1]["loss"], "peak_rss_mib": _peak_rss_mib(),
            "threads": torch.get_num_threads()}


def _run_worker(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.train_speed", "--worker", *args], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _total_params(p) -> str:
    n = p.get("total") if isinstance(p, dict) else p
    return f"{n / 1e6:.1f} M" if isinstance(n, (int, float)) else str(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny-steps", type=int, default=30)
    ap.add_argument("--base-steps", type=int, default=3)
    ap.add_argument("--base-batch", type=int, default=2)
    ap.add_argument("--base-crop", type=int, nargs=3, default=[112, 256, 352], metavar=("Z", "Y", "X"))
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones (tiny: 5)")
    ap.add_argument("--skip-base", action="store_true")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ["DS_ACCELERATOR"] = "cpu"
    cache = ROOT / ".pytest_cache" / "d" / "torch_extensions"  # the tests' DeepSpeed op build, if there
    if cache.is_dir():
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache))
    if args.worker:
        size, crop, batch, steps, warmup = args.worker
        res = worker(size, [int(v) for v in crop.split("x")], int(batch), int(steps), int(warmup))
        print(json.dumps(res))
        return

    from benchmarks.record import markdown_table, record

    runs = [_run_worker(["tiny", "32x64x64", "4", str(args.tiny_steps), "5"])]
    if not args.skip_base:
        crop = "x".join(str(v) for v in args.base_crop)
        runs.append(_run_worker(["base", crop, str(args.base_batch), str(args.base_steps), str(args.warmup)]))
    rows = [[r["size"], r["recipe"], " x ".join(str(v) for v in r["crop"]), _total_params(r["params"]), r["batch"],
             r["steps"], f"{r['samples_per_s']:.2f}", f"{r['s_per_step']:.2f}", f"{r['peak_rss_mib']:.0f}"]
            for r in runs]
    table = markdown_table(["model", "recipe (objective)", "input (z, y, x)", "params", "batch", "timed steps",
                            "samples/s", "s/step", "peak RSS MiB"], rows)
    threads = runs[0]["threads"]
    record("Training speed on CPU (tiny recipe, base model)", table,
           notes=f"fp32 on CPU, DeepSpeed ZeRO-0/1 engine, one process, torch threads = {threads}; the real "
                 "Trainer loop (forward, disease_aware objective, backward, clipping, AdamW, LR schedule, metrics) "
                 "on in-memory cases shaped like the loader's items (the loader is benchmarks.loader_speed); "
                 "checkpoints and export off; untimed warm-up steps first (tiny 5, base "
                 f"{args.warmup}). Base = configs/model/base.yaml (ViT-B 16 x 16 x 32 patches + BERT-base, "
                 "15 anatomy texts of 128 tokens per case). No GPU was available: the CUDA figures of issue 5 "
                 "(base samples/s in bf16, peak memory at batch 14, vision-tower MFU) are not measured.")


if __name__ == "__main__":
    main()
