"""Analytic shapes in physical millimetres, evaluated as signed distances on bounding-box sub-grids.

A phantom is painted from shapes; each shape gives an approximate signed distance ``d`` (mm, negative
inside) on the voxel centres of a sub-grid around it, so the cost of a shape scales with its own size and
not the volume's, and nothing depends on the voxel spacing. Coordinates are the *body frame* of the case:
``x`` towards the patient's left, ``y`` towards posterior, ``z`` towards the head (LPS), origin at the
body's midline; the volume's physical origin is the body frame shifted by the table position.

Distances are exact on the axes of ellipsoids and for tubes, and radial approximations elsewhere (good
within a few mm of the surface, which is where walls, shells and rims are cut). Two evaluation options
serve thick slices: ``pad`` (mm) asks for correct values up to ``pad`` outside the surface (for rims), and
``slab`` (mm) shrinks the z distance by half a slice so that a thin structure is seen by its nearest slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

BIG = np.float32(1e6)


# ------------------------------------------------------------------------------------------------ grid
@dataclass(frozen=True)
class Grid:
    """A voxel grid in the body frame: ``shape`` (Z, Y, X), ``spacing`` (sz, sy, sx) mm, ``origin`` (x, y, z)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def axis(self, k: int) -> np.ndarray:
        """Coordinates (mm) of the voxel centres along body axis ``k`` (0 = x, 1 = y, 2 = z)."""
        n = self.shape[2 - k]
        return (self.origin[k] + self.spacing[2 - k] * np.arange(n)).astype(np.float32)

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Index box (z, y, x slices) of the voxels whose centres lie in ``[lo, hi]`` (x, y, z mm), or None."""
        out = []
        for k in (2, 1, 0):
            s, o, n = self.spacing[2 - k], self.origin[k], self.shape[2 - k]
            i0 = max(int(np.ceil((lo[k] - o) / s - 1e-6)), 0)
            i1 = min(int(np.floor((hi[k] - o) / s + 1e-6)) + 1, n)
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return out[0], out[1], out[2]

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable coordinates of a box: x (1, 1, X'), y (1, Y', 1), z (Z', 1, 1), float32 mm."""
        bz, by, bx = box
        x = self.axis(0)[bx].reshape(1, 1, -1)
        y = self.axis(1)[by].reshape(1, -1, 1)
        z = self.axis(2)[bz].reshape(-1, 1, 1)
        return x, y, z

    def index_of(self, p: Sequence[float]) -> tuple[int, int, int]:
        """Nearest voxel (k, j, i) of a body-frame point, clipped to the grid."""
        idx = []
        for k in (2, 1, 0):
            i = int(round((p[k] - self.origin[k]) / self.spacing[2 - k]))
            idx.append(min(max(i, 0), self.shape[2 - k] - 1))
        return idx[0], idx[1], idx[2]

    def point_of(self, idx: Sequence[int]) -> np.ndarray:
        """Body-frame (x, y, z) of voxel (k, j, i)."""
        k, j, i = idx
        return np.array([self.origin[0] + i * self.spacing[2], self.origin[1] + j * self.spacing[1],
                         self.origin[2] + k * self.spacing[0]])

    @property
    def voxel_volume(self) -> float:
        return float(np.prod(self.spacing))


def _shrink_z(dz: np.ndarray, slab: float) -> np.ndarray:
    if slab <= 0:
        return dz
    return np.sign(dz) * np.maximum(np.abs(dz) - slab, 0)


def _sub_index(axis: np.ndarray, lo: float, hi: float) -> slice:
    a = axis.ravel()
    return slice(int(np.searchsorted(a, lo, "left")), int(np.searchsorted(a, hi, "right")))


# ------------------------------------------------------------------------------------------------ shapes
class Shape:
    """Base class: ``bounds()`` (lo, hi) xyz mm and ``sdf(x, y, z)`` on broadcast coordinates."""

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, pad: float = 0.0, slab: float = 0.0) -> np.ndarray:
        raise NotImplementedError

    def scaled(self, f: float | Sequence[float], anchor: Sequence[float]) -> "Shape":
        """The shape scaled by ``f`` (scalar or per-axis xyz) about ``anchor``."""
        raise NotImplementedError(f"{type(self).__name__} cannot be scaled")


