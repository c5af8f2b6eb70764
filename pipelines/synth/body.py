"""The sampled patient: size, habitus, body-wall profiles, spine levels, diaphragm; and the case's plan.

Every structure of a phantom is placed in a *canonical* adult frame (mm; ``z = 0`` at the top of S1, ``x``
to the patient's left, ``y`` posterior, midline at ``x = 0``) and mapped to the case's body frame by
:meth:`Body.P` (positions, scaled by height ``s`` and by the width and depth habitus factors) and
:meth:`Body.R` (radii, scaled by ``s``). Profiles of the body wall are tables over canonical ``z``.

A :class:`Plan` is everything needed to paint one case: grid, tissue table and the ordered parts; findings
edit it (scale an organ, thicken a tube) before it is painted, and read its ``landmarks`` to place lesions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipelines.synth.canvas import Part, TissueTable
from pipelines.synth.shapes import Extrusion, Field, Grid

#: Painting order of the structure families (later wins).
ORDER = {
    "table": 0, "body": 1, "breast": 1.5, "muscle": 2, "paraspinal": 3, "cavity": 4, "diaphragm": 4.5,
    "lung": 5, "lung_vessel": 5.5, "mediastinum": 6, "psoas": 6.5, "small_bowel": 7, "colon": 8,
    "stomach": 9, "liver": 10, "hepatic_vessel": 10.5, "gallbladder": 11, "spleen": 12, "pancreas": 13,
    "duodenum": 14, "renal_vessel": 14.5, "kidney": 15, "adrenal": 16, "bladder": 17, "prostate": 17.5,
    "vein": 18, "portal": 18.5, "pulmonary": 19, "heart": 20, "heart_appendage": 20.5, "esophagus": 21,
    "aorta": 22, "trachea": 23, "canal": 24, "disc": 25, "vertebra": 26, "rib": 27, "cartilage": 27.5,
    "sternum": 28, "bone": 29,
}

# Canonical vertebrae from S1 up: (name, disc below mm, body height mm, half-width rx, half-depth ry).
_SPINE = [
    ("L5", 10, 27, 25, 18), ("L4", 10, 27, 24, 18), ("L3", 10, 27, 23, 17), ("L2", 9, 26, 22, 16.5),
    ("L1", 9, 25, 21, 16), ("T12", 7, 23, 19, 15), ("T11", 6, 22, 18, 14.5), ("T10", 6, 21, 17, 14),
    ("T9", 6, 20, 16.5, 14), ("T8", 5, 20, 16, 13.5), ("T7", 5, 19, 15.5, 13), ("T6", 5, 19, 15, 13),
    ("T5", 5, 18, 14.5, 12.5), ("T4", 5, 17, 14, 12), ("T3", 5, 17, 14, 11.5), ("T2", 5, 16, 14, 11),
    ("T1", 5, 16, 14, 10.5), ("C7", 5, 15, 13, 9.5), ("C6", 5, 14, 12, 9), ("C5", 5, 14, 12, 9),
    ("C4", 5, 14, 12, 9),
]
# Vertebral body centre y (canonical) over z: lordosis, kyphosis, sacral curve.
_YVB_Z = [-130, -60, -15, 20, 60, 100, 140, 180, 220, 260, 300, 340, 380, 420, 460, 500, 560]
_YVB = [88, 78, 62, 50, 42, 40, 42, 46, 51, 55, 58, 59, 58, 55, 50, 45, 38]
# Body wall (outer surface of the muscle layer) and its thickness over canonical z.
_WALL_Z = [-180, -100, -40, 20, 80, 140, 200, 260, 320, 380, 440, 500, 560, 620]
_A = [160, 165, 165, 155, 148, 142, 146, 150, 152, 150, 142, 125, 75, 65]
_B = [105, 105, 108, 108, 108, 110, 116, 120, 121, 119, 113, 100, 65, 60]
_CY = [12, 12, 10, 8, 6, 6, 6, 6, 6, 8, 12, 18, 22, 22]
_W_LAT = [85, 80, 60, 30, 18, 16, 16, 18, 20, 22, 25, 30, 28, 28]
_W_ANT = [30, 25, 15, 14, 13, 12, 12, 14, 16, 18, 20, 25, 28, 28]
_W_POST = [50, 45, 42, 35, 30, 28, 26, 24, 24, 24, 25, 28, 28, 28]
_FAT_ANT = [1.0, 1.1, 1.3, 1.5, 1.5, 1.4, 1.0, 0.7, 0.6, 0.6, 0.5, 0.4, 0.3, 0.3]
_FAT_LAT = [1.4, 1.4, 1.3, 1.1, 1.0, 1.0, 0.9, 0.8, 0.7, 0.7, 0.6, 0.5, 0.3, 0.3]


@dataclass
class Vertebra:
    name: str
    label: str
    """TotalSegmentator class name (``vertebrae_L2``)."""
    z0: float
    z1: float
    rx: float
    ry: float
    yc: float
    """Body centre y (x = 0) in the body frame."""

    @property
    def zc(self) -> float:
        return 0.5 * (self.z0 + self.z1)


@dataclass
class Body:
    """One sampled patient in the body frame (mm)."""

    s: float
    """Height scale (1 = canonical adult)."""
    w: float
    """Width habitus factor."""
    d: float
    """Depth habitus factor."""
    fat: float
    """Subcutaneous fat thickness scale (mm)."""
    sex: str
    dome_right: float
    """Peak of the right hemidiaphragm (canonical z)."""
    dome_left: float
    vertebrae: list[Vertebra] = field(default_factory=list)

    @classmethod
    def sample(cls, rng: np.random.Generator, sex: str) -> "Body":
        s = float(np.clip(rng.normal(1.0, 0.045), 0.9, 1.1)) * (0.97 if sex == "F" else 1.0)
        body = cls(
            s=s, w=float(rng.uniform(0.95, 1.07)), d=float(rng.uniform(0.94, 1.08)),
            fat=float(np.clip(rng.lognormal(np.log(20.0), 0.45), 6.0, 60.0)) * (1.15 if sex == "F" else 1.0),
            sex=sex, dome_right=float(268 + rng.normal(0, 10)), dome_left=0.0,
        )
        body.dome_left = body.dome_right - float(rng.uniform(5, 22))
        z = 0.0
        for name, disc, h, rx, ry in _SPINE:
            z0 = z + disc
            z1 = z0 + h
            z = z1
            zc = 0.5 * (z0 + z1)
            body.vertebrae.append(Vertebra(name, f"vertebrae_{name}", z0 * s, z1 * s, rx * s, ry * s,
                                           float(np.interp(zc, _YVB_Z, _YVB)) * s * body.d))
        return body

    # ---------------------------------------------------------------- canonical -> body frame
    def P(self, x: float, y: float, z: float) -> np.ndarray:
        """Canonical position -> body frame."""
        return np.array([x * self.s * self.w, y * self.s * self.d, z * self.s])

    def Ps(self, pts) -> np.ndarray:
        """(N, 3) canonical positions -> body frame."""
        return np.asarray(pts, dtype=np.float64) * np.array([self.s * self.w, self.s * self.d, self.s])

    def R(self, r):
        """Canonical length(s) -> body frame."""
        return np.asarray(r, dtype=np.float64) * self.s

    def vertebra(self, name: str) -> Vertebra:
        for v in self.vertebrae:
            if v.name == name:
                return v
        raise KeyError(name)

    # ---------------------------------------------------------------- profiles
    def y_vb(self, z):
        """Vertebral body centre y at body-frame z."""
        return np.interp(np.asarray(z) / self.s, _YVB_Z, _YVB) * self.s * self.d

    def _prof(self, table, z):
        return np.interp(np.asarray(z) / self.s, _WALL_Z, table)

    def wall_knots(self) -> np.ndarray:
        return np.asarray(_WALL_Z, dtype=np.float64) * self.s

    def muscle(self) -> Extrusion:
        """Outer surface of the muscle layer (flattened on the table)."""
        s, w, d = self.s, self.w, self.d
        a, b, cy = np.array(_A) * s * w, np.array(_B) * s * d, np.array(_CY) * s * d
        return Extrusion(self.wall_knots(), 0.0, cy, a, b, 2.0, y_max=cy + 0.9 * b)

    def skin(self) -> Extrusion:
        """The body outline (skin), muscle plus subcutaneous fat (thicker in front and on the hips)."""
        s, w, d = self.s, self.w, self.d
        a, b, cy = np.array(_A) * s * w, np.array(_B) * s * d, np.array(_CY) * s * d
        f_ant, f_lat, f_post = self.fat * np.array(_FAT_ANT), self.fat * np.array(_FAT_LAT), self.fat * 0.45
        front, back = cy - b - f_ant, cy + b + f_post
        return Extrusion(self.wall_knots(), 0.0, 0.5 * (front + back), a + f_lat, 0.5 * (back - front), 2.0,
                         y_max=cy + 0.9 * b + f_post * 0.8)

    def cavity_params(self, z):
        """(cy, a, b) of the body cavity (inner surface of the wall) at body-frame z."""
        s, w, d = self.s, self.w, self.d
        a = self._prof(_A, z) * s * w - self._prof(_W_LAT, z) * s
        front = self._prof(_CY, z) * s * d - self._prof(_B, z) * s * d + self._prof(_W_ANT, z) * s
        back = self._prof(_CY, z) * s * d + self._prof(_B, z) * s * d - self._prof(_W_POST, z) * s
        return 0.5 * (front + back), a, 0.5 * (back - front)

    def cavity(self, shrink: float = 0.0) -> Extrusion:
        """The body cavity, optionally shrunk by ``shrink`` mm."""
        z = self.wall_knots()
        cy, a, b = self.cavity_params(z)
        return Extrusion(z, 0.0, cy, a - shrink, b - shrink, 2.0)

    def front(self, z):
        """y of the inner anterior wall at the midline."""
        cy, _, b = self.cavity_params(z)
        return cy - b

    def muscle_front(self, z):
        s, d = self.s, self.d
        return self._prof(_CY, z) * s * d - self._prof(_B, z) * s * d

    def diaphragm(self, x, y):
        """Body-frame z of the diaphragm's upper surface over (x, y): two domes and a central plateau."""
        s, w, d = self.s, self.w, self.d
        u, v = x / (s * w), y / (s * d)

        def dome(peak, x0, y0):
            ky = np.where(v < y0, 0.0035, 0.0075)
            return peak - 0.009 * (u - x0) ** 2 - ky * (v - y0) ** 2

        central = min(self.dome_right, self.dome_left) - 14 - 0.002 * u**2 - 0.002 * (v + 20) ** 2
        canon = np.maximum(np.maximum(dome(self.dome_right, -70, 0), dome(self.dome_left, 75, 5)), central)
        return canon * s

    def below_diaphragm(self, margin: float = 0.0) -> Field:
        """Region below the diaphragm's lower surface (``margin`` mm under its upper surface)."""
        return Field(lambda x, y, z: (z - (self.diaphragm(x, y) - margin)).astype(np.float32))

    def above_diaphragm(self, margin: float = 0.0) -> Field:
        return Field(lambda x, y, z: ((self.diaphragm(x, y) + margin) - z).astype(np.float32))


