"""Finding signatures that edit a phantom's plan before it is painted (registered in the signature registry).

Enlargement and atrophy scale an organ's shapes, dilatation widens a stretch of a tube (aneurysm, dilated
bowel or esophagus), dissection adds a false lumen and flap inside the aorta, a hiatal hernia adds a sac above
the hiatus, a compression fracture lowers a vertebral body's top. The edited parts carry the lesion id, so
the painted organ part that shows the finding is its lesion region.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from anatomy.totalseg import total_class_ids
from pipelines.synth.body import ORDER, Plan
from pipelines.synth.canvas import INF, Part
from pipelines.synth.shapes import Capsules, Clip, Ellipsoid, Extrusion, Shape, Union, half_space
from pipelines.synth.signatures import Context, Placed, register


# ------------------------------------------------------------------------------------------------ plan edits
def _map_capsules(shape: Shape, fn: Callable[[Capsules], Capsules]) -> Shape:
    if isinstance(shape, Capsules):
        return fn(shape)
    if isinstance(shape, Clip):
        return Clip(_map_capsules(shape.shape, fn), shape.fields, shape.outside)
    if isinstance(shape, Union):
        return Union([_map_capsules(s, fn) for s in shape.shapes])
    return shape


def _thicken(shape: Shape, f: float) -> Shape:
    """Scale the thin dimension of a shape: tube radii, or the smallest radius of ellipsoids."""
    if isinstance(shape, Capsules):
        return shape.thickened(f)
    if isinstance(shape, Ellipsoid):
        r = shape.radii.copy()
        r[np.argmin(r)] *= f
        return Ellipsoid(shape.center, r, shape.rot, shape.p)
    if isinstance(shape, Clip):
        return Clip(_thicken(shape.shape, f), shape.fields, shape.outside)
    if isinstance(shape, Union):
        return Union([_thicken(s, f) for s in shape.shapes])
    raise TypeError(f"cannot thicken a {type(shape).__name__}")


def _voxels(plan: Plan, shape: Shape) -> int:
    """Number of voxel centres of the plan's grid inside ``shape``."""
    lo, hi = shape.bounds()
    box = plan.grid.box(lo, hi)
    if box is None:
        return 0
    return int((shape.sdf(*plan.grid.coords(box)) <= 0).sum())


def _in_view_z(plan: Plan, z0: float, z1: float) -> bool:
    zs = plan.grid.axis(2)
    return z1 >= zs[0] and z0 <= zs[-1]


@register("enlarge", "plan", priority=0)
def enlarge(ctx: Context) -> Placed | None:
    """Enlargement or atrophy: the organ group's shapes scaled by ``factor`` (``mode: thicken`` scales only
    their thin dimension) about an anchor; the whole organ becomes the lesion."""
    plan, p, rng = ctx.plan, ctx.params, ctx.rng
    groups, side = list(p["groups"]), None
    if any("{side}" in gname for gname in groups):
        both = rng.random() < float(p.get("bilateral", 0.0))
        sides = ["left", "right"] if both else [str(rng.choice(["left", "right"]))]
        side = "bilateral" if both else sides[0]
        groups = [gname.format(side=sd) for gname in groups for sd in sides]
    parts = [q for gname in groups for q in plan.group(gname)]
    if not parts:
        return None
    f = ctx.pick("factor")
    if p.get("anchor") == "meta" and any("anchor" in q.meta for q in parts):
        anchor = next(q.meta["anchor"] for q in parts if "anchor" in q.meta)
    else:
        lo, hi = parts[0].shape.bounds()
        anchor = 0.5 * (lo + hi)
    originals = plan.landmarks.setdefault("enlarged", {}).setdefault(ctx.lesion, [])
    new_tissue = None
    if ctx.has("delta"):
        main = parts[0].layers[0][2]
        new_tissue = plan.tissues.derive(plan.tissues[main].name, f"{ctx.task}_{ctx.lesion}", delta=ctx.pick("delta"))
    for q in parts:
        originals.append(q.shape)
        q.shape = _thicken(q.shape, f) if p.get("mode") == "thicken" else q.shape.scaled(f, anchor)
        q.lesion = ctx.lesion
        if new_tissue is not None:
            q.layers = [(lo_, hi_, new_tissue if t == parts[0].layers[0][2] else t) for lo_, hi_, t in q.layers]
    loc = None
    if side in ("left", "right"):
        loc = f"{side} kidney" if groups[0].startswith("kidney") else f"{side} adrenal gland"
    return Placed(loc, side, None)


