"""Slices where a CT holds tissue only around the contours, and how much of a score rests on them.

Some converted datasets keep the CT only where it was needed (the OpenKBP copy keeps air, -1024 HU,
outside a region around the targets) but keep the organ contours beyond it. On such a *blanked*
slice the organ and a few voxels around it are all the tissue left, so the image gives the contour
away: a model scores well there without the anatomy a clinical CT shows. A slice is blanked when it
carries a contour but less than ``area_cm2`` (default 40 cm2) of tissue (HU > -900); an axial slice
through a real head or neck holds about 100-250 cm2.

Reads the PDDCA layout (``<case>/img.nrrd`` + ``structures/<organ>.nrrd``) with SimpleITK.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

TISSUE_HU = -900.0
AREA_CM2 = 40.0


def blanked_slices(ct: np.ndarray, union: np.ndarray, pixel_mm2: float, area_cm2: float = AREA_CM2) -> np.ndarray:
    """bool [Z] of a CT [Z, Y, X]: slices that carry a contour (``union``) but less than ``area_cm2`` of tissue."""
    tissue_cm2 = (ct > TISSUE_HU).sum(axis=(1, 2)) * pixel_mm2 / 100.0
    return union.any(axis=(1, 2)) & (tissue_cm2 < area_cm2)


def read_case(folder: Path, area_cm2: float = AREA_CM2) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(organ -> non-empty mask [Z, Y, X], blanked slices [Z]) of one PDDCA case folder."""
    image = sitk.ReadImage(str(folder / "img.nrrd"))
    masks = {path.name.split(".")[0]: sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0
             for path in sorted((folder / "structures").glob("*.nrrd"))}
    masks = {organ: mask for organ, mask in masks.items() if mask.any()}
    if not masks:
        return {}, np.zeros(image.GetSize()[2], bool)
    spacing = image.GetSpacing()
    union = np.logical_or.reduce(list(masks.values()))
    return masks, blanked_slices(sitk.GetArrayFromImage(image), union, spacing[0] * spacing[1], area_cm2)


def audit(folders: Sequence[Path], area_cm2: float = AREA_CM2, progress=None) -> dict:
    """Per organ: share of its voxels on blanked slices and the cases with more than 20 % of it there."""
    voxels, cases, per_case = defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0]), {}
    for number, folder in enumerate(folders, 1):
        masks, blanked = read_case(folder, area_cm2)
        per_case[folder.name] = {organ: round(float(mask[blanked].sum() / mask.sum()), 4)
                                 for organ, mask in masks.items()}
        for organ, mask in masks.items():
            on_blanked, total = int(mask[blanked].sum()), int(mask.sum())
            voxels[organ][0] += on_blanked
            voxels[organ][1] += total
            cases[organ][0] += on_blanked > 0.2 * total
            cases[organ][1] += 1
        if progress:
            progress(number, len(folders))
    organs = {organ: {"voxels_on_blanked_slices_percent": round(100 * b / n, 1),
                      "cases_over_20_percent": cases[organ][0], "cases": cases[organ][1]}
              for organ, (b, n) in sorted(voxels.items())}
    affected = sum(any(share > 0.2 for share in shares.values()) for shares in per_case.values())
    return {"area_cm2": area_cm2, "tissue_hu": TISSUE_HU, "organs": organs, "cases_affected": affected,
            "cases": len(per_case), "per_case": per_case}


def dice(truth: np.ndarray, predicted: np.ndarray) -> float | None:
    """3D Dice; None where both are empty (nothing to score)."""
    total = int(truth.sum()) + int(predicted.sum())
    return None if total == 0 else 2.0 * int((truth & predicted).sum()) / total


def score_predictions(folders: Sequence[Path], predictions: Path, labels: Mapping[str, int],
                      area_cm2: float = AREA_CM2) -> dict:
    """Per organ, the mean over cases of the 3D Dice of ``<predictions>/<case>.nrrd`` label maps three ways.

    ``all`` (every slice, as ``hnseg evaluate``), ``clinical_like`` (the slices that are not blanked) and
    ``blanked`` (only cases where the organ has voxels on blanked slices; ``blanked_cases`` counts them).
    Dice in [0, 1]; a case where truth and prediction are both empty on a part is left out of that part.
    """
    scores = defaultdict(lambda: defaultdict(list))
    for folder in folders:
        path = predictions / f"{folder.name}.nrrd"
        if not path.is_file():
            continue
        masks, blanked = read_case(folder, area_cm2)
        label_map = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        for organ, truth in masks.items():
            if organ not in labels:
                continue
            predicted = label_map == labels[organ]
            scores[organ]["all"].append(dice(truth, predicted))
            scores[organ]["clinical_like"].append(dice(truth[~blanked], predicted[~blanked]))
            if truth[blanked].any():
                scores[organ]["blanked"].append(dice(truth[blanked], predicted[blanked]))
    table = {}
    for organ, parts in sorted(scores.items()):
        means = {part: _mean(values) for part, values in parts.items()}
        table[organ] = {"all": means["all"], "clinical_like": means["clinical_like"],
                        "blanked": means.get("blanked"), "blanked_cases": len(parts.get("blanked", []))}
    return table


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None
