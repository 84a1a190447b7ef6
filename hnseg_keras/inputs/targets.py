"""The packed target tensor that carries masks, distance maps, annotation and mixup to the loss.

Keras hands a loss one ``y_true`` tensor, so everything the masked, mixup-aware losses
need travels in it along the channel axis. For ``O`` organs, ``y_true`` has shape
``[B, H, W, 4 * O + 1]``::

    [0, O)        masks of the first target   1 inside, 0 outside, -1 = organ not annotated
    [O, 2O)       signed distance maps of the first target, in pixels (negative inside)
    [2O, 3O)      masks of the mixup partner (a copy of the first target without mixup)
    [3O, 4O)      distance maps of the mixup partner
    4O            mixup weight lambda of the first target (1.0 without mixup), constant per sample

Marking a missing annotation with -1 in the mask channel keeps the "annotated" flag
next to the pixels it governs, through crops and warps, with no extra input.
"""

from __future__ import annotations

from typing import NamedTuple

from keras import ops


class Targets(NamedTuple):
    """Unpacked view of a packed target tensor; every field is float32.

    masks, partner_masks: [B, H, W, O] in {0, 1} (0 where not annotated).
    dist_maps, partner_dist_maps: [B, H, W, O] signed distances in pixels.
    annotated, partner_annotated: [B, O] in {0, 1}.
    lam: [B] mixup weight of the first target.
    """

    masks: object
    dist_maps: object
    annotated: object
    partner_masks: object
    partner_dist_maps: object
    partner_annotated: object
    lam: object


def num_target_channels(num_organs: int) -> int:
    """Channels of the packed target for ``num_organs`` organs."""
    return 4 * num_organs + 1


def pack_targets(masks, dist_maps, annotated, partner=None, lam=None):
    """Pack targets for the loss.

    Args:
        masks: [B, H, W, O] binary masks (any numeric dtype).
        dist_maps: [B, H, W, O] signed distance maps in pixels.
        annotated: [B, O] flags, nonzero where the organ is annotated in that sample.
        partner: optional ``(masks, dist_maps, annotated)`` of the mixup partner.
        lam: optional [B] weight of the first target; required with ``partner``.

    Returns:
        float32 tensor [B, H, W, 4 * O + 1].
    """
    first = _flagged(masks, annotated)
    dist_maps = ops.cast(dist_maps, "float32")
    if partner is None:
        second, partner_dist = first, dist_maps
        lam = ops.ones((ops.shape(first)[0],), "float32")
    else:
        partner_masks, partner_dist, partner_annotated = partner
        second = _flagged(partner_masks, partner_annotated)
        partner_dist = ops.cast(partner_dist, "float32")
        lam = ops.cast(lam, "float32")
    lam_plane = ops.ones_like(first[..., :1]) * ops.reshape(lam, (-1, 1, 1, 1))
    return ops.concatenate([first, dist_maps, second, partner_dist, lam_plane], axis=-1)


def unpack_targets(y_true, num_organs: int) -> Targets:
    """Split a packed target tensor back into its parts (see the module docstring)."""
    y_true = ops.cast(y_true, "float32")
    o = num_organs
    raw_first, dist_maps = y_true[..., :o], y_true[..., o : 2 * o]
    raw_second, partner_dist = y_true[..., 2 * o : 3 * o], y_true[..., 3 * o : 4 * o]
    lam = y_true[:, 0, 0, 4 * o]
    masks, annotated = _split_flag(raw_first)
    partner_masks, partner_annotated = _split_flag(raw_second)
    return Targets(masks, dist_maps, annotated, partner_masks, partner_dist, partner_annotated, lam)


def _flagged(masks, annotated):
    masks = ops.cast(masks, "float32")
    flags = ops.cast(ops.not_equal(ops.cast(annotated, "float32"), 0.0), "float32")
    flags = flags[:, None, None, :]
    return masks * flags - (1.0 - flags)


def _split_flag(raw):
    # A pixel is -1 only where the whole channel is unannotated, so pixel (0, 0) tells.
    annotated = ops.cast(ops.greater_equal(raw[:, 0, 0, :], 0.0), "float32")
    return ops.maximum(raw, 0.0), annotated


def to_keras(batch: dict):
    """``(x, y)`` of an augmented batch dict: x its image, y :func:`pack_targets` (with the mixup partner)."""
    partner, lam = None, None
    if "lam" in batch:
        partner = (batch["partner_masks"], batch["partner_dist_maps"], batch["partner_annotated"])
        lam = batch["lam"]
    return batch["image"], pack_targets(batch["masks"], batch["dist_maps"], batch["annotated"], partner=partner,
                                        lam=lam)
