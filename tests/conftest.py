"""Shared fixtures: tiny synthetic phantom cases on disk (fast: a few 48x48 cases at 5 mm)."""

from __future__ import annotations

import pytest

from hnseg_keras.data.phantom import PhantomConfig, generate_case, write_phantom

# 48 x 48 voxels at 5 mm, 15-20 slices of 6-8 mm: about 0.1 s per case.
TINY_PHANTOM = PhantomConfig(size=48, spacing_mm=5.0, slice_spacing_mm=(6.0, 8.0), seed=0)
TINY_PHANTOM_CASES = 5  # splits 3 train / 1 validation / 1 test; phantom_0000 lacks mandible + submandibulars


@pytest.fixture(scope="session")
def tiny_phantom_config() -> PhantomConfig:
    """The PhantomConfig behind ``tiny_phantom_root``."""
    return TINY_PHANTOM


@pytest.fixture(scope="session")
def tiny_phantom_root(tmp_path_factory):
    """Folder with 5 tiny phantom cases in PDDCA layout: ``train/`` (3), ``validation/`` (1), ``test/`` (1).

    Read-only by convention: copy it before changing anything inside.
    """
    root = tmp_path_factory.mktemp("tiny_phantom")
    write_phantom(root, TINY_PHANTOM_CASES, TINY_PHANTOM, progress=False)
    return root


@pytest.fixture
def tiny_case():
    """One tiny in-memory phantom case with all nine organs annotated (index 1 of TINY_PHANTOM)."""
    return generate_case(1, TINY_PHANTOM)