@register("dilate", "plan", priority=0)
def dilate(ctx: Context) -> Placed | None:
    """Aneurysm / dilatation: a stretch of a tube (``path``) widened by ``factor`` with a smooth profile,
    filled with ``content`` (and a gas pocket) where given; the widened stretch is the lesion."""
    plan, p, rng = ctx.plan, ctx.params, ctx.rng
    path = plan.landmarks["paths"].get(p["path"])
    main = [q for q in plan.group(p["group"]) if q.name == p["path"]]
    if path is None or not main:
        return None
    pts, radii, segs = path["points"], path["radii"], path["segments"]
    weights = p["segments"]
    names = list(weights)
    seg = names[int(rng.choice(len(names), p=np.array(list(weights.values())) / sum(weights.values())))]
    nodes = [i for i, sname in enumerate(segs) if sname == seg]
    if not nodes:
        return None
    length = ctx.pick("length_mm")
    step = np.r_[0, np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))]
    start = nodes[0] if p["path"] == "small_bowel" else int(rng.choice(nodes))
    sel = [i for i in range(len(pts)) if step[start] - 1e-6 <= step[i] <= step[start] + length]
    if len(sel) < 2:
        sel = [start, min(start + 1, len(pts) - 1)]
    z = pts[sel, 2]
    if not _in_view_z(plan, z.min(), z.max()):
        return None
    f = ctx.pick("factor")
    u = (step[sel] - step[sel[0]]) / max(step[sel[-1]] - step[sel[0]], 1e-6)
    prof = 1 + (f - 1) * np.sin(np.pi * np.clip(0.15 + 0.7 * u, 0, 1)) ** 0.5
    node_f = np.ones(len(pts))
    node_f[sel] = prof
    seg_f = 0.5 * (node_f[:-1] + node_f[1:])
    for q in plan.group(p["group"]):
        if q.name in (p["path"], f"{p['path']}_gas") and isinstance(q.shape, (Capsules, Clip)):
            q.shape = _map_capsules(q.shape, lambda cap: cap.thickened(seg_f) if len(cap.a) == len(seg_f) else cap)
    new_r = radii * node_f
    ov = Capsules.path(pts[sel], new_r[sel])
    m = main[0]
    layers = list(m.layers)
    if "content" in p:
        w = m.meta.get("wall", 2.0)
        layers = [(-INF, -w, plan.tissues.id(p["content"])), (-w, 0.0, plan.tissues.id("gut_wall"))]
    plan.add(Part(f"{ctx.task}_{ctx.lesion}", ov, layers, label=m.label, group=m.group, order=m.order + 0.001,
                  lesion=ctx.lesion))
    if "content" in p:
        inner = np.maximum(new_r[sel] - m.meta.get("wall", 2.0), 0.5)
        gas = Capsules.path(pts[sel] - np.outer(inner * 0.55, [0, 1, 0]), inner * 0.45)
        plan.add(Part(f"{ctx.task}_{ctx.lesion}_gas", gas, [(-INF, 0.0, plan.tissues.id("bowel_gas"))], group=m.group,
                      order=m.order + 0.002, lesion=ctx.lesion, within_labels=frozenset({m.label}),
                      within_tissues=frozenset({plan.tissues.id(p["content"])})))
    return Placed(seg, None, round(float(2 * new_r[sel].max()), 1))


@register("dissection", "plan", priority=0)
def dissection(ctx: Context) -> Placed | None:
    """Aortic dissection: a false lumen (less enhanced) and a thin intimal flap inside the contrast lumen."""
    plan, rng = ctx.plan, ctx.rng
    if plan.phase == "native" or "aorta" not in plan.landmarks.get("paths", {}):
        return None
    path = plan.landmarks["paths"]["aorta"]
    pts, radii = path["points"], path["radii"]
    type_a = rng.random() < float(ctx.params.get("type_a", 0.4))
    sel = list(range(1, int(rng.integers(11, 16)))) if type_a else list(range(7, int(rng.integers(11, 17))))
    sel = [i for i in sel if i < len(pts)]
    if not _in_view_z(plan, pts[sel, 2].min(), pts[sel, 2].max()):
        return None
    v = rng.normal(size=3)
    offs = []
    for i in sel:
        tang = pts[min(i + 1, len(pts) - 1)] - pts[max(i - 1, 0)]
        tang /= np.linalg.norm(tang)
        n = v - (v @ tang) * tang
        offs.append(pts[i] + n / np.linalg.norm(n) * 0.42 * radii[i])
    art = plan.tissues["artery"]
    native = 42.0
    fl = plan.tissues.add(f"{ctx.task}_{ctx.lesion}_false", native + ctx.pick("false_lumen") * (art.hu - native), 8.0)
    flap = plan.tissues.add(f"{ctx.task}_{ctx.lesion}_flap", 55.0, 6.0)
    ft = max(float(ctx.params.get("flap_mm", 1.5)), 0.5 * min(plan.grid.spacing[1:]))
    ids = total_class_ids()
    plan.add(Part(ctx.task, Capsules.path(offs, radii[sel] * 0.62), [(-INF, -ft, fl), (-ft, 0.0, flap)],
                  group="aorta", order=ORDER["aorta"] + 0.01, lesion=ctx.lesion,
                  within_labels=frozenset({ids["aorta"]})))
    return Placed("ascending aorta" if type_a else "descending aorta", None, None)


