"""Atomic writes: a crash or a concurrent reader never sees half a checkpoint, store, report or model folder; a
write that fails (disk full, no permission, quota, read-only) leaves what was there before and raises
`WriteError`, one line naming the path and the reason."""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

# what writers raise when the disk says no: Python's OSError, safetensors' Rust I/O error ("os error 28")
WRITE_ERRORS = (OSError, SafetensorError)


class WriteError(RuntimeError):
    """A file or folder could not be written; the message names the path and the reason (`os.strerror`)."""

    def __init__(self, path: str | os.PathLike, reason: str, advice: str = ""):
        self.path, self.reason, self.advice = Path(path), reason, advice
        super().__init__(f"cannot write {path}: {reason}{f'; {advice}' if advice else ''}")


def not_a_folder(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be, or become, a folder (it, or the nearest of its parents that exists, is a file), or
    None: checked before the work whose results would go there."""
    path = Path(path)
    nearest = next((p for p in (path, *path.parents) if p.exists()), None)
    return f"{nearest} is a file, not a folder" if nearest is not None and not nearest.is_dir() else None


def write_failure(path: str | os.PathLike, err: BaseException, needed: int = 0) -> WriteError:
    """`err`, raised while writing `path`, as a WriteError. The reason is `os.strerror` of the error number
    when there is one (OSError, or safetensors' "os error N"); writers that hide it (torch.save reports a full
    disk as "unexpected pos ...") are diagnosed from the filesystem: read-only, not writable, or less free space
    than `needed` bytes."""
    if isinstance(err, WriteError):
        return err
    code = getattr(err, "errno", None)
    found = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(err))
    code = code or (int(found.group(1) or found.group(2)) if found else None)
    if code:
        name = getattr(err, "filename", None)
        return WriteError(name if name and Path(name) != Path(path) else path, os.strerror(code))
    return WriteError(path, _diagnose(Path(path), needed) or f"{type(err).__name__}: {str(err).splitlines()[0]}")


def _diagnose(path: Path, needed: int) -> str | None:
    folder = next((p for p in (path, *path.parents) if p.is_dir()), None)
    if folder is None:
        return None
    stat = os.statvfs(folder)
    if stat.f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    if not os.access(folder, os.W_OK):
        return os.strerror(errno.EACCES)
    free = stat.f_bavail * stat.f_frsize
    if needed and free < needed:
        return f"{os.strerror(errno.ENOSPC)} ({free / 1e6:.1f} MB free, about {needed / 1e6:.1f} MB needed)"
    return None


@contextmanager
def write_errors(path: str | os.PathLike, needed: int = 0):
    """Turn write errors raised in the block into a WriteError naming `path`."""
    try:
        yield
    except WRITE_ERRORS as err:
        raise write_failure(path, err, needed) from None


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling of `path` to write; it replaces `path` only once the block finished (and is
    removed if it did not). Write errors become a WriteError naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            os.replace(tmp, path)
    except WriteError as err:  # named by the file the user asked for, not by its temporary sibling
        raise (WriteError(path, err.reason) if err.path == tmp else err) from None
    finally:
        with contextlib.suppress(OSError):  # e.g. its folder is a file: the error above says so
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file such as history.jsonl, skipping blank lines and a torn one (a write cut
    short by a full disk); none when the file is missing."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in filter(str.strip, path.read_bytes().decode("utf-8", "replace").splitlines()):  # garbage: skipped
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp, open(source, "rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)  # not copyfile: its sendfile error on a full disk names the source


@contextmanager
def atomic_folder(path: str | os.PathLike):
    """Yield an empty sibling folder of `path` to fill; once the block finished it takes `path`'s place: a new
    `path` appears whole (one rename), an existing one gets the new entries moved in (entries the block did
    not write stay). If the block fails the sibling is removed and `path` is left as it was; write errors
    become a WriteError naming the file as it would have been under `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial{os.getpid()}")
    for stale in path.parent.glob(f".{glob.escape(path.name)}.partial*"):  # left by writers that were killed
        pid = stale.name.rpartition(".partial")[2]
        if pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    try:
        try:
            with write_errors(path):
                tmp.mkdir(parents=True)
                yield tmp
        except WriteError as err:
            raise relocated(err, tmp, path, f"{path} is unchanged") from None
        with write_errors(path):
            _move_into(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def relocated(err: WriteError, tmp: Path, path: Path, advice: str) -> WriteError:
    """`err`, raised while writing into the temporary folder `tmp`, as it reads for the folder `path`."""
    inside = err.path == tmp or err.path.is_relative_to(tmp)
    return WriteError(path / err.path.relative_to(tmp) if inside else err.path, err.reason, advice)


def _move_into(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.rename(tmp, path)
        return
    for entry in tmp.iterdir():  # renames within one filesystem: no data is written
        dest = path / entry.name
        if entry.is_dir() and dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(entry, dest)
