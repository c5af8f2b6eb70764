"""Noise for synthetic CT: a smooth low-frequency texture field and correlated image noise.

Both are drawn from the generator passed in, on the case's grid, in float32. The texture field is white
noise on a coarse lattice (spacing = correlation length, random sub-lattice offset) interpolated to the
voxels with cubic B-spline weights, applied separably as three small matrix products, so it costs about
one pass over the volume at any size. Image noise is Gaussian with a 1-2-1 in-plane kernel, which gives it
the fine grain of reconstructed CT noise; both come out with unit standard deviation.
"""

from __future__ import annotations

import numpy as np

from pipelines.synth.shapes import Grid


def _bspline3(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    out = np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, 0.0)
    return np.where((t >= 1) & (t < 2), (2 - t) ** 3 / 6, out)


def _weights(coords: np.ndarray, step: float, offset: float) -> np.ndarray:
    """(N, M) B-spline weights from lattice nodes (spacing ``step``) to ``coords``."""
    lo = coords.min() - 2 * step + offset
    nodes = lo + step * np.arange(int(np.ceil((coords.max() - lo) / step)) + 3)
    return _bspline3((coords[:, None] - nodes[None, :]) / step).astype(np.float32)


def smooth_field(rng: np.random.Generator, grid: Grid, corr_mm: float) -> np.ndarray:
    """(Z, Y, X) float32 smooth Gaussian field, unit sd, correlation length about ``corr_mm``."""
    wx, wy, wz = (_weights(grid.axis(k), corr_mm, -float(rng.random()) * corr_mm) for k in range(3))
    coarse = rng.standard_normal((wz.shape[1], wy.shape[1], wx.shape[1]), dtype=np.float32)
    a = coarse @ wx.T  # (cz, cy, X)
    a = np.einsum("yj,zjx->zyx", wy, a, optimize=True)  # (cz, Y, X)
    nz, ny, nx = grid.shape
    out = (wz @ a.reshape(a.shape[0], -1)).reshape(nz, ny, nx)  # (Z, Y, X)
    var = (wz**2).sum(1).mean() * (wy**2).sum(1).mean() * (wx**2).sum(1).mean()
    out *= np.float32(1.0 / np.sqrt(var))
    return out


def texture_field(rng: np.random.Generator, grid: Grid) -> np.ndarray:
    """(Z, Y, X) float32 tissue texture: a fine (~5 mm) and a coarse (~25 mm) smooth field, unit sd."""
    fine = smooth_field(rng, grid, 5.0)
    fine *= np.float32(0.6)
    fine += np.float32(0.8) * smooth_field(rng, grid, 25.0)
    return fine


def image_noise(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """(Z, Y, X) float32 unit-sd Gaussian noise, correlated in-plane by a separable 1-2-1 kernel."""
    n = rng.standard_normal((shape[0], shape[1] + 2, shape[2] + 2), dtype=np.float32)
    a = n[:, :, 1:-1] * 2
    a += n[:, :, :-2]
    a += n[:, :, 2:]  # (Z, Y + 2, X)
    out = a[:, 1:-1, :] * 2
    out += a[:, :-2, :]
    out += a[:, 2:, :]  # (Z, Y, X)
    out *= np.float32(1.0 / 6.0)  # sd of the separable 1-2-1 x 1-2-1 sum is sqrt(6) * sqrt(6)
    return out
