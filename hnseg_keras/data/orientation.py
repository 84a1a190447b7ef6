"""One orientation for everything the model sees: LPS, whatever the storage of the input.

The model learns on slices whose columns run towards the patient's left and whose rows run towards
the back, one slice per step towards the head (DICOM's LPS; identity direction cosines). The same CT
stored RAS (most NIfTI files), feet first, or with rows and columns swapped holds its anatomy along
other array axes; fed as stored, the model sees mirrored or transposed slices and a left organ comes
back as the right one. So the readers bring every CT and mask to LPS here, by an exact permutation and
flip of the array axes (no interpolation), and keep the input's ``Storage``, which maps results back
voxel for voxel onto the grid the user gave.

Direction cosines that are not a permutation of the axes (an oblique acquisition) are refused, or,
when asked for, resampled onto an LPS grid that covers the volume (linear for the CT, nearest for
masks and labels), and results are resampled back with nearest neighbour.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from hnseg_keras.errors import HnsegError

CANONICAL = "LPS"
OBLIQUE_TOLERANCE = 1e-3  # largest off-axis direction cosine still taken as axis-aligned (~0.06 degrees)
OBLIQUE_CHOICES = ("refuse", "resample")


def orientation_code(direction: Sequence[float]) -> str:
    """Three letters (DICOM convention: identity is "LPS") naming where each image axis points."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines([float(v) for v in direction])


def _axis_match(direction: np.ndarray) -> tuple[tuple[int, ...], float]:
    """(physical axis of each index axis, largest off-axis cosine) for the closest signed permutation."""
    best = max(itertools.permutations(range(3)),
               key=lambda perm: sum(abs(direction[perm[j], j]) for j in range(3)))
    off_axis = max(math.sqrt(max(0.0, 1.0 - direction[best[j], j] ** 2)) for j in range(3))
    return best, off_axis


