"""A model knows the in-plane spacing it was trained on and brings every CT to it.

A tiny network is trained on native-spacing slices (~4 mm) of a synthetic volume where size tells the
organ (a 14 mm disc) from look-alikes (4 mm specks of the same HU). On the same CT resampled to a 4x
finer grid, the model sees the specks as organs and half of its field of view is gone, unless the
prediction resamples the CT back to the training spacing.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import SimpleITK as sitk
from keras import layers

from hnseg_keras.data.cases import Case, image_like, write_pddca_case
from hnseg_keras.data.prepare import PrepareConfig, prepare
from hnseg_keras.data.slicing import SlicingConfig, slice_case
from hnseg_keras.inference.prediction import Predictor, segment_case

ORGAN = "BrainStem"
SLICING = SlicingConfig(size=32, spacing_mm=None, empty_slice_share=1.0)
FIELD_MM, DEPTH, SLICE_MM = 128.0, 10, 3.0


def blob_case(case_id: str, spacing: float, seed: int) -> Case:
    """Body ellipse (0 HU) in air, a 14 mm disc organ (+200 HU) and four 4 mm specks (+200 HU) on slices 1-8."""
    rng = np.random.default_rng(seed)
    size = int(round(FIELD_MM / spacing))
    axis = (np.arange(size) - (size - 1) / 2) * spacing
    y, x = np.meshgrid(axis, axis, indexing="ij")
    plane = np.where((x / 55.0) ** 2 + (y / 45.0) ** 2 <= 1.0, 0, -1000).astype(np.int16)
    cx, cy = rng.uniform(10, 25) * rng.choice([-1, 1]), rng.uniform(-15, 15)
    organ = (x - cx) ** 2 + (y - cy) ** 2 <= 14.0 ** 2
    specks, placed = np.zeros_like(organ), 0
    while placed < 4:
        sx, sy = rng.uniform(-40, 40), rng.uniform(-30, 30)
        if (sx - cx) ** 2 + (sy - cy) ** 2 > 25.0 ** 2:
            specks |= (x - sx) ** 2 + (y - sy) ** 2 <= 4.0 ** 2
            placed += 1
    ct = np.repeat(plane[None], DEPTH, axis=0)
    mask = np.zeros(ct.shape, np.uint8)
    ct[1:9][:, organ | specks] = 200
    mask[1:9][:, organ] = 1
    origin = (-(size - 1) / 2 * spacing, -(size - 1) / 2 * spacing, 0.0)
    return Case(case_id, ct, (spacing, spacing, SLICE_MM), origin, masks={ORGAN: mask})


def tiny_network() -> keras.Model:
    ct = keras.Input((SLICING.size, SLICING.size, 1), name="ct")
    x = layers.Rescaling(1 / 200.0)(ct)
    x = layers.Conv2D(8, 5, padding="same", activation="relu")(x)
    x = layers.Conv2D(8, 5, padding="same", activation="relu")(x)
    return keras.Model(ct, layers.Conv2D(1, 1, activation="sigmoid", name="probabilities")(x))


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def resampled(case: Case, spacing: float) -> Case:
    """The same CT on a finer in-plane grid over the same field of view (linear CT, nearest mask)."""
    size = int(round(case.ct.shape[2] * case.spacing[0] / spacing))
    origin = (case.origin[0] - case.spacing[0] / 2 + spacing / 2, case.origin[1] - case.spacing[1] / 2 + spacing / 2,
              case.origin[2])

    def move(array, interpolator, fill):
        image = sitk.Resample(image_like(array, case), (size, size, case.ct.shape[0]), sitk.Transform(),
                              interpolator, origin, (spacing, spacing, case.spacing[2]), case.direction, fill)
        return sitk.GetArrayFromImage(image)

    return Case(case.case_id, move(case.ct, sitk.sitkLinear, -1000.0).astype(np.int16), (spacing, spacing,
                case.spacing[2]), origin, case.direction, {ORGAN: move(case.masks[ORGAN], sitk.sitkNearestNeighbor, 0)})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(tiny model trained on ~4 mm native slices, the training geometry its data recorded)."""
    root = tmp_path_factory.mktemp("blobs")
    cases = [blob_case(f"blob_{i}", spacing, seed=i) for i, spacing in enumerate((3.9, 4.0, 4.1, 3.95, 4.05, 4.0))]
    for case in cases[:5]:
        write_pddca_case(case, root / "data" / "train" / case.case_id)
    write_pddca_case(cases[5], root / "data" / "validation" / cases[5].case_id)
    manifest = prepare(root / "data", root / "shards", PrepareConfig(organs=(ORGAN,), slicing=SLICING))
    examples = [example for case in cases for example in slice_case(case, (ORGAN,), SLICING)]
    images = np.stack([e["image"] for e in examples]).astype("float32")
    masks = np.stack([e["masks"] for e in examples]).astype("float32")
    keras.utils.set_random_seed(0)
    model = tiny_network()
    model.compile(keras.optimizers.Adam(0.01), "binary_crossentropy")
    model.fit(images, masks, batch_size=8, epochs=60, verbose=0)
    return model, manifest.training_geometry()


def test_the_manifest_records_the_native_spacings_of_its_train_cases(trained):
    _, geometry = trained
    assert geometry["orientation"] == "LPS" and geometry["spacing_mm"] is None
    assert geometry["native_spacing_mm"] == {"median": 4.0, "min": 3.9, "max": 4.1, "cases": 5}
    low, high = geometry["organ_volumes_ml"][ORGAN]  # a 14 mm disc over 8 slices of 3 mm: ~14.8 mL
    assert 13.0 < low <= high < 16.5


def test_a_4x_finer_ct_is_resampled_to_the_training_spacing_and_scores_the_same(trained):
    model, geometry = trained
    predictor = dataclasses.replace(Predictor.from_keras_model(model, (ORGAN,), SLICING),
                                    training_geometry=geometry)
    test = blob_case("test", 4.0, seed=99)
    fine = resampled(test, 1.0)
    own = segment_case(test, predictor)
    finer = segment_case(fine, predictor)
    assert own.grid_note == "" and "resampled to the training median 4 mm" in finer.grid_note
    own_dice = dice(own.masks[0], test.masks[ORGAN])
    fine_dice = dice(finer.masks[0], fine.masks[ORGAN])
    assert own_dice >= 0.8, own_dice
    assert abs(own_dice - fine_dice) <= 0.05, (own_dice, fine_dice)
    # What a model without the record does: it slices the 1 mm CT at 1 mm and misses.
    blind = dataclasses.replace(predictor, training_geometry=None)
    assert blind.spacing_unknown()
    assert dice(segment_case(fine, blind).masks[0], fine.masks[ORGAN]) < own_dice - 0.3


def test_a_fixed_spacing_model_notes_the_resampling_and_keeps_a_matching_ct():
    predictor = Predictor((ORGAN,), SlicingConfig(size=32, spacing_mm=1.0), 1, "test", lambda batch: batch)
    assert predictor.slicing_for((1.005, 0.995, 2.5)) == (predictor.slicing, "")
    slicing, note = predictor.slicing_for((0.7, 0.7, 2.5))
    assert slicing.spacing_mm == 1.0 and note == "in-plane 0.7 x 0.7 mm resampled to the model's 1 mm"
    assert not predictor.spacing_unknown()
