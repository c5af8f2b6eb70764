"""Findings of the synthetic cohort: the fvlm54 tasks mapped to signatures, the sampler and the injection.

``configs/synth/findings.yaml`` maps every task to a signature kind (registered in
:mod:`pipelines.synth.signatures`) with its parameters and a prevalence; this module loads and checks it,
draws the findings of a case (:func:`sample_tasks`) and injects them into a plan (:class:`Injection`):
plan edits before painting, paint steps after, then lesion ids renumbered ``1..n`` over the findings that
landed in view. A finding that cannot be placed (anatomy out of view, prostate in a woman, no contrast
for a dissection) is dropped: it is absent from the findings and from the lesion map.

A task may also say whether its signature is visible at the benchmark's input geometry, as measured by
``benchmarks/visibility.py`` (``visible`` and ``visibility``; :func:`visible_tasks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from numbers import Real
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from anatomy.catalog import load_anatomy_set
from configs.paths import config_dir
from anatomy.totalseg import total_class_ids
from pipelines.synth.body import Plan
from pipelines.synth.canvas import Canvas
from pipelines.synth import edits  # noqa: F401  (registers the plan-edit signatures)
from pipelines.synth.scene import Finding
from pipelines.synth.signatures import SIGNATURES, Context, Placed, get_signature, list_signatures

__all__ = ["TaskSpec", "FindingsConfig", "findings_config", "load_findings_config", "task_spec", "sample_tasks",
           "visible_tasks", "Injection", "list_signatures", "SIGNATURES", "VISIBILITY_MEASURES"]

VISIBILITY_MEASURES = ("cnr", "effect_auc")
"""Measures a ``visibility`` entry may name (definitions: ``benchmarks/visibility.py``)."""


@dataclass(frozen=True)
class TaskSpec:
    """One task's synthetic signature."""

    name: str
    anatomy: str
    """fvlm15 anatomy."""
    signature: str
    """Registered signature kind."""
    prevalence: float
    """Relative weight in :func:`sample_tasks`."""
    params: dict
    """Signature parameters (``host`` filled with the anatomy's classes when absent)."""
    sex: str | None = None
    requires_contrast: bool = False
    visible: bool | None = None
    """Whether the signature is visible at the geometry of ``visibility`` (None: not measured)."""
    visibility: dict | None = None
    """The measurement behind ``visible``: ``geometry`` (name), ``measure`` (one of :data:`VISIBILITY_MEASURES`),
    ``value``, optionally ``cases`` (with the task, measured) and for ``cnr`` ``volume_vox`` (median lesion volume in
    output voxels)."""


@dataclass(frozen=True)
class FindingsConfig:
    tasks: dict[str, TaskSpec]
    exclusive: tuple[frozenset[str], ...]
    decay: float
    source: str


def _visibility(entry: dict, where: str) -> tuple[bool | None, dict | None]:
    """The task's ``visible`` and ``visibility`` fields, checked (ValueError naming ``where``)."""
    visible, vis = entry.get("visible"), entry.get("visibility")
    if visible is not None and not isinstance(visible, bool):
        raise ValueError(f"{where}: visible must be true or false, got {visible!r}")
    if vis is None:
        return visible, None
    if visible is None:
        raise ValueError(f"{where}: visibility given without visible: true|false")
    if not isinstance(vis, dict):
        raise ValueError(f"{where}: visibility must be a mapping {{geometry, measure, value}}, got {vis!r}")
    unknown = sorted(set(vis) - {"geometry", "measure", "value", "volume_vox", "cases"})
    if unknown:
        raise ValueError(f"{where}: visibility has unknown keys {unknown}; known: geometry, measure, value, "
                         "volume_vox, cases")
    if not isinstance(vis.get("geometry"), str) or not vis["geometry"].strip():
        raise ValueError(f"{where}: visibility.geometry must name a geometry, got {vis.get('geometry')!r}")
    if vis.get("measure") not in VISIBILITY_MEASURES:
        raise ValueError(f"{where}: visibility.measure must be one of {', '.join(VISIBILITY_MEASURES)}, "
                         f"got {vis.get('measure')!r}")
    for key in ("value", "volume_vox", "cases"):
        x = vis.get(key, None if key == "value" else 0)
        if isinstance(x, bool) or not isinstance(x, Real) or x != x:
            raise ValueError(f"{where}: visibility.{key} must be a number, got {x!r}")
    return visible, dict(vis)


