"""TFRecord slice shards and their manifest: encode, write atomically, verify, read back.

One ``tf.train.Example`` per slice (schema: docs/ARCHITECTURE.md and tfrecords/README.md). Shards
are GZIP TFRecord files of bounded size, written under a temporary name and renamed when complete;
``manifest.json`` beside them lists every shard with its size and sha256 plus the statistics the
training pipeline needs (per-organ counts, HU histogram of the train split).

TensorFlow is imported only inside the functions that need it, so manifest handling (and the
CLI's input checks) stay fast and quiet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hnseg_keras import configs
from hnseg_keras.data.slicing import SlicingConfig
from hnseg_keras.data.splits import SPLITS, TRAIN
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import sha256_file, temp_name

SCHEMA_VERSION = 1
HIST_FIRST_HU = -1024
HIST_BINS = 4096  # 1-HU bins for -1024 .. 3071; values outside fall into the end bins
TEMP_SUFFIX = ".tmp"
ORGAN_COUNTS = ("annotated_cases", "annotated_slices", "foreground_slices", "foreground_pixels")


def _bytes(value: bytes):
    import tensorflow as tf

    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _ints(values):
    import tensorflow as tf

    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def encode_example(example: dict) -> bytes:
    """Serialise one slice example dict (numpy, `slicing.slice_case` output) to tf.train.Example bytes.

    Arrays are stored as little-endian raw bytes; ``shape`` holds (H, W, C, O).
    """
    import tensorflow as tf

    image, masks = np.asarray(example["image"]), np.asarray(example["masks"])
    height, width, channels = image.shape
    feature = {
        "image": _bytes(image.astype("<i2", copy=False).tobytes()),
        "masks": _bytes(masks.astype(np.uint8, copy=False).tobytes()),
        "dist_maps": _bytes(np.asarray(example["dist_maps"]).astype(np.int8, copy=False).tobytes()),
        "annotated": _bytes(np.asarray(example["annotated"]).astype(np.uint8, copy=False).tobytes()),
        "case_id": _bytes(str(example["case_id"]).encode()),
        "slice_index": _ints([example["slice_index"]]),
        "spacing": tf.train.Feature(float_list=tf.train.FloatList(value=np.asarray(example["spacing"]).tolist())),
        "shape": _ints([height, width, channels, masks.shape[-1]]),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse_example(serialized, image_shape: Sequence[int], num_organs: int) -> dict:
    """Parse one serialised example into the contract's dict of tensors with static shapes.

    Args:
        serialized: scalar string tensor.
        image_shape: (H, W, C) of the data set (manifest ``image_shape``).
        num_organs: O (manifest ``organs`` length).
    """
    import tensorflow as tf

    height, width, channels = (int(v) for v in image_shape)
    features = {key: tf.io.FixedLenFeature([], tf.string)
                for key in ("image", "masks", "dist_maps", "annotated", "case_id")}
    features["slice_index"] = tf.io.FixedLenFeature([], tf.int64)
    features["spacing"] = tf.io.FixedLenFeature([3], tf.float32)
    parsed = tf.io.parse_single_example(serialized, features)

    def raw(key, dtype, shape):
        return tf.reshape(tf.io.decode_raw(parsed[key], dtype, little_endian=True), shape)

    return {
        "image": raw("image", tf.int16, [height, width, channels]),
        "masks": raw("masks", tf.uint8, [height, width, num_organs]),
        "dist_maps": raw("dist_maps", tf.int8, [height, width, num_organs]),
        "annotated": raw("annotated", tf.uint8, [num_organs]),
        "case_id": parsed["case_id"],
        "slice_index": parsed["slice_index"],
        "spacing": parsed["spacing"],
    }


@dataclass(frozen=True)
class ShardInfo:
    """One finished shard: path relative to the manifest folder, slice count, size, checksum."""

    file: str
    slices: int
    bytes: int
    sha256: str




class ShardWriter:
    """Write serialised examples into GZIP TFRecord shards named ``{prefix}-{NNN}.tfrecord.gz``.

    A shard is closed before its uncompressed payload would pass `max_bytes` (the compressed file
    is smaller); each is written as ``.{name}.tmp`` and renamed only when complete. zlib level 3 writes
    about 3x faster than the default 6 for ~17% larger CT slices. Use as a context
    manager: an exception removes the unfinished temp file. `close()` returns the ShardInfo list.
    """

    def __init__(self, root: str | os.PathLike, prefix: str, max_bytes: int = 64 << 20, compression_level: int = 3):
        self.root, self.prefix, self.max_bytes = Path(root), prefix, int(max_bytes)
        self.compression_level = int(compression_level)
        self.finished: list[ShardInfo] = []
        self._writer = None
        self._temp: Path | None = None
        self._payload = self._count = 0

    def _final_path(self) -> Path:
        return self.root / f"{self.prefix}-{len(self.finished):03d}.tfrecord.gz"

    def write(self, record: bytes | dict) -> None:
        record = encode_example(record) if isinstance(record, dict) else record
        if self._writer is not None and self._payload + len(record) > self.max_bytes:
            self._finish_shard()
        if self._writer is None:
            import tensorflow as tf

            final = self._final_path()
            final.parent.mkdir(parents=True, exist_ok=True)
            self._temp = temp_name(final)  # per process: concurrent writers never share a temp file
            options = tf.io.TFRecordOptions(compression_type="GZIP", compression_level=self.compression_level)
            self._writer = tf.io.TFRecordWriter(str(self._temp), options)
        self._writer.write(record)
        self._payload += len(record)
        self._count += 1

    def _finish_shard(self) -> None:
        self._writer.close()
        final = self._final_path()
        info = ShardInfo(final.relative_to(self.root).as_posix(), self._count, self._temp.stat().st_size,
                         sha256_file(self._temp))
        os.replace(self._temp, final)
        self.finished.append(info)
        self._writer, self._temp, self._payload, self._count = None, None, 0, 0

    def close(self) -> list[ShardInfo]:
        if self._writer is not None:
            self._finish_shard()
        return list(self.finished)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._temp.unlink(missing_ok=True)
            self._writer = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def hu_histogram(image: np.ndarray) -> np.ndarray:
    """int64 [4096] counts of HU values in 1-HU bins from -1024 (values beyond the range clipped)."""
    shifted = np.clip(np.asarray(image, dtype=np.int32) - HIST_FIRST_HU, 0, HIST_BINS - 1)
    return np.bincount(shifted.ravel(), minlength=HIST_BINS).astype(np.int64)


@dataclass(frozen=True)
class CaseRecord:
    """What conversion of one case produced; prepare stores one per case and builds the manifest.

    organ_stats: organ -> {annotated_slices, foreground_slices, foreground_pixels} on the slice grid.
    histogram: HU counts (`hu_histogram`) of the centre channel of the case's slices.
    volumes_ml: organ -> volume in mL on the case's own grid (annotated organs; plausible ranges for QA).
    stored: how the input CT was stored ("RAS", ...) before it was read into LPS.
    """

    case_id: str
    split: str
    slices: int
    shards: list[ShardInfo]
    transform: dict
    annotated: list[int]
    organ_stats: dict[str, dict[str, int]]
    histogram: list[int]
    volumes_ml: dict[str, float] = field(default_factory=dict)
    stored: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CaseRecord:
        try:
            return cls(**{**data, "shards": [ShardInfo(**item) for item in data["shards"]]})
        except (TypeError, KeyError) as error:
            raise HnsegError(f"malformed case record ({error}); rerun prepare into a new --out") from None


def verify_shards(root: str | os.PathLike, shards: Sequence[ShardInfo]) -> list[str]:
    """Problems (empty when all fine) of shard files under `root`: missing, size or sha256 mismatch."""
    problems = []
    for info in shards:
        path = Path(root) / info.file
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != info.bytes:
            problems.append(f"{path}: size {path.stat().st_size} != {info.bytes}")
        elif sha256_file(path) != info.sha256:
            problems.append(f"{path}: sha256 mismatch")
    return problems


def _split_summary(records: list[CaseRecord], organs: Sequence[str]) -> dict:
    counts = {name: dict.fromkeys(ORGAN_COUNTS, 0) for name in organs}
    for record in records:
        for name, flag in zip(organs, record.annotated, strict=True):
            counts[name]["annotated_cases"] += int(flag)
            for key, value in record.organ_stats[name].items():
                counts[name][key] += int(value)
    return {
        "cases": len(records),
        "slices": sum(record.slices for record in records),
        "shards": [dataclasses.asdict(info) for record in records for info in record.shards],
        "organs": counts,
    }


@dataclass(frozen=True)
class Manifest:
    """The manifest.json of a prepared data set (schema_version 1); paths are relative to its folder.

    Read-only once built: ``slicing`` is a ``SlicingConfig`` (a dict given to the constructor is
    converted), so one loaded manifest can be handed from stage to stage.
    """

    organs: list[str]
    slicing: SlicingConfig
    image_shape: list[int]
    splits: dict = field(default_factory=dict)
    cases: dict = field(default_factory=dict)
    intensity_histogram: dict = field(default_factory=dict)
    source: str = ""
    prepare: dict = field(default_factory=dict)
    organ_definitions: dict = field(default_factory=dict)  # {organ: organs.definitions entry}
    split_rule: dict = field(default_factory=dict)  # how cases were assigned to splits (splits.assign)
    complete: bool = False
    schema_version: int = SCHEMA_VERSION
    organ_definitions: dict | None = None  # optional, copied through to runs and exports uninterpreted
    orientation: str | None = None  # the orientation slices were cut in ("LPS"); None: as stored (older data)

    def __post_init__(self):
        if isinstance(self.slicing, dict):
            object.__setattr__(self, "slicing", configs.from_dict(SlicingConfig, self.slicing))

    @classmethod
    def from_records(cls, records: Sequence[CaseRecord], **fields) -> Manifest:
        """Aggregate case records (any order) into a manifest; `fields` fill organs, slicing, ..."""
        records = sorted(records, key=lambda record: record.case_id)
        splits = {split: _split_summary([record for record in records if record.split == split], fields["organs"])
                  for split in SPLITS + tuple(sorted({r.split for r in records} - set(SPLITS)))}
        cases = {
            record.case_id: {"split": record.split, "slices": record.slices,
                             "shards": [info.file for info in record.shards], "transform": record.transform,
                             "volumes_ml": record.volumes_ml, "stored": record.stored}
            for record in records
        }
        counts = np.zeros(HIST_BINS, dtype=np.int64)
        for record in records:
            if record.split == TRAIN:
                counts += np.asarray(record.histogram, dtype=np.int64)
        histogram = {"first_hu": HIST_FIRST_HU, "bin_hu": 1, "counts": counts.tolist()}
        return cls(**fields, splits=splits, cases=cases, intensity_histogram=histogram)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        path = Path(path)
        if path.is_dir():
            path = path / "manifest.json"
        if not path.is_file():
            raise HnsegError(f"{path}: manifest not found; run `hnseg prepare` to create it")
        data = configs.read_json(path)
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            version = data.get("schema_version") if isinstance(data, dict) else None
            raise HnsegError(f"{path}: unsupported manifest schema_version {version!r} (expected "
                             f"{SCHEMA_VERSION}); rerun `hnseg prepare` into a new --out")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{key: value for key, value in data.items() if key in names})
        except TypeError as error:
            raise HnsegError(f"{path}: invalid manifest ({error}); rerun `hnseg prepare`") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file + rename)."""
        configs.write_json_atomic(path, configs.to_dict(self))

    def training_geometry(self) -> dict:
        """What a model trained on this data must know about its grid (``model_io.data_description``).

        ``native_spacing_mm`` (median / min / max of the train cases' in-plane spacing) is set when the
        slices keep each CT's own spacing; ``organ_volumes_ml`` is each organ's [min, max] over the
        train cases that carry it (prediction's volume check).
        """
        train = [entry for entry in self.cases.values() if entry.get("split") == TRAIN]
        native = None
        if self.slicing.spacing_mm is None and train:
            spacings = [float(np.mean(entry["transform"]["original_spacing"][:2])) for entry in train]
            native = {"median": round(float(np.median(spacings)), 4), "min": round(min(spacings), 4),
                      "max": round(max(spacings), 4), "cases": len(spacings)}
        volumes: dict[str, list[float]] = {}
        for entry in train:
            for organ, volume in (entry.get("volumes_ml") or {}).items():
                volumes.setdefault(organ, []).append(float(volume))
        return {"orientation": self.orientation, "spacing_mm": self.slicing.spacing_mm, "native_spacing_mm": native,
                "organ_volumes_ml": {organ: [round(min(v), 3), round(max(v), 3)] for organ, v in volumes.items()
                                     if organ in self.organs}}

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise HnsegError(f"unknown split {split!r}; this manifest has {sorted(self.splits)}")
        return [ShardInfo(**item) for item in self.splits[split]["shards"]]

    def verify(self, root: str | os.PathLike) -> list[str]:
        """Check every shard of every split against its size and sha256; returns the problems."""
        return [problem for split in self.splits for problem in verify_shards(root, self.shards(split))]


