"""nnU-Net v2 raw datasets: ``dataset.json`` + ``imagesTr/<case>_0000.<ending>`` + ``labelsTr/<case>.<ending>``.

``dataset.json`` names each label value (``"labels": {"background": 0, "Parotid_L": 6, ...}``);
those names are matched to organs like RTSTRUCT ROI names. ``imagesTs/`` cases form the test split
(with labels only where ``labelsTs/`` has them). Only the first channel (``_0000``, the CT) is read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hnseg_keras.data import cases, orientation
from hnseg_keras.data import organs as organ_catalogue
from hnseg_keras.data.cases import Case, CaseRef, Reading
from hnseg_keras.data.splits import TEST
from hnseg_keras.errors import HnsegError

CHANNEL = "_0000"


@dataclass(frozen=True)
class Dataset:
    """What ``dataset.json`` says: label name -> value, file ending, number of input channels."""

    root: Path
    labels: dict[str, int]
    file_ending: str
    channels: int


def detect(root: Path) -> bool:
    return root.is_dir() and (root / "dataset.json").is_file() and (
        (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir())


def read_dataset(root: Path) -> Dataset:
    """Parse and check ``root/dataset.json``."""
    path = root / "dataset.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise HnsegError(f"{path}: cannot read dataset.json ({error})") from None
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise HnsegError(f'{path}: needs "labels": {{"background": 0, "<organ>": 1, ...}}')
    table = {}
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise HnsegError(f"{path}: label {name!r} has value {value!r}; region-based (list) labels are not "
                             "supported, give one integer per organ")
        table[str(name)] = int(value)
    if len(set(table.values())) != len(table):
        raise HnsegError(f"{path}: two labels share one value; give each organ its own value")
    ending = data.get("file_ending")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise HnsegError(f'{path}: needs "file_ending" such as ".nii.gz"')
    channels = data.get("channel_names", {"0": "CT"})
    return Dataset(root, table, ending, len(channels) if isinstance(channels, dict) else 1)


def find(root: Path, reading: Reading) -> list[CaseRef]:
    """imagesTr cases (split from the user's split rule) and imagesTs cases (split "test")."""
    if not detect(root):
        raise HnsegError(f"{root}: not an nnU-Net raw dataset (dataset.json + imagesTr/); drop --layout nnunet")
    dataset = read_dataset(root)
    refs = []
    for images, labels, split in (("imagesTr", "labelsTr", None), ("imagesTs", "labelsTs", TEST)):
        folder = root / images
        if not folder.is_dir():
            continue
        suffix = CHANNEL + dataset.file_ending
        for image in sorted(folder.iterdir()):
            if not image.name.endswith(suffix) or image.name.startswith("."):
                continue
            case_id = image.name[: -len(suffix)]
            label = root / labels / f"{case_id}{dataset.file_ending}"
            if split is None and not label.is_file():
                raise HnsegError(f"{label}: missing; every imagesTr case needs its label map in labelsTr")
            refs.append(CaseRef(case_id, image, split, "nnunet", label if label.is_file() else None))
    if not refs:
        raise HnsegError(f"{root}: no imagesTr/<case>{CHANNEL}{dataset.file_ending} files; check file_ending in "
                         "dataset.json")
    return refs


def match_labels(dataset: Dataset, catalogue: Mapping | None = None,
                 organ_map: Mapping | None = None) -> tuple[dict[str, str], list[str]]:
    """({organ: label name}, [unmatched label names]); "background" (value 0) is left out."""
    names = [name for name, value in dataset.labels.items() if value != 0]
    return organ_catalogue.match_names(names, catalogue, organ_map, where=str(dataset.root / "dataset.json"))


def value_table(dataset: Dataset, matched: Mapping[str, str]) -> dict[int, str]:
    """{label value: organ} for the matched organs."""
    return {dataset.labels[name]: organ for organ, name in matched.items()}


def _labels_of(ref: CaseRef, reading: Reading) -> tuple[Dataset, dict[str, str], list[str]]:
    """(dataset, {organ: label name}, unmatched label names) of the dataset ``ref`` belongs to."""
    dataset = read_dataset(ref.path.parent.parent)
    matched, unmatched = match_labels(dataset, reading.catalogue, reading.organ_map)
    return dataset, matched, unmatched


def describe(ref: CaseRef, reading: Reading) -> dict:
    """The CT header, the organs dataset.json names, and (reading it) the label map's values checked."""
    info = cases.describe_image(ref.path, reading)
    if ref.label is not None:
        dataset, info["organs"], info["unmatched"] = _labels_of(ref, reading)
        ct_image = cases.read_image(ref.path)
        cases.case_from_image(ref.case_id, ct_image, ref.path)  # the CT checks ``read`` makes, before any output
        cases.read_label_map(ref.label, ct_image, {}, (), set(dataset.labels.values()))
    return info


def read(ref: CaseRef, organs: Sequence[str], reading: Reading) -> Case:
    """The CT (first channel) with a mask for each requested organ dataset.json names, in LPS."""
    ct_image = cases.read_image(ref.path)
    case = cases.case_from_image(ref.case_id, ct_image, ref.path)
    if ref.label is not None and organs:
        dataset, matched, _ = _labels_of(ref, reading)
        table = {value: organ for value, organ in value_table(dataset, matched).items() if organ in organs}
        case.masks = cases.read_label_map(ref.label, ct_image, table, organs, set(dataset.labels.values()))
    return orientation.canonical_case(case, reading.oblique, str(ref.path))
