"""Finding signatures: how a finding shows in a phantom, as a registry ``kind -> function`` (paint steps here,
plan edits in :mod:`pipelines.synth.edits`).

A signature is either a *plan* edit (run before painting: scale an organ, dilate a tube, add a flap or a
hernia sac, compress a vertebra) or a *paint* step (run on the painted canvas: a blob in an organ, a
density change, an effusion, a thickened wall...). Each gets a :class:`Context` (the plan, the canvas for
paint steps, the task's parameters from ``configs/synth/findings.yaml``, its lesion id and generator) and
returns a :class:`Placed` (location words, side, size) or None when it cannot be placed (organ out of
view, wrong sex, no room). Every voxel that shows the finding gets the lesion id.

Sizes, contrasts and counts come from ``[subtle, conspicuous]`` ranges at a per-finding severity
(:meth:`Context.pick`), so tasks range from easy to hard and the finding records how conspicuous it is.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage

from anatomy.totalseg import total_class_ids, total_classes
from fvlm.registry import Registry
from pipelines.synth.body import Plan
from pipelines.synth.canvas import INF, Canvas, Part
from pipelines.synth.shapes import Capsules, Ellipsoid, Extrusion, Shape, Union, rotation


@dataclass
class Placed:
    """Where a finding went, in report words."""

    location: str | None = None
    side: str | None = None
    size_mm: float | None = None


@dataclass
class Context:
    """What a signature works with."""

    plan: Plan
    task: str
    params: dict
    lesion: int
    rng: np.random.Generator
    canvas: Canvas | None = None
    severity: float = 0.5
    fractions: list[float] = field(default_factory=list)

    def pick(self, key: str, default=None) -> float:
        """Value of the ``[subtle, conspicuous]`` range ``key`` (phase overrides first) at this finding's severity."""
        contrast = self.plan.phase != "native"
        rng_ = None
        for k in (f"{key}_contrast" if contrast else f"{key}_native", key):
            if k in self.params:
                rng_ = self.params[k]
                break
        if rng_ is None:
            if default is None:
                raise KeyError(f"finding {self.task!r}: parameter {key!r} is missing in configs/synth/findings.yaml")
            return default
        lo, hi = (float(rng_[0]), float(rng_[-1])) if isinstance(rng_, (list, tuple)) else (float(rng_), float(rng_))
        f = float(np.clip(self.severity + self.rng.normal(0, 0.12), 0, 1))
        if lo != hi:
            self.fractions.append(f)
        return lo + f * (hi - lo)

    def has(self, key: str) -> bool:
        return any(k in self.params for k in (key, f"{key}_native", f"{key}_contrast"))


@dataclass(frozen=True)
class Signature:
    name: str
    stage: str
    """``plan`` (edits the plan before painting) or ``paint`` (works on the painted canvas)."""
    priority: int
    """Order among paint steps (diffuse changes first, focal lesions last)."""
    fn: Callable[[Context], Placed | None]


#: name -> :class:`Signature` (a read-only mapping)
SIGNATURES: Registry[Signature] = Registry("finding signature", error=KeyError)


def register(name: str, stage: str, priority: int = 50):
    """Decorator: register a signature under ``name``."""

    def wrap(fn: Callable[[Context], Placed | None]) -> Callable[[Context], Placed | None]:
        SIGNATURES.register(name, Signature(name, stage, priority, fn), help=(inspect.getdoc(fn) or "").split("\n")[0])
        return fn

    return wrap


def get_signature(name: str) -> Signature:
    return SIGNATURES.get_obj(name)


def list_signatures() -> list[str]:
    return SIGNATURES.names()


# ------------------------------------------------------------------------------------------------ helpers
SOFT = ("fat", "sinus_fat", "breast")
_LOBE_WORDS = {"lung_upper_lobe_right": "right upper lobe", "lung_middle_lobe_right": "right middle lobe",
               "lung_lower_lobe_right": "right lower lobe", "lung_upper_lobe_left": "left upper lobe",
               "lung_lower_lobe_left": "left lower lobe"}


