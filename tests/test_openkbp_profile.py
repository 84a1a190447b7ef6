"""The OpenKBP training profile (issue 7): its configs load and agree, and real cases slice as planned.

The data tests read ``../shared/data/openkbp-hn`` (or ``$OPENKBP_DATA``) in place and are skipped
where it is absent; nothing is copied into the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from hnseg_keras import configs
from hnseg_keras.data.prepare import PrepareConfig

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = ("openkbp.json", "openkbp_long.json", "openkbp_release.json")
PREPARE_CONFIG = REPO / "configs" / "openkbp_prepare.json"
DATA = Path(os.environ.get("OPENKBP_DATA", REPO.parent / "shared" / "data" / "openkbp-hn"))
ORGANS = ("BrainStem", "Mandible", "Parotid_L", "Parotid_R")
# pt_1: all four organs; pt_3: no mandible; pt_6: no left parotid; pt_201: a validation case.
CASES = ("train/pt_1", "train/pt_3", "train/pt_6", "validation/pt_201")

needs_data = pytest.mark.skipif(not (DATA / "train").is_dir(), reason=f"OpenKBP data not found at {DATA}")


def profile_prepare_config() -> PrepareConfig:
    return configs.from_dict(PrepareConfig, configs.read_json(PREPARE_CONFIG))


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_train_config_loads_and_fits_the_slicing(name):
    from hnseg_keras.training.config import load_config

    config = load_config(None, REPO / "configs" / name)
    slicing = profile_prepare_config().slicing
    assert config.variant == "S"
    assert not hasattr(config.model, "window")  # one home: augment.window, which builds the model too
    # The random training crop lies inside the slices and survives the U-Net's 4 down-samplings.
    assert config.augment.crop_size <= slicing.size
    assert config.augment.crop_size % config.model.size_multiple == 0
    assert slicing.size % config.model.size_multiple == 0  # prediction feeds whole slices
    assert config.steps_per_epoch * config.epochs * config.pipeline.batch_size > 0


def test_budgets_fit_the_issue_and_the_long_run_anneals():
    from hnseg_keras.training.config import load_config

    short = load_config(None, REPO / "configs" / "openkbp.json")
    long = load_config(None, REPO / "configs" / "openkbp_long.json")
    assert short.max_train_minutes <= 36 and long.max_train_minutes <= 3 * 36
    assert short.lr_schedule == "plateau" and long.lr_schedule == "cosine"


def test_release_is_the_profile_slicing_for_seven_organs_at_a_fixed_step_count():
    from hnseg_keras.data.organs import TG263_NAMES
    from hnseg_keras.training.config import load_config

    release = configs.from_dict(PrepareConfig, configs.read_json(REPO / "configs" / "openkbp_release_prepare.json"))
    assert release.slicing == profile_prepare_config().slicing
    assert set(ORGANS) < set(release.organs) and len(release.organs) == 7
    assert all(organ in TG263_NAMES for organ in release.organs)
    config = load_config(None, REPO / "configs" / "openkbp_release.json")
    assert config.max_train_minutes is None  # steps, not minutes: the same model on any machine
    assert config.epochs * config.steps_per_epoch == 8000
    assert config.loss.dice_over == "batch_present"  # per-slice Dice lost six of seven organs, plain batch Dice two


def test_prepare_config_is_native_2p5d_for_the_four_organs():
    config = profile_prepare_config()
    assert config.organs == ORGANS
    assert config.slicing.spacing_mm is None and config.slicing.neighbours == 1


@pytest.mark.realdata
@needs_data
def test_profile_slicing_keeps_every_organ_voxel_on_real_cases():
    """Native spacing makes the crop an integer shift, so every organ voxel must reappear exactly."""
    from own_data_builders import read_one

    from hnseg_keras.data.slicing import slice_case

    config = profile_prepare_config()
    size, channels = config.slicing.size, 2 * config.slicing.neighbours + 1
    for name in CASES[:3]:
        case = read_one(DATA / name, ORGANS)
        examples = list(slice_case(case, ORGANS, config.slicing))
        present = [organ in case.masks for organ in ORGANS]
        assert examples[0]["image"].shape == (size, size, channels)
        assert examples[0]["image"].dtype == np.int16
        assert [bool(v) for v in examples[0]["annotated"]] == present
        kept = {example["slice_index"] for example in examples}
        for o, organ in enumerate(ORGANS):
            if not present[o]:
                assert all(not example["masks"][..., o].any() for example in examples)
                continue
            mask = case.masks[organ]
            assert set(np.flatnonzero(mask.any(axis=(1, 2)))) <= kept, f"{name} {organ}: organ slice dropped"
            on_slices = sum(int(example["masks"][..., o].sum()) for example in examples)
            assert on_slices == int(mask.sum()), f"{name} {organ}: voxels lost by the crop"


@pytest.mark.realdata
@needs_data
def test_profile_prepares_real_cases(tmp_path):
    """``prepare`` with the profile's config on 3 train + 1 validation case (linked, not copied)."""
    from hnseg_keras.data.prepare import prepare

    source = tmp_path / "src"
    for name in CASES:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).symlink_to((DATA / name).resolve(), target_is_directory=True)
    manifest = prepare(str(source), tmp_path / "shards", profile_prepare_config(), workers=1)
    assert manifest.complete
    assert list(manifest.image_shape) == [96, 96, 3]
    assert manifest.splits["train"]["cases"] == 3 and manifest.splits["validation"]["cases"] == 1
    organs = manifest.splits["train"]["organs"]
    # Mandible is absent in pt_3 and Parotid_L in pt_6: the manifest counts only annotated cases.
    assert organs["Mandible"]["annotated_cases"] == 2 and organs["Parotid_L"]["annotated_cases"] == 2
    assert organs["BrainStem"]["annotated_cases"] == 3
