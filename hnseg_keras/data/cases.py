"""``Case`` (a CT and its organ masks in memory), ``CaseRef`` (where one lies on disk), ``Reading``
(how to read it), the image and label-map helpers the layout readers share, and the writers the
package itself uses (PDDCA folders, label maps).

Finding and reading cases goes through ``layouts`` (one module per input layout). Every problem with
the input becomes a one-line ``HnsegError`` naming the file.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hnseg_keras.data import checks as image_checks
from hnseg_keras.data import orientation
from hnseg_keras.data.organs import CATALOGUE, catalogue_from, definitions
from hnseg_keras.data.splits import TEST, TRAIN, VALIDATION
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import replace_folder

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
SPLIT_FOLDERS = {TRAIN: TRAIN, VALIDATION: VALIDATION, "val": VALIDATION, TEST: TEST}
SPACING_RTOL = 1e-3  # relative tolerance on voxel spacing between a mask and its CT
ORIGIN_ATOL_MM = 1e-2  # absolute tolerance on the origin, mm
DIRECTION_ATOL = 1e-4  # absolute tolerance on direction cosines


@dataclass
class Case:
    """One CT volume with its organ masks on one voxel grid.

    Arrays are indexed ``[z, y, x]`` (SimpleITK's ``GetArrayFromImage`` order); geometry
    tuples are in SimpleITK order ``(x, y, z)``, millimetres, LPS. The readers return cases
    brought to the LPS orientation (``orientation.canonical_case``); ``storage`` then says how the
    input was stored, so outputs go back onto the user's own grid (``orientation.stored_case``).

    Attributes:
        case_id: identifier, e.g. the PDDCA folder name ``"0522c0001"``.
        ct: int16 Hounsfield units, shape [Z, Y, X].
        spacing: voxel size (x, y, z) in mm.
        origin: physical position of voxel (0, 0, 0) in mm.
        direction: 3x3 direction cosines, row-major, 9 floats.
        masks: canonical organ name -> uint8 {0, 1} array [Z, Y, X], for annotated organs only.
            An organ absent from this dict is *not annotated* (unknown), not empty.
        storage: how the input was stored (``orientation.Storage``); None for a case built in memory.
    """

    case_id: str
    ct: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    storage: orientation.Storage | None = None

    def annotated(self, organs: Sequence[str]) -> np.ndarray:
        """bool [len(organs)]: whether each organ is annotated in this case."""
        return np.array([name in self.masks for name in organs], dtype=bool)


@dataclass(frozen=True)
class CaseRef:
    """Where a case lives on disk.

    ``split`` is the hint from its folder (or None); ``layout`` is "pddca", "dicom", "nnunet" or
    "image"; ``label`` is the label-map file of an nnU-Net case; ``series`` the chosen DICOM CT series.
    """

    case_id: str
    path: Path
    split: str | None = None
    layout: str = "pddca"
    label: Path | None = None
    series: str | None = None


@dataclass(frozen=True)
class Reading:
    """How to read cases: forced layout, chosen DICOM series, organ catalogue, the user's name map and
    what to do with oblique image axes (``orientation.OBLIQUE_CHOICES``)."""

    layout: str | None = None
    series: str | None = None
    catalogue: Mapping = field(default_factory=lambda: dict(CATALOGUE))
    organ_map: Mapping = field(default_factory=dict)
    oblique: str = "refuse"

    def to_job(self) -> dict:
        """A plain dict for worker processes."""
        return {"layout": self.layout, "series": self.series, "organ_map": dict(self.organ_map),
                "definitions": definitions(list(self.catalogue), self.catalogue), "oblique": self.oblique}

    @classmethod
    def from_job(cls, data: dict) -> Reading:
        return cls(data["layout"], data["series"], catalogue_from(data["definitions"]), data["organ_map"],
                   data.get("oblique", "refuse"))


# ----------------------------------------------------------------------------- reading helpers of the layouts


def read_image(path: Path) -> sitk.Image:
    """sitk.ReadImage with unreadable / truncated files turned into one-line errors."""
    if not path.is_file():
        raise HnsegError(f"{path}: file not found")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise HnsegError(
            f"{path}: unreadable or truncated image ({_first_line(error)}); re-export or re-download it"
        ) from None


def case_from_image(case_id: str, image: sitk.Image, path: Path) -> Case:
    """Validate the CT (3D, scalar, finite) and convert it to int16 HU."""
    image_checks.check_image(image, path)  # 4D / multi-channel refused; odd type, spacing or HU range warned
    if image.GetDimension() != 3 or image.GetSize()[2] < 2:
        raise HnsegError(f"{path}: image is 2D (size {image.GetSize()}); give a 3D CT volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise HnsegError(f"{path}: image has {image.GetNumberOfComponentsPerPixel()} channels; give a scalar CT")
    array = sitk.GetArrayFromImage(image)
    _check_finite(array, path)
    if array.dtype != np.int16:
        info = np.iinfo(np.int16)
        array = np.clip(np.round(array), info.min, info.max).astype(np.int16)
    return Case(
        case_id=case_id,
        ct=array,
        spacing=tuple(float(v) for v in image.GetSpacing()),
        origin=tuple(float(v) for v in image.GetOrigin()),
        direction=tuple(float(v) for v in image.GetDirection()),
    )


def read_label_map(path: Path, ct_image: sitk.Image, table: Mapping[int, str], organs: Sequence[str],
                   known_values: set[int]) -> dict[str, np.ndarray]:
    """{organ: uint8 mask} from a label map on the CT's grid, in ``organs`` order.

    ``table`` maps label values to organs (nnU-Net's dataset.json): every organ it lists counts as
    annotated, possibly empty. A value outside ``known_values`` (0 included) is an error; a known
    value the table leaves out is ignored with a warning.
    """
    image = read_image(path)
    check_same_geometry(image, ct_image, path)
    array = sitk.GetArrayFromImage(image)
    _check_finite(array, path)
    if not np.array_equal(array, np.round(array)):
        raise HnsegError(f"{path}: label map holds non-integer values; save it with integer labels")
    if array.size and array.min() >= 0 and array.max() < 65536:  # bincount: much faster than unique
        values = np.nonzero(np.bincount(array.astype(np.int64).ravel()))[0]
    else:
        values = np.unique(array).astype(np.int64)
    present = set(values.tolist()) - {0}
    if present - set(known_values):
        raise HnsegError(f"{path}: holds label value(s) {sorted(present - set(known_values))} that dataset.json does "
                         "not define; fix the labels in dataset.json or in the label map")
    unmapped = sorted(v for v in present if v not in table)
    if unmapped:
        log.warning("%s: ignoring label values %s (not in the label table)", path, unmapped)
    masks = {name: (array == value).astype(np.uint8) for value, name in table.items() if name in organs}
    return {name: masks[name] for name in organs if name in masks}


def image_information(path: Path) -> tuple[list[int], list[float], tuple[float, ...]]:
    """(size, spacing, direction) from an image file's header."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise HnsegError(f"{path}: unreadable image header; re-export or re-download it") from None
    return list(reader.GetSize()), rounded(reader.GetSpacing()), tuple(reader.GetDirection())


def stored_orientation(size, spacing, direction, reading: Reading, where) -> str:
    """The stored orientation ("RAS", ...); an oblique one is refused here unless ``reading`` resamples it."""
    if len(size) != 3:
        return "?"
    storage = orientation.storage_of(tuple(reversed(size)), spacing, (0.0, 0.0, 0.0), direction, reading.oblique,
                                     str(where))
    return storage.code


def describe_image(path: Path, reading: Reading) -> dict:
    """What ``layouts.describe`` reports of a CT image file, from its header: no organs yet."""
    size, spacing, direction = image_information(path)
    stored = stored_orientation(size, spacing, direction, reading, path)
    return {"size": size, "spacing_mm": spacing, "orientation": stored, "organs": {}, "unmatched": []}


def rounded(values: Sequence[float]) -> list[float]:
    return [round(float(v), 4) for v in values]


def _check_finite(array: np.ndarray, path: Path) -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise HnsegError(f"{path}: {bad} NaN/inf voxels; fix or re-export the image")


def binary_mask(array: np.ndarray, path: Path) -> np.ndarray:
    """uint8 {0,1} from a 0/1 or 0/255 mask; anything else is an error."""
    _check_finite(array, path)
    foreground = array != 0
    values = array[foreground]
    if values.size and not (values.min() == values.max() and values.flat[0] in (1, 255)):
        found = np.unique(values)[:5].tolist()
        raise HnsegError(f"{path}: mask is not binary (non-zero values {found}); save it as 0/1")
    return foreground.astype(np.uint8)


def check_same_geometry(image: sitk.Image, reference: sitk.Image, path: Path) -> None:
    """Raise if ``image`` is not on the voxel grid of the CT ``reference``."""
    if image.GetDimension() != reference.GetDimension() or image.GetSize() != reference.GetSize():
        raise HnsegError(
            f"{path}: size {image.GetSize()} differs from the CT's {reference.GetSize()}; resample it onto the CT grid"
        )
    checks = (
        ("spacing", image.GetSpacing(), reference.GetSpacing(), dict(rtol=SPACING_RTOL, atol=0.0)),
        ("origin", image.GetOrigin(), reference.GetOrigin(), dict(rtol=0.0, atol=ORIGIN_ATOL_MM)),
        ("direction", image.GetDirection(), reference.GetDirection(), dict(rtol=0.0, atol=DIRECTION_ATOL)),
    )
    for what, got, want, tolerance in checks:
        if not np.allclose(got, want, **tolerance):
            got_text = tuple(round(v, 4) for v in got)
            want_text = tuple(round(v, 4) for v in want)
            raise HnsegError(f"{path}: {what} {got_text} differs from the CT's {want_text}; resample it onto the CT grid")


def strip_suffix(name: str) -> str:
    """A file name without its image suffix (``ct.nii.gz`` -> ``ct``): the case id of an image file."""
    for suffix in sorted(IMAGE_SUFFIXES + (".dcm",), key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:200]


def unique_ids(refs: list) -> list:
    """``refs`` unchanged, or a refusal naming both places of a case id found twice."""
    seen: dict[str, Path] = {}
    for ref in refs:
        if ref.case_id in seen:
            raise HnsegError(f"{ref.path}: case id {ref.case_id!r} also at {seen[ref.case_id]}; rename one")
        seen[ref.case_id] = ref.path
    return refs


# ----------------------------------------------------------------------------- writing


def image_like(array_zyx: np.ndarray, case: Case) -> sitk.Image:
    """A SimpleITK image of ``array_zyx`` [Z,Y,X] carrying the geometry of ``case``."""
    if tuple(array_zyx.shape) != tuple(case.ct.shape):
        raise HnsegError(f"case {case.case_id}: array shape {array_zyx.shape} differs from the CT's {case.ct.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    image.SetSpacing(tuple(float(v) for v in case.spacing))
    image.SetOrigin(tuple(float(v) for v in case.origin))
    image.SetDirection(tuple(float(v) for v in case.direction))
    return image


def reference_image(case: Case) -> sitk.Image:
    """The CT of ``case`` as a SimpleITK image: the geometry reference for resampling and writing."""
    return image_like(case.ct.astype(np.int16, copy=False), case)


def write_pddca_case(case: Case, folder: str | os.PathLike, overwrite: bool = False,
                     with_image: bool = True) -> Path:
    """Write ``case`` as ``folder/img.nrrd`` + ``folder/structures/<Name>.nrrd`` (gzip NRRD).

    The folder is built under a temporary name and renamed into place, so it is either
    complete or absent. An existing folder is refused unless ``overwrite``. ``with_image=False``
    writes the structures alone (predicted masks beside a CT the user already has).
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise HnsegError(f"{folder}: already exists; choose another folder or pass overwrite")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        (tmp / "structures").mkdir(parents=True)
        if with_image:
            sitk.WriteImage(reference_image(case), str(tmp / "img.nrrd"), useCompression=True)
        for name, mask in case.masks.items():
            sitk.WriteImage(image_like(mask.astype(np.uint8), case), str(tmp / "structures" / f"{name}.nrrd"), True)
        replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_label_map(
    array_zyx: np.ndarray, geometry_from_case: Case, path: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write an integer label map [Z,Y,X] on the CT grid of a case; format from the suffix.

    NRRD (.nrrd) or NIfTI (.nii / .nii.gz); temporary name then rename; an existing file
    is refused unless ``overwrite``.
    """
    path = Path(path)
    if not path.name.lower().endswith((".nrrd", ".nii", ".nii.gz", ".mha")):
        raise HnsegError(f"{path}: unknown label-map format; use .nrrd, .nii or .nii.gz")
    if path.exists() and not overwrite:
        raise HnsegError(f"{path}: already exists; choose another name or pass overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    image = image_like(np.asarray(array_zyx), geometry_from_case)
    tmp = path.parent / f".tmp-{uuid.uuid4().hex[:8]}-{path.name}"
    try:
        sitk.WriteImage(image, str(tmp), useCompression=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
