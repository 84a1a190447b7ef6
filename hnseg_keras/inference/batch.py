"""``hnseg predict``, the runner around the prediction engine: input folders, output files, locks,
progress, failures reported by case, and the writers of a case's files.

Outputs in ``--out``: ``<case>.nrrd`` (or ``.nii.gz``) label map with catalogue label values,
``masks/<case>/structures/<Organ>.nrrd`` (``--pddca-masks``; a separate folder so ``hnseg
evaluate`` sees one prediction per case), ``<case>_rtstruct.dcm`` for a DICOM series input,
``<case>.seg.nrrd`` (the label map with organ names and colours for 3D Slicer, ``slicer.py``),
``<case>.qa.json`` (stored orientation, grid changes and the anatomical checks of ``qa.py``) and,
with ``--preview``, ``preview/<case>.png`` (``visual.py``, drawn in LPS: the patient's left on the
picture's right, anterior up). Every file but the preview lies on the input's own grid and storage.

A case counts as finished when its label map exists (``write_segmentation`` renames it into place
last), so a rerun skips finished cases and redoes the rest; ``--continue-on-error`` goes on past a
failing case and lists every failure with its reason at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hnseg_keras import configs
from hnseg_keras.data import layouts
from hnseg_keras.data.cases import Case, CaseRef, write_label_map, write_pddca_case
from hnseg_keras.data.organs import canonical_name
from hnseg_keras.data.splits import SPLITS
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import (
    FolderLock,
    owned_by_live_process,
    refuse_existing,
    replace_folder,
    temp_name,
)
from hnseg_keras.inference import released, slicer, visual
from hnseg_keras.inference.prediction import (
    Predictor,
    Segmentation,
    load_predictor,
    on_own_grid,
    segment_and_check,
)
from hnseg_keras.inference.rtstruct import write_rtstruct
from hnseg_keras.progress import Progress

FORMATS = ("nrrd", "nii.gz")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseInput:
    """One case to predict: id, path, kind ("image", "pddca", "nnunet" or "dicom"), how to read it and, for
    DICOM, the checked files of its CT series (what the RTSTRUCT references)."""

    case_id: str
    path: Path
    kind: str
    ref: CaseRef | None = None
    series_files: tuple[Path, ...] | None = None


def find_inputs(path: str | os.PathLike, split: str | None = None,
                reading: layouts.Reading | None = None) -> list[CaseInput]:
    """Cases of INPUT in any layout (``layouts.find_refs``); DICOM series are checked here, before any output."""
    from hnseg_keras.data import dicom

    path = Path(path)
    if path.is_file() and split:
        raise HnsegError(f"{path}: --split needs a dataset folder with train/validation/test, not a file")
    refs = layouts.find_refs(path, reading or layouts.Reading())
    if split:
        refs = [ref for ref in refs if ref.split == split]
        if not refs:
            raise HnsegError(f"{path}: no cases in split {split!r}; check the folder names (train/validation/test)")
    items = []
    for ref in refs:
        files = dicom.open_patient(ref.path, ref.series, ref.case_id).geometry.files if ref.layout == "dicom" else None
        items.append(CaseInput(ref.case_id, ref.path, ref.layout, ref, files))
    return items


def output_paths(out_dir: Path, item: CaseInput, fmt: str, pddca_masks: bool,
                 preview: bool = False) -> dict[str, Path]:
    """The files one case will produce."""
    paths = {"label_map": out_dir / f"{item.case_id}.{fmt}", "slicer": out_dir / f"{item.case_id}{slicer.SUFFIX}",
             "qa": out_dir / f"{item.case_id}.qa.json"}
    if preview:
        paths["preview"] = out_dir / "preview" / f"{item.case_id}.png"
    if pddca_masks:
        paths["masks"] = out_dir / "masks" / item.case_id
    if item.kind == "dicom":
        paths["rtstruct"] = out_dir / f"{item.case_id}_rtstruct.dcm"
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="INPUT",
                        help="CT file (NRRD/NIfTI), DICOM series folder, PDDCA case folder or a folder of cases")
    parser.add_argument("--model",
                        help="export folder, .keras file or training run folder; .keras models load in Keras safe "
                             "mode, after their sha256 matched the export's metadata.json. Default: the released "
                             f"model {released.DEFAULT} (`hnseg models` lists what this installation carries)")
    parser.add_argument("--saved-model", action="store_true",
                        help="run the export's TensorFlow SavedModel instead of model.keras. A SavedModel is "
                             "executable code (its graph may run any TensorFlow op); it is loaded only after every "
                             "file matched the sha256 in metadata.json, so use it only with exports you trust")
    parser.add_argument("--out", required=True, help="output folder (one predict at a time; finished cases are skipped)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average with a left-right mirrored pass (default: as the model records, else off)")
    parser.add_argument("--largest-component", action=argparse.BooleanOptionalAction, default=None,
                        help="keep each organ's largest 3D component (default: as the model records, else off)")
    parser.add_argument("--format", choices=FORMATS, default="nrrd", help="label-map format (default nrrd)")
    parser.add_argument("--pddca-masks", action="store_true",
                        help="also write OUT/masks/<case>/structures/<Organ>.nrrd")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per inference batch (default 8)")
    parser.add_argument("--split", choices=SPLITS,
                        help="with a dataset folder: predict only this split")
    parser.add_argument("--force", action="store_true", help="redo finished cases, replacing their outputs")
    parser.add_argument("--continue-on-error", action="store_true",
                        help="go on past a case that fails; list the failures at the end (exit status 1)")
    layouts.add_arguments(parser, organ_options=False)
    parser.add_argument("--preview", action="store_true", help="also write OUT/preview/<case>.png (three views)")
    parser.add_argument("--organs", nargs="+", metavar="ORGAN",
                        help="write only these organs (default: every organ the model segments, less any its "
                             "metadata leaves out for low validation Dice)")
    parser.add_argument("--roi-names", choices=("catalogue", "tg263"), default="catalogue",
                        help="RTSTRUCT ROI names: the catalogue's (Parotid_L) or TG-263 (Parotid_L, Glnd_Submand_L, "
                             "Bone_Mandible, ...)")
    parser.add_argument("--strict-qa", action="store_true",
                        help="a case that fails an anatomical check (left/right side, volume, empty organ, many "
                             "pieces) counts as failed (exit status 1); its outputs and qa.json are still written")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise HnsegError(f"--batch-size {args.batch_size}: must be >= 1")
    items = find_inputs(args.input, args.split, layouts.reading_from_args(args))
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise HnsegError(f"{out_dir}: is a file; give a folder for --out")
    todo = [item for item in items
            if case_state(out_dir, item, args.format, args.pddca_masks, args.force,
                                     args.preview) == "todo"]
    if len(todo) < len(items):
        print(f"skipping {len(items) - len(todo)} finished case(s) in {out_dir} (--force redoes them)", file=sys.stderr)
    if not todo:
        return 0
    predictor = load_predictor(args.model or released.path(), saved_model=args.saved_model)
    args.tta, args.largest_component = predictor.post_processing(args.tta, args.largest_component)
    if args.organs:
        args.organs, args.withheld = chosen_organs(args.organs, predictor), []
    else:  # a released model may leave out an organ it scored too low on; say so at the end
        args.organs = predictor.default_organs()
        args.withheld = predictor.left_out(args.organs)
    if predictor.spacing_unknown():
        log.warning("%s was trained on each CT's own in-plane spacing but does not record which (made before this "
                    "was recorded); CTs are segmented at their own spacing, which is right only near the training "
                    "data's. Train it again with this version to record it", predictor.source)
    with FolderLock(out_dir, "hnseg predict"):
        remove_dead_staging(out_dir)
        failures = predict_all(todo, predictor, out_dir, args)
    if failures:
        print(f"{len(failures)} of {len(todo)} case(s) failed:", file=sys.stderr)
        for case_id, reason in failures:
            print(f"  {case_id}: {reason}", file=sys.stderr)
        return 1
    return 0


def chosen_organs(names: Sequence[str], predictor: Predictor) -> list[str]:
    """``--organs`` as the model's canonical names; a name it does not segment is refused in one line."""
    chosen = []
    for name in names:
        organ = canonical_name(name, predictor.catalogue)
        if organ not in predictor.organs:
            raise HnsegError(f"--organs {name}: the model segments {', '.join(predictor.organs)}; choose among them")
        chosen.append(organ)
    return chosen


