"""Folder prediction and its outputs: which cases are finished, one case at a time, failures reported
by case, and the writers of a case's files (label map, Slicer file, PDDCA masks, RTSTRUCT, preview).

A case counts as finished when its label map exists (``write_segmentation`` renames it into place
last), so a rerun skips finished cases and redoes the rest; ``--continue-on-error`` goes on past a
failing case and lists every failure with its reason at the end.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hnseg_keras import configs
from hnseg_keras.data import layouts, orientation
from hnseg_keras.data.cases import Case, write_label_map, write_pddca_case
from hnseg_keras.data.organs import colour_of
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import atomic_path, owned_by_live_process, refuse_existing, replace_folder, temp_name
from hnseg_keras.inference import qa, slicer, visual
from hnseg_keras.inference.prediction import (
    FORMATS,
    CaseInput,
    Predictor,
    Segmentation,
    _progress_bar,
    output_paths,
    segment_case,
)
from hnseg_keras.progress import Progress


def case_state(out_dir: Path, item: CaseInput, fmt: str, pddca_masks: bool, force: bool,
               preview: bool = False) -> str:
    """``"todo"`` or ``"done"`` (every output there: skipped unless ``force``) for one case.

    Refuses, always, anything that would overwrite the input or leave ``hnseg evaluate`` two
    predictions of a case (a label map in the other format, a ``<case>/structures`` folder): those are
    never deleted, since they may be the user's own files. The label map is committed last, so one
    without the other requested outputs is an earlier run with other options: refused unless ``force``.
    """
    paths = output_paths(out_dir, item, fmt, pddca_masks, preview)
    for path in paths.values():
        if path.exists() and path.resolve() == item.path.resolve():
            raise HnsegError(f"{path}: is the input itself; choose another --out")
    rivals = [out_dir / f"{item.case_id}.{other}" for other in FORMATS if other != fmt]
    rivals.append(out_dir / item.case_id / "structures")
    for path in rivals:
        if path.exists():
            raise HnsegError(f"{path}: another prediction (or file) of case {item.case_id} is there; "
                             "choose another --out or remove it")
    if force or not paths["label_map"].exists():
        return "todo"
    missing = [path for path in paths.values() if not path.exists()]
    if missing:
        raise HnsegError(f"{paths['label_map']}: exists but {missing[0]} does not (an earlier run with other "
                         "options); pass --force to redo the case or choose another --out")
    return "done"


def write_segmentation(seg: Segmentation, case: Case, paths: dict[str, Path], force: bool = False,
                       dicom_series: Path | None = None, qa_record: dict | None = None) -> list[Path]:
    """Write the label map, PDDCA masks, RTSTRUCT and QA record named in ``paths`` (`output_paths`), all or none.

    ``seg`` and ``case`` are in LPS; every file but the preview is written on the input's own grid and
    storage (``case.storage``), voxel for voxel.

    Everything is written into a per-process staging folder beside the outputs, then renamed into
    place with the label map last: a failure leaves nothing, and an existing label map means its
    case finished. ``force`` replaces existing outputs; without it an existing one is refused.
    """
    out_dir = paths["label_map"].parent
    for key, path in paths.items():
        if key != "label_map" and path.exists() and not force and not paths["label_map"].exists():
            continue  # left by a commit that was killed before its label map: ours to replace
        refuse_existing(path, force)
    stage = temp_name(out_dir / f"{case.case_id}-outputs")
    try:
        staged = {key: stage / path.relative_to(out_dir) for key, path in paths.items()}
        if "preview" in paths:
            visual.write_case_preview(case, seg, staged["preview"])
        seg, case = on_own_grid(seg, case)
        labels = seg.label_map()
        write_label_map(labels, case, staged["label_map"])
        slicer.write_segmentation(labels, seg.organs, case, staged["slicer"], catalogue=seg.catalogue)
        if "qa" in paths:
            configs.write_json_atomic(staged["qa"], qa_record or {})
        if "masks" in paths:
            write_structures(seg, case, staged["masks"])
        if "rtstruct" in paths and dicom_series is not None:
            write_rtstruct(seg, case, dicom_series, staged["rtstruct"])
        for key in sorted(staged, key=lambda k: k == "label_map"):  # the label map last
            if staged[key].exists():
                paths[key].parent.mkdir(parents=True, exist_ok=True)
                (replace_folder if staged[key].is_dir() else os.replace)(staged[key], paths[key])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return [path for path in paths.values() if path.exists()]


def on_own_grid(seg: Segmentation, case: Case) -> tuple[Segmentation, Case]:
    """An LPS segmentation and case moved back onto the input's storage (views where no resampling is needed)."""
    storage = case.storage
    if storage is None or storage.is_canonical:
        return seg, case
    moved = dataclasses.replace(seg, masks=storage.to_storage(seg.masks).astype(bool, copy=False),
                                winner=storage.to_storage(seg.winner))
    return moved, orientation.stored_case(case)