@lru_cache(maxsize=None)
def findings_config() -> FindingsConfig:
    """Load and check ``configs/synth/findings.yaml``; errors name the file and the task."""
    return load_findings_config(config_dir() / "synth" / "findings.yaml")


def load_findings_config(path: str | Path) -> FindingsConfig:
    """Load and check a findings YAML (:func:`findings_config` reads the project's); errors name the file and task."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    anatomy_set = load_anatomy_set("fvlm15")
    known = total_class_ids()
    tasks: dict[str, TaskSpec] = {}
    for name, entry in data["tasks"].items():
        where = f"{path}: task {name!r}"
        for key in ("anatomy", "signature", "prevalence"):
            if key not in entry:
                raise ValueError(f"{where}: missing field {key!r}")
        if entry["anatomy"] not in anatomy_set:
            raise ValueError(f"{where}: anatomy {entry['anatomy']!r} is not in fvlm15 ({', '.join(anatomy_set.names)})")
        if entry["signature"] not in SIGNATURES:
            known = ", ".join(list_signatures())
            raise ValueError(f"{where}: unknown signature {entry['signature']!r}; known: {known}")
        reserved = ("anatomy", "signature", "prevalence", "sex", "requires_contrast", "visible", "visibility")
        params = {k: v for k, v in entry.items() if k not in reserved}
        params.setdefault("host", list(anatomy_set[entry["anatomy"]].classes))
        for c in params["host"]:
            if c not in known:
                raise ValueError(f"{where}: unknown TotalSegmentator class {c!r} in host")
        sex = entry.get("sex")
        if sex not in (None, "M", "F"):
            raise ValueError(f"{where}: sex must be M or F, got {sex!r}")
        visible, visibility = _visibility(entry, where)
        tasks[name] = TaskSpec(name, entry["anatomy"], entry["signature"], float(entry["prevalence"]), params, sex,
                               bool(entry.get("requires_contrast", False)), visible, visibility)
    exclusive = tuple(frozenset(g) for g in data.get("exclusive", []))
    for g in exclusive:
        unknown = sorted(g - set(tasks))
        if unknown:
            raise ValueError(f"{path}: exclusive group names unknown tasks {unknown}")
    return FindingsConfig(tasks, exclusive, float(data.get("findings_per_case_decay", 0.6)), str(path))


def task_spec(name: str) -> TaskSpec:
    cfg = findings_config()
    if name not in cfg.tasks:
        raise ValueError(f"unknown synthetic finding {name!r}: {cfg.source} has no such task")
    return cfg.tasks[name]


def visible_tasks(geometry: str | None = None) -> list[str]:
    """Tasks marked ``visible: true``, in config order; with ``geometry``, only those measured at that geometry
    (``visibility.geometry``, e.g. ``bench-6x6x10``)."""
    return [n for n, s in findings_config().tasks.items()
            if s.visible and (geometry is None or (s.visibility or {}).get("geometry") == geometry)]


def sample_tasks(rng: np.random.Generator, normal_share: float = 0.3, max_findings: int = 4,
                 prevalence_mix: float = 0.0) -> list[str]:
    """Draw the findings of one case: none with probability ``normal_share``, else ``k`` tasks (``P(k)`` decaying
    in ``k`` up to ``max_findings``) drawn without replacement, at most one per exclusive group, with weights

        w_t = (1 - m) p_t / sum_s p_s + m / T

    (``p_t`` the task's ``prevalence``, ``T`` the number of tasks, ``m`` = ``prevalence_mix``): ``m = 0`` keeps
    the catalog's prevalences, ``m = 1`` draws every task equally often, which lifts the rare tasks (aortic
    dissection, esophageal dilatation) to enough positives for a benchmark without dropping any."""
    if not 0.0 <= prevalence_mix <= 1.0:
        raise ValueError(f"prevalence_mix must lie in [0, 1], got {prevalence_mix}")
    if not 0.0 <= normal_share <= 1.0:
        raise ValueError(f"normal_share must lie in [0, 1], got {normal_share}")
    if max_findings < 1:
        raise ValueError(f"max_findings must be at least 1, got {max_findings}")
    cfg = findings_config()
    if rng.random() < normal_share:
        return []
    k_probs = cfg.decay ** np.arange(max_findings)
    k = int(rng.choice(max_findings, p=k_probs / k_probs.sum())) + 1
    names = list(cfg.tasks)
    weights = np.array([cfg.tasks[n].prevalence for n in names])
    weights = (1.0 - prevalence_mix) * weights / weights.sum() + prevalence_mix / len(names)
    chosen: list[str] = []
    while len(chosen) < k:
        blocked = set(chosen)
        for g in cfg.exclusive:
            if g & set(chosen):
                blocked |= g
        w = np.array([0.0 if n in blocked else x for n, x in zip(names, weights)])
        if w.sum() <= 0:
            break
        chosen.append(names[int(rng.choice(len(names), p=w / w.sum()))])
    return chosen


class Injection:
    """The requested findings of one case, carried through plan edits, painting and renumbering."""

    def __init__(self, plan: Plan, tasks: Sequence[str], rng: np.random.Generator) -> None:
        self.plan = plan
        seen: list[str] = []
        for t in tasks:
            if t not in seen:
                seen.append(t)
        if len(seen) > 250:
            raise ValueError(f"at most 250 findings per case, got {len(seen)}")
        self.specs = [task_spec(t) for t in seen]
        seeds = rng.integers(0, 2**63 - 1, size=len(self.specs))
        self.contexts: list[Context | None] = []
        for i, (spec, seed) in enumerate(zip(self.specs, seeds)):
            r = np.random.default_rng(int(seed))
            ok = (spec.sex is None or spec.sex == plan.sex) and not (spec.requires_contrast and plan.phase == "native")
            ctx = Context(plan, spec.name, spec.params, i + 1, r, severity=float(r.uniform(0, 1))) if ok else None
            self.contexts.append(ctx)
        self.placed: dict[int, Placed] = {}

    def _run(self, stage: str, canvas: Canvas | None) -> None:
        todo = [(SIGNATURES[s.signature].priority, i) for i, s in enumerate(self.specs)
                if self.contexts[i] is not None and SIGNATURES[s.signature].stage == stage]
        for _, i in sorted(todo):
            ctx = self.contexts[i]
            ctx.canvas = canvas
            res = get_signature(self.specs[i].signature).fn(ctx)
            if res is not None:
                self.placed[ctx.lesion] = res

    def before_paint(self) -> None:
        """Run the plan edits (enlargement, dilatation, dissection, hernia, fracture)."""
        self._run("plan", None)

    def after_paint(self, canvas: Canvas) -> list[Finding]:
        """Run the paint steps, drop findings without voxels in view, renumber lesion ids 1..n (in place)."""
        self._run("paint", canvas)
        counts = np.bincount(canvas.lesions.ravel(), minlength=256)
        lut = np.zeros(256, dtype=np.uint8)
        findings: list[Finding] = []
        for i, spec in enumerate(self.specs):
            ctx = self.contexts[i]
            if ctx is None or ctx.lesion not in self.placed or counts[ctx.lesion] == 0:
                continue
            res = self.placed[ctx.lesion]
            new_id = len(findings) + 1
            lut[ctx.lesion] = new_id
            sev = float(np.mean(ctx.fractions)) if ctx.fractions else ctx.severity
            findings.append(Finding(task=spec.name, anatomy=spec.anatomy, lesion_id=new_id, size_mm=res.size_mm,
                                    location=res.location, side=res.side, severity=round(sev, 3)))
        canvas.lesions[...] = lut[canvas.lesions]
        return findings
