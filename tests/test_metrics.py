"""Epoch-accumulated Dice: pooled counts, annotation masking, organ selection, config round trip."""

import keras
import numpy as np
import pytest

from hnseg_keras.errors import HnsegError
from hnseg_keras.inputs.targets import pack_targets
from hnseg_keras.model.losses import SegmentationLoss
from hnseg_keras.model.metrics import MeanDice, OrganDice, dice_metrics


def _pixels(rows):
    """[B, 2, 2, O] from per-sample, per-organ 4-pixel lists."""
    return np.array(rows, "float32").reshape(len(rows), len(rows[0]), 2, 2).transpose(0, 2, 3, 1)


def _result(metric):
    return float(keras.ops.convert_to_numpy(metric.result()))


def test_organ_dice_pools_counts_over_batches():
    metric = OrganDice(1, 0)
    # Batch 1: truth 1100, prediction 1110 -> TP 2, FP 1, FN 0 (batch Dice 0.8).
    truth = _pixels([[[1, 1, 0, 0]]])
    metric.update_state(pack_targets(truth, truth * 0, np.ones((1, 1))), _pixels([[[0.9, 0.6, 0.7, 0.1]]]))
    # Batch 2: truth 1000, prediction 0000 -> TP 0, FP 0, FN 1 (batch Dice 0).
    truth = _pixels([[[1, 0, 0, 0]]])
    metric.update_state(pack_targets(truth, truth * 0, np.ones((1, 1))), _pixels([[[0.4, 0.0, 0.2, 0.3]]]))
    # Pooled: 2 * 2 / (2 * 2 + 1 + 1) = 2/3, not the mean of batch Dice values (0.4).
    assert _result(metric) == pytest.approx(2 / 3)
    metric.reset_state()
    assert _result(metric) == 0.0


def test_unannotated_samples_are_ignored():
    metric = OrganDice(2, 1, threshold=0.5)
    truth = _pixels([[[1, 0, 0, 0], [1, 1, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]])
    pred = _pixels([[[0, 0, 0, 0], [1, 0, 0, 0]], [[1, 1, 1, 1], [1, 1, 1, 1]]])
    annotated = np.array([[1, 1], [1, 0]], "float32")  # organ 1 of sample 1 is not annotated
    metric.update_state(pack_targets(truth, truth * 0, annotated), pred)
    # Organ 1 counts only sample 0: TP 1, FN 1 -> 2 / 3; sample 1's four predicted pixels are not FPs.
    assert _result(metric) == pytest.approx(2 / 3)


def test_threshold_is_inclusive():
    metric = OrganDice(1, 0, threshold=0.5)
    truth = _pixels([[[1, 0, 0, 0]]])
    metric.update_state(pack_targets(truth, truth * 0, np.ones((1, 1))), _pixels([[[0.5, 0.49, 0, 0]]]))
    assert _result(metric) == 1.0


def test_mean_dice_skips_organs_without_annotated_foreground():
    metric = MeanDice(3)
    truth = _pixels([[[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]])
    pred = _pixels([[[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]])
    # Organ 0: Dice 2/3. Organ 1: annotated but absent (no foreground) -> skipped.
    # Organ 2: not annotated (its truth is ignored) -> skipped.
    metric.update_state(pack_targets(truth, truth * 0, np.array([[1, 1, 0]], "float32")), pred)
    assert _result(metric) == pytest.approx(2 / 3)
    # A second batch where organ 1 has foreground and is found exactly: mean of 2/3 and 1.
    truth2 = _pixels([[[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]]])
    metric.update_state(pack_targets(truth2, truth2 * 0, np.ones((1, 3), "float32")), truth2)
    assert _result(metric) == pytest.approx((2 / 3 + 1) / 2)
    assert _result(MeanDice(3)) == 0.0


def test_sample_weight_scales_counts():
    metric = OrganDice(1, 0)
    truth = _pixels([[[1, 1, 0, 0]], [[1, 0, 0, 0]]])
    pred = _pixels([[[1, 1, 1, 0]], [[0, 0, 0, 0]]])
    metric.update_state(pack_targets(truth, truth * 0, np.ones((2, 1))), pred, sample_weight=np.array([1.0, 0.0]))
    assert _result(metric) == pytest.approx(0.8)  # only sample 0: TP 2, FP 1


def test_dice_metrics_names_and_config_round_trip():
    metrics = dice_metrics(["BrainStem", "Mandible"], threshold=0.4)
    assert [m.name for m in metrics] == ["dice", "dice_BrainStem", "dice_Mandible"]
    for metric in metrics:
        clone = keras.metrics.deserialize(keras.metrics.serialize(metric))
        assert type(clone) is type(metric) and clone.get_config() == metric.get_config()
    assert metrics[2].get_config() == {"num_organs": 2, "threshold": 0.4, "name": "dice_Mandible",
                                       "organ_index": 1}
    with pytest.raises(HnsegError, match="organ_index"):
        OrganDice(2, 2)


def test_fit_logs_val_dice():
    inputs = keras.Input((4, 4, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1, activation="sigmoid")(inputs))
    model.compile(optimizer="sgd", loss=SegmentationLoss(2, focal_weight=0.0),
                  metrics=dice_metrics(["BrainStem", "Chiasm"]))
    x = np.ones((2, 4, 4, 1), "float32")
    masks = np.zeros((2, 4, 4, 2), "float32")
    masks[:, :2, :2, 0] = 1
    y = pack_targets(masks, masks, np.ones((2, 2)))
    history = model.fit(x, y, validation_data=(x, y), epochs=1, verbose=0)
    assert {"loss", "dice", "dice_BrainStem", "val_dice", "val_dice_Chiasm"} <= set(history.history)
