"""Chest contents of a phantom: lungs (5 lobes, vessels), airways, mediastinum, heart, great vessels, esophagus.

Lungs fill the body cavity above the diaphragm lateral to the mediastinum, under a dome at the apex; the
oblique and horizontal fissures are planes that relabel the lower and middle lobes. Pulmonary vessels are
random branching capsule trees from each hilum, painted over parenchyma only. The heart is a tilted
ellipsoid (apex left, anterior, inferior) with blood pools, epicardial fat, the left atrial appendage and
four pulmonary veins; the aorta is a tube through ascending, arch, descending and abdominal segments with
its arch branches. Tubes record their centreline in ``plan.landmarks["paths"]`` for findings.
"""

from __future__ import annotations

import numpy as np

from anatomy.totalseg import total_class_ids
from pipelines.synth.body import ORDER, Plan
from pipelines.synth.canvas import INF, Part
from pipelines.synth.shapes import Bounded, Capsules, Clip, Ellipsoid, Extrusion, Field, half_space, rotation
from pipelines.synth.trunk import SIDES

LOBES = {
    "right": ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"),
    "left": ("lung_upper_lobe_left", None, "lung_lower_lobe_left"),
}


def wall(plan: Plan, mm: float) -> float:
    """Wall thickness of at least ~half an in-plane voxel, so thin walls survive coarse grids."""
    return max(mm * plan.body.s, 0.55 * min(plan.grid.spacing[1:]))


def add_path(plan: Plan, name: str, nodes, jitter: np.ndarray | None = None, rscale: float = 1.0):
    """Map canonical nodes ``(x, y, z, r, segment)`` to the body frame; record and return (points, radii)."""
    b = plan.body
    pts = b.Ps([n[:3] for n in nodes])
    if jitter is not None:
        pts = pts + jitter
    radii = b.R([n[3] for n in nodes]) * rscale
    plan.landmarks.setdefault("paths", {})[name] = {"points": pts, "radii": radii, "segments": [n[4] for n in nodes]}
    return pts, radii


def _tube(plan: Plan, name: str, pts, radii, layers, label, group: str, order: float, **kw) -> Part:
    return plan.add(Part(name, Capsules.path(pts, radii), layers, label=label, group=group, order=order, **kw))


def add_lungs(plan: Plan) -> None:
    b, t, ids, rng = plan.body, plan.tissues, total_class_ids(), plan.landmarks["rng"]
    s, sw, sd = b.s, b.s * b.w, b.s * b.d
    lung = t.id("lung")
    cav = b.cavity(shrink=3 * s)
    apex_z = 490 * s + float(rng.normal(0, 6))
    for side, sg in SIDES:
        apex = Field(lambda x, y, z: (z - (apex_z - 0.01 / s * ((np.abs(x) - 55 * sw) ** 2 + (y - 25 * sd) ** 2)))
                     .astype(np.float32))
        medial = Field(lambda x, y, z, sg=sg: (12 * s - sg * x).astype(np.float32))
        lo = np.array([min(sg * 10 * s, sg * 200 * s), -200 * s, 150 * s])
        hi = np.array([max(sg * 10 * s, sg * 200 * s), 200 * s, apex_z + 2])
        region = Bounded(Clip(cav, [b.above_diaphragm(0.0), apex, medial]), lo, hi)
        upper, middle, lower = (ids[c] if c else None for c in LOBES[side])
        plan.add(Part(f"lung_{side}", region, [(-INF, 0.0, lung)], label=upper, group="lung", order=ORDER["lung"]))
        lo, hi = region.bounds()
        # Oblique fissure: posterior-superior to anterior-inferior plane; below it is the lower lobe.
        y0, z0, slope = (-60 * sd, 255 * s, 0.87 * s / sd) if sg < 0 else (-55 * sd, 250 * s, 0.92 * s / sd)
        z0 += float(rng.normal(0, 8))
        below_oblique = half_space((0, -slope, 1), (0, y0, z0))
        plan.add(Part(f"lung_{side}_lower", Bounded(below_oblique, lo, hi), [(-INF, 0.0, lung)], label=lower,
                      group="lung", order=ORDER["lung"] + 0.01, within_labels=frozenset({upper})))
        if middle is not None:
            zh = 345 * s + float(rng.normal(0, 8))
            mid = Clip(Bounded(half_space((0, 0, 1), (0, 0, zh)), lo, hi), [half_space((0, slope, -1), (0, y0, z0))])
            plan.add(Part(f"lung_{side}_middle", mid, [(-INF, 0.0, lung)], label=middle, group="lung",
                          order=ORDER["lung"] + 0.02, within_labels=frozenset({upper})))
        hilum = b.P(sg * 52, 22, 355)
        plan.landmarks.setdefault("hilum", {})[side] = hilum
        a, bb, ra, rb = [], [], [], []

        def grow(p, d, length, r, gen):
            q = p + d * length
            a.append(p), bb.append(q), ra.append(r), rb.append(0.8 * r)
            if gen:
                for _ in range(2):
                    nd = d + 0.65 * rng.normal(size=3)
                    grow(q, nd / np.linalg.norm(nd), 0.72 * length, 0.68 * r, gen - 1)

        for d in ((0.3, 0.1, 1), (1, 0, 0.5), (1, 0.2, -0.2), (0.4, -1, -0.2), (0.3, 0.6, -1), (0.5, -0.2, -1)):
            v = np.array([sg * d[0], d[1], d[2]], dtype=float) + 0.2 * rng.normal(size=3)
            grow(hilum, v / np.linalg.norm(v), 45 * s, 5 * s, 2)
        lobes = frozenset(ids[c] for c in LOBES[side] if c)
        plan.add(Part(f"lung_vessels_{side}", Capsules(a, bb, ra, rb), [(-INF, 0.0, t.id("lung_vessel"))],
                      order=ORDER["lung_vessel"], within_labels=lobes, within_tissues=frozenset({lung})))


