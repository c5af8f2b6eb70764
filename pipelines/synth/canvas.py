"""Painting a phantom: a per-case tissue table, parts (shape + tissue layers + label), and the canvas.

The canvas holds three (Z, Y, X) uint8 maps: a tissue index (into the case's :class:`TissueTable`), the
TotalSegmentator ``total`` label and the lesion id. Parts are painted in order (later parts win where they
overlap); a part paints tissue layers cut from its signed distance (``lo < d <= hi``), optionally only
over voxels that already carry some labels or tissues (a nodule only in lung, ground glass only over lung
parenchyma). HU are made once at the end:

    hu = mean[tissue] + texture_sd[tissue] * T + gradient[tissue] * y + noise_sd * N

with ``T`` the smooth texture field and ``N`` correlated image noise (:mod:`pipelines.synth.texture`).
Tissue means per contrast phase come from ``configs/synth/tissues.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np
import yaml

from configs.paths import config_dir
from pipelines.synth.shapes import Grid, Shape
from pipelines.synth.texture import image_noise, texture_field

PHASES = ("native", "arterial", "portal_venous")
INF = float("inf")


@lru_cache(maxsize=None)
def tissue_config() -> dict:
    """The parsed ``configs/synth/tissues.yaml`` (phases, contrast gain range, tissue table)."""
    path = config_dir() / "synth" / "tissues.yaml"
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    for name, row in data["tissues"].items():
        if not (isinstance(row, list) and len(row) == 5):
            raise ValueError(f"{path}: tissue {name!r} must be [native, arterial, portal_venous, texture_sd, "
                             "jitter_sd]")
    if set(data["phases"]) != set(PHASES):
        raise ValueError(f"{path}: phases must be exactly {', '.join(PHASES)}")
    return data


@dataclass
class Tissue:
    name: str
    hu: float
    """Mean HU in this case."""
    tex: float
    """Texture amplitude (HU per unit of the texture field)."""
    grad: float = 0.0
    """HU per mm towards posterior (dependent density of lung)."""


class TissueTable:
    """The case's tissues, index 0 = air; at most 256 (the tissue map is uint8)."""

    def __init__(self) -> None:
        self.items: list[Tissue] = []
        self.index: dict[str, int] = {}

    def add(self, name: str, hu: float, tex: float, grad: float = 0.0) -> int:
        """Add a tissue (a new name) or return the id of an existing one of that name."""
        if name in self.index:
            return self.index[name]
        if len(self.items) >= 256:
            raise RuntimeError("a synthetic case ran out of tissue ids (256)")
        self.items.append(Tissue(name, float(hu), float(tex), float(grad)))
        self.index[name] = len(self.items) - 1
        return self.index[name]

    def derive(self, base: str, name: str, hu: float | None = None, delta: float = 0.0,
               tex: float | None = None) -> int:
        """A new tissue like ``base`` with mean ``hu`` (or base mean + ``delta``) and optional texture."""
        b = self[base]
        return self.add(name, b.hu + delta if hu is None else hu, b.tex if tex is None else tex, b.grad)

    def __getitem__(self, key: str | int) -> Tissue:
        return self.items[self.index[key] if isinstance(key, str) else key]

    def id(self, name: str) -> int:
        return self.index[name]

    def ids(self, names: Sequence[str]) -> list[int]:
        return [self.index[n] for n in names if n in self.index]

    def luts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(256,) float32 mean HU, texture sd and y gradient per tissue id."""
        hu, tex, grad = (np.zeros(256, np.float32) for _ in range(3))
        for i, t in enumerate(self.items):
            hu[i], tex[i], grad[i] = t.hu, t.tex, t.grad
        return hu, tex, grad


def base_tissues(rng: np.random.Generator, phase: str) -> TissueTable:
    """The standard tissues for ``phase``, with a per-case contrast gain and per-tissue jitter."""
    cfg = tissue_config()
    col = PHASES.index(phase)
    lo, hi = cfg["contrast_gain"]
    gain = float(rng.uniform(lo, hi))
    table = TissueTable()
    for name, row in cfg["tissues"].items():
        native, val, tex, jit = float(row[0]), float(row[col]), float(row[3]), float(row[4])
        hu = native + gain * (val - native) + jit * float(rng.standard_normal())
        table.add(name, hu, tex, 0.35 if name == "lung" else 0.0)
    return table


@dataclass
class Part:
    """One painted structure: a shape cut into tissue layers, with a label and a lesion id."""

    name: str
    shape: Shape
    layers: list[tuple[float, float, int]]
    """(lo, hi, tissue id): paint the tissue where ``lo < d <= hi``; later layers win."""
    label: int | None = None
    """TotalSegmentator id written over the painted voxels; None keeps the labels."""
    group: str = ""
    """Organ group for findings (``liver``, ``kidney_left``, ``vertebra_L2``)."""
    order: float = 0.0
    """Painting order (ascending; ties keep insertion order)."""
    lesion: int | None = 0
    """Lesion id written over the painted voxels (0 clears); None keeps the lesion map."""
    within_labels: frozenset[int] | None = None
    """Paint only over voxels that already carry one of these labels."""
    within_tissues: frozenset[int] | None = None
    """Paint only over voxels that already hold one of these tissues."""
    thin: bool = False
    """Let the nearest slice see it (z distance shrunk by half a slice)."""
    meta: dict = field(default_factory=dict)

    def pad(self) -> float:
        return max(0.0, max(hi for _, hi, _ in self.layers))


def _lut(ids: frozenset[int] | None) -> np.ndarray | None:
    if ids is None:
        return None
    lut = np.zeros(256, dtype=bool)
    lut[list(ids)] = True
    return lut


class Canvas:
    """Tissue, label and lesion maps of one case on ``grid``; paints parts and makes HU."""

    def __init__(self, grid: Grid, tissues: TissueTable) -> None:
        self.grid = grid
        self.tissues = tissues
        self.tissue = np.zeros(grid.shape, dtype=np.uint8)  # (Z, Y, X)
        self.labels = np.zeros(grid.shape, dtype=np.uint8)  # (Z, Y, X)
        self.lesions = np.zeros(grid.shape, dtype=np.uint8)  # (Z, Y, X)

    def paint(self, part: Part) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """Paint one part; returns its index box and the (box-shaped) mask of the voxels it painted."""
        pad = part.pad()
        slab = 0.5 * self.grid.spacing[0] - 1e-3 if part.thin else 0.0
        lo, hi = part.shape.bounds()
        box = self.grid.box(lo - pad - slab, hi + pad + slab)
        if box is None:
            return None
        x, y, z = self.grid.coords(box)
        d = part.shape.sdf(x, y, z, pad=pad, slab=slab)  # (Z', Y', X')
        tis, lab, les = self.tissue[box], self.labels[box], self.lesions[box]
        allowed = None
        for lut, arr in ((_lut(part.within_labels), lab), (_lut(part.within_tissues), tis)):
            if lut is not None:
                allowed = lut[arr] if allowed is None else allowed & lut[arr]
        painted = np.zeros(d.shape, dtype=bool)
        for lo_d, hi_d, tid in part.layers:
            m = d <= hi_d
            if lo_d > -INF:
                m &= d > lo_d
            if allowed is not None:
                m &= allowed
            tis[m] = tid
            painted |= m
        if part.label is not None:
            lab[painted] = part.label
        if part.lesion is not None:
            les[painted] = part.lesion
        return box, painted

    def paint_mask(self, box: tuple[slice, slice, slice], mask: np.ndarray, tissue: int | None,
                   label: int | None = None, lesion: int | None = None) -> None:
        """Write ``tissue`` / ``label`` / ``lesion`` over a box-shaped boolean mask."""
        if tissue is not None:
            self.tissue[box][mask] = tissue
        if label is not None:
            self.labels[box][mask] = label
        if lesion is not None:
            self.lesions[box][mask] = lesion

    def hu(self, texture_rng: np.random.Generator, noise_rng: np.random.Generator, noise_sd: float) -> np.ndarray:
        """(Z, Y, X) int16 HU: tissue means + texture + dependent gradient + image noise, clipped to [-1024, 3071]."""
        mean, tex, grad = self.tissues.luts()
        out = mean[self.tissue]  # (Z, Y, X) float32
        t = texture_field(texture_rng, self.grid)
        t *= tex[self.tissue]
        out += t
        del t
        if np.any(grad != 0):
            g = grad[self.tissue]
            g *= self.grid.axis(1).reshape(1, -1, 1)
            out += g
            del g
        n = image_noise(noise_rng, self.grid.shape)
        n *= np.float32(noise_sd)
        out += n
        del n
        np.clip(out, -1024, 3071, out=out)
        return np.rint(out).astype(np.int16)