def remove_dead_staging(out_dir: Path) -> None:
    """Delete staging folders of killed predict runs (never those of a live process)."""
    for stage in out_dir.glob(".*-outputs.*.tmp") if out_dir.is_dir() else ():
        if stage.is_dir() and not owned_by_live_process(stage):
            shutil.rmtree(stage, ignore_errors=True)


def predict_all(items: list[CaseInput], predictor: Predictor, out_dir: Path, args) -> list[tuple[str, str]]:
    """Predict and write each case; failures as (case id, reason) with --continue-on-error, else raised."""
    total_seconds, total_slices, failures, flagged = 0.0, 0, [], []
    progress = Progress("predict", len(items))
    for number, item in enumerate(items, 1):
        started = time.perf_counter()
        try:
            seg, record, written = predict_one(item, predictor, out_dir, args,
                                               f"[{number}/{len(items)}] {item.case_id}")
        except Exception as error:  # noqa: BLE001  (any failure of one case is reported by case)
            if not args.continue_on_error:
                raise case_error(item, error) from None
            failures.append((item.case_id, str(case_error(item, error)).split(": ", 1)[-1]))
            progress.step(item.case_id, f"failed ({failures[-1][1]})")
            continue
        seconds = time.perf_counter() - started
        total_seconds, total_slices = total_seconds + seconds, total_slices + seg.slices
        checks = record["summary"]
        if checks["failed"]:
            flagged.append((item.case_id, checks["failures"]))
        notes = [f"stored {record['stored_orientation']}", *([seg.grid_note] if seg.grid_note else []),
                 f"QA {'FAILED ' + '; '.join(checks['failures']) if checks['failed'] else 'passed'}"]
        progress.step(item.case_id, f"{seg.slices} slices, {seconds:.1f} s ({seg.slices / max(seg.seconds, 1e-9):.1f} "
                      f"slices/s segmentation), {', '.join(notes)} -> {', '.join(str(p) for p in written)}")
    done = len(items) - len(failures)
    progress.finish(f"{total_seconds / max(done, 1):.2f} s per case, {total_slices / max(total_seconds, 1e-9):.1f} "
                    f"slices/s overall; label maps, Slicer .seg.nrrd files, QA records"
                    f"{' and previews' if args.preview else ''} in {out_dir}"
                    + (f"; {len(failures)} failed" if failures else ""))
    report_qa(flagged, done)
    if getattr(args, "strict_qa", False):
        failures += [(case_id, f"anatomical check failed (--strict-qa): {'; '.join(texts)}")
                     for case_id, texts in flagged]
    return failures


def report_qa(flagged: list[tuple[str, list[str]]], done: int) -> None:
    """The closing QA line: every case with a failed anatomical check, never silence."""
    if not flagged:
        print(f"predict: QA passed on all {done} case(s) (left/right side, volume, empty, pieces)", file=sys.stderr)
        return
    print(f"predict: warning: QA failed on {len(flagged)} of {done} case(s); check these contours before use "
          "(details in <case>.qa.json):", file=sys.stderr)
    for case_id, texts in flagged:
        print(f"  {case_id}: {'; '.join(texts)}", file=sys.stderr)


def predict_one(item: CaseInput, predictor: Predictor, out_dir: Path, args, label: str):
    """Read one case into LPS, segment it, check it, write its outputs: (Segmentation, QA record, paths)."""
    case = layouts.read_ref(item.ref, (), layouts.reading_from_args(args))
    seg = segment_case(case, predictor, args.batch_size, args.tta, args.largest_component,
                       progress=_progress_bar(label))
    if getattr(args, "organs", None):
        seg = seg.subset(args.organs)
    record = qa_record(seg, case, predictor)
    paths = output_paths(out_dir, item, args.format, args.pddca_masks, args.preview)
    return seg, record, write_segmentation(seg, case, paths, args.force, item.series_files, record)


def qa_record(seg: Segmentation, case: Case, predictor: Predictor) -> dict:
    """What ``<case>.qa.json`` holds: the input's storage, what was done to its grid, the anatomical checks."""
    geometry = predictor.training_geometry or {}
    findings = qa.check_case(seg.mask_dict(), case.spacing, case.origin, case.direction, case.ct,
                             geometry.get("organ_volumes_ml"), seg.catalogue)
    storage = case.storage
    return {
        "case_id": case.case_id,
        "stored_orientation": storage.code if storage is not None else orientation.CANONICAL,
        "model_orientation": geometry.get("orientation") or orientation.CANONICAL,
        "oblique_resampled": bool(storage is not None and storage.resampled),
        "in_plane_spacing_mm": [round(float(v), 4) for v in case.spacing[:2]],
        "model_spacing_mm": predictor.slicing.spacing_mm,
        "grid_note": seg.grid_note,
        "organs": list(seg.organs),
        "checks": findings,
        "summary": qa.summarise(findings),
    }


