"""``hnseg prepare``: convert a folder of CT cases (any layout ``layouts`` reads) into TFRecord shards.

Output folder layout::

    manifest.json                  the data set's index (shards.Manifest), rewritten after each case
    cases/<case>.json              one record per finished case (written after its shards)
    <split>/<case>-NNN.tfrecord.gz GZIP shards, each case in one or more bounded shards
    phantom-cases/                 the phantom folder ``--phantom N`` writes first and then prepares

Resumable: a case counts as finished only once its record exists, and its record is written only
after all its shards were renamed into place. A rerun verifies finished cases by sha256 and skips
them, removes temp files and unrecorded shards, and converts the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hnseg_keras import configs
from hnseg_keras.data import layouts, orientation, splits
from hnseg_keras.data import organs as organ_catalogue
from hnseg_keras.data.cases import CaseRef
from hnseg_keras.data.organs import DEFAULT_ORGANS, resolve_organs
from hnseg_keras.data.shards import (
    HIST_BINS,
    TEMP_SUFFIX,
    CaseRecord,
    Manifest,
    ShardWriter,
    hu_histogram,
    sha256_file,
    verify_shards,
)
from hnseg_keras.data.slicing import SlicingConfig, compute_transform, slice_case
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import LOCK_NAME, FolderLock, owned_by_live_process
from hnseg_keras.progress import Progress


@dataclass(frozen=True)
class PrepareConfig:
    """What `prepare` writes; an output folder only ever holds one configuration.

    Attributes:
        organs: canonical organ names, in channel order.
        slicing: how cases become slices.
        shard_max_mb: upper bound of a shard's uncompressed payload in MiB.
        compression_level: zlib level of the GZIP shards (1 fastest .. 9 smallest).
        split_seed: seed of the train/validation draw for cases without a split from their folder.
        validation_fraction: share of those cases drawn into validation (PDDCA: 8 of 33).
        split_fractions: train / validation / test shares for cases with neither a split folder nor a PDDCA id.
        fold: the fold of an nnU-Net splits_final.json split file.
        extra_organs: definitions of the organs added by ``--organs-file`` (``organs.definitions``).
    """

    organs: tuple[str, ...] = DEFAULT_ORGANS
    slicing: SlicingConfig = field(default_factory=SlicingConfig)
    shard_max_mb: float = 64.0
    compression_level: int = 3
    split_seed: int = 2015
    validation_fraction: float = 8 / 33
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    fold: int = 0
    extra_organs: dict = field(default_factory=dict)

    def catalogue(self) -> dict:
        return organ_catalogue.catalogue_from(self.extra_organs)

    def __post_init__(self):
        object.__setattr__(self, "organs", resolve_organs(self.organs, self.catalogue()))  # validated names
        if not self.shard_max_mb > 0:
            raise HnsegError(f"shard_max_mb {self.shard_max_mb} must be positive")
        if not 0 <= self.compression_level <= 9:
            raise HnsegError(f"compression_level {self.compression_level} must be within 0..9")
        if not 0.0 <= self.validation_fraction <= 1.0:
            raise HnsegError(f"validation_fraction {self.validation_fraction} must be within 0..1")


def safe_name(case_id: str) -> str:
    """A file-name-safe version of a case id."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", case_id)


def assign_splits(refs: Sequence, config: PrepareConfig, split_file: str | None = None) -> dict[str, str]:
    """case_id -> split (see ``splits.assign``), deterministic by case id."""
    return splits.assign(refs, config.split_seed, config.validation_fraction, config.split_fractions, split_file,
                         config.fold)[0]


