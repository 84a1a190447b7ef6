"""The prediction engine: a model and one CT volume in, organ masks and their checks out (no files, no CLI).

Per case (read in LPS, ``data.orientation``): the slice grid of training (``slicing.compute_transform``
on the CT alone, at the in-plane spacing the model was trained on: ``Predictor.slicing_for``), every z
slice extracted and run through the model in batches, the per-organ probabilities mapped back onto
the original grid (linear interpolation, then ``>= 0.5``) a few slices at a time. Memory stays
bounded: the volume is held once as int16 CT, once as one bool mask per organ and once as a uint8
"most probable organ" map; probabilities exist only for the slices of one batch (float32).

Overlaps in the label map: where several organ masks cover a voxel, the organ with the highest
probability there wins; where that organ was removed by the largest-component cleanup, the
first remaining organ in channel order wins. Per-organ masks keep overlaps.

``on_own_grid`` moves a result back onto the input's storage; ``qa_record`` runs the anatomical
checks (``qa.py``). Folders, output files and the ``hnseg predict`` command are ``batch.py``'s.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from hnseg_keras import configs
from hnseg_keras.data import orientation
from hnseg_keras.data.cases import Case
from hnseg_keras.data.organs import catalogue_from, flip_permutation, label_value, resolve_organs
from hnseg_keras.data.slicing import (
    AIR_HU,
    SlicingConfig,
    compute_transform,
    extract_slices,
    field_of_view,
    to_field_of_view,
)
from hnseg_keras.errors import HnsegError
from hnseg_keras.inference import qa, trust

THRESHOLD = 0.5
SPACING_SLACK = 0.02  # relative: a CT this close to the training spacing (or its range) is not resampled
MAP_CHUNK = 8  # slices mapped back to the original grid at once (bounds the float32 buffer)


@dataclass
class Predictor:
    """A model with what it needs to slice a CT the way its training data was sliced.

    Attributes:
        organs: canonical names, in output-channel order.
        slicing: the training data's slicing config (size, spacing, neighbours, body threshold).
        channels: input channels (2k+1).
        source: where the model came from (for messages).
        run_batch: int16 HU [N, size, size, C] -> float32 probabilities [N, size, size, O].
        catalogue: organ definitions the model was trained with (label values, colours); None = built-in.
        training_geometry: what the model knows of its training grid (``Manifest.training_geometry``:
            orientation, fixed or native in-plane spacing, organ volume ranges); None for older models.
        prediction: post-processing recorded with the model (``tta``, ``largest_component``: chosen on its
            validation cases for a released model), applied unless the caller chooses; None = both off.
            ``organs``, where recorded, are the organs written by default: a released model leaves out
            an organ it scored too low on to be of use.
    """

    organs: tuple[str, ...]
    slicing: SlicingConfig
    channels: int
    source: str
    run_batch: Callable[[np.ndarray], np.ndarray]
    catalogue: Mapping | None = None
    training_geometry: Mapping | None = None
    prediction: Mapping | None = None

    def post_processing(self, tta: bool | None, largest_component: bool | None) -> tuple[bool, bool]:
        """(tta, largest_component): the caller's choice where given, else what the model records, else off."""
        recorded = self.prediction or {}
        return (bool(recorded.get("tta", False)) if tta is None else bool(tta),
                bool(recorded.get("largest_component", False)) if largest_component is None
                else bool(largest_component))

    def default_organs(self) -> list[str] | None:
        """The organs the model records to write when the caller names none; None = all of them."""
        recorded = (self.prediction or {}).get("organs")
        return None if recorded is None or list(recorded) == list(self.organs) else list(recorded)

    def left_out(self, organs: Sequence[str] | None) -> list[str]:
        """The model's organs that ``organs`` (None = all) does not write."""
        return [] if not organs else [o for o in self.organs if o not in set(organs)]

    def slicing_for(self, spacing: Sequence[float]) -> tuple[SlicingConfig, str]:
        """The slicing for a CT of in-plane ``spacing`` (x, y mm), and a note saying how its grid was changed.

        A model trained at a fixed spacing resamples every CT to it. A model trained on each CT's own
        spacing keeps a CT whose spacing lies within its training range, and resamples any other to the
        training median: at 1 mm a parotid is four times wider in pixels than on 4 mm training slices.
        """
        sx, sy = float(spacing[0]), float(spacing[1])
        fixed = self.slicing.spacing_mm
        if fixed is not None:
            if max(abs(sx - fixed), abs(sy - fixed)) <= SPACING_SLACK * fixed:
                return self.slicing, ""
            return self.slicing, f"in-plane {sx:.3g} x {sy:.3g} mm resampled to the model's {fixed:g} mm"
        native = (self.training_geometry or {}).get("native_spacing_mm")
        if not native:
            return self.slicing, ""
        low, high = native["min"] * (1 - SPACING_SLACK), native["max"] * (1 + SPACING_SLACK)
        if low <= sx <= high and low <= sy <= high:
            return self.slicing, ""
        median = float(native["median"])
        return (dataclasses.replace(self.slicing, spacing_mm=median),
                f"in-plane {sx:.3g} x {sy:.3g} mm is outside the training range {native['min']:g}-{native['max']:g} "
                f"mm: resampled to the training median {median:g} mm")

    def spacing_unknown(self) -> bool:
        """A model trained on native spacings that does not record them (made before they were recorded)."""
        return self.slicing.spacing_mm is None and not (self.training_geometry or {}).get("native_spacing_mm")

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