def add_mediastinum_and_heart(plan: Plan) -> None:
    b, t, ids, rng = plan.body, plan.tissues, total_class_ids(), plan.landmarks["rng"]
    s = b.s
    zk = np.array([245.0, 300.0, 360.0, 400.0, 440.0, 490.0, 560.0]) * s
    front, back = b.front(zk), b.y_vb(zk)
    med = Extrusion(zk, 0.0, 0.5 * (front + back), np.array([38, 34, 30, 24, 20, 18, 18]) * s, 0.5 * (back - front))
    plan.add(Part("mediastinum", Clip(med, [b.above_diaphragm(0.0)]), [(-INF, 0.0, t.id("fat"))], label=0,
                  order=ORDER["mediastinum"]))
    delta = rng.normal(0, 4 * s, size=3)
    H = lambda x, y, z: b.P(x, y, z) + delta  # noqa: E731
    size = float(np.clip(rng.normal(1.0, 0.06), 0.88, 1.12))
    c = H(18, -30, 312)
    u = np.array([0.55, -0.45, -0.7]) + 0.08 * rng.normal(size=3)
    u /= np.linalg.norm(u)
    rot = rotation(u, (0.0, 1.0, 0.0))
    radii = b.R([42, 48, 62]) * size
    heart = Clip(Ellipsoid(c, radii, rot), [b.above_diaphragm(1 * s), b.cavity(2 * s)])
    plan.add(Part("epicardial_fat", heart, [(0.0, 3 * s, t.id("fat"))], label=0, group="heart_fat",
                  order=ORDER["heart"] - 0.1, meta={"rim_of": "heart"}))
    plan.add(Part("heart", heart, [(-INF, 0.0, t.id("myocardium"))], label=ids["heart"], group="heart",
                  order=ORDER["heart"]))
    blood, only_heart = t.id("heart_blood"), frozenset({ids["heart"]})
    for name, off, r, rr in (("lv", (14, 2, -8), (20, 20, 36), rot), ("rv", (-12, -20, -8), (16, 24, 38), rot),
                             ("la", (-2, 26, 32), (24, 15, 18), None), ("ra", (-34, 4, 18), (20, 20, 26), None)):
        plan.add(Part(f"heart_{name}", Ellipsoid(c + b.R(off) * size, b.R(r) * size, rr), [(-INF, 0.0, blood)],
                      group="heart", order=ORDER["heart"] + 0.1, within_labels=only_heart))
    plan.add(Part("atrial_appendage_left", Ellipsoid(c + b.R([40, 2, 42]) * size, b.R([12, 8, 16])),
                  [(-INF, 0.0, blood)], label=ids["atrial_appendage_left"], group="heart",
                  order=ORDER["heart_appendage"]))
    la = c + b.R([-2, 26, 32]) * size
    ends = [H(-48, 22, 356), H(-46, 20, 330), H(50, 25, 360), H(48, 22, 334)]
    plan.add(Part("pulmonary_vein", Capsules([la] * 4, ends, 6 * s, 5 * s), [(-INF, 0.0, blood)],
                  label=ids["pulmonary_vein"], group="heart", order=ORDER["pulmonary"]))
    pa = t.id("pa_blood")
    trunk = [H(20, -52, 340), H(14, -38, 372), H(6, -14, 386)]
    plan.add(Part("pulmonary_trunk", Capsules.path(trunk + [H(-22, 2, 380), H(-48, 16, 366)], b.R([14, 14, 12, 10, 8])),
                  [(-INF, 0.0, pa)], label=0, order=ORDER["pulmonary"]))
    plan.add(Part("pulmonary_artery_left", Capsules.path([trunk[-1], H(30, 4, 390), H(50, 22, 374)], b.R([10, 10, 8])),
                  [(-INF, 0.0, pa)], label=0, order=ORDER["pulmonary"]))
    plan.landmarks["heart"] = {"center": c, "axis": u, "rot": rot, "radii": radii, "size": size}
    vein = t.id("vein")
    for name, pts, r in (
        ("superior_vena_cava", [(-32, -18, 300), (-32, -16, 340), (-30, -14, 390), (-28, -14, 425)], 10),
        ("brachiocephalic_vein_right", [(-28, -14, 425), (-38, -10, 460), (-55, -2, 490)], 7),
        ("brachiocephalic_vein_left", [(-28, -14, 425), (0, -26, 442), (35, -18, 458), (70, -5, 480)], 6),
    ):
        plan.add(Part(name, Capsules.path([H(*p) for p in pts], r * s), [(-INF, 0.0, vein)], label=ids[name],
                      order=ORDER["vein"]))