def _ids(names) -> list[int]:
    ids = total_class_ids()
    return [ids[n] for n in names]


def _lut(ids) -> np.ndarray:
    lut = np.zeros(256, dtype=bool)
    lut[list(ids)] = True
    return lut


def _box_of(canvas: Canvas, ids) -> tuple[slice, slice, slice] | None:
    """Bounding box of the voxels carrying any of ``ids``."""
    objs = ndimage.find_objects(canvas.labels, max_label=max(ids))
    boxes = [objs[i - 1] for i in ids if i - 1 < len(objs) and objs[i - 1] is not None]
    if not boxes:
        return None
    lo = [min(b[k].start for b in boxes) for k in range(3)]
    hi = [max(b[k].stop for b in boxes) for k in range(3)]
    return slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2])


def _grow(box, n: tuple[int, int, int], shape) -> tuple[slice, slice, slice]:
    out = [slice(max(b.start - m, 0), min(b.stop + m, s)) for b, m, s in zip(box, n, shape)]
    return out[0], out[1], out[2]


def _margin(canvas: Canvas, mm: float) -> tuple[int, int, int]:
    return tuple(int(np.ceil(mm / s)) + 1 for s in canvas.grid.spacing)  # type: ignore[return-value]


def _point(canvas: Canvas, box, idx) -> np.ndarray:
    return canvas.grid.point_of([int(i) + b.start for i, b in zip(idx, box)])


def _class_at(canvas: Canvas, p: np.ndarray) -> str:
    k = canvas.grid.index_of(p)
    return total_classes().get(int(canvas.labels[k]), "")


def _side_of(cls: str) -> str | None:
    return "left" if cls.endswith("_left") else ("right" if cls.endswith("_right") else None)


