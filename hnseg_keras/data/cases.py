"""Readers that turn CT cases on disk into one in-memory ``Case``, and writers back to disk.

Sources: a PDDCA case folder (``img.nrrd`` + ``structures/<Name>.nrrd``), an image file
(NRRD / NIfTI / MHA) with an optional label-map file, or a DICOM CT series folder. Every
problem with the input becomes a one-line ``HnsegError`` naming the file.
"""

from __future__ import annotations

import datetime
import json
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
from hnseg_keras.data.organs import CATALOGUE, DEFAULT_ORGANS, canonical_name, label_value
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


# ----------------------------------------------------------------------------- reading


def read_case(
    path: str | os.PathLike,
    organs: Sequence[str] = DEFAULT_ORGANS,
    label_map: str | os.PathLike | None = None,
    labels: Mapping[int | str, str] | str | os.PathLike | None = None,
    catalogue: Mapping | None = None,
    known_values: set[int] | None = None,
    oblique: str = "refuse",
) -> Case:
    """Read one case from a PDDCA folder, a DICOM series folder or an image file, in LPS.

    Args:
        path: PDDCA case folder, DICOM CT series folder, or CT image file (.nrrd/.nii[.gz]/.mha).
        organs: canonical names to keep; other structures are dropped.
        label_map: optional label-map file on the CT grid (not with a PDDCA folder).
        labels: {label value: organ name} dict or JSON file path. Default: catalogue values,
            and then an organ with no voxel in the label map counts as not annotated; with an
            explicit map every listed organ counts as annotated (possibly empty).
        catalogue: organ catalogue (``organs.read_organs_file``); default the built-in one.
        known_values: every value the label map may hold (0 included); others are an error.
        oblique: "refuse" or "resample" a CT whose axes are not a permutation of the patient axes.
    Returns:
        Case with int16 HU CT and uint8 {0,1} masks for the annotated organs in ``organs``, brought
        to LPS (``orientation.canonical_case``).
    """
    path = Path(path)
    if not path.exists():
        raise HnsegError(f"{path}: no such file or folder; give a PDDCA case folder, a DICOM folder or a CT image")
    if path.is_dir() and ((path / "img.nrrd").exists() or (path / "structures").is_dir()):
        if label_map is not None:
            raise HnsegError(f"{path}: a PDDCA case folder carries its own structures; drop the label map")
        return orientation.canonical_case(_read_pddca(path, organs, catalogue), oblique, str(path))
    if path.is_dir():
        ct_image = _read_dicom_series(path)
        case_id = path.name
    else:
        ct_image = _read_image(path)
        case_id = _strip_suffix(path.name)
    case = case_from_image(case_id, ct_image, path)
    if label_map is not None:
        case.masks = _read_label_map(Path(label_map), ct_image, organs, labels, catalogue, known_values)
    return orientation.canonical_case(case, oblique, str(path))


def _read_pddca(folder: Path, organs: Sequence[str], catalogue: Mapping | None = None) -> Case:
    """PDDCA layout; a structure file that is absent means the organ is not annotated."""
    img_path = folder / "img.nrrd"
    if not img_path.is_file():
        raise HnsegError(f"{folder}: case folder has no img.nrrd; add the CT as img.nrrd or remove the folder")
    ct_image = _read_image(img_path)
    case = case_from_image(folder.name, ct_image, img_path)
    found: dict[str, Path] = {}
    unknown = []
    structures = folder / "structures"
    files = sorted(structures.iterdir()) if structures.is_dir() else []
    for file in files:
        if not file.is_file() or not file.name.lower().endswith(IMAGE_SUFFIXES):
            continue
        name = canonical_name(_strip_suffix(file.name), catalogue)
        if name is None:
            unknown.append(file.name)
        elif name in found:
            raise HnsegError(f"{file}: a second file for {name} (first: {found[name].name}); keep only one")
        elif name in organs:
            found[name] = file
    if unknown:
        log.warning("%s: ignoring unknown structure files %s", structures, ", ".join(unknown))
    for name, file in found.items():
        mask_image = _read_image(file)
        _check_same_geometry(mask_image, ct_image, file)
        case.masks[name] = _binary_mask(sitk.GetArrayFromImage(mask_image), file)
    return case