_AORTA = [
    (0, -10, 330, 15, "ascending aorta"), (-8, -20, 360, 16, "ascending aorta"), (-10, -18, 395, 16, "ascending aorta"),
    (-4, -10, 425, 14, "aortic arch"), (8, -4, 442, 13, "aortic arch"), (22, 16, 440, 13, "aortic arch"),
    (28, 36, 425, 12.5, "aortic arch"), (28, 44, 400, 12, "descending aorta"), (27, 45, 360, 12, "descending aorta"),
    (24, 42, 310, 11.5, "descending aorta"), (16, 35, 255, 11, "descending aorta"),
    (9, 24, 210, 11, "descending aorta"),
    (8, 15, 175, 10.5, "abdominal aorta"), (8, 12, 140, 10, "abdominal aorta"), (7, 11, 100, 10, "abdominal aorta"),
    (5, 9, 75, 9.5, "abdominal aorta"), (3, 8, 62, 9, "abdominal aorta"),
]
_ESOPHAGUS = [
    (-2, 35, 570, 8, "proximal esophagus"), (2, 38, 480, 9, "proximal esophagus"), (4, 40, 420, 9, "mid esophagus"),
    (6, 35, 370, 9, "mid esophagus"), (6, 28, 330, 9, "mid esophagus"), (10, 24, 290, 9, "distal esophagus"),
    (20, 18, 262, 9, "distal esophagus"), (32, 12, 245, 10, "distal esophagus"), (42, 12, 232, 11, "distal esophagus"),
]


def add_great_vessels_and_airway(plan: Plan) -> None:
    b, t, ids, rng = plan.body, plan.tissues, total_class_ids(), plan.landmarks["rng"]
    s = b.s
    art = t.id("artery")
    rscale = float(np.clip(rng.normal(1.0, 0.07), 0.85, 1.2))
    pts, radii = add_path(plan, "aorta", _AORTA, rng.normal(0, 2.5 * s, size=3), rscale)
    _tube(plan, "aorta", pts, radii, [(-INF, 0.0, art)], ids["aorta"], "aorta", ORDER["aorta"])
    P = b.P
    for name, p, r in (("brachiocephalic_trunk", [(-5, -8, 432), (-12, -12, 460), (-18, -10, 490)], 7),
                       ("subclavian_artery_right", [(-18, -10, 490), (-45, 0, 505), (-80, 5, 500)], 5),
                       ("common_carotid_artery_right", [(-18, -10, 490), (-22, -5, 570)], 4),
                       ("common_carotid_artery_left", [(5, 0, 440), (12, -2, 480), (18, 0, 570)], 4),
                       ("subclavian_artery_left", [(15, 15, 440), (25, 20, 475), (45, 20, 500), (80, 10, 505)], 5)):
        plan.add(Part(name, Capsules.path([P(*q) for q in p], r * s), [(-INF, 0.0, art)], label=ids[name],
                      order=ORDER["aorta"] - 0.1))
    # Esophagus: collapsed muscular tube, a little air or fluid in the lumen.
    pts, radii = add_path(plan, "esophagus", _ESOPHAGUS, rng.normal(0, 2 * s, size=3))
    w = wall(plan, 4.0)
    lumen = t.id("air") if rng.random() < 0.5 else t.id("gut_fluid")
    _tube(plan, "esophagus", pts, radii, [(-INF, -w, lumen), (-w, 0.0, t.id("gut_wall"))], ids["esophagus"],
          "esophagus", ORDER["esophagus"])
    # Trachea and main bronchi (labelled trachea): air in a thin soft-tissue wall.
    nodes = [(0, 12, 570, 10, "trachea"), (0, 15, 480, 10, "trachea"), (0, 20, 425, 10, "trachea"),
             (0, 26, 390, 10, "carina")]
    tpts, tr = add_path(plan, "trachea", nodes)
    w = wall(plan, 2.0)
    layers = [(-INF, -w, t.id("air")), (-w, 0.0, t.id("airway_wall"))]
    _tube(plan, "trachea", tpts, tr, layers, ids["trachea"], "trachea", ORDER["trachea"])
    for side, sg, r in (("right", -1, 7), ("left", 1, 6)):
        bp = [tpts[-1], P(sg * 25, 30, 376), P(sg * 50, 33, 357)]
        _tube(plan, f"bronchus_{side}", bp, [r * s] * 3, layers, ids["trachea"], "trachea", ORDER["trachea"])
