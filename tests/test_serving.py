"""The ``segment_volume`` signature: a whole CT volume -> label map with TensorFlow alone.

Three tiny exports: a random-weight U-Net (segment_volume == Keras slice by slice), a probe that
outputs its input channels (known answers for the neighbour stack and the padding) and the oracle
of test_prediction made size-agnostic (real organs: compared with ``hnseg predict``, and the client
of docs/serving.md run against it in a Python that cannot import hnseg_keras).
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import SimpleITK as sitk
from keras import layers, ops
from test_export import DEFINITIONS, MODEL, randomise
from test_prediction import dice

from hnseg_keras import configs
from hnseg_keras.cli import main
from hnseg_keras.data.cases import Case, image_like
from hnseg_keras.data.organs import label_value
from hnseg_keras.data.slicing import SliceTransform, SlicingConfig, extract_slices
from hnseg_keras.errors import HnsegError
from hnseg_keras.inference import model_io
from hnseg_keras.inference.export import export_run, serving_description
from hnseg_keras.inference.model_io import padding_for
from hnseg_keras.inference.prediction import Predictor, Segmentation
from hnseg_keras.model.unet import HUWindowNormalize, SpatialSizeCheck, build_unet

ORGANS = ("BrainStem", "Parotid_L", "Parotid_R")
SLICING = SlicingConfig(size=40, spacing_mm=1.0, neighbours=1)
ORACLE_SLICING = SlicingConfig(size=48, spacing_mm=1.0, neighbours=1)
DOC = Path(__file__).resolve().parents[1] / "docs" / "serving.md"


def make_run(root: Path, model: keras.Model, slicing: SlicingConfig, definitions=None) -> Path:
    """A run folder as `hnseg train` leaves it (config.json, data.json, best.keras) around any model."""
    run = root / "run"
    run.mkdir(parents=True)
    configs.write_json_atomic(run / "config.json", {})
    shape = (slicing.size, slicing.size, 2 * slicing.neighbours + 1)
    configs.write_json_atomic(run / "data.json", model_io.data_description(
        ORGANS, slicing, shape, {"window": None, "hu_mean": 0.0, "hu_std": 1.0}, "data", "ab" * 32, definitions))
    model.save(run / "best.keras")
    return run


def hu_front(channels: int) -> tuple:
    """(input, HU after the layers `export` requires first): any H and W, raw HU in."""
    ct = keras.Input((None, None, channels), name="ct")
    return ct, HUWindowNormalize(None, 0.0, 1.0, name="hu_window")(SpatialSizeCheck(16, name="size_check")(ct))


def probe_model() -> keras.Model:
    """ct [B, H, W, 3] HU -> probabilities = HU / 1000 of the same 3 channels (what the model was fed)."""
    ct, hu = hu_front(3)
    return keras.Model(ct, layers.Rescaling(1 / 1000, name="probabilities")(hu), name="probe")


def oracle_model() -> keras.Model:
    """test_prediction's oracle on the centre channel, for any slice size: the parotids split at the slice middle."""
    ct, hu = hu_front(3)
    centre = hu[..., 1:2]
    ones = ops.ones_like(centre)
    left = ops.cast(ops.cumsum(ones, axis=2) > (ops.sum(ones, axis=2, keepdims=True) + 1.0) / 2.0, "float32")
    bright, dark = ops.clip(centre / 1000.0, 0.0, 1.0), ops.clip(-centre / 800.0, 0.0, 1.0)
    probabilities = layers.Concatenate(name="probabilities")([dark, bright * left, bright * (1.0 - left)])
    return keras.Model(ct, probabilities, name="oracle")


@pytest.fixture(scope="module")
def unet_export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serving_unet")
    model = build_unet(MODEL)
    randomise(model)
    return export_run(make_run(root, model, SLICING, DEFINITIONS), root / "export")


@pytest.fixture(scope="module")
def probe_export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serving_probe")
    return export_run(make_run(root, probe_model(), SLICING), root / "export")


@pytest.fixture(scope="module")
def oracle_export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serving_oracle")
    return export_run(make_run(root, oracle_model(), ORACLE_SLICING), root / "export")


@functools.cache
def load_saved_model(export: Path):
    """The export's SavedModel, loaded once per export folder."""
    import tensorflow as tf

    return tf.saved_model.load(str(export / "saved_model"))


def segment(loaded, name: str, ct: np.ndarray) -> dict[str, np.ndarray]:
    import tensorflow as tf

    return {key: value.numpy() for key, value in loaded.signatures[name](ct=tf.constant(ct)).items()}


