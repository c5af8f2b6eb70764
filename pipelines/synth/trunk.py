"""Body wall and skeleton of a phantom: table, skin, fat, muscle, cavity, diaphragm, spine, ribs, pelvis.

Adds parts to a :class:`~pipelines.synth.body.Plan` in canonical anatomy mapped to the patient (see
:mod:`pipelines.synth.body`). Bones are marrow in a partial-volume cortical shell; vertebrae are a body
(superellipse cylinder) plus posterior elements (pedicles, laminae, spinous and transverse processes as
capsules) around a CSF canal holding the cord down to L1; ribs run from their vertebra around the body
cavity, dropping towards the front, and continue as costal cartilage to the sternum or costal margin.
"""

from __future__ import annotations

import numpy as np

from anatomy.totalseg import total_class_ids
from pipelines.synth.body import ORDER, Plan
from pipelines.synth.canvas import INF, Part
from pipelines.synth.shapes import Capsules, Clip, Ellipsoid, Extrusion, Field, Union, half_space

SIDES = (("left", 1.0), ("right", -1.0))


def _layers(plan: Plan, tissue: str, lo: float = -INF, hi: float = 0.0) -> list[tuple[float, float, int]]:
    return [(lo, hi, plan.tissues.id(tissue))]


def add_body_wall(plan: Plan) -> None:
    """Table, skin and subcutaneous fat, breasts, muscle, paraspinal muscles, cavity fat, diaphragm, psoas."""
    b, t, ids = plan.body, plan.tissues, total_class_ids()
    skin = b.skin()
    skin_t = max(2.0, 0.6 * min(plan.grid.spacing[1:]))
    # CT table under the back: foam core in a dense shell.
    z = b.wall_knots()
    y_top = float(np.median(skin.y_max)) + 1.0
    table = Extrusion(z[[0, -1]] + np.array([-400.0, 400.0]), 0.0, y_top + 22.0, 700.0, 22.0, 2.0)
    plan.add(Part("table", table, [(-INF, -3.0, t.id("table_foam")), (-3.0, 0.0, t.id("table_shell"))],
                  order=ORDER["table"]))
    plan.add(Part("skin", skin, [(-INF, -skin_t, t.id("fat")), (-skin_t, 0.0, t.id("skin"))], order=ORDER["body"]))
    if b.sex == "F":
        rng = plan.landmarks["rng"]
        size = float(rng.uniform(0.6, 1.3))
        zc = 355 * b.s
        k = int(np.searchsorted(skin.knots, zc))
        f = (zc - skin.knots[k - 1]) / (skin.knots[k] - skin.knots[k - 1])
        cy, a_, b_ = ((1 - f) * v[k - 1] + f * v[k] for v in (skin.cy, skin.a, skin.b))
        for _, sg in SIDES:
            x = sg * 0.5 * a_
            y_skin = cy - b_ * np.sqrt(1 - 0.25)
            r = b.R([55, 30, 50]) * size
            plan.add(Part("breast", Ellipsoid([x, y_skin + 0.2 * r[1], zc], r), _layers(plan, "breast"),
                          order=ORDER["breast"]))
    muscle = b.muscle()
    plan.add(Part("muscle", muscle, _layers(plan, "muscle"), order=ORDER["muscle"]))
    zk = np.array([-40.0, 0.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 420.0, 480.0, 540.0]) * b.s
    blocks = []
    for side, sg in SIDES:
        block = Extrusion(zk, sg * 27 * b.s * b.w, b.y_vb(zk) + 42 * b.s, 27 * b.s, 36 * b.s, 2.0)
        blocks.append(block)
        plan.add(Part(f"autochthon_{side}", Clip(block, [muscle]), _layers(plan, "muscle"),
                      label=ids[f"autochthon_{side}"], order=ORDER["paraspinal"]))
    cavity = b.cavity()
    plan.add(Part("cavity", Clip(cavity, [Union(blocks)], [True]), _layers(plan, "fat"), order=ORDER["cavity"]))
    dia = Field(lambda x, y, zz: (np.abs(zz - (b.diaphragm(x, y) - 2.5 * b.s)) - 2.5 * b.s).astype(np.float32))
    plan.add(Part("diaphragm", Clip(cavity, [dia]), _layers(plan, "muscle"), order=ORDER["diaphragm"]))
    # Psoas: beside the lumbar bodies (y relative to the spine), then over the pelvic brim to the femur.
    spec = [(22, 5, 195, 5), (32, 2, 140, 12), (42, 0, 80, 18), (55, -2, 20, 22), (75, -15, -50, 20),
            (85, -35, -100, 16), (90, -45, -150, 14)]
    for side, sg in SIDES:
        pts = []
        for x, dy, z, _ in spec:
            zb = z * b.s
            y = float(b.y_vb(zb)) + dy * b.s if z > 0 else dy * b.s * b.d
            pts.append([sg * x * b.s * b.w, y, zb])
        plan.add(Part(f"iliopsoas_{side}", Capsules.path(pts, b.R([r for *_, r in spec])), _layers(plan, "muscle"),
                      label=ids[f"iliopsoas_{side}"], order=ORDER["psoas"]))


