"""Residual U-Net: parameter counts, shapes, input checks, preprocessing and .keras round trip."""

import dataclasses

import keras
import numpy as np
import pytest

from hnseg_keras import configs
from hnseg_keras.errors import HnsegError
from hnseg_keras.inputs.targets import pack_targets
from hnseg_keras.model.losses import SegmentationLoss, focal_terms
from hnseg_keras.model.metrics import dice_metrics
from hnseg_keras.model.unet import (
    VARIANTS,
    HUWindowNormalize,
    OrganProbabilities,
    SpatialSizeCheck,
    UNetConfig,
    build_unet,
    check_image_size,
    variant_config,
)


def _tiny(**overrides):
    """A 3-level, 8..32-filter net: multiples of 4, builds and runs in well under a second."""
    base = {"filters": (8, 16, 32), "num_organs": 3, "name": "tiny"}
    return UNetConfig(**{**base, **overrides})


@pytest.mark.parametrize(("variant", "paper"), [("L", 26.0e6), ("M", 13.5e6)])
def test_parameter_count_matches_paper(variant, paper):
    model = build_unet(variant_config(variant))
    assert abs(model.count_params() - paper) / paper < 0.10


def test_l_adds_one_3x3_conv_per_encoder_level_to_m():
    # Analytic: the second unit of each level is one bias-free 3x3 conv f -> f plus a BatchNorm (4 f).
    extra = sum(9 * f * f + 4 * f for f in VARIANTS["M"].filters)
    diff = build_unet(variant_config("L")).count_params() - build_unet(variant_config("M")).count_params()
    assert diff == extra


@pytest.mark.parametrize("size", [32, 48])
def test_small_variant_forward_pass(size):
    model = build_unet(variant_config("S", num_organs=3))
    ct = np.random.default_rng(0).uniform(-1024, 1500, (2, size, size, 1)).astype("float32")
    out = keras.ops.convert_to_numpy(model(ct, training=False))
    assert out.shape == (2, size, size, 3)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_two_point_five_d_input():
    model = build_unet(_tiny(input_channels=3))
    assert model.input_shape == (None, None, None, 3)
    assert model(np.zeros((1, 8, 8, 3), "float32")).shape == (1, 8, 8, 3)


def test_size_not_a_multiple_of_16_raises():
    model = build_unet(variant_config("S", num_organs=2))
    with pytest.raises(HnsegError, match="multiple of 16"):
        model(np.zeros((1, 40, 40, 1), "float32"))
    with pytest.raises(HnsegError, match="multiple of 16"):
        build_unet(variant_config("S"), image_size=(64, 72))
    with pytest.raises(HnsegError, match="multiple of 8"):
        check_image_size(64, 36, 8)
    check_image_size(None, 48)  # unknown sizes pass; 48 = 3 x 16


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"input_channels": 2}, "2k\\+1"), ({"norm": "layer"}, "norm"), ({"filters": (8,)}, "filters")],
)
def test_invalid_config_raises(overrides, message):
    with pytest.raises(HnsegError, match=message):
        _tiny(**overrides)


def test_variant_config_errors_and_overrides():
    assert variant_config("m", num_organs=4).num_organs == 4
    with pytest.raises(HnsegError, match="XL"):
        variant_config("XL")
    with pytest.raises(HnsegError, match="units"):
        variant_config("S", units=3)


def test_config_json_round_trip():
    for config in (*VARIANTS.values(), _tiny(hu_mean=-300.0, hu_std=450.0)):
        assert configs.from_dict(UNetConfig, configs.to_dict(config)) == config


def test_every_layer_is_named_by_role():
    model = build_unet(variant_config("M"))
    names = {layer.name for layer in model.layers}
    assert {"ct", "hu_window", "enc0_unit1_conv1", "enc2_unit1_proj", "enc4_unit1_conv1_norm",
            "dec0_up", "dec3_concat", "dec1_unit1_add", "head_conv", "probabilities"} <= names
    auto = [n for n in names if n.split("_")[0] in {"conv2d", "add", "activation", "batch", "concatenate"}]
    assert auto == []
    assert len(names) == len(model.layers)


