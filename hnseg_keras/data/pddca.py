"""The PDDCA layout: ``<case>/img.nrrd`` + ``<case>/structures/<Name>.nrrd``, one binary mask per organ.

Case folders lie directly under the root or under its ``train/``, ``validation/`` (``val/``) and
``test/`` folders, which give their split hint; a root that is itself a case folder is one case. A
structure file that is absent means the organ is not annotated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import SimpleITK as sitk

from hnseg_keras.data import cases, orientation
from hnseg_keras.data.cases import Case, CaseRef, Reading
from hnseg_keras.data.organs import match_names
from hnseg_keras.errors import HnsegError

log = logging.getLogger(__name__)


def detect(root: Path) -> bool:
    return bool(find(root, Reading()))


def find(root: Path, reading: Reading) -> list[CaseRef]:
    """Case folders: the root itself, else flat ones, then those of train, validation, val, test, each by name."""
    if not root.is_dir():
        return []
    if _is_case_folder(root):
        return [CaseRef(root.name, root, None, "pddca")]
    refs = [CaseRef(p.name, p, None, "pddca") for p in sorted(root.iterdir()) if _is_case_folder(p)]
    for folder_name, split in cases.SPLIT_FOLDERS.items():
        split_root = root / folder_name
        if split_root.is_dir():
            refs += [CaseRef(p.name, p, split, "pddca") for p in sorted(split_root.iterdir()) if _is_case_folder(p)]
    return refs


def _is_case_folder(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and (
        (path / "img.nrrd").is_file() or (path / "structures").is_dir()
    )


def _image_path(folder: Path) -> Path:
    path = folder / "img.nrrd"
    if not path.is_file():
        raise HnsegError(f"{folder}: case folder has no img.nrrd; add the CT as img.nrrd or remove the folder")
    return path


def _structures(folder: Path, reading: Reading) -> tuple[dict[str, Path], dict[str, Path]]:
    """({organ: structure file}, {name: file} of those that match no organ), with the user's organ map.

    ``describe`` and ``read`` both match here, so ``scan`` reports the organs ``prepare`` reads.
    """
    files = {cases.strip_suffix(p.name): p for p in sorted((folder / "structures").glob("*"))
             if p.is_file() and p.name.lower().endswith(cases.IMAGE_SUFFIXES)}
    matched, unmatched = match_names(list(files), reading.catalogue, reading.organ_map,
                                     where=str(folder / "structures"))
    return {organ: files[name] for organ, name in matched.items()}, {name: files[name] for name in unmatched}


def describe(ref: CaseRef, reading: Reading) -> dict:
    """Size, spacing and stored orientation from the CT header; {organ: structure name}; unmatched names."""
    info = cases.describe_image(_image_path(ref.path), reading)
    found, unmatched = _structures(ref.path, reading)
    info["organs"] = {organ: cases.strip_suffix(path.name) for organ, path in found.items()}
    info["unmatched"] = list(unmatched)
    return info


def read(ref: CaseRef, organs: Sequence[str], reading: Reading) -> Case:
    """The CT with a mask for each requested organ that has a structure file, in LPS."""
    img_path = _image_path(ref.path)
    ct_image = cases.read_image(img_path)
    case = cases.case_from_image(ref.case_id, ct_image, img_path)
    found, unmatched = _structures(ref.path, reading)
    if unmatched:
        log.warning("%s: ignoring unknown structure files %s", ref.path / "structures",
                    ", ".join(path.name for path in unmatched.values()))
    for name in organs:
        if name in found:
            mask_image = cases.read_image(found[name])
            cases.check_same_geometry(mask_image, ct_image, found[name])
            case.masks[name] = cases.binary_mask(sitk.GetArrayFromImage(mask_image), found[name])
    return orientation.canonical_case(case, reading.oblique, str(ref.path))
