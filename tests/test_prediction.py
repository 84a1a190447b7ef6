"""Prediction through the real path (slicing, batching, TTA, mapping back, writers) with an oracle model.

The oracle phantom: soft tissue 0 HU, parotids +1000 HU, brainstem -800 HU. The oracle model reads
the organ share of a pixel off its HU (linear interpolation of the CT makes a boundary pixel's HU
exactly ``share * organ HU``) and splits the parotids by image side, so it reproduces the ground
truth up to the resampling 0.9 mm -> 1.0 mm -> 0.9 mm.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import SimpleITK as sitk
from keras import layers, ops
from own_data_builders import write_dicom_series

from hnseg_keras import configs
from hnseg_keras.cli import main
from hnseg_keras.data.cases import Case, image_like, write_pddca_case
from hnseg_keras.data.organs import colour_of, label_value
from hnseg_keras.data.slicing import SlicingConfig
from hnseg_keras.inference import trust
from hnseg_keras.inference.prediction import Predictor, keep_largest_component, load_predictor, segment_case

ORGANS = ("BrainStem", "Parotid_L", "Parotid_R")
SLICING = SlicingConfig(size=48, spacing_mm=1.0)  # 48 mm field of view inside the 57.6 mm CT
SIZE, DEPTH, SPACING = 64, 12, (0.9, 0.9, 2.5)
CENTRE = (SIZE - 1) / 2


def ellipsoid(centre_zyx, radii_mm) -> np.ndarray:
    """bool [Z, Y, X] ellipsoid; centre in voxel indices, radii (z, y, x) in mm."""
    z, y, x = np.ogrid[:DEPTH, :SIZE, :SIZE]
    sz, sy, sx = SPACING[2], SPACING[1], SPACING[0]
    distance = (((z - centre_zyx[0]) * sz / radii_mm[0]) ** 2 + ((y - centre_zyx[1]) * sy / radii_mm[1]) ** 2
                + ((x - centre_zyx[2]) * sx / radii_mm[2]) ** 2)
    return distance <= 1.0


def oracle_case(case_id="oracle", speck=False) -> tuple[Case, dict[str, np.ndarray]]:
    """The phantom (patient left = +x = higher column) and its ground-truth masks (uint8)."""
    side = 12.0 / SPACING[0]  # parotid centres 12 mm either side of the midline
    truth = {
        "BrainStem": ellipsoid((6, CENTRE + 4, CENTRE), (6.0, 5.0, 5.0)),
        "Parotid_L": ellipsoid((4, CENTRE, CENTRE + side), (6.0, 8.0, 6.0)),  # z 2..6: catches z flips
        "Parotid_R": ellipsoid((4, CENTRE, CENTRE - side), (6.0, 8.0, 6.0)),
    }
    ct = np.zeros((DEPTH, SIZE, SIZE), np.int16)
    ct[truth["BrainStem"]] = -800
    ct[truth["Parotid_L"] | truth["Parotid_R"]] = 1000
    if speck:  # a stray 3x3x3 bright spot on the left, far from the parotid
        ct[9:12, 12:15, 48:51] = 1000
    case = Case(case_id, ct, SPACING, origin=(-20.0, 10.0, 5.0))
    return case, {name: mask.astype(np.uint8) for name, mask in truth.items()}


def oracle_model(size: int = SLICING.size) -> keras.Model:
    """ct [B, size, size, 1] HU -> [B, size, size, 3]: brainstem, parotid L (right image half), parotid R."""
    ct = keras.Input((size, size, 1), name="ct")
    bright = ops.clip(ct / 1000.0, 0.0, 1.0)
    dark = ops.clip(-ct / 800.0, 0.0, 1.0)
    left = (np.arange(size) > (size - 1) / 2).astype("float32").reshape(1, 1, size, 1)
    probabilities = layers.Concatenate(name="probabilities")([dark, bright * left, bright * (1.0 - left)])
    return keras.Model(ct, probabilities, name="oracle")


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def predictor():
    return Predictor.from_keras_model(oracle_model(), ORGANS, SLICING, source="oracle")


@pytest.fixture(scope="module")
def oracle_file(tmp_path_factory):
    """The oracle as ``model.keras`` + ``metadata.json`` (with its sha256, as ``hnseg export`` writes it)."""
    folder = tmp_path_factory.mktemp("oracle_model")
    oracle_model().save(folder / "model.keras")
    metadata = {"format": "hnseg-keras-export", "organs": list(ORGANS), "slicing": configs.to_dict(SLICING),
                "input": {"height": SLICING.size, "width": SLICING.size, "channels": 1},
                trust.FILES_KEY: trust.fingerprint(folder, ("model.keras",))}
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return folder / "model.keras"


def counting(predictor: Predictor) -> tuple[Predictor, list[int]]:
    calls: list[int] = []

    def run_batch(batch):
        calls.append(len(batch))
        return predictor.run_batch(batch)

    return Predictor(predictor.organs, predictor.slicing, predictor.channels, predictor.source, run_batch), calls


def test_oracle_reproduces_ground_truth_on_original_grid(predictor):
    case, truth = oracle_case()
    wrapped, calls = counting(predictor)
    seg = segment_case(case, wrapped, batch_size=5)
    assert calls == [5, 5, 5]  # 12 slices in batches of 5; the last batch padded to 5
    masks = seg.mask_dict()
    for name in ORGANS:
        assert masks[name].shape == case.ct.shape and masks[name].dtype == np.uint8
        assert dice(masks[name], truth[name]) >= 0.99, name
    labels = seg.label_map()
    assert set(np.unique(labels)) == {0, label_value("BrainStem"), label_value("Parotid_L"), label_value("Parotid_R")}
    assert dice(labels == label_value("Parotid_L"), truth["Parotid_L"]) >= 0.99


def test_flip_tta_swaps_left_right_channels(predictor):
    case, truth = oracle_case()
    wrapped, calls = counting(predictor)
    masks = segment_case(case, wrapped, batch_size=6, tta_flip=True).mask_dict()
    assert calls == [6, 6, 6, 6]  # plain and mirrored pass per batch
    for name in ORGANS:
        assert dice(masks[name], truth[name]) >= 0.99, name
    # Without swapping the channels of the mirrored pass, each parotid would get p = 0.5 on both sides.
    assert not masks["Parotid_L"][:, :, : SIZE // 2].any()
    assert not masks["Parotid_R"][:, :, SIZE // 2:].any()


def test_largest_component_drops_a_stray_spot(predictor):
    case, truth = oracle_case(speck=True)
    plain = segment_case(case, predictor, batch_size=8).mask_dict()
    assert plain["Parotid_L"][10, 13, 49] == 1  # the spot is segmented without the cleanup
    cleaned = segment_case(case, predictor, batch_size=8, largest_component=True).mask_dict()
    assert cleaned["Parotid_L"][9:12, 12:15, 48:51].sum() == 0
    assert dice(cleaned["Parotid_L"], truth["Parotid_L"]) >= 0.99


def test_keep_largest_component_known_answer():
    mask = np.zeros((5, 6, 7), bool)
    mask[1:3, 1:3, 1:3] = True  # 8 voxels
    mask[4, 5, 6] = True  # 1 voxel, touches the big blob only across a corner -> separate
    mask[3, 3, 3] = True  # diagonal neighbour of the blob: 6-connectivity keeps it separate
    keep_largest_component(mask)
    assert mask.sum() == 8 and mask[1:3, 1:3, 1:3].all()


def test_cli_predicts_pddca_dataset_into_label_maps_and_masks(tmp_path, oracle_file):
    case, truth = oracle_case("case_a")
    case.masks = dict(truth)
    write_pddca_case(case, tmp_path / "data" / "test" / "case_a")
    other, _ = oracle_case("case_b")
    write_pddca_case(other, tmp_path / "data" / "train" / "case_b")
    out = tmp_path / "pred"
    code = main(["predict", str(tmp_path / "data"), "--model", str(oracle_file), "--out", str(out),
                 "--split", "test", "--pddca-masks", "--format", "nii.gz", "--preview"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["case_a.nii.gz", "case_a.qa.json", "case_a.seg.nrrd", "masks",
                                                     "preview"]
    assert [p.name for p in (out / "preview").iterdir()] == ["case_a.png"]
    labels = sitk.ReadImage(str(out / "case_a.nii.gz"))
    assert labels.GetSize() == (SIZE, SIZE, DEPTH)
    np.testing.assert_allclose(labels.GetSpacing(), SPACING)
    np.testing.assert_allclose(labels.GetOrigin(), case.origin)
    array = sitk.GetArrayFromImage(labels)
    assert dice(array == label_value("Parotid_R"), truth["Parotid_R"]) >= 0.99
    structures = out / "masks" / "case_a" / "structures"
    assert sorted(p.name for p in structures.iterdir()) == sorted(f"{name}.nrrd" for name in ORGANS)
    brainstem = sitk.GetArrayFromImage(sitk.ReadImage(str(structures / "BrainStem.nrrd")))
    assert brainstem.dtype == np.uint8 and dice(brainstem, truth["BrainStem"]) >= 0.99


def test_cli_writes_only_the_organs_asked_for(tmp_path, oracle_file, capsys):
    case, truth = oracle_case("case_a")
    write_pddca_case(case, tmp_path / "data" / "case_a")
    out = tmp_path / "pred"
    assert main(["predict", str(tmp_path / "data"), "--model", str(oracle_file), "--out", str(out),
                 "--organs", "parotid left", "BrainStem", "--pddca-masks"]) == 0
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case_a.nrrd")))
    assert set(np.unique(labels)) == {0, label_value("BrainStem"), label_value("Parotid_L")}
    assert dice(labels == label_value("Parotid_L"), truth["Parotid_L"]) >= 0.99
    structures = out / "masks" / "case_a" / "structures"
    assert sorted(p.name for p in structures.iterdir()) == ["BrainStem.nrrd", "Parotid_L.nrrd"]
    assert json.loads((out / "case_a.qa.json").read_text())["organs"] == ["BrainStem", "Parotid_L"]
    assert main(["predict", str(tmp_path / "data"), "--model", str(oracle_file), "--out", str(tmp_path / "p2"),
                 "--organs", "Mandible"]) == 2
    assert "--organs Mandible: the model segments BrainStem, Parotid_L, Parotid_R" in capsys.readouterr().err
    assert not (tmp_path / "p2").exists()


def test_a_dicom_case_without_any_organ_gets_its_label_map_and_no_empty_rtstruct(tmp_path, oracle_file, capsys):
    case, _ = oracle_case("blank")
    case.ct[:] = 0  # nothing the oracle calls an organ
    series = write_dicom_series(case, tmp_path / "blank")
    out = tmp_path / "pred"
    assert main(["predict", str(series), "--model", str(oracle_file), "--out", str(out)]) == 0
    assert (out / "blank.nrrd").is_file() and not (out / "blank_rtstruct.dcm").exists()
    record = json.loads((out / "blank.qa.json").read_text())
    assert {f["organ"] for f in record["checks"] if f["check"] == "empty" and f["status"] == "fail"} == set(ORGANS)
    assert "QA failed on 1 of 1 case(s)" in capsys.readouterr().err
    assert main(["predict", str(series), "--model", str(oracle_file), "--out", str(out)]) == 0  # finished: skipped
    assert "skipping 1 finished case" in capsys.readouterr().err


def test_cli_writes_rtstruct_for_dicom_series(tmp_path, oracle_file, capsys):
    from rt_utils import RTStructBuilder

    case, truth = oracle_case("dicom_case")
    series = write_dicom_series(case, tmp_path / "dicom_case")
    out = tmp_path / "pred"
    assert main(["predict", str(series), "--model", str(oracle_file), "--out", str(out)]) == 0
    assert "predict: 1 case in" in capsys.readouterr().err
    rtstruct = RTStructBuilder.create_from(str(series), str(out / "dicom_case_rtstruct.dcm"))
    assert sorted(rtstruct.get_roi_names()) == sorted(ORGANS)
    for name in ORGANS:
        mask = rtstruct.get_roi_mask_by_name(name)  # [rows, cols, slices], slices by position (= z here)
        assert dice(np.moveaxis(mask, -1, 0), truth[name]) >= 0.9, name
    names = {int(roi.ROINumber): roi.ROIName for roi in rtstruct.ds.StructureSetROISequence}
    for contour in rtstruct.ds.ROIContourSequence:  # the catalogue's colour, as in previews and Slicer
        assert tuple(int(c) for c in contour.ROIDisplayColor) == colour_of(names[int(contour.ReferencedROINumber)])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, oracle_file, capsys):
    case, _ = oracle_case("ct")
    ct_file = tmp_path / "ct.nrrd"
    sitk.WriteImage(image_like(case.ct, case), str(ct_file))
    out = tmp_path / "pred"
    assert main(["predict", str(ct_file), "--model", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "missing" in one_line_error(capsys)
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((SIZE, SIZE), np.int16)), str(flat))
    assert main(["predict", str(flat), "--model", str(oracle_file), "--out", str(out)]) == 2
    assert "2D" in one_line_error(capsys)
    assert main(["predict", str(ct_file), "--model", str(oracle_file), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["predict", str(ct_file), "--model", str(oracle_file), "--out", str(out)]) == 0
    assert "skipping 1 finished case" in capsys.readouterr().err  # a rerun skips finished cases
    assert main(["predict", str(ct_file), "--model", str(oracle_file), "--out", str(out), "--force"]) == 0
    capsys.readouterr()
    # A prediction in the other format would give `hnseg evaluate` two files for one case: refused even with --force.
    assert main(["predict", str(ct_file), "--model", str(oracle_file), "--out", str(out), "--format", "nii.gz",
                 "--force"]) == 2
    assert "ct.nrrd" in one_line_error(capsys)


def test_load_predictor_reads_metadata_beside_keras_file(oracle_file):
    loaded = load_predictor(oracle_file)
    assert loaded.organs == ORGANS and loaded.slicing == SLICING and loaded.channels == 1
    hu = np.array([0, 500, 1000, -400], np.int16).reshape(1, 1, 4, 1)
    hu = np.tile(hu, (2, SLICING.size, SLICING.size // 4, 1))
    probs = loaded.predict_slices(hu, batch_size=4)
    assert probs.shape == (2, SLICING.size, SLICING.size, 3)
    np.testing.assert_allclose(probs[0, 0, :4, 0], [0.0, 0.0, 0.0, 0.5])  # brainstem = -HU / 800
    np.testing.assert_allclose(probs[0, 0, :4, 2], [0.0, 0.5, 1.0, 0.0])  # parotid R, left image half