def _read_label_map(path: Path, ct_image: sitk.Image, organs: Sequence[str], labels,
                    catalogue: Mapping | None = None, known_values: set[int] | None = None) -> dict[str, np.ndarray]:
    """Masks from a label map; see ``read_case`` for which organs count as annotated."""
    explicit = labels is not None
    value_to_organ = _label_table(labels, organs, catalogue)
    image = _read_image(path)
    _check_same_geometry(image, ct_image, path)
    array = sitk.GetArrayFromImage(image)
    _check_finite(array, path)
    if not np.array_equal(array, np.round(array)):
        raise HnsegError(f"{path}: label map holds non-integer values; save it with integer labels")
    if array.size and array.min() >= 0 and array.max() < 65536:  # bincount: much faster than unique
        values = np.nonzero(np.bincount(array.astype(np.int64).ravel()))[0]
    else:
        values = np.unique(array).astype(np.int64)
    present = set(values.tolist()) - {0}
    if known_values is not None and present - set(known_values):
        raise HnsegError(f"{path}: holds label value(s) {sorted(present - set(known_values))} that dataset.json does "
                         "not define; fix the labels in dataset.json or in the label map")
    unmapped = sorted(v for v in present if v not in value_to_organ)
    if unmapped:
        log.warning("%s: ignoring label values %s (not in the label table)", path, unmapped)
    masks = {}
    for value, name in value_to_organ.items():
        if name in organs and (explicit or value in present):
            masks[name] = (array == value).astype(np.uint8)
    return {name: masks[name] for name in organs if name in masks}


def _label_table(labels, organs: Sequence[str], catalogue: Mapping | None = None) -> dict[int, str]:
    """{value: canonical organ} from a dict, a JSON file, or the catalogue (None)."""
    if labels is None:
        return {label_value(name, catalogue): name for name in organs}
    source = labels
    if isinstance(labels, str | os.PathLike):
        try:
            labels = json.loads(Path(labels).read_text())
        except (OSError, ValueError) as error:
            raise HnsegError(f"{source}: cannot read the JSON label table ({error})") from None
    if not isinstance(labels, Mapping):
        raise HnsegError(f"{source}: the label table must be a JSON object {{value: organ name}}")
    table = {}
    for key, name in labels.items():
        canonical = canonical_name(str(name), catalogue)
        if canonical is None:
            raise HnsegError(f"{source}: unknown organ {name!r}; known organs: {', '.join(catalogue or CATALOGUE)}")
        try:
            table[int(key)] = canonical
        except ValueError:
            raise HnsegError(f"{source}: label value {key!r} is not an integer") from None
    return table


def _read_dicom_series(folder: Path) -> sitk.Image:
    """The checked CT series of a DICOM folder (``dicom.open_patient``), in HU."""
    from hnseg_keras.data import dicom

    if not dicom.dicom_files(folder, first_only=True):
        raise HnsegError(
            f"{folder}: no img.nrrd (PDDCA case) and no DICOM files found; give a case folder or a DICOM CT folder"
        )
    return dicom.read_ct(dicom.open_patient(folder))


def _read_image(path: Path) -> sitk.Image:
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


def _check_finite(array: np.ndarray, path: Path) -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise HnsegError(f"{path}: {bad} NaN/inf voxels; fix or re-export the image")


def _binary_mask(array: np.ndarray, path: Path) -> np.ndarray:
    """uint8 {0,1} from a 0/1 or 0/255 mask; anything else is an error."""
    _check_finite(array, path)
    foreground = array != 0
    values = array[foreground]
    if values.size and not (values.min() == values.max() and values.flat[0] in (1, 255)):
        found = np.unique(values)[:5].tolist()
        raise HnsegError(f"{path}: mask is not binary (non-zero values {found}); save it as 0/1")
    return foreground.astype(np.uint8)


def _check_same_geometry(image: sitk.Image, reference: sitk.Image, path: Path) -> None:
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


def _strip_suffix(name: str) -> str:
    for suffix in sorted(IMAGE_SUFFIXES + (".dcm",), key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:200]