def label_map(probabilities: np.ndarray, definitions=None) -> np.ndarray:
    """``Segmentation.label_map`` of [D, H, W, O] probabilities (what `hnseg predict` writes)."""
    from hnseg_keras.data.organs import catalogue_from

    masks = np.moveaxis(probabilities >= 0.5, -1, 0)
    winner = probabilities.argmax(axis=-1).astype(np.uint8)
    return Segmentation("x", ORGANS, masks, winner, 0.0, len(probabilities), catalogue_from(definitions)).label_map()


# ----------------------------------------------------------------------------- signatures and metadata


def test_metadata_serving_section_and_signatures(unet_export):
    meta = json.loads((unet_export / "metadata.json").read_text())
    serving = meta["serving"]
    volume = serving["signatures"]["segment_volume"]
    assert volume["inputs"] == {"ct": {"dtype": "float32", "shape": [-1, -1, -1]}}
    assert volume["outputs"] == {"labels": {"dtype": "uint8", "shape": [-1, -1, -1]},
                                 "probabilities": {"dtype": "float32", "shape": [-1, -1, -1, 3]}}
    assert serving["signatures"]["segment_volume_int16"]["inputs"]["ct"]["dtype"] == "int16"
    assert serving["signatures"]["serve"]["inputs"]["ct"]["shape"] == [-1, 40, 40, 3]
    assert serving["orientation"] == "LPS" and serving["axes"] == ["z", "y", "x"]
    assert serving["spacing"] == {"mode": "fixed", "in_plane_mm": 1.0, "tolerance": 0.02, "rule": serving["spacing"]["rule"]}
    assert serving["resample"] == {"ct": "linear", "ct_fill_hu": -1024, "labels_back": "nearest"}
    assert serving["threshold"] == 0.5 and serving["pad_hu"] == -1024 and serving["size_multiple"] == 16
    assert set(meta["signatures"]) == {"serving_default", "serve", "serve_int16", "segment_volume",
                                       "segment_volume_int16"}
    assert meta["segment_volume_self_check_max_abs_diff"] <= 1e-5
    assert set(load_saved_model(unet_export).signatures) == set(meta["signatures"])


def test_spacing_rule_of_native_models_matches_predict():
    """The rule in metadata (and the doc client's reading of it) is `Predictor.slicing_for`'s."""
    native = {"median": 0.98, "min": 0.8, "max": 1.2, "cases": 5}
    meta = {"organs": list(ORGANS), "input": {"height": 40, "width": 40, "channels": 3, "pad_hu": -1024,
                                              "size_multiple": 16},
            "slicing": configs.to_dict(SlicingConfig(size=40, spacing_mm=None, neighbours=1)),
            "training_geometry": {"orientation": "LPS", "native_spacing_mm": native}}
    rule = serving_description(meta)["spacing"]
    assert {key: rule[key] for key in ("mode", "median_mm", "min_mm", "max_mm")} == {
        "mode": "native", "median_mm": 0.98, "min_mm": 0.8, "max_mm": 1.2}
    meta["training_geometry"] = None
    assert serving_description(meta)["spacing"]["mode"] == "unknown"
    client = doc_client()
    predictor = Predictor(ORGANS, SlicingConfig(size=40, spacing_mm=None, neighbours=1), 3, "x", None,
                          training_geometry={"native_spacing_mm": native})
    fixed = serving_description({**meta, "slicing": configs.to_dict(SLICING)})["spacing"]
    fixed_predictor = Predictor(ORGANS, SLICING, 3, "x", None)
    for spacing in ((0.79, 0.79), (0.785, 1.0), (1.2, 1.22), (1.25, 1.0), (0.5, 0.5), (1.01, 0.99), (1.03, 1.0)):
        for one_rule, one_predictor in ((rule, predictor), (fixed, fixed_predictor)):
            slicing, note = one_predictor.slicing_for(spacing)
            assert client["target_spacing"](one_rule, spacing) == (slicing.spacing_mm if note else None), spacing


# ----------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("shape", [(19, 37, 45), (1, 1, 1), (2, 16, 33)])
def test_neighbour_stack_clamps_and_odd_sizes_are_padded_and_cropped_back(probe_export, shape):
    """The probe returns its 3 input channels: slices z-1, z, z+1 clamped to the volume, at the input's H x W."""
    depth, height, width = shape
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    hu = (100 * z + 2 * y + x).astype(np.int16)  # distinct along every axis: any shift or mirror shows
    loaded = load_saved_model(probe_export)
    for name, ct in (("segment_volume", hu.astype(np.float32)), ("segment_volume_int16", hu)):
        out = segment(loaded, name, ct)
        assert out["probabilities"].shape == (*shape, 3) and out["probabilities"].dtype == np.float32
        assert out["labels"].shape == shape and out["labels"].dtype == np.uint8
        for channel, step in enumerate((-1, 0, 1)):
            source = np.clip(np.arange(depth) + step, 0, depth - 1)  # e.g. [0, 0, 1, ..] and [.., 18, 18]
            np.testing.assert_allclose(out["probabilities"][..., channel], hu[source] / 1000.0, rtol=1e-6)
        np.testing.assert_array_equal(out["labels"], label_map(out["probabilities"]))
    if depth == 19:  # an organ from 500 HU on; the upper neighbour (channel 2) holds the most HU
        assert out["labels"][3, 0, 0] == 0  # 400 HU at z + 1
        assert out["labels"][6, 0, 0] == label_value("Parotid_R")  # 700 HU at z + 1
        assert out["labels"][18, -1, -1] == label_value("Parotid_L")  # top slice: channels 1 and 2 tie, the first wins


