"""What the processes of one run agree on (`accelerate launch --num_processes N`, and a lone process alike): the
data loaded by one process first, whose failure stops the others quietly; one clock for the time budget; and
which live run holds an output folder."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator

from .files import pid_alive

T = TypeVar("T")
LOCK = "run.lock"
_HELD: dict[Path, int] = {}  # the folders this process holds: their lock file's descriptor


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` is set on any process (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return flag
    flags = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(flags, "sum").item())


def main_first(accelerator: Accelerator, load: Callable[[], T]) -> T:
    """`load()` on the main process, then on the others (it decodes and caches; they read its cache). When it
    fails there, the main process raises the error (one line) and the others exit quietly: waiting in
    Accelerate's `main_process_first` they failed with a gloo/NCCL traceback of their own."""
    if accelerator.num_processes == 1:
        return load()
    error, result = None, None
    if accelerator.is_main_process:
        try:
            result = load()
        except Exception as err:  # raised again below, once the others know
            error = err
    if any_process(accelerator, error is not None):
        if error is not None:
            raise error
        raise SystemExit(2)
    return result if accelerator.is_main_process else load()


def shared_clock(accelerator: Accelerator) -> Callable[[float, float], tuple[float, float]] | None:
    """With several processes, the time budget's (elapsed seconds, seconds kept for the final passes) as the
    largest of any process, for `optim.Budget.agree`: each process's own clock differs (its start, its step's
    timing), and processes that stop at different steps break DDP's next all-reduce; following their own
    clocks their learning rates drifted apart too. None for a lone process (its own clock is the run's)."""
    if accelerator.num_processes == 1:
        return None

    def agree(elapsed: float, reserve: float) -> tuple[float, float]:
        values = torch.tensor([elapsed, reserve], dtype=torch.float64, device=accelerator.device)
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        return values[0].item(), values[1].item()

    return agree


def _locked(path: Path) -> bool | None:
    """Whether a live process holds `path`'s flock (the kernel drops it when the process ends, `kill -9` too), or
    None where the filesystem has no flock (some network mounts)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)


def holder(out: Path) -> str | None:
    """The live run that holds `out` (pid and host, from its lock file), or None: a lock whose process has ended
    (a crash, `kill -9`) or this process's own holds nothing."""
    lock = out / LOCK
    try:
        held = json.loads(lock.read_text())
        pid, host = int(held["pid"]), str(held["host"])
    except (OSError, ValueError, KeyError, TypeError):
        held = None
    locked = _locked(lock)
    if held is None or (pid == os.getpid() and host == socket.gethostname()):
        return "another run, starting now" if locked and held is None else None
    if locked:
        return f"process {pid} on {host}, started {held.get('started', '?')}"
    if locked is False:
        return None
    # no flock here: judged by the process number, which only this host can check
    if host != socket.gethostname():
        return f"process {pid} on {host} (delete {lock} if that run has ended)"
    if not pid_alive(pid):
        return None
    # a process number is reused after a reboot or in a restarted container: say how to free the folder
    return f"process {pid}, started {held.get('started', '?')}; delete {lock} if no run is going there"


def hold(out: Path) -> str | None:
    """Mark `out` as held by this process until `release` (the main process of a run, once the folder exists), or
    return the live run that holds it already. The hold is an flock on the lock file, which the kernel drops
    when the process ends however it ends; two runs started together both pass the early check (`holder`,
    before the data), and only one gets the flock."""
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n"
    lock = out / LOCK
    for _ in range(3):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return holder(out) or "another run, starting now"
        except OSError:  # no flock on this filesystem
            os.close(fd)
            return _hold_by_link(out, record)
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:  # a run released (deleted) the file between our open and our flock
            same = False
        if not same:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, record.encode())
        _HELD[out.resolve()] = fd
        return None
    return "another run, starting now"


def _hold_by_link(out: Path, record: str) -> str | None:
    """`hold` without flock: the record is written whole beside the lock and linked into place, which fails when
    the name exists; a lock whose process is not alive is replaced."""
    mine = out / f".{LOCK}.{os.getpid()}"
    mine.write_text(record)
    try:
        for _ in range(3):
            try:
                os.link(mine, out / LOCK)
                return None
            except FileExistsError:
                busy = holder(out)
                if busy:
                    return busy
                (out / LOCK).unlink(missing_ok=True)  # a dead run's lock (or this process's own)
            except OSError:  # nor hard links: taken, not exclusively
                os.replace(mine, out / LOCK)
                return None
        return holder(out) or "another run, starting now"
    finally:
        mine.unlink(missing_ok=True)


def release(out: Path) -> None:
    """Give up `hold`: the lock file goes (while still locked, so no run takes the deleted file), then the flock."""
    fd = _HELD.pop(out.resolve(), None)
    try:
        if json.loads((out / LOCK).read_text()).get("pid") == os.getpid():
            (out / LOCK).unlink()
    except (OSError, ValueError):
        pass
    if fd is not None:
        os.close(fd)
