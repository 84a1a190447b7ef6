"""3D evaluation: Dice, HD95, average surface distance and surface Dice per case and organ.

Masks are bool ``[z, y, x]``; spacing tuples are SimpleITK order ``(x, y, z)`` in mm and are
reversed before the distance transform, so every distance is in mm on the anisotropic grid.
Definitions (also written into results.json):

- surface: voxels of a mask with at least one 6-neighbour outside it (outside the volume counts
  as outside). Distances are between surface voxel centres, exact Euclidean, in mm.
- HD95: max of the two directed 95th percentiles (numpy's linear interpolation), as in MONAI and
  DeepMind's surface-distance; percentile=100 gives the classic Hausdorff distance.
- ASD: symmetric mean, pooled over both surfaces: (sum d(P->G) + sum d(G->P)) / (|S_P| + |S_G|).
- surface Dice @ tol (Nikolov et al. 2018): share of both surfaces within tol mm of the other.
  Approximation: every surface voxel weighs the same (Nikolov weight surfels by their area).
- empty masks: both empty -> Dice 1, HD95 0, ASD 0, surface Dice 1 (correct absence; flagged);
  exactly one empty -> Dice 0, surface Dice 0, HD95 = ASD = NaN (null in JSON, flagged, counted
  in the table, left out of the distance means).
- seed2d (the seed paper's protocol): 2D Dice per axial slice, averaged over the slices where
  the ground-truth organ is present, pooled over all slices of all cases.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from scipy import ndimage

from hnseg_keras.data import layouts
from hnseg_keras.data import organs as organ_catalogue
from hnseg_keras.errors import HnsegError
from hnseg_keras.evaluation import plots
from hnseg_keras.evaluation.reports import (  # noqa: F401  (re-exported: the stage's API)
    METRICS,
    RESULT_FILES,
    format_csv,
    format_markdown,
    write_results,
)
from hnseg_keras.progress import Progress

DEFINITIONS = {
    "surface": "mask voxels with a 6-neighbour outside the mask (outside the volume counts as outside)",
    "dice": "3D Dice 2|P&G| / (|P| + |G|) over the whole volume",
    "hd95_mm": "max of the two directed 95th percentiles of surface-to-surface distances (mm, spacing-aware)",
    "hausdorff_mm": "classic Hausdorff distance: max of the two directed maxima (mm)",
    "asd_mm": "symmetric average surface distance pooled over both surfaces (mm)",
    "surface_dice": "share of both surfaces within the organ tolerance of the other (Nikolov et al. 2018); "
    "surface voxels weighted uniformly",
    "dice2d_seed": "2D Dice per axial slice, averaged over slices where the ground-truth organ is present, "
    "pooled over all slices of all cases (seed paper protocol)",
    "empty": "both empty: Dice 1, HD95 0, ASD 0, surface Dice 1; one empty: Dice 0, surface Dice 0, "
    "HD95/ASD null and left out of their means",
    "summary": "per organ: mean, std (ddof=1) and median over cases; mean row: mean of the organ means",
}


# ---------------------------------------------------------------- metric core (numpy) ----


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """3D Dice of two bool masks of the same shape; 1.0 when both are empty."""
    pred, gt = pred.astype(bool, copy=False), gt.astype(bool, copy=False)
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(gt))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & gt)) / total


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Tight bounding box of a mask as slices, None for an empty mask (projections, no nonzero list)."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=others))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _union_crop(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cropped to their union bounding box and zero-padded by one voxel.

    Cropping is exact for surface distances: every surface voxel lies in the box and the
    Euclidean distance transform is not restricted to paths inside the array.
    """
    boxes = [b for b in (bounding_box(pred), bounding_box(gt)) if b is not None]
    box = tuple(slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes)) for i in range(pred.ndim))
    return np.pad(pred[box], 1), np.pad(gt[box], 1)