def convert_case(job: dict) -> tuple[dict, float]:
    """Worker: read, slice and shard one case, then record it. Returns (CaseRecord dict, seconds).

    Top-level and driven by a plain dict so it works under the multiprocessing 'spawn' method.
    """
    start = time.perf_counter()
    config = configs.from_dict(PrepareConfig, job["config"])
    organs, slicing = config.organs, config.slicing
    ref = CaseRef(job["case_id"], Path(job["path"]), None, job["layout"],
                  Path(job["label"]) if job["label"] else None, job["series"])
    case = layouts.read_ref(ref, organs, layouts.Reading.from_job(job["reading"]))
    transform = compute_transform(case, slicing)
    stats = {name: {"annotated_slices": 0, "foreground_slices": 0, "foreground_pixels": 0} for name in organs}
    histogram = np.zeros(HIST_BINS, dtype=np.int64)
    count = 0
    out = Path(job["out"])
    prefix = f"{job['split']}/{safe_name(job['case_id'])}"
    with ShardWriter(out, prefix, int(config.shard_max_mb * (1 << 20)), config.compression_level) as writer:
        for example in slice_case(case, organs, slicing, transform):
            writer.write(example)
            count += 1
            histogram += hu_histogram(example["image"][..., slicing.neighbours])
            pixels = example["masks"].reshape(-1, len(organs)).sum(axis=0)
            for o, name in enumerate(organs):
                stats[name]["annotated_slices"] += int(example["annotated"][o])
                stats[name]["foreground_slices"] += int(pixels[o] > 0)
                stats[name]["foreground_pixels"] += int(pixels[o])
    voxel_ml = float(np.prod(case.spacing)) / 1000.0
    volumes = {name: round(float(np.count_nonzero(case.masks[name])) * voxel_ml, 3) for name in organs
               if name in case.masks and case.masks[name].any()}
    record = CaseRecord(job["case_id"], job["split"], count, writer.finished, transform.to_dict(),
                        case.annotated(organs).astype(int).tolist(), stats, histogram.tolist(), volumes,
                        case.storage.code if case.storage is not None else "")
    configs.write_json_atomic(out / "cases" / f"{safe_name(job['case_id'])}.json", record.to_dict())
    return record.to_dict(), time.perf_counter() - start


def _identity(config: PrepareConfig, split_file: str | None, reading: layouts.Reading) -> dict:
    """What must match for a rerun to continue an existing output folder."""
    split_sha = None
    if split_file is not None:
        split_sha = sha256_file(split_file)
    read = {"layout": reading.layout, "series": reading.series, "organ_map": dict(reading.organ_map)}
    if reading.oblique != "refuse":  # only when set: folders prepared before the option stay resumable
        read["oblique"] = reading.oblique
    # "phantom" is always None now (a phantom is an input folder like any other); the key stays because
    # earlier versions recorded it, and their unfinished folders must stay resumable.
    return {"config": configs.to_dict(config), "split_file_sha256": split_sha, "phantom": None, "reading": read}


def _holds_manifest(out: Path, root: Path) -> bool:
    """Whether ``out`` is a prepare output already; refuses a file, or a folder that holds something else.

    Before its first manifest the folder may hold the input folder ``root`` itself (``--phantom`` writes
    its cases to ``<out>/phantom-cases``), unless that has a name prepare writes to.
    """
    if not out.exists():
        return False
    if not out.is_dir():
        raise HnsegError(f"{out}: exists and is not a folder; choose a new --out")
    if (out / "manifest.json").is_file():
        return True
    inside = root.parent == out.resolve() and root.name not in ("cases", *splits.SPLITS)
    if any(p.name != LOCK_NAME and not (inside and p.name == root.name) for p in out.iterdir()):
        raise HnsegError(f"{out}: exists and is not a prepare output (no manifest.json); choose a new --out")
    return False


def _check_output(out: Path, source: str, identity: dict, root: Path) -> None:
    """Refuse an output folder that holds something else or was prepared from another input or configuration."""
    if not _holds_manifest(out, root):
        return
    manifest = Manifest.load(out / "manifest.json")
    if manifest.source != source or manifest.prepare != identity:
        differs = sorted(key for key in identity if manifest.prepare.get(key) != identity[key])
        what = ", ".join(differs + (["input"] if manifest.source != source else []))
        raise HnsegError(f"{out}: was prepared from a different input or configuration ({what}); "
                         "choose a new --out")