def case_error(item: CaseInput, error: BaseException) -> HnsegError:
    """One line naming the case for any failure (a TensorFlow op error keeps only its first line)."""
    if isinstance(error, HnsegError):
        text = str(error)
        return error if item.case_id in text or str(item.path) in text else HnsegError(f"case {item.case_id}: {text}")
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return HnsegError(f"case {item.case_id} ({item.path}): {type(error).__name__}: {lines[0][:300] if lines else ''}"
                      .rstrip(": "))


def write_structures(seg: Segmentation, case: Case, folder: Path, force: bool = False) -> Path:
    """``folder/structures/<Organ>.nrrd`` uint8 masks (every organ, empty ones too), built then renamed."""
    if folder.exists() and not force:
        raise HnsegError(f"{folder}: already exists; choose another --out or pass --force")
    return write_pddca_case(dataclasses.replace(case, masks=seg.mask_dict()), folder, overwrite=True,
                            with_image=False)


def write_rtstruct(seg: Segmentation, case: Case, series_dir, path: Path, force: bool = False) -> Path:
    """DICOM RTSTRUCT (rt-utils) of the non-empty organs, referencing the CT series in ``series_dir``
    (a folder holding one series, or the series' files: ``CaseInput.series_files``).

    rt-utils wants masks [rows, cols, slices] with slices in its own order (sorted along the slice
    normal); each of its slices is matched to a z index of ``case`` by ImagePositionPatient.
    """
    from hnseg_keras.data.dicom import new_rtstruct

    if path.exists() and not force:
        raise HnsegError(f"{path}: already exists; choose another --out or pass --force")
    try:
        rtstruct = new_rtstruct(series_dir)
    except Exception as error:  # noqa: BLE001  (rt-utils raises bare Exception)
        raise HnsegError(f"{case.case_id}: rt-utils cannot read the DICOM series ({error})") from None
    order = series_z_indices(rtstruct.series_data, case)
    for o, name in enumerate(seg.organs):
        if seg.masks[o].any():
            volume = np.moveaxis(seg.masks[o][order], 0, -1)  # [rows, cols, slices] = [Y, X, rt order]
            rtstruct.add_roi(mask=volume, name=name, color=list(colour_of(name, seg.catalogue)),
                             description="hnseg-keras prediction")
    rtstruct.set_series_description("hnseg-keras prediction")
    stamp_software(rtstruct.ds)
    with atomic_path(path) as temp:
        rtstruct.ds.save_as(str(temp))
    return path


def stamp_software(ds) -> None:
    """Name hnseg-keras (and its version) as the software that made an RTSTRUCT, not the rt-utils defaults."""
    from hnseg_keras import __version__

    ds.Manufacturer = "hnseg-keras"
    ds.ManufacturerModelName = "hnseg-keras"
    ds.SoftwareVersions = __version__
    ds.InstitutionName = ""


def series_z_indices(series_data: Sequence, case: Case) -> np.ndarray:
    """z index of ``case`` for each DICOM slice dataset, from ImagePositionPatient and the case geometry."""
    depth, rows, cols = case.ct.shape
    if len(series_data) != depth:
        raise HnsegError(f"case {case.case_id}: the DICOM folder holds {len(series_data)} images but the CT has "
                         f"{depth} slices; keep one CT series per folder")
    to_index = np.linalg.inv(np.asarray(case.direction, dtype=np.float64).reshape(3, 3) @ np.diag(case.spacing))
    order = []
    for ds in series_data:
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise HnsegError(f"case {case.case_id}: DICOM image {ds.Rows}x{ds.Columns} differs from the CT's "
                             f"{rows}x{cols}; keep one CT series per folder")
        index = to_index @ (np.asarray(ds.ImagePositionPatient, dtype=np.float64) - np.asarray(case.origin))
        z = int(round(index[2]))
        if not 0 <= z < depth or np.abs(index - [0, 0, z]).max() > 0.1:
            raise HnsegError(f"case {case.case_id}: a DICOM slice at {list(ds.ImagePositionPatient)} is off the "
                             "CT grid; keep one CT series per folder")
        order.append(z)
    if len(set(order)) != depth:
        raise HnsegError(f"case {case.case_id}: DICOM slice positions repeat; keep one CT series per folder")
    if not np.isclose(case.spacing[0], case.spacing[1], rtol=1e-4):
        print(f"hnseg predict: warning: case {case.case_id} has non-square pixels {case.spacing[:2]}; rt-utils "
              "assumes square pixels, so check the RTSTRUCT contours", file=sys.stderr)
    return np.asarray(order)


# ----------------------------------------------------------------------------- CLI