def _random_rot(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return rotation(v / np.linalg.norm(v), rng.normal(size=3))


def _path_segment(plan: Plan, name: str, p: np.ndarray) -> str | None:
    path = plan.landmarks.get("paths", {}).get(name)
    if path is None:
        return None
    i = int(np.argmin(np.linalg.norm(path["points"] - p, axis=1)))
    return path["segments"][i]


def _liver_segment(plan: Plan, p: np.ndarray) -> str:
    lm = plan.landmarks["liver"]
    x, y, z = p
    up = z >= lm["portal_z"]
    if x > lm["falciform_x"]:
        n = 2 if up else 3
    elif x > lm["middle_x"]:
        n = 1 if np.linalg.norm(p - lm["caudate"]) < 22 * plan.body.s else 4
    elif y < lm["right_split_y"]:
        n = 8 if up else 5
    else:
        n = 7 if up else 6
    return f"segment {n}"


def _where(ctx: Context, p: np.ndarray, cls: str | None = None) -> tuple[str | None, str | None]:
    """(location, side) of a finding centred at body-frame point ``p`` by the task's ``location`` rule."""
    rule = str(ctx.params.get("location", "none"))
    cls = cls if cls is not None else _class_at(ctx.canvas, p) if ctx.canvas is not None else ""
    side = _side_of(cls)
    if rule == "lobe":
        return _LOBE_WORDS.get(cls), side
    if rule == "liver_segment":
        return _liver_segment(ctx.plan, p), None
    if rule == "side_organ":
        organ = {"kidney": "kidney", "adrenal": "adrenal gland"}
        for key, words in organ.items():
            if key in cls and side:
                return f"{side} {words}", side
        return None, side
    if rule == "vertebra":
        if cls.startswith("vertebrae_"):
            return f"{cls.split('_', 1)[1]} vertebra", None
        if cls == "sacrum":
            return "sacrum", None
        return None, None
    if rule == "coronary":
        h = ctx.plan.landmarks["heart"]
        d = p - h["center"]
        if d[0] < -0.3 * h["radii"][1]:
            return "right coronary artery", None
        return ("circumflex artery" if d[1] > 0.1 * h["radii"][0] else "left anterior descending artery"), None
    if rule.startswith("path:"):
        return _path_segment(ctx.plan, rule[5:], p), None
    if rule.startswith("text:"):
        return rule[5:], ctx.params.get("side")
    return None, ctx.params.get("side")


def _host(ctx: Context) -> list[int]:
    ids = total_class_ids()
    return [ids[c] for c in ctx.params["host"]]


def _tids(ctx: Context, names) -> list[int]:
    return ctx.plan.tissues.ids(names)


def _sample(rng: np.random.Generator, coords: np.ndarray) -> np.ndarray:
    return coords[int(rng.integers(len(coords)))]


# ------------------------------------------------------------------------------------------------ paint: focal
def _candidates(ctx: Context, box, host: np.ndarray) -> np.ndarray:
    """(N, 3) box indices where a focus may be centred, after the task's tissue and region filters."""
    c, p = ctx.canvas, ctx.params
    tis = c.tissue[box]
    region = p.get("region", "any")
    if region == "outer":
        cand = ~host & ndimage.binary_dilation(host) & _lut(_tids(ctx, ("fat",)))[tis]
    else:
        cand = host.copy()
        if "tissues" in p:
            cand &= _lut(_tids(ctx, p["tissues"]))[tis]
        if region in ("surface", "coronary"):
            cand &= ~ndimage.binary_erosion(host)
    coords = np.argwhere(cand)
    if len(coords) == 0:
        return coords
    if region == "upper":
        coords = coords[coords[:, 0] >= np.percentile(coords[:, 0], 50)]
    elif region == "dependent":
        coords = coords[coords[:, 1] >= np.percentile(coords[:, 1], 60)]
    elif region == "coronary":
        h = ctx.plan.landmarks["heart"]
        pts = np.array([_point(c, box, q) for q in coords])
        proj = (pts - h["center"]) @ h["axis"] / h["radii"][2]
        coords = coords[(proj > -0.8) & (proj < 0.2)]
    if "segments" in p and len(coords):
        path = ctx.plan.landmarks["paths"][p["location"][5:]]
        pts = np.array([_point(c, box, q) for q in coords])
        near = np.argmin(np.linalg.norm(pts[:, None, :] - path["points"][None], axis=2), axis=1)
        keep = np.array([path["segments"][i] in p["segments"] for i in near], dtype=bool)
        coords = coords[keep]
    return coords


def _blob_shape(rng: np.random.Generator, center: np.ndarray, size: float, lobulation: float) -> Shape:
    r = 0.5 * size
    main = Ellipsoid(center, r * rng.uniform(0.8, 1.05, 3), _random_rot(rng))
    if lobulation <= 0:
        return main
    lobes = [main]
    for _ in range(int(rng.integers(2, 5))):
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        lobes.append(Ellipsoid(center + v * r * 0.6, r * lobulation * 1.6 * rng.uniform(0.7, 1.1, 3)))
    return Union(lobes)


@register("blob", "paint", priority=60)
def blob(ctx: Context) -> Placed | None:
    """Nodules, masses, cysts, stones, calcifications, bone lesions, diverticula: lobulated ellipsoids.

    Centres are drawn over the host voxels (filtered by tissue and region: ``upper``, ``dependent``,
    ``surface``, ``coronary``, ``outer``); large lesions prefer deep centres. A lesion replaces host voxels
    (only its ``tissues`` when given) and may bulge ``protrude_mm`` into fat, relabelled as ``relabel``.
    With ``pv`` the contrast of a focus smaller than its voxels is scaled by its volume share (partial volume).
    """
    c, p, g, rng = ctx.canvas, ctx.params, ctx.canvas.grid, ctx.rng
    ids = _host(ctx)
    box0 = _box_of(c, ids)
    if box0 is None:
        return None
    protrude = float(p.get("protrude_mm", 0.0))
    size = ctx.pick("size_mm")
    box = _grow(box0, _margin(c, size / 2 + protrude), g.shape)
    host = _lut(ids)[c.labels[box]]
    coords = _candidates(ctx, box, host)
    if len(coords) == 0:
        return None
    count = int(round(ctx.pick("count", 1)))
    lob = ctx.pick("lobulation", 0.0)
    outside_only = p.get("region") == "outer"
    confine = _lut(_tids(ctx, p["tissues"])) if "tissues" in p else None
    soft = _lut(_tids(ctx, SOFT))
    depth = None
    if not protrude and size / 2 > 2 * min(g.spacing):
        depth = ndimage.distance_transform_edt(host, sampling=g.spacing)
    base_hu = ctx.pick("hu") if ctx.has("hu") else None
    delta = ctx.pick("delta") if base_hu is None else 0.0
    mean, _, _ = ctx.plan.tissues.luts()
    first = None
    for i in range(count):
        s_i = size if i == 0 else size * float(rng.uniform(0.5, 1.0))
        pool = coords
        if depth is not None:
            d = depth[tuple(coords.T)]
            deep = coords[d >= min(0.45 * s_i, 0.8 * d.max())]
            pool = deep if len(deep) else coords
        q = _sample(rng, pool)
        center = _point(c, box, q)
        shape = _blob_shape(rng, center, s_i, lob)
        lo, hi = shape.bounds()
        sub = g.box(lo, hi)
        if sub is None:
            continue
        x, y, z = g.coords(sub)
        m = shape.sdf(x, y, z) <= 0  # (Z', Y', X')
        lab, tis = c.labels[sub], c.tissue[sub]
        inside = _lut(ids)[lab]
        allowed = np.zeros_like(inside) if outside_only else inside.copy()
        if confine is not None and not outside_only:
            allowed &= confine[tis]
        if protrude > 0:
            near = ndimage.distance_transform_edt(~inside, sampling=g.spacing) <= protrude
            allowed |= ~inside & near & soft[tis]
        ck = tuple(int(a) + b.start - s.start for a, b, s in zip(q, box, sub))
        m[ck] = True
        m &= allowed
        if outside_only:
            m[ck] = bool(soft[tis[ck]])
        if not m.any():
            continue
        host_hu = float(mean[tis[m]].mean())
        hu = base_hu if base_hu is not None else host_hu + delta
        if p.get("pv"):
            share = min(1.0, np.pi / 6 * s_i**3 / (m.sum() * g.voxel_volume))
            hu = host_hu + share * (hu - host_hu)
        tid = ctx.plan.tissues.add(f"{ctx.task}_{ctx.lesion}_{i}", hu, float(p.get("texture", 10.0)))
        tis[m] = tid
        cls = total_classes().get(int(lab[ck]), "")
        relabel = p.get("relabel")
        if relabel:
            lab[m] = total_class_ids()[relabel.format(side=_side_of(cls) or "left")]
        else:
            lab[m & ~inside] = lab[ck] if lab[ck] else ids[0]
        c.lesions[sub][m] = ctx.lesion
        if first is None:
            first = (center, cls, s_i)
    if first is None:
        return None
    loc, side = _where(ctx, first[0], first[1])
    return Placed(loc, side, round(first[2], 1) if p.get("sized", True) else None)


# ------------------------------------------------------------------------------------------------ paint: diffuse
@register("density", "paint", priority=10)
def density(ctx: Context) -> Placed | None:
    """Diffuse attenuation change of an organ's tissue (steatosis, osteopenia): HU + ``delta``.

    Takes over voxels of an enlarged organ only inside the organ's normal outline, so that an enlargement
    and a density change of the same organ both keep a region (the enlargement keeps the extra part).
    """
    c = ctx.canvas
    ids = _host(ctx)
    box = _box_of(c, ids)
    if box is None:
        return None
    tis, les = c.tissue[box], c.lesions[box]
    m = _lut(ids)[c.labels[box]] & _lut(_tids(ctx, ctx.params["tissues"]))[tis]
    free = les == 0
    for lid, shapes in ctx.plan.landmarks.get("enlarged", {}).items():
        taken = les == lid
        if taken.any():
            x, y, z = c.grid.coords(box)
            inside = np.min([s.sdf(x, y, z) for s in shapes], axis=0) <= 0
            free |= taken & inside
    m &= free
    if not m.any():
        return None
    delta = ctx.pick("delta")
    lut = np.arange(256, dtype=np.uint8)
    for t in np.unique(tis[m]):
        old = ctx.plan.tissues[int(t)]
        lut[t] = ctx.plan.tissues.derive(old.name, f"{old.name}_{ctx.task}", delta=delta)
    tis[m] = lut[tis[m]]
    les[m] = ctx.lesion
    return Placed(None, None, None)


@register("effusion", "paint", priority=20)
def effusion(ctx: Context) -> Placed | None:
    """Pleural effusion: dependent fluid in the posterior pleural space (lung region), a horizontal coronal level."""
    c, g, rng = ctx.canvas, ctx.canvas.grid, ctx.rng
    ids = total_class_ids()
    both = rng.random() < float(ctx.params.get("bilateral", 0.4))
    sides = ["left", "right"] if both else [str(rng.choice(["left", "right"]))]
    thick = ctx.pick("thickness_mm")
    tid = ctx.plan.tissues.add(f"{ctx.task}_{ctx.lesion}", ctx.pick("hu"), 5.0)
    done = []
    for side in sides:
        lobes = [ids[n] for n in total_class_ids() if n.startswith("lung_") and n.endswith(side)]
        box = _box_of(c, lobes)
        if box is None:
            continue
        lung = _lut(lobes)[c.labels[box]]
        kk, jj, _ = np.nonzero(lung)
        z = g.axis(2)[box[0]].reshape(-1, 1, 1)
        y = g.axis(1)[box[1]].reshape(1, -1, 1)
        zlo, zhi = g.axis(2)[box[0]][kk.min()], g.axis(2)[box[0]][kk.max()]
        ymax = g.axis(1)[box[1]][jj.max()]
        taper = np.clip(1.0 - 0.7 * (z - zlo) / max(zhi - zlo, 1.0), 0.3, 1.0)
        m = lung & (y >= ymax - thick * taper)
        if m.any():
            c.tissue[box][m] = tid
            c.lesions[box][m] = ctx.lesion
            done.append(side)
    if not done:
        return None
    return Placed(None, done[0] if len(done) == 1 else "bilateral", None)


@register("rim", "paint", priority=20)
def rim(ctx: Context) -> Placed | None:
    """Pericardial effusion: a fluid rim of ``thickness_mm`` around the heart, labelled heart."""
    c = ctx.canvas
    heart = [p for p in ctx.plan.parts if p.name == "heart"]
    if not heart or _box_of(c, _host(ctx)) is None:
        return None
    t = ctx.pick("thickness_mm")
    tid = ctx.plan.tissues.add(f"{ctx.task}_{ctx.lesion}", ctx.pick("hu"), 5.0)
    part = Part("pericardial_fluid", heart[0].shape, [(0.0, t, tid)], label=_host(ctx)[0], lesion=ctx.lesion,
                within_tissues=frozenset(_tids(ctx, ("fat", "lung", "lung_vessel"))))
    out = c.paint(part)
    if out is None or not out[1].any():
        return None
    return Placed(None, None, None)


@register("lung_opacity", "paint", priority=30)
def lung_opacity(ctx: Context) -> Placed | None:
    """Ground glass (``mode: add``, parenchyma only), consolidation (``replace``) or a dependent atelectatic band."""
    c, rng, p = ctx.canvas, ctx.rng, ctx.params
    band = p.get("shape") == "band"
    names = [n for n in _LOBE_WORDS if not band or "lower" in n]
    lobes = _ids(names)
    box = _box_of(c, lobes)
    if box is None:
        return None
    lung = _lut(lobes)[c.labels[box]]
    coords = np.argwhere(lung)
    if band:
        coords = coords[coords[:, 1] >= np.percentile(coords[:, 1], 75)]
        coords = coords[coords[:, 0] <= np.percentile(coords[:, 0], 50)]
    if len(coords) == 0:
        return None
    q = _sample(rng, coords)
    center = _point(c, box, q)
    lobe = int(c.labels[box][tuple(q)])
    size = ctx.pick("size_mm")
    if band:
        th = ctx.pick("thickness_mm")
        shape: Shape = Ellipsoid(center, [1.5 * size, th / 2, size], rotation((0, 0.3 * rng.normal(), 1)))
    else:
        shape = Union([Ellipsoid(center + (rng.uniform(-size, size, 3) if i else 0), size * rng.uniform(0.55, 1.0, 3),
                                 _random_rot(rng)) for i in range(int(round(ctx.pick("count", 1))))])
    if p.get("mode") == "add":
        tid = ctx.plan.tissues.derive("lung", f"{ctx.task}_{ctx.lesion}", delta=ctx.pick("delta"), tex=40.0)
        within = frozenset(_tids(ctx, ("lung",)))
    else:
        tid = ctx.plan.tissues.add(f"{ctx.task}_{ctx.lesion}", ctx.pick("hu"), 15.0)
        within = frozenset(_tids(ctx, ("lung", "lung_vessel")))
    out = c.paint(Part(ctx.task, shape, [(-INF, 0.0, tid)], lesion=ctx.lesion, within_labels=frozenset({lobe}),
                       within_tissues=within, thin=True))
    if out is None or not out[1].any():
        return None
    return Placed(*_where(ctx, center, total_classes()[lobe]), None)


@register("wall", "paint", priority=40)
def wall_thickening(ctx: Context) -> Placed | None:
    """Thickened enhancing wall of a hollow organ: inward ``thickness_mm``, outward ``outward_mm``, over a
    segment of length ``extent_mm`` around a random wall point (or the whole organ without ``extent_mm``)."""
    c, g, rng, p = ctx.canvas, ctx.canvas.grid, ctx.rng, ctx.params
    ids = _host(ctx)
    box0 = _box_of(c, ids)
    if box0 is None:
        return None
    t, out_mm = ctx.pick("thickness_mm"), ctx.pick("outward_mm", 0.0)
    box = _grow(box0, _margin(c, out_mm + 2), g.shape)
    host = _lut(ids)[c.labels[box]]
    surface = np.argwhere(host & ~ndimage.binary_erosion(host))
    if len(surface) == 0:
        return None
    q = _sample(rng, surface)
    center = _point(c, box, q)
    if "extent_mm" in p:
        r = ctx.pick("extent_mm") / 2
        at = [slice(int(a) + b.start, int(a) + b.start + 1) for a, b in zip(q, box)]
        sub = _grow((at[0], at[1], at[2]), _margin(c, r), g.shape)
        box = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(box, sub))
        host = _lut(ids)[c.labels[box]]
        x, y, z = g.coords(box)
        seg = (x - center[0]) ** 2 + (y - center[1]) ** 2 + (z - center[2]) ** 2 <= r * r
    else:
        seg = np.ones(host.shape, dtype=bool)
    depth = ndimage.distance_transform_edt(host, sampling=g.spacing)
    outer = ndimage.distance_transform_edt(~host, sampling=g.spacing)
    tis = c.tissue[box]
    soft = _lut(_tids(ctx, SOFT + ("lung", "lung_vessel")))
    m = seg & ((host & (depth <= t)) | (~host & (outer <= out_mm) & soft[tis]))
    if not m.any():
        return None
    tid = ctx.plan.tissues.derive("gut_wall", f"{ctx.task}_{ctx.lesion}", delta=ctx.pick("delta"), tex=10.0)
    lab = c.labels[box]
    tis[m] = tid
    lab[m & ~host] = ids[0]
    c.lesions[box][m] = ctx.lesion
    return Placed(*_where(ctx, center, total_classes()[ids[0]]), None)