@dataclass(frozen=True)
class Storage:
    """How an input volume is stored, and how to move arrays between that storage and LPS.

    Attributes:
        size, spacing, origin, direction: the input's own grid, SimpleITK order (x, y, z).
        axes: for each canonical array axis (z, y, x), the stored array axis it comes from.
        flips: canonical array axes that run backwards in the storage.
        canonical_size, canonical_spacing, canonical_origin, canonical_direction: the LPS grid.
        resampled: the input is oblique and the LPS grid is a resampling of it (not a permutation).
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    canonical_size: tuple[int, int, int]
    canonical_spacing: tuple[float, float, float]
    canonical_origin: tuple[float, float, float]
    canonical_direction: tuple[float, ...]
    resampled: bool = False

    @property
    def code(self) -> str:
        """The stored orientation ("RAS", "LPI", ...); "oblique (near XYZ)" for a resampled input."""
        return f"oblique (near {orientation_code(self.direction)})" if self.resampled else orientation_code(
            self.direction)

    @property
    def is_canonical(self) -> bool:
        """Arrays need no change: already LPS, axis for axis."""
        return not self.resampled and self.axes == (0, 1, 2) and not any(self.flips)

    def to_canonical(self, array: np.ndarray, linear: bool = False, fill: float = 0.0) -> np.ndarray:
        """A stored array [..., Z, Y, X] in LPS (a view when no resampling is needed)."""
        array = np.asarray(array)
        lead = array.ndim - 3
        if self.resampled:
            return _resample_each(array, self._stored_grid(), self._canonical_grid(), linear, fill)
        out = np.transpose(array, (*range(lead), *(lead + axis for axis in self.axes)))
        for axis, flipped in enumerate(self.flips):
            if flipped:
                out = np.flip(out, lead + axis)
        return out

    def to_storage(self, array: np.ndarray) -> np.ndarray:
        """An LPS array [..., Z, Y, X] back on the stored grid (nearest neighbour when resampled)."""
        array = np.asarray(array)
        lead = array.ndim - 3
        if self.resampled:
            return _resample_each(array, self._canonical_grid(), self._stored_grid(), False, 0.0)
        for axis, flipped in enumerate(self.flips):
            if flipped:
                array = np.flip(array, lead + axis)
        inverse = np.argsort(self.axes)
        return np.transpose(array, (*range(lead), *(lead + int(axis) for axis in inverse)))

    def _stored_grid(self) -> tuple:
        return self.size, self.spacing, self.origin, self.direction

    def _canonical_grid(self) -> tuple:
        return self.canonical_size, self.canonical_spacing, self.canonical_origin, self.canonical_direction


def storage_of(shape_zyx: Sequence[int], spacing: Sequence[float], origin: Sequence[float],
               direction: Sequence[float], oblique: str = "refuse", where: str = "image") -> Storage:
    """The Storage of a volume of array shape [Z, Y, X] on the given grid.

    An oblique grid (off-axis cosine above OBLIQUE_TOLERANCE) is refused with one line unless
    ``oblique="resample"``.
    """
    if oblique not in OBLIQUE_CHOICES:
        raise HnsegError(f"oblique handling {oblique!r} is unknown; use {' or '.join(OBLIQUE_CHOICES)}")
    size = tuple(int(v) for v in reversed(tuple(shape_zyx)))
    spacing = tuple(float(v) for v in spacing)
    origin = tuple(float(v) for v in origin)
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    physical, off_axis = _axis_match(matrix)
    index_of = {p: j for j, p in enumerate(physical)}  # physical axis -> stored index axis
    signs = [1.0 if matrix[physical[j], j] > 0 else -1.0 for j in range(3)]
    canonical_spacing = tuple(spacing[index_of[p]] for p in range(3))
    resampled = off_axis > OBLIQUE_TOLERANCE
    if resampled and oblique != "resample":
        degrees = math.degrees(math.asin(min(1.0, off_axis)))
        raise HnsegError(f"{where}: oblique image axes (direction cosines {[round(float(v), 4) for v in matrix.ravel()]}, "
                         f"{degrees:.1f} degrees off the patient axes); pass --oblique resample to resample it onto "
                         "an axis-aligned grid, or re-export it axial")
    axes = tuple(2 - index_of[2 - a] for a in range(3))
    flips = tuple(signs[index_of[2 - a]] < 0 for a in range(3))
    if resampled:
        corners = np.array([origin]) + np.array(
            [matrix @ (np.array(corner) * (np.array(size) - 1) * spacing) for corner in itertools.product((0, 1),
                                                                                                      repeat=3)])
        low, high = corners.min(axis=0), corners.max(axis=0)
        canonical_size = tuple(int(math.floor((high[p] - low[p]) / canonical_spacing[p] + 1e-6)) + 1 for p in range(3))
        canonical_origin = tuple(float(v) for v in low)
        canonical_direction = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    else:
        start = np.array([(size[j] - 1) if signs[j] < 0 else 0 for j in range(3)], dtype=np.float64)
        canonical_origin = tuple(float(v) for v in np.asarray(origin) + matrix @ (start * np.asarray(spacing)))
        canonical_size = tuple(size[index_of[p]] for p in range(3))
        columns = np.stack([signs[index_of[p]] * matrix[:, index_of[p]] for p in range(3)], axis=1)
        canonical_direction = tuple(float(v) for v in columns.ravel())
    return Storage(size, spacing, origin, tuple(float(v) for v in matrix.ravel()), axes, flips, canonical_size,
                   canonical_spacing, canonical_origin, canonical_direction, resampled)


def canonical_case(case, oblique: str = "refuse", where: str | None = None):
    """``case`` (a ``cases.Case`` as read) in LPS with its masks, remembering its ``Storage``."""
    storage = storage_of(case.ct.shape, case.spacing, case.origin, case.direction, oblique,
                         where or f"case {case.case_id}")
    if storage.is_canonical:
        return dataclasses.replace(case, storage=storage)
    from hnseg_keras.data.slicing import AIR_HU

    ct = storage.to_canonical(case.ct, linear=True, fill=AIR_HU)
    if storage.resampled:
        ct = np.clip(np.rint(ct), -32768, 32767).astype(np.int16)
    masks = {name: storage.to_canonical(mask).astype(np.uint8, copy=False) for name, mask in case.masks.items()}
    return dataclasses.replace(case, ct=ct, masks=masks, spacing=storage.canonical_spacing,
                               origin=storage.canonical_origin, direction=storage.canonical_direction,
                               storage=storage)


def stored_case(case):
    """The input's own grid for writing outputs: ``case`` (LPS) mapped back onto its ``Storage``."""
    storage = case.storage
    if storage is None or storage.is_canonical:
        return case
    return dataclasses.replace(case, ct=storage.to_storage(case.ct), masks={}, spacing=storage.spacing,
                               origin=storage.origin, direction=storage.direction, storage=None)


def canonical_image(image: sitk.Image, oblique: str = "refuse", where: str = "image") -> tuple[np.ndarray, Storage]:
    """(LPS array [Z, Y, X], Storage) of a label or mask image (nearest neighbour if it must be resampled)."""
    storage = storage_of(tuple(reversed(image.GetSize())), image.GetSpacing(), image.GetOrigin(),
                         image.GetDirection(), oblique, where)
    return storage.to_canonical(sitk.GetArrayFromImage(image)), storage


def _resample_each(array: np.ndarray, source: tuple, target: tuple, linear: bool, fill: float) -> np.ndarray:
    """Resample every [Z, Y, X] volume of ``array [..., Z, Y, X]`` from one grid onto another."""
    lead_shape = array.shape[:-3]
    size = target[0]
    out = np.empty((*lead_shape, size[2], size[1], size[0]), dtype=np.float32 if linear else array.dtype)
    for index in np.ndindex(*lead_shape):
        volume = array[index]
        image = sitk.GetImageFromArray(np.ascontiguousarray(volume.astype(np.float32 if linear else np.uint8)
                                                            if volume.dtype == bool or linear else volume))
        image.SetSpacing(source[1])
        image.SetOrigin(source[2])
        image.SetDirection(source[3])
        moved = sitk.Resample(image, [int(v) for v in size], sitk.Transform(),
                              sitk.sitkLinear if linear else sitk.sitkNearestNeighbor, target[2], target[1],
                              target[3], float(fill))
        out[index] = sitk.GetArrayFromImage(moved).astype(out.dtype, copy=False)
    return out
