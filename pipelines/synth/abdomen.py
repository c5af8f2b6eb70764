"""Abdomen and pelvis of a phantom: liver, gallbladder, spleen, pancreas, kidneys, adrenals, gut, bladder, veins.

Solid organs are (super)ellipsoids clipped under the diaphragm and inside the body cavity; hollow organs
are tubes (stomach, duodenum, small bowel, colon) or ellipsoids (gallbladder, bladder) with a wall layer
around fluid, gas or stool. The small bowel is a random persistent walk of loops in the mid and lower
abdomen; the colon frames it from the caecum to the rectum. Kidneys have cortex, medulla, sinus fat and
pelvis; the portal, splenic, renal and iliac vessels and the IVC join them.
"""

from __future__ import annotations

import numpy as np

from anatomy.totalseg import total_class_ids
from pipelines.synth.body import ORDER, Plan
from pipelines.synth.canvas import INF, Part
from pipelines.synth.shapes import Capsules, Clip, Ellipsoid, Field, Union, rot_z, rotation
from pipelines.synth.thorax import add_path, wall
from pipelines.synth.trunk import SIDES

_STOMACH = [
    (42, 12, 232, 13, "gastric fundus"), (55, 20, 225, 33, "gastric fundus"), (65, -5, 205, 30, "gastric body"),
    (68, -30, 178, 27, "gastric body"), (50, -55, 152, 23, "gastric antrum"), (20, -62, 142, 19, "gastric antrum"),
    (-5, -55, 146, 14, "gastric antrum"), (-25, -40, 155, 10, "gastric antrum"),
]
_DUODENUM = [
    (-25, -40, 155, 10, "duodenum"), (-45, -25, 160, 11, "duodenum"), (-55, -5, 150, 12, "duodenum"),
    (-58, 0, 125, 12, "duodenum"), (-45, -6, 105, 11, "duodenum"), (-10, -10, 100, 10, "duodenum"),
    (20, -10, 105, 10, "duodenum"), (32, -8, 125, 10, "duodenum"), (35, -12, 145, 10, "duodenum"),
]
_PANCREAS = [
    (-25, 5, 140, 12, "pancreatic head"), (-30, -12, 158, 16, "pancreatic head"), (-5, -22, 168, 11, "pancreatic body"),
    (25, -12, 176, 11, "pancreatic body"), (55, 12, 186, 10, "pancreatic tail"), (80, 32, 196, 8, "pancreatic tail"),
]
_COLON = [
    (0, 62, -140, 15, "rectum"), (0, 65, -100, 18, "rectum"), (0, 55, -60, 16, "rectum"),
    (5, 40, -30, 14, "sigmoid colon"), (25, 10, -20, 14, "sigmoid colon"), (40, -20, -5, 14, "sigmoid colon"),
    (25, -40, 15, 14, "sigmoid colon"), (55, -25, 30, 15, "sigmoid colon"), (85, 5, 45, 16, "descending colon"),
    (95, 5, 100, 16, "descending colon"), (92, 8, 150, 17, "descending colon"), (95, 5, 180, 18, "descending colon"),
    (60, -45, 160, 20, "transverse colon"), (30, -65, 120, 21, "transverse colon"),
    (-15, -65, 110, 21, "transverse colon"), (-55, -45, 130, 22, "transverse colon"),
    (-85, -15, 140, 23, "ascending colon"), (-92, 10, 110, 24, "ascending colon"),
    (-88, 10, 70, 26, "ascending colon"), (-75, -5, 40, 30, "cecum"), (-70, -15, 20, 26, "cecum"),
]


def _gut(plan: Plan, name: str, label: int, group: str, order: float, pts, radii, wall_mm: float, content: str,
         gas: float, rng: np.random.Generator, clip=None) -> None:
    """A hollow tube: wall + content, and a gas pocket along its non-dependent (anterior) side."""
    t = plan.tissues
    w = wall(plan, wall_mm)
    shape = Capsules.path(pts, radii)
    shape = Clip(shape, clip) if clip else shape
    plan.add(Part(name, shape, [(-INF, -w, t.id(content)), (-w, 0.0, t.id("gut_wall"))], label=label, group=group,
                  order=order, meta={"wall": w}))
    if gas > 0:
        inner = np.maximum(np.asarray(radii) - w, 0.5)
        shifted = np.asarray(pts) - np.outer(inner * (1.0 - gas), [0.0, 1.0, 0.0])
        plan.add(Part(f"{name}_gas", Capsules.path(shifted, inner * gas), [(-INF, 0.0, t.id("bowel_gas"))],
                      group=group, order=order + 0.01, within_labels=frozenset({label}),
                      within_tissues=frozenset({t.id(content)})))


