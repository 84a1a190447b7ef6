"""The device-side code (model, losses, metrics, augmentation) gives the same numbers under JAX.

The GPU machine has JAX but no TensorFlow, so everything written with ``keras.ops`` must run and
agree there. This process (TensorFlow backend) computes reference values on fixed inputs; a
subprocess with ``KERAS_BACKEND=jax`` loads the same saved model, recomputes them and trains a few
steps. Skipped where JAX is not installed (``pip install -e '.[dev]'`` brings it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from hnseg_keras.inputs.augment import AugmentConfig, apply_ops, draw_params
from hnseg_keras.inputs.targets import pack_targets
from hnseg_keras.model.losses import SegmentationLoss
from hnseg_keras.model.metrics import dice_metrics
from hnseg_keras.model.unet import UNetConfig, build_unet

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed")

ORGANS = ("BrainStem", "Parotid_L")
LOSS = {"focal_weight": 1.0, "dice_weight": 1.0, "boundary_weight": 0.5}
AUGMENT = AugmentConfig(crop_size=24, warp_probability=1.0, mixup=True)


def _inputs() -> dict[str, np.ndarray]:
    """Two 32 px slices: a bright square (organ 0) and a dark disc (organ 1, unannotated in sample 1)."""
    rng = np.random.default_rng(7)
    yy, xx = np.indices((32, 32))
    square = ((abs(yy - 12) <= 5) & (abs(xx - 14) <= 5)).astype(np.float32)
    disc = (((yy - 22) ** 2 + (xx - 20) ** 2) <= 16).astype(np.float32)
    masks = np.stack([np.stack([square, disc], -1), np.stack([np.roll(square, 3, 1), disc * 0], -1)])
    image = (-50 + 120 * masks[..., :1] - 90 * masks[..., 1:] + rng.normal(0, 10, (2, 32, 32, 1))).astype(np.float32)
    dist = np.where(masks > 0, -1.0, 1.0) * (1 + rng.uniform(0, 4, masks.shape)).astype(np.float32)
    annotated = np.array([[1, 1], [1, 0]], np.float32)
    return {"image": image, "masks": masks, "dist_maps": dist.astype(np.float32), "annotated": annotated}


def _numpy(tree):
    return {key: keras.ops.convert_to_numpy(value) for key, value in tree.items()}


JAX_SCRIPT = textwrap.dedent("""
    import json, sys
    import keras
    import numpy as np
    assert keras.backend.backend() == "jax", keras.backend.backend()
    from hnseg_keras.model import unet as _registers_layers  # noqa: F401
    from hnseg_keras.inputs.augment import AugmentConfig, apply_ops
    from hnseg_keras.model.losses import SegmentationLoss
    from hnseg_keras.model.metrics import dice_metrics

    folder = sys.argv[1]
    ref = dict(np.load(f"{folder}/inputs.npz"))
    spec = json.load(open(f"{folder}/spec.json"))
    model = keras.saving.load_model(f"{folder}/model.keras")
    probs = keras.ops.convert_to_numpy(model(ref["image"], training=False))
    loss = SegmentationLoss(len(spec["organs"]), **spec["loss"])
    loss_value = float(loss(ref["y"], probs))
    dice = dice_metrics(spec["organs"])[0]
    dice.update_state(ref["y"], probs)
    params = {}
    for key, value in ref.items():
        if key.startswith("draw__"):
            _, op, name = key.split("__")
            params.setdefault(op, {})[name] = value
    batch = {key: ref[key] for key in ("image", "masks", "dist_maps", "annotated")}
    augment = AugmentConfig(**{**spec["augment"], "window": tuple(spec["augment"]["window"])})
    augmented = apply_ops(batch, params, augment, ref["organ_weights"])
    np.savez(f"{folder}/jax.npz", probs=probs, **{f"aug__{k}": keras.ops.convert_to_numpy(v)
                                                   for k, v in augmented.items()})
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss)
    history = model.fit(ref["image"], ref["y"], batch_size=2, epochs=40, verbose=0, shuffle=False)
    print(json.dumps({"loss": loss_value, "dice": float(dice.result()), "fit": history.history["loss"]}))
""")


def test_model_losses_metrics_and_augmentation_agree_under_jax(tmp_path):
    inputs = _inputs()
    config = UNetConfig(filters=(4, 8, 16), convs_per_unit=2, input_channels=1, num_organs=len(ORGANS),
                        hu_mean=-40.0, hu_std=80.0, name="tiny")
    keras.utils.set_random_seed(3)
    model = build_unet(config)
    model.save(tmp_path / "model.keras")
    y = keras.ops.convert_to_numpy(pack_targets(inputs["masks"], inputs["dist_maps"], inputs["annotated"]))
    probs = keras.ops.convert_to_numpy(model(inputs["image"], training=False))
    loss_value = float(SegmentationLoss(len(ORGANS), **LOSS)(y, probs))
    dice = dice_metrics(ORGANS)[0]
    dice.update_state(y, probs)
    organ_weights = np.array([0.3, 0.7], np.float32)
    params = {op: _numpy(drawn) for op, drawn in draw_params(inputs, np.array([5, 9], np.int32), AUGMENT).items()}
    augmented = _numpy(apply_ops(inputs, params, AUGMENT, organ_weights))
    np.savez(tmp_path / "inputs.npz", y=y, organ_weights=organ_weights, **inputs,
             **{f"draw__{op}__{key}": value for op, drawn in params.items() for key, value in drawn.items()})
    spec = {"organs": ORGANS, "loss": LOSS, "augment": dataclasses.asdict(AUGMENT)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))

    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", JAX_SCRIPT, str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    from_jax = dict(np.load(tmp_path / "jax.npz"))

    np.testing.assert_allclose(from_jax["probs"], probs, atol=1e-5)
    assert report["loss"] == pytest.approx(loss_value, rel=1e-5)
    assert report["dice"] == pytest.approx(float(dice.result()), abs=1e-6)
    assert {key[5:] for key in from_jax if key.startswith("aug__")} == set(augmented)
    for key, value in augmented.items():
        # HU-scaled images: float32 rounding of the smoothed warp field differs by ~1e-4 HU between backends.
        np.testing.assert_allclose(from_jax[f"aug__{key}"], value, rtol=1e-5, atol=1e-3, err_msg=key)
    # Gradients flow through the masked losses under JAX: 40 steps on one batch must fit it.
    assert report["fit"][-1] < 0.5 * report["fit"][0]