@register("duct", "paint", priority=45)
def duct(ctx: Context) -> Placed | None:
    """Dilated pancreatic duct: a fluid tube along the pancreas centreline."""
    c = ctx.canvas
    path = ctx.plan.landmarks["paths"].get("pancreas")
    if path is None or _box_of(c, _host(ctx)) is None:
        return None
    dia = ctx.pick("diameter_mm")
    tid = ctx.plan.tissues.add(f"{ctx.task}_{ctx.lesion}", ctx.pick("hu"), 4.0)
    pts = path["points"]
    out = c.paint(Part("pancreatic_duct", Capsules.path(pts, dia / 2), [(-INF, 0.0, tid)], lesion=ctx.lesion,
                       within_labels=frozenset(_host(ctx)), thin=True))
    if out is None or not out[1].any():
        return None
    return Placed(None, None, round(dia, 1))


@register("hydronephrosis", "paint", priority=45)
def hydronephrosis(ctx: Context) -> Placed | None:
    """Dilated renal pelvis and calyces: fluid ellipsoid at the pelvis plus calyces joined by infundibula."""
    c, rng, b = ctx.canvas, ctx.rng, ctx.plan.body
    ids = total_class_ids()
    sides = [s for s in ("left", "right") if _box_of(c, [ids[f"kidney_{s}"]]) is not None]
    if not sides:
        return None
    side = str(rng.choice(sides))
    k = ctx.plan.landmarks["kidneys"][side]
    f = ctx.pick("factor")
    rot, axis = k["rot"], k["rot"][:, 2]
    parts: list[Shape] = [Ellipsoid(k["pelvis"], b.R([7, 6, 12]) * f, rot)]
    a, bb = [], []
    for _ in range(int(round(ctx.pick("calyces")))):
        pos = k["sinus"] + axis * rng.uniform(-0.6, 0.6) * k["radii"][2] + rng.normal(0, 3 * b.s, 3)
        parts.append(Ellipsoid(pos, b.R([5, 5, 5]) * np.sqrt(f)))
        a.append(k["pelvis"]), bb.append(pos)
    parts.append(Capsules(a, bb, 2.5 * b.s * np.sqrt(f), 2.5 * b.s * np.sqrt(f)))
    tid = ctx.plan.tissues.add(f"{ctx.task}_{ctx.lesion}", ctx.pick("hu"), 3.0)
    within = frozenset({ids[f"kidney_{side}"], ids[f"kidney_cyst_{side}"]})
    out = c.paint(Part(ctx.task, Union(parts), [(-INF, 0.0, tid)], lesion=ctx.lesion, within_labels=within))
    if out is None or not out[1].any():
        return None
    return Placed(f"{side} kidney", side, None)


