"""The public Python API: prepare data, train, export, load a model, segment a CT, evaluate.

For a notebook or a hospital's own service, so that nothing needs the internal modules::

    from hnseg_keras import api

    result = api.segment("patient01/ct.nii.gz")          # the released model, no training
    manifest = api.prepare("/data/PDDCA", "tfrecords/pddca", spacing_mm=1.0)
    run = api.train("tfrecords/pddca/manifest.json", "runs/pddca-s", variant="S")
    model = api.load_model(api.export(run, "models/pddca-s"))
    result = api.segment("patient01/ct.nii.gz", model)   # a file, a DICOM folder or a SimpleITK image
    result.label_image, result.qa["summary"]

The ``hnseg`` commands run the same stage functions; these wrappers only take plain arguments instead
of command-line flags. Every image goes through the readers' LPS orientation, and every result
comes back on the input's own grid.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hnseg_keras.errors import HnsegError


@dataclass
class SegmentationResult:
    """A segmented CT on its own grid.

    Attributes:
        case_id: the case's name.
        organs: organs in channel order.
        labels: uint8 [Z, Y, X] catalogue label values, in the input's own array order.
        label_image: ``labels`` as a SimpleITK image with the input's geometry (write it with sitk.WriteImage).
        masks: {organ: bool [Z, Y, X]} on the same grid (overlaps kept).
        qa: the anatomical checks and grid notes (what ``hnseg predict`` writes as ``<case>.qa.json``).
    """

    case_id: str
    organs: tuple[str, ...]
    labels: np.ndarray
    label_image: sitk.Image
    masks: dict[str, np.ndarray]
    qa: dict


def prepare(source: str | os.PathLike, out: str | os.PathLike, *, organs: Sequence[str] | None = None,
            spacing_mm: float | None = 1.0, size: int = 280, neighbours: int = 0, workers: int = 1,
            layout: str | None = None, oblique: str = "refuse", organ_map: Mapping[str, str | None] | None = None):
    """Slice the cases under ``source`` (any layout ``hnseg scan`` reads) into shards + manifest in ``out``.

    Resumable like ``hnseg prepare``; ``spacing_mm=None`` keeps each CT's own in-plane spacing.
    Returns the ``Manifest``.
    """
    from hnseg_keras.data import layouts
    from hnseg_keras.data import prepare as preparing
    from hnseg_keras.data.organs import resolve_organs
    from hnseg_keras.data.slicing import SlicingConfig

    slicing = SlicingConfig(size=size, spacing_mm=spacing_mm, neighbours=neighbours)
    config = preparing.PrepareConfig(organs=resolve_organs(organs), slicing=slicing)
    reading = layouts.Reading(layout=layout, organ_map=dict(organ_map or {}), oblique=oblique)
    return preparing.prepare(source, out, config, workers=workers, reading=reading)


def train(data: str | os.PathLike, out: str | os.PathLike, *, variant: str = "S",
          overrides: Sequence[str] = (), config: str | os.PathLike | dict | None = None) -> Path:
    """Train a U-Net variant on a prepared manifest (or an ``hnseg arrays`` .npz); returns the run folder.

    ``overrides`` are ``"key=value"`` strings as for ``hnseg train --set``; a killed run resumes when
    called again with the same ``out``.
    """
    from hnseg_keras.training import trainer
    from hnseg_keras.training.config import load_config

    resolved = load_config(variant, config, list(overrides))
    return trainer.train(dataclasses.replace(resolved, data=str(data), out=str(out)))


def export(run: str | os.PathLike, out: str | os.PathLike, *, which: str = "best") -> Path:
    """Freeze a run folder's ``best`` (or ``final``) model into an export folder; returns ``out``."""
    from hnseg_keras.inference.export import export_run

    export_run(run, out, which)
    return Path(out)


def released_model_path(name: str | None = None) -> Path:
    """The folder of a model the package carries (``hnseg models`` lists them; None: the default one)."""
    from hnseg_keras.inference import released

    return released.path(name)


def load_model(path_or_name: str | os.PathLike | None = None, saved_model: bool = False):
    """A model ready for ``segment``: an export folder, a run folder or a ``.keras`` file (checked as
    ``hnseg predict --model`` checks it), the name of a released model, or None for the default released one."""
    from hnseg_keras.inference.prediction import load_predictor

    if path_or_name is None:
        return load_predictor(released_model_path(), saved_model=saved_model)
    path = Path(path_or_name)
    if not path.exists() and os.sep not in str(path_or_name) and "/" not in str(path_or_name):
        path = released_model_path(str(path_or_name))
    return load_predictor(path, saved_model=saved_model)


def segment(image, model=None, *, organs: Sequence[str] | None = None, tta: bool | None = None,
            largest_component: bool | None = None, oblique: str = "refuse", batch_size: int = 8) -> SegmentationResult:
    """Segment one CT: a file (NRRD / NIfTI / MHA), a DICOM series or PDDCA case folder, a SimpleITK
    image or a ``cases.Case``, with a model from ``load_model`` (None: the default released model). The
    result lies on the input's own grid. ``tta`` / ``largest_component`` None: as the model records."""
    from hnseg_keras.data.cases import image_like
    from hnseg_keras.inference.batch import chosen_organs
    from hnseg_keras.inference.prediction import on_own_grid, segment_and_check

    case = _read(image, oblique)
    model = load_model() if model is None else model
    tta, largest_component = model.post_processing(tta, largest_component)
    wanted = chosen_organs(organs, model) if organs else model.default_organs()
    seg, record = segment_and_check(case, model, wanted, batch_size, tta, largest_component)
    seg, case = on_own_grid(seg, case)
    labels = np.ascontiguousarray(seg.label_map())
    masks = {name: np.ascontiguousarray(mask) for name, mask in zip(seg.organs, seg.masks, strict=True)}
    return SegmentationResult(case.case_id, seg.organs, labels, image_like(labels, case), masks, record)


def evaluate(pred: str | os.PathLike, gt: str | os.PathLike, organs: Sequence[str] | None = None,
             workers: int = 1) -> dict:
    """3D Dice, HD95, ASD and surface Dice of the predictions in ``pred`` against the cases under ``gt``
    (the ``results.json`` content of ``hnseg evaluate``)."""
    from hnseg_keras.evaluation.scores import evaluate as scores

    return scores(pred, gt, organs, workers=workers)


def _read(image, oblique: str):
    """An LPS ``Case`` from what ``segment`` accepts."""
    from hnseg_keras.data import cases, layouts, orientation

    if isinstance(image, cases.Case):
        return image if image.storage is not None else orientation.canonical_case(image, oblique)
    if isinstance(image, sitk.Image):
        return orientation.canonical_case(cases.case_from_image("image", image, Path("<image>")), oblique)
    path = Path(image)
    refs = layouts.find_refs(path, layouts.Reading(oblique=oblique))
    if len(refs) != 1:
        raise HnsegError(f"{path}: holds {len(refs)} cases; segment takes one CT (use `hnseg predict` for folders)")
    return layouts.read_ref(refs[0], (), layouts.Reading(oblique=oblique))
