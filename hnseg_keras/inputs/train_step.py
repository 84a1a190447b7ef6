"""Augmentation inside the compiled train step, for an accelerator.

The dataset yields raw ``(batch, seed)`` pairs (float32 batch dict at the slice size, int32 [2]
seed) and the train step crops, warps, mixes and packs them before the forward pass, so that work
runs where the step runs instead of on host threads. ``keras.ops`` only: the same step serves
``hnseg train`` on shards (tf.data, TensorFlow) and on an ``hnseg arrays`` file (``arrays.RawBatches``,
numpy batches, also under JAX).
"""

from __future__ import annotations

import keras

from hnseg_keras.inputs import augment, targets
from hnseg_keras.inputs.augment import AugmentConfig


def device_augment(batch: dict, seed, config: AugmentConfig, organ_weights=None):
    """``(x, y)`` from a raw batch: ``augment.augment_batch`` then ``targets.to_keras`` (jit-compatible)."""
    return targets.to_keras(augment.augment_batch(batch, seed, config, organ_weights))


def augmenter(config: AugmentConfig, organ_weights=None):
    """``(batch, seed) -> (x, y)`` with ``config`` and the mixup ``organ_weights`` [O] fixed."""
    weights = None if organ_weights is None else keras.ops.convert_to_tensor(organ_weights, "float32")

    def augment_pair(batch, seed):
        return device_augment(batch, seed, config, weights)

    return augment_pair


def augment_in_train_step(model, augment_pair, example=None) -> None:
    """Make ``model``'s train step turn the data's ``(batch, seed)`` into ``(x, y)`` first.

    Only the training step changes: validation batches are ``(x, y)`` already and the saved model is
    the plain U-Net. Call before ``fit``; calling again replaces the earlier ``augment_pair``.
    ``example``, one raw ``(batch, seed)`` pair, is needed under JAX: its ``fit`` builds the compiled
    loss and metrics from the shapes of the first data batch, which would be the raw one, so they
    are built here from one augmented batch instead (one test step; no weight changes).
    """
    if example is not None:
        model.test_on_batch(*augment_pair(*example))
    elif keras.backend.backend() == "jax":
        raise ValueError("under JAX pass example=(batch, seed) so the compiled loss and metrics can be built")
    step = model.__dict__.setdefault("_unaugmented_train_step", model.train_step)

    def augmented(data):
        batch, seed, _ = keras.utils.unpack_x_y_sample_weight(data)
        return augment_pair(batch, seed)

    if keras.backend.backend() == "jax":  # JAX's trainer passes the model state first
        model.train_step = lambda state, data: step(state, augmented(data))
    else:
        model.train_step = lambda data: step(augmented(data))
