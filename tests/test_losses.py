"""The masked, mixup-aware SegmentationLoss on hand-computed 2x2 examples, each term alone and combined."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from hnseg_keras.inputs.targets import pack_targets
from hnseg_keras.model.losses import BoundaryRamp, SegmentationLoss

# One sample, one organ, 2x2 pixels (row-major).
P = np.array([0.9, 0.2, 0.6, 0.1], "float32").reshape(1, 2, 2, 1)
Y = np.array([1, 0, 1, 0], "float32").reshape(1, 2, 2, 1)
D = np.array([-1, 1, -1, 2], "float32").reshape(1, 2, 2, 1)
ONE = np.ones((1, 1), "float32")


def _value(loss, y_true, y_pred, sample_weight=None):
    return float(keras.ops.convert_to_numpy(loss(y_true, y_pred, sample_weight=sample_weight)))


def focal(num_organs, gamma=2.0):
    return SegmentationLoss(num_organs, focal_weight=1.0, dice_weight=0.0, gamma=gamma)


def soft_dice(num_organs, smooth=1.0):
    return SegmentationLoss(num_organs, focal_weight=0.0, dice_weight=1.0, smooth=smooth)


def batch_dice(num_organs, smooth=1.0, over="batch"):
    return SegmentationLoss(num_organs, focal_weight=0.0, dice_weight=1.0, smooth=smooth, dice_over=over)


def boundary(num_organs):
    return SegmentationLoss(num_organs, focal_weight=0.0, dice_weight=0.0, boundary_weight=1.0)


def _all_losses(num_organs):
    return [
        focal(num_organs),
        soft_dice(num_organs),
        boundary(num_organs),
        SegmentationLoss(num_organs, focal_weight=0.5, dice_weight=2.0, boundary_weight=0.1),
        batch_dice(num_organs),
        batch_dice(num_organs, over="batch_present"),
    ]


def test_focal_by_hand():
    pixels = [
        -((1 - 0.9) ** 2) * math.log(0.9),  # foreground, p = 0.9
        -(0.2**2) * math.log(1 - 0.2),  # background, p = 0.2
        -((1 - 0.6) ** 2) * math.log(0.6),
        -(0.1**2) * math.log(1 - 0.1),
    ]
    y = pack_targets(Y, D, ONE)
    assert _value(focal(1), y, P) == pytest.approx(sum(pixels) / 4, rel=1e-4)
    assert _value(focal(1, gamma=0.0), y, P) == pytest.approx(
        -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.9)) / 4, rel=1e-4
    )


def test_dice_by_hand():
    # sum(p y) = 1.5, sum(p) = 1.8, sum(y) = 2, smooth 1: 1 - (3 + 1) / (3.8 + 1)
    y = pack_targets(Y, D, ONE)
    assert _value(soft_dice(1), y, P) == pytest.approx(1 - 4 / 4.8, rel=1e-5)
    assert _value(soft_dice(1, smooth=0.0), y, P) == pytest.approx(1 - 3 / 3.8, rel=1e-5)


def test_boundary_by_hand():
    # mean of p * d = (-0.9 + 0.2 - 0.6 + 0.2) / 4
    assert _value(boundary(1), pack_targets(Y, D, ONE), P) == pytest.approx(-0.275, rel=1e-5)


def test_combination_is_the_weighted_sum():
    y = pack_targets(Y, D, ONE)
    parts = [_value(term(1), y, P) for term in (focal, soft_dice, boundary)]
    combined = SegmentationLoss(1, focal_weight=0.5, dice_weight=2.0, boundary_weight=0.1)
    assert _value(combined, y, P) == pytest.approx(0.5 * parts[0] + 2.0 * parts[1] + 0.1 * parts[2], rel=1e-5)


def _two_samples():
    """Sample 0: both organs annotated; sample 1: organ 1 not annotated (its p is 0.9, to be ignored)."""
    masks = np.zeros((2, 2, 2, 2), "float32")
    masks[0, 0, :, 0] = 1  # top row of organ 0
    masks[0, 0, 0, 1] = 1  # one pixel of organ 1
    p = np.zeros((2, 2, 2, 2), "float32")
    p[0, 0, :, 0] = 1.0  # exact on organ 0; nothing on organ 1
    p[1, :, :, 0] = 0.5  # organ 0 absent from sample 1 but predicted at 0.5
    p[1, :, :, 1] = 0.9
    annotated = np.array([[1, 1], [1, 0]], "float32")
    return masks, np.zeros_like(masks), annotated, p


def test_batch_dice_by_hand():
    # Organ 0 over both slices: sum(p y) = 2, sum(p) = 2 + 4 * 0.5, sum(y) = 2 -> 1 - (4 + 1) / (6 + 1).
    # Organ 1 over slice 0 only (slice 1 unannotated): 1 - 1 / (1 + 1). Each annotated pair gets its
    # organ's value: (2 * d0 + d1) / 3.
    masks, dist, annotated, p = _two_samples()
    d0, d1 = 1 - 5 / 7, 0.5
    value = _value(batch_dice(2), pack_targets(masks, dist, annotated), p)
    assert value == pytest.approx((2 * d0 + d1) / 3, rel=1e-5)
    # One slice alone: the same as the per-slice Dice.
    one = pack_targets(Y, D, ONE)
    assert _value(batch_dice(1), one, P) == pytest.approx(_value(soft_dice(1), one, P), rel=1e-6)


def test_batch_dice_asks_less_of_an_absent_slice():
    # The organ is absent from slice 1, predicted at 0.05 there: per slice that slice alone costs
    # 1 - 1 / (0.2 + 1) = 0.17; over the batch it only adds 0.2 to the organ's denominator.
    masks, dist, annotated, p = _two_samples()
    p[1, :, :, 0] = 0.05
    y = pack_targets(masks[..., :1], dist[..., :1], annotated[:, :1])
    per_slice, over_batch = _value(soft_dice(1), y, p[..., :1]), _value(batch_dice(1), y, p[..., :1])
    assert per_slice == pytest.approx((0.0 + (1 - 1 / 1.2)) / 2, rel=1e-5)
    assert over_batch == pytest.approx(1 - 5 / 5.2, rel=1e-5)
    assert over_batch < per_slice / 2


def test_batch_present_leaves_an_organ_absent_from_the_batch_alone():
    # Organ 0 absent from both slices, predicted at 0.05 on all 8 pixels: "batch" costs
    # 1 - 1 / (0.4 + 1) and pushes every pixel down; "batch_present" gives 0 and no gradient.
    masks, dist, annotated, p = _two_samples()
    masks[..., 0] = 0.0
    p[..., 0] = 0.05
    y = pack_targets(masks[..., :1], dist[..., :1], annotated[:, :1])
    y_pred = tf.Variable(p[..., :1])
    values, grads = [], []
    for over in ("batch", "batch_present"):
        with tf.GradientTape() as tape:
            value = batch_dice(1, over=over)(y, y_pred)
        values.append(float(value))
        grads.append(tape.gradient(value, y_pred).numpy())
    assert values[0] == pytest.approx(1 - 1 / 1.4, rel=1e-5)
    assert np.all(grads[0] > 0)
    assert values[1] == 0.0
    assert np.all(grads[1] == 0.0)
    # Where the organ is in the batch, the two are the same Dice.
    masks, dist, annotated, p = _two_samples()
    y = pack_targets(masks, dist, annotated)
    assert _value(batch_dice(2, over="batch_present"), y, p) == pytest.approx(_value(batch_dice(2), y, p), rel=1e-6)


def test_dice_over_is_checked():
    with pytest.raises(ValueError, match="dice_over"):
        SegmentationLoss(1, dice_over="volume")


def test_dice_averages_over_annotated_pairs_only():
    masks, dist, annotated, p = _two_samples()
    # Pairs: (0,0) -> 0; (0,1) -> 1 - 1/2; (1,0) -> 1 - 1/(2+1); (1,1) not annotated.
    expected = (0.0 + 0.5 + 2 / 3) / 3
    assert _value(soft_dice(2), pack_targets(masks, dist, annotated), p) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("index", range(len(_all_losses(1))))
def test_missing_annotation_zero_loss_and_gradient(index):
    masks, dist, annotated, p = _two_samples()
    dist[..., 1] = 5.0  # would matter to the boundary term if organ 1 of sample 1 were counted
    loss = _all_losses(2)[index]
    y = pack_targets(masks, dist, annotated)
    y_pred = tf.Variable(p)
    with tf.GradientTape() as tape:
        value = loss(y, y_pred)
    grad = tape.gradient(value, y_pred).numpy()
    assert np.all(grad[1, ..., 1] == 0.0)
    assert np.any(grad[0] != 0.0) and np.all(np.isfinite(grad))
    changed = p.copy()
    changed[1, ..., 1] = 0.01
    assert _value(loss, y, changed) == pytest.approx(float(value), rel=1e-6)


@pytest.mark.parametrize("index", range(len(_all_losses(1))))
def test_nothing_annotated_gives_zero(index):
    masks, dist, _, p = _two_samples()
    y = pack_targets(masks, dist, np.zeros((2, 2), "float32"))
    y_pred = tf.Variable(p)
    with tf.GradientTape() as tape:
        value = _all_losses(2)[index](y, y_pred)
    assert float(value) == 0.0
    assert np.all(tape.gradient(value, y_pred).numpy() == 0.0)


def _mixup_case():
    rng = np.random.default_rng(3)
    first = (rng.random((1, 4, 4, 2)) > 0.5).astype("float32")
    second = (rng.random((1, 4, 4, 2)) > 0.6).astype("float32")
    dist1 = rng.normal(0, 3, (1, 4, 4, 2)).astype("float32")
    dist2 = rng.normal(0, 3, (1, 4, 4, 2)).astype("float32")
    p = rng.uniform(0.05, 0.95, (1, 4, 4, 2)).astype("float32")
    flags1, flags2 = np.array([[1, 1]], "float32"), np.array([[0, 1]], "float32")
    return (first, dist1, flags1), (second, dist2, flags2), p


@pytest.mark.parametrize("index", range(len(_all_losses(1))))
def test_mixup_is_lambda_weighted_sum(index):
    target1, target2, p = _mixup_case()
    lam = 0.3
    loss = _all_losses(2)[index]
    mixed = _value(loss, pack_targets(*target1, partner=target2, lam=np.array([lam], "float32")), p)
    single1 = _value(loss, pack_targets(*target1), p)
    single2 = _value(loss, pack_targets(*target2), p)
    assert mixed == pytest.approx(lam * single1 + (1 - lam) * single2, rel=1e-5, abs=1e-7)


def test_mixup_batch_weights_samples_by_annotated_pairs():
    # Sample 0 as in _mixup_case (lam 0.3: 0.3 * 2 + 0.7 * 1 = 1.3 pairs); sample 1 a plain copy (2 pairs).
    target1, target2, p = _mixup_case()
    loss = soft_dice(2)
    lam = np.array([0.3, 1.0], "float32")
    stack = [np.concatenate([a, a], axis=0) for a in target1]
    partner = [np.concatenate([b, a], axis=0) for a, b in zip(target1, target2, strict=True)]
    p2 = np.concatenate([p, p], axis=0)
    batch = _value(loss, pack_targets(*stack, partner=partner, lam=lam), p2)
    sample0 = _value(loss, pack_targets(*target1, partner=target2, lam=lam[:1]), p)
    sample1 = _value(loss, pack_targets(*target1), p)
    assert batch == pytest.approx((1.3 * sample0 + 2 * sample1) / 3.3, rel=1e-5)


def test_sample_weights_fold_into_the_masked_mean():
    masks, dist, annotated, p = _two_samples()
    loss = soft_dice(2)
    y = pack_targets(masks, dist, annotated)
    only_first = _value(loss, pack_targets(masks[:1], dist[:1], annotated[:1]), p[:1])
    assert _value(loss, y, p, sample_weight=np.array([1.0, 0.0], "float32")) == pytest.approx(only_first)
    assert _value(loss, y, p, sample_weight=np.array([2.0, 2.0], "float32")) == pytest.approx(_value(loss, y, p))
    assert loss(y, p).shape == ()


@pytest.mark.parametrize("index", range(len(_all_losses(1))))
def test_config_round_trip(index):
    loss = _all_losses(2)[index]
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(clone) is type(loss) and clone.get_config() == loss.get_config()
    target1, target2, p = _mixup_case()
    y = pack_targets(*target1, partner=target2, lam=np.array([0.6], "float32"))
    assert _value(clone, y, p) == pytest.approx(_value(loss, y, p))


def test_boundary_ramp_reaches_compiled_step():
    loss = SegmentationLoss(1, focal_weight=0.0, dice_weight=0.0, boundary_weight=1.0, boundary_ramp_epochs=4)
    assert float(loss.boundary_scale.numpy()) == 0.25
    inputs = keras.Input((2, 2, 1))
    model = keras.Model(inputs, keras.layers.Activation("linear")(inputs))
    model.compile(loss=loss)
    y = pack_targets(Y, D, ONE)
    assert model.evaluate(P, y, verbose=0) == pytest.approx(0.25 * -0.275, rel=1e-5)
    ramp = BoundaryRamp()
    ramp.set_model(model)
    ramp.on_epoch_begin(2)
    assert float(loss.boundary_scale.numpy()) == 0.75
    assert model.evaluate(P, y, verbose=0) == pytest.approx(0.75 * -0.275, rel=1e-5)
    ramp.on_epoch_begin(10)
    assert model.evaluate(P, y, verbose=0) == pytest.approx(-0.275, rel=1e-5)
    assert SegmentationLoss(1, boundary_weight=1.0).ramp_value(0) == 1.0


def test_train_config_refuses_an_unknown_dice_over_before_anything_runs():
    from hnseg_keras.errors import HnsegError
    from hnseg_keras.training.config import LossConfig

    with pytest.raises(HnsegError, match=r"loss.dice_over='volume' is unknown; choose one of slice, batch"):
        LossConfig(dice_over="volume")
