"""Anatomical sanity checks (hnseg_keras.inference.qa) on small synthetic cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from hnseg_keras.data.organs import Organ, with_organs
from hnseg_keras.errors import HnsegError
from hnseg_keras.inference import qa

SHAPE = (40, 64, 64)  # [Z, Y, X]
SPACING = (1.0, 1.0, 2.5)  # (x, y, z) mm
ORIGIN = (0.0, 0.0, 0.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
X_FLIPPED = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
CENTRE_X = 31.5  # body ellipse centre (index = mm with the identity direction)


def ellipsoid(centre_zyx, radii_zyx, shape=SHAPE) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return sum(((g - c) / r) ** 2 for g, c, r in zip((z, y, x), centre_zyx, radii_zyx, strict=True)) <= 1.0


def body_ct(shape=SHAPE) -> np.ndarray:
    """-1000 HU air with a 0 HU body ellipse centred on x = 31.5 in every slice."""
    _, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((x - CENTRE_X) / 26.0) ** 2 + ((y - 31.5) / 22.0) ** 2 <= 1.0
    return np.where(np.broadcast_to(body, shape), 0, -1000).astype(np.int16)


def parotid(x_index: float) -> np.ndarray:
    return ellipsoid((20, 30, x_index), (4, 5, 5))


def good_masks() -> dict[str, np.ndarray]:
    """Parotid_L on the patient's left (+x), Parotid_R mirrored on the right, brainstem on the midline."""
    return {"Parotid_L": parotid(48), "Parotid_R": parotid(15), "BrainStem": ellipsoid((20, 40, CENTRE_X), (8, 4, 4))}


def status(findings, organ, check) -> str:
    [hit] = [f for f in findings if f["organ"] == organ and f["check"] == check]
    return hit["status"]


def detail(findings, organ, check) -> str:
    [hit] = [f for f in findings if f["organ"] == organ and f["check"] == check]
    return hit["detail"]


def ranges_around(masks, factor_low=0.8, factor_high=1.2) -> dict[str, tuple[float, float]]:
    return {name: (factor_low * qa.organ_volume_ml(m, SPACING), factor_high * qa.organ_volume_ml(m, SPACING))
            for name, m in masks.items()}


# ----------------------------------------------------------------------------- side_of, volume


@pytest.mark.parametrize("name, side", [
    ("Parotid_L", "L"), ("Parotid_R", "R"), ("OpticNerve_L", "L"), ("Submandibular_R", "R"),
    ("LeftParotid", "L"), ("Optic_Nerve_R", "R"),  # aliases read as the organ they name
    ("BrainStem", None), ("Mandible", None), ("Larynx", None), ("NotAnOrgan_L", None),
])
def test_side_of_catalogue(name, side):
    assert qa.side_of(name) == side


def test_side_of_user_organs():
    catalogue = with_organs([
        Organ("Cochlea_Lt", 40, partner="Cochlea_Rt"), Organ("Cochlea_Rt", 41, partner="Cochlea_Lt"),
        Organ("Left Lens", 42, partner="Right Lens"), Organ("Right Lens", 43, partner="Left Lens"),
        Organ("Lens_L", 44),  # a side in the name but no partner: not a paired organ
        Organ("EyeA", 45, partner="EyeB"), Organ("EyeB", 46, partner="EyeA"),  # paired, no side in the name
    ])
    assert [qa.side_of(n, catalogue) for n in ("Cochlea_Lt", "Cochlea_Rt", "Left Lens", "Right Lens")] == \
        ["L", "R", "L", "R"]
    assert qa.side_of("Lens_L", catalogue) is None
    assert qa.side_of("EyeA", catalogue) is None
    assert qa.side_of("Cochlea_Lt") is None  # not in the built-in catalogue


def test_organ_volume_ml():
    mask = np.zeros(SHAPE, dtype=bool)
    mask[3, 4, 5:15] = True
    assert qa.organ_volume_ml(mask, SPACING) == pytest.approx(10 * 2.5 / 1000)
    assert qa.organ_volume_ml(np.zeros(SHAPE, dtype=bool), SPACING) == 0.0


