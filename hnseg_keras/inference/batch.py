"""Folder prediction: which cases are finished, one case at a time, failures reported by case.

A case counts as finished when its label map exists (``write_segmentation`` renames it into place
last), so a rerun skips finished cases and redoes the rest; ``--continue-on-error`` goes on past a
failing case and lists every failure with its reason at the end.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from hnseg_keras.data import layouts
from hnseg_keras.data.cases import Case, write_label_map
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import owned_by_live_process, refuse_existing, replace_folder, temp_name
from hnseg_keras.inference import prediction, slicer, visual
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
                       dicom_series: Path | None = None) -> list[Path]:
    """Write the label map, PDDCA masks and RTSTRUCT named in ``paths`` (see `output_paths`), all or none.

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
        labels = seg.label_map()
        write_label_map(labels, case, staged["label_map"])
        slicer.write_segmentation(labels, seg.organs, case, staged["slicer"], catalogue=seg.catalogue)
        if "preview" in paths:
            visual.write_case_preview(case, seg, staged["preview"])
        if "masks" in paths:
            prediction.write_structures(seg, case, staged["masks"])
        if "rtstruct" in paths and dicom_series is not None:
            prediction.write_rtstruct(seg, case, dicom_series, staged["rtstruct"])
        for key in sorted(staged, key=lambda k: k == "label_map"):  # the label map last
            if staged[key].exists():
                paths[key].parent.mkdir(parents=True, exist_ok=True)
                (replace_folder if staged[key].is_dir() else os.replace)(staged[key], paths[key])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return [path for path in paths.values() if path.exists()]


def remove_dead_staging(out_dir: Path) -> None:
    """Delete staging folders of killed predict runs (never those of a live process)."""
    for stage in out_dir.glob(".*-outputs.*.tmp") if out_dir.is_dir() else ():
        if stage.is_dir() and not owned_by_live_process(stage):
            shutil.rmtree(stage, ignore_errors=True)


def predict_all(items: list[CaseInput], predictor: Predictor, out_dir: Path, args) -> list[tuple[str, str]]:
    """Predict and write each case; failures as (case id, reason) with --continue-on-error, else raised."""
    total_seconds, total_slices, failures = 0.0, 0, []
    progress = Progress("predict", len(items))
    for number, item in enumerate(items, 1):
        started = time.perf_counter()
        try:
            seg, written = predict_one(item, predictor, out_dir, args, f"[{number}/{len(items)}] {item.case_id}")
        except Exception as error:  # noqa: BLE001  (any failure of one case is reported by case)
            if not args.continue_on_error:
                raise case_error(item, error) from None
            failures.append((item.case_id, str(case_error(item, error)).split(": ", 1)[-1]))
            progress.step(item.case_id, f"failed ({failures[-1][1]})")
            continue
        seconds = time.perf_counter() - started
        total_seconds, total_slices = total_seconds + seconds, total_slices + seg.slices
        progress.step(item.case_id, f"{seg.slices} slices, {seconds:.1f} s ({seg.slices / max(seg.seconds, 1e-9):.1f} "
                      f"slices/s segmentation) -> {', '.join(str(p) for p in written)}")
    done = len(items) - len(failures)
    progress.finish(f"{total_seconds / max(done, 1):.2f} s per case, {total_slices / max(total_seconds, 1e-9):.1f} "
                    f"slices/s overall; label maps, Slicer .seg.nrrd files{' and previews' if args.preview else ''} "
                    f"in {out_dir}" + (f"; {len(failures)} failed" if failures else ""))
    return failures


def predict_one(item: CaseInput, predictor: Predictor, out_dir: Path, args, label: str):
    case = layouts.read_ref(item.ref, ())
    seg = segment_case(case, predictor, args.batch_size, args.tta, args.largest_component,
                       progress=_progress_bar(label))
    paths = output_paths(out_dir, item, args.format, args.pddca_masks, args.preview)
    return seg, write_segmentation(seg, case, paths, args.force, item.series_files)


def case_error(item: CaseInput, error: BaseException) -> HnsegError:
    """One line naming the case for any failure (a TensorFlow op error keeps only its first line)."""
    if isinstance(error, HnsegError):
        text = str(error)
        return error if item.case_id in text or str(item.path) in text else HnsegError(f"case {item.case_id}: {text}")
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return HnsegError(f"case {item.case_id} ({item.path}): {type(error).__name__}: {lines[0][:300] if lines else ''}"
                      .rstrip(": "))