def test_model_with_a_fixed_slice_size_is_refused(tmp_path):
    ct = keras.Input((40, 40, 3), name="ct")
    hu = HUWindowNormalize(None, 0.0, 1.0, name="hu_window")(SpatialSizeCheck(16, name="size_check")(ct))
    fixed = keras.Model(ct, layers.Rescaling(1 / 1000, name="probabilities")(hu))
    with pytest.raises(HnsegError, match=r"takes only 40x40 slices; segment_volume feeds whole slices"):
        export_run(make_run(tmp_path, fixed, SLICING), tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_empty_volume_is_refused_with_a_message(probe_export):
    import tensorflow as tf

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"needs at least one slice"):
        segment(load_saved_model(probe_export), "segment_volume", np.zeros((0, 8, 8), np.float32))


@pytest.mark.parametrize("shape", [(17, 40, 40), (1, 33, 47)])
def test_segment_volume_equals_keras_slice_by_slice(unet_export, shape):
    """Random weights, every channel used: the slices of `slicing.extract_slices` through model.keras, padded here."""
    depth, height, width = shape
    hu = np.random.default_rng(5).integers(-1024, 1600, size=shape).astype(np.int16)
    whole = SliceTransform((width, height, depth), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                           (width, height), (1.0, 1.0), ((width - 1) / 2, (height - 1) / 2))  # identity grid
    slices = extract_slices(hu, whole, neighbours=1)
    assert np.array_equal(slices[..., 1], hu)
    (top, bottom), (left, right) = padding_for(height, 16), padding_for(width, 16)
    padded = np.pad(slices.astype(np.float32), [(0, 0), (top, bottom), (left, right), (0, 0)], constant_values=-1024)
    model = keras.saving.load_model(unet_export / "model.keras", compile=False)
    want = np.asarray(model.predict_on_batch(padded))[:, top:top + height, left:left + width]
    assert want.std() > 1e-3  # random weights: not a constant map
    loaded = load_saved_model(unet_export)
    for name, ct in (("segment_volume", hu.astype(np.float32)), ("segment_volume_int16", hu)):
        out = segment(loaded, name, ct)
        np.testing.assert_allclose(out["probabilities"], want, atol=1e-5)
        np.testing.assert_array_equal(out["labels"], label_map(out["probabilities"], DEFINITIONS))


# ----------------------------------------------------------------------------- without hnseg_keras


def phantom(shape_zyx, spacing) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """test_prediction's oracle phantom on any grid: 0 HU tissue, parotids +1000 HU, brainstem -800 HU."""
    spacing_zyx = spacing[::-1]
    grid = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape_zyx, spacing_zyx, strict=True)), indexing="ij")
    centre = [(n - 1) * s / 2 for n, s in zip(shape_zyx, spacing_zyx, strict=True)]

    def ellipsoid(offset_zyx, radii_zyx):
        return sum(((g - c - o) / r) ** 2 for g, c, o, r in zip(grid, centre, offset_zyx, radii_zyx, strict=True)) <= 1

    truth = {"BrainStem": ellipsoid((3.0, 4.0, 0.0), (6.0, 5.0, 5.0)),
             "Parotid_L": ellipsoid((-3.0, 0.0, 12.0), (6.0, 8.0, 6.0)),  # patient left = +x
             "Parotid_R": ellipsoid((-3.0, 0.0, -12.0), (6.0, 8.0, 6.0))}
    ct = np.zeros(shape_zyx, np.int16)
    ct[truth["BrainStem"]] = -800
    ct[truth["Parotid_L"] | truth["Parotid_R"]] = 1000
    return ct, {name: mask.astype(np.uint8) for name, mask in truth.items()}


RAS_GRID = ((12, 64, 70), (0.9, 0.9, 2.5))  # the doc client's input: finer than the model's 1 mm


def stored_ras(array: np.ndarray) -> sitk.Image:
    """An LPS array on RAS_GRID as an image stored RAS (x and y reversed), as many NIfTI files are."""
    return sitk.DICOMOrient(image_like(array, Case("ras", array, RAS_GRID[1], origin=(-30.0, 10.0, 5.0))), "RAS")