def _scale_point(p: np.ndarray, f: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    return anchor + f * (p - anchor)


@dataclass
class Ellipsoid(Shape):
    """Superquadric ``sum |u_i / r_i|^p <= 1`` in a frame rotated by ``rot`` (columns = local axes)."""

    center: np.ndarray
    radii: np.ndarray
    rot: np.ndarray | None = None
    p: float = 2.0

    def __post_init__(self) -> None:
        self.center = np.asarray(self.center, dtype=np.float64)
        self.radii = np.maximum(np.asarray(self.radii, dtype=np.float64), 0.3)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        if self.rot is None:
            half = self.radii * (1.0 if self.p <= 2 else 1.0)
        elif self.p <= 2:
            half = np.sqrt(((self.rot * self.radii[None, :]) ** 2).sum(axis=1))
        else:
            half = (np.abs(self.rot) * self.radii[None, :]).sum(axis=1)
        return self.center - half, self.center + half

    def sdf(self, x, y, z, pad=0.0, slab=0.0):
        dx = (x - self.center[0]).astype(np.float32)
        dy = (y - self.center[1]).astype(np.float32)
        dz = _shrink_z((z - self.center[2]).astype(np.float32), slab)
        if self.rot is None:
            u, v, w = dx, dy, dz
        else:
            r = self.rot.astype(np.float32)
            u = r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz
            v = r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz
            w = r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz
        a, b, c = (np.float32(t) for t in self.radii)
        if self.p == 2:
            f = np.sqrt((u / a) ** 2 + (v / b) ** 2 + (w / c) ** 2)
        else:
            p = np.float32(self.p)
            f = (np.abs(u / a) ** p + np.abs(v / b) ** p + np.abs(w / c) ** p) ** (1 / p)
        length = np.sqrt(u * u + v * v + w * w)
        return length * (1 - 1 / np.maximum(f, 1e-6))

    def scaled(self, f, anchor):
        f = np.broadcast_to(np.asarray(f, dtype=np.float64), (3,))
        anchor = np.asarray(anchor, dtype=np.float64)
        if self.rot is None:
            radii = self.radii * f
        else:  # per-axis factors act on the body axes; approximate on the local axes
            radii = self.radii * np.abs(self.rot.T) @ f / np.abs(self.rot.T).sum(axis=1)
        return Ellipsoid(_scale_point(self.center, f, anchor), radii, self.rot, self.p)


@dataclass
class Capsules(Shape):
    """Union of cone-capsules: segment i joins ``a[i]`` (radius ``ra[i]``) to ``b[i]`` (radius ``rb[i]``)."""

    a: np.ndarray
    b: np.ndarray
    ra: np.ndarray
    rb: np.ndarray

    def __post_init__(self) -> None:
        self.a = np.atleast_2d(np.asarray(self.a, dtype=np.float64))
        self.b = np.atleast_2d(np.asarray(self.b, dtype=np.float64))
        self.ra = np.broadcast_to(np.asarray(self.ra, dtype=np.float64), (len(self.a),)).copy()
        self.rb = np.broadcast_to(np.asarray(self.rb, dtype=np.float64), (len(self.a),)).copy()

    @classmethod
    def path(cls, points: Sequence[Sequence[float]], radii: Sequence[float] | float) -> "Capsules":
        """A tube through ``points`` (N, 3) with per-point radii."""
        pts = np.asarray(points, dtype=np.float64)
        r = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(pts),))
        return cls(pts[:-1], pts[1:], r[:-1], r[1:])

    def bounds(self):
        r = np.maximum(self.ra, self.rb)[:, None]
        lo = np.minimum(self.a - r, self.b - r).min(axis=0)
        hi = np.maximum(self.a + r, self.b + r).max(axis=0)
        return lo, hi

    def sdf(self, x, y, z, pad=0.0, slab=0.0):
        out = np.full((z.shape[0], y.shape[1], x.shape[2]), BIG, dtype=np.float32)
        for a, b, ra, rb in zip(self.a, self.b, self.ra, self.rb):
            r = max(ra, rb) + pad + slab
            lo, hi = np.minimum(a, b) - r, np.maximum(a, b) + r
            sz, sy, sx = _sub_index(z, lo[2], hi[2]), _sub_index(y, lo[1], hi[1]), _sub_index(x, lo[0], hi[0])
            if sz.stop <= sz.start or sy.stop <= sy.start or sx.stop <= sx.start:
                continue
            ab = (b - a).astype(np.float32)
            dx = x[:, :, sx] - np.float32(a[0])
            dy = y[:, sy, :] - np.float32(a[1])
            dz = z[sz, :, :] - np.float32(a[2])
            ll = float(ab @ ab)
            t = np.clip((dx * ab[0] + dy * ab[1] + dz * ab[2]) / max(ll, 1e-9), 0, 1)
            ex, ey, ez = dx - t * ab[0], dy - t * ab[1], _shrink_z(dz - t * ab[2], slab)
            d = np.sqrt(ex * ex + ey * ey + ez * ez) - (ra + (rb - ra) * t)
            view = out[sz, sy, sx]
            np.minimum(view, d, out=view)
        return out

    def scaled(self, f, anchor):
        f = np.broadcast_to(np.asarray(f, dtype=np.float64), (3,))
        anchor = np.asarray(anchor, dtype=np.float64)
        g = float(np.cbrt(np.prod(f)))
        return Capsules(_scale_point(self.a, f, anchor), _scale_point(self.b, f, anchor), self.ra * g, self.rb * g)

    def thickened(self, f: float | np.ndarray) -> "Capsules":
        """Radii scaled by ``f`` (scalar or per-segment), centreline kept."""
        f = np.broadcast_to(np.asarray(f, dtype=np.float64), (len(self.a),))
        return Capsules(self.a, self.b, self.ra * f, self.rb * f)


