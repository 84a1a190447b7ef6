"""Train / validation / test assignment of cases, deterministic by case id.

Priority: a split file the user gives (``{"train": [ids], ...}``, ``{id: split}`` or nnU-Net's
``splits_final.json``, a list of folds ``{"train": [...], "val": [...]}``); then the split a case's
folder implies (``train/``, ``validation/``, ``test/``, nnU-Net ``imagesTs/``; with a split file only test folders
count); then the PDDCA
convention (ids 0522c0555 and up are test, the others are drawn into validation by
``validation_fraction``); every other case is drawn by ``fractions`` (train, validation, test)
with ``seed``. The rule used is returned for the manifest.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hnseg_keras import configs
from hnseg_keras.errors import HnsegError

SPLITS = TRAIN, VALIDATION, TEST = ("train", "validation", "test")  # the one split vocabulary
SPLIT_ALIASES = {"train": TRAIN, "training": TRAIN, "validation": VALIDATION, "val": VALIDATION,
                 "valid": VALIDATION, "test": TEST, "testing": TEST}
PDDCA_ID = re.compile(r"^0522c(\d{4})$")
PDDCA_FIRST_TEST = 555  # the MICCAI 2015 challenge's test cases are 0522c0555 and up


def parse_fractions(text: str, flag: str = "--split-fractions") -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` -> (train, validation, test); they must be >= 0 and sum to 1."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0 or not np.isclose(sum(values), 1.0, atol=1e-6):
        raise HnsegError(f"{flag} {text!r}: give three shares train,validation,test summing to 1 "
                         "(e.g. 0.7,0.15,0.15)")
    return values  # type: ignore[return-value]


DEFAULT_SPLITS = (0.6, 0.2, 0.2)


def split_counts(num_cases: int, fractions: tuple[float, ...] = DEFAULT_SPLITS) -> tuple[int, ...]:
    """Cases per split (train, validation, test) by largest remainder; every split with a
    positive fraction gets at least one case when there are enough cases."""
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise HnsegError(f"splits {fractions}: give three non-negative fractions (train, validation, test)")
    share = np.asarray(fractions, float) / sum(fractions) * num_cases
    counts = np.floor(share).astype(int)
    for i in np.argsort(counts - share)[: num_cases - counts.sum()]:
        counts[i] += 1
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if num_cases >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] = 1
    return tuple(int(c) for c in counts)


def assign(refs: Sequence, seed: int, validation_fraction: float, fractions: Sequence[float],
           split_file: str | None = None, fold: int = 0) -> tuple[dict[str, str], dict]:
    """({case id: split}, the rule used) for CaseRefs (``case_id``, ``split`` hint)."""
    ids = [ref.case_id for ref in refs]
    hints = {ref.case_id: SPLIT_ALIASES.get(str(ref.split).lower()) for ref in refs if ref.split}
    if split_file is not None:
        return from_file(split_file, ids, hints, fold)
    splits = dict(hints)
    rest = sorted(case_id for case_id in ids if not splits.get(case_id))
    pddca = [case_id for case_id in rest if PDDCA_ID.match(case_id)]
    for case_id in pddca:
        if int(PDDCA_ID.match(case_id).group(1)) >= PDDCA_FIRST_TEST:
            splits[case_id] = TEST
    pddca = [case_id for case_id in pddca if case_id not in splits]
    order = np.random.default_rng(seed).permutation(len(pddca))
    num_validation = int(round(len(pddca) * validation_fraction))
    for rank, index in enumerate(order):
        splits[pddca[index]] = VALIDATION if rank < num_validation else TRAIN
    others = [case_id for case_id in rest if case_id not in splits]
    splits.update(_by_fractions(others, fractions, seed))
    rule = {"method": "folders+rule", "seed": seed, "fractions": list(fractions),
            "pddca_validation_fraction": validation_fraction, "from_folders": sorted(hints)}
    return {case_id: splits[case_id] for case_id in ids}, rule


def _by_fractions(ids: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """Seeded draw: round(n * share) validation and test cases (at least one train case when n > 0)."""
    count = len(ids)
    order = np.random.default_rng(seed).permutation(count)
    num_validation = int(round(count * fractions[1]))
    num_test = min(int(round(count * fractions[2])), max(0, count - num_validation - 1))
    out = {}
    for rank, index in enumerate(order):
        out[ids[index]] = (VALIDATION if rank < num_validation else
                           TEST if rank < num_validation + num_test else TRAIN)
    return out


def from_file(path: str, ids: Sequence[str], hints: dict[str, str], fold: int = 0) -> tuple[dict[str, str], dict]:
    """Splits from a JSON file; a case it does not list is an error unless its folder makes it a test case."""
    data = configs.read_json(path)
    rule = {"method": "file", "file": Path(path).name}
    if isinstance(data, list):  # nnU-Net splits_final.json
        if not 0 <= fold < len(data) or not isinstance(data[fold], dict):
            raise HnsegError(f"{path}: has {len(data)} fold(s); --fold {fold} is not one of them")
        data = {split: list(data[fold].get(split, [])) for split in ("train", "val")}
        rule["fold"] = fold
    if not isinstance(data, dict):
        raise HnsegError(f"{path}: expected {{split: [case ids]}}, {{case id: split}} or nnU-Net's list of folds")
    if data and all(isinstance(value, list) for value in data.values()):
        data = {str(case_id): split for split, members in data.items() for case_id in members}
    splits = {}
    for case_id, split in data.items():
        if SPLIT_ALIASES.get(str(split).lower()) is None:
            raise HnsegError(f"{path}: unknown split {split!r} for {case_id!r}; use train, validation or test")
        splits[case_id] = SPLIT_ALIASES[str(split).lower()]
    missing = [case_id for case_id in ids if case_id not in splits and hints.get(case_id) != TEST]
    if missing:
        raise HnsegError(f"{path}: no split for case(s) {', '.join(missing[:5])}; add them to the split file")
    return {case_id: splits.get(case_id) or hints[case_id] for case_id in ids}, rule
