"""Small file-system helpers for the write-to-a-temporary-name-then-rename rule."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def replace_folder(tmp: Path, target: Path) -> None:
    """Rename the finished folder ``tmp`` onto ``target``; an old ``target`` is moved aside, then deleted.

    Readers see either the old folder or the new one, never a half-written mix.
    """
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
