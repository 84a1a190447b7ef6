"""nnU-Net v2 raw datasets: detection, label names -> organs, imagesTs as test, splits_final.json, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from own_data_builders import write_nnunet

from hnseg_keras import cli
from hnseg_keras.data import layouts, splits
from hnseg_keras.data.cases import CaseRef
from hnseg_keras.data.organs import DEFAULT_ORGANS
from hnseg_keras.errors import HnsegError

# TG-263 names in dataset.json, plus a label that is no organ
TG263 = {"BrainStem": "Brainstem", "Chiasm": "OpticChiasm", "Mandible": "Bone_Mandible", "OpticNerve_L": "OpticNrv_L",
         "OpticNerve_R": "OpticNrv_R", "Parotid_L": "Parotid_L", "Parotid_R": "Parotid_R",
         "Submandibular_L": "Glnd_Submand_L", "Submandibular_R": "Glnd_Submand_R"}


def test_cases_labels_and_test_split(tmp_path):
    truth = write_nnunet(tmp_path / "Dataset101_HN", names=TG263)
    root = tmp_path / "Dataset101_HN"
    assert layouts.detect_layout(root) == "nnunet"
    refs = layouts.find_refs(root)
    assert [(r.case_id, r.split, r.label is not None) for r in refs] == [
        ("HN_000", None, True), ("HN_001", None, True), ("HN_002", "test", False)]
    info = layouts.describe(refs[1])
    assert info["organs"] == {organ: TG263[organ] for organ in truth["HN_001"].masks} and info["unmatched"] == []
    case = layouts.read_ref(refs[1], DEFAULT_ORGANS)
    assert np.array_equal(case.ct, truth["HN_001"].ct)
    for organ, mask in truth["HN_001"].masks.items():
        assert np.array_equal(case.masks[organ], mask), organ
    assert not layouts.read_ref(refs[2], DEFAULT_ORGANS).masks  # imagesTs: CT only


def test_label_values_disagreeing_with_dataset_json_are_refused(tmp_path, capsys):
    root = tmp_path / "Dataset102"
    write_nnunet(root, indices=(1,), test_indices=())
    label_path = root / "labelsTr" / "HN_001.nii.gz"
    image = sitk.ReadImage(str(label_path))
    array = sitk.GetArrayFromImage(image)
    array[0, 0, 0] = 13  # no label 13 in dataset.json
    back = sitk.GetImageFromArray(array)
    back.CopyInformation(image)
    sitk.WriteImage(back, str(label_path))
    assert cli.main(["prepare", str(root), "--out", str(tmp_path / "out")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hnseg")]
    assert len(lines) == 1 and str(label_path) in lines[0] and "[13]" in lines[0]
    assert not (tmp_path / "out").exists()


def test_dataset_json_problems(tmp_path):
    root = tmp_path / "Dataset103"
    write_nnunet(root, indices=(1,), test_indices=())
    data = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**data, "labels": {"background": 0, "Parotid": [6, 7]}}))
    with pytest.raises(HnsegError, match="region-based"):
        layouts.find_refs(root)
    (root / "dataset.json").write_text(json.dumps({**data, "labels": {"background": 0, "Parotid_L": 6,
                                                                      "PAROTID LT": 7}}))
    with pytest.raises(HnsegError, match="both match Parotid_L"):
        layouts.describe(layouts.find_refs(root)[0])
    (root / "labelsTr" / "HN_001.nii.gz").unlink()
    with pytest.raises(HnsegError, match="HN_001.nii.gz: missing"):
        layouts.find_refs(root)


def test_splits_final_json_fold_and_fractions(tmp_path):
    root = tmp_path / "Dataset104"
    write_nnunet(root, indices=(0, 1, 2), test_indices=(3,))
    refs = layouts.find_refs(root)
    folds = [{"train": ["HN_000", "HN_001"], "val": ["HN_002"]}, {"train": ["HN_001", "HN_002"], "val": ["HN_000"]}]
    (tmp_path / "splits_final.json").write_text(json.dumps(folds))
    assignment, rule = splits.assign(refs, 1, 0.2, (0.7, 0.15, 0.15), str(tmp_path / "splits_final.json"), fold=1)
    assert assignment == {"HN_000": "validation", "HN_001": "train", "HN_002": "train", "HN_003": "test"}
    assert rule == {"method": "file", "file": "splits_final.json", "fold": 1}
    with pytest.raises(HnsegError, match="--fold 2 is not one of them"):
        splits.assign(refs, 1, 0.2, (0.7, 0.15, 0.15), str(tmp_path / "splits_final.json"), fold=2)
    plain = [CaseRef(f"case{i:02d}", tmp_path) for i in range(20)]
    drawn, rule = splits.assign(plain, 5, 0.2, (0.7, 0.15, 0.15))
    assert list(drawn.values()).count("validation") == 3 and list(drawn.values()).count("test") == 3
    assert rule["method"] == "folders+rule" and rule["seed"] == 5 and rule["fractions"] == [0.7, 0.15, 0.15]
    assert splits.assign(list(reversed(plain)), 5, 0.2, (0.7, 0.15, 0.15))[0] == drawn  # order-free
    assert splits.assign(plain, 6, 0.2, (0.7, 0.15, 0.15))[0] != drawn
    with pytest.raises(HnsegError, match="summing to 1"):
        splits.parse_fractions("0.5,0.5,0.5")
