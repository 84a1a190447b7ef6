"""Trusted models only, folder prediction that survives bad cases, one writer per folder, image checks.

A tiny random-weight export (40 px slices, 3 channels, 3 organs) is damaged in the ways a user or
an attacker could, and each must be refused in one line before anything runs or is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hnseg_keras import configs
from hnseg_keras.cli import main
from hnseg_keras.data import checks
from hnseg_keras.data.cases import Case, image_like
from hnseg_keras.data.shards import Manifest
from hnseg_keras.data.slicing import SlicingConfig
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import FolderLock
from hnseg_keras.inference import batch, model_io
from hnseg_keras.inference.export import export_run
from hnseg_keras.inference.prediction import load_predictor
from hnseg_keras.model.unet import build_unet, variant_config
from hnseg_keras.training.trainer import TrainConfig

ORGANS = ("BrainStem", "Parotid_L", "Parotid_R")
SLICING = SlicingConfig(size=40, spacing_mm=1.0, neighbours=1)
MODEL = variant_config("S", filters=(4, 4, 8, 8, 8), num_organs=3, input_channels=3, hu_mean=20.0, hu_std=90.0)
VARIABLES = "saved_model/variables/variables.data-00000-of-00001"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trust")
    manifest_path = root / "data" / "manifest.json"
    Manifest(organs=list(ORGANS), slicing=configs.to_dict(SLICING), image_shape=[40, 40, 3],
             complete=True).save(manifest_path)
    run = root / "run"
    run.mkdir()
    configs.write_json_atomic(run / "config.json",
                              configs.to_dict(TrainConfig(variant="S", model=MODEL, data=str(manifest_path))))
    configs.write_json_atomic(run / "data.json", model_io.data_description(
        ORGANS, SLICING, (40, 40, 3), {"window": [-155.0, 195.0], "hu_mean": 20.0, "hu_std": 90.0}, "data",
        "ab" * 32, None))
    build_unet(MODEL).save(run / "best.keras")
    return export_run(run, root / "export")


@pytest.fixture
def copy(export, tmp_path) -> Path:
    return Path(shutil.copytree(export, tmp_path / "export"))


def ct_file(folder: Path, name: str, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    ct = rng.integers(-1000, 1200, size=(4, 36, 44)).astype(np.int16)
    path = folder / f"{name}.nrrd"
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image_like(ct, Case(name, ct, (1.2, 1.2, 3.0))), str(path))
    return path


def edit_metadata(folder: Path, change) -> None:
    path = folder / "metadata.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- model trust


def test_export_records_sha256_and_no_absolute_paths(export):
    text = (export / "metadata.json").read_text()
    files = json.loads(text)["files"]
    assert {"model.keras", "saved_model/saved_model.pb", VARIABLES} <= set(files)
    on_disk = {p.relative_to(export).as_posix() for p in (export / "saved_model").rglob("*") if p.is_file()}
    assert on_disk | {"model.keras"} == set(files)
    assert str(export.parent) not in text and '"/' not in text  # no absolute path of this machine


def test_truncated_variables_refused_for_the_saved_model_only(copy):
    path = copy / VARIABLES
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(HnsegError, match=r"variables\.data-00000-of-00001: sha256 differs"):
        load_predictor(copy, saved_model=True)
    assert load_predictor(copy).channels == 3  # model.keras (safe mode) is untouched and still verified


def test_saved_model_that_writes_a_file_is_never_run(copy, tmp_path):
    import tensorflow as tf

    marker = tmp_path / "pwned.txt"

    class Evil(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 40, 40, 3], tf.int16, name="ct")])
        def serve_int16(self, ct):
            tf.io.write_file(str(marker), "ran")
            return {"probabilities": tf.zeros(tf.concat([tf.shape(ct)[:3], [3]], 0))}

    evil = Evil()
    shutil.rmtree(copy / "saved_model")
    tf.saved_model.save(evil, str(copy / "saved_model"), signatures={"serve_int16": evil.serve_int16})
    with pytest.raises(HnsegError, match=r"saved_model.*(sha256 differs|not written by `hnseg export`)"):
        load_predictor(copy, saved_model=True)
    assert not marker.exists()


@pytest.mark.parametrize("route", [False, True])
def test_metadata_that_disagrees_with_the_model(copy, route):
    edit_metadata(copy, lambda m: m.update(organs=["BrainStem", "Parotid_L"]))
    with pytest.raises(HnsegError, match=r"gives 3 organ\(s\), but metadata.json says .* and 2"):
        load_predictor(copy, saved_model=route)


def test_metadata_that_disagrees_with_itself(copy):
    edit_metadata(copy, lambda m: m["input"].update(channels=5))
    with pytest.raises(HnsegError, match=r"metadata.json disagrees with itself"):
        load_predictor(copy)


def test_model_keras_replaced_is_refused(copy):
    other = build_unet(MODEL)
    other.save(copy / "other.keras")
    shutil.move(copy / "other.keras", copy / "model.keras")
    with pytest.raises(HnsegError, match=r"model.keras: sha256 differs"):
        load_predictor(copy)


def test_saved_model_outside_the_export_is_refused(copy, tmp_path):
    outside = Path(shutil.move(copy / "saved_model", tmp_path / "elsewhere"))
    (copy / "saved_model").symlink_to(outside, target_is_directory=True)
    with pytest.raises(HnsegError, match=r"is a link or lies outside the export folder"):
        load_predictor(copy, saved_model=True)
    (copy / "saved_model").unlink()
    edit_metadata(copy, lambda m: m.update(saved_model="../elsewhere"))
    with pytest.raises(HnsegError, match=r"lies outside the export folder"):
        load_predictor(copy, saved_model=True)


def test_export_without_hashes_is_refused(copy):
    edit_metadata(copy, lambda m: m.pop("files"))
    for route in (False, True):
        with pytest.raises(HnsegError, match=r"records no sha256"):
            load_predictor(copy, saved_model=route)


def test_cli_tampered_export_one_line_nothing_written(copy, tmp_path, capsys):
    path = copy / VARIABLES
    path.write_bytes(path.read_bytes()[:100])
    image = ct_file(tmp_path / "in", "a")
    out = tmp_path / "pred"
    assert main(["predict", str(image), "--model", str(copy), "--out", str(out), "--saved-model"]) == 2
    assert "variables.data" in one_line(capsys)
    assert not out.exists()


# ----------------------------------------------------------------------------- folder prediction


def label_maps(out: Path) -> list[str]:
    """The label maps and masks folder of a prediction folder (each case also has .seg.nrrd and .qa.json)."""
    return sorted(p.name for p in out.iterdir() if not p.name.endswith((".seg.nrrd", ".qa.json")))


@pytest.mark.slow  # ~25 s: five predict runs
def test_folder_predict_skips_finished_and_continues_past_bad_cases(export, tmp_path, capsys):
    cases = tmp_path / "cases"
    for index, name in enumerate(("a", "b", "c")):
        ct_file(cases / name, "img", seed=index)  # PDDCA layout: <case>/img.nrrd
    bad = cases / "b" / "img.nrrd"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated CT
    out = tmp_path / "pred"
    args = ["predict", str(cases), "--model", str(export), "--out", str(out), "--pddca-masks"]
    assert main(args) == 2  # stops at the bad case, naming it
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress line of case a
    assert error.startswith("hnseg predict: error: ") and "b/img.nrrd: unreadable or truncated image" in error
    assert label_maps(out) == ["a.nrrd", "masks"]
    first = (out / "a.nrrd").stat().st_mtime_ns
    assert main([*args, "--continue-on-error"]) == 1
    err = capsys.readouterr().err
    assert "skipping 1 finished case" in err and "1 of 2 case(s) failed" in err and "  b: " in err
    assert label_maps(out) == ["a.nrrd", "c.nrrd", "masks"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a", "c"]
    assert (out / "a.nrrd").stat().st_mtime_ns == first  # finished work is not redone
    ct_file(cases / "b", "img", seed=1)
    assert main(args) == 0
    assert "skipping 2 finished case(s)" in capsys.readouterr().err
    assert label_maps(out) == ["a.nrrd", "b.nrrd", "c.nrrd", "masks"]
    assert main([*args, "--force"]) == 0
    assert (out / "a.nrrd").stat().st_mtime_ns != first  # --force redoes them


def test_case_outputs_appear_together_or_not_at_all(export, tmp_path, monkeypatch):
    image = ct_file(tmp_path / "in", "a")
    out = tmp_path / "pred"

    def broken(*args, **kwargs):
        raise HnsegError("disk full")

    monkeypatch.setattr(batch, "write_structures", broken)
    with pytest.raises(HnsegError, match="disk full"):
        main_args = ["predict", str(image), "--model", str(export), "--out", str(out), "--pddca-masks"]
        batch.run(build_args(main_args))
    assert not out.exists()  # no outputs, no staging folder, no lock file, no empty --out left


def build_args(argv):
    from hnseg_keras.cli import build_parser

    parser, _ = build_parser(argv)
    return parser.parse_args(argv)


def test_second_writer_is_refused_naming_the_holder(export, tmp_path, capsys):
    image = ct_file(tmp_path / "in", "a")
    out = tmp_path / "pred"
    with FolderLock(out, "hnseg predict"):
        assert main(["predict", str(image), "--model", str(export), "--out", str(out)]) == 2
        assert "in use by hnseg predict (pid" in one_line(capsys)
        with pytest.raises(HnsegError, match=r"in use by hnseg predict"):
            FolderLock(out).acquire()
    assert not out.exists()  # released, and the folder the lock made is removed while still empty
    assert main(["predict", str(image), "--model", str(export), "--out", str(out)]) == 0


# ----------------------------------------------------------------------------- image checks


def test_4d_image_is_refused_with_a_clear_message(export, tmp_path, capsys):
    volume = sitk.GetImageFromArray(np.zeros((3, 8, 8), np.int16))
    image = sitk.JoinSeries([volume, volume])
    assert image.GetDimension() == 4
    sitk.WriteImage(image, str(tmp_path / "ct4d.nrrd"))
    assert main(["predict", str(tmp_path / "ct4d.nrrd"), "--model", str(export), "--out",
                 str(tmp_path / "o")]) == 2
    assert "image is 4D (size [8, 8, 3, 2]); give a 3D CT" in one_line(capsys)
    assert not (tmp_path / "o").exists()  # the failed first case leaves no empty --out folder


@pytest.mark.parametrize("array, spacing, expected", [
    (np.full((3, 8, 8), 7, np.uint8), (1.0, 1.0, 3.0), "8-bit unsigned integers"),
    (np.linspace(-1000, 1e9, 192).reshape(3, 8, 8).astype(np.float32), (1.0, 1.0, 3.0), "plausible CT range"),
    (np.linspace(-1000, 1000, 192).reshape(3, 8, 8).astype(np.int16), (1.0, 1.0, 1e6), "outside 0.1..20.0 mm"),
    (np.linspace(0, 1, 192).reshape(3, 8, 8).astype(np.float32), (1.0, 1.0, 3.0), "values span only 0..1"),
])
def test_implausible_images_are_warned_not_refused(array, spacing, expected):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    warnings = checks.check_image(image, "ct.nrrd")
    assert len(warnings) == 1 and expected in warnings[0]


def test_plausible_ct_gives_no_warning_and_warnings_reach_stderr(tmp_path, capsys):
    image = sitk.GetImageFromArray(np.linspace(-1024, 2000, 192).reshape(3, 8, 8).astype(np.int16))
    image.SetSpacing((0.9, 0.9, 2.5))
    assert checks.check_image(image, "ct.nrrd") == []
    odd = sitk.GetImageFromArray(np.full((3, 8, 8), 7, np.uint8))
    sitk.WriteImage(odd, str(tmp_path / "u8.nrrd"))
    from own_data_builders import read_one

    from hnseg_keras.cli import setup_logging

    setup_logging()
    read_one(tmp_path / "u8.nrrd")
    err = capsys.readouterr().err
    assert err.startswith("hnseg: warning: ") and "u8.nrrd: voxels are 8-bit unsigned" in err


def test_rtstruct_names_hnseg_keras_and_keeps_the_patient(export, tmp_path):
    import pydicom
    from own_data_builders import write_dicom_series

    from hnseg_keras import __version__

    ct = np.random.default_rng(0).integers(-1000, 1200, size=(3, 36, 36)).astype(np.int16)
    series = write_dicom_series(Case("patient7", ct, (1.2, 1.2, 3.0)), tmp_path / "patient7")
    out = tmp_path / "pred"
    assert main(["predict", str(series), "--model", str(export), "--out", str(out)]) == 0
    rtstruct = pydicom.dcmread(out / "patient7_rtstruct.dcm")
    source = pydicom.dcmread(next(series.iterdir()))
    assert rtstruct.Manufacturer == "hnseg-keras" and rtstruct.SoftwareVersions == __version__
    assert rtstruct.PatientID == source.PatientID == "patient7"
    assert rtstruct.StudyInstanceUID == source.StudyInstanceUID


def test_verify_command_on_an_export(copy, capsys):
    assert main(["verify", str(copy)]) == 0
    assert "model file(s) match metadata.json" in capsys.readouterr().err
    (copy / "saved_model" / "assets").mkdir(exist_ok=True)
    (copy / "saved_model" / "assets" / "extra.txt").write_text("x")
    assert main(["verify", str(copy)]) == 2
    assert "extra.txt: not written by `hnseg export`" in one_line(capsys)
