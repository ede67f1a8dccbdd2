"""Damage found before anything loads it: a manifest ({file: {size, sha256}}) taken when files are written and
checked when they are read (a truncated copy, a flipped byte, a missing file), a structural check of
safetensors files for folders written without one, and a seal (a sha256 beside it) on each cache file. Problems
are short phrases naming the file."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .files import atomic_write_text

CHUNK = 1 << 20


class DamagedFileError(ValueError):
    """A file is missing, truncated or altered since it was written; the message names it."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(data: dict) -> str:
    """The checksum of a JSON document's content (key order and whitespace do not matter)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def manifest(folder: str | os.PathLike, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under `folder` but `skip`, read back right after
    writing (from the page cache)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in skip)
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files}


def manifest_problems(folder: str | os.PathLike, files: dict[str, dict]) -> list[str]:
    """What differs between `folder` and its manifest: missing files and wrong sizes first (cheap), then the
    checksums of the files whose sizes are right. Empty when everything matches."""
    folder, problems, same_size = Path(folder), [], []
    for name, want in files.items():
        path = folder / name
        size = path.stat().st_size if path.is_file() else None
        if size is None:
            problems.append(f"{name} is missing")
        elif size < want["size"]:
            problems.append(f"{name} is truncated ({size:,} of {want['size']:,} bytes)")
        elif size > want["size"]:
            problems.append(f"{name} has {size:,} bytes instead of {want['size']:,}")
        else:
            same_size.append(name)
    problems += [f"{name} is altered (its sha256 differs from the one recorded when it was written)"
                 for name in same_size if sha256_file(folder / name) != files[name]["sha256"]]
    return problems


def seal(path: str | os.PathLike) -> None:
    """Record a cache file's sha256 beside it (`NAME.sha256`), for `seal_problem` to check before the file is
    used again: a flipped byte in cached features, decoded images or an ONNX graph still loads, and gave wrong
    results without a word."""
    path = Path(path)
    atomic_write_text(_seal_of(path), sha256_file(path) + "\n")


def seal_problem(path: str | os.PathLike) -> str | None:
    """Why the cache file `path` may not be used (no recorded checksum, or not the recorded one), or None (also
    when there is no such file: nothing cached, nothing damaged)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        recorded = _seal_of(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return f"{path.name} has no recorded checksum (an older version wrote it, or its write was cut short)"
    if sha256_file(path) != recorded:
        return f"{path.name} is altered or truncated (its sha256 differs from the one recorded when it was written)"
    return None


def move_sealed(path: str | os.PathLike, to: str | os.PathLike) -> None:
    """Rename a sealed file and its seal; the seal goes first, so a cut between the two leaves `path` unsealed
    (loaded as it is) rather than sealed with another file's checksum."""
    path, to = Path(path), Path(to)
    os.replace(_seal_of(path), _seal_of(to))
    os.replace(path, to)


def is_sealed(path: str | os.PathLike) -> bool:
    """Whether `seal` recorded a checksum for `path` (what it says is `seal_problem`'s to check)."""
    return _seal_of(Path(path)).is_file()


def _seal_of(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a complete safetensors file (no header, an unreadable header, data shorter or longer
    than the header describes), or None."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little") if size >= 8 else 0
        if size < 8 or 8 + length > size:
            return f"{path.name} is truncated ({size:,} bytes, not even its header)"
        try:
            header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return f"{path.name} has an unreadable header (not a safetensors file, or damaged)"
    if 8 + length + end > size:
        return f"{path.name} is truncated ({size:,} of {8 + length + end:,} bytes)"
    if 8 + length + end < size:
        return f"{path.name} has {size - 8 - length - end:,} bytes more than its header describes"
    return None


def check_weights(weights: Path, recorded: dict | None = None) -> None:
    """DamagedFileError when `weights` is not what was written: checked against the {size, sha256} recorded
    when it was written, or without that against its own header."""
    if recorded:
        problems = manifest_problems(weights.parent, {weights.name: recorded})
        advice = ("copy or export the folder again (if the weights were replaced on purpose, delete \"files\" "
                  "under \"cifar_tl\" in config.json)")
    else:
        problems = [p for p in [safetensors_problem(weights)] if p]
        advice = "copy or export it again"
    if problems:
        raise DamagedFileError(f"{weights.parent}: {'; '.join(problems)}; {advice}")
