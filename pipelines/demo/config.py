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

from configs.checks import ConfigError, read_yaml_mapping, require, strings
from configs.paths import resolve_config

__all__ = ["DemoError", "CohortSection", "EvaluateSection", "DemoConfig", "load_demo_config"]


class DemoError(ConfigError):
    """A demo / benchmark config is malformed; the message names the file and field."""


def _int(where: str, data: dict[str, Any], key: str, default: int, low: int = 1) -> int:
    v = data.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise DemoError(f"{where}: field {key!r} must be an integer >= {low}, got {v!r}")
    return v


def _float(where: str, data: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    v = data.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
        raise DemoError(f"{where}: field {key!r} must be a number in [{low}, {high}], got {v!r}")
    return float(v)


@dataclass(frozen=True)
class CohortSection:
    """The synthetic cohorts (``fvlm synth``): a training cohort and an independent held-out one."""

    train_cases: int = 300
    test_cases: int = 150
    seed: int = 0
    format: str = "nifti"
    normal_share: float = 0.3
    max_findings: int = 4
    label_noise: float = 0.0
    prevalence_mix: float = 0.0  #: ``fvlm synth --prevalence-mix``: 0 catalog prevalences, 1 every task equally

    @classmethod
    def from_dict(cls, where: str, data: dict[str, Any]) -> "CohortSection":
        fmt = data.get("format", "nifti")
        if fmt not in ("nifti", "dicom"):
            raise DemoError(f"{where}.format must be nifti or dicom, got {fmt!r}")
        unknown = set(data) - {"train_cases", "test_cases", "seed", "format", "normal_share", "max_findings",
                               "label_noise", "prevalence_mix"}
        if unknown:
            raise DemoError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(train_cases=_int(where, data, "train_cases", 300, 4), test_cases=_int(where, data, "test_cases", 150, 4),
                   seed=_int(where, data, "seed", 0, 0), format=fmt,
                   normal_share=_float(where, data, "normal_share", 0.3, 0.0, 1.0),
                   max_findings=_int(where, data, "max_findings", 4), label_noise=_float(where, data, "label_noise", 0.0, 0.0, 1.0),
                   prevalence_mix=_float(where, data, "prevalence_mix", 0.0, 0.0, 1.0))


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

    @classmethod
    def from_dict(cls, where: str, data: dict[str, Any]) -> "EvaluateSection":
        unknown = set(data) - {"n_boot", "min_positives", "threshold_split", "probe", "probe_folds",
                                "view", "visible"}
        if unknown:
            raise DemoError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        probe = data.get("probe", False)
        if not isinstance(probe, bool):
            raise DemoError(f"{where}: field 'probe' must be true or false, got {probe!r}")
        view = data.get("view", "windows")
        if view not in ("windows", "center"):
            raise DemoError(f"{where}: field 'view' must be windows or center, got {view!r}")
        visible = data.get("visible")
        if visible is not None:
            from pipelines.synth.findings import visible_tasks

            if not isinstance(visible, str) or not visible_tasks(visible):
                raise DemoError(f"{where}: field 'visible' names no geometry with visible tasks in "
                                f"configs/synth/findings.yaml (visibility.geometry), got {visible!r}")
        return cls(n_boot=_int(where, data, "n_boot", 1000), min_positives=_int(where, data, "min_positives", 5),
                   threshold_split=_float(where, data, "threshold_split", 0.2, 0.0, 0.9), probe=probe,
                   probe_folds=_int(where, data, "probe_folds", 5, 2), view=view,
                   visible=visible)


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


def load_demo_config(name_or_path: str | Path) -> DemoConfig:
    """A :class:`DemoConfig` from ``configs/demo/NAME.yaml`` or a YAML file; errors name file and field."""
    path = resolve_config("demo", name_or_path)
    data = read_yaml_mapping(path, DemoError)
    where = str(path)
    known = {"name", "description", "cohort", "preprocess", "anatomy", "tasks", "recipes", "comparisons", "seeds",
             "train", "evaluate", "workers"}
    unknown = set(data) - known
    if unknown:
        raise DemoError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    recipes = strings(where, data, "recipes", error=DemoError)
    if len(set(recipes)) != len(recipes):
        raise DemoError(f"{where}: field 'recipes' lists a recipe twice: {list(recipes)}")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                           for s in seeds) or len(set(seeds)) != len(seeds):
        raise DemoError(f"{where}: field 'seeds' must be a non-empty list of distinct integers >= 0, got {seeds!r}")
    pairs = data.get("comparisons", [])
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise DemoError(f"{where}: field 'comparisons' must be a list of [recipe, reference] pairs, got {pairs!r}")
    for a, b in pairs:
        for r in (a, b):
            if r not in recipes:
                raise DemoError(f"{where}: comparison [{a}, {b}]: {r!r} is not one of the recipes {list(recipes)}")
        if a == b:
            raise DemoError(f"{where}: comparison [{a}, {b}] compares a recipe with itself")
    train = data.get("train", {})
    if not isinstance(train, dict):
        raise DemoError(f"{where}: field 'train' must be a mapping")
    unknown = set(train) - {"overrides", "workers"}
    if unknown:
        raise DemoError(f"{where}.train: unknown field(s) {', '.join(sorted(unknown))}")
    overrides = train.get("overrides", {})
    if not isinstance(overrides, dict):
        raise DemoError(f"{where}.train.overrides must be a mapping of recipe field -> value, e.g. optim.max_steps: 200")
    if "seed" in overrides:
        raise DemoError(f"{where}.train.overrides: set the seeds with the top-level 'seeds' list, not 'seed'")
    import yaml

    items = tuple(f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                  for k, v in overrides.items())
    workers = data.get("workers", {})
    if not isinstance(workers, dict):
        raise DemoError(f"{where}: field 'workers' must be a mapping (synth, preprocess)")
    cohort = data.get("cohort", {})
    if not isinstance(cohort, dict):
        raise DemoError(f"{where}: field 'cohort' must be a mapping")
    evaluate = data.get("evaluate", {})
    if not isinstance(evaluate, dict):
        raise DemoError(f"{where}: field 'evaluate' must be a mapping")
    cfg = DemoConfig(
        name=str(data.get("name", Path(path).stem)),
        description=str(data.get("description", "")).strip(),
        cohort=CohortSection.from_dict(f"{where}: cohort", cohort),
        preprocess=str(require(where, data, "preprocess", str, DemoError)),
        anatomy=str(data.get("anatomy", "fvlm15")),
        tasks=str(data.get("tasks", "fvlm54")),
        recipes=recipes,
        seeds=tuple(seeds),
        train_overrides=items,
        train_workers=_int(f"{where}: train", train, "workers", 0, 0),
        evaluate=EvaluateSection.from_dict(f"{where}: evaluate", evaluate),
        synth_workers=_int(f"{where}: workers", workers, "synth", 2),
        preprocess_workers=_int(f"{where}: workers", workers, "preprocess", 2),
        comparisons=tuple((str(a), str(b)) for a, b in pairs),
        source=where,
        raw=data,
    )
    # every recipe must load with the shared overrides: fail before hours of work, naming the field
    from pipelines.config.recipe import load_recipe

    for r in recipes:
        try:
            load_recipe(r, list(items) + [f"seed={seeds[0]}"])
        except (ConfigError, FileNotFoundError) as e:
            raise DemoError(f"{where}: recipe {r!r} with train.overrides: {e}") from e
    return cfg