def add_solid_organs(plan: Plan) -> None:
    """Liver (+ hepatic veins), gallbladder, spleen, pancreas, kidneys, adrenals."""
    b, t, ids, rng = plan.body, plan.tissues, total_class_ids(), plan.landmarks["rng"]
    s = b.s
    P, R = b.P, b.R
    under = [b.below_diaphragm(4 * s), b.cavity(2 * s)]
    jit = lambda k=4.0: rng.normal(0, k * s, size=3)  # noqa: E731
    size = lambda sd=0.07: float(np.clip(rng.normal(1.0, sd), 1 - 2.5 * sd, 1 + 2.5 * sd))  # noqa: E731
    # Liver: right lobe, left lobe, caudate.
    d, f = jit(), size()
    lobes = Union([Ellipsoid(P(-62, 2, 212) + d, R([80, 88, 72]) * f, None, 2.2),
                   Ellipsoid(P(12, -45, 232) + d, R([62, 38, 32]) * f, rot_z(-15)),
                   Ellipsoid(P(-15, 15, 215) + d, R([18, 18, 28]) * f)])
    plan.add(Part("liver", Clip(lobes, under), [(-INF, 0.0, t.id("liver"))], label=ids["liver"], group="liver",
                  order=ORDER["liver"], meta={"anchor": P(-40, 0, 260) + d}))
    plan.landmarks["liver"] = {"falciform_x": P(8, 0, 0)[0] + d[0], "middle_x": P(-25, 0, 0)[0] + d[0],
                               "portal_z": P(0, 0, 205)[2] + d[2], "right_split_y": P(0, 2, 0)[1] + d[1],
                               "caudate": P(-15, 15, 215) + d}
    ivc_top = P(-28, 12, 255)
    ends = [P(-95, 10, 240), P(-45, -30, 245), P(0, -45, 248)]
    plan.add(Part("hepatic_veins", Capsules([ivc_top] * 3, ends, 5 * s, 2.5 * s), [(-INF, 0.0, t.id("vein"))],
                  order=ORDER["hepatic_vessel"], within_labels=frozenset({ids["liver"]})))
    # Gallbladder: pear-shaped tube under the liver, fundus anterior-inferior.
    d, f = jit(3), size(0.12)
    gb = [P(-48, -68, 172) + d, P(-42, -48, 183) + d, P(-32, -28, 196) + d]
    gbw = wall(plan, 2.5)
    layers = [(-INF, -gbw, t.id("bile")), (-gbw, 0.0, t.id("gut_wall"))]
    plan.add(Part("gallbladder", Capsules.path(gb, R([14, 12, 7]) * f), layers, label=ids["gallbladder"],
                  group="gallbladder", order=ORDER["gallbladder"], meta={"wall": gbw, "anchor": gb[2]}))
    # Spleen: tilted ellipsoid with a concave hilum.
    d, f = jit(), size(0.09)
    c = P(98, 48, 205) + d
    spleen = Clip(Ellipsoid(c, R([24, 52, 56]) * f, rotation((0.1, -0.35, 0.93), (1, 0.4, 0))),
                  under + [Ellipsoid(P(60, 30, 205) + d, R([28, 32, 40]))], [False, False, True])
    plan.add(Part("spleen", spleen, [(-INF, 0.0, t.id("spleen"))], label=ids["spleen"], group="spleen",
                  order=ORDER["spleen"], meta={"anchor": c + R([0, 10, 30])}))
    # Pancreas: tube from head (in the duodenal sweep) to tail (at the splenic hilum).
    pts, radii = add_path(plan, "pancreas", _PANCREAS, jit(3), size(0.08))
    plan.add(Part("pancreas", Capsules.path(pts, radii), [(-INF, 0.0, t.id("pancreas"))], label=ids["pancreas"],
                  group="pancreas", order=ORDER["pancreas"]))
    # Kidneys: cortex over medulla, sinus fat and pelvis towards the hilum (antero-medial).
    plan.landmarks["kidneys"] = {}
    for side, sg in SIDES:
        d, f = jit(5), size(0.06)
        c = P(sg * 72 if sg > 0 else -68, 55, 150 if sg > 0 else 135) + d
        axis = np.array([-sg * 0.22, 0.18, 1.0])
        rot = rotation(axis, (sg, 0.0, 0.0))
        radii = R([27, 22, 55]) * f
        lab = ids[f"kidney_{side}"]
        cx = 6 * s
        plan.add(Part(f"kidney_{side}", Ellipsoid(c, radii, rot),
                      [(-INF, -cx, t.id("kidney_medulla")), (-cx, 0.0, t.id("kidney_cortex"))], label=lab,
                      group=f"kidney_{side}", order=ORDER["kidney"], meta={"anchor": c}))
        sinus = c + R([-sg * 10, -6, 0])
        plan.add(Part(f"kidney_{side}_sinus", Ellipsoid(sinus, R([11, 9, 30]) * f, rot),
                      [(-INF, 0.0, t.id("sinus_fat"))],
                      group=f"kidney_{side}", order=ORDER["kidney"] + 0.1, within_labels=frozenset({lab})))
        pelvis = c + R([-sg * 16, -8, -5])
        plan.add(Part(f"kidney_{side}_pelvis", Ellipsoid(pelvis, R([7, 6, 12]), rot), [(-INF, 0.0, t.id("urine"))],
                      group=f"kidney_{side}", order=ORDER["kidney"] + 0.2, within_labels=frozenset({lab})))
        plan.landmarks["kidneys"][side] = {"center": c, "rot": rot, "radii": radii, "sinus": sinus, "pelvis": pelvis}
    # Adrenals: inverted-Y of thin limbs above and medial to the upper poles.
    for side, sg in SIDES:
        d = jit(3)
        c = (P(36, 35, 192) if sg > 0 else P(-35, 38, 205)) + d
        limbs = [Ellipsoid(c + R([0, -6, 4]), R([5, 8, 11])),
                 Ellipsoid(c + R([-sg * 4, 6, -2]), R([3.5, 13, 16]), rot_z(sg * 25)),
                 Ellipsoid(c + R([sg * 6, 8, -8]), R([3.5, 12, 14]), rot_z(-sg * 20))]
        plan.add(Part(f"adrenal_{side}", Union(limbs), [(-INF, 0.0, t.id("adrenal"))],
                      label=ids[f"adrenal_gland_{side}"],
                      group=f"adrenal_{side}", order=ORDER["adrenal"], meta={"anchor": c}))
        plan.landmarks.setdefault("adrenals", {})[side] = c