def _progress_bar(label: str) -> Callable[[int, int], None] | None:
    """A one-line ``\\r`` bar on an interactive stderr; None (silent) otherwise."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        filled = int(30 * done / max(total, 1))
        end = "\r" if done < total else "\r\x1b[K"
        print(f"{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} slices", end=end, file=sys.stderr)

    return show


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
    # a DICOM case in which no organ was found has no RTSTRUCT (a structure set needs one ROI): not missing
    missing = [path for key, path in paths.items() if not path.exists() and key != "rtstruct"]
    if missing:
        raise HnsegError(f"{paths['label_map']}: exists but {missing[0]} does not (an earlier run with other "
                         "options); pass --force to redo the case or choose another --out")
    return "done"


def write_segmentation(seg: Segmentation, case: Case, paths: dict[str, Path], force: bool = False,
                       dicom_series: Path | None = None, qa_record: dict | None = None,
                       roi_names: str = "catalogue") -> list[Path]:
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
        if "rtstruct" in paths and dicom_series is not None and seg.masks.any():
            write_rtstruct(seg, case, dicom_series, staged["rtstruct"], roi_names=roi_names)
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
                    + (f"; {len(failures)} failed" if failures else "")
                    + f"; model {predictor.source} (left-right TTA {'on' if args.tta else 'off'}, largest "
                      f"component {'on' if args.largest_component else 'off'}"
                    + (f"; left out for low validation Dice: {', '.join(withheld)} (--organs writes them)"
                       if (withheld := getattr(args, "withheld", [])) else "") + ")")
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
    log.warning("QA failed on %d of %d case(s); check these contours before use (details in <case>.qa.json)",
                len(flagged), done)
    for case_id, texts in flagged:
        log.warning("QA %s: %s", case_id, "; ".join(texts))


def predict_one(item: CaseInput, predictor: Predictor, out_dir: Path, args, label: str):
    """Read one case into LPS, segment it, check it, write its outputs: (Segmentation, QA record, paths)."""
    case = layouts.read_ref(item.ref, (), layouts.reading_from_args(args))
    seg, record = segment_and_check(case, predictor, getattr(args, "organs", None), args.batch_size, args.tta,
                                    args.largest_component, progress=_progress_bar(label))
    paths = output_paths(out_dir, item, args.format, args.pddca_masks, args.preview)
    return seg, record, write_segmentation(seg, case, paths, args.force, item.series_files, record,
                                           roi_names=getattr(args, "roi_names", "catalogue"))


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


# ----------------------------------------------------------------------------- CLI
