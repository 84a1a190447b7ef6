"""The released model the package carries: present, small, weights only, its card rendered from its metadata,
listed by ``hnseg models``, used by ``hnseg predict`` without ``--model`` with the post-processing it records;
and (with the OpenKBP data beside the checkout) it still scores what its card says."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import h5py
import pytest

from hnseg_keras import cli
from hnseg_keras.data.phantom import PhantomConfig, generate_case
from hnseg_keras.inference import released, trust
from hnseg_keras.inference.model_io import read_metadata

REPO = Path(__file__).resolve().parents[1]
OPENKBP = REPO.parent / "shared" / "data" / "openkbp-hn"
SIZE_LIMIT_MB = 20.0


def released_input_case():
    """A synthetic head at 3 mm (inside the released model's training spacings), 40 slices."""
    return generate_case(1, PhantomConfig(size=128, spacing_mm=3.0, slice_spacing_mm=(3.0, 3.0), z_extent_mm=120.0))


def test_the_default_model_ships_small_weights_only_and_verified():
    assert released.DEFAULT in released.names()
    folder = released.path()
    metadata = read_metadata(folder)
    trust.verify_export(folder, metadata, saved_model=False)  # model.keras matches its recorded sha256
    assert sum(f.stat().st_size for f in folder.iterdir()) / 2**20 < SIZE_LIMIT_MB
    with zipfile.ZipFile(folder / released.MODEL_FILE) as archive, archive.open("model.weights.h5") as raw, \
            h5py.File(raw) as weights:
        assert "optimizer" not in weights
    assert set(released.HEADLINE_ORGANS) <= set(metadata["organs"])
    assert set(metadata["prediction"]) >= {"tta", "largest_component"}


def test_the_model_card_is_rendered_from_the_metadata_and_names_its_terms():
    folder = released.path()
    metadata = read_metadata(folder)
    card = (folder / released.CARD_FILE).read_text()
    assert card == released.model_card(metadata)
    for fact in ("Not a medical device", "research use", "Babier", "TCIA", metadata["release"]["training"]["commit"],
                 metadata["release"]["training"]["cpu"], f"{metadata['release']['recipe']['steps']:,}"):
        assert fact in card, fact
    release = metadata["release"]
    headline = [release["evaluation"]["organs"][o]["dice"] for o in released.HEADLINE_ORGANS]
    assert release["headline_dice"] == pytest.approx(sum(headline) / 4)
    for organ in metadata["organs"]:
        assert f"| {organ} | {release['evaluation']['organs'][organ]['n']} | " \
               f"{100 * release['evaluation']['organs'][organ]['dice']:.2f} |" in card


def test_the_card_gives_the_dice_without_blanked_slices_from_the_record():
    metadata = read_metadata(released.path())
    organs = {o: {"all": 0.8, "clinical_like": 0.7, "blanked": None, "blanked_cases": 0,
                  "voxels_on_blanked_slices_percent": 0.0} for o in metadata["organs"]}
    organs["BrainStem"] = {"all": 0.72, "clinical_like": 0.66, "blanked": 0.81, "blanked_cases": 9,
                           "voxels_on_blanked_slices_percent": 21.8}
    metadata["release"]["blanked_slices"] = {"area_cm2": 40.0, "cases_affected": 14, "cases": 33, "organs": organs}
    card = released.model_card(metadata)
    assert "In 14 of the 33 validation cases" in card
    assert "| BrainStem | 21.8 % | 72.00 | 66.00 | 81.00 (9) |" in card
    assert "| Mandible | 0.0 % | 80.00 | 70.00 | - |" in card
    # (0.66 + 3 * 0.7) / 4 and (0.72 + 3 * 0.8) / 4 over the four headline organs
    assert f"| mean of {', '.join(released.HEADLINE_ORGANS)} | | 78.00 | **69.00** | |" in card
    del metadata["release"]["blanked_slices"]
    assert "Without the slices" not in released.model_card(metadata)


def test_hnseg_models_lists_what_the_metadata_records(capsys):
    assert cli.main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    (row,) = [r for r in rows if r["name"] == released.DEFAULT]
    metadata = read_metadata(released.path())
    assert row["default"] and row["organs"] == metadata["organs"]
    assert row["headline_dice"] == metadata["release"]["headline_dice"]
    assert row["licence"] == metadata["release"]["licence"] and "research use" in row["licence"]
    assert row["size_mb"] < SIZE_LIMIT_MB
    assert cli.main(["models"]) == 0
    text = capsys.readouterr().out
    assert f"{100 * metadata['release']['headline_dice']:.1f} %" in text and "(default)" in text


def test_predict_without_model_uses_the_released_model_and_its_recorded_post_processing(tmp_path, capsys):
    from hnseg_keras.data.cases import write_pddca_case

    case = released_input_case()
    write_pddca_case(case, tmp_path / "ct")
    assert cli.main(["predict", str(tmp_path / "ct"), "--out", str(tmp_path / "out"), "--preview"]) == 0
    recorded = read_metadata(released.path())["prediction"]
    tta, largest = ("on" if recorded[k] else "off" for k in ("tta", "largest_component"))
    err = capsys.readouterr().err
    assert f"model {released.path() / 'model.keras'} (left-right TTA {tta}, largest component {largest}" in err
    metadata = read_metadata(released.path())
    left_out = [o for o in metadata["organs"] if o not in recorded.get("organs", metadata["organs"])]
    assert (f"left out for low validation Dice: {', '.join(left_out)}" in err) == bool(left_out)
    stem = tmp_path / "out" / "ct"  # a PDDCA case is named by its folder
    for suffix in (".nrrd", ".seg.nrrd", ".qa.json"):
        assert stem.with_name(stem.name + suffix).is_file(), suffix
    assert (tmp_path / "out" / "preview" / "ct.png").is_file()
    qa = json.loads(stem.with_name(stem.name + ".qa.json").read_text())
    assert qa["post_processing"] == {"tta": recorded["tta"], "largest_component": recorded["largest_component"]}
    assert qa["organs"] == recorded.get("organs", metadata["organs"])

    # the flags still override the recorded choice
    flipped = ["--tta" if not recorded["tta"] else "--no-tta"]
    assert cli.main(["predict", str(tmp_path / "ct"), "--out", str(tmp_path / "other"), *flipped]) == 0
    qa = json.loads((tmp_path / "other" / "ct.qa.json").read_text())
    assert qa["post_processing"]["tta"] is not recorded["tta"]


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not OPENKBP.is_dir(), reason="needs ../shared/data/openkbp-hn")
def test_the_released_model_scores_on_the_validation_cases_what_its_card_says(tmp_path):
    """All 33 OpenKBP validation cases through `hnseg predict` (no --model) and `hnseg evaluate`."""
    assert cli.main(["predict", str(OPENKBP), "--split", "validation", "--out", str(tmp_path / "pred")]) == 0
    assert cli.main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(OPENKBP / "validation")]) == 0
    summary = json.loads((tmp_path / "pred" / "evaluation" / "results.json").read_text())["summary"]
    metadata = read_metadata(released.path())
    card, written = metadata["release"]["evaluation"]["organs"], metadata["prediction"]["organs"]
    assert set(summary) - {"mean"} == set(written)  # organs left out by default are not written
    for organ, row in ((o, card[o]) for o in written):
        assert summary[organ]["n"] == row["n"]
        # oneDNN kernels differ between CPUs: a voxel here and there, never a point of Dice
        assert summary[organ]["dice"]["mean"] == pytest.approx(row["dice"], abs=0.005), organ


