"""The public Python API: segment gives what `hnseg predict` writes, on the input's own grid, from a
file, a DICOM folder or a SimpleITK image; a missing released model is one clear error."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from own_data_builders import write_dicom_series
from test_prediction import ORGANS, dice, oracle_case, oracle_file  # noqa: F401  (oracle_file is a fixture)

from hnseg_keras import api
from hnseg_keras.cli import main
from hnseg_keras.data.cases import image_like
from hnseg_keras.data.organs import label_value
from hnseg_keras.errors import HnsegError
from hnseg_keras.inference import released


def test_segment_a_ras_image_returns_labels_on_its_own_grid(oracle_file):  # noqa: F811
    case, truth = oracle_case()
    stored = sitk.DICOMOrient(image_like(case.ct, case), "RAS")
    result = api.segment(stored, api.load_model(oracle_file))
    assert result.label_image.GetSize() == stored.GetSize()
    np.testing.assert_allclose(result.label_image.GetDirection(), stored.GetDirection())
    np.testing.assert_allclose(result.label_image.GetOrigin(), stored.GetOrigin(), atol=1e-9)
    for organ in ORGANS:
        expected = sitk.GetArrayFromImage(sitk.DICOMOrient(image_like(truth[organ], case), "RAS"))
        assert dice(result.labels == label_value(organ), expected) >= 0.99, organ
        assert dice(result.masks[organ], expected) >= 0.99, organ
    assert result.qa["stored_orientation"] == "RAS" and result.qa["summary"]["failed"] == 0


def test_segment_a_file_and_a_dicom_folder_equals_what_hnseg_predict_writes(tmp_path, oracle_file):  # noqa: F811
    case, _ = oracle_case("scan01")
    path = tmp_path / "scan01.nii.gz"
    sitk.WriteImage(sitk.DICOMOrient(image_like(case.ct, case), "LPI"), str(path))
    series = write_dicom_series(case, tmp_path / "dicom01")
    out = tmp_path / "pred"
    assert main(["predict", str(path), "--model", str(oracle_file), "--out", str(out)]) == 0
    assert main(["predict", str(series), "--model", str(oracle_file), "--out", str(out)]) == 0
    model = api.load_model(oracle_file)
    for source, name in ((path, "scan01"), (series, "dicom01")):
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{name}.nrrd")))
        result = api.segment(source, model, organs=["Parotid_L"])
        assert result.organs == ("Parotid_L",)
        assert np.array_equal(result.labels, np.where(written == label_value("Parotid_L"), written, 0)), name


def test_an_unknown_released_model_or_two_cases_is_a_one_line_error(oracle_file):  # noqa: F811
    with pytest.raises(HnsegError, match=rf"carries no released model 'hn-openkbp' \(carried: {released.DEFAULT}\)"):
        api.load_model("hn-openkbp")
    with pytest.raises(HnsegError, match="holds 2 cases"):
        folder = oracle_file.parent.parent / "two"
        for name in ("a", "b"):
            case, _ = oracle_case(name)
            folder.mkdir(exist_ok=True)
            sitk.WriteImage(image_like(case.ct, case), str(folder / f"{name}.nrrd"))
        api.segment(folder, api.load_model(oracle_file))
