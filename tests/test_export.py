"""Export of a (tiny, random-weight) run: folder layout, metadata, SavedModel == Keras, loaders, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from hnseg_keras import configs
from hnseg_keras.cli import main
from hnseg_keras.data.cases import Case
from hnseg_keras.data.slicing import SlicingConfig
from hnseg_keras.errors import HnsegError
from hnseg_keras.inference import model_io
from hnseg_keras.inference.export import export_run
from hnseg_keras.inference.model_io import normalisation_of, padding_for
from hnseg_keras.inference.prediction import load_predictor, segment_case
from hnseg_keras.model.unet import build_unet, variant_config
from hnseg_keras.training.trainer import TrainConfig

ORGANS = ("BrainStem", "Parotid_L", "Parotid_R")
SLICING = SlicingConfig(size=40, spacing_mm=1.0, neighbours=1)  # 40 is not a multiple of 16: padded to 48
DEFINITIONS = {"BrainStem": {"label": 1, "aliases": ["Brainstem"], "partner": None, "tolerance_mm": 2.5,
                              "colour": [255, 64, 64]}}
MODEL = variant_config("S", filters=(4, 4, 8, 8, 8), num_organs=3, input_channels=3, hu_mean=20.0, hu_std=90.0)


def randomise(model: keras.Model, seed: int = 0) -> None:
    """Random weights everywhere (batch-norm variances positive) so the comparison is not all 0.5."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if "variance" in variable.path:
            variable.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))
        else:
            variable.assign(rng.normal(0.0, 0.3, shape).astype("float32"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as `hnseg train` leaves it: config.json, data.json, best.keras; its shards are gone."""
    root = tmp_path_factory.mktemp("export_run")
    run = root / "run"
    run.mkdir()
    config = TrainConfig(variant="S", model=MODEL, data=str(root / "gone" / "manifest.json"))
    configs.write_json_atomic(run / "config.json", configs.to_dict(config))
    description = model_io.data_description(ORGANS, SLICING, (40, 40, 3),
                                            {"window": [-155.0, 195.0], "hu_mean": 20.0, "hu_std": 90.0},
                                            "gone", "ab" * 32, DEFINITIONS)
    configs.write_json_atomic(run / "data.json", description)
    model = build_unet(MODEL)
    randomise(model)
    model.save(run / "best.keras")
    return run


@pytest.fixture(scope="module")
def exported(run_dir):
    return export_run(run_dir, run_dir.parent / "export")


def random_hu(shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 1600, size=shape).astype(np.int16)


def keras_reference(model_path, hu: np.ndarray) -> np.ndarray:
    """The Keras model on air-padded slices (to 48), cropped back to 40."""
    model = keras.saving.load_model(model_path, compile=False)
    padded = np.pad(hu.astype(np.float32), [(0, 0), (4, 4), (4, 4), (0, 0)], constant_values=-1024)
    return np.asarray(model.predict_on_batch(padded))[:, 4:44, 4:44]


def test_padding_for_is_centred():
    assert padding_for(40, 16) == (4, 4)
    assert padding_for(280, 16) == (4, 4)
    assert padding_for(35, 16) == (6, 7)
    assert padding_for(48, 16) == (0, 0)


def test_export_folder_and_metadata(exported, run_dir):
    assert sorted(p.name for p in exported.iterdir()) == ["metadata.json", "model.keras", "saved_model"]
    assert (exported / "model.keras").read_bytes() == (run_dir / "best.keras").read_bytes()
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    meta = json.loads((exported / "metadata.json").read_text())
    assert meta["organs"] == list(ORGANS)
    assert meta["labels"] == {"BrainStem": 1, "Parotid_L": 6, "Parotid_R": 7}
    assert configs.from_dict(SlicingConfig, meta["slicing"]) == SLICING
    assert meta["window"] == [-155.0, 195.0] and meta["hu_mean"] == 20.0 and meta["hu_std"] == 90.0
    assert meta["input"]["height"] == 40 and meta["input"]["channels"] == 3
    assert meta["input"]["padding"] == [[4, 4], [4, 4]] and meta["input"]["size_multiple"] == 16
    assert meta["source_run"] == "run" and meta["which"] == "best"
    assert meta["organ_definitions"] == DEFINITIONS and meta["manifest"] == "gone"
    assert "/" not in json.dumps({key: value for key, value in meta.items() if key not in ("model_config", "files")})
    assert meta["self_check_max_abs_diff"] <= 1e-5


def test_normalisation_is_the_models_first_layer():
    model = build_unet(MODEL)
    assert normalisation_of(model) == {"window": [-155.0, 195.0], "hu_mean": 20.0, "hu_std": 90.0}
    plain = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Conv2D(1, 1)])
    with pytest.raises(HnsegError, match="hu_window"):
        normalisation_of(plain)


@pytest.mark.slow
def test_saved_model_in_subprocess_without_hnseg_keras_matches_keras(exported, tmp_path):
    hu = random_hu((3, 40, 40, 3))
    fractional = hu.astype(np.float32) + np.float32(0.25)
    np.save(tmp_path / "hu16.npy", hu)
    np.save(tmp_path / "hu32.npy", fractional)
    script = textwrap.dedent("""
        import sys
        sys.modules["hnseg_keras"] = None  # any import of the package now fails
        import numpy as np
        import tensorflow as tf
        model = tf.saved_model.load(sys.argv[1])
        x32, x16 = np.load("hu32.npy"), np.load("hu16.npy")
        assert x16.dtype == np.int16
        np.save("out32.npy", model.signatures["serving_default"](ct=tf.constant(x32))["probabilities"].numpy())
        np.save("out16.npy", model.signatures["serve_int16"](ct=tf.constant(x16))["probabilities"].numpy())
        print(sorted(name for name in sys.modules if name.startswith("hnseg")))
    """)
    env = {"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script, str(exported / "saved_model")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "['hnseg_keras']"  # only the blocking None entry
    for name, x in (("out32.npy", fractional), ("out16.npy", hu)):
        got = np.load(tmp_path / name)
        want = keras_reference(exported / "model.keras", x)
        assert got.shape == (3, 40, 40, 3)
        assert np.abs(got - want).max() <= 1e-5
        assert got.std() > 1e-3  # random weights: not a constant map


def test_loaders_agree_and_segment_a_case(exported, run_dir):
    hu = random_hu((2, 40, 40, 3), seed=2)
    from_saved = load_predictor(exported, saved_model=True).predict_slices(hu, batch_size=2)
    from_keras = load_predictor(exported / "model.keras").predict_slices(hu, batch_size=2)
    from_run = load_predictor(run_dir)
    assert from_run.organs == ORGANS and from_run.slicing == SLICING and from_run.channels == 3
    np.testing.assert_allclose(from_saved, keras_reference(exported / "model.keras", hu), atol=1e-5)
    np.testing.assert_allclose(from_keras, from_saved, atol=1e-5)
    case = Case("tiny", random_hu((5, 36, 44), seed=3), (1.2, 1.2, 3.0))
    masks = segment_case(case, load_predictor(exported / "saved_model", saved_model=True), batch_size=2).mask_dict()
    assert list(masks) == list(ORGANS)
    assert all(mask.shape == (5, 36, 44) and mask.dtype == np.uint8 for mask in masks.values())


def test_export_cli_errors(run_dir, exported, tmp_path, capsys):
    def one_line() -> str:
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        return err

    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "run folder not found" in one_line()
    assert main(["export", str(run_dir), "--out", str(exported)]) == 2
    assert "--force" in one_line()
    assert main(["export", str(run_dir), "--out", str(tmp_path / "x"), "--which", "final"]) == 2
    assert "best.keras" in one_line()
    moved = tmp_path / "old_run"
    moved.mkdir()
    (moved / "best.keras").write_bytes((run_dir / "best.keras").read_bytes())
    (moved / "config.json").write_text((run_dir / "config.json").read_text())
    assert main(["export", str(moved), "--out", str(tmp_path / "x")]) == 2
    assert "data.json" in one_line()
    assert not (tmp_path / "x").exists()


def test_metadata_of_a_run_with_user_defined_organs():
    """Organs outside the built-in catalogue reach the export with the label values they were trained with."""
    definitions = {"BrainStem": {"label": 1, "aliases": [], "partner": None, "tolerance_mm": 2.5, "colour": [1, 2, 3]},
                   "Cochlea_L": {"label": 20, "aliases": ["Cochlea Left"], "partner": None, "tolerance_mm": 1.0,
                                 "colour": [200, 10, 10]}}
    described = model_io.data_description(["BrainStem", "Cochlea_L"], SLICING, (40, 40, 3),
                                          {"window": [-155.0, 195.0], "hu_mean": 0.0, "hu_std": 1.0}, "ears",
                                          "ab" * 32, definitions)
    meta = model_io.model_metadata(described, None)
    assert meta["organs"] == ["BrainStem", "Cochlea_L"]
    assert meta["labels"] == {"BrainStem": 1, "Cochlea_L": 20}
    assert meta["organ_definitions"] == definitions