def load_predictor(model_path: str | os.PathLike, saved_model: bool = False) -> Predictor:
    """A Predictor from an export folder, a ``.keras`` file or a run folder.

    An export folder gives its ``model.keras`` (Keras safe mode) unless ``saved_model``: then its
    SavedModel (executable TensorFlow graph) runs, after every file matched metadata.json's sha256
    (``trust.verify_export``). A ``.keras`` file takes its metadata from ``metadata.json`` beside it
    (export folder) or from the run's ``data.json`` and ``config.json`` (run folder).
    """
    from hnseg_keras.inference.model_io import METADATA_FILE, MODEL_FILE, read_metadata, run_metadata

    path = Path(model_path)
    if not path.exists():
        raise HnsegError(f"{path}: model not found; give an export folder, a .keras file or a run folder")
    if path.is_dir() and (path / "saved_model.pb").is_file() and (path.parent / METADATA_FILE).is_file():
        path = path.parent  # the saved_model/ folder inside an export
    if path.is_dir() and (path / METADATA_FILE).is_file():
        metadata = read_metadata(path)
        trust.check_metadata(metadata, str(path))
        trust.verify_export(path, metadata, saved_model)
        if saved_model:
            return _saved_model_predictor(path, metadata)
        return _keras_predictor(path / MODEL_FILE, metadata)
    if saved_model:
        raise HnsegError(f"{path}: --saved-model needs an export folder (metadata.json + saved_model/)")
    if path.is_dir() and (path / "config.json").is_file():
        model_file = next((path / n for n in ("best.keras", "final.keras") if (path / n).is_file()), None)
        if model_file is None:
            raise HnsegError(f"{path}: run folder holds no best.keras or final.keras; train it first")
        return _keras_predictor(model_file, run_metadata(path))
    if path.is_file() and path.suffix == ".keras":
        if (path.parent / METADATA_FILE).is_file():
            metadata = read_metadata(path.parent)
            trust.check_metadata(metadata, str(path.parent))
            trust.verify_export(path.parent, metadata, False, model_file=path.name)
            return _keras_predictor(path, metadata)
        if (path.parent / "config.json").is_file():
            return _keras_predictor(path, run_metadata(path.parent))
        raise HnsegError(f"{path}: no metadata.json or run config.json beside it; keep the .keras file in its "
                         "export or run folder")
    raise HnsegError(f"{path}: not an export folder (metadata.json + saved_model/), a run folder or a .keras file")


def _metadata_parts(metadata: dict) -> tuple[tuple[str, ...], SlicingConfig, int]:
    organs = resolve_organs(metadata["organs"], catalogue_from(metadata.get("organ_definitions")))
    slicing = configs.from_dict(SlicingConfig, metadata["slicing"])
    return organs, slicing, int(metadata["input"]["channels"])


def _keras_predictor(path: Path, metadata: dict) -> Predictor:
    from hnseg_keras.inference.model_io import load_keras_model, size_multiple_of

    organs, slicing, channels = _metadata_parts(metadata)
    model = load_keras_model(path)
    trust.check_signature(model.input_shape, model.output_shape, metadata, str(path))
    predictor = Predictor.from_keras_model(model, organs, slicing, str(path), size_multiple_of(model))
    return dataclasses.replace(predictor, catalogue=catalogue_from(metadata.get("organ_definitions")),
                               training_geometry=metadata.get("training_geometry"),
                               prediction=metadata.get("prediction"))