# ----------------------------------------------------------------------------- whole cases


def test_correct_case_passes_every_check():
    masks = good_masks()
    findings = qa.check_case(masks, SPACING, ORIGIN, IDENTITY, ct=body_ct(), volume_ranges_ml=ranges_around(masks))
    assert len(findings) == len(masks) * len(qa.CHECKS)
    assert [f["check"] for f in findings[:4]] == list(qa.CHECKS)
    assert all(set(f) == {"organ", "check", "status", "detail"} for f in findings)
    assert {f["status"] for f in findings if (f["organ"], f["check"]) != ("BrainStem", "side")} == {"pass"}
    assert status(findings, "BrainStem", "side") == "skip"  # not a left/right organ
    assert "33.0 mm left of Parotid_R's" in detail(findings, "Parotid_L", "side")
    assert "33.0 mm right of Parotid_L's" in detail(findings, "Parotid_R", "side")
    assert qa.summarise(findings)["failed"] == 0


def test_masks_mirrored_along_x_fail_side_for_both_parotids():
    masks = {name: m[..., ::-1] for name, m in good_masks().items()}
    findings = qa.check_case(masks, SPACING, ORIGIN, IDENTITY, ct=body_ct())
    assert status(findings, "Parotid_L", "side") == "fail"
    assert status(findings, "Parotid_R", "side") == "fail"
    assert "33.0 mm right of Parotid_R's, expected left" in detail(findings, "Parotid_L", "side")
    assert "expected right" in detail(findings, "Parotid_R", "side")
    assert status(findings, "Parotid_L", "pieces") == "pass"


def test_x_axis_pointing_right_fails_side():
    """The same arrays with a direction whose x axis points to the patient's right: mirrored anatomy."""
    findings = qa.check_case(good_masks(), SPACING, (63.0, 0.0, 0.0), X_FLIPPED)
    assert status(findings, "Parotid_L", "side") == "fail"
    assert status(findings, "Parotid_R", "side") == "fail"
    # ... and the mirrored arrays with the flipped direction are the correct anatomy again
    mirrored = {name: m[..., ::-1] for name, m in good_masks().items()}
    findings = qa.check_case(mirrored, SPACING, (63.0, 0.0, 0.0), X_FLIPPED)
    assert status(findings, "Parotid_L", "side") == status(findings, "Parotid_R", "side") == "pass"


def test_transposed_prediction_fails_and_permuted_direction_is_followed():
    transposed = {name: np.swapaxes(m, 1, 2) for name, m in good_masks().items()}
    findings = qa.check_case(transposed, SPACING, ORIGIN, IDENTITY)  # parotids now one above the other
    assert status(findings, "Parotid_L", "side") == status(findings, "Parotid_R", "side") == "fail"
    assert "at the same x as" in detail(findings, "Parotid_L", "side")
    # index x runs along the patient's y and index y along x: the direction says so, the anatomy is right
    swapped_xy = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    findings = qa.check_case(transposed, SPACING, ORIGIN, swapped_xy, ct=np.swapaxes(body_ct(), 1, 2))
    assert status(findings, "Parotid_L", "side") == status(findings, "Parotid_R", "side") == "pass"
    single = {"Parotid_L": transposed["Parotid_L"]}
    findings = qa.check_case(single, SPACING, ORIGIN, swapped_xy, ct=np.swapaxes(body_ct(), 1, 2))
    assert status(findings, "Parotid_L", "side") == "pass"
    assert "left of the body midline" in detail(findings, "Parotid_L", "side")


# ----------------------------------------------------------------------------- midline