def surface(mask: np.ndarray) -> np.ndarray:
    """bool mask of the voxels of ``mask`` that have a 6-neighbour outside it (border padded)."""
    mask = mask.astype(bool, copy=False)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (each pred surface voxel -> gt surface, gt -> pred).

    Args:
        pred, gt: bool [Z, Y, X], both non-empty.
        spacing: voxel size (x, y, z) in mm.
    """
    if not (pred.any() and gt.any()):
        raise ValueError("surface distances need two non-empty masks")
    sampling = tuple(float(s) for s in reversed(tuple(spacing)))
    pred, gt = _union_crop(pred.astype(bool, copy=False), gt.astype(bool, copy=False))
    surf_pred, surf_gt = surface(pred), surface(gt)
    to_gt = ndimage.distance_transform_edt(~surf_gt, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=sampling)
    return to_gt[surf_pred], to_pred[surf_gt]


def _hd(d_pg: np.ndarray, d_gp: np.ndarray, percentile: float) -> float:
    return float(max(np.percentile(d_pg, percentile), np.percentile(d_gp, percentile)))


def _asd(d_pg: np.ndarray, d_gp: np.ndarray) -> float:
    return float((d_pg.sum() + d_gp.sum()) / (d_pg.size + d_gp.size))


def _sdice(d_pg: np.ndarray, d_gp: np.ndarray, tolerance_mm: float) -> float:
    limit = tolerance_mm + 1e-6  # float slack so a distance equal to the tolerance counts as inside
    return float((np.count_nonzero(d_pg <= limit) + np.count_nonzero(d_gp <= limit)) / (d_pg.size + d_gp.size))


def case_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> dict:
    """All 3D metrics of one organ in one case, from one pair of distance transforms.

    Returns {dice, hd95_mm, asd_mm, surface_dice, hausdorff_mm, flag}; flag is None,
    "both_empty", "pred_empty" or "gt_empty" (conventions in the module docstring).
    """
    pred, gt = pred.astype(bool, copy=False), gt.astype(bool, copy=False)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not (has_pred and has_gt):
        both = not (has_pred or has_gt)
        value = 0.0 if both else math.nan
        return {"dice": 1.0 if both else 0.0, "hd95_mm": value, "asd_mm": value,
                "surface_dice": 1.0 if both else 0.0, "hausdorff_mm": value,
                "flag": "both_empty" if both else ("pred_empty" if has_gt else "gt_empty")}
    d_pg, d_gp = surface_distances(pred, gt, spacing)
    return {"dice": dice(pred, gt), "hd95_mm": _hd(d_pg, d_gp, 95.0), "asd_mm": _asd(d_pg, d_gp),
            "surface_dice": _sdice(d_pg, d_gp, tolerance_mm), "hausdorff_mm": _hd(d_pg, d_gp, 100.0),
            "flag": None}


def hausdorff_95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], percentile: float = 95.0) -> float:
    """Robust Hausdorff distance in mm (max of the directed percentiles); NaN/0 per the empty conventions."""
    if not (pred.any() and gt.any()):
        return 0.0 if not (pred.any() or gt.any()) else math.nan
    return _hd(*surface_distances(pred, gt, spacing), percentile)


def average_surface_distance(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric average surface distance in mm; NaN/0 per the empty conventions."""
    if not (pred.any() and gt.any()):
        return 0.0 if not (pred.any() or gt.any()) else math.nan
    return _asd(*surface_distances(pred, gt, spacing))