def _saved_model_predictor(folder: Path, metadata: dict) -> Predictor:
    """The export's SavedModel (call only after ``trust.verify_export(..., saved_model=True)``)."""
    import tensorflow as tf

    organs, slicing, channels = _metadata_parts(metadata)
    try:
        loaded = tf.saved_model.load(str(folder / metadata.get("saved_model", "saved_model")))
        signature = loaded.signatures["serve_int16"]
    except Exception as error:  # noqa: BLE001  (TensorFlow raises many types for a bad SavedModel)
        text = str(error).strip().splitlines()
        raise HnsegError(f"{folder}: cannot load the SavedModel ({text[0][:200] if text else type(error).__name__}); "
                         "re-export it with `hnseg export`") from None
    trust.check_signature(*trust.saved_model_shapes(signature), metadata, str(folder))

    def run_batch(batch, _keep_alive=loaded):
        return signature(ct=tf.constant(batch))["probabilities"].numpy()

    return Predictor(organs, slicing, channels, str(folder), run_batch, catalogue_from(metadata.get("organ_definitions")),
                     metadata.get("training_geometry"), metadata.get("prediction"))


# ----------------------------------------------------------------------------- one case


@dataclass
class Segmentation:
    """The result for one case on its original grid.

    Attributes:
        masks: bool [O, Z, Y, X], one mask per organ (channel order of ``organs``).
        winner: uint8 [Z, Y, X], channel of the most probable organ (meaningful where a mask is set).
        seconds: wall time of slicing, inference and mapping back; slices: number of z slices.
        grid_note: how the CT's in-plane grid was changed for the model ("" when it was not).
    """

    case_id: str
    organs: tuple[str, ...]
    masks: np.ndarray
    winner: np.ndarray
    seconds: float
    slices: int
    catalogue: Mapping | None = None
    grid_note: str = ""

    def subset(self, organs: Sequence[str]) -> Segmentation:
        """Only ``organs`` (in the model's channel order); a voxel won by a dropped organ goes to a kept one."""
        keep = [o for o, name in enumerate(self.organs) if name in set(organs)]
        lookup = np.full(256, 255, dtype=np.uint8)
        lookup[keep] = np.arange(len(keep), dtype=np.uint8)
        return dataclasses.replace(self, organs=tuple(self.organs[o] for o in keep), masks=self.masks[keep],
                                   winner=lookup[self.winner])

    def mask_dict(self) -> dict[str, np.ndarray]:
        """{organ: uint8 {0,1} [Z, Y, X]} (zero-copy views of ``masks``)."""
        return {name: self.masks[o].view(np.uint8) for o, name in enumerate(self.organs)}

    def label_map(self) -> np.ndarray:
        """uint8 [Z, Y, X] catalogue label values; overlaps go to the most probable organ (module doc)."""
        labels = np.zeros(self.winner.shape, dtype=np.uint8)
        for o in reversed(range(len(self.organs))):
            labels[self.masks[o]] = label_value(self.organs[o], self.catalogue)
        for o, name in enumerate(self.organs):
            labels[(self.winner == o) & self.masks[o]] = label_value(name, self.catalogue)
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
    slicing, grid_note = predictor.slicing_for(case.spacing)
    transform = compute_transform(case, slicing)
    depth, height, width = ct.shape
    masks = np.zeros((len(predictor.organs), depth, height, width), dtype=bool)
    winner = np.zeros((depth, height, width), dtype=np.uint8)
    permutation = flip_permutation(predictor.organs, predictor.catalogue)
    for start in range(0, depth, batch_size):
        stop = min(start + batch_size, depth)
        slices = extract_slices(ct, transform, slicing.neighbours, np.arange(start, stop))
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
    return Segmentation(case.case_id, predictor.organs, masks, winner, time.perf_counter() - started, depth,
                        predictor.catalogue, grid_note)


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


def segment_and_check(case: Case, predictor: Predictor, organs: Sequence[str] | None = None, batch_size: int = 8,
                      tta_flip: bool = False, largest_component: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> tuple[Segmentation, dict]:
    """One LPS case through the model, cut to ``organs`` (default all), with its QA record (``qa_record``)."""
    seg = segment_case(case, predictor, batch_size, tta_flip, largest_component, progress)
    if organs:
        seg = seg.subset(organs)
    record = qa_record(seg, case, predictor)
    record["post_processing"] = {"tta": bool(tta_flip), "largest_component": bool(largest_component)}
    return seg, record


def on_own_grid(seg: Segmentation, case: Case) -> tuple[Segmentation, Case]:
    """An LPS segmentation and case moved back onto the input's storage (views where no resampling is needed)."""
    storage = case.storage
    if storage is None or storage.is_canonical:
        return seg, case
    moved = dataclasses.replace(seg, masks=storage.to_storage(seg.masks).astype(bool, copy=False),
                                winner=storage.to_storage(seg.winner))
    return moved, orientation.stored_case(case)


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
