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

`file_problem` reads a saved file back cheaply (a safetensors header and its data length, a torch
zip archive's checksums, JSON) and says what is wrong with it, for resume, export and chat.

Imports nothing from tuneforge: train (checkpoints, the adapter) and export use it alike.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

_STAGING = ".tmp-"
_REPLACED = ".old-"


def _sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}{kind}{os.getpid()}-{secrets.token_hex(4)}")


def staging_path(target: str | Path) -> Path:
    """A fresh name beside `target` for writing what will become it (`swap_into_place`), which
    `recover_replaced` removes if this process dies before the swap."""
    return _sibling(Path(target), _STAGING)


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
            remove(staging)
    for old in _siblings(target, _REPLACED):
        if _alive(_pid_of(old, _REPLACED)):
            continue
        if not target.exists():
            logger.warning("restoring %s from %s (a replacement was cut off mid-swap)", target, old)
            os.rename(old, target)
        else:
            remove(old)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def fsync_tree(folder: Path) -> None:
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
            fsync_tree(staging)
        swap_into_place(staging, target)
    except BaseException:
        remove(staging)
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
        remove(old)
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
        remove(temporary)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, fsync: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


# ---------------------------------------------------------------------------------------------
# Reading back: is a file whole? (A truncated file must be a one-line error, not a traceback
# from deep inside safetensors or torch.load.)
# ---------------------------------------------------------------------------------------------


def file_problem(file: Path) -> str | None:
    """A structural check of one saved file: safetensors (header + data length), torch's zip
    archives (.pt/.pth/.bin: every member's CRC), JSON. None when it reads whole."""
    name = file.name
    try:
        if name.endswith(".safetensors"):
            return safetensors_problem(file)
        if name.endswith((".pt", ".pth", ".bin")):
            if not zipfile.is_zipfile(file):
                return f"{name} is truncated or not a torch file"
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
            return f"{name} is damaged (member {bad} fails its checksum)" if bad else None
        if name.endswith(".json"):
            json.loads(file.read_text())
    except (zipfile.BadZipFile, EOFError, ValueError, UnicodeDecodeError, OSError) as error:
        return f"{name} cannot be read ({type(error).__name__}: {str(error)[:100]})"
    return None


def safetensors_problem(file: Path) -> str | None:
    """None if `file` holds a whole safetensors header and all the data it announces."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{file.name} is truncated ({size} bytes)"
        header_length = int.from_bytes(head, "little")
        if 8 + header_length > size:
            return f"{file.name} is truncated (its header alone needs {8 + header_length} bytes, it has {size})"
        header = json.loads(handle.read(header_length))
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_length + end != size:
        return f"{file.name} is truncated ({size} bytes, its header announces {8 + header_length + end})"
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_is_empty(folder: str | Path) -> bool:
    folder = Path(folder)
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))
