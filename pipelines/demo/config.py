"""The end-to-end job as data: ``configs/demo/*.yaml`` names the cohort, the stages' settings, the recipes
compared, the shared training budget and the seeds. ``fvlm demo`` and ``benchmarks/quality.py`` read it.

Every recipe is trained on the same cohort with the same ``train.overrides`` (geometry, batch, steps,
learning rate) and each seed of ``seeds`` (the recipe's ``seed``); the recipes differ only in what their
YAML files differ in (their objectives). The held-out cohort is generated with ``cohort.seed + 1``, so no
phantom, lesion or report of it was seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configs.checks import ConfigError, read_config
from configs.paths import resolve_config
from configs.typed import build

__all__ = ["DemoError", "CohortSection", "EvaluateSection", "DemoConfig", "load_demo_config"]


class DemoError(ConfigError):
    """A demo / benchmark config is malformed; the message names the file and field."""


def _at_least(owner: object, low: int, *names: str) -> None:
    for name in names:
        if getattr(owner, name) < low:
            raise DemoError(f"{name} must be an integer >= {low}, got {getattr(owner, name)!r}")


def _within(owner: object, low: float, high: float, *names: str) -> None:
    for name in names:
        if not low <= getattr(owner, name) <= high:
            raise DemoError(f"{name} must be a number in [{low}, {high}], got {getattr(owner, name)!r}")


@dataclass(frozen=True)
class CohortSection:
    """The synthetic cohorts (``fvlm synth``): a training cohort and an independent held-out one."""

    train_cases: int = 300
    """Cases of the training cohort (at least 4)."""
    test_cases: int = 150
    """Cases of the held-out cohort (at least 4), generated with ``seed + 1``."""
    seed: int = 0
    """Seed of the training cohort."""
    format: str = "nifti"
    """Files the cohort is written as: ``nifti`` or ``dicom``."""
    normal_share: float = 0.3
    """Share of cases without findings."""
    max_findings: int = 4
    """Most findings per case (at least 1)."""
    label_noise: float = 0.0
    """Share of labels flipped (``fvlm synth --label-noise``)."""
    prevalence_mix: float = 0.0
    """``fvlm synth --prevalence-mix``: 0 catalog prevalences, 1 every task equally."""

    def __post_init__(self) -> None:
        if self.format not in ("nifti", "dicom"):
            raise DemoError(f"format must be nifti or dicom, got {self.format!r}")
        _at_least(self, 4, "train_cases", "test_cases")
        _at_least(self, 0, "seed")
        _at_least(self, 1, "max_findings")
        _within(self, 0.0, 1.0, "normal_share", "label_noise", "prevalence_mix")


@dataclass(frozen=True)
class EvaluateSection:
    """``fvlm evaluate`` settings for every recipe (same cases, same bootstrap seed)."""

    n_boot: int = 1000
    """Bootstrap resamples of every interval."""
    min_positives: int = 5
    """Tasks with fewer held-out positives (or negatives) are flagged and left out of the macro AUC."""
    threshold_split: float = 0.2
    """Share of the held-out cases choosing the thresholds of the threshold metrics (the AUCs count every case)."""
    probe: bool = False
    """Add the linear-probe ceiling: ``fvlm evaluate --probe-data OUT/prep/train`` (the training cohort's labels)."""
    probe_folds: int = 5
    """Cross-validation folds of the probe's C (``--probe-folds``); tasks with fewer training positives skip."""
    visible: str | None = None
    """Geometry name of ``configs/synth/findings.yaml``'s visibility data (e.g. ``bench-6x6x10``): the headline
    macro AUC and the comparisons are then over the included tasks visible at that geometry
    (``pipelines.synth.findings.visible_tasks``); every task is still reported. None: over every included task."""
    view: str = "windows"
    """``fvlm evaluate --view``: ``windows`` (crop recipes: a window around each anatomy) or ``center`` (the
    central crop; the benchmark geometry's crop holds the whole case, so windows would only repeat it)."""

    def __post_init__(self) -> None:
        _at_least(self, 1, "n_boot", "min_positives")
        _at_least(self, 2, "probe_folds")
        _within(self, 0.0, 0.9, "threshold_split")
        if self.view not in ("windows", "center"):
            raise DemoError(f"view must be windows or center, got {self.view!r}")
        if self.visible is not None:
            from pipelines.synth.findings import visible_tasks

            if not visible_tasks(self.visible):
                raise DemoError(f"visible names no geometry with visible tasks in configs/synth/findings.yaml "
                                f"(visibility.geometry), got {self.visible!r}")


@dataclass(frozen=True)
class TrainSection:
    """What every training run of the job shares."""

    overrides: dict[str, Any] = field(default_factory=dict)
    """Recipe field -> value (``optim.max_steps: 200``), passed as ``--set`` to every run: the shared budget."""
    workers: int = 0
    """Loader worker processes of each run (``fvlm train --workers``)."""

    def __post_init__(self) -> None:
        _at_least(self, 0, "workers")
        if "seed" in self.overrides:
            raise DemoError("overrides: set the seeds with the top-level 'seeds' list, not 'seed'")


@dataclass(frozen=True)
class WorkersSection:
    """Processes of the stages before training."""

    synth: int = 2
    """``fvlm synth --workers``."""
    preprocess: int = 2
    """``fvlm preprocess --workers``."""

    def __post_init__(self) -> None:
        _at_least(self, 1, "synth", "preprocess")


@dataclass(frozen=True)
class DemoFile:
    """A ``configs/demo/*.yaml`` file as written (:class:`DemoConfig` is what the job reads)."""

    preprocess: str
    """Preprocessing preset (``configs/preprocess/``) of both cohorts."""
    recipes: tuple[str, ...]
    """Training recipes compared (``configs/train/``), each trained with every seed."""
    name: str | None = None
    """Job name; None: the file's stem."""
    description: str = ""
    """One line on what the job is for."""
    cohort: CohortSection = field(default_factory=CohortSection)
    """The synthetic cohorts."""
    anatomy: str = "fvlm15"
    """Anatomy set (``configs/anatomy/``)."""
    tasks: str = "fvlm54"
    """Task catalog (``configs/tasks/``)."""
    comparisons: tuple[tuple[str, str], ...] = ()
    """(recipe, reference) pairs: paired bootstrap of the macro AUC difference recipe - reference, per seed."""
    seeds: tuple[int, ...] = (0,)
    """Training seeds: each recipe is trained once per seed (the recipe's ``seed``)."""
    train: TrainSection = field(default_factory=TrainSection)
    """The shared training budget."""
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    """Evaluation settings."""
    workers: WorkersSection = field(default_factory=WorkersSection)
    """Processes of synth and preprocess."""

    def __post_init__(self) -> None:
        if not self.recipes or not all(r.strip() for r in self.recipes):
            raise DemoError(f"recipes must be a non-empty list of recipe names, got {list(self.recipes)}")
        if len(set(self.recipes)) != len(self.recipes):
            raise DemoError(f"recipes lists a recipe twice: {list(self.recipes)}")
        if not self.seeds or any(s < 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise DemoError(f"seeds must be a non-empty list of distinct integers >= 0, got {list(self.seeds)}")
        for a, b in self.comparisons:
            for r in (a, b):
                if r not in self.recipes:
                    raise DemoError(f"comparison [{a}, {b}]: {r!r} is not one of the recipes {list(self.recipes)}")
            if a == b:
                raise DemoError(f"comparison [{a}, {b}] compares a recipe with itself")


@dataclass(frozen=True)
class DemoConfig:
    name: str
    description: str
    cohort: CohortSection
    preprocess: str
    anatomy: str
    tasks: str
    recipes: tuple[str, ...]
    seeds: tuple[int, ...]
    train_overrides: tuple[str, ...]
    train_workers: int
    evaluate: EvaluateSection
    synth_workers: int = 2
    preprocess_workers: int = 2
    comparisons: tuple[tuple[str, str], ...] = ()
    """(recipe, reference) pairs: paired bootstrap of the macro AUC difference recipe - reference, per seed."""
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def train_args(self, recipe: str, seed: int) -> list[str]:
        """``--set`` arguments of one training run: the shared budget, then the seed."""
        out: list[str] = []
        for item in self.train_overrides:
            out += ["--set", item]
        return out + ["--set", f"seed={seed}"]


def set_items(overrides: dict[str, Any]) -> tuple[str, ...]:
    """``KEY=VALUE`` strings for ``fvlm train --set``, each value in YAML flow style (one line for a mapping)."""
    import yaml

    return tuple(f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for k, v in overrides.items())


def load_demo_config(name_or_path: str | Path) -> DemoConfig:
    """A :class:`DemoConfig` from ``configs/demo/NAME.yaml`` or a YAML file (``extends:`` followed); errors name
    file and field."""
    path = resolve_config("demo", name_or_path)
    data = read_config(path, "demo", DemoError)
    where = str(path)
    spec: DemoFile = build(DemoFile, data, where, DemoError)
    items = set_items(spec.train.overrides)
    cfg = DemoConfig(
        name=spec.name if spec.name is not None else Path(path).stem,
        description=spec.description.strip(),
        cohort=spec.cohort,
        preprocess=spec.preprocess,
        anatomy=spec.anatomy,
        tasks=spec.tasks,
        recipes=spec.recipes,
        seeds=spec.seeds,
        train_overrides=items,
        train_workers=spec.train.workers,
        evaluate=spec.evaluate,
        synth_workers=spec.workers.synth,
        preprocess_workers=spec.workers.preprocess,
        comparisons=spec.comparisons,
        source=where,
        raw=data,
    )
    # every recipe must load with the shared overrides: fail before hours of work, naming the field
    from pipelines.config.recipe import load_recipe

    for r in spec.recipes:
        try:
            load_recipe(r, list(items) + [f"seed={spec.seeds[0]}"])
        except (ConfigError, FileNotFoundError) as e:
            raise DemoError(f"{where}: recipe {r!r} with train.overrides: {e}") from e
    return cfg