def _canal_radius(rx: float, s: float) -> float:
    return 0.45 * rx + 2.0 * s


def add_spine(plan: Plan) -> None:
    """Vertebrae C4..L5 (body + posterior elements), discs, canal and cord, S1 and sacrum."""
    b, ids = plan.body, total_class_ids()
    s = b.s
    bone = plan.cortex_layers()
    flat = _layers(plan, "flat_bone")
    canal_pts, canal_r = [], []
    prev = None
    vlist = []
    for v in b.vertebrae:
        cls = v.label
        if cls not in ids:
            continue
        lumbar, cervical = v.name.startswith("L"), v.name.startswith("C")
        body_shape = Extrusion([v.z0, v.z1], 0.0, v.yc, v.rx, v.ry, 2.4)
        grp = f"vertebra_{v.name}"
        plan.add(Part(f"{grp}_body", body_shape, list(bone), label=ids[cls], group=grp, order=ORDER["vertebra"],
                      meta={"vertebra": v.name}))
        rc = _canal_radius(v.rx, s)
        yk = v.yc + v.ry + 0.9 * rc
        zc = v.zc
        a, bb, ra = [], [], []
        sp_len, sp_drop = (20 * s, 8 * s) if cervical else ((28 * s, 4 * s) if lumbar else (28 * s, 20 * s))
        t_len, t_back = (10 * s, -4 * s) if cervical else ((28 * s, -2 * s) if lumbar else (14 * s, 8 * s))
        lam = np.array([0.0, yk + rc + 3 * s, zc - 2 * s])
        for _, sg in SIDES:
            p0 = np.array([sg * 0.62 * v.rx, v.yc + 0.6 * v.ry, zc])
            p1 = np.array([sg * (rc + 3 * s), yk, zc])
            a += [p0, p1, p1]
            bb += [p1, lam, np.array([sg * (v.rx + t_len), yk + t_back, zc + 2 * s])]
            ra += [0.22 * v.rx, 4 * s, 4.5 * s]
        a.append(lam)
        bb.append(lam + np.array([0.0, sp_len, -sp_drop]))
        ra.append(6 * s if lumbar else 4 * s)
        plan.add(Part(f"{grp}_arch", Capsules(a, bb, ra, ra), flat, label=ids[cls], group=grp,
                      order=ORDER["vertebra"], meta={"vertebra": v.name}))
        if prev is not None:
            disc = Extrusion([prev.z1, v.z0], 0.0, [prev.yc, v.yc], [prev.rx, v.rx], [prev.ry, v.ry], 2.4)
            plan.add(Part(f"disc_{prev.name}_{v.name}", disc, _layers(plan, "disc"), label=0, order=ORDER["disc"],
                          meta={"above": v.name, "below": prev.name}))
        canal_pts.append([0.0, yk, zc])
        canal_r.append(rc)
        prev = v
        vlist.append(v)
    # S1 and sacrum.
    ys1 = float(b.y_vb(-15 * s))
    s1 = Extrusion([-30 * s, 0.0], 0.0, ys1, 46 * s * b.w, 19 * s, 2.5)
    plan.add(Part("s1", s1, list(bone), label=ids["vertebrae_S1"], group="vertebra_S1", order=ORDER["vertebra"],
                  meta={"vertebra": "S1"}))
    l5 = b.vertebra("L5")
    plan.add(Part("disc_S1_L5", Extrusion([0.0, l5.z0], 0.0, [ys1, l5.yc], [22 * s, l5.rx], [17 * s, l5.ry], 2.4),
                  _layers(plan, "disc"), label=0, order=ORDER["disc"], meta={"above": "L5", "below": "S1"}))
    zk = np.array([-125.0, -100.0, -70.0, -30.0]) * s
    sac = Extrusion(zk, 0.0, b.y_vb(zk), np.array([14, 26, 38, 44]) * s * b.w, np.array([8, 12, 15, 18]) * s, 2.2)
    plan.add(Part("sacrum", sac, list(bone), label=ids["sacrum"], group="sacrum", order=ORDER["vertebra"]))
    canal_pts = [[0.0, ys1 + 25 * s, -40 * s], [0.0, ys1 + 24 * s, -10 * s]] + canal_pts
    canal_r = [8 * s, 10 * s] + canal_r
    plan.add(Part("canal", Capsules.path(canal_pts, canal_r), _layers(plan, "csf"), label=0, order=ORDER["canal"]))
    l1 = b.vertebra("L1")
    cord = [(p, r) for p, r in zip(canal_pts, canal_r) if p[2] >= l1.zc]
    plan.add(Part("spinal_cord", Capsules.path([p for p, _ in cord], [0.5 * r for _, r in cord]),
                  _layers(plan, "spinal_cord"), label=ids["spinal_cord"], order=ORDER["canal"] + 0.1))
    plan.landmarks["vertebrae"] = vlist