def test_organs_the_metadata_leaves_out_are_written_only_when_named(tmp_path, capsys):
    """A release may leave out an organ it scored too low on: predict, api and the card all honour it."""
    import shutil

    from hnseg_keras import api, configs
    from hnseg_keras.data.cases import write_pddca_case

    model = tmp_path / "model"
    shutil.copytree(released.path(), model)
    metadata = read_metadata(model)
    *kept, dropped = metadata["organs"]
    metadata["prediction"] = {**metadata["prediction"], "organs": kept, "minimum_dice": 0.5}
    configs.write_json_atomic(model / "metadata.json", metadata)
    card = released.model_card(metadata)
    assert f"| {dropped} | " in card and card.count("| no |") == 1 and f"{dropped}: the model has" in card

    write_pddca_case(released_input_case(), tmp_path / "ct")
    assert cli.main(["predict", str(tmp_path / "ct"), "--out", str(tmp_path / "out"), "--model", str(model)]) == 0
    assert f"left out for low validation Dice: {dropped} (--organs writes them)" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "ct.qa.json").read_text())["organs"] == kept
    assert cli.main(["predict", str(tmp_path / "ct"), "--out", str(tmp_path / "named"), "--model", str(model),
                     "--organs", dropped]) == 0
    assert json.loads((tmp_path / "named" / "ct.qa.json").read_text())["organs"] == [dropped]
    assert "left out" not in capsys.readouterr().err
    assert api.segment(tmp_path / "ct", api.load_model(model)).organs == tuple(kept)
