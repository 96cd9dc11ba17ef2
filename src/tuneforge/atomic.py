"""Write a folder or a file so that a reader sees the old one or the new one, never a mix or a half.

    with atomic_folder("out/merged") as staging:      # staging: out/.merged.tmp-<pid>-<random>
        write_everything_into(staging)
    # success: out/merged now holds exactly what was written (an earlier out/merged is gone whole,
    #          so no stale model.safetensors stays beside new shards)
    # failure (an exception, a full disk, Ctrl-C): staging removed, out/merged exactly as it was

    atomic_write_text("out/summary.json", text)        # the same for one file

Why a sibling: a rename is atomic only within one filesystem, and the target's parent is on the
target's filesystem. Files are fsync'ed before the rename, so that after a power cut the new name
never points at data still in the page cache. Replacing an existing folder takes two renames
(old aside, new in); a crash between them leaves `.<name>.old-<pid>-*` beside a missing target,
which `recover_replaced` (run by the next `atomic_folder` on that target) moves back.

Imports nothing from tuneforge: train (checkpoints, the adapter) and export use it alike.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

_STAGING = ".tmp-"
_REPLACED = ".old-"


def _sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}{kind}{os.getpid()}-{secrets.token_hex(4)}")


def _pid_of(sibling: Path, kind: str) -> int | None:
    try:
        return int(sibling.name.rsplit(kind, 1)[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
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


def _siblings(target: Path, kind: str) -> list[Path]:
    if not target.parent.is_dir():
        return []
    prefix = f".{target.name}{kind}"
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix))


def recover_replaced(target: str | Path) -> None:
    """Tidy what a killed writer left beside `target`: its staging folders are removed; a replaced
    folder whose swap was cut between the two renames (target missing) is moved back."""
    target = Path(target)
    for staging in _siblings(target, _STAGING):
        if not _alive(_pid_of(staging, _STAGING)):
            logger.info("removing %s, left by a writer that was killed", staging)
            _remove(staging)
    for old in _siblings(target, _REPLACED):
        if _alive(_pid_of(old, _REPLACED)):
            continue
        if not target.exists():
            logger.warning("restoring %s from %s (a replacement was cut off mid-swap)", target, old)
            os.rename(old, target)
        else:
            _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_disk_full(error: BaseException) -> bool:
    """True for "no space left" / "quota exceeded", also when wrapped (safetensors, torch.save)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error).lower()
        if "no space left" in text or "disk quota" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def atomic_folder(target: str | Path, fsync: bool = True):
    """Yield an empty staging folder; on a clean exit it becomes `target` (replacing any earlier
    `target` as a whole), on an exception it is removed and `target` is left untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_replaced(target)
    staging = _sibling(target, _STAGING)
    staging.mkdir()
    try:
        yield staging
        if fsync:
            _fsync_tree(staging)
        swap_into_place(staging, target)
    except BaseException:
        _remove(staging)
        raise


def swap_into_place(staging: Path, target: Path) -> None:
    """Rename the finished folder `staging` to `target`; an existing `target` goes as a whole."""
    if target.exists() or target.is_symlink():
        old = _sibling(target, _REPLACED)
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
        _remove(old)
    else:
        os.rename(staging, target)
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> Path:
    """Write `path` through a sibling temporary file and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _sibling(path, _STAGING)
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        _remove(temporary)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, fsync: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def folder_is_empty(folder: str | Path) -> bool:
    folder = Path(folder)
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))