_RIB_DROP = [22, 42, 60, 75, 85, 95, 100, 100, 95, 85, 55, 35]
_RIB_XEND = [22, 32, 40, 48, 55, 62, 68, 85, 100, 112]
_STERNAL_Z = [452, 430, 405, 380, 352, 325, 298]


def add_thoracic_cage(plan: Plan) -> None:
    """Ribs 1-12 on both sides, costal cartilages, sternum, clavicles, scapulae."""
    b, ids = plan.body, total_class_ids()
    s = b.s
    bone = plan.cortex_layers(thickness=1.0)
    sternum_y = lambda z: float(b.front(z)) - 6 * s  # noqa: E731
    for side, sg in SIDES:
        ends = []
        for k in range(1, 13):
            v = b.vertebra(f"T{k}")
            rc = _canal_radius(v.rx, s)
            yk = v.yc + v.ry + 0.9 * rc
            head = np.array([sg * (v.rx + 3 * s), v.yc + 0.2 * v.ry, v.zc])
            tub = np.array([sg * (v.rx + 14 * s), yk + 8 * s, v.zc])
            off = 5 * s
            cy, a_, b_ = b.cavity_params(v.zc)
            psi0 = float(np.arcsin(np.clip((abs(tub[0]) + 12 * s) / (a_ + off), 0, 0.95)))
            if k <= 10:
                xe = _RIB_XEND[k - 1] * s * b.w
                psi_e = float(np.pi - np.arcsin(np.clip(xe / (a_ + off), 0, 0.99)))
            else:
                psi_e = 0.55 * np.pi if k == 11 else 0.42 * np.pi
            pts = [head, tub]
            for u in np.linspace(0, 1, 7):
                psi = psi0 + u * (psi_e - psi0)
                z = v.zc - _RIB_DROP[k - 1] * s * u**1.3
                cy, a_, b_ = b.cavity_params(z)
                pts.append(np.array([sg * (a_ + off) * np.sin(psi), cy + (b_ + off) * np.cos(psi), z]))
            r0 = (6.0 if k == 1 else 5.0) * s
            radii = [r0 * 0.9, r0] + [r0 * (1 - 0.15 * u) for u in np.linspace(0, 1, 7)]
            plan.add(Part(f"rib_{side}_{k}", Capsules.path(pts, radii), list(bone), label=ids[f"rib_{side}_{k}"],
                          group=f"rib_{side}_{k}", order=ORDER["rib"]))
            ends.append(pts[-1])
        cart = []
        for k in range(1, 11):
            e = ends[k - 1]
            if k <= 7:
                zt = _STERNAL_Z[k - 1] * s
                target = np.array([sg * 14 * s * b.w, sternum_y(zt), zt])
            else:
                prev = cart[-1]
                target = prev[0] + 0.6 * (prev[1] - prev[0])
            cart.append((e, target))
        a = [c[0] for c in cart]
        bb = [c[1] for c in cart]
        plan.add(Part(f"costal_cartilage_{side}", Capsules(a, bb, 4.5 * s, 4.5 * s), _layers(plan, "cartilage"),
                      label=ids["costal_cartilages"], order=ORDER["cartilage"]))
    zk = np.array([280.0, 298.0, 405.0, 415.0, 458.0]) * s
    st = Extrusion(zk, 0.0, [sternum_y(z) for z in zk], np.array([7, 13, 15, 25, 25]) * s * b.w, 7 * s, 2.2)
    plan.add(Part("sternum", st, plan.cortex_layers(thickness=1.2), label=ids["sternum"], group="sternum",
                  order=ORDER["sternum"]))
    for side, sg in SIDES:
        zs = np.array([455.0, 470.0, 480.0, 484.0]) * s
        xs = np.array([14.0, 60.0, 100.0, 118.0]) * s * b.w
        ys = np.array([b.muscle_front(z) for z in zs]) + np.array([8.0, 10.0, 25.0, 45.0]) * s
        pts = np.stack([sg * xs, ys, zs], axis=1)
        plan.add(Part(f"clavicula_{side}", Capsules.path(pts, 7 * s), plan.cortex_layers(),
                      label=ids[f"clavicula_{side}"],
                      order=ORDER["bone"]))
        zk = np.array([345.0, 470.0]) * s
        cy, a_, b_ = b.cavity_params(zk)
        ring = _ring(zk, 0.0, cy, a_ + 14 * s, b_ + 14 * s, 7 * s)
        clip = [half_space((0, -1, 0), (0, float(cy.mean() + 0.25 * b_.mean()), 0)),
                half_space((-sg, 0, 0), (sg * 55 * s, 0, 0)),
                half_space((sg, 0, -0.8), (sg * 60 * s, 0, 345 * s))]
        plan.add(Part(f"scapula_{side}", Clip(ring, clip), _layers(plan, "flat_bone"),
                      label=ids[f"scapula_{side}"], order=ORDER["bone"]))


