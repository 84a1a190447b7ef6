"""Builders for the bring-your-own-data tests: cases written as DICOM series and trees and nnU-Net datasets.

Every layout is built from ``phantom.generate_case`` so the true masks are known voxel for voxel. The
package only reads DICOM CT series, so their writer (``write_dicom_series``) lives here.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hnseg_keras.data.cases import Case
from hnseg_keras.data.organs import DEFAULT_ORGANS, label_value
from hnseg_keras.data.phantom import PhantomConfig, generate_case
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import replace_folder

# 64 x 64 voxels at 4 mm, about 17 slices of 6-8 mm: a DICOM patient in well under a second.
SMALL = PhantomConfig(size=64, spacing_mm=4.0, slice_spacing_mm=(6.0, 8.0), z_extent_mm=120.0, seed=3)

# Clinic-style ROI names (TG-263, upper case, sides as prefix/suffix) for the nine organs.
CLINIC_NAMES = {
    "BrainStem": "Brain Stem", "Chiasm": "OpticChiasm", "Mandible": "Bone_Mandible", "OpticNerve_L": "OpticNrv_L",
    "OpticNerve_R": "Optic Nerve Rt", "Parotid_L": "PAROTID LT", "Parotid_R": "Rt Parotid",
    "Submandibular_L": "Glnd_Submand_L", "Submandibular_R": "Submandibular Right",
}
JUNK_ROIS = ("External", "PTV_70", "z_opt", "Ring_PTV70")
ARRANGEMENTS = ("flat", "split", "nested")


def small_case(index: int) -> Case:
    return generate_case(index, SMALL)


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


def _junk_masks(case: Case) -> dict[str, np.ndarray]:
    """Body outline, a box 'PTV', a small 'z_opt' and a hollow ring: ROIs that match no organ."""
    body = (case.ct > -500).astype(bool)
    ptv = np.zeros_like(body)
    depth, height, width = body.shape
    ptv[depth // 3: depth // 2, height // 3: height // 2, width // 3: width // 2] = True
    opt = np.zeros_like(body)
    opt[depth // 2, 5:9, 5:9] = True
    ring = np.zeros_like(body)
    ring[depth // 2, 20:40, 20:40] = True
    ring[depth // 2, 25:35, 25:35] = False  # a hole: read back as a ring, not a filled square
    return {"External": body, "PTV_70": ptv, "z_opt": opt, "Ring_PTV70": ring}


def write_rtstruct(case: Case, ct_folder: Path, path: Path, names: dict[str, str] = CLINIC_NAMES,
                   junk: bool = True, extra: dict[str, np.ndarray] | None = None) -> Path:
    """An RTSTRUCT (rt-utils) of the case's masks under clinic ``names`` (plus junk ROIs) for its CT series,
    completed and checked as predict's are, so the readers are tested on structure sets a clinic could
    export."""
    from rt_utils import RTStructBuilder

    from hnseg_keras.inference.rtstruct import complete_iod, series_z_indices, validate_rtstruct

    rtstruct = RTStructBuilder.create_new(str(ct_folder))
    order = series_z_indices(rtstruct.series_data, case)  # rt-utils sorts slices along the normal
    rois = {names[organ]: mask for organ, mask in case.masks.items() if organ in names}
    rois.update(_junk_masks(case) if junk else {})
    rois.update(extra or {})
    for name, mask in rois.items():
        if mask.any():
            rtstruct.add_roi(mask=np.moveaxis(mask.astype(bool)[order], 0, -1), name=name)
    complete_iod(rtstruct.ds, rtstruct.series_data[0])
    assert validate_rtstruct(rtstruct.ds, rtstruct.series_data) == []
    path.parent.mkdir(parents=True, exist_ok=True)
    rtstruct.ds.save_as(str(path), enforce_file_format=True)
    return path


def write_patient(case: Case, folder: Path, arrangement: str = "flat", rtstruct: bool = True, **kwargs) -> Path:
    """One patient folder: "flat" (CT files + RTSTRUCT side by side), "split" (CT/ + RTSTRUCT/) or "nested"
    (study/series subfolders with meaningless file names)."""
    staging = folder.parent / f".staging-{uuid.uuid4().hex[:6]}"
    write_dicom_series(case, staging)
    if arrangement == "flat":
        ct_folder, rs_path = folder, folder / "RS.dcm"
    elif arrangement == "split":
        ct_folder, rs_path = folder / "CT", folder / "RTSTRUCT" / "structures.dcm"
    else:
        ct_folder, rs_path = folder / "1.2.3" / "s1", folder / "1.2.3" / "s2" / f"{uuid.uuid4().hex}"
    ct_folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(staging.iterdir()):
        target = ct_folder / (path.name if arrangement != "nested" else uuid.uuid4().hex[:12])
        shutil.move(str(path), target)
    shutil.rmtree(staging)
    if rtstruct:
        write_rtstruct(case, ct_folder, rs_path, **kwargs)
    return folder


def write_dicom_tree(root: Path, indices=(0, 1), arrangement: str = "flat") -> dict[str, Case]:
    """root/<patient>/... for phantom cases ``indices``; returns {patient folder name: Case}."""
    written = {}
    for index in indices:
        case = small_case(index)
        name = f"patient{index:02d}"
        write_patient(case, root / name, arrangement)
        written[name] = case
    return written


def write_nnunet(root: Path, indices=(0, 1), test_indices=(2,), names: dict[str, str] | None = None) -> dict[str, Case]:
    """An nnU-Net v2 raw dataset of phantom cases (label values of the catalogue, organ names as label names)."""
    names = names or {organ: organ for organ in DEFAULT_ORGANS}
    labels = {"background": 0, **{names[organ]: label_value(organ) for organ in DEFAULT_ORGANS}}
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    written = {}
    for index, folder in [(i, "Tr") for i in indices] + [(i, "Ts") for i in test_indices]:
        case = small_case(index)
        case_id = f"HN_{index:03d}"
        _write_image(case.ct, case, root / f"images{folder}" / f"{case_id}_0000.nii.gz")
        if folder == "Tr":
            label_map = np.zeros(case.ct.shape, dtype=np.uint8)
            for organ, mask in case.masks.items():
                label_map[mask > 0] = label_value(organ)
            _write_image(label_map, case, root / "labelsTr" / f"{case_id}.nii.gz")
        written[case_id] = case
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": labels, "numTraining": len(indices), "file_ending": ".nii.gz"}))
    return written


def _write_image(array: np.ndarray, case: Case, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(case.spacing)
    image.SetOrigin(case.origin)
    image.SetDirection(case.direction)
    sitk.WriteImage(image, str(path), useCompression=True)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def read_one(path: Path, organs=DEFAULT_ORGANS, **reading) -> Case:
    """The one case at ``path`` (a case folder, a DICOM series or a CT file), read through ``layouts``."""
    from hnseg_keras.data import layouts

    (ref,) = layouts.find_refs(path, layouts.Reading(**reading))
    return layouts.read_ref(ref, organs, layouts.Reading(**reading))