def read_split(manifest_path: str | os.PathLike, split: str, deterministic: bool = True,
               shuffle_seed: int | None = None, cycle_length: int = 8, manifest: Manifest | None = None):
    """tf.data.Dataset of parsed example dicts (`parse_example`) for one split of a manifest.

    Shards are read with a parallel interleave (one record from each of `cycle_length` shards in
    turn). `deterministic` fixes the order; `shuffle_seed` shuffles the shard order (reshuffled each
    epoch, reproducible for a seed). `manifest`: the one at `manifest_path`, if the caller holds it.
    """
    import tensorflow as tf

    manifest_path = Path(manifest_path)
    if manifest_path.is_dir():
        manifest_path = manifest_path / "manifest.json"
    manifest = manifest or Manifest.load(manifest_path)
    shards = manifest.shards(split)
    if not shards:
        raise HnsegError(f"{manifest_path}: split {split!r} has no slices; choose another split or data set")
    paths = [str(manifest_path.parent / info.file) for info in shards]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise HnsegError(f"{missing[0]}: shard listed in the manifest is missing; rerun `hnseg prepare`")
    files = tf.data.Dataset.from_tensor_slices(paths)
    if shuffle_seed is not None:
        files = files.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    records = files.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type="GZIP"),
        cycle_length=max(1, min(cycle_length, len(paths))), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic,
    )
    shape, num_organs = manifest.image_shape, len(manifest.organs)
    return records.map(lambda s: parse_example(s, shape, num_organs), num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=deterministic)