def _ring(zk, cx, cy, a, b, t: float) -> Clip:
    """A curved plate: the band of thickness ``t`` inside an elliptic cylinder (to be clipped to an arc)."""
    return Clip(Extrusion(zk, cx, cy, a, b, 2.0), [Extrusion(zk, cx, cy, a - t, b - t, 2.0)], [True])


def add_pelvis(plan: Plan) -> None:
    """Iliac wings, acetabula, pubic rami, ischia and proximal femora."""
    b, ids = plan.body, total_class_ids()
    s = b.s
    flat = _layers(plan, "flat_bone")
    for side, sg in SIDES:
        hip, fem = ids[f"hip_{side}"], ids[f"femur_{side}"]
        ring = _ring(np.array([-62.0, 62.0]) * s, sg * 45 * s * b.w, 5 * s * b.d, 88 * s * b.w, 68 * s * b.d, 9 * s)
        clip = [half_space((-sg, 0, 0), (sg * 45 * s * b.w, 0, 0)), half_space((0, 1, 0), (0, 62 * s * b.d, 0)),
                half_space((0, -1, 0), (0, -40 * s * b.d, 0)), half_space((0, -0.1, 1), (0, 0, 55 * s))]
        plan.add(Part(f"ilium_{side}", Clip(ring, clip), flat, label=hip,
                      order=ORDER["bone"]))
        c = b.P(sg * 88, -10, -95)
        plan.add(Part(f"acetabulum_{side}", Ellipsoid(c, b.R([30, 30, 30])), flat, label=hip, order=ORDER["bone"]))
        plan.add(Part(f"hip_joint_{side}", Ellipsoid(c, b.R([25, 25, 25])), _layers(plan, "cartilage"), label=0,
                      order=ORDER["bone"] + 0.1))
        plan.add(Part(f"femur_head_{side}", Ellipsoid(c, b.R([23, 23, 23])), plan.cortex_layers(), label=fem,
                      order=ORDER["bone"] + 0.2))
        plan.add(Part(f"femur_neck_{side}", Capsules.path([c, b.P(sg * 125, 5, -125), b.P(sg * 130, 5, -170)],
                                                          b.R([15, 17, 15])),
                      plan.cortex_layers(), label=fem, order=ORDER["bone"] + 0.2))
        rami = Capsules([b.P(sg * 75, -35, -100), b.P(sg * 20, -70, -100), b.P(sg * 75, 5, -110)],
                        [b.P(sg * 20, -70, -100), b.P(sg * 4, -78, -105), b.P(sg * 60, 30, -150)],
                        b.R([10, 10, 13]), b.R([10, 9, 11]))
        plan.add(Part(f"pubis_ischium_{side}", rami, flat, label=hip, order=ORDER["bone"]))
