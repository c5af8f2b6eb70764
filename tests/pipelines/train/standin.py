"""The stand-in trainer run shared by the trainer and resume-safety tests: in-memory cases shaped like
``CaseDataset`` items and the tiny recipe trained on them in this process (:func:`run_standin`)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.cases.loader import ResumableSampler, build_loader
from pipelines.config.recipe import load_recipe
from pipelines.train.run_log import read_metrics

A, L, K = 15, 8, 3  # anatomies, tokens per text, labels per anatomy
SHAPE = (32, 64, 64)


class StandIn(torch.utils.data.Dataset):
    """In-memory cases shaped like ``CaseDataset`` items; ``nan`` indices get a NaN image;
    ``normal_from``: indices from there on are normal in every anatomy."""

    def __init__(self, n: int = 8, nan: tuple[int, ...] = (), normal_from: int | None = None,
                 normal_idx: tuple[int, ...] = ()) -> None:
        g = torch.Generator().manual_seed(0)
        self.n, self.nan = n, set(nan)
        self.images = torch.rand((n, 1, *SHAPE), generator=g)
        z = torch.arange(SHAPE[0]).view(-1, 1, 1) * 4 // SHAPE[0]
        y = torch.arange(SHAPE[1]).view(1, -1, 1) * 4 // SHAPE[1]
        x = torch.arange(SHAPE[2]).view(1, 1, -1) * 4 // SHAPE[2]
        cell = (z * 16 + y * 4 + x) % (A + 1)  # (Z, Y, X) labels 0..A
        self.anatomy = cell.expand(*SHAPE).clone()
        self.ids = torch.randint(5, 60, (n, A, L), generator=g)
        self.normal = torch.rand((n, A), generator=g) < 0.5
        if normal_from is not None:
            self.normal[normal_from:] = True
        for i in normal_idx:
            self.normal[i] = True
        self.labels = (torch.rand((n, A, K), generator=g) < 0.3).float() * (~self.normal).unsqueeze(-1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item):
        i = int(item[1]) if isinstance(item, tuple) else int(item)
        image = self.images[i].clone()
        if i in self.nan:
            image[:] = float("nan")
        ids = torch.where(self.normal[i].unsqueeze(-1), torch.full((A, L), 7), self.ids[i])
        return {"image": image, "anatomy": self.anatomy.clone(), "input_ids": ids,
                "attention_mask": torch.ones(A, L, dtype=torch.int64), "report_input_ids": ids[:, 0],
                "report_attention_mask": torch.ones(A, dtype=torch.int64), "cut": torch.zeros(A, dtype=torch.bool),
                "normal": self.normal[i].clone(), "text_id": ids[:, 0] * 1000 + ids[:, 1],
                "anatomy_labels": self.labels[i].clone(), "case_id": torch.tensor(i), "index": torch.tensor(i)}


def _tokenizer():
    from fvlm.model import train_wordpiece

    return train_wordpiece([f"word{i} lung normal" for i in range(60)], vocab_size=100, min_frequency=1)


def run_standin(run: Path, *, steps: int, every: int = 3, resume: bool = False, n: int = 8, batch: int = 4,
                nan: tuple[int, ...] = (), normal_from: int | None = None, stage: str = "zero0", fault=None,
                max_nonfinite: int = 3, schedule_steps: int = 6, normal_idx: tuple[int, ...] = (),
                sets: tuple[str, ...] = ()):
    """Train the tiny recipe on the stand-in data in this process; returns the metrics records. ``sets``: more
    ``--set`` overrides (later win)."""
    from pipelines.train.engine import setup_distributed
    from pipelines.train.trainer import DataSource, Trainer, model_config_for

    setup_distributed()
    cfg = load_recipe("tiny", [f"checkpoint.every={every}", f"data.batch_size={batch}", "logging.progress=false",
                               f"optim.max_steps={schedule_steps}", f"optim.max_nonfinite={max_nonfinite}",
                               "logging.tensorboard=false", *sets])
    tok = _tokenizer()
    model_cfg = model_config_for(cfg).replace(text={"vocab_size": 100})
    data = DataSource(StandIn(n, nan, normal_from, normal_idx), ResumableSampler, build_loader)
    trainer = Trainer(cfg, run, data=data, tokenizer=tok, model_config=model_cfg, deepspeed=stage, max_steps=steps,
                      resume=resume, workers=0)
    trainer.checkpoints.fault = fault
    try:
        trainer.train()
    finally:
        trainer.close()
    return read_metrics(run / "metrics.jsonl")