# ----------------------------------------------------------------------------- verification with a fast path

VERIFIED_CACHE = ".verified.json"  # {shard: [size, mtime_ns, sha256]} of shards already hashed, in the shard folder


def _load_verified(root: Path) -> dict:
    try:
        data = configs.read_json(root / VERIFIED_CACHE) if (root / VERIFIED_CACHE).is_file() else {}
    except HnsegError:
        return {}
    return data if isinstance(data, dict) else {}


def shard_problems(root: str | os.PathLike, shards: Sequence[ShardInfo], use_cache: bool = True) -> list[str]:
    """One line per shard that is missing or differs (size, sha256) from its manifest entry.

    A shard whose (size, mtime_ns) match the cache entry of an earlier verification is not hashed
    again; the cache is rewritten atomically after new hashes. ``use_cache=False`` hashes every file.
    """
    root = Path(root)
    cache = _load_verified(root) if use_cache else {}
    changed, problems = False, []
    for info in shards:
        path = root / info.file
        if not path.is_file():
            problems.append(f"{path}: shard listed in manifest.json is missing; rerun `hnseg prepare` into a new --out")
            continue
        stat = path.stat()
        if stat.st_size != info.bytes:
            problems.append(f"{path}: shard is {stat.st_size} bytes, manifest.json says {info.bytes} (truncated or "
                            "replaced); rerun `hnseg prepare` into a new --out")
            continue
        key = [stat.st_size, stat.st_mtime_ns, info.sha256]
        if cache.get(info.file) == key:
            continue
        if sha256_file(path) != info.sha256:
            problems.append(f"{path}: shard sha256 differs from manifest.json (damaged or replaced by another "
                            "shard); rerun `hnseg prepare` into a new --out")
            continue
        cache[info.file], changed = key, True
    if changed:
        with contextlib.suppress(OSError):  # a read-only data folder: verified again next time
            configs.write_json_atomic(root / VERIFIED_CACHE, cache)
    return problems


def verify_data(manifest_path: str | os.PathLike, splits: Sequence[str] | None = None, use_cache: bool = True,
                manifest: Manifest | None = None) -> Manifest:
    """Check the shards of ``splits`` (default: all) of a manifest (``manifest``, if the caller holds it
    already); one-line HnsegError naming the first bad one."""
    path = Path(manifest_path)
    manifest = manifest or Manifest.load(path)
    root = path if path.is_dir() else path.parent
    shards = [info for split in (splits or list(manifest.splits)) if split in manifest.splits
              for info in manifest.shards(split)]
    problems = shard_problems(root, shards, use_cache)
    if problems:
        more = f" (and {len(problems) - 1} more shard(s))" if len(problems) > 1 else ""
        first, _, fix = problems[0].rpartition("; ")
        raise HnsegError(f"{first}{more}; {fix}")
    return manifest
