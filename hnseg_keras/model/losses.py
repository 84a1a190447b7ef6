"""The masked, mixup-aware segmentation loss (focal + Dice + boundary) on the packed target of ``targets.py``.

``SegmentationLoss`` takes ``y_true`` [B, H, W, 4O+1] (see ``targets.pack_targets``) and ``y_pred`` =
per-organ sigmoid probabilities [B, H, W, O]; its weighted sum of terms is reduced this way:

- a per-(sample, organ) term ``L[b, o]`` is computed for the first target and for the mixup partner;
- per sample and target, the mean over the organs annotated in that target: ``l_t[b]``;
- per sample, mixup-aware: ``l[b] = lam[b] * l_1[b] + (1 - lam[b]) * l_2[b]`` (without mixup the
  partner is a copy and lam = 1);
- over the batch, the mean of ``l[b]`` weighted by the (lam-weighted) number of annotated organs of the
  sample times its Keras sample weight. Without mixup this is exactly the mean over annotated
  (sample, organ) pairs; samples with nothing annotated get weight 0; a batch with nothing annotated
  gives 0 (not NaN).

Masking is exact: an unannotated (sample, organ) has weight 0 in every term, so it adds neither loss
nor gradient, and since each organ has its own sigmoid channel it is never counted as background for
the other organs.

Keras reduction: ``call`` returns per-sample contributions [B] whose plain mean is the value above, so
the base class's "sum_over_batch_size" reduction (and its 1/replicas scaling under ``tf.distribute``)
gives the right scalar. Keras sample weights [B] are folded into the per-sample weights (both numerator
and denominator) rather than multiplied on afterwards.
"""

from __future__ import annotations

import keras
from keras import ops

from hnseg_keras.inputs.targets import num_target_channels, unpack_targets

_EPS = 1e-7  # inside the logs of the focal loss
DICE_OVER = {  # what one soft Dice is computed over (batch_dice_terms) -> how a model card names it
    "slice": "Dice",
    "batch": "batch Dice",
    "batch_present": "batch Dice (organs absent from the batch left to the focal term)",
}


def focal_terms(p, masks, gamma: float = 2.0):
    """Per-(sample, organ) focal loss, mean over pixels.

    ``-(1-p)^g log p`` on foreground, ``-p^g log(1-p)`` on background (Lin et al. 2017). A small
    epsilon inside the logs (rather than clipping p) keeps the value finite at p = 0 or 1 without
    zeroing the gradient of confidently wrong pixels.
    p, masks: [B, H, W, O]; returns [B, O] in nats.
    """
    log_p = ops.log(p + _EPS)
    log_not_p = ops.log(1.0 - p + _EPS)
    if gamma:
        foreground = -masks * ops.power(1.0 - p, gamma) * log_p
        background = -(1.0 - masks) * ops.power(p, gamma) * log_not_p
    else:  # plain cross-entropy; avoids 0 ** -1 in the gradient of x ** 0
        foreground, background = -masks * log_p, -(1.0 - masks) * log_not_p
    return ops.mean(foreground + background, axis=(1, 2))


def dice_terms(p, masks, smooth: float = 1.0):
    """Per-(sample, organ) soft Dice loss ``1 - (2 sum p y + s) / (sum p + sum y + s)``; returns [B, O].

    The smoothing ``s`` (in pixels) makes an organ absent from the slice still ask for p -> 0.
    """
    intersection = ops.sum(p * masks, axis=(1, 2))
    total = ops.sum(p, axis=(1, 2)) + ops.sum(masks, axis=(1, 2))
    return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def batch_dice_terms(p, masks, annotated, smooth: float = 1.0, present_only: bool = False):
    """Soft Dice per organ over all pixels of the batch's annotated slices, given to each of them; [B, O].

    nnU-Net's "batch Dice" for 2D: a slice where the organ is absent only adds its false positives to
    the organ's one Dice instead of being a Dice of its own that asks for p = 0 everywhere. With
    organs present on a fifth of the slices, the per-slice form drives them to zero (seven OpenKBP
    organs at 4 mm did). Unannotated slices take no part, so masking stays exact.

    ``present_only``: an organ absent from every annotated slice of the batch gets 0 (no gradient)
    instead of ``1 - s / (sum p + s)``, which asks hard for sum p < s over the whole batch and, in
    the ~40 % of batches without larynx, pushed that channel to zero (its false positives are left to
    the focal term). nnU-Net's smoothing of 1e-5 makes its absent-class Dice nearly flat the same way.
    """
    weight = ops.cast(annotated > 0, p.dtype)[:, None, None, :]
    intersection = ops.sum(weight * p * masks, axis=(0, 1, 2))
    truth = ops.sum(weight * masks, axis=(0, 1, 2))
    total = ops.sum(weight * p, axis=(0, 1, 2)) + truth
    per_organ = 1.0 - (2.0 * intersection + smooth) / (total + smooth)
    if present_only:
        per_organ = ops.where(truth > 0, per_organ, 0.0)
    return ops.zeros_like(p[:, 0, 0, :]) + per_organ[None, :]


