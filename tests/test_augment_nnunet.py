"""The nnU-Net-like ops: rotation and zoom in the one resampling, intensity ops on the image only, all off
by default (the batches of older configs are unchanged), config switch and round trip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from hnseg_keras import configs
from hnseg_keras.errors import HnsegError
from hnseg_keras.inputs import augment, intensity
from hnseg_keras.inputs.augment import NNUNET_LIKE, AugmentConfig
from hnseg_keras.training.config import load_config

OP = {op.name: op for op in augment.OPS}
INTENSITY = ("noise", "blur", "brightness", "shift", "contrast", "gamma_inverted", "gamma")
# Window (-100, 100): centre 0 HU, half-width 100 HU, so window units are HU / 100.
PLAIN = AugmentConfig(window=(-100.0, 100.0), crop_size=None, warp_probability=0.0, mixup=False)
ALL_ON = AugmentConfig(crop_size=40, **{f"{op}_probability": 1.0 for op in NNUNET_LIKE})


def _batch(image, masks, dist_maps=None, annotated=None):
    masks = np.asarray(masks, np.float32)
    dist = np.zeros_like(masks) if dist_maps is None else np.asarray(dist_maps, np.float32)
    annotated = np.ones(masks.shape[::3], np.float32) if annotated is None else np.asarray(annotated, np.float32)
    return {"image": np.asarray(image, np.float32), "masks": masks, "dist_maps": dist, "annotated": annotated}


def _random_batch(seed=12, size=48):
    rng = np.random.default_rng(seed)
    return _batch(rng.normal(20, 150, (4, size, size, 3)), rng.random((4, size, size, 2)) > 0.6,
                  rng.normal(0, 5, (4, size, size, 2)), [[1, 1], [1, 0], [0, 1], [1, 1]])


def _run_op(name, batch, config, seed=(4, 2)):
    """One op alone: its params drawn for ``batch`` from ``seed``, then applied; returns (batch, params)."""
    image = batch["image"]
    hw = image.shape[1:3]
    params = OP[name].draw(list(seed), image.shape[0], hw, hw, config, channels=image.shape[-1])
    return OP[name].apply(batch, params, config), params


def _numpy(tree):
    return {key: np.asarray(value) for key, value in tree.items()}


# ----------------------------------------------------------------------------- unchanged when off


def test_defaults_keep_the_old_ops_and_draws():
    for config in (AugmentConfig(), AugmentConfig(mixup=False), AugmentConfig(window=None, crop_size=None)):
        names = [op.name for op in augment.active_ops(config)]
        assert names == ["window", "crop_and_warp"] + (["mixup"] if config.mixup else [])
        assert all(config.probability(op) == 0.0 for op in NNUNET_LIKE)
    params = augment.draw_params(_random_batch(), [3, 9], AugmentConfig(crop_size=40, warp_probability=1.0))
    assert set(params) == {"crop_and_warp", "mixup"} and set(params["crop_and_warp"]) == {"offsets", "field"}


def test_new_ops_off_give_the_batch_recorded_before_they_existed():
    batch, weights = _random_batch(), np.array([0.5, 0.1], np.float32)
    config = AugmentConfig(crop_size=40, warp_probability=1.0)
    out = _numpy(augment.augment_batch(batch, [3, 9], config, weights))
    # Sums of the same call before rotation, zoom and the intensity ops were added.
    recorded = {"image": 363824.04993230104, "masks": 4929.0, "dist_maps": -1027.4582897787914,
                "lam": 3.2177920043468475, "partner_masks": 4884.0, "partner_dist_maps": -723.9954141257331}
    for key, total in recorded.items():
        np.testing.assert_allclose(out[key].astype(np.float64).sum(), total, rtol=1e-6, err_msg=key)
    # The switch with every op explicitly at 0 is the same batch, bit for bit.
    zeros = {f"{op}_probability": 0.0 for op in NNUNET_LIKE}
    same = _numpy(augment.augment_batch(batch, [3, 9], dataclasses.replace(config, nnunet_like=True, **zeros),
                                        weights))
    assert set(same) == set(out)
    for key in out:
        np.testing.assert_array_equal(same[key], out[key], err_msg=key)


@pytest.mark.parametrize("name", INTENSITY)
def test_each_intensity_op_at_probability_zero_is_the_identity(name):
    batch = _random_batch()
    off = dataclasses.replace(PLAIN, **{f"{name}_probability": 0.0})
    assert name not in [op.name for op in augment.active_ops(off)]
    out, params = _run_op(name, batch, off)
    assert not np.asarray(params["chosen"]).any()
    np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])


def test_rotation_and_zoom_at_probability_zero_are_the_identity():
    batch = _random_batch()
    config = dataclasses.replace(PLAIN, window=None, rotation_probability=0.0, scale_probability=0.0)
    assert "affine" not in augment.draw_params(batch, [1, 1], config)["crop_and_warp"]
    # Switched on for the draw but no sample chosen: the identity matrix copies pixels exactly.
    params = augment.affine_from_draws(np.array([[0.9, 0.3, 0.9, 0.7]] * 4, np.float32),
                                       dataclasses.replace(config, rotation_probability=0.5, scale_probability=0.5))
    np.testing.assert_array_equal(np.asarray(params["zoom"]), 1.0)
    out = _numpy(augment.resample_batch(batch, np.zeros((4, 2), np.float32), None, (48, 48), **params))
    for key in augment.SPATIAL_KEYS:
        np.testing.assert_array_equal(out[key], batch[key], err_msg=key)


# ----------------------------------------------------------------------------- geometry


def test_rotation_by_90_degrees_turns_image_masks_and_distance_maps():
    ell = np.zeros((9, 9), np.float32)
    ell[1:6, 2] = ell[5, 2:5] = 1.0  # an L: no symmetry a wrong turn could hide behind
    masks = np.stack([ell, np.zeros_like(ell)], -1)[None]  # organ 1 unannotated, empty
    batch = _batch(masks[..., :1] * 100.0, masks, masks * -3.0, [[1, 0]])
    config = dataclasses.replace(PLAIN, window=None, rotation_probability=1.0, rotation_degrees=(90.0, 90.0))
    out = _numpy(augment.augment_batch(batch, [0, 0], config))
    turned = np.rot90(masks[0], 1)  # positive angles turn counter-clockwise on screen
    np.testing.assert_array_equal(out["masks"][0], turned)
    np.testing.assert_allclose(out["image"][0], turned[..., :1] * 100.0, atol=1e-3)
    np.testing.assert_allclose(out["dist_maps"][0], turned * -3.0, atol=1e-4)
    np.testing.assert_array_equal(out["annotated"], [[1, 0]])


def test_zoom_2_doubles_a_centred_disc_and_its_distances():
    rows, cols = np.indices((48, 48))
    disc = ((rows - 23.5) ** 2 + (cols - 23.5) ** 2 <= 6.0**2).astype(np.float32)
    sdm = (ndimage.distance_transform_edt(disc == 0) - ndimage.distance_transform_edt(disc)).astype(np.float32)
    batch = _batch(disc[None, :, :, None] * 100.0, disc[None, :, :, None], sdm[None, :, :, None])
    config = dataclasses.replace(PLAIN, window=None, scale_probability=1.0, scale_range=(2.0, 2.0))
    out = _numpy(augment.augment_batch(batch, [5, 5], config))
    assert abs(out["masks"].sum() / disc.sum() - 4.0) < 0.2  # radius x2, area x4
    # Distances are in output pixels: the zoomed map sampled at centre + (p - centre) / 2, times 2.
    expected = 2.0 * ndimage.map_coordinates(sdm, [23.5 + (rows - 23.5) / 2.0, 23.5 + (cols - 23.5) / 2.0],
                                             order=1, mode="nearest")
    np.testing.assert_allclose(out["dist_maps"][0, ..., 0], expected, atol=1e-4)
    assert np.mean((out["dist_maps"][0, ..., 0] < 0) == (out["masks"][0, ..., 0] == 1.0)) > 0.99


def test_rotation_and_zoom_are_one_affine_on_the_crop_grid():
    rng = np.random.default_rng(8)
    image = ndimage.gaussian_filter(rng.normal(0, 100, (48, 48)), 2.0).astype(np.float32)
    batch = _batch(image[None, :, :, None], np.zeros((1, 48, 48, 1)))
    config = dataclasses.replace(PLAIN, window=None, crop_size=32, rotation_probability=1.0,
                                 rotation_degrees=(30.0, 30.0), scale_probability=1.0, scale_range=(1.25, 1.25))
    params = augment.draw_params(batch, [2, 7], config)["crop_and_warp"]
    out = np.asarray(OP["crop_and_warp"].apply(batch, params, config)["image"])[0, ..., 0]
    top, left = np.asarray(params["offsets"])[0]
    rows, cols = np.indices((32, 32)) - 15.5
    angle, zoom = np.deg2rad(30.0), 1.25
    coords = [top + 15.5 + (np.cos(angle) * rows + np.sin(angle) * cols) / zoom,
              left + 15.5 + (-np.sin(angle) * rows + np.cos(angle) * cols) / zoom]
    np.testing.assert_allclose(out, ndimage.map_coordinates(image, coords, order=1, mode="nearest"), atol=1e-3)


def test_image_masks_and_distance_maps_move_with_one_field():
    rows, cols = np.indices((48, 48))
    board = ((rows // 6 + cols // 6) % 2).astype(np.float32)
    masks = np.broadcast_to(board[None, :, :, None], (6, 48, 48, 1))
    config = AugmentConfig(window=None, crop_size=40, warp_probability=1.0, mixup=False, rotation_probability=1.0,
                           scale_probability=1.0)
    out = _numpy(augment.augment_batch(_batch(masks, masks, masks - 0.5), [7, 1], config))
    np.testing.assert_array_equal(out["image"] >= 0.5, out["masks"] == 1.0)  # a threshold of the image stays equal
    assert set(np.unique(out["masks"])) == {0.0, 1.0}
    zoom = np.asarray(augment.draw_params(_batch(masks, masks), [7, 1], config)["crop_and_warp"]["zoom"])
    np.testing.assert_allclose(out["dist_maps"] / zoom[:, None, None, None] + 0.5, out["image"], atol=1e-5)
    assert len({sample.tobytes() for sample in out["masks"]}) == 6  # one field per sample


# ----------------------------------------------------------------------------- intensity


@pytest.mark.parametrize("name", INTENSITY)
def test_intensity_ops_touch_the_image_only_and_stay_in_the_window(name):
    batch = _random_batch()
    batch["image"] = np.clip(batch["image"], -100.0, 100.0)
    out, params = _run_op(name, batch, dataclasses.replace(PLAIN, **{f"{name}_probability": 1.0}))
    assert np.asarray(params["chosen"]).all()
    for key in ("masks", "dist_maps", "annotated"):
        np.testing.assert_array_equal(np.asarray(out[key]), batch[key], err_msg=key)
    image = np.asarray(out["image"])
    assert image.min() >= -100.0 and image.max() <= 100.0
    assert not np.allclose(image, batch["image"])


def test_brightness_and_shift_change_mean_and_std_by_the_drawn_amounts():
    rng = np.random.default_rng(3)
    batch = _batch(rng.uniform(-50, 50, (8, 16, 16, 1)), np.zeros((8, 16, 16, 1)))  # 0.5 window units at most
    units = batch["image"] / 100.0
    out, params = _run_op("brightness", batch, dataclasses.replace(PLAIN, brightness_probability=1.0))
    factor, scaled = np.asarray(params["value"]), np.asarray(out["image"]) / 100.0
    assert factor.min() >= 0.75 and factor.max() <= 1.25 and factor.std() > 0.05
    np.testing.assert_allclose(scaled.mean(axis=(1, 2, 3)), factor * units.mean(axis=(1, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(scaled.std(axis=(1, 2, 3)), factor * units.std(axis=(1, 2, 3)), rtol=1e-4)
    out, params = _run_op("shift", batch, dataclasses.replace(PLAIN, shift_probability=1.0))
    offset, shifted = np.asarray(params["value"]), np.asarray(out["image"]) / 100.0
    assert np.abs(offset).max() <= 0.1
    np.testing.assert_allclose(shifted.mean(axis=(1, 2, 3)), units.mean(axis=(1, 2, 3)) + offset, atol=1e-5)
    np.testing.assert_allclose(shifted.std(axis=(1, 2, 3)), units.std(axis=(1, 2, 3)), rtol=1e-4)


def test_contrast_keeps_the_mean_and_scales_the_spread():
    rng = np.random.default_rng(4)
    batch = _batch(rng.uniform(-40, 60, (8, 16, 16, 2)), np.zeros((8, 16, 16, 1)))
    out, params = _run_op("contrast", batch, dataclasses.replace(PLAIN, contrast_probability=1.0))
    factor, before, after = np.asarray(params["value"]), batch["image"], np.asarray(out["image"])
    np.testing.assert_allclose(after.mean(axis=(1, 2, 3)), before.mean(axis=(1, 2, 3)), atol=1e-3)
    np.testing.assert_allclose(after.std(axis=(1, 2, 3)), factor * before.std(axis=(1, 2, 3)), rtol=1e-4)


@pytest.mark.parametrize("name", ["gamma", "gamma_inverted"])
def test_gamma_one_is_the_identity_and_gamma_keeps_the_window_ends(name):
    ramp = np.linspace(-100.0, 100.0, 64, dtype=np.float32)
    batch = _batch(np.broadcast_to(ramp[None, None, :, None], (6, 4, 64, 1)), np.zeros((6, 4, 64, 1)))
    one = dataclasses.replace(PLAIN, gamma_range=(1.0, 1.0), **{f"{name}_probability": 1.0})
    np.testing.assert_allclose(np.asarray(_run_op(name, batch, one)[0]["image"]), batch["image"], atol=1e-3)
    out, params = _run_op(name, batch, dataclasses.replace(one, gamma_range=(0.7, 1.5)))
    gamma, image = np.asarray(params["value"]), np.asarray(out["image"])[:, 0, :, 0]
    assert gamma.min() >= 0.7 and gamma.max() <= 1.5 and gamma.std() > 0.05
    np.testing.assert_allclose(image[:, [0, -1]], np.tile([-100.0, 100.0], (6, 1)), atol=1e-3)  # 0 and 1 stay
    assert np.all(np.diff(image, axis=1) >= 0.0)  # monotone
    t = (ramp + 100.0) / 200.0
    known = t[None, :] ** gamma[:, None] if name == "gamma" else 1.0 - (1.0 - t[None, :]) ** gamma[:, None]
    np.testing.assert_allclose(image, known * 200.0 - 100.0, atol=1e-3)


def test_noise_has_the_drawn_standard_deviation():
    batch = _batch(np.zeros((8, 64, 64, 2)), np.zeros((8, 64, 64, 1)))  # the window centre: u = 0
    out, params = _run_op("noise", batch, dataclasses.replace(PLAIN, noise_probability=1.0))
    variance, noise = np.asarray(params["value"]), np.asarray(out["image"]) / 100.0
    assert variance.min() >= 0.0 and variance.max() <= 0.1
    np.testing.assert_allclose(noise.std(axis=(1, 2, 3)), np.sqrt(variance), rtol=0.05, atol=0.005)
    assert abs(np.corrcoef(noise[0, ..., 0].ravel(), noise[0, ..., 1].ravel())[0, 1]) < 0.1  # channels independent


def test_blur_of_a_delta_is_the_drawn_gaussian():
    image = np.zeros((6, 21, 21, 1), np.float32)
    image[:, 10, 10, 0] = 100.0  # one window unit at the centre, zero elsewhere
    config = dataclasses.replace(PLAIN, blur_probability=1.0)
    out, params = _run_op("blur", _batch(image, np.zeros_like(image)), config)
    sigma, blurred = np.asarray(params["value"]), np.asarray(out["image"])[..., 0] / 100.0
    assert sigma.min() >= 0.5 and sigma.max() <= 1.0 and intensity.blur_radius(config) == 3
    taps = np.arange(-3, 4)
    offsets = np.arange(21) - 10
    for b, s in enumerate(sigma):
        kernel = np.exp(-0.5 * (taps / s) ** 2)
        kernel /= kernel.sum()
        expected = np.zeros((21, 21))
        expected[7:14, 7:14] = np.outer(kernel, kernel)
        np.testing.assert_allclose(blurred[b], expected, atol=1e-6)
        np.testing.assert_allclose(blurred[b].sum(), 1.0, rtol=1e-5)
        second_moment = (blurred[b].sum(axis=1) * offsets**2).sum()
        assert abs(second_moment - s**2) < 0.04  # a sampled Gaussian of sigma >= 0.5 is that close


# ----------------------------------------------------------------------------- seeds, tracing, config


def test_same_seed_same_batch_different_seed_different_batch():
    batch, weights = _random_batch(), np.array([0.5, 0.1], np.float32)
    first = _numpy(augment.augment_batch(batch, [3, 9], ALL_ON, weights))
    again = _numpy(augment.augment_batch(batch, [3, 9], ALL_ON, weights))
    other = _numpy(augment.augment_batch(batch, [3, 10], ALL_ON, weights))
    for key in first:
        np.testing.assert_array_equal(first[key], again[key], err_msg=key)
    assert not np.allclose(first["image"], other["image"])
    assert first["image"].min() >= -155.001 and first["image"].max() <= 195.001


def test_all_ops_run_traced_and_eagerly_alike():
    batch = _random_batch()
    spec = {key: tf.TensorSpec([None, *value.shape[1:]], tf.float32) for key, value in batch.items()}

    @tf.function(jit_compile=False, input_signature=[spec, tf.TensorSpec([2], tf.int32)])
    def run(batch, seed):
        return augment.augment_batch(batch, seed, ALL_ON, tf.constant([0.5, 0.1]))

    traced = _numpy(run(batch, tf.constant([6, 1])))
    eager = _numpy(augment.augment_batch(batch, [6, 1], ALL_ON, np.array([0.5, 0.1], np.float32)))
    assert traced["image"].shape == (4, 40, 40, 3)
    np.testing.assert_allclose(traced["image"], eager["image"], atol=0.05)
    assert np.mean(traced["masks"] != eager["masks"]) < 1e-3  # a pixel exactly at 0.5 may round either way
    np.testing.assert_allclose(traced["lam"], eager["lam"], atol=1e-6)


def test_nnunet_like_switch_fills_only_the_unset_probabilities():
    config = AugmentConfig(nnunet_like=True, gamma_probability=0.0, rotation_probability=0.5)
    assert {op: config.probability(op) for op in NNUNET_LIKE} == {**NNUNET_LIKE, "gamma": 0.0, "rotation": 0.5}
    names = [op.name for op in augment.active_ops(config)]
    assert names == ["window", "crop_and_warp", "noise", "blur", "brightness", "shift", "contrast",
                     "gamma_inverted", "mixup"]


def test_config_round_trips_loads_old_files_and_takes_overrides():
    config = AugmentConfig(nnunet_like=True, scale_range=(0.8, 1.2), noise_probability=0.3)
    assert configs.from_dict(AugmentConfig, configs.to_dict(config)) == config
    old = load_config(config="configs/openkbp.json")  # written before these fields
    assert old.augment.crop_size == 80 and all(old.augment.probability(op) == 0.0 for op in NNUNET_LIKE)
    new = load_config(config={"augment": {"blur_probability": 0.4, "blur_sigma": [0.5, 1.5]}},
                      overrides=["augment.nnunet_like=true", "augment.rotation_degrees=[-10,10]",
                                 "augment.gamma_probability=0"])
    assert new.augment.blur_sigma == (0.5, 1.5) and new.augment.rotation_degrees == (-10.0, 10.0)
    assert new.augment.probability("blur") == 0.4 and new.augment.probability("gamma") == 0.0
    assert new.augment.probability("scale") == NNUNET_LIKE["scale"]


@pytest.mark.parametrize("settings, message", [
    ({"noise_probability": 1.5}, r"augment.noise_probability=1.5: give a chance in \[0, 1\]"),
    ({"scale_range": (1.4, 0.7)}, r"augment.scale_range=\[1.4, 0.7\]: give \(low, high\) with low <= high"),
    ({"blur_sigma": (0.0, 1.0)}, r"augment.blur_sigma=\[0.0, 1.0\]: .* low > 0.0"),
])
def test_bad_probabilities_and_ranges_are_refused(settings, message):
    with pytest.raises(HnsegError, match=message):
        AugmentConfig(**settings)