def test_body_midline():
    midline = qa.body_midline_x(body_ct(), SPACING, ORIGIN, IDENTITY)
    assert midline == pytest.approx(CENTRE_X, abs=1.0)
    shifted = qa.body_midline_x(body_ct(), SPACING, (-100.0, 5.0, 7.0), IDENTITY)
    assert shifted == pytest.approx(midline - 100.0)
    assert qa.body_midline_x(body_ct(), SPACING, (63.0, 0.0, 0.0), X_FLIPPED) == pytest.approx(63.0 - midline)
    # a bright couch strip under the body, apart from it, is not the body
    ct = body_ct()
    ct[:, 58:61, 40:64] = 500
    assert qa.body_midline_x(ct, SPACING, ORIGIN, IDENTITY) == pytest.approx(midline)
    assert qa.body_midline_x(np.full(SHAPE, -1000, np.int16), SPACING, ORIGIN, IDENTITY) is None


def test_single_parotid_against_the_midline():
    ct = body_ct()
    right_side = qa.check_case({"Parotid_L": parotid(48)}, SPACING, ORIGIN, IDENTITY, ct=ct)
    assert status(right_side, "Parotid_L", "side") == "pass"
    assert "left of the body midline, as expected" in detail(right_side, "Parotid_L", "side")

    wrong_side = qa.check_case({"Parotid_L": parotid(15)}, SPACING, ORIGIN, IDENTITY, ct=ct)
    assert status(wrong_side, "Parotid_L", "side") == "fail"
    assert "right of the body midline, expected left" in detail(wrong_side, "Parotid_L", "side")

    right_organ = qa.check_case({"Parotid_R": parotid(15)}, SPACING, ORIGIN, IDENTITY, ct=ct)
    assert status(right_organ, "Parotid_R", "side") == "pass"
    flipped = qa.check_case({"Parotid_R": parotid(15)}, SPACING, (63.0, 0.0, 0.0), X_FLIPPED, ct=ct)
    assert status(flipped, "Parotid_R", "side") == "fail"

    on_midline = qa.check_case({"Parotid_L": parotid(32)}, SPACING, ORIGIN, IDENTITY, ct=ct)
    assert status(on_midline, "Parotid_L", "side") == "pass"
    assert "on the midline" in detail(on_midline, "Parotid_L", "side")


def test_single_parotid_without_ct_is_skipped_and_empty_partner_uses_the_midline():
    alone = qa.check_case({"Parotid_L": parotid(15)}, SPACING, ORIGIN, IDENTITY)
    assert status(alone, "Parotid_L", "side") == "skip"
    masks = {"Parotid_L": parotid(15), "Parotid_R": np.zeros(SHAPE, dtype=bool)}
    findings = qa.check_case(masks, SPACING, ORIGIN, IDENTITY, ct=body_ct())
    assert status(findings, "Parotid_L", "side") == "fail"
    no_body = qa.check_case(masks, SPACING, ORIGIN, IDENTITY, ct=np.full(SHAPE, -1000, np.int16))
    assert status(no_body, "Parotid_L", "side") == "skip"


# ----------------------------------------------------------------------------- volume


def test_volume_ranges():
    mask = parotid(48)
    volume = qa.organ_volume_ml(mask, SPACING)

    def volume_status(low, high):
        findings = qa.check_case({"Parotid_L": mask}, SPACING, ORIGIN, IDENTITY,
                                 volume_ranges_ml={"Parotid_L": (low, high)})
        return status(findings, "Parotid_L", "volume"), detail(findings, "Parotid_L", "volume")

    below = volume_status(2.5 * volume, 3.0 * volume)  # volume < low / 2
    assert below[0] == "fail"
    assert f"{volume:.1f} ml, below the plausible {1.25 * volume:.1f}-{6 * volume:.1f} ml" in below[1]
    assert volume_status(0.8 * volume, 1.2 * volume)[0] == "pass"
    assert volume_status(1.9 * volume, 3.0 * volume)[0] == "pass"  # below the training range, above half of it
    assert volume_status(0.1 * volume, 0.4 * volume)[0] == "fail"  # above twice the high bound
    assert "above" in volume_status(0.1 * volume, 0.4 * volume)[1]
    skipped = qa.check_case({"Parotid_L": mask}, SPACING, ORIGIN, IDENTITY, volume_ranges_ml={"Parotid_R": (1, 2)})
    assert status(skipped, "Parotid_L", "volume") == "skip"
    with pytest.raises(HnsegError, match="Parotid_L"):
        volume_status(3.0, 1.0)


