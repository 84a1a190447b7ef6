"""``cache: memory`` only when the splits fit: size estimated from the manifest, checked against RAM.

tf.data's memory cache keeps every decoded example of a split for the whole run. For a large data
set (OpenKBP at 256 px) that can exceed the machine's memory and kill the run late in its first
epoch, so above a budget (a quarter of physical memory, or of the container's limit) the decoded
slices are cached in files of a temporary folder instead (removed when the process exits), with a
note on stderr.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

from hnseg_keras.data.shards import Manifest
from hnseg_keras.data.splits import TRAIN, VALIDATION

BUDGET_SHARE = 0.25
CGROUP_LIMIT = Path("/sys/fs/cgroup/memory.max")


def example_bytes(manifest: Manifest) -> int:
    """Decoded bytes of one example: int16 image, uint8 masks, int8 distance maps, flags and ids."""
    height, width, channels = (int(v) for v in manifest.image_shape)
    organs = len(manifest.organs)
    return height * width * (2 * channels + 2 * organs) + organs + 64


def split_bytes(manifest: Manifest, splits=(TRAIN, VALIDATION)) -> int:
    """Memory the memory cache of ``splits`` would hold (slices x bytes per example)."""
    slices = sum(int(manifest.splits.get(split, {}).get("slices", 0)) for split in splits)
    return slices * example_bytes(manifest)


def memory_bytes() -> int:
    """Physical memory, or the cgroup (container) limit when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = CGROUP_LIMIT.read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def fit_cache(pipeline, manifest_path: str | os.PathLike, budget: int | None = None):
    """``pipeline`` unchanged, or with a disk cache (a temporary folder, removed at exit) when a memory
    cache would pass the budget (said on stderr)."""
    if pipeline.cache != "memory":
        return pipeline
    needed = split_bytes(Manifest.load(manifest_path))
    budget = int(BUDGET_SHARE * memory_bytes()) if budget is None else budget
    if needed <= budget:
        return pipeline
    folder = tempfile.mkdtemp(prefix="hnseg-cache-")
    atexit.register(shutil.rmtree, folder, True)
    print(f"note: cache=memory would hold about {needed / 2**30:.1f} GiB of decoded slices (train + validation), "
          f"over the budget of {budget / 2**30:.1f} GiB ({BUDGET_SHARE:.0%} of memory); caching them on disk "
          f"in {folder} instead (removed at exit)", file=sys.stderr, flush=True)
    return dataclasses.replace(pipeline, cache=str(Path(folder) / "slices"))