@dataclass
class Extrusion(Shape):
    """Superellipse cross-section ``|dx/a|^p + |dy/b|^p <= 1`` whose centre and half-axes vary with z.

    ``knots`` are z levels (ascending, mm); ``cx, cy, a, b`` their values (linear in between); the shape
    spans ``[knots[0], knots[-1]]``. ``y_max`` (optional, same knots) flattens the posterior side.
    """

    knots: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    a: np.ndarray
    b: np.ndarray
    p: float = 2.0
    y_max: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(np.atleast_1d(self.knots))
        self.knots = np.atleast_1d(np.asarray(self.knots, dtype=np.float64))
        for name in ("cx", "cy", "a", "b") + (("y_max",) if self.y_max is not None else ()):
            setattr(self, name, np.broadcast_to(np.asarray(getattr(self, name), dtype=np.float64), (n,)).copy())

    def bounds(self):
        lo = np.array([(self.cx - self.a).min(), (self.cy - self.b).min(), self.knots[0]])
        hi = np.array([(self.cx + self.a).max(), (self.cy + self.b).max(), self.knots[-1]])
        return lo, hi

    def _at(self, v: np.ndarray, z: np.ndarray) -> np.ndarray:
        return np.interp(z.ravel(), self.knots, v).astype(np.float32).reshape(-1, 1, 1)

    def sdf(self, x, y, z, pad=0.0, slab=0.0):
        cx, cy, a, b = (self._at(v, z) for v in (self.cx, self.cy, self.a, self.b))
        dx, dy = x - cx, y - cy
        if self.p == 2:
            f = np.sqrt((dx / a) ** 2 + (dy / b) ** 2)
        else:
            p = np.float32(self.p)
            f = (np.abs(dx / a) ** p + np.abs(dy / b) ** p) ** (1 / p)
        d = np.sqrt(dx * dx + dy * dy) * (1 - 1 / np.maximum(f, 1e-6))
        if self.y_max is not None:
            d = np.maximum(d, y - self._at(self.y_max, z))
        dz = _shrink_z(np.maximum(self.knots[0] - z, z - self.knots[-1]).astype(np.float32), slab)
        return np.maximum(d, dz)

    def scaled(self, f, anchor):
        f = np.broadcast_to(np.asarray(f, dtype=np.float64), (3,))
        ax, ay, az = anchor
        return Extrusion(az + f[2] * (self.knots - az), ax + f[0] * (self.cx - ax), ay + f[1] * (self.cy - ay),
                         self.a * f[0], self.b * f[1], self.p,
                         None if self.y_max is None else ay + f[1] * (self.y_max - ay))


# ------------------------------------------------------------------------------------ unbounded fields
@dataclass
class Field(Shape):
    """An unbounded implicit region ``fn(x, y, z) <= 0`` (half-spaces, height fields) used to clip shapes."""

    fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

    def bounds(self):
        return np.full(3, -np.inf), np.full(3, np.inf)

    def sdf(self, x, y, z, pad=0.0, slab=0.0):
        return self.fn(x, y, z)