def find_cases(root: str | os.PathLike) -> list[CaseRef]:
    """PDDCA case folders directly under ``root`` or under its train/validation/val/test folders.

    A case folder holds ``img.nrrd`` or ``structures/``. A root that is itself a case folder
    gives that one case. Ordered: flat cases, then train, validation, val, test, each by folder
    name; empty if nothing is found.
    """
    root = Path(root)
    if not root.is_dir():
        raise HnsegError(f"{root}: not a folder; give the folder that holds the case folders")
    if _is_case_folder(root):
        return [CaseRef(root.name, root, None)]
    refs = [CaseRef(p.name, p, None) for p in sorted(root.iterdir()) if _is_case_folder(p)]
    for folder_name, split in SPLIT_FOLDERS.items():
        split_root = root / folder_name
        if split_root.is_dir():
            refs += [CaseRef(p.name, p, split) for p in sorted(split_root.iterdir()) if _is_case_folder(p)]
    return unique_ids(refs)


def unique_ids(refs: list) -> list:
    """``refs`` unchanged, or a refusal naming both places of a case id found twice."""
    seen: dict[str, Path] = {}
    for ref in refs:
        if ref.case_id in seen:
            raise HnsegError(f"{ref.path}: case id {ref.case_id!r} also at {seen[ref.case_id]}; rename one")
        seen[ref.case_id] = ref.path
    return refs


def _is_case_folder(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and (
        (path / "img.nrrd").is_file() or (path / "structures").is_dir()
    )


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


def write_dicom_series(
    case: Case, folder: str | os.PathLike, overwrite: bool = False, rescale_slope: float = 1.0
) -> Path:
    """Write the CT of ``case`` as a CT Image Storage DICOM series, one file per slice.

    Pixels are stored unsigned with RescaleIntercept = min(-1024, min HU) and the given
    slope (HU = stored * slope + intercept; HU values are rounded to the slope's grid).
    Each slice gets ImagePositionPatient from the case geometry and fresh UIDs, so
    SimpleITK, pydicom and rt-utils read the series back.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise HnsegError(f"{folder}: already exists; choose another folder or pass overwrite")
    ct = case.ct.astype(np.float64)
    intercept = float(min(-1024.0, ct.min()))
    stored = np.round((ct - intercept) / rescale_slope)
    if stored.max() > np.iinfo(np.uint16).max:
        raise HnsegError(f"case {case.case_id}: HU range too wide for slope {rescale_slope}; use a larger slope")
    stored = stored.astype("<u2")
    axes = np.array(case.direction, dtype=np.float64).reshape(3, 3)  # column j = direction of index axis j
    shared = Dataset()
    now = datetime.datetime.now()
    shared.update({
        "PatientName": case.case_id, "PatientID": case.case_id, "PatientBirthDate": "", "PatientSex": "",
        "StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid(),
        "FrameOfReferenceUID": generate_uid(), "StudyDate": now.strftime("%Y%m%d"),
        "StudyTime": now.strftime("%H%M%S"), "StudyID": "1", "AccessionNumber": "",
        "ReferringPhysicianName": "", "SeriesNumber": 1, "Modality": "CT", "Manufacturer": "hnseg-keras",
        "SeriesDescription": f"CT {case.case_id}", "SOPClassUID": CTImageStorage,
        "ImageOrientationPatient": [_ds(v) for v in (*axes[:, 0], *axes[:, 1])],
        "PixelSpacing": [_ds(case.spacing[1]), _ds(case.spacing[0])], "SliceThickness": _ds(case.spacing[2]),
        "Rows": int(ct.shape[1]), "Columns": int(ct.shape[2]), "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2", "BitsAllocated": 16, "BitsStored": 16, "HighBit": 15,
        "PixelRepresentation": 0, "RescaleIntercept": _ds(intercept), "RescaleSlope": _ds(rescale_slope),
        "RescaleType": "HU",
    })
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for k in range(ct.shape[0]):
            ds = Dataset()
            ds.update(shared)
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            position = np.asarray(case.origin) + k * case.spacing[2] * axes[:, 2]
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.PixelData = stored[k].tobytes()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.save_as(tmp / f"CT{k + 1:04d}.dcm", enforce_file_format=True)
        replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    text = f"{float(value):.10g}"
    return text if len(text) <= 16 else f"{float(value):.8g}"