def test_window_normalisation_values():
    layer = HUWindowNormalize((-155.0, 195.0), mean=20.0, std=175.0)
    hu = np.array([[[[-1000.0], [20.0], [195.0], [3000.0]]]], "float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(hu)).ravel(), [-1.0, 0.0, 1.0, 1.0])
    full = HUWindowNormalize(None, mean=0.0, std=1.0)
    hu = np.array([[[[-2000.0], [0.0], [5000.0]]]], "float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(full(hu)).ravel(), [-1024.0, 0.0, 3071.0])


def test_default_statistics_map_window_to_unit_range():
    clip, mean, std = UNetConfig().normalization()
    assert clip == (-155.0, 195.0) and mean == 20.0 and std == 175.0
    clip, mean, std = UNetConfig(hu_mean=-400.0, hu_std=500.0).normalization(None)
    assert clip == (-1024.0, 3071.0) and (mean, std) == (-400.0, 500.0)
    with pytest.raises(HnsegError, match="low < high"):
        UNetConfig().normalization((200.0, 100.0))


def test_the_model_clips_to_the_window_it_is_built_with():
    """The window is the training input's (AugmentConfig.window), not a field of UNetConfig."""
    assert "window" not in {field.name for field in dataclasses.fields(UNetConfig)}
    layer = build_unet(_tiny(hu_mean=0.0, hu_std=1.0), window=(-100.0, 300.0)).get_layer("hu_window")
    assert layer.window == (-100.0, 300.0)
    assert build_unet(_tiny()).get_layer("hu_window").window == (-155.0, 195.0)  # the paper's, by default


def test_organ_probabilities_keep_a_gradient_where_the_sigmoid_has_none():
    import tensorflow as tf

    logits = np.array([-60.0, -30.0, -3.0, 0.0, 3.0, 60.0], "float32").reshape(1, 1, 6, 1)
    layer = OrganProbabilities()
    p = keras.ops.convert_to_numpy(layer(logits)).ravel()
    sigmoid = 1.0 / (1.0 + np.exp(-logits.ravel().astype("float64")))
    np.testing.assert_allclose(p, np.clip(sigmoid, 1e-7, 1 - 1e-7), rtol=1e-6, atol=1e-12)
    assert p.min() == np.float32(1e-7) and p.max() == np.float32(1 - 1e-7)

    # Every pixel is organ: the focal loss asks every logit to rise. Through a plain sigmoid the two
    # lowest get (almost) nothing; through the layer each still gets about -0.5 / 6 (pixel mean).
    def gradient(head):
        z = tf.Variable(logits)
        with tf.GradientTape() as tape:
            loss = keras.ops.sum(focal_terms(head(z), np.ones_like(logits)))
        return tape.gradient(loss, z).numpy().ravel()

    plain, floored = gradient(keras.ops.sigmoid), gradient(layer)
    assert np.all(np.abs(plain[:2]) < 1e-6)
    np.testing.assert_allclose(floored[:2], -0.5 / 6, rtol=0.02)
    np.testing.assert_allclose(floored[2:5], plain[2:5], rtol=1e-5)  # unchanged where the sigmoid is alive


def test_layers_config_round_trip():
    for layer in (HUWindowNormalize((-100.0, 300.0), 12.5, 80.0, name="w"), SpatialSizeCheck(8, name="s"),
                  OrganProbabilities(1e-6, name="p")):
        config = layer.get_config()
        clone = type(layer).from_config(config)
        assert clone.get_config() == config


def test_keras_file_round_trip_with_loss_and_metrics(tmp_path):
    config = dataclasses.replace(_tiny(), hu_mean=-50.0, hu_std=300.0)
    model = build_unet(config)
    model.compile(optimizer="adam", loss=SegmentationLoss(3, boundary_weight=0.01), metrics=dice_metrics(
        ["BrainStem", "Chiasm", "Mandible"]))
    ct = np.random.default_rng(1).uniform(-1000, 1000, (2, 16, 16, 1)).astype("float32")
    masks = (ct[..., :1] > 0).astype("float32") * np.ones((1, 1, 1, 3), "float32")
    model.train_on_batch(ct, pack_targets(masks, 1.0 - 2.0 * masks, np.ones((2, 3), "float32")))
    expected = keras.ops.convert_to_numpy(model(ct))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(ct)), expected)
    assert loaded.get_layer("hu_window").get_config()["mean"] == -50.0
    assert isinstance(loaded.loss, SegmentationLoss)
    assert loaded.loss.get_config() == model.loss.get_config()