@register("hernia", "plan", priority=0)
def hernia(ctx: Context) -> Placed | None:
    """Hiatal hernia: a stomach-like sac (wall, fluid, gas) above the hiatus, labelled esophagus."""
    plan, b = ctx.plan, ctx.plan.body
    path = plan.landmarks["paths"].get("esophagus")
    if path is None:
        return None
    pts = path["points"]
    dia = np.array([float(b.diaphragm(np.array(q[0]), np.array(q[1]))) for q in pts])
    i = int(np.argmin(np.abs(pts[:, 2] - dia)))
    r = ctx.pick("size_mm") / 2
    c = pts[i] + np.array([0.0, -0.1 * r, 0.75 * r])
    if not _in_view_z(plan, c[2] - r, c[2] + r):
        return None
    t, ids = plan.tissues, total_class_ids()
    w = max(3.0 * b.s, 0.55 * min(plan.grid.spacing[1:]))
    sac = Ellipsoid(c, [r, 0.85 * r, 1.1 * r])
    plan.add(Part(ctx.task, sac, [(-INF, -w, t.id("gut_fluid")), (-w, 0.0, t.id("gut_wall"))], label=ids["esophagus"],
                  group="esophagus", order=ORDER["esophagus"] + 0.01, lesion=ctx.lesion))
    gas = Ellipsoid(c - np.array([0, 0.45 * r, 0]), [0.6 * (r - w), 0.4 * (r - w), 0.7 * (r - w)])
    plan.add(Part(f"{ctx.task}_gas", gas, [(-INF, 0.0, t.id("bowel_gas"))], group="esophagus",
                  order=ORDER["esophagus"] + 0.02, lesion=ctx.lesion, within_labels=frozenset({ids["esophagus"]}),
                  within_tissues=frozenset({t.id("gut_fluid")})))
    return Placed(None, None, round(2 * r, 1))


@register("fracture", "plan", priority=0)
def fracture(ctx: Context) -> Placed | None:
    """Vertebral compression fracture: the body's top lowered by ``loss`` x height (wedge or crush), the gap
    filled by disc tissue, the impacted marrow denser; the fractured body is the lesion."""
    plan, rng = ctx.plan, ctx.rng
    levels = {k: float(v) for k, v in ctx.params["levels"].items()}
    verts = [v for v in plan.body.vertebrae if v.name in levels and _in_view_z(plan, v.z0, v.z1)]
    if not verts:
        return None
    w = np.array([levels[v.name] for v in verts])
    loss = ctx.pick("loss")
    wedge = rng.random() < 0.6
    # Try levels in a weighted random order; keep the first whose height loss shows on this grid's slices.
    for k in rng.choice(len(verts), size=len(verts), replace=False, p=w / w.sum()):
        v = verts[int(k)]
        body = [q for q in plan.group(f"vertebra_{v.name}") if q.name.endswith("_body")]
        if not body:
            continue
        h = v.z1 - v.z0
        la, lp = (loss, 0.25 * loss) if wedge else (loss, 0.85 * loss)
        slope = h * (la - lp) / (2 * v.ry)
        cut = Clip(body[0].shape, [half_space((0, -slope, 1), (0, v.yc - v.ry, v.z1 - h * la))])
        if _voxels(plan, cut) <= 0.9 * _voxels(plan, body[0].shape):
            break
    else:
        return None
    part = body[0]
    plan.landmarks.setdefault("fractured", {})[ctx.lesion] = (part.shape, v.name)
    part.shape = cut
    dense = plan.tissues.derive("cancellous", f"{ctx.task}_{ctx.lesion}", delta=float(rng.uniform(40, 90)))
    part.layers = [(lo, hi, dense if t == plan.tissues.id("cancellous") else t) for lo, hi, t in part.layers]
    part.lesion = ctx.lesion
    plan.add(Part(f"{ctx.task}_gap", Extrusion([v.z1 - h * la - 1, v.z1], 0.0, v.yc, v.rx, v.ry, 2.4),
                  [(-INF, 0.0, plan.tissues.id("disc"))], label=0, order=ORDER["disc"]))
    return Placed(f"{v.name} vertebra", None, None)
