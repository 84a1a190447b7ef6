"""Epoch-accumulated Dice metrics on the packed target of ``targets.py``.

Dice per organ is ``2 TP / (2 TP + FP + FN)`` with TP, FP, FN summed over every annotated pixel seen
in the epoch (pixels of samples where the organ is not annotated are ignored), so a small organ's
score is not averaged away by slices where it is absent. Predictions are ``p >= threshold``. Only the
first target is scored (the mixup partner is a training-time device). Counts are float32: exact up to
2**24 pixels, then with 1e-7 relative rounding, harmless for a ratio.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

from hnseg_keras.errors import HnsegError
from hnseg_keras.inputs.targets import unpack_targets


def confusion_counts(y_true, y_pred, num_organs: int, threshold: float = 0.5, sample_weight=None):
    """TP, FP, FN per organ over annotated pixels of the first target.

    Args:
        y_true: packed target [B, H, W, 4O+1].
        y_pred: probabilities [B, H, W, O].
        sample_weight: optional [B] weight of each sample's pixels.
    Returns:
        three float32 tensors [O].
    """
    targets = unpack_targets(y_true, num_organs)
    predicted = ops.cast(ops.greater_equal(ops.cast(y_pred, "float32"), threshold), "float32")
    weight = targets.annotated[:, None, None, :]  # [B, 1, 1, O]
    if sample_weight is not None:
        weight = weight * ops.reshape(ops.cast(sample_weight, "float32"), (-1, 1, 1, 1))
    truth = targets.masks
    true_positives = ops.sum(weight * predicted * truth, axis=(0, 1, 2))
    false_positives = ops.sum(weight * predicted * (1.0 - truth), axis=(0, 1, 2))
    false_negatives = ops.sum(weight * (1.0 - predicted) * truth, axis=(0, 1, 2))
    return true_positives, false_positives, false_negatives


class _DiceCounts(keras.metrics.Metric):
    """Accumulates per-organ TP, FP, FN [O] over the epoch."""

    def __init__(self, num_organs: int, threshold: float = 0.5, name: str = "dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_organs = int(num_organs)
        self.threshold = float(threshold)
        self.true_positives = self._counter("true_positives")
        self.false_positives = self._counter("false_positives")
        self.false_negatives = self._counter("false_negatives")

    def _counter(self, name):
        return self.add_variable(
            shape=(self.num_organs,), initializer="zeros", dtype="float32", aggregation="sum", name=name
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        counts = confusion_counts(y_true, y_pred, self.num_organs, self.threshold, sample_weight)
        for variable, value in zip(
            (self.true_positives, self.false_positives, self.false_negatives), counts, strict=True
        ):
            variable.assign(variable + value)

    def organ_dice(self):
        """Dice per organ [O]; 0 where an organ had neither annotated foreground nor predictions."""
        tp, fp, fn = self.true_positives, self.false_positives, self.false_negatives
        return ops.divide_no_nan(2.0 * tp, 2.0 * tp + fp + fn)

    def get_config(self):
        return {"num_organs": self.num_organs, "threshold": self.threshold, "name": self.name}


@keras.saving.register_keras_serializable(package="hnseg_keras")
class OrganDice(_DiceCounts):
    """Epoch Dice of one organ (channel ``organ_index``), pooled over annotated pixels."""

    def __init__(self, num_organs: int, organ_index: int, threshold: float = 0.5, name: str | None = None):
        super().__init__(num_organs, threshold, name=name or f"dice_{organ_index}")
        if not 0 <= int(organ_index) < self.num_organs:
            raise HnsegError(f"OrganDice: organ_index={organ_index} is outside [0, {self.num_organs})")
        self.organ_index = int(organ_index)

    def result(self):
        return self.organ_dice()[self.organ_index]

    def get_config(self):
        return {**super().get_config(), "organ_index": self.organ_index}


@keras.saving.register_keras_serializable(package="hnseg_keras")
class MeanDice(_DiceCounts):
    """Mean epoch Dice over organs that had annotated ground-truth foreground (TP + FN > 0) this epoch.

    0 when no organ had any. Compiled as ``name="dice"`` it is logged as ``dice`` / ``val_dice``.
    """

    def __init__(self, num_organs: int, threshold: float = 0.5, name: str = "dice"):
        super().__init__(num_organs, threshold, name=name)

    def result(self):
        present = ops.cast(ops.greater(self.true_positives + self.false_negatives, 0.0), "float32")
        return ops.divide_no_nan(ops.sum(present * self.organ_dice()), ops.sum(present))


def dice_metrics(organs: Sequence[str], threshold: float = 0.5) -> list[keras.metrics.Metric]:
    """``dice`` (MeanDice) and one ``dice_<Organ>`` (OrganDice) per organ, in channel order."""
    organs = list(organs)
    metrics = [MeanDice(len(organs), threshold, name="dice")]
    for index, organ in enumerate(organs):
        metrics.append(OrganDice(len(organs), index, threshold, name=f"dice_{organ}"))
    return metrics