def boundary_terms(p, dist_maps):
    """Per-(sample, organ) boundary loss (Kervadec et al. 2019): mean over pixels of ``p * d``.

    d is the signed distance to the organ boundary in pixels (negative inside, clipped to +-127), so the
    value is in pixels: minimal (negative) when p covers exactly the inside; +127 per unit of
    probability mass on a slice where the organ is absent. Normalised by the pixel count only, so a
    weight of about 0.01 puts it on the scale of the Dice term. Returns [B, O].
    """
    return ops.mean(p * dist_maps, axis=(1, 2))


def masked_mixup_contributions(term_fn, y_true, y_pred, num_organs: int):
    """Reduce ``term_fn(p, masks, dist_maps, annotated) -> [B, O]`` as described in the module docstring.

    ``y_true`` may carry one extra channel (the Keras sample weight, see ``SegmentationLoss.__call__``).
    Returns per-sample contributions [B] whose mean is the loss.
    """
    y_true = ops.cast(y_true, "float32")
    p = ops.cast(y_pred, "float32")
    targets = unpack_targets(y_true, num_organs)
    if y_true.shape[-1] == num_target_channels(num_organs) + 1:
        sample_weight = y_true[:, 0, 0, -1]
    else:
        sample_weight = ops.ones_like(targets.lam)
    first = term_fn(p, targets.masks, targets.dist_maps, targets.annotated)
    partner = term_fn(p, targets.partner_masks, targets.partner_dist_maps, targets.partner_annotated)
    first_loss, first_count = _organ_mean(first, targets.annotated)
    partner_loss, partner_count = _organ_mean(partner, targets.partner_annotated)
    lam = targets.lam
    per_sample = lam * first_loss + (1.0 - lam) * partner_loss
    weight = sample_weight * (lam * first_count + (1.0 - lam) * partner_count)
    batch_size = ops.cast(ops.shape(weight)[0], "float32")
    return batch_size * ops.divide_no_nan(weight * per_sample, ops.sum(weight))


def _organ_mean(terms, annotated):
    """Mean of ``terms`` [B, O] over annotated organs per sample (0 where none) and the count [B]."""
    # where() rather than a product: a masked channel's value never enters the sum, whatever it is.
    masked = ops.where(annotated > 0, terms, 0.0)
    count = ops.sum(annotated, axis=-1)
    return ops.divide_no_nan(ops.sum(masked, axis=-1), count), count


