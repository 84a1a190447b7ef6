"""Batched augmentation: one field per sample for every key, exact identities, seeded draws, mixup laws."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage, stats

from hnseg_keras.errors import HnsegError
from hnseg_keras.inputs import augment
from hnseg_keras.inputs.augment import AugmentConfig

ELASTIC = AugmentConfig(window=None, crop_size=40, warp_probability=1.0, grid=False, elastic_alpha=3.0,
                        elastic_sigma=6.0, mixup=False)
GRID = dataclasses.replace(ELASTIC, elastic=False, grid=True, grid_steps=4, grid_distort_limit=0.4)


CROP_WARP, MIXUP = (next(op for op in augment.OPS if op.name == name) for name in ("crop_and_warp", "mixup"))


def crop_and_warp(batch, seed, config):
    """The crop + warp op alone (no window, no mixup), its parameters drawn from ``seed``."""
    config = dataclasses.replace(config, mixup=False)
    return CROP_WARP.apply(batch, augment.draw_params(batch, seed, config)["crop_and_warp"], config)


def resample(values, offsets, field, out_hw):
    """``values`` resampled as the distance maps are (bilinear, no threshold)."""
    batch = {"image": values, "masks": values, "dist_maps": values}
    return augment.resample_batch(batch, offsets, field, out_hw)["dist_maps"].numpy()


def warp_field(seed, batch_size, hw, **settings):
    """The warp field the crop + warp op draws when every sample is warped (no crop)."""
    config = AugmentConfig(crop_size=None, warp_probability=1.0, mixup=False, **settings)
    return CROP_WARP.draw(seed, batch_size, hw, hw, config)["field"]


def _batch(image, masks, dist_maps=None):
    """A float32 batch dict from [B,H,W,C] image and [B,H,W,O] masks."""
    masks = np.asarray(masks, np.float32)
    dist = np.zeros_like(masks) if dist_maps is None else np.asarray(dist_maps, np.float32)
    return {"image": np.asarray(image, np.float32), "masks": masks, "dist_maps": dist,
            "annotated": np.ones(masks.shape[::3], np.float32)}


def _checkerboard(batch_size, size=48, square=6):
    rows, cols = np.indices((size, size))
    board = (((rows // square) + (cols // square)) % 2).astype(np.float32)
    return np.broadcast_to(board[None, :, :, None], (batch_size, size, size, 1)).copy()


def _disc_sdm(size=48, radius=12.0):
    """Binary disc and its signed distance map (pixels, negative inside)."""
    rows, cols = np.indices((size, size))
    disc = (rows - size / 2) ** 2 + (cols - size / 2) ** 2 <= radius**2
    sdm = ndimage.distance_transform_edt(~disc) - ndimage.distance_transform_edt(disc)
    return disc.astype(np.float32), sdm.astype(np.float32)


@pytest.mark.parametrize("config", [ELASTIC, GRID], ids=["elastic", "grid"])
def test_checkerboard_image_and_mask_move_together(config):
    board = _checkerboard(6)
    out = crop_and_warp(_batch(board * 1.0, board), [7, 1], config)
    image, masks = out["image"].numpy()[..., 0], out["masks"].numpy()[..., 0]
    np.testing.assert_array_equal(image >= 0.5, masks == 1.0)
    assert set(np.unique(masks)) <= {0.0, 1.0}
    # The warp really moved the pattern: no sample is a plain integer crop of the board.
    for sample in masks:
        plain = [np.array_equal(sample, board[0, y : y + 40, x : x + 40, 0]) for y in range(9) for x in range(9)]
        assert not any(plain)


def test_zero_displacement_and_integer_offset_is_an_exact_copy():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(3, 20, 24, 5)).astype(np.float32)
    offsets = np.array([[0, 0], [3, 1], [4, 8]], np.float32)
    out = resample(values, offsets, np.zeros((3, 16, 16, 2), np.float32), (16, 16))
    for b, (y, x) in enumerate(offsets.astype(int)):
        np.testing.assert_array_equal(out[b], values[b, y : y + 16, x : x + 16])
    whole = resample(values, np.zeros((3, 2), np.float32), None, (20, 24))
    np.testing.assert_array_equal(whole, values)


def test_crop_offsets_are_integers_drawn_per_sample():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, 48, 48, 1)).astype(np.float32).repeat(16, axis=0)
    config = dataclasses.replace(ELASTIC, warp_probability=0.0)
    out = crop_and_warp(_batch(image, np.zeros((16, 48, 48, 1))), [3, 4], config)["image"].numpy()
    found = []
    for sample in out:  # each output is an exact copy of exactly one integer crop
        hits = [(y, x) for y in range(9) for x in range(9) if np.array_equal(sample, image[0, y : y + 40, x : x + 40])]
        assert len(hits) == 1
        found.append(hits[0])
    assert len(set(found)) >= 8  # 81 possible corners, 16 draws


def test_elastic_components_are_independent_smooth_and_of_size_alpha():
    field = warp_field([11, 2], 400, (16, 16), elastic_alpha=3.0, elastic_sigma=4.0, grid=False).numpy()
    dy, dx = field[:, 8, 8, 0], field[:, 8, 8, 1]
    assert abs(np.corrcoef(dy, dx)[0, 1]) < 0.15  # 400 independent samples: 3 standard errors
    assert 2.7 < dy.std() < 3.3 and 2.7 < dx.std() < 3.3
    neighbour = np.corrcoef(field[:, 8, 8, 0], field[:, 8, 9, 0])[0, 1]
    assert neighbour > 0.9  # smooth: Gaussian sigma 4 gives exp(-1/64) ~ 0.98 at lag 1
    distant = np.corrcoef(field[:, 0, 0, 1], field[:, 15, 15, 1])[0, 1]
    assert abs(distant) < 0.2


def test_grid_distortion_is_piecewise_linear_per_axis_with_fixed_border():
    field = warp_field([5, 5], 4, (33, 33), elastic=False, grid_steps=4, grid_distort_limit=0.3).numpy()
    np.testing.assert_allclose(field[..., 0], field[:, :, :1, 0].repeat(33, axis=2))  # dy depends on row only
    np.testing.assert_allclose(field[..., 1], field[:, :1, :, 1].repeat(33, axis=1))  # dx on column only
    np.testing.assert_allclose(field[:, [0, -1], :, 0], 0.0, atol=1e-4)
    second_difference = np.diff(field[0, :, 0, 0], 2)  # linear inside each 8-pixel cell
    inside = [i for i in range(31) if (i + 1) % 8 != 0]
    np.testing.assert_allclose(second_difference[inside], 0.0, atol=1e-4)
    assert np.abs(field).max() > 0.5


@pytest.mark.parametrize("config", [ELASTIC, GRID], ids=["elastic", "grid"])
def test_distance_map_sign_follows_the_warped_mask(config):
    disc, sdm = _disc_sdm()
    masks = np.broadcast_to(disc[None, :, :, None], (8, 48, 48, 1))
    dist = np.broadcast_to(sdm[None, :, :, None], (8, 48, 48, 1))
    out = crop_and_warp(_batch(masks, masks, dist), [2, 9], config)
    warped_mask, warped_dist = out["masks"].numpy(), out["dist_maps"].numpy()
    assert set(np.unique(warped_mask)) == {0.0, 1.0}
    agreement = np.mean((warped_dist < 0) == (warped_mask == 1.0))
    assert agreement >= 0.99


def test_same_seed_same_batch_different_seed_different_batch():
    rng = np.random.default_rng(2)
    batch = _batch(rng.normal(0, 200, (4, 48, 48, 3)), rng.random((4, 48, 48, 2)) > 0.6)
    config = AugmentConfig(crop_size=40, warp_probability=1.0)
    first = augment.augment_batch(batch, [3, 9], config, [0.5, 0.1])
    again = augment.augment_batch(batch, [3, 9], config, [0.5, 0.1])
    other = augment.augment_batch(batch, [3, 10], config, [0.5, 0.1])
    assert set(first) == {"image", "masks", "dist_maps", "annotated", "partner_masks", "partner_dist_maps",
                          "partner_annotated", "lam"}
    for key in first:
        np.testing.assert_array_equal(first[key].numpy(), again[key].numpy(), err_msg=key)
    assert not np.allclose(first["image"].numpy(), other["image"].numpy())
    # Windowed, then only convex combinations (bilinear, mixup): inside the window up to rounding.
    assert first["image"].numpy().min() >= -155.001 and first["image"].numpy().max() <= 195.001


def test_unknown_batch_size_still_gives_one_field_per_sample():
    disc, sdm = _disc_sdm()
    masks = np.broadcast_to(disc[None, :, :, None], (6, 48, 48, 1)).copy()
    batch = _batch(masks, masks, np.broadcast_to(sdm[None, :, :, None], masks.shape))
    spec = {key: tf.TensorSpec([None, *value.shape[1:]], tf.float32) for key, value in batch.items()}
    config = dataclasses.replace(ELASTIC, elastic_alpha=4.0)

    @tf.function(input_signature=[spec, tf.TensorSpec([2], tf.int32)])
    def run(batch, seed):
        return crop_and_warp(batch, seed, config)

    traced = run(batch, tf.constant([4, 4]))
    eager = crop_and_warp(batch, [4, 4], config)
    np.testing.assert_allclose(traced["dist_maps"].numpy(), eager["dist_maps"].numpy(), atol=1e-4)
    out = traced["masks"].numpy()
    distinct = {out[b].tobytes() for b in range(6)}
    assert len(distinct) == 6  # identical inputs, six different crops + fields


def test_slice_weights_sum_present_organs_and_fall_back_to_the_smallest():
    masks = np.zeros((4, 8, 8, 2), np.float32)
    masks[0, 2, 2, 0] = 1
    masks[1, 3, 3, 1] = 1
    masks[2, 1, 1, 0] = masks[2, 5, 5, 1] = 1
    weights = augment.slice_weights(masks, np.array([1.0, 0.25], np.float32)).numpy()
    np.testing.assert_allclose(weights, [1.0, 0.25, 1.25, 0.25])


def test_partner_frequencies_follow_the_weights():
    base = np.array([1.0, 0.25, 1.25, 0.25], np.float32)
    weights = np.tile(base, 1000)  # a batch of 4000: partner index mod 4 follows base / sum(base)
    draws = np.random.default_rng(21).random(weights.size).astype(np.float32)
    partners = np.asarray(augment.partners_from_uniform(weights, draws))
    assert partners.min() >= 0 and partners.max() < 4000
    counts = np.bincount(partners % 4, minlength=4)
    expected = base.astype(np.float64) / base.sum() * partners.size
    assert stats.chisquare(counts, expected).pvalue > 1e-3


def test_mixup_mixes_images_and_carries_the_partner_targets():
    batch_size = 5
    image = np.arange(1, batch_size + 1, dtype=np.float32)[:, None, None, None] * np.ones((1, 8, 8, 1), np.float32)
    masks = np.zeros((batch_size, 8, 8, batch_size), np.float32)
    for b in range(batch_size):
        masks[b, b, :, b] = 1.0  # sample b: organ b in row b
    batch = _batch(image, masks, masks * -3.0)
    batch["annotated"] = np.eye(batch_size, dtype=np.float32)
    config = AugmentConfig(mixup_alpha=0.2)
    out = MIXUP.apply(batch, MIXUP.draw([8, 8], batch_size, None, None, config), config,
                      np.full(batch_size, 0.2, np.float32))
    lam = out["lam"].numpy()
    partner = out["partner_annotated"].numpy().argmax(axis=1)
    np.testing.assert_array_equal(np.asarray(out["masks"]), masks)  # masks are not mixed
    np.testing.assert_array_equal(out["partner_masks"].numpy(), masks[partner])
    np.testing.assert_array_equal(out["partner_dist_maps"].numpy(), masks[partner] * -3.0)
    expected = lam * (np.arange(batch_size) + 1) + (1 - lam) * (partner + 1)
    np.testing.assert_allclose(out["image"].numpy()[:, 0, 0, 0], expected, rtol=1e-5)


def test_lambda_follows_beta_0_2():
    lam = augment.beta_from_draws(MIXUP.draw([31, 7], 20000, None, None, AugmentConfig()), 0.2).numpy()
    assert lam.min() >= 0.0 and lam.max() <= 1.0
    assert abs(lam.mean() - 0.5) < 0.015  # sd of Beta(.2,.2) is 0.42: 5 standard errors
    # Kolmogorov-Smirnov distance on [0.001, 0.999] (float32 rounds the heavy tails onto 0 and 1),
    # against the DKW bound for n = 20000 at level 0.001: sqrt(ln(2 / 0.001) / (2 n)) = 0.0138.
    grid = np.linspace(0.001, 0.999, 999)
    ecdf = np.searchsorted(np.sort(lam), grid, side="right") / lam.size
    assert np.abs(ecdf - stats.beta(0.2, 0.2).cdf(grid)).max() < 0.0138
    assert np.mean(lam < 0.1) > 0.3  # U-shaped: most mass near 0 and 1


def test_augment_batch_compiles_with_xla_and_unknown_batch():
    rng = np.random.default_rng(3)
    batch = _batch(rng.normal(0, 300, (4, 40, 40, 3)), rng.random((4, 40, 40, 2)) > 0.5)
    spec = {key: tf.TensorSpec([None, *value.shape[1:]], tf.float32) for key, value in batch.items()}
    config = AugmentConfig(crop_size=32, warp_probability=1.0, elastic_sigma=8.0)

    @tf.function(jit_compile=True, input_signature=[spec, tf.TensorSpec([2], tf.int32)])
    def run(batch, seed):
        return augment.augment_batch(batch, seed, config, tf.constant([0.3, 0.1]))

    first, again = run(batch, tf.constant([1, 2])), run(batch, tf.constant([1, 2]))
    assert first["image"].shape == (4, 32, 32, 3) and first["lam"].shape == (4,)
    assert set(np.unique(first["masks"].numpy())) <= {0.0, 1.0}
    np.testing.assert_array_equal(first["image"].numpy(), again["image"].numpy())
    assert np.all((first["lam"].numpy() >= 0) & (first["lam"].numpy() <= 1))


def test_a_window_must_run_from_low_to_high():
    with pytest.raises(HnsegError, match=r"augment.window=\[195.0, -155.0\]: give \(low, high\)"):
        AugmentConfig(window=(195.0, -155.0))
    assert AugmentConfig(window=None).window is None


def test_window_clips_and_none_uses_the_hu_range():
    image = np.array([-3000.0, -500.0, 0.0, 500.0, 4000.0], np.float32)
    np.testing.assert_array_equal(augment.window_image(image, (-155, 195)).numpy(), [-155, -155, 0, 195, 195])
    np.testing.assert_array_equal(augment.window_image(image, None).numpy(), [-1024, -500, 0, 500, 3071])


def test_switched_off_ops_leave_the_batch_alone():
    rng = np.random.default_rng(4)
    batch = _batch(rng.normal(0, 50, (2, 32, 32, 1)), rng.random((2, 32, 32, 1)) > 0.5)
    config = AugmentConfig(crop_size=None, warp_probability=0.0, mixup=False)
    out = augment.augment_batch(batch, [1, 1], config)
    np.testing.assert_array_equal(out["image"].numpy(), np.clip(batch["image"], -155, 195))
    np.testing.assert_array_equal(out["masks"].numpy(), batch["masks"])
    assert "lam" not in out
