"""The built-in phantom data set, generated and prepared on first use (the demo and `hnseg train` without --data).

This is a data-stage helper the command line calls before training; training itself only ever takes
prepared data, so it never imports this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hnseg_keras import configs
from hnseg_keras.data.phantom import PREPARED_INPUT, PhantomConfig, write_phantom
from hnseg_keras.data.prepare import PrepareConfig, prepare
from hnseg_keras.data.shards import Manifest
from hnseg_keras.data.slicing import SlicingConfig

DEMO_ORGANS = ("BrainStem", "Mandible", "Parotid_L", "Parotid_R", "Submandibular_L", "Submandibular_R")


@dataclass(frozen=True)
class PhantomDataConfig:
    """The built-in phantom data set (the ``"phantom"`` section of a train config file).

    Attributes:
        cases: number of phantom cases (split into train / validation / test by ``prepare``).
        generator: phantom geometry (in-plane size and spacing, slice spacing, ...).
        prepare: organs and slicing of the shards.
        cache_dir: parent folder of the prepared shards; the data set lives in
            ``<cache_dir>/phantom-<hash of the settings>`` and is reused while its manifest is complete.
        workers: processes used by ``prepare``.
    """
    cases: int = 16
    generator: PhantomConfig = field(default_factory=PhantomConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    cache_dir: str = "tfrecords"
    workers: int = 2


def demo_phantom() -> PhantomDataConfig:
    """Small phantom for the CPU demo (S preset): 16 cases, 112 px slices of 2 mm, six organs.

    At 2 mm the optic nerves and chiasm are 1-2 pixels wide, more than a few CPU minutes can learn, so
    the demo trains the brain stem, mandible, parotids and submandibular glands.
    """
    return PhantomDataConfig(
        cases=16,
        generator=PhantomConfig(size=128, spacing_mm=1.6, slice_spacing_mm=(2.5, 3.0)),
        prepare=PrepareConfig(organs=DEMO_ORGANS,
                              slicing=SlicingConfig(size=112, spacing_mm=2.0, empty_slice_share=0.1)),
    )


def phantom_settings(variant: str, section: dict | None = None) -> PhantomDataConfig:
    """The phantom of a variant (S: :func:`demo_phantom`, else the defaults) with ``section`` over it."""
    base = demo_phantom() if str(variant).strip().upper() == "S" else PhantomDataConfig()
    if not section:
        return base
    return configs.from_dict(PhantomDataConfig, _deep_merge(configs.to_dict(base), section))


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _deep_merge(base[key], value) if both else value
    return merged


def prepare_phantom(settings: PhantomDataConfig) -> Path:
    """Manifest path of the phantom data set ``settings`` describes, preparing it on first use (resumable).

    The phantom cases are written to ``<folder>/phantom-cases`` and prepared from there like any input.
    A complete folder is reused as it is, also one prepared by an earlier version; an unfinished one
    from before the phantom became an input folder (source ``phantom:N``) is rebuilt.
    """
    identity = configs.to_dict(dataclasses.replace(settings, cache_dir="", workers=0))
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(settings.cache_dir) / f"phantom-{digest}"
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        manifest = Manifest.load(manifest_path)
        if manifest.complete:
            return manifest_path
        if manifest.source != PREPARED_INPUT:
            shutil.rmtree(folder)
    print(f"preparing the built-in phantom data set ({settings.cases} cases) in {folder}", file=sys.stderr)
    write_phantom(folder / PREPARED_INPUT, settings.cases, settings.generator)
    prepare(folder / PREPARED_INPUT, folder, settings.prepare, workers=max(1, settings.workers))
    return manifest_path
