"""Readers that turn CT cases on disk into one in-memory ``Case``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Case:
    """One CT volume with its organ masks, in the CT's own voxel grid.

    Arrays are indexed ``[z, y, x]`` (SimpleITK's ``GetArrayFromImage`` order); geometry
    tuples are in SimpleITK order ``(x, y, z)``, millimetres, LPS.

    Attributes:
        case_id: identifier, e.g. the PDDCA folder name ``"0522c0001"``.
        ct: int16 Hounsfield units, shape [Z, Y, X].
        spacing: voxel size (x, y, z) in mm.
        origin: physical position of voxel (0, 0, 0) in mm.
        direction: 3x3 direction cosines, row-major, 9 floats.
        masks: canonical organ name -> uint8 {0, 1} array [Z, Y, X], for annotated organs only.
            An organ absent from this dict is *not annotated* (unknown), not empty.
    """

    case_id: str
    ct: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    masks: dict[str, np.ndarray] = field(default_factory=dict)

    def annotated(self, organs: Sequence[str]) -> np.ndarray:
        """bool [len(organs)]: whether each organ is annotated in this case."""
        return np.array([name in self.masks for name in organs], dtype=bool)
