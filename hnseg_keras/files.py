"""File-system rules in one place: temp name then rename, never overwrite unasked, one writer per folder.

Temporary names carry the process id and a random part, so two processes never share one, and a
cleanup can tell a live process's temporary file from a dead one's (``owned_by_live_process``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from hnseg_keras.errors import HnsegError

LOCK_NAME = ".hnseg.lock"


def temp_name(target: Path) -> Path:
    """A fresh name beside ``target`` for this process: ``.<name>.<pid>-<random>.tmp``."""
    return target.parent / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def owned_by_live_process(temp: Path) -> bool:
    """True when ``temp`` (a ``temp_name``) belongs to a process that is still running."""
    try:
        pid = int(temp.name.rsplit(".", 2)[-2].split("-")[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` when the block succeeds.

    The caller writes a file (or a folder) at the yielded path. On an exception the temporary is
    removed and ``target`` is left as it was, so readers never see a half-written file.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_name(target)
    try:
        yield temp
        if temp.is_dir():
            replace_folder(temp, target)
        else:
            os.replace(temp, target)
    finally:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as temp:
        temp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def portable_path(path: str | os.PathLike | None, keep: int = 1) -> str | None:
    """``path`` as a run's files record it: a relative path inside the working folder as typed; any
    other (absolute, or climbing out with ``..``) cut to its last ``keep`` parts, so the folders of
    the user's machine (a home folder, a patient's name in a path) never travel with a shared run."""
    if path is None:
        return None
    parts = Path(path).parts
    if not Path(path).is_absolute() and ".." not in parts:
        return Path(path).as_posix()
    return Path(*parts[-keep:]).as_posix() if parts[-keep:] else ""


def refuse_existing(path: str | os.PathLike, force: bool = False,
                    hint: str = "choose another --out or pass --force") -> None:
    """The one 'already exists' rule: refuse an existing ``path`` unless ``force``."""
    if not force and Path(path).exists():
        raise HnsegError(f"{path}: already exists; {hint}")


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


def _same_file(handle, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FolderLock:
    """Exclusive lock on an output folder (``<folder>/.hnseg.lock``), held until ``release`` or exit.

    The operating system drops the lock when the holder dies (kill -9 included), so a stale lock file
    never blocks a rerun; a live holder makes a second writer fail with a message naming it. A folder
    the lock created and nothing was written to is removed again on release (a failed first step
    leaves no empty output folder behind).
    """

    def __init__(self, folder: str | os.PathLike, what: str = "hnseg"):
        self.folder = Path(folder)
        self.what = what
        self._handle = None
        self._created = False

    def acquire(self) -> FolderLock:
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        while True:
            handle = open(path, "a+")  # noqa: SIM115  (held open for the lock's lifetime)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise HnsegError(f"{self.folder}: in use by {holder}; wait for it to finish or choose another "
                                 "folder") from None
            if _same_file(handle, path):
                break
            handle.close()  # the holder removed the file between our open and flock: take the new one
        handle.seek(0)
        handle.truncate()
        command = " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:2])
        handle.write(f"{self.what} (pid {os.getpid()} on {socket.gethostname()}, {command}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no one can lock the removed file), then unlock."""
        if self._handle is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.folder / LOCK_NAME).unlink()
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
            if self._created:
                with contextlib.suppress(OSError):  # not empty (or gone): keep it
                    self.folder.rmdir()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
