"""Procedural torso phantoms: one synthetic CT case with label map, lesion map and findings.

:func:`render_case` is the entry point of ``fvlm synth``'s image half. A case draws, each from its own
child stream of the generator passed in:

* the patient (:class:`~pipelines.synth.body.Body`: sex, height, habitus, fat, diaphragm level, organ
  positions and sizes) and the contrast phase (native, arterial or portal venous, organ HU consistent with
  it; ``configs/synth/tissues.yaml``);
* the scan: range (lower neck / lung apex to pelvis; about one case in ten is cut short and misses a few
  anatomies), field of view, table position, in-plane spacing and slice thickness;
* the findings (:mod:`pipelines.synth.findings`), texture and image noise (sd 5-20 HU).

The anatomy does not depend on the findings requested, so a case rendered with and without a finding
differs only by that finding. Arrays are ``(Z, Y, X)`` LPS with identity direction (``scene.py``); sizes:
``small`` (128 x 128 in-plane, 56-72 slices) and ``full`` (512 x 512, 200-280 slices).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from anatomy.catalog import load_anatomy_set
from anatomy.totalseg import total_class_ids
from pipelines.synth.abdomen import add_abdominal_vessels, add_gut, add_pelvic_organs, add_solid_organs
from pipelines.synth.body import Body, Plan
from pipelines.synth.canvas import PHASES, Canvas, base_tissues, tissue_config
from pipelines.synth.findings import Injection, sample_tasks, task_spec
from pipelines.synth.scene import SynthVolume
from pipelines.synth.shapes import Grid
from pipelines.synth.thorax import add_great_vessels_and_airway, add_lungs, add_mediastinum_and_heart
from pipelines.synth.trunk import add_body_wall, add_pelvis, add_spine, add_thoracic_cage

__all__ = ["SIZES", "render_case", "sample_tasks", "build_plan", "sample_grid"]

SIZES = {"small": (128, (56, 72)), "full": (512, (200, 280))}
"""size -> (in-plane matrix, (min, max) slices)."""
CUT_SHARE = 0.1
"""Share of scans whose range is cut short (pelvis, lower abdomen or upper chest missing)."""


def sample_grid(rng: np.random.Generator, body: Body, size: str) -> tuple[Grid, tuple[float, float, float]]:
    """Scan range, field of view and spacing for ``size``; returns the grid (body frame) and the physical
    position of the body frame's origin (table offset)."""
    n, (nz_lo, nz_hi) = SIZES[size]
    s = body.s
    z_lo, z_hi = rng.uniform(-150, -122) * s, rng.uniform(500, 540) * s
    if rng.random() < CUT_SHARE:
        kind = int(rng.integers(3))
        if kind == 0:
            z_lo = rng.uniform(10, 60) * s  # pelvis cut off
        elif kind == 1:
            z_lo = rng.uniform(150, 200) * s  # chest and upper abdomen only
        else:
            z_hi = rng.uniform(290, 330) * s  # abdomen-pelvis: upper chest cut off
    skin = body.skin()
    half_w = float(skin.a.max())
    y_front, y_back = float((skin.cy - skin.b).min()), float(skin.y_max.max()) + 12.0
    fov = max(2 * half_w, y_back - y_front) + rng.uniform(30, 90)
    sp = fov / n
    off_x = rng.uniform(-0.35, 0.35) * (fov - 2 * half_w)
    yc = 0.5 * (y_front + y_back) + rng.uniform(-0.3, 0.3) * (fov - (y_back - y_front))
    nz = int(rng.integers(nz_lo, nz_hi + 1))
    sz = (z_hi - z_lo) / (nz - 1)
    origin = (off_x - fov / 2 + sp / 2, yc - fov / 2 + sp / 2, z_lo)
    grid = Grid((nz, n, n), (round(sz, 4), round(sp, 4), round(sp, 4)), origin)
    table_z = rng.uniform(-900, -100)
    shift = (-off_x, -yc, table_z - z_lo)  # physical = body frame + shift
    return grid, shift


def build_plan(rng: np.random.Generator, grid_rng: np.random.Generator, size: str, sex: str, phase: str) -> Plan:
    """The normal anatomy of one case (no findings)."""
    body = Body.sample(rng, sex)
    tissues = base_tissues(rng, phase)
    grid, shift = sample_grid(grid_rng, body, size)
    plan = Plan(grid, tissues, body, phase, landmarks={"rng": rng, "shift": shift})
    for add in (add_body_wall, add_spine, add_thoracic_cage, add_pelvis, add_lungs, add_mediastinum_and_heart,
                add_great_vessels_and_airway, add_solid_organs, add_gut, add_pelvic_organs, add_abdominal_vessels):
        add(plan)
    return plan


def _anatomies_in_view(labels: np.ndarray) -> tuple[str, ...]:
    present = np.bincount(labels.ravel(), minlength=256) > 0
    ids = total_class_ids()
    aset = load_anatomy_set("fvlm15")
    return tuple(a.name for a in aset.anatomies if any(present[ids[c]] for c in a.classes))


def render_case(rng: np.random.Generator, tasks: Sequence[str], size: str = "small", sex: str | None = None,
                *, phase: str | None = None) -> SynthVolume:
    """Render one synthetic CT with the requested findings (fvlm54 task names).

    ``sex`` (``M``/``F``) and ``phase`` (``native``, ``arterial``, ``portal_venous``) are drawn when None; a
    task that needs contrast makes a drawn phase enhanced. Findings that cannot be placed are dropped.
    All randomness comes from ``rng``: equal generator states give byte-identical volumes.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    if sex not in (None, "M", "F"):
        raise ValueError(f"sex must be 'M', 'F' or None, got {sex!r}")
    if phase not in (None, *PHASES):
        raise ValueError(f"phase must be one of {', '.join(PHASES)} or None, got {phase!r}")
    r_anat, r_grid, r_find, r_tex, r_noise = (np.random.default_rng(int(x)) for x in rng.integers(0, 2**63 - 1, size=5))
    u_sex, u_phase, u_enh, noise_sd = r_anat.random(), r_anat.random(), r_anat.random(), r_anat.uniform(5, 20)
    sex = sex or ("M" if u_sex < 0.5 else "F")
    if phase is None:
        probs = tissue_config()["phases"]
        cum = np.cumsum([probs[p] for p in PHASES]) / sum(probs.values())
        phase = PHASES[int(np.searchsorted(cum, u_phase, side="right"))]
        if phase == "native" and any(task_spec(t).requires_contrast for t in tasks):
            phase = "arterial" if u_enh < 0.4 else "portal_venous"
    plan = build_plan(r_anat, r_grid, size, sex, phase)
    injection = Injection(plan, tasks, r_find)
    injection.before_paint()
    canvas = Canvas(plan.grid, plan.tissues)
    for part in plan.ordered():
        canvas.paint(part)
    findings = injection.after_paint(canvas)
    hu = canvas.hu(r_tex, r_noise, float(noise_sd))
    g, shift = plan.grid, plan.landmarks["shift"]
    origin = tuple(float(o + d) for o, d in zip(g.origin, shift))
    return SynthVolume(hu=hu, labels=canvas.labels, lesions=canvas.lesions, spacing=tuple(float(v) for v in g.spacing),
                       origin=origin, findings=findings, anatomies_in_view=_anatomies_in_view(canvas.labels), sex=sex,
                       contrast=phase != "native")

