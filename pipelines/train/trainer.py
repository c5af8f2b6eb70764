"""The fVLM trainer on the DeepSpeed engine: one code path from one CPU process to many GPU nodes.

Per optimizer step (``optim.grad_accum`` micro-batches): forward through the engine, every objective of
the recipe on the model's output and the batch, ``loss = sum_term weight * term``, ``engine.backward`` and
``engine.step``. Every rank runs all of that every micro-step, whatever its data (the objectives' gathers
have backward collectives; see :mod:`fvlm.distributed`) - even when the loss is non-finite. A non-finite
step is then skipped instead: the ranks agree through one all-reduce of a flag, the client AdamW's update
becomes a no-op (:class:`~pipelines.train.engine.SkippableAdamW`), the step is logged with
``skipped: true``, and after ``optim.max_nonfinite`` such steps in a row training stops with an error.
The loss is never rescaled: the gathers' backward already makes the ranks' averaged gradients equal the
single-process gradient of the global batch.

The LR schedule (warm-up + cosine LambdaLR) is stepped by the trainer once per optimizer step, skipped or
not, so it is the same under every ZeRO stage, and its state goes into the checkpoint's trainer.json.
Data position: the ``ResumableSampler``'s (epoch, delivered samples) goes into the checkpoint; item
randomness is a function of (seed, epoch, index) (``pipelines.cases``), so a resumed run sees the
same batches, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from fvlm import distributed as dist_utils
from fvlm.losses import create_objective
from fvlm.model import FVLM, ModelConfig, create_model, load_model_config, load_tokenizer, save_pretrained, train_wordpiece
from pipelines.config.recipe import TrainConfig
from pipelines.train.checkpoint import CheckpointManager
from pipelines.train.engine import build_engine, deepspeed_config, device_for_rank
from pipelines.train.run_log import MetricsLogger

log = logging.getLogger(__name__)

__all__ = ["DataSource", "Trainer", "NonFiniteLossError", "build_tokenizer", "build_data", "model_config_for",
           "check_objective_heads"]

#: Batch keys the model's forward takes.
MODEL_KEYS = ("image", "anatomy", "input_ids", "attention_mask", "cut", "report_input_ids", "report_attention_mask")
TEXT_KEYS = ("input_ids", "attention_mask", "report_input_ids", "report_attention_mask")


def reads_text(objectives: list[Any], model: Any) -> bool:
    """Whether a training step needs the text tower: some objective or some model head reads text (each says
    so with ``reads_text``, default True). The ``supervised`` recipe (objective and ``task_classifier`` head both
    False) trains the image path alone; its step at the benchmark geometry was a quarter text encoding."""
    return (any(getattr(obj, "reads_text", True) for obj in objectives)
            or any(getattr(head, "reads_text", True) for head in model.heads.values()))


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss."""


@dataclasses.dataclass
class DataSource:
    """What the trainer needs from the data side (``pipelines.cases`` by default; stand-ins in tests)."""

    dataset: Any
    """Map-style dataset of item dicts (``pipelines.cases.dataset.CaseDataset``)."""
    make_sampler: Callable[..., Any]
    """``(n, *, batch_size, seed, rank, world_size) -> sampler`` (``ResumableSampler``): ``len``, ``epoch``,
    ``state_dict``/``load_state_dict`` of its (epoch, delivered position); iterating continues from there."""
    make_loader: Callable[..., Any]
    """``(dataset, sampler, *, batch_size, workers) -> loader`` whose iteration advances the sampler by each
    batch it hands out (``build_loader``); one pass = the rest of the current epoch."""


def check_objective_heads(objectives: list, model_config: ModelConfig) -> None:
    """Fail at start, not at the first step, when an objective reads the outputs of a model head
    (``needs_heads``) the recipe does not build."""
    for spec, objective in objectives:
        missing = [h for h in getattr(objective, "needs_heads", ()) if h not in model_config.heads]
        if missing:
            raise ValueError(
                f"objective {spec.name!r} reads the outputs of the model head(s) {', '.join(missing)}, which the "
                f"recipe does not build: add them under model.heads (e.g. model: {{heads: {{{missing[0]}: {{}}}}}})")
        if "prompt_context" in getattr(objective, "needs_heads", ()) and hasattr(objective, "label_threshold"):
            # the label sentences (dataset extra of the head) and the objective's targets binarise the same labels
            head_t = float((model_config.heads.get("prompt_context") or {}).get("label_threshold", 0.5))
            if float(objective.label_threshold) != head_t:
                raise ValueError(
                    f"objective {spec.name!r} counts a label above label_threshold={objective.label_threshold:g} but "
                    f"the prompt_context head writes the label sentences with label_threshold={head_t:g}: set the "
                    "same value in both (model.heads.prompt_context.label_threshold and the objective's options)")