def half_space(normal: Sequence[float], point: Sequence[float]) -> Field:
    """The side of the plane through ``point`` opposite to ``normal`` (``n . (p - p0) <= 0``)."""
    n = np.asarray(normal, dtype=np.float64)
    n = (n / np.linalg.norm(n)).astype(np.float32)
    p0 = np.asarray(point, dtype=np.float32)
    return Field(lambda x, y, z: n[0] * (x - p0[0]) + n[1] * (y - p0[1]) + n[2] * (z - p0[2]))


@dataclass
class Clip(Shape):
    """``shape`` intersected with ``fields`` (each inside where its sdf <= 0; ``outside=True`` negates)."""

    shape: Shape
    fields: Sequence[Shape]
    outside: Sequence[bool] = ()

    def bounds(self):
        lo, hi = self.shape.bounds()
        for f, neg in zip(self.fields, self._neg()):
            if not neg:
                flo, fhi = f.bounds()
                lo, hi = np.maximum(lo, flo), np.minimum(hi, fhi)
        return lo, hi

    def _neg(self) -> list[bool]:
        return list(self.outside) + [False] * (len(self.fields) - len(self.outside))

    def sdf(self, x, y, z, pad=0.0, slab=0.0):
        d = self.shape.sdf(x, y, z, pad, slab)
        for f, neg in zip(self.fields, self._neg()):
            fd = f.sdf(x, y, z, pad, slab)
            d = np.maximum(d, -fd if neg else fd)
        return d

    def scaled(self, f, anchor):
        return Clip(self.shape.scaled(f, anchor), self.fields, self.outside)


@dataclass
class Union(Shape):
    """Union of shapes, each evaluated on its own sub-box."""

    shapes: Sequence[Shape]

    def bounds(self):
        bs = [s.bounds() for s in self.shapes]
        return np.min([b[0] for b in bs], axis=0), np.max([b[1] for b in bs], axis=0)

    def sdf(self, x, y, z, pad=0.0, slab=0.0):
        out = np.full((z.shape[0], y.shape[1], x.shape[2]), BIG, dtype=np.float32)
        for s in self.shapes:
            lo, hi = s.bounds()
            m = pad + slab + 1e-3
            sz, sy = _sub_index(z, lo[2] - m, hi[2] + m), _sub_index(y, lo[1] - m, hi[1] + m)
            sx = _sub_index(x, lo[0] - m, hi[0] + m)
            if sz.stop <= sz.start or sy.stop <= sy.start or sx.stop <= sx.start:
                continue
            d = s.sdf(x[:, :, sx], y[:, sy, :], z[sz, :, :], pad, slab)
            view = out[sz, sy, sx]
            np.minimum(view, d, out=view)
        return out

    def scaled(self, f, anchor):
        return Union([s.scaled(f, anchor) for s in self.shapes])


@dataclass
class Bounded(Shape):
    """``shape`` (typically an unbounded field) limited to the box ``[lo, hi]`` (xyz mm)."""

    shape: Shape
    lo: np.ndarray
    hi: np.ndarray

    def bounds(self):
        slo, shi = self.shape.bounds()
        return np.maximum(np.asarray(self.lo, float), slo), np.minimum(np.asarray(self.hi, float), shi)

    def sdf(self, x, y, z, pad=0.0, slab=0.0):
        d = self.shape.sdf(x, y, z, pad, slab)
        return np.broadcast_to(d, (z.shape[0], y.shape[1], x.shape[2]))

    def scaled(self, f, anchor):
        return Bounded(self.shape.scaled(f, anchor), self.lo, self.hi)


def rotation(axis_z: Sequence[float], hint_x: Sequence[float] = (1.0, 0.0, 0.0)) -> np.ndarray:
    """Rotation whose third column is ``axis_z`` and first column lies towards ``hint_x`` (columns = local axes)."""
    w = np.asarray(axis_z, dtype=np.float64)
    w = w / np.linalg.norm(w)
    u = np.asarray(hint_x, dtype=np.float64)
    u = u - (u @ w) * w
    if np.linalg.norm(u) < 1e-6:
        u = np.array([0.0, 1.0, 0.0]) - w[1] * w
    u = u / np.linalg.norm(u)
    v = np.cross(w, u)
    return np.stack([u, v, w], axis=1)


def rot_z(deg: float) -> np.ndarray:
    """Rotation about the body z axis by ``deg`` degrees."""
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