def doc_client() -> dict:
    """The python code block of docs/serving.md, executed: its functions by name."""
    code = doc_code()
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102  (our own documentation)
    return namespace


def doc_code() -> str:
    blocks = [block for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
              if "def segment_file" in block]
    assert len(blocks) == 1, "docs/serving.md must hold one python block with segment_file"
    return blocks[0]


STANDALONE = textwrap.dedent("""
    import importlib.util
    import sys

    # The dev venv imports hnseg_keras through an editable-install finder: drop it, then prove it is gone.
    # (-I and a working folder outside the repo keep the source tree off sys.path.)
    sys.meta_path[:] = [f for f in sys.meta_path if "hnseg_keras" not in getattr(f, "__module__", "")]
    assert importlib.util.find_spec("hnseg_keras") is None, "hnseg_keras is importable"
    import numpy as np
    import tensorflow as tf

    export = sys.argv[1]
    model = tf.saved_model.load(export + "/saved_model")
    out = model.signatures["segment_volume"](ct=tf.constant(np.load("lps.npy")))
    np.save("labels.npy", out["labels"].numpy())
    namespace = {}
    exec(compile(open("client.py").read(), "docs/serving.md", "exec"), namespace)
    namespace["segment_file"](export, "ras.nrrd", "ras_labels.nrrd")
    print(sorted(name for name in sys.modules if name.split(".")[0] == "hnseg_keras"))
""")


@pytest.fixture(scope="module")
def standalone(oracle_export, tmp_path_factory) -> Path:
    """Run segment_volume and the doc client in a Python without hnseg_keras; returns the folder of their outputs.

    Inputs: ``lps.npy`` (the phantom in LPS at the model's 1 mm, odd H and W) and ``ras.nrrd`` (the
    phantom at 0.9 mm stored RAS, which the client must orient and resample).
    """
    work = tmp_path_factory.mktemp("standalone")
    ct, _ = phantom((12, 61, 67), (1.0, 1.0, 2.5))
    np.save(work / "lps.npy", ct.astype(np.float32))
    sitk.WriteImage(image_like(ct, Case("lps", ct, (1.0, 1.0, 2.5), origin=(-30.0, 10.0, 5.0))), str(work / "lps.nrrd"))
    sitk.WriteImage(stored_ras(phantom(*RAS_GRID)[0]), str(work / "ras.nrrd"))
    (work / "client.py").write_text(doc_code())
    env = {"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2", "HOME": str(work)}
    done = subprocess.run([sys.executable, "-I", "-c", STANDALONE, str(oracle_export)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"  # no module of hnseg_keras was ever imported
    return work


@pytest.mark.slow
def test_segment_volume_without_hnseg_keras_matches_hnseg_predict(standalone, oracle_export):
    assert main(["predict", str(standalone / "lps.nrrd"), "--model", str(oracle_export), "--out",
                 str(standalone / "pred")]) == 0
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(standalone / "pred" / "lps.nrrd")))
    served = np.load(standalone / "labels.npy")
    _, truth = phantom((12, 61, 67), (1.0, 1.0, 2.5))
    assert served.shape == predicted.shape == (12, 61, 67) and served.dtype == np.uint8
    for name in ORGANS:
        value = label_value(name)
        assert truth[name].any() and dice(served == value, predicted == value) >= 0.99, name
        assert dice(served == value, truth[name]) >= 0.99, name
    assert set(np.unique(served)) == {0, *(label_value(name) for name in ORGANS)}


@pytest.mark.slow
def test_serving_doc_client_runs_against_an_export(standalone, oracle_export):
    """docs/serving.md's client on a 0.9 mm RAS file: labels on that file's grid, agreeing with `hnseg predict`."""
    assert main(["predict", str(standalone / "ras.nrrd"), "--model", str(oracle_export), "--out",
                 str(standalone / "pred_ras")]) == 0
    source = sitk.ReadImage(str(standalone / "ras.nrrd"))
    written = sitk.ReadImage(str(standalone / "ras_labels.nrrd"))
    assert written.GetSize() == source.GetSize() and written.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(written.GetSpacing(), source.GetSpacing())
    np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin())
    np.testing.assert_allclose(written.GetDirection(), source.GetDirection())
    client = sitk.GetArrayFromImage(written)
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(standalone / "pred_ras" / "ras.nrrd")))
    truth = {name: sitk.GetArrayFromImage(stored_ras(mask)) for name, mask in phantom(*RAS_GRID)[1].items()}
    for name in ORGANS:
        value = label_value(name)
        assert dice(client == value, predicted == value) >= 0.95, name
        assert dice(client == value, truth[name]) >= 0.95, name