def surface_dice(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Surface Dice at ``tolerance_mm`` (uniform surface-voxel weights); 1 both empty, 0 one empty."""
    if not (pred.any() and gt.any()):
        return 1.0 if not (pred.any() or gt.any()) else 0.0
    return _sdice(*surface_distances(pred, gt, spacing), tolerance_mm)


def slice_dice_sum(pred: np.ndarray, gt: np.ndarray) -> tuple[float, int]:
    """Seed-paper protocol pieces: (sum of 2D axial-slice Dice, number of slices) over GT-present slices.

    A slice without ground truth is skipped even when the prediction has voxels there.
    """
    pred, gt = pred.astype(bool, copy=False), gt.astype(bool, copy=False)
    box = bounding_box(gt)
    if box is None:
        return 0.0, 0
    zs = box[0]  # only slices holding ground truth matter; keep full planes for the prediction
    p, g = pred[zs], gt[zs]
    inter = np.count_nonzero(p & g, axis=(1, 2))
    sizes = np.count_nonzero(p, axis=(1, 2)) + np.count_nonzero(g, axis=(1, 2))
    present = np.count_nonzero(g, axis=(1, 2)) > 0
    return float(np.sum(2.0 * inter[present] / sizes[present])), int(np.count_nonzero(present))


def seed2d_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean 2D axial-slice Dice over the slices where ``gt`` is present; NaN when there are none."""
    total, count = slice_dice_sum(pred, gt)
    return total / count if count else math.nan


# ---------------------------------------------------------------- predictions on disk ----

PRED_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")
QA_SUFFIX = ".qa.json"  # hnseg predict's record beside each label map (inference/batch.output_paths)


def find_prediction(pred_dir: Path, case_id: str) -> Path | None:
    """The prediction of one case: ``<id>/structures/`` (PDDCA) or a label map ``<id>.nrrd|.nii.gz|...``."""
    found = [pred_dir / case_id] if (pred_dir / case_id / "structures").is_dir() else []
    found += [pred_dir / f"{case_id}{suffix}" for suffix in PRED_SUFFIXES if (pred_dir / f"{case_id}{suffix}").is_file()]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise HnsegError(f"{pred_dir}: case {case_id} has several predictions ({names}); keep only one")
    return found[0] if found else None


def predicted_organs(pred_dir: Path, case_id: str, pred_path: Path, catalogue=None) -> set[str]:
    """Catalogue organs one prediction covers: its structure files; for a label map the model's organs that
    ``hnseg predict`` recorded in ``<case>.qa.json`` beside it, else the organs whose label occurs in it.

    The model's list also counts an organ predicted empty in this case, which the labels alone would miss.
    """
    from hnseg_keras.data.cases import IMAGE_SUFFIXES

    known = organ_catalogue.CATALOGUE if catalogue is None else catalogue
    if pred_path.is_dir():
        files = [f for f in (pred_path / "structures").iterdir() if f.name.lower().endswith(IMAGE_SUFFIXES)]
        return {organ_catalogue.canonical_name(f.name.split(".")[0], known) for f in files} - {None}
    record = pred_dir / f"{case_id}{QA_SUFFIX}"
    if record.is_file():
        try:
            return set(organ_catalogue.resolve_organs(json.loads(record.read_text())["organs"], known))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise HnsegError(f"{record}: no organ list to read ({error}); pass --organs (with --organs-file "
                             "for organs of your own)") from None
    import SimpleITK as sitk

    values = set(np.unique(sitk.GetArrayFromImage(_read_image(pred_path))).tolist())
    return {name for name, organ in known.items() if organ.label in values}


def _read_image(path: Path):
    """The SimpleITK image of a scalar 3D image file; one line naming the file when it is none."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise HnsegError(f"{path}: unreadable image; re-write the prediction as NRRD or NIfTI") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise HnsegError(f"{path}: prediction must be a scalar 3D image (got {image.GetDimension()}D, "
                         f"{image.GetNumberOfComponentsPerPixel()} components)")
    return image


def _read_on_grid(path: Path, case) -> np.ndarray:
    """Array [Z, Y, X] of an image file in LPS, after checking it lies on the ground-truth CT's (LPS) grid.

    Both sides are compared in LPS (``orientation``), so a prediction stored RAS is scored against a
    ground truth stored LPS voxel for voxel, as long as both cover the same physical grid.
    """
    from hnseg_keras.data import cases, orientation

    image = _read_image(path)
    resampled = case.storage is not None and case.storage.resampled
    array, storage = orientation.canonical_image(image, "resample" if resampled else "refuse", str(path))
    checks = (
        ("size", storage.canonical_size, tuple(reversed(case.ct.shape)), dict(rtol=0.0, atol=0.0)),
        ("spacing", storage.canonical_spacing, case.spacing, dict(rtol=cases.SPACING_RTOL, atol=0.0)),
        ("origin", storage.canonical_origin, case.origin, dict(rtol=0.0, atol=cases.ORIGIN_ATOL_MM)),
        ("direction", storage.canonical_direction, case.direction, dict(rtol=0.0, atol=cases.DIRECTION_ATOL)),
    )
    for what, got, want, tolerance in checks:
        if not np.allclose(got, want, **tolerance):
            raise HnsegError(f"{path}: {what} {tuple(round(v, 4) for v in got)} differs from the ground truth's "
                             f"{tuple(round(v, 4) for v in want)} (case {case.case_id}); predict on the CT's own grid")
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
        raise HnsegError(f"{path}: holds non-integer values; save masks / label maps with integer labels")
    return array


def read_prediction(path: Path, case, organs: Sequence[str], catalogue=None) -> dict[str, np.ndarray]:
    """bool masks [Z, Y, X] per organ; an organ without a structure file or label is predicted empty.

    ``catalogue`` gives label values and names (``organs.read_organs_file``); default the built-in one.
    """
    from hnseg_keras.data.cases import IMAGE_SUFFIXES

    if not path.is_dir():
        labels = _read_on_grid(path, case)
        return {name: labels == organ_catalogue.label_value(name, catalogue) for name in organs}
    masks = {}
    for file in sorted((path / "structures").iterdir()):
        name = organ_catalogue.canonical_name(file.name.split(".")[0], catalogue)
        if name in organs and file.name.lower().endswith(IMAGE_SUFFIXES):
            if name in masks:
                raise HnsegError(f"{file}: a second prediction file for {name}; keep only one")
            masks[name] = _read_on_grid(file, case) != 0
    return masks


# ---------------------------------------------------------------- cases and datasets ----


def evaluate_case(pred: dict[str, np.ndarray], gt, organs: Sequence[str], protocol: str = "3d",
                  catalogue=None) -> dict:
    """Metrics per organ annotated in ``gt`` (a cases.Case); ``pred`` maps organ -> bool [Z, Y, X].

    A missing organ in ``pred`` counts as an empty prediction. With protocol "seed2d" each entry
    also holds ``dice2d`` and the pooled pieces ``dice2d_sum`` / ``dice2d_slices``.
    """
    results = {}
    for organ in organs:
        if organ not in gt.masks:
            continue
        truth = gt.masks[organ].astype(bool, copy=False)
        mask = pred.get(organ)
        mask = np.zeros_like(truth) if mask is None else mask.astype(bool, copy=False)
        if mask.shape != truth.shape:
            raise HnsegError(f"case {gt.case_id}, {organ}: prediction shape {mask.shape} differs from the "
                             f"ground truth's {truth.shape}; predict on the CT's own grid")
        entry = case_metrics(mask, truth, gt.spacing, (catalogue or organ_catalogue.CATALOGUE)[organ].tolerance_mm)
        if protocol == "seed2d":
            total, count = slice_dice_sum(mask, truth)
            entry.update(dice2d=total / count if count else math.nan, dice2d_sum=total, dice2d_slices=count)
        results[organ] = entry
    return results


def _evaluate_one(task: tuple) -> tuple[str, dict, float]:
    """Worker: read one ground-truth case and its prediction, return (case id, metrics, seconds)."""
    case_id, gt_ref, pred_path, organs, protocol, reading = task
    start = time.perf_counter()
    gt = layouts.read_ref(gt_ref, organs, reading)
    pred = read_prediction(pred_path, gt, [o for o in organs if o in gt.masks], reading.catalogue)
    return case_id, evaluate_case(pred, gt, organs, protocol, reading.catalogue), time.perf_counter() - start


def evaluate(pred_dir, gt_root, organs: Sequence[str] | None = None, protocol: str = "3d",
             workers: int = 1, allow_missing: bool = False, reading=None) -> dict:
    """Evaluate every ground-truth case under ``gt_root`` (any layout, ``layouts.Reading``) against
    ``pred_dir``; the results.json dict.

    ``organs`` None scores what was predicted (``predicted_organs`` of any case) where the ground truth
    annotates it, so the organ list is never typed twice; a given list is scored as given.
    """
    reading = reading or layouts.Reading()
    catalogue = reading.catalogue
    chosen = organs is not None
    pred_dir, organs = Path(pred_dir), organ_catalogue.resolve_organs(organs, catalogue) if chosen else ()
    if protocol not in ("3d", "seed2d"):
        raise HnsegError(f"protocol {protocol!r} is unknown; use 3d or seed2d")
    if not pred_dir.is_dir():
        raise HnsegError(f"{pred_dir}: prediction folder not found; give the folder written by hnseg predict")
    refs = [ref for ref in layouts.find_refs(gt_root, reading) if ref.layout != "image"
            and not (ref.layout == "nnunet" and ref.label is None)]
    if not refs:
        raise HnsegError(f"{gt_root}: no ground-truth cases with contours found")
    found = [(ref, find_prediction(pred_dir, ref.case_id)) for ref in refs]
    missing = [ref.case_id for ref, pred_path in found if pred_path is None]
    if missing and not allow_missing:
        raise HnsegError(f"{pred_dir}: no prediction for {len(missing)} case(s): {', '.join(missing)}; "
                         "predict them or pass --allow-missing")
    found = [(ref, pred_path) for ref, pred_path in found if pred_path is not None]
    if not found:
        raise HnsegError(f"{pred_dir}: no prediction matches a ground-truth case id under {gt_root}")
    organs = organs if chosen else _organs_of_predictions(pred_dir, found, catalogue)
    tasks = [(ref.case_id, ref, pred_path, organs, protocol, reading) for ref, pred_path in found]
    per_case = _run_tasks(tasks, workers)
    if not chosen:  # scored: the predicted organs the ground truth annotates
        organs = tuple(organ for organ in organs if any(organ in metrics for metrics in per_case.values()))
        if not organs:
            raise HnsegError(f"{gt_root}: annotates none of the predicted organs; check --gt, or choose with "
                             "--organs")
    return {
        "schema_version": 1, "pred_dir": str(pred_dir), "gt_root": str(gt_root), "protocol": protocol,
        "organs": list(organs), "missing_predictions": missing, "definitions": DEFINITIONS,
        "tolerances_mm": {o: catalogue[o].tolerance_mm for o in organs},
        "summary": summarize(per_case, organs, protocol, catalogue), "cases": per_case,
    }


def _organs_of_predictions(pred_dir: Path, found: list, catalogue) -> tuple[str, ...]:
    """Every organ some prediction covers, in catalogue order: a case lacking one of them scores it missed."""
    covered = set().union(*(predicted_organs(pred_dir, ref.case_id, pred_path, catalogue)
                            for ref, pred_path in found))
    if not covered:
        raise HnsegError(f"{pred_dir}: the predictions hold no organ of the catalogue (no structure files, "
                         f"{QA_SUFFIX} records or known labels); choose with --organs")
    return tuple(name for name in catalogue if name in covered)


def _run_tasks(tasks: list[tuple], workers: int) -> dict[str, dict]:
    """Run the per-case tasks (in worker processes when workers > 1), printing progress to stderr."""
    results, count = {}, len(tasks)
    progress = Progress("evaluate", count)
    parallel = workers > 1 and count > 1
    with ProcessPoolExecutor(max_workers=min(workers, count)) if parallel else nullcontext() as pool:
        outputs = pool.map(_evaluate_one, tasks) if parallel else map(_evaluate_one, tasks)
        for case_id, metrics, seconds in outputs:
            results[case_id] = metrics
            progress.step(case_id, f"{seconds:.1f} s")
    progress.finish()
    return results


# ---------------------------------------------------------------- tables and files ----


def _stats(values: list[float]) -> dict:
    """mean / std (ddof=1) / median over the finite values; None where undefined (JSON-safe)."""
    finite = np.array([v for v in values if not math.isnan(v)], dtype=np.float64)
    if finite.size == 0:
        return {"mean": None, "std": None, "median": None, "n": 0}
    std = float(np.std(finite, ddof=1)) if finite.size > 1 else None
    return {"mean": float(finite.mean()), "std": std, "median": float(np.median(finite)), "n": int(finite.size)}


def summarize(per_case: dict[str, dict], organs: Sequence[str], protocol: str, catalogue=None) -> dict:
    """Per-organ rows (n, flags, stats per metric) and a ``mean`` row of the organ means (Table 2 layout)."""
    rows: dict[str, dict] = {}
    for organ in organs:
        entries = [metrics[organ] for metrics in per_case.values() if organ in metrics]
        row = {"n": len(entries), "tolerance_mm": (catalogue or organ_catalogue.CATALOGUE)[organ].tolerance_mm,
               "no_surface": sum(e["flag"] in ("pred_empty", "gt_empty") for e in entries),
               "both_empty": sum(e["flag"] == "both_empty" for e in entries)}
        row.update({m: _stats([e[m] for e in entries]) for m in METRICS})
        if protocol == "seed2d":
            slices = sum(e["dice2d_slices"] for e in entries)
            mean = sum(e["dice2d_sum"] for e in entries) / slices if slices else None
            row["dice2d_seed"] = {"mean": mean, "slices": slices}
        rows[organ] = row
    metrics = METRICS + (("dice2d_seed",) if protocol == "seed2d" else ())
    means = {}
    for m in metrics:
        values = [r[m]["mean"] for r in rows.values() if r[m]["mean"] is not None]
        means[m] = {"mean": float(np.mean(values)) if values else None, "organs": len(values)}
    rows["mean"] = {"n": len(per_case), **means}  # n = evaluated cases
    return rows


def add_arguments(parser) -> None:
    parser.add_argument("--pred", required=True, help="prediction folder: <case>/structures/*.nrrd or <case>.nrrd")
    parser.add_argument("--gt", required=True, help="ground truth: PDDCA case folders (splits allowed), a DICOM tree "
                        "with RTSTRUCTs or an nnU-Net raw dataset")
    parser.add_argument("--organs", nargs="+", default=None,
                        help="organs to evaluate (default: those predicted that the ground truth annotates; "
                             "from each label map's <case>.qa.json, else its labels, or the structure files)")
    parser.add_argument("--protocol", choices=("3d", "seed2d"), default="3d",
                        help="seed2d adds the seed paper's per-slice 2D Dice beside the 3D metrics")
    parser.add_argument("--out", default=None, help="output folder (default: PRED/evaluation)")
    parser.add_argument("--force", action="store_true", help="overwrite existing results")
    parser.add_argument("--allow-missing", action="store_true", help="skip ground-truth cases without prediction")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes (cases)")
    layouts.add_arguments(parser)
    parser.add_argument("--plots", action="store_true", help="also write box plots per organ and metric (PNG)")


def run(args) -> int:
    out_dir = Path(args.out) if args.out else Path(args.pred) / "evaluation"
    existing = [name for name in RESULT_FILES if (out_dir / name).exists()]
    if existing and not args.force:  # fail before the (slow) evaluation, not after it
        raise HnsegError(f"{out_dir / existing[0]}: results already exist; pass --force or choose another --out")
    if not Path(args.gt).is_dir():
        raise HnsegError(f"{args.gt}: ground-truth folder not found; give the dataset root with the case folders")
    results = evaluate(args.pred, args.gt, args.organs, args.protocol, max(1, args.workers), args.allow_missing,
                       layouts.reading_from_args(args))
    written = [p.name for p in write_results(results, out_dir, force=args.force)]
    written += [p.name for p in plots.write_all(results, out_dir, args.plots)]
    print(format_markdown(results), end="")
    print(f"evaluate: wrote {', '.join(written)} to {out_dir}", file=sys.stderr)
    return 0
