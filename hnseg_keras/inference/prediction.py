"""``hnseg predict``: CT volumes -> organ contours on each CT's own voxel grid.

Per case: the slice grid of training (``slicing.compute_transform`` on the CT alone), every z
slice extracted and run through the model in batches, the per-organ probabilities mapped back onto
the original grid (linear interpolation, then ``>= 0.5``) a few slices at a time. Memory stays
bounded: the volume is held once as int16 CT, once as one bool mask per organ and once as a uint8
"most probable organ" map; probabilities exist only for the slices of one batch (float32).

Overlaps in the label map: where several organ masks cover a voxel, the organ with the highest
probability there wins; where that organ was removed by the largest-component cleanup, the
first remaining organ in channel order wins. Per-organ masks (``--pddca-masks``) keep overlaps.

Outputs in ``--out``: ``<case>.nrrd`` (or ``.nii.gz``) label map with catalogue label values,
``masks/<case>/structures/<Organ>.nrrd`` (``--pddca-masks``; a separate folder so ``hnseg
evaluate`` sees one prediction per case) and ``<case>_rtstruct.dcm`` for a DICOM series input.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from hnseg_keras import configs
from hnseg_keras.data.cases import (
    IMAGE_SUFFIXES,
    Case,
    find_cases,
    read_case,
    write_label_map,
    write_pddca_case,
)
from hnseg_keras.data.organs import flip_permutation, label_value, resolve_organs
from hnseg_keras.data.slicing import (
    AIR_HU,
    SlicingConfig,
    compute_transform,
    extract_slices,
    field_of_view,
    to_field_of_view,
)
from hnseg_keras.errors import HnsegError

THRESHOLD = 0.5
MAP_CHUNK = 8  # slices mapped back to the original grid at once (bounds the float32 buffer)
FORMATS = ("nrrd", "nii.gz")


@dataclass
class Predictor:
    """A model with what it needs to slice a CT the way its training data was sliced.

    Attributes:
        organs: canonical names, in output-channel order.
        slicing: the training data's slicing config (size, spacing, neighbours, body threshold).
        channels: input channels (2k+1).
        source: where the model came from (for messages).
        run_batch: int16 HU [N, size, size, C] -> float32 probabilities [N, size, size, O].
    """

    organs: tuple[str, ...]
    slicing: SlicingConfig
    channels: int
    source: str
    run_batch: Callable[[np.ndarray], np.ndarray]

    def predict_slices(self, slices: np.ndarray, batch_size: int) -> np.ndarray:
        """Probabilities for int16 [N, H, W, C] slices; the last batch is padded so one shape is traced."""
        out = []
        for start in range(0, len(slices), batch_size):
            batch = np.ascontiguousarray(slices[start:start + batch_size])
            count = len(batch)
            if count < batch_size:
                batch = np.concatenate([batch, np.full((batch_size - count, *batch.shape[1:]), AIR_HU, batch.dtype)])
            out.append(np.asarray(self.run_batch(batch), dtype=np.float32)[:count])
        return np.concatenate(out)

    @classmethod
    def from_keras_model(cls, model, organs: Sequence[str], slicing: SlicingConfig, source: str = "keras model",
                         size_multiple: int = 16) -> Predictor:
        """Wrap an in-memory Keras model; slices are air-padded (centred) to a multiple of ``size_multiple``."""
        from hnseg_keras.inference.model_io import padding_for

        size = slicing.size
        before, after = padding_for(size, size_multiple)  # square slices: same padding on H and W

        def run_batch(batch):
            padded = np.pad(batch.astype(np.float32), [(0, 0), (before, after), (before, after), (0, 0)],
                            constant_values=AIR_HU)
            return np.asarray(model.predict_on_batch(padded))[:, before:before + size, before:before + size]

        return cls(tuple(organs), slicing, 2 * slicing.neighbours + 1, source, run_batch)


# ----------------------------------------------------------------------------- loading


def load_predictor(model_path: str | os.PathLike) -> Predictor:
    """A Predictor from an export folder (SavedModel; TensorFlow only), a ``.keras`` file or a run folder.

    A ``.keras`` file takes its metadata from ``metadata.json`` beside it (export folder) or from
    the run's ``data.json`` and ``config.json`` (run folder).
    """
    from hnseg_keras.inference.model_io import METADATA_FILE, read_metadata, run_metadata

    path = Path(model_path)
    if not path.exists():
        raise HnsegError(f"{path}: model not found; give an export folder, a .keras file or a run folder")
    if path.is_dir() and (path / "saved_model.pb").is_file() and (path.parent / METADATA_FILE).is_file():
        path = path.parent  # the saved_model/ folder inside an export
    if path.is_dir() and (path / METADATA_FILE).is_file():
        return _saved_model_predictor(path, read_metadata(path))
    if path.is_dir() and (path / "config.json").is_file():
        model_file = next((path / n for n in ("best.keras", "final.keras") if (path / n).is_file()), None)
        if model_file is None:
            raise HnsegError(f"{path}: run folder holds no best.keras or final.keras; train it first")
        return _keras_predictor(model_file, run_metadata(path))
    if path.is_file() and path.suffix == ".keras":
        if (path.parent / METADATA_FILE).is_file():
            return _keras_predictor(path, read_metadata(path.parent))
        if (path.parent / "config.json").is_file():
            return _keras_predictor(path, run_metadata(path.parent))
        raise HnsegError(f"{path}: no metadata.json or run config.json beside it; keep the .keras file in its "
                         "export or run folder")
    raise HnsegError(f"{path}: not an export folder (metadata.json + saved_model/), a run folder or a .keras file")


def _metadata_parts(metadata: dict) -> tuple[tuple[str, ...], SlicingConfig, int]:
    organs = resolve_organs(metadata["organs"])
    slicing = configs.from_dict(SlicingConfig, metadata["slicing"])
    return organs, slicing, int(metadata["input"]["channels"])


def _keras_predictor(path: Path, metadata: dict) -> Predictor:
    from hnseg_keras.inference.model_io import load_keras_model, size_multiple_of

    organs, slicing, channels = _metadata_parts(metadata)
    model = load_keras_model(path)
    if model.input_shape[-1] != channels or model.output_shape[-1] != len(organs):
        raise HnsegError(f"{path}: model shape ({model.input_shape[-1]} in, {model.output_shape[-1]} out) does "
                         f"not match its metadata ({channels} channels, {len(organs)} organs)")
    return Predictor.from_keras_model(model, organs, slicing, str(path), size_multiple_of(model))


def _saved_model_predictor(folder: Path, metadata: dict) -> Predictor:
    import tensorflow as tf

    organs, slicing, channels = _metadata_parts(metadata)
    try:
        loaded = tf.saved_model.load(str(folder / metadata.get("saved_model", "saved_model")))
        signature = loaded.signatures["serve_int16"]
    except (OSError, KeyError, ValueError) as error:
        raise HnsegError(f"{folder}: cannot load the SavedModel ({str(error).splitlines()[0][:200]}); "
                         "re-export it with `hnseg export`") from None

    def run_batch(batch, _keep_alive=loaded):
        return signature(ct=tf.constant(batch))["probabilities"].numpy()

    return Predictor(organs, slicing, channels, str(folder), run_batch)


# ----------------------------------------------------------------------------- one case


@dataclass
class Segmentation:
    """The result for one case on its original grid.

    Attributes:
        masks: bool [O, Z, Y, X], one mask per organ (channel order of ``organs``).
        winner: uint8 [Z, Y, X], channel of the most probable organ (meaningful where a mask is set).
        seconds: wall time of slicing, inference and mapping back; slices: number of z slices.
    """

    case_id: str
    organs: tuple[str, ...]
    masks: np.ndarray
    winner: np.ndarray
    seconds: float
    slices: int

    def mask_dict(self) -> dict[str, np.ndarray]:
        """{organ: uint8 {0,1} [Z, Y, X]} (zero-copy views of ``masks``)."""
        return {name: self.masks[o].view(np.uint8) for o, name in enumerate(self.organs)}

    def label_map(self) -> np.ndarray:
        """uint8 [Z, Y, X] catalogue label values; overlaps go to the most probable organ (module doc)."""
        labels = np.zeros(self.winner.shape, dtype=np.uint8)
        for o in reversed(range(len(self.organs))):
            labels[self.masks[o]] = label_value(self.organs[o])
        for o, name in enumerate(self.organs):
            labels[(self.winner == o) & self.masks[o]] = label_value(name)
        return labels


def segment_case(case: Case, predictor: Predictor, batch_size: int = 8, tta_flip: bool = False,
                 largest_component: bool = False, progress: Callable[[int, int], None] | None = None) -> Segmentation:
    """Segment every z slice of ``case.ct`` (int16 HU [Z, Y, X]) and map the result onto its grid.

    ``tta_flip`` averages with a pass on left-right mirrored slices (W axis), whose left/right organ
    channels are swapped back (``organs.flip_permutation``). ``largest_component`` keeps each organ's
    largest 3D (6-connected) component.
    """
    started = time.perf_counter()
    ct = np.asarray(case.ct)
    if ct.ndim != 3:
        raise HnsegError(f"case {case.case_id}: CT must be 3D [Z, Y, X], got shape {ct.shape}")
    if batch_size < 1:
        raise HnsegError(f"--batch-size {batch_size}: must be >= 1")
    transform = compute_transform(case, predictor.slicing)
    depth, height, width = ct.shape
    masks = np.zeros((len(predictor.organs), depth, height, width), dtype=bool)
    winner = np.zeros((depth, height, width), dtype=np.uint8)
    permutation = flip_permutation(predictor.organs)
    for start in range(0, depth, batch_size):
        stop = min(start + batch_size, depth)
        slices = extract_slices(ct, transform, predictor.slicing.neighbours, np.arange(start, stop))
        probs = predictor.predict_slices(slices, batch_size)
        if tta_flip:
            mirrored = predictor.predict_slices(slices[:, :, ::-1], batch_size)[:, :, ::-1]
            probs = (probs + mirrored[..., permutation]) * np.float32(0.5)
        for sub in range(0, stop - start, MAP_CHUNK):
            chunk = probs[sub:sub + MAP_CHUNK]
            _to_grid(chunk, transform, masks, winner, start + sub)
        if progress is not None:
            progress(stop, depth)
    if largest_component:
        for organ_mask in masks:
            keep_largest_component(organ_mask)
    return Segmentation(case.case_id, predictor.organs, masks, winner, time.perf_counter() - started, depth)


def _to_grid(probs: np.ndarray, transform, masks: np.ndarray, winner: np.ndarray, z0: int) -> None:
    """Map float32 [n, H, W, O] slice-grid probabilities of slices z0.. into ``masks`` and ``winner``.

    A plane whose maximum is below the threshold cannot reach it after linear interpolation, and
    cannot win a voxel that some organ reaches, so it is zeroed and skipped by the mapping.
    """
    count = len(probs)
    probs = np.array(probs, dtype=np.float32)
    for i, o in zip(*np.nonzero(probs.max(axis=(1, 2)) < THRESHOLD), strict=True):
        probs[i, :, :, o] = 0.0
    width, height, _ = transform.original_size
    # The in-plane mapping does not depend on z, so a z-chunk maps with a chunk-sized transform.
    chunk_transform = dataclasses.replace(transform, original_size=(width, height, count))
    rows, columns = field_of_view(chunk_transform)  # outside it every probability is 0: nothing to write
    grid = to_field_of_view(probs, chunk_transform, order=1)  # float32 [n, rows, columns, O]
    masks[:, z0:z0 + count, rows, columns] = np.moveaxis(grid >= THRESHOLD, -1, 0)
    winner[z0:z0 + count, rows, columns] = grid.argmax(axis=-1)


def keep_largest_component(mask: np.ndarray) -> None:
    """Keep only the largest 6-connected component of a bool [Z, Y, X] mask, in place (bounding box only)."""
    if not mask.any():
        return
    box = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    view = mask[tuple(box)]
    labels, count = ndimage.label(view)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        view[...] = labels == int(np.argmax(sizes))


def predict_case(ct_case: Case, predictor: Predictor, batch_size: int = 8, tta_flip: bool = False,
                 largest_component: bool = False) -> dict[str, np.ndarray]:
    """{organ: uint8 {0,1} mask [Z, Y, X]} on the original CT grid of ``ct_case`` (see `segment_case`)."""
    return segment_case(ct_case, predictor, batch_size, tta_flip, largest_component).mask_dict()


# ----------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class CaseInput:
    """One case to predict: id, path and kind ("image", "pddca" or "dicom")."""

    case_id: str
    path: Path
    kind: str


def find_inputs(path: str | os.PathLike, split: str | None = None) -> list[CaseInput]:
    """Cases of INPUT: a CT file, a PDDCA case folder, a dataset root (``find_cases``) or a DICOM folder."""
    path = Path(path)
    if not path.exists():
        raise HnsegError(f"{path}: no such file or folder; give a CT file, a DICOM folder, a case folder or a dataset")
    if path.is_file():
        if split:
            raise HnsegError(f"{path}: --split needs a dataset folder with train/validation/test, not a file")
        name = path.name
        suffix = next((s for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True) if name.lower().endswith(s)), "")
        return [CaseInput(name[: len(name) - len(suffix)] if suffix else path.stem, path, "image")]
    refs = find_cases(path)
    if not refs:
        if split:
            raise HnsegError(f"{path}: holds no case folders, so --split {split} selects nothing")
        return [CaseInput(path.name, path, "dicom")]
    if split:
        refs = [ref for ref in refs if ref.split == split]
        if not refs:
            raise HnsegError(f"{path}: no cases in split {split!r}; check the folder names (train/validation/test)")
    return [CaseInput(ref.case_id, ref.path, "pddca") for ref in refs]


def output_paths(out_dir: Path, item: CaseInput, fmt: str, pddca_masks: bool) -> dict[str, Path]:
    """The files one case will produce."""
    paths = {"label_map": out_dir / f"{item.case_id}.{fmt}"}
    if pddca_masks:
        paths["masks"] = out_dir / "masks" / item.case_id
    if item.kind == "dicom":
        paths["rtstruct"] = out_dir / f"{item.case_id}_rtstruct.dcm"
    return paths


def check_outputs(out_dir: Path, item: CaseInput, fmt: str, pddca_masks: bool, force: bool) -> None:
    """Refuse outputs that exist (unless ``force``) and, always, anything that would overwrite the input
    or leave ``hnseg evaluate`` two predictions of a case (a label map in the other format, a
    ``<case>/structures`` folder): those are never deleted, since they may be the user's own files."""
    paths = output_paths(out_dir, item, fmt, pddca_masks)
    for path in paths.values():
        if path.exists() and path.resolve() == item.path.resolve():
            raise HnsegError(f"{path}: is the input itself; choose another --out")
        if path.exists() and not force:
            raise HnsegError(f"{path}: already exists; choose another --out or pass --force")
    rivals = [out_dir / f"{item.case_id}.{other}" for other in FORMATS if other != fmt]
    rivals.append(out_dir / item.case_id / "structures")
    for path in rivals:
        if path.exists():
            raise HnsegError(f"{path}: another prediction (or file) of case {item.case_id} is there; "
                             "choose another --out or remove it")