# ----------------------------------------------------------------------------- pieces


def cube(mask, z, y, x, size=4):
    mask[z:z + size, y:y + size, x:x + size] = True


def test_pieces():
    three = np.zeros(SHAPE, dtype=bool)
    for x in (10, 20, 30):
        cube(three, 10, 10, x)
    findings = qa.check_case({"Mandible": three}, SPACING, ORIGIN, IDENTITY)
    assert status(findings, "Mandible", "pieces") == "fail"
    assert "3 pieces" in detail(findings, "Mandible", "pieces")
    assert "largest 33.3 %" in detail(findings, "Mandible", "pieces")

    speck = np.zeros(SHAPE, dtype=bool)
    cube(speck, 10, 10, 10)
    speck[30, 50, 50] = True
    findings = qa.check_case({"Mandible": speck}, SPACING, ORIGIN, IDENTITY)
    assert status(findings, "Mandible", "pieces") == "pass"
    assert "1 piece of" in detail(findings, "Mandible", "pieces")

    two = np.zeros(SHAPE, dtype=bool)
    cube(two, 10, 10, 10)
    cube(two, 10, 10, 30)
    assert status(qa.check_case({"Mandible": two}, SPACING, ORIGIN, IDENTITY), "Mandible", "pieces") == "pass"

    corner = np.zeros(SHAPE, dtype=bool)  # cubes touching at a corner are one 26-connected piece
    for offset in (0, 4, 8):
        cube(corner, 10 + offset, 10 + offset, 10 + offset)
    findings = qa.check_case({"Mandible": corner}, SPACING, ORIGIN, IDENTITY)
    assert detail(findings, "Mandible", "pieces").startswith("1 piece of")


# ----------------------------------------------------------------------------- empty, summary, input


def test_empty_organ_fails_and_skips_the_rest():
    masks = good_masks()
    masks["Parotid_R"] = np.zeros(SHAPE, dtype=bool)
    findings = qa.check_case(masks, SPACING, ORIGIN, IDENTITY, ct=body_ct(), volume_ranges_ml=ranges_around(masks))
    assert status(findings, "Parotid_R", "empty") == "fail"
    assert detail(findings, "Parotid_R", "empty") == "no voxel predicted"
    assert [status(findings, "Parotid_R", c) for c in ("side", "volume", "pieces")] == ["skip"] * 3
    assert status(findings, "Parotid_L", "side") == "pass"  # against the midline now


def test_summarise_counts():
    masks = {name: m[..., ::-1] for name, m in good_masks().items()}
    masks["Submandibular_L"] = np.zeros(SHAPE, dtype=bool)
    findings = qa.check_case(masks, SPACING, ORIGIN, IDENTITY)
    summary = qa.summarise(findings)
    # 4 organs x 4 checks: fails = 2 sides + 1 empty; skips = 3 volumes + brainstem side + 3 for the empty organ
    assert summary["failed"] == 3
    assert summary["skipped"] == 7
    assert summary["passed"] == 16 - 3 - 7
    assert summary["failures"][0].startswith("Parotid_L side: centroid 33.0 mm right of Parotid_R's")
    assert summary["failures"][2] == "Submandibular_L empty: no voxel predicted"
    assert qa.summarise([]) == {"failed": 0, "passed": 0, "skipped": 0, "failures": []}


def test_uint8_masks_and_bad_input():
    masks = {name: m.astype(np.uint8) * 255 for name, m in good_masks().items()}
    findings = qa.check_case(masks, SPACING, ORIGIN, IDENTITY)
    assert status(findings, "Parotid_L", "side") == "pass"
    with pytest.raises(HnsegError, match="one shape"):
        qa.check_case({"Parotid_L": parotid(48)}, SPACING, ORIGIN, IDENTITY, ct=np.zeros((40, 64, 63), np.int16))
    with pytest.raises(HnsegError, match="direction"):
        qa.check_case({"Parotid_L": parotid(48)}, SPACING, ORIGIN, IDENTITY[:6])
