"""Data types shared by the synthetic-cohort generator: one rendered case and the findings injected into it.

Array layout everywhere: ``(Z, Y, X)`` with the patient in LPS (DICOM) orientation and an identity
direction matrix: ``x`` grows towards the patient's left, ``y`` towards posterior, ``z`` towards the head,
so ``array[0]`` is the most inferior slice. Physical position of voxel ``(k, j, i)``:
``(origin_x + i * sx, origin_y + j * sy, origin_z + k * sz)`` in millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Finding:
    """One finding injected into a synthetic case (ground truth for labels, reports and localisation)."""

    task: str
    """Task name in the ``fvlm54`` catalog (``lung_nodule``)."""
    anatomy: str
    """Anatomy name in ``fvlm15`` the finding lies in."""
    lesion_id: int
    """Its id in the case's lesion map (1..n); every finding has a region, diffuse ones the affected organ part."""
    size_mm: float | None = None
    """Largest diameter in mm where a size makes sense (nodules, cysts, stones), else None."""
    location: str | None = None
    """Where, in report words: ``right upper lobe``, ``left kidney``, ``segment 7``; None if not specific."""
    side: str | None = None
    """``left``, ``right``, ``bilateral`` or None."""
    severity: float = 1.0
    """Conspicuity in [0, 1] (size and contrast drawn for this case); below 0.35 counts as subtle."""

    @property
    def subtle(self) -> bool:
        return self.severity < 0.35


@dataclass
class SynthVolume:
    """One rendered synthetic CT with its ground truth, on one voxel grid."""

    hu: np.ndarray
    """(Z, Y, X) int16 Hounsfield units."""
    labels: np.ndarray
    """(Z, Y, X) uint8 TotalSegmentator ``total`` class ids (0 = background)."""
    lesions: np.ndarray
    """(Z, Y, X) uint8 lesion ids, ``Finding.lesion_id`` (0 = none)."""
    spacing: tuple[float, float, float]
    """Voxel size (z, y, x) in mm."""
    origin: tuple[float, float, float]
    """Physical (x, y, z) LPS position in mm of voxel (0, 0, 0)."""
    findings: list[Finding] = field(default_factory=list)
    """Findings actually injected (a requested finding whose anatomy is out of the field of view is dropped)."""
    anatomies_in_view: tuple[str, ...] = ()
    """fvlm15 anatomies with any voxel in the volume."""
    sex: str = "M"
    """``M`` or ``F``: the phantom's sex (prostate only in ``M``)."""
    contrast: bool = True
    """Whether the phantom was rendered in a contrast-enhanced (portal venous) phase."""

    def __post_init__(self) -> None:
        if not (self.hu.shape == self.labels.shape == self.lesions.shape):
            raise ValueError(
                f"synthetic volume arrays disagree in shape: hu {self.hu.shape}, labels {self.labels.shape}, "
                f"lesions {self.lesions.shape}"
            )