def model_config_for(cfg: TrainConfig) -> ModelConfig:
    """The recipe's model config (preset + overrides), before the tokenizer sets the vocabulary size."""
    overrides = dict(cfg.model.overrides)
    if cfg.model.heads:
        overrides["heads"] = {**overrides.get("heads", {}), **cfg.model.heads}
    return load_model_config(cfg.model.preset, **overrides)


def build_tokenizer(model_cfg: ModelConfig, data_dir: Path | None, run_dir: Path,
                    texts: Callable[[], list[str]] | None = None) -> Any:
    """The text tokenizer: ``model.text.tokenizer`` if named; else RUN/tokenizer if a previous start wrote
    it; else a WordPiece trained by rank 0 on the corpus and saved to RUN/tokenizer (the others wait)."""
    if model_cfg.text.tokenizer:
        return load_tokenizer(model_cfg.text.tokenizer)
    folder = Path(run_dir) / "tokenizer"
    if dist_utils.is_main_process() and not folder.is_dir():
        if texts is None:
            from pipelines.cases.format import corpus_texts

            corpus = corpus_texts(data_dir)
        else:
            corpus = texts()
        tok = train_wordpiece(corpus, vocab_size=model_cfg.text.vocab_size, max_length=model_cfg.text.max_length)
        tmp = folder.with_name(f".tokenizer.tmp-{os.getpid()}")
        tok.save_pretrained(str(tmp))
        os.replace(tmp, folder)
        log.info("trained a WordPiece tokenizer (%d tokens) on %d texts -> %s", len(tok), len(corpus), folder)
    dist_utils.barrier()
    return load_tokenizer(folder)


def build_data(cfg: TrainConfig, data_dir: Path, tokenizer: Any, max_text_len: int,
               extras: tuple[str, ...] = (), windows_hu: Any = None) -> DataSource:
    """The loader of ``pipelines.cases`` on a preprocess output folder; ``extras``: the dataset extras
    the model's heads need (``fvlm.model.heads.data_extras_for``); ``windows_hu``: the model's input windows
    (``vision.input_windows_hu``; None: the preprocess window, one channel)."""
    from pipelines.cases.dataset import CaseDataset, truncated_text_shares
    from pipelines.cases.loader import ResumableSampler, build_loader

    dataset = CaseDataset(data_dir, tokenizer, crop_size_zyx=cfg.data.crop_size, mode=cfg.data.mode, train=True,
                          max_text_len=max_text_len, report_max_len=cfg.data.report_max_len, seed=cfg.seed,
                          flip_axes=cfg.data.flip_axes, flip_prob=cfg.data.flip_prob,
                          swap_laterality=cfg.data.swap_laterality,
                          min_visible_fraction=cfg.data.min_visible_fraction, extras=extras,
                          windows_hu=windows_hu)
    cut = {n: v for n, v in truncated_text_shares(dataset).items() if v[0] > 0.05}
    if cut:
        log.warning("data.max_text_len %d cuts the end off %s: findings late in a text never reach the text "
                    "tower; raise data.max_text_len", dataset.max_text_len,
                    ", ".join(f"{v[0]:.0%} of {n} texts (longest {v[1]} tokens)" for n, v in cut.items()))
    return DataSource(dataset, ResumableSampler, build_loader)