@keras.saving.register_keras_serializable(package="hnseg_keras")
class SegmentationLoss(keras.losses.Loss):
    """``focal_weight * focal + dice_weight * dice + boundary_weight * scale * boundary``.

    All three terms share one masked, mixup-aware reduction (the module docstring); a weight of 0 drops a
    term, so one term alone is this loss with the other weights at 0. ``scale`` is a non-trainable
    variable: 1 when ``boundary_ramp_epochs`` is 0; otherwise ``BoundaryRamp`` sets it to
    ``min(1, (epoch + 1) / boundary_ramp_epochs)`` at the start of each epoch (it starts at the
    epoch-0 value), so the boundary term grows linearly as Kervadec et al. recommend.
    """

    def __init__(
        self,
        num_organs: int,
        focal_weight: float = 1.0,
        dice_weight: float = 1.0,
        boundary_weight: float = 0.0,
        boundary_ramp_epochs: int = 0,
        gamma: float = 2.0,
        smooth: float = 1.0,
        dice_over: str = "slice",
        name: str = "segmentation_loss",
    ):
        super().__init__(name=name, reduction="sum_over_batch_size")
        self.num_organs = int(num_organs)
        self.focal_weight = float(focal_weight)
        self.dice_weight = float(dice_weight)
        self.boundary_weight = float(boundary_weight)
        self.boundary_ramp_epochs = int(boundary_ramp_epochs)
        self.gamma = float(gamma)
        self.smooth = float(smooth)
        if dice_over not in DICE_OVER:
            raise ValueError(f"dice_over must be one of {list(DICE_OVER)}, got {dice_over!r}")
        self.dice_over = dice_over
        self.boundary_scale = keras.Variable(
            self.ramp_value(0), trainable=False, dtype="float32", name="boundary_scale"
        )

    def ramp_value(self, epoch: int) -> float:
        """Boundary scale for 0-based ``epoch``."""
        if self.boundary_ramp_epochs <= 0:
            return 1.0
        return min(1.0, (epoch + 1) / self.boundary_ramp_epochs)

    def __call__(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            # Fold the per-sample weight into the masked mean: append it as one more target channel.
            y_true = ops.cast(y_true, "float32")
            plane = ops.ones_like(y_true[..., :1]) * ops.reshape(
                ops.cast(sample_weight, "float32"), (-1, 1, 1, 1)
            )
            y_true = ops.concatenate([y_true, plane], axis=-1)
        return super().__call__(y_true, y_pred)

    def call(self, y_true, y_pred):
        return masked_mixup_contributions(self._terms, y_true, y_pred, self.num_organs)

    def _terms(self, p, masks, dist_maps, annotated):
        total = 0.0
        if self.focal_weight:
            total = total + self.focal_weight * focal_terms(p, masks, self.gamma)
        if self.dice_weight and self.dice_over != "slice":
            total = total + self.dice_weight * batch_dice_terms(
                p, masks, annotated, self.smooth, present_only=self.dice_over == "batch_present")
        elif self.dice_weight:
            total = total + self.dice_weight * dice_terms(p, masks, self.smooth)
        if self.boundary_weight:
            scale = ops.cast(self.boundary_scale, "float32")
            total = total + self.boundary_weight * scale * boundary_terms(p, dist_maps)
        return total + ops.zeros_like(p[:, 0, 0, :])  # [B, O] even when every weight is 0

    def get_config(self):
        return {
            "num_organs": self.num_organs,
            "name": self.name,
            "focal_weight": self.focal_weight,
            "dice_weight": self.dice_weight,
            "boundary_weight": self.boundary_weight,
            "boundary_ramp_epochs": self.boundary_ramp_epochs,
            "gamma": self.gamma,
            "smooth": self.smooth,
            "dice_over": self.dice_over,
        }


class BoundaryRamp(keras.callbacks.Callback):
    """Set ``SegmentationLoss.boundary_scale`` at the start of each epoch.

    Args:
        loss: the SegmentationLoss to drive; None uses ``model.loss`` (so it also works on a model
            reloaded from ``.keras``, whose loss is a new object).

    TensorFlow reads the variable inside the compiled step, so an assignment takes effect at once.
    JAX's compiled step is stateless and bakes in variables that are not model or optimizer state,
    so under JAX the callback rebuilds the train function whenever the value changes (one retrace per
    ramp epoch, none after the ramp ends).
    """

    def __init__(self, loss: SegmentationLoss | None = None):
        super().__init__()
        self.loss = loss

    def on_epoch_begin(self, epoch, logs=None):
        loss = self.loss if self.loss is not None else getattr(self.model, "loss", None)
        if not isinstance(loss, SegmentationLoss):
            return
        value = loss.ramp_value(epoch)
        if float(keras.ops.convert_to_numpy(loss.boundary_scale)) == value:
            return
        loss.boundary_scale.assign(value)
        if keras.backend.backend() == "jax":
            self.model.make_train_function(force=True)