def _resume_state(out: Path, wanted: dict[str, str]) -> dict[str, CaseRecord]:
    """Finished, verified CaseRecords by case id; removes temp files, bad records and orphan shards."""
    for folder in (out, out / "cases", *(out / split for split in {*wanted.values()})):
        for temp in folder.glob(f".*{TEMP_SUFFIX}"):
            if temp.is_file() and not owned_by_live_process(temp):
                temp.unlink()
    done = {}
    for path in sorted((out / "cases").glob("*.json")):
        try:
            record = CaseRecord.from_dict(configs.read_json(path))
        except HnsegError:
            record = None
        if (record is None or wanted.get(record.case_id) != record.split
                or verify_shards(out, record.shards)):
            path.unlink()
            continue
        done[record.case_id] = record
    keep = {info.file for record in done.values() for info in record.shards}
    for split in {*wanted.values()}:
        for shard in (out / split).glob("*.tfrecord.gz"):
            if shard.relative_to(out).as_posix() not in keep:
                shard.unlink()
    return done


def _find(root: Path, config: PrepareConfig, reading: layouts.Reading) -> list:
    """The cases of ``root``, each checked (headers, names, contours) before anything is written."""
    if not root.exists():
        raise HnsegError(f"{root}: input folder not found; give a folder of cases or use --phantom N")
    refs = layouts.find_refs(root, reading)
    unlabelled = [ref.case_id for ref in refs if ref.layout in ("nnunet", "image") and ref.label is None]
    if unlabelled:
        print(f"prepare: skipping {len(unlabelled)} case(s) without contours ({', '.join(unlabelled[:5])}"
              f"{', ...' if len(unlabelled) > 5 else ''})", file=sys.stderr)
    refs = [ref for ref in refs if ref.case_id not in unlabelled]
    if not refs:
        raise HnsegError(f"{root}: no case with contours found; give CTs with their structures")
    for ref in refs:
        found = layouts.describe(ref, reading)["organs"]
        if ref.layout != "pddca" and not set(found) & set(config.organs):
            raise HnsegError(f"{ref.path}: none of the organs {', '.join(config.organs)} is among its structures; "
                             "check the names with `hnseg scan` and map them with --organ-map")
    names = [safe_name(ref.case_id) for ref in refs]
    if len(set(names)) != len(names):
        raise HnsegError(f"{root}: case ids collide after making them file-name safe; rename the cases")
    return refs