class Trainer:
    """Builds the engine and runs the loop; see the module docstring. Call :meth:`train`, then :meth:`close`."""

    def __init__(self, cfg: TrainConfig, run_dir: str | os.PathLike, *, data: DataSource, tokenizer: Any,
                 model_config: ModelConfig, deepspeed: str | None = None, max_steps: int | None = None,
                 resume: bool = False, workers: int | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.data = data
        self.tokenizer = tokenizer
        self.workers = cfg.data.workers if workers is None else workers
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.device = device_for_rank()
        self.main = dist_utils.is_main_process()

        # Model: the same initialisation on every rank (DeepSpeed also broadcasts rank 0's weights).
        torch.manual_seed(cfg.seed)
        self.model = create_model(model_config)
        self.objectives = [(spec, create_objective(spec.name, **spec.options)) for spec in cfg.objectives]
        check_objective_heads(self.objectives, self.model.config)
        # Whole-report tokens feed the text tower only for objectives that read the global text embedding
        # (``reads_report``, e.g. clip_global); the others get the anatomy texts' mean and skip that cost.
        self.uses_report = any(getattr(obj, "reads_report", False) for _, obj in self.objectives)
        self.uses_text = reads_text([obj for _, obj in self.objectives], self.model)

        # Schedule length from the recipe; --max-steps only stops earlier.
        b = cfg.data.batch_size
        self.sampler = data.make_sampler(len(data.dataset), batch_size=b, seed=cfg.seed, rank=self.rank,
                                         world_size=self.world)
        self.micro_per_epoch = len(self.sampler) // b
        self.steps_per_epoch = self.micro_per_epoch / cfg.optim.grad_accum
        if self.micro_per_epoch < cfg.optim.grad_accum:
            raise ValueError(
                f"{len(data.dataset)} cases give no full optimizer step at batch {b} x {self.world} processes x "
                f"{cfg.optim.grad_accum} accumulation; lower data.batch_size or add cases"
            )
        self.total_steps = cfg.optim.max_steps or int(cfg.optim.epochs * self.micro_per_epoch) // cfg.optim.grad_accum
        self.stop_step = min(self.total_steps, max_steps) if max_steps else self.total_steps

        ds_cfg = deepspeed_config(deepspeed or cfg.deepspeed, micro_batch=b, grad_accum=cfg.optim.grad_accum,
                                  world_size=self.world, grad_clip=cfg.optim.grad_clip,
                                  on_gpu=self.device.type == "cuda")
        self.zero_stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
        # DeepSpeed 0.19's fp32 stage-0 clipping fails on 0-dim parameters (the log temperature): there the
        # trainer clips the all-reduced gradients itself with torch, before engine.step().
        fp32_stage0 = self.zero_stage == 0 and not ds_cfg.get("bf16", {}).get("enabled", False)
        self.manual_clip = cfg.optim.grad_clip if fp32_stage0 else 0.0
        if fp32_stage0:
            ds_cfg["gradient_clipping"] = 0.0
        self.engine, self.optimizer, self.scheduler = build_engine(self.model, cfg.optim, ds_cfg, self.total_steps)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep=cfg.checkpoint.keep)

        # Run directory and resume; one writer per run folder (RUN/.lock, rank 0 holds it).
        self.step, self.nonfinite_in_a_row = 0, 0
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = self._lock_run_dir()
        try:
            self._start(cfg, data, resume, ds_cfg, b)
        except BaseException:
            self._release_lock()
            raise

    def _start(self, cfg: TrainConfig, data: DataSource, resume: bool, ds_cfg: dict[str, Any], b: int) -> None:
        """Resume (or not) under the run folder's lock: clean interrupted saves and exports, check the recipe
        against config.yaml, write it, restore the latest checkpoint, build the loader and the metrics log."""
        if self.main:
            for tmp in self.run_dir.glob(".model.tmp-*"):  # an export killed before its rename
                log.warning("removing an interrupted model export: %s", tmp)
                shutil.rmtree(tmp, ignore_errors=True)
        self.checkpoints.clean_partial()
        latest = self.checkpoints.latest()
        if latest is not None and not resume:
            raise FileExistsError(f"{self.run_dir} already holds checkpoints (latest {latest.name}); pass --resume "
                                  "to continue that run or choose another --output")
        if resume and latest is not None:
            self._check_resume_config(ds_cfg)
        if self.main:
            from pipelines.atomic import write_text_atomic

            write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump({**cfg.to_dict(), "resolved": {
                "deepspeed": ds_cfg, "world_size": self.world, "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch, "model": self.model.config.to_dict()}}, sort_keys=False))
        if resume and latest is not None:
            state = self.checkpoints.load(self.engine, latest)
            self.scheduler.load_state_dict(state["scheduler"])
            self.sampler.load_state_dict(state["sampler"])
            self.step, self.nonfinite_in_a_row = state["step"], state["nonfinite_in_a_row"]
            log.info("resumed from %s (step %d, epoch %d)", latest, self.step, self.sampler.epoch)
        elif resume:
            log.warning("--resume: no checkpoint in %s yet; starting from scratch", self.checkpoints.folder)
        self.loader = data.make_loader(data.dataset, self.sampler, batch_size=b, workers=self.workers)
        self.metrics = MetricsLogger(self.run_dir, enabled=self.main, tensorboard=cfg.logging.tensorboard,
                                     progress=cfg.logging.progress, total_steps=self.stop_step,
                                     start_step=self.step)

    def _lock_run_dir(self) -> Any:
        """Rank 0 takes RUN/.lock (:class:`pipelines.atomic.FolderLock`); every rank learns whether it did, so
        that all of them stop together when another run holds the folder."""
        from pipelines.atomic import FolderLock, FolderLocked

        lock, error = None, None
        if self.main:
            try:
                lock = FolderLock(self.run_dir / ".lock", f"fvlm train ({self.world} process(es))").acquire()
            except FolderLocked as e:
                error = str(e)
        if dist_utils.is_distributed():
            import torch.distributed as tdist

            box = [error]
            tdist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
            error = box[0]
        if error is not None:
            raise FolderLocked(error)
        return lock

    def _release_lock(self) -> None:
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
            self._lock = None

    def _check_resume_config(self, ds_cfg: dict[str, Any]) -> None:
        """``--resume`` continues the run that ``config.yaml`` records: a recipe (or DeepSpeed config) that
        differs outside :data:`~pipelines.config.recipe.RESUME_MAY_CHANGE` is refused, naming the keys (every
        rank reads the file, so every rank raises)."""
        from pipelines.config.recipe import RESUME_MAY_CHANGE, describe_diff, resume_drift

        path = self.run_dir / "config.yaml"
        try:
            saved = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"--resume: {path} cannot be read ({e}); it records the run's recipe: restore it, or "
                             "start a new run with another --output") from None
        if not isinstance(saved, dict):
            raise ValueError(f"--resume: {path} holds no recipe; restore it or start a new run with another --output")
        diff = resume_drift(saved, self.cfg, {"deepspeed": json.loads(json.dumps(ds_cfg))})
        if diff:
            raise ValueError(
                f"--resume: the recipe differs from the run's {path.name} in {describe_diff(diff)}; a resumed run "
                f"keeps its recipe (only {', '.join(RESUME_MAY_CHANGE)} may change). Resume with the saved recipe "
                f"(--config {path}), or start a new run with another --output")

    # ------------------------------------------------------------------------------------------ loop
    def _batches(self):
        """Micro-batches from the current data position on, epoch after epoch (an optimizer step may span
        the end of an epoch when ``grad_accum`` does not divide the epoch's micro-batches)."""
        while True:
            for batch in self.loader:  # each pass runs from the sampler's position to the epoch's end
                yield batch

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        half = torch.bfloat16 if self.engine.bfloat16_enabled() else None
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, non_blocking=True)
                if k == "image" and half is not None:
                    v = v.to(half)
            out[k] = v
        return out

    def _micro_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = self._to_device(batch)
        keys = MODEL_KEYS if self.uses_report else MODEL_KEYS[:-2]  # the report tower only when read
        if not self.uses_text:  # a text-free forward: no anatomy texts, no report (FVLM.forward)
            keys = tuple(k for k in keys if k not in TEXT_KEYS)
        keys = keys + self.model.batch_keys  # fields the model's heads read
        given = {k: batch[k] for k in keys if k in batch}
        if not self.uses_text:
            given.update(input_ids=None, attention_mask=None)
        out = self.engine(**given)
        terms: dict[str, torch.Tensor] = {}
        loss = None
        for spec, objective in self.objectives:
            for name, value in objective(**out, **batch).items():
                terms[name] = value
                loss = spec.weight * value if loss is None else loss + spec.weight * value
        return loss, terms

    def _nonfinite_anywhere(self, local: bool) -> bool:
        """All ranks agree: True when any rank saw a non-finite loss in this step."""
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        if dist_utils.is_distributed():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def train(self) -> dict[str, Any]:
        """Run until the stop step; checkpoint every ``checkpoint.every`` steps and at the end; export."""
        cfg, accum = self.cfg, self.cfg.optim.grad_accum
        global_batch = cfg.data.batch_size * self.world * accum
        batches = self._batches()
        self.engine.train()
        last_saved = self.step
        t_start, samples = time.perf_counter(), 0
        while self.step < self.stop_step:
            t0 = time.perf_counter()
            loss_sum, term_sums, bad = 0.0, {}, False
            lr = self.scheduler.get_last_lr()[0]
            for micro in range(accum):
                loss, terms = self._micro_step(next(batches))
                value = float(loss.detach())
                bad = bad or not math.isfinite(value)
                self.engine.backward(loss)  # always: the objectives' gathers have backward collectives
                if micro == accum - 1:
                    self.optimizer.skip_next_step = self._nonfinite_anywhere(bad)
                    skipped = self.optimizer.skip_next_step
                    if self.manual_clip > 0 and not skipped:
                        torch.nn.utils.clip_grad_norm_(self.engine.module.parameters(), self.manual_clip)
                self.engine.step()
                loss_sum += value
                for k, v in terms.items():
                    term_sums[k] = term_sums.get(k, 0.0) + float(v.detach())
            self.optimizer.skip_next_step = False  # ZeRO may have skipped the inner step itself
            self.scheduler.step()
            self.step += 1
            dt = time.perf_counter() - t0
            samples += global_batch
            record = {"step": self.step, "epoch": self.sampler.epoch, "loss": loss_sum / accum,
                      **{k: v / accum for k, v in term_sums.items()}, "lr": lr,
                      "samples_per_s": global_batch / dt}
            if skipped:
                self.nonfinite_in_a_row += 1
                record["skipped"] = True
                log.warning("step %d: non-finite loss (%s); update skipped (%d in a row, limit %d)", self.step,
                            record["loss"], self.nonfinite_in_a_row, cfg.optim.max_nonfinite)
            else:
                self.nonfinite_in_a_row = 0
            if skipped or self.step % cfg.logging.every == 0 or self.step == self.stop_step:
                self.metrics.log(record)
            self.metrics.progress(self.step, record["loss"], record["samples_per_s"])
            if self.nonfinite_in_a_row >= cfg.optim.max_nonfinite:
                raise NonFiniteLossError(
                    f"step {self.step}: the loss was non-finite in {self.nonfinite_in_a_row} optimizer steps in a "
                    f"row (optim.max_nonfinite={cfg.optim.max_nonfinite}); lower optim.lr, check the data for "
                    f"NaN images, or resume from an earlier checkpoint in {self.checkpoints.folder}"
                )
            if self.step % cfg.checkpoint.every == 0:
                self.save()
                last_saved = self.step
        if self.step != last_saved:
            self.save()
        self.export()
        elapsed = time.perf_counter() - t_start
        return {"step": self.step, "seconds": elapsed, "samples_per_s": samples / elapsed if elapsed else 0.0}

    # ------------------------------------------------------------------------------------- persistence
    def trainer_state(self) -> dict[str, Any]:
        """JSON-serialisable: data position (the sampler's epoch and delivered samples), schedule, guards."""
        return {"epoch": self.sampler.epoch, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                "recipe": self.cfg.name}

    def save(self) -> Path:
        path = self.checkpoints.save(self.engine, self.step, self.trainer_state())
        log.info("checkpoint %s", path)
        return path

    def export(self) -> Path:
        """The final model (safetensors + config + tokenizer) in RUN/model, loadable without DeepSpeed."""
        dest = self.run_dir / "model"
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None):
                state = {k: v.detach().float().clone().cpu() for k, v in self.engine.module.state_dict().items()}
        else:
            state = {k: v.detach().float().clone().cpu() for k, v in self.engine.module.state_dict().items()}
        if self.main:
            # A fresh fp32 copy: under ZeRO the engine's parameters are views of flat buffers (and bf16 on
            # GPU), which safetensors refuses; the copy owns plain tensors.
            plain = FVLM(self.engine.module.config)
            plain.load_state_dict(state)
            save_pretrained(plain, self.tokenizer, dest, overwrite=True)
        dist_utils.barrier()
        return dest

    def close(self) -> None:
        try:
            self.metrics.close()
        finally:
            self._release_lock()