@register("bronchiectasis", "paint", priority=50)
def bronchiectasis(ctx: Context) -> Placed | None:
    """Dilated, thick-walled airways running from the hilum into one (mostly lower) lobe."""
    c, rng, s = ctx.canvas, ctx.rng, ctx.plan.body.s
    names = [n for n in _LOBE_WORDS if "lower" in n] if rng.random() < 0.7 else list(_LOBE_WORDS)
    lobes = _ids(names)
    box = _box_of(c, lobes)
    if box is None:
        return None
    coords = np.argwhere(_lut(lobes)[c.labels[box]])
    lobe = int(c.labels[box][tuple(_sample(rng, coords))])
    cls = total_classes()[lobe]
    hilum = ctx.plan.landmarks["hilum"]["left" if cls.endswith("left") else "right"]
    coords = np.argwhere(c.labels[box] == lobe)
    pts = np.array([_point(c, box, q) for q in coords[:: max(1, len(coords) // 2000)]])
    dist = np.linalg.norm(pts - hilum, axis=1)
    near = pts[dist <= np.percentile(dist, 35)]
    lumen, w = ctx.pick("lumen_mm") / 2, ctx.pick("wall_mm")
    a, bb = [], []
    for _ in range(int(round(ctx.pick("count")))):
        p0 = near[int(rng.integers(len(near)))]
        d = p0 - hilum + rng.normal(0, 10 * s, 3)
        a.append(p0), bb.append(p0 + d / np.linalg.norm(d) * ctx.pick("length_mm"))
    wall_t = ctx.plan.tissues.derive("airway_wall", f"{ctx.task}_{ctx.lesion}", delta=10.0)
    layers = [(-INF, -w, ctx.plan.tissues.id("air")), (-w, 0.0, wall_t)]
    part = Part(ctx.task, Capsules(a, bb, lumen + w, 0.85 * lumen + w), layers,
                lesion=ctx.lesion, within_labels=frozenset({lobe}),
                within_tissues=frozenset(_tids(ctx, ("lung", "lung_vessel"))), thin=True)
    out = c.paint(part)
    if out is None or not out[1].any():
        return None
    return Placed(_LOBE_WORDS[cls], _side_of(cls), None)


@register("osteophytes", "paint", priority=50)
def osteophytes(ctx: Context) -> Placed | None:
    """Degenerative spine: marginal osteophytes at the anterolateral endplates and endplate sclerosis."""
    c, rng, plan = ctx.canvas, ctx.rng, ctx.plan
    ids = total_class_ids()
    lumbar = rng.random() < float(ctx.params.get("lumbar", 0.7))
    names = ["L1", "L2", "L3", "L4", "L5"] if lumbar else ["T6", "T7", "T8", "T9", "T10", "T11", "T12"]
    verts = [v for v in plan.landmarks["vertebrae"] if v.name in names and _box_of(c, [ids[v.label]]) is not None]
    if not verts:
        return None
    n = min(len(verts), int(round(ctx.pick("count"))))
    i0 = int(rng.integers(0, len(verts) - n + 1))
    spur = plan.tissues.add(f"{ctx.task}_{ctx.lesion}_spur", 700.0, 60.0)
    scl = plan.tissues.derive("cancellous", f"{ctx.task}_{ctx.lesion}_endplate", delta=float(rng.uniform(150, 260)))
    soft = frozenset(_tids(ctx, ("fat", "muscle", "disc", "cancellous"))
                     + [i for i, t in enumerate(plan.tissues.items) if t.name.startswith("cortex_pv_cancellous")])
    painted = False
    for v in verts[i0:i0 + n]:
        lab = ids[v.label]
        a, bb, ra = [], [], []
        for zend, sgn in ((v.z1, 1.0), (v.z0, -1.0)):
            for th in rng.uniform(-1.2, 1.2, int(rng.integers(1, 4))):
                rim_ = np.array([0.95 * v.rx * np.sin(th), v.yc - 0.95 * v.ry * np.cos(th),
                                 zend - sgn * 2 * plan.body.s])
                d = np.array([np.sin(th), -np.cos(th), 0.6 * sgn])
                length = ctx.pick("spur_mm")
                a.append(rim_), bb.append(rim_ + d / np.linalg.norm(d) * length), ra.append(max(2.0, 0.3 * length))
        for part in (Part("osteophytes", Capsules(a, bb, ra, 1.5), [(-INF, 0.0, spur)], label=lab, lesion=ctx.lesion,
                          within_tissues=soft, thin=True),
                     Part("endplate_sclerosis", Union([Extrusion([v.z1 - 3, v.z1], 0.0, v.yc, v.rx, v.ry, 2.4),
                                                       Extrusion([v.z0, v.z0 + 3], 0.0, v.yc, v.rx, v.ry, 2.4)]),
                          [(-INF, 0.0, scl)], lesion=ctx.lesion, within_labels=frozenset({lab}),
                          within_tissues=frozenset(_tids(ctx, ("cancellous",))), thin=True)):
            out = c.paint(part)
            painted |= out is not None and bool(out[1].any())
    if not painted:
        return None
    return Placed("lumbar spine" if lumbar else "thoracic spine", None, None)