def add_gut(plan: Plan) -> None:
    """Stomach, duodenum, small bowel loops and colon."""
    b, ids, rng = plan.body, total_class_ids(), plan.landmarks["rng"]
    s = b.s
    under = [b.below_diaphragm(4 * s), b.cavity(2 * s)]
    fill = float(np.clip(rng.normal(1, 0.1), 0.8, 1.2))
    pts, radii = add_path(plan, "stomach", _STOMACH, rng.normal(0, 3 * s, size=3), fill)
    _gut(plan, "stomach", ids["stomach"], "stomach", ORDER["stomach"], pts, radii, 4.0, "gut_fluid",
         float(rng.uniform(0.25, 0.7)), rng, under)
    pts, radii = add_path(plan, "duodenum", _DUODENUM, rng.normal(0, 2 * s, size=3))
    _gut(plan, "duodenum", ids["duodenum"], "small_bowel", ORDER["duodenum"], pts, radii, 2.5, "gut_fluid",
         float(rng.uniform(0.0, 0.4)), rng)
    # Small bowel: persistent random walk inside an ellipsoidal region, starting at the duodenojejunal flexure.
    centre, half = np.array([-5.0, -30.0, 60.0]), np.array([70.0, 42.0, 62.0])
    p, d = np.array([35.0, -12.0, 145.0]), np.array([0.0, 0.0, -1.0])
    nodes = [p.copy()]
    for _ in range(90):
        d = d + 0.9 * rng.normal(size=3)
        off = (p - centre) / half
        if np.sum(off**2) > 0.8:
            d -= 1.5 * off / np.linalg.norm(off)
        d /= np.linalg.norm(d)
        p = p + 17.0 * d
        nodes.append(p.copy())
    nodes = np.array(nodes)
    names = ["jejunum" if i < len(nodes) // 2 else "ileum" for i in range(len(nodes))]
    sb = [(n[0], n[1], n[2], float(rng.uniform(9, 13)), nm) for n, nm in zip(nodes, names)]
    pts, radii = add_path(plan, "small_bowel", sb)
    _gut(plan, "small_bowel", ids["small_bowel"], "small_bowel", ORDER["small_bowel"], pts, radii, 2.0, "gut_fluid",
         float(rng.uniform(0.0, 0.35)), rng, [b.cavity(2 * s)])
    calibre = float(np.clip(rng.normal(1, 0.1), 0.8, 1.25))
    pts, radii = add_path(plan, "colon", _COLON, rng.normal(0, 3 * s, size=3), calibre)
    _gut(plan, "colon", ids["colon"], "colon", ORDER["colon"], pts, radii, 2.5, "stool", float(rng.uniform(0.3, 0.75)),
         rng, [b.cavity(1 * s)])


def add_pelvic_organs(plan: Plan) -> None:
    """Urinary bladder (variable filling), prostate (male) or uterus (female)."""
    b, t, ids, rng = plan.body, plan.tissues, total_class_ids(), plan.landmarks["rng"]
    s = b.s
    fill = float(rng.uniform(0.35, 1.4)) ** (1 / 3)
    base = b.P(0, -35, -100)
    c = base + b.R([0, 0, 36 * fill - 2])
    w = wall(plan, 3.0)
    shape = Clip(Ellipsoid(c, b.R([48, 38, 36]) * fill), [Field(lambda x, y, z: (base[2] - z).astype(np.float32)),
                                                           b.cavity(1 * s)])
    plan.add(Part("urinary_bladder", shape, [(-INF, -w, t.id("urine")), (-w, 0.0, t.id("gut_wall"))],
                  label=ids["urinary_bladder"], group="urinary_bladder", order=ORDER["bladder"],
                  meta={"wall": w, "anchor": base}))
    if b.sex == "M":
        pc = b.P(0, -32, -118)
        plan.add(Part("prostate", Ellipsoid(pc, b.R([22, 16, 17]) * float(rng.uniform(0.9, 1.1))),
                      [(-INF, 0.0, t.id("prostate"))], label=ids["prostate"], group="prostate",
                      order=ORDER["prostate"], meta={"anchor": pc - b.R([0, 0, 17])}))
    else:
        plan.add(Part("uterus", Ellipsoid(b.P(0, 8, -45), b.R([30, 22, 40]), rotation((0, -0.55, 0.83))),
                      [(-INF, 0.0, t.id("uterus"))], label=0, order=ORDER["prostate"]))


def add_abdominal_vessels(plan: Plan) -> None:
    """IVC, iliac arteries and veins, renal vessels, portal / splenic / superior mesenteric veins, SMA, celiac."""
    b, t, ids = plan.body, plan.tissues, total_class_ids()
    s, P = b.s, b.P
    vein, art, portal = t.id("vein"), t.id("artery"), t.id("portal")

    def tube(name, pts, r, tissue, label, order):
        plan.add(Part(name, Capsules.path([P(*p) for p in pts], np.asarray(r, float) * s), [(-INF, 0.0, tissue)],
                      label=label, order=order))

    tube("inferior_vena_cava",
         [(-20, 22, 40), (-22, 14, 100), (-25, 12, 160), (-28, 15, 220), (-28, 8, 260), (-28, -10, 285)],
         [10, 11, 12, 13, 13, 12], vein, ids["inferior_vena_cava"], ORDER["vein"])
    for side, sg in SIDES:
        tube(f"iliac_vena_{side}", [(-12, 24, 45), (sg * 50, 30, -10), (sg * 72, 5, -70), (sg * 78, -25, -112)],
             8, vein, ids[f"iliac_vena_{side}"], ORDER["vein"])
        tube(f"iliac_artery_{side}",
             [(3, 8, 62), (sg * 30, 15, 20), (sg * 55, 20, -20), (sg * 75, -5, -80), (sg * 82, -30, -115)],
             [8, 7, 6, 6, 5], art, ids[f"iliac_artery_{side}"], ORDER["aorta"])
    tube("renal_vein_left", [(62, 38, 150), (30, 5, 153), (8, -2, 155), (-22, 10, 150)], 5, vein, 0,
         ORDER["renal_vessel"])
    tube("renal_vein_right", [(-52, 38, 138), (-25, 14, 145)], 5, vein, 0, ORDER["renal_vessel"])
    tube("renal_artery_left", [(8, 15, 152), (55, 40, 150)], 3, art, 0, ORDER["renal_vessel"])
    tube("renal_artery_right", [(8, 15, 150), (-50, 40, 138)], 3, art, 0, ORDER["renal_vessel"])
    tube("celiac_trunk", [(8, 14, 188), (8, -4, 188), (10, -14, 180)], 3.5, art, 0, ORDER["aorta"] - 0.2)
    tube("superior_mesenteric_artery", [(8, 2, 170), (8, -12, 160), (10, -24, 120), (8, -26, 80)], 4, art, 0,
         ORDER["aorta"] - 0.2)
    tube("superior_mesenteric_vein", [(5, 0, 168), (-5, -25, 130), (-5, -28, 90)], 6, portal, 0, ORDER["portal"])
    pv = ids["portal_vein_and_splenic_vein"]
    tube("portal_vein", [(5, 0, 168), (-15, 5, 185), (-35, 8, 200), (-70, 10, 210), (-95, 15, 215)],
         [8, 8, 7, 6, 4], portal, pv, ORDER["portal"])
    tube("portal_vein_left", [(-35, 8, 200), (-10, -15, 215), (15, -35, 225)], [5, 4, 3.5], portal, pv, ORDER["portal"])
    tube("splenic_vein", [(5, 0, 168), (35, 18, 175), (70, 35, 190), (90, 42, 200)], 5, portal, pv, ORDER["portal"])