@dataclass
class Plan:
    """Everything to paint one case; findings edit ``parts`` and read ``landmarks`` before painting."""

    grid: Grid
    tissues: TissueTable
    body: Body
    phase: str
    parts: list[Part] = field(default_factory=list)
    landmarks: dict = field(default_factory=dict)

    @property
    def sex(self) -> str:
        return self.body.sex

    def add(self, part: Part) -> Part:
        self.parts.append(part)
        return part

    def group(self, name: str) -> list[Part]:
        """Parts of an organ group (``liver``, ``kidney_left``); empty when the group does not exist."""
        return [p for p in self.parts if p.group == name]

    def ordered(self) -> list[Part]:
        return sorted(self.parts, key=lambda p: p.order)  # stable: ties keep insertion order

    def cortex_layers(self, cancellous: str = "cancellous", thickness: float = 1.5) -> list[tuple[float, float, int]]:
        """Layers of a bone: marrow inside a cortical shell whose HU is averaged over at least 0.6 voxel.

        A 1.5 mm shell on a 3.5 mm grid is sampled as a 2.1 mm band with the mean HU of shell and marrow
        in it (partial volume), so the bone's mean HU does not depend on the spacing.
        """
        band = max(thickness, 0.6 * min(self.grid.spacing[1:]))
        name = f"cortex_pv_{cancellous}_{thickness:g}"
        if name not in self.tissues.index:
            c, m = self.tissues["cortex"], self.tissues[cancellous]
            f = thickness / band
            self.tissues.add(name, m.hu + f * (c.hu - m.hu), max(c.tex * f, m.tex))
        return [(-float("inf"), -band, self.tissues.id(cancellous)), (-band, 0.0, self.tissues.id(name))]