def write_segmentation(seg: Segmentation, case: Case, paths: dict[str, Path], force: bool = False,
                       dicom_series: Path | None = None) -> list[Path]:
    """Write the label map, PDDCA masks and RTSTRUCT named in ``paths`` (see `output_paths`)."""
    written = [write_label_map(seg.label_map(), case, paths["label_map"], overwrite=force)]
    if "masks" in paths:
        written.append(write_structures(seg, case, paths["masks"], force))
    if "rtstruct" in paths and dicom_series is not None:
        written.append(write_rtstruct(seg, case, dicom_series, paths["rtstruct"], force))
    return written


def write_structures(seg: Segmentation, case: Case, folder: Path, force: bool = False) -> Path:
    """``folder/structures/<Organ>.nrrd`` uint8 masks (every organ, empty ones too), built then renamed."""
    if folder.exists() and not force:
        raise HnsegError(f"{folder}: already exists; choose another --out or pass --force")
    return write_pddca_case(dataclasses.replace(case, masks=seg.mask_dict()), folder, overwrite=True,
                            with_image=False)


def write_rtstruct(seg: Segmentation, case: Case, series_dir: Path, path: Path, force: bool = False) -> Path:
    """DICOM RTSTRUCT (rt-utils) of the non-empty organs, referencing the CT series in ``series_dir``.

    rt-utils wants masks [rows, cols, slices] with slices in its own order (sorted along the slice
    normal); each of its slices is matched to a z index of ``case`` by ImagePositionPatient.
    """
    from rt_utils import RTStructBuilder

    if path.exists() and not force:
        raise HnsegError(f"{path}: already exists; choose another --out or pass --force")
    try:
        rtstruct = RTStructBuilder.create_new(str(series_dir))
    except Exception as error:  # noqa: BLE001  (rt-utils raises bare Exception)
        raise HnsegError(f"{series_dir}: rt-utils cannot read the DICOM series ({error})") from None
    order = series_z_indices(rtstruct.series_data, case)
    for o, name in enumerate(seg.organs):
        if seg.masks[o].any():
            volume = np.moveaxis(seg.masks[o][order], 0, -1)  # [rows, cols, slices] = [Y, X, rt order]
            rtstruct.add_roi(mask=volume, name=name, description="hnseg-keras prediction")
    rtstruct.set_series_description("hnseg-keras prediction")
    tmp = path.parent / f".tmp-{uuid.uuid4().hex[:8]}-{path.name}"
    try:
        rtstruct.ds.save_as(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="INPUT",
                        help="CT file (NRRD/NIfTI), DICOM series folder, PDDCA case folder or a folder of cases")
    parser.add_argument("--model", required=True, help="export folder, .keras file or training run folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--tta", action="store_true", help="average with a left-right mirrored pass")
    parser.add_argument("--largest-component", action="store_true", help="keep each organ's largest 3D component")
    parser.add_argument("--format", choices=FORMATS, default="nrrd", help="label-map format (default nrrd)")
    parser.add_argument("--pddca-masks", action="store_true",
                        help="also write OUT/masks/<case>/structures/<Organ>.nrrd")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per inference batch (default 8)")
    parser.add_argument("--split", choices=("train", "validation", "test"),
                        help="with a dataset folder: predict only this split")
    parser.add_argument("--force", action="store_true", help="replace existing outputs")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise HnsegError(f"--batch-size {args.batch_size}: must be >= 1")
    items = find_inputs(args.input, args.split)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise HnsegError(f"{out_dir}: is a file; give a folder for --out")
    for item in items:
        check_outputs(out_dir, item, args.format, args.pddca_masks, args.force)
    predictor = load_predictor(args.model)
    total_seconds, total_slices = 0.0, 0
    for number, item in enumerate(items, 1):
        started = time.perf_counter()
        case = read_case(item.path, organs=())
        seg = segment_case(case, predictor, args.batch_size, args.tta, args.largest_component,
                           progress=_progress_bar(f"[{number}/{len(items)}] {item.case_id}"))
        paths = output_paths(out_dir, item, args.format, args.pddca_masks)
        written = write_segmentation(seg, case, paths, args.force, item.path if item.kind == "dicom" else None)
        seconds = time.perf_counter() - started
        total_seconds, total_slices = total_seconds + seconds, total_slices + seg.slices
        print(f"[{number}/{len(items)}] {case.case_id}: {seg.slices} slices, {seconds:.1f} s "
              f"({seg.slices / max(seg.seconds, 1e-9):.1f} slices/s segmentation) -> "
              f"{', '.join(str(p) for p in written)}", file=sys.stderr)
    print(f"predicted {len(items)} case(s) in {total_seconds:.1f} s: {total_seconds / len(items):.2f} s per case, "
          f"{total_slices / max(total_seconds, 1e-9):.1f} slices/s overall", file=sys.stderr)
    return 0


def _progress_bar(label: str) -> Callable[[int, int], None] | None:
    """A one-line ``\\r`` bar on an interactive stderr; None (silent) otherwise."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        filled = int(30 * done / max(total, 1))
        end = "\r" if done < total else "\r\x1b[K"
        print(f"{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} slices", end=end, file=sys.stderr)

    return show