def _run_jobs(jobs: list[dict], workers: int):
    """Yield (record dict, seconds) per job, in completion order."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield convert_case(job)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(convert_case, jobs)


def _source_name(root: Path, out: Path) -> str:
    """The input folder relative to ``out``: no absolute path of this machine goes into the manifest."""
    return Path(os.path.relpath(root, Path(out).resolve())).as_posix()


def prepare(source: str | os.PathLike, out_dir: str | os.PathLike, config: PrepareConfig = PrepareConfig(),
            workers: int = 1, split_file: str | None = None, reading: layouts.Reading | None = None) -> Manifest:
    """Convert the cases of the input folder ``source`` into shards + manifest in `out_dir`; resumes a partial
    run. Returns the Manifest.

    ``reading`` says how to read the input (layout, DICOM series, organ-name map); its catalogue
    is the config's (built-in organs plus ``extra_organs``).

    Input problems found before conversion write nothing; if the first run into a new folder fails
    before any case is finished, the folder is removed again.
    """
    out = Path(out_dir)
    reading = dataclasses.replace(reading or layouts.Reading(), catalogue=config.catalogue())
    root = Path(source).resolve()
    source_text, refs = _source_name(root, out), _find(root, config, reading)
    if split_file is not None and not Path(split_file).is_file():
        raise HnsegError(f"{split_file}: split file not found")
    identity = _identity(config, split_file, reading)
    _check_output(out, source_text, identity, root)
    slicing = config.slicing
    base = Manifest(organs=list(config.organs), slicing=configs.to_dict(slicing),
                    image_shape=[slicing.size, slicing.size, 2 * slicing.neighbours + 1],
                    source=source_text, prepare=identity, orientation=orientation.CANONICAL,
                    organ_definitions=organ_catalogue.definitions(config.organs, config.catalogue()))
    created = not out.exists()
    try:
        with FolderLock(out, "hnseg prepare"):  # one writer per --out
            _check_output(out, source_text, identity, root)  # again, now that no one else writes there
            if not (out / "manifest.json").exists():
                base.save(out / "manifest.json")
            assignment, split_rule = splits.assign(refs, config.split_seed, config.validation_fraction,
                                                   config.split_fractions, split_file, config.fold)
            base = dataclasses.replace(base, split_rule=split_rule)
            return _convert_all(out, refs, config, assignment, workers, base, reading)
    except HnsegError:
        if created and out.is_dir() and not list((out / "cases").glob("*.json")):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _convert_all(out: Path, refs: list, config: PrepareConfig, assignment: dict[str, str], workers: int,
                 base: Manifest, reading: layouts.Reading) -> Manifest:
    """Skip verified cases, convert the others (progress line each), keep the manifest current."""
    done = _resume_state(out, assignment)
    fields = {key: getattr(base, key) for key in ("organs", "slicing", "image_shape", "source", "prepare",
                                                  "organ_definitions", "split_rule", "orientation")}
    Manifest.from_records(list(done.values()), **fields).save(out / "manifest.json")
    jobs = [{"case_id": ref.case_id, "path": str(ref.path), "split": assignment[ref.case_id], "out": str(out),
             "layout": ref.layout, "label": str(ref.label) if ref.label else None, "series": ref.series,
             "reading": reading.to_job(), "config": configs.to_dict(config)}
            for ref in refs if ref.case_id not in done]
    if done:
        print(f"skipping {len(done)} finished case(s) (shards verified)", file=sys.stderr)
    progress = Progress("prepare", len(jobs))
    for data, seconds in _run_jobs(jobs, workers):
        record = CaseRecord.from_dict(data)
        done[record.case_id] = record
        megabytes = sum(info.bytes for info in record.shards) / 1e6
        progress.step(record.case_id, f"{record.split}, {record.slices} slices, {len(record.shards)} shard(s), "
                      f"{megabytes:.1f} MB, {seconds:.1f} s")
        Manifest.from_records(list(done.values()), **fields).save(out / "manifest.json")
    progress.finish(f"shards and manifest.json in {out}")
    manifest = Manifest.from_records(list(done.values()), complete=True, **fields)
    manifest.save(out / "manifest.json")
    native = manifest.training_geometry()["native_spacing_mm"]
    if native is not None:
        print(f"prepare: slices keep each CT's own in-plane spacing (--spacing none): {native['min']:g} to "
              f"{native['max']:g} mm over {native['cases']} train case(s), median {native['median']:g} mm. A model "
              f"trained on them resamples a CT outside that range to {native['median']:g} mm when it predicts; "
              "--spacing MM trains on one fixed grid instead", file=sys.stderr)
    return manifest


def _parse_spacing(text: str) -> float | None:
    if text.strip().lower() in ("none", "native"):
        return None
    try:
        return float(text)
    except ValueError:
        raise HnsegError(f"--spacing {text!r}: give millimetres (e.g. 1.0) or 'none' for native spacing") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SlicingConfig()
    parser.add_argument("input", nargs="?", help="folder of cases: PDDCA <case>/img.nrrd (train/ validation/ "
                        "...), a DICOM tree of patient folders, an nnU-Net raw dataset")
    parser.add_argument("--phantom", type=int, metavar="N", help="convert N generated phantom cases instead")
    parser.add_argument("--phantom-size", type=int, help="phantom in-plane voxels (default 512)")
    parser.add_argument("--phantom-spacing", type=float, help="phantom in-plane spacing, mm (default 0.9)")
    parser.add_argument("--phantom-seed", type=int, help="phantom seed (default 0)")
    parser.add_argument("--phantom-option", action="append", default=[], metavar="KEY=VALUE",
                        help="any other phantom.PhantomConfig field, repeatable (e.g. noise_hu=10)")
    parser.add_argument("--out", required=True, help="output folder, e.g. tfrecords/NAME")
    parser.add_argument("--organs", nargs="+", help="organ names in channel order (default: the nine PDDCA organs)")
    parser.add_argument("--size", type=int, default=defaults.size, help="slice size in pixels")
    parser.add_argument("--spacing", default=str(defaults.spacing_mm), help="in-plane mm, or 'none' for native")
    parser.add_argument("--neighbours", type=int, default=defaults.neighbours, help="k: store 2k+1 CT slices")
    parser.add_argument("--empty-margin", type=int, default=defaults.empty_slice_margin,
                        help="organ-free slices kept beyond the organs' z-range")
    parser.add_argument("--empty-share", type=float, default=defaults.empty_slice_share,
                        help="share of the other organ-free slices kept")
    parser.add_argument("--shard-mb", type=float, default=PrepareConfig.shard_max_mb, help="max shard payload, MiB")
    parser.add_argument("--splits", "--split-file", dest="split_file", metavar="FILE",
                        help="JSON {split: [case ids]}, {case id: split} or nnU-Net's splits_final.json")
    parser.add_argument("--fold", type=int, default=0, help="fold of an nnU-Net splits_final.json (default 0)")
    parser.add_argument("--split-fractions", default="0.7,0.15,0.15", metavar="TRAIN,VAL,TEST",
                        help="shares for cases without a split folder or PDDCA id (default 0.7,0.15,0.15)")
    parser.add_argument("--seed", type=int, default=PrepareConfig.split_seed, help="seed of the split draw")
    layouts.add_arguments(parser)
    parser.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 2)),
                        help="parallel worker processes")


def _write_phantom(args: argparse.Namespace) -> Path:
    """``--phantom N``: write the phantom cases to ``<out>/phantom-cases`` (finished ones are kept on a rerun),
    the input folder ``prepare`` then reads like any other."""
    from hnseg_keras.data import phantom

    if args.phantom < 1:
        raise HnsegError(f"--phantom {args.phantom}: give at least 1 case")
    options = list(args.phantom_option)
    for key, value in (("size", args.phantom_size), ("spacing_mm", args.phantom_spacing),
                       ("seed", args.phantom_seed)):
        if value is not None:
            options.append(f"{key}={value}")
    generator = configs.replace_from_overrides(phantom.PhantomConfig(), options)
    folder = Path(args.out) / phantom.PREPARED_INPUT
    _holds_manifest(Path(args.out), folder.resolve())  # refuse a foreign --out before writing into it
    phantom.write_phantom(folder, args.phantom, generator)
    return folder


def run(args: argparse.Namespace) -> int:
    if (args.input is None) == (args.phantom is None):
        raise HnsegError("give either an INPUT folder or --phantom N (not both)")
    phantom_given = [args.phantom_option, args.phantom_size, args.phantom_spacing, args.phantom_seed]
    if args.phantom is None and any(value not in (None, []) for value in phantom_given):
        raise HnsegError("--phantom-size/--phantom-spacing/--phantom-seed/--phantom-option need --phantom N")
    slicing = SlicingConfig(size=args.size, spacing_mm=_parse_spacing(args.spacing), neighbours=args.neighbours,
                            empty_slice_margin=args.empty_margin, empty_slice_share=args.empty_share)
    reading = layouts.reading_from_args(args)
    extra = organ_catalogue.added_definitions(reading.catalogue)
    config = PrepareConfig(organs=resolve_organs(args.organs, reading.catalogue), slicing=slicing,
                           shard_max_mb=args.shard_mb, split_seed=args.seed, fold=args.fold,
                           split_fractions=splits.parse_fractions(args.split_fractions), extra_organs=extra)
    source = args.input if args.phantom is None else _write_phantom(args)
    manifest = prepare(source, args.out, config, workers=args.workers, split_file=args.split_file, reading=reading)
    counts = ", ".join(f"{name} {split['cases']} cases / {split['slices']} slices"
                       for name, split in manifest.splits.items() if split["cases"])
    print(f"wrote {Path(args.out) / 'manifest.json'}: {counts}")
    return 0
