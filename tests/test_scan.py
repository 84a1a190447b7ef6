"""`hnseg scan`: reports exactly the organs and names planted in each layout; exit 1 on a problem."""

from __future__ import annotations

import json

import pytest
from own_data_builders import (
    CLINIC_NAMES,
    JUNK_ROIS,
    small_case,
    write_dicom_tree,
    write_nnunet,
    write_patient,
)

from hnseg_keras import cli
from hnseg_keras.data.phantom import PhantomConfig, write_phantom
from hnseg_keras.data.scan import scan


@pytest.mark.parametrize("arrangement", ["flat", "nested"])
def test_dicom_report_is_exactly_what_was_planted(tmp_path, capsys, arrangement):
    planted = write_dicom_tree(tmp_path / "tree", (0, 1), arrangement)
    out = tmp_path / "scan.json"
    assert cli.main(["scan", str(tmp_path / "tree"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert sorted(report["cases"]) == sorted(planted)
    for case_id, case in planted.items():
        entry = report["cases"][case_id]
        assert entry["layout"] == "dicom" and entry["problems"] == []
        assert entry["organs"] == {organ: CLINIC_NAMES[organ] for organ in case.masks}
        assert entry["unmatched"] == list(JUNK_ROIS)
        assert entry["size"] == [64, 64, case.ct.shape[0]]
        assert entry["spacing_mm"] == pytest.approx(list(case.spacing), abs=1e-3)
    table = capsys.readouterr().out
    assert "PAROTID LT" in table and "unmatched: External, PTV_70" in table
    assert cli.main(["scan", str(tmp_path / "tree"), "--json", str(out)]) == 2  # never overwrites a file


def test_problem_case_is_listed_and_exit_is_one(tmp_path, capsys):
    write_dicom_tree(tmp_path / "tree", (0,))
    write_patient(small_case(1), tmp_path / "tree" / "gappy", rtstruct=False)
    files = sorted((tmp_path / "tree" / "gappy").glob("CT*.dcm"))
    files[5].unlink()
    assert cli.main(["scan", str(tmp_path / "tree")]) == 1
    report = scan(tmp_path / "tree")
    assert report["cases"]["patient00"]["problems"] == []
    (problem,) = report["cases"]["gappy"]["problems"]
    assert "missing slice" in problem and str(tmp_path / "tree" / "gappy") in problem


def test_nnunet_and_pddca_reports(tmp_path):
    write_nnunet(tmp_path / "nn", indices=(1,), test_indices=(2,), names={
        "BrainStem": "Brain Stem", "Chiasm": "OpticChiasm", "Mandible": "Bone_Mandible", "OpticNerve_L": "OpticNrv_L",
        "OpticNerve_R": "OpticNrv_R", "Parotid_L": "PAROTID LT", "Parotid_R": "Parotid_R",
        "Submandibular_L": "Glnd_Submand_L", "Submandibular_R": "Glnd_Submand_R"})
    report = scan(tmp_path / "nn")
    assert report["cases"]["HN_001"]["organs"]["Parotid_L"] == "PAROTID LT"
    assert report["cases"]["HN_002"] == {"layout": "nnunet", "size": [64, 64, report["cases"]["HN_002"]["size"][2]],
                                         "spacing_mm": report["cases"]["HN_002"]["spacing_mm"], "orientation": "LPS",
                                         "organs": {},
                                         "unmatched": [], "problems": [], "split": "test"}
    write_phantom(tmp_path / "pd", 2, PhantomConfig(size=32, spacing_mm=8.0, slice_spacing_mm=(8.0, 8.0)),
                  splits=None, progress=False)
    report = scan(tmp_path / "pd")
    assert {entry["layout"] for entry in report["cases"].values()} == {"pddca"}
    assert report["cases"]["phantom_0001"]["organs"]["Parotid_L"] == "Parotid_L"
