"""Training recipes as data: a typed, nested :class:`TrainConfig` loaded from ``configs/train/*.yaml``.

A recipe names the model size, the data geometry, the optimiser and schedule, the objectives (each with its
weight), checkpointing and logging. ``load_recipe(name_or_path, overrides=["optim.lr=3e-4"])`` reads it
(following ``extends:``); :func:`configs.typed.build` checks every value against its field's type and
``__post_init__`` the ranges, so unknown or malformed fields raise :class:`RecipeError` naming the file and the
field (``optim.lr``) and, for unknown ones, the known fields of that section. The resolved recipe
(``to_dict``) is saved beside every run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configs.checks import ConfigError, read_config
from configs.typed import SCHEMA, apply_overrides, build
from configs.paths import config_dir, resolve_config

__all__ = [
    "RecipeError", "ModelSection", "DataSection", "OptimSection", "ObjectiveSpec", "CheckpointSection",
    "LoggingSection", "TrainConfig", "load_recipe", "RESUME_MAY_CHANGE", "describe_diff",
    "diff_mappings", "resume_drift",
]

#: Recipe keys a resumed run may change (``prefix.*`` matches a whole section): they decide how long the run
#: goes on, what it logs and how it checkpoints and loads, never what it computes.
RESUME_MAY_CHANGE: tuple[str, ...] = ("name", "description", "optim.max_steps", "logging.*", "checkpoint.every",
                                      "checkpoint.keep", "data.workers")


class RecipeError(ConfigError):
    """A training recipe (YAML file or ``--set`` override) is malformed; the message names the field."""


def _positive(where: str, **values: Any) -> None:
    for name, v in values.items():
        if v <= 0:
            raise RecipeError(f"{where}.{name} must be a positive number, got {v!r}")


@dataclass
class ModelSection:
    """Which model to build: a preset of ``configs/model/`` plus overrides."""

    preset: str = "base"
    """Model size: a preset name (tiny, base) or a YAML file (``fvlm.model.load_model_config``)."""
    overrides: dict[str, Any] = field(default_factory=dict, metadata={SCHEMA: lambda: _model_config()})
    """Fields merged into the preset, nested key by key (e.g. ``{text: {tokenizer: /models/biobert}}``)."""
    heads: dict[str, Any] = field(default_factory=dict)
    """Optional model heads (``fvlm.model.heads``) the recipe's objectives need: name -> options. Kept apart
    from ``overrides`` so that a shared budget (``--set model.overrides=...``) never drops them."""

    def __post_init__(self) -> None:
        if not self.preset:
            raise RecipeError(f"model.preset must be a preset name or a YAML path, got {self.preset!r}")


@dataclass
class DataSection:
    """What the loader feeds: crop geometry, batch, workers."""

    crop_size: tuple[int, int, int] = (112, 256, 352)
    """(z, y, x) voxels of each training crop (multiples of the model's patch size)."""
    mode: str = "crop"
    """``crop``: random crops of ``crop_size`` (the reference); ``resize``: the whole case resized."""
    flip_axes: tuple[int, ...] = ()
    """Axes (0 z head-foot, 1 y front-back, 2 x right-left) flipped at random in training; none by default:
    z and y flips show torsos that evaluation never shows, an x flip mirrors the laterality of the text."""
    flip_prob: float = 0.5
    """Probability of each axis' flip."""
    swap_laterality: bool = True
    """With an x flip, exchange right/left in the sample's anatomy texts and report so text and image agree."""
    min_visible_fraction: float = 0.5
    """Crop mode: an anatomy with less of its voxels inside the random crop is cut (left out of the loss)."""
    batch_size: int = 14
    """Micro-batch per process (per GPU); the global batch is batch_size x processes x grad_accum."""
    workers: int = 4
    """Loader worker processes per training process (``--workers`` overrides)."""
    max_text_len: int | None = None
    """Token limit of each anatomy text; None: the model's ``text.max_length``."""
    report_max_len: int | None = None
    """Token limit of the whole report (read only by objectives on the global text, e.g. ``clip_global``);
    None: ``max_text_len``. Must not exceed the text encoder's ``max_position_embeddings``."""

    def __post_init__(self) -> None:  # types: configs.typed.build; ranges and relations here
        if not all(v > 0 for v in self.crop_size):
            raise RecipeError(f"data.crop_size must be three positive integers (z, y, x), got {self.crop_size!r}")
        if self.mode not in ("crop", "resize"):
            raise RecipeError(f"data.mode must be 'crop' or 'resize', got {self.mode!r}")
        if any(v not in (0, 1, 2) for v in self.flip_axes) or len(set(self.flip_axes)) != len(self.flip_axes):
            raise RecipeError(f"data.flip_axes must be a list of distinct axes among 0 (z), 1 (y), 2 (x), "
                              f"got {list(self.flip_axes)!r}")
        for name in ("flip_prob", "min_visible_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise RecipeError(f"data.{name} must be a number in [0, 1], got {getattr(self, name)!r}")
        if self.batch_size < 1:
            raise RecipeError(f"data.batch_size must be a positive integer, got {self.batch_size!r}")
        if self.workers < 0:
            raise RecipeError(f"data.workers must be a non-negative integer, got {self.workers!r}")
        for name in ("max_text_len", "report_max_len"):
            if getattr(self, name) is not None and getattr(self, name) < 2:
                raise RecipeError(f"data.{name} must be an integer >= 2 or null, got {getattr(self, name)!r}")


@dataclass
class OptimSection:
    """AdamW with linear warm-up then cosine decay (the reference: lr 1e-4, wd 0.05, 20 epochs)."""

    lr: float = 1e-4
    """Peak learning rate (reached at the end of warm-up)."""
    weight_decay: float = 0.05
    """AdamW weight decay, on weight matrices only (not on biases, norms, embeddings' scales, temperature)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    epochs: int = 20
    """Passes over the data; with ``max_steps`` null they set the schedule's length."""
    max_steps: int | None = None
    """Optimizer steps of the schedule (overrides epochs); ``--max-steps`` stops earlier without changing it."""
    warmup_steps: int | None = None
    """Linear warm-up steps; null: ``warmup_ratio`` of the schedule."""
    warmup_ratio: float = 0.05
    """Share of the schedule spent warming up when ``warmup_steps`` is null."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of ``lr``."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (DeepSpeed gradient_accumulation_steps)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (DeepSpeed gradient_clipping); 0 turns it off."""
    max_nonfinite: int = 5
    """Stop with an error after this many optimizer steps in a row with a non-finite loss (each is skipped)."""

    def __post_init__(self) -> None:
        w = "optim"
        _positive(w, lr=self.lr, eps=self.eps, epochs=self.epochs, grad_accum=self.grad_accum,
                  max_nonfinite=self.max_nonfinite)
        if self.weight_decay < 0:
            raise RecipeError(f"{w}.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not all(0 <= b < 1 for b in self.betas):
            raise RecipeError(f"{w}.betas must be two numbers in [0, 1), got {list(self.betas)!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise RecipeError(f"{w}.max_steps must be a positive integer or null, got {self.max_steps!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise RecipeError(f"{w}.warmup_steps must be a non-negative integer or null, got {self.warmup_steps!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise RecipeError(f"{w}.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise RecipeError(f"{w}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.grad_clip < 0:
            raise RecipeError(f"{w}.grad_clip must be >= 0, got {self.grad_clip!r}")


@dataclass
class ObjectiveSpec:
    """One objective of ``fvlm.losses`` and the weight of each term it returns."""

    name: str = "anatomy_contrastive"
    """Registry name (``fvlm.losses.list_objectives()``)."""
    weight: float = 1.0
    """Weight of the objective's term(s) in the total ``loss``."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options of the objective (e.g. ``{mode: jaccard}`` for disease_aware)."""

    def __post_init__(self) -> None:
        from fvlm.losses import list_objectives

        if self.name not in list_objectives():
            raise RecipeError(f"objectives: unknown objective {self.name!r}; registered: {', '.join(list_objectives())}")
        if self.weight < 0:
            raise RecipeError(f"objectives.{self.name}.weight must be >= 0, got {self.weight!r}")


@dataclass
class CheckpointSection:
    """When to checkpoint and how many to keep."""

    every: int = 1000
    """Save every this many optimizer steps (and always at the end)."""
    keep: int = 3
    """Checkpoints kept (the oldest are deleted once a newer one is complete)."""

    def __post_init__(self) -> None:
        for name in ("every", "keep"):
            v = getattr(self, name)
            if v < 1:
                raise RecipeError(f"checkpoint.{name} must be a positive integer, got {v!r}")


@dataclass
class LoggingSection:
    """What the run directory and terminal show."""

    every: int = 1
    """Write metrics every this many optimizer steps (skipped steps are always logged)."""
    tensorboard: bool = True
    """Write TensorBoard scalars under RUN/tensorboard."""
    progress: bool = True
    """tqdm progress bar on rank 0."""

    def __post_init__(self) -> None:
        if self.every < 1:
            raise RecipeError(f"logging.every must be a positive integer, got {self.every!r}")


@dataclass
class TrainConfig:
    """A whole training recipe."""

    name: str = "custom"
    """Recipe name (the YAML file's stem)."""
    description: str = ""
    """One line on what the recipe is for."""
    seed: int = 0
    """Seed of model initialisation, data order and augmentation."""
    deepspeed: str = "zero1"
    """DeepSpeed config: a name in configs/deepspeed (zero0..zero3) or a JSON file (``--deepspeed-config``)."""
    model: ModelSection = field(default_factory=ModelSection)
    """Model size."""
    data: DataSection = field(default_factory=DataSection)
    """Loader geometry and batch."""
    optim: OptimSection = field(default_factory=OptimSection)
    """Optimiser and learning-rate schedule."""
    objectives: list[ObjectiveSpec] = field(default_factory=lambda: [ObjectiveSpec()])
    """Objectives whose weighted terms sum to ``loss``."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpointing."""
    logging: LoggingSection = field(default_factory=LoggingSection)
    """Metrics, TensorBoard, progress bar."""

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise RecipeError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not self.deepspeed:
            raise RecipeError(f"deepspeed must name a config (zero0..zero3) or a JSON file, got {self.deepspeed!r}")
        if not self.objectives:
            raise RecipeError("objectives must be a non-empty list of {name, weight, options}")
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise RecipeError(f"objectives: {names} names an objective twice")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> "TrainConfig":
        """Build from a mapping (a parsed recipe); errors name ``where`` and the field."""
        return build(cls, data, where, RecipeError)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-serialisable mapping that ``from_dict`` reads back."""
        return _plain(dataclasses.asdict(self))


def _plain(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _model_config() -> type:
    """The schema of ``model.overrides`` (imported when a ``--set`` reaches it: the model package loads torch)."""
    from fvlm.model.config import ModelConfig

    return ModelConfig


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a preset name (``configs/train/NAME.yaml``) or a YAML file, with
    ``--set``-style overrides applied. ``extends: PARENT`` in the file lays it over its parent recipe
    (:func:`configs.checks.read_config`). A run's saved ``config.yaml`` loads too: its ``resolved`` section
    (facts the trainer worked out at start: DeepSpeed config, process count, schedule length) is not part
    of the recipe and is ignored."""
    preset = Path(str(name_or_path))
    if not preset.suffix and (config_dir() / "train" / f"{preset}.yaml").is_file():
        path = config_dir() / "train" / f"{preset}.yaml"  # a preset name wins over a same-named folder
    else:
        path = resolve_config("train", name_or_path)
    data = read_config(path, "train", RecipeError)
    data.pop("resolved", None)
    data.setdefault("name", Path(path).stem)
    return TrainConfig.from_dict(apply_overrides(TrainConfig, data, overrides, RecipeError), where=str(path))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def diff_mappings(old: dict[str, Any], new: dict[str, Any], allow: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf that differs between two nested mappings (a key
    missing on one side has the value ``<absent>``), except keys matched by ``allow`` (exact, or
    ``section.*``); sorted by key. Lists are compared whole."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va == vb or any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in allow):
            continue
        out.append((key, va, vb))
    return out


def describe_diff(diff: list[tuple[str, Any, Any]], limit: int = 8) -> str:
    """``key old -> new`` for the first ``limit`` differences, values shortened."""
    def short(v: Any) -> str:
        text = repr(v)
        return text if len(text) <= 40 else text[:37] + "..."

    parts = [f"{k} {short(a)} -> {short(b)}" for k, a, b in diff[:limit]]
    return "; ".join(parts) + (f"; and {len(diff) - limit} more" if len(diff) > limit else "")


def resume_drift(saved: dict[str, Any], cfg: "TrainConfig", resolved: dict[str, Any] | None = None,
                 allow: tuple[str, ...] = RESUME_MAY_CHANGE) -> list[tuple[str, Any, Any]]:
    """Differences between a run's saved ``config.yaml`` (``saved``) and the recipe it is resumed with,
    outside ``allow``. ``resolved`` (e.g. ``{"deepspeed": ...}``) is compared with the saved ``resolved``
    section key by key where both have it."""
    saved = dict(saved)
    saved_resolved = saved.pop("resolved", None) or {}
    diff = diff_mappings(saved, cfg.to_dict(), allow)
    for key, value in (resolved or {}).items():
        if key in saved_resolved:
            diff += diff_mappings({"resolved": {key: saved_resolved[key]}}, {"resolved": {key: value}})
    return diff
