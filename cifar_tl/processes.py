"""What the processes of one run agree on (`accelerate launch --num_processes N`, and a lone process alike): the
data loaded by one process first, whose failure stops the others quietly; one clock for the time budget; and
which live run holds an output folder."""
from __future__ import annotations

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


def holder(out: Path) -> str | None:
    """The live run that holds `out` (pid and host, from its lock file), or None: a lock left by a process that
    has died (a crash, `kill -9`) or by this process holds nothing."""
    try:
        held = json.loads((out / LOCK).read_text())
        pid, host = int(held["pid"]), str(held["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():  # cannot tell from here whether it still runs
        return f"process {pid} on {host} (delete {out / LOCK} if that run has ended)"
    if pid == os.getpid() or not pid_alive(pid):
        return None
    # a process number is reused after a reboot or in a restarted container: say how to free the folder
    return f"process {pid}, started {held.get('started', '?')}; delete {out / LOCK} if no run is going there"


def hold(out: Path) -> str | None:
    """Mark `out` as held by this process until `release` (the main process of a run, once the folder exists), or
    return the live run that holds it already. Two runs started together both pass the early check (`holder`,
    before the data); only one can create the lock: it is written whole beside it and linked into place, which
    fails when the name exists."""
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n"
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
            except OSError:  # a filesystem without hard links: taken, not exclusively
                os.replace(mine, out / LOCK)
                return None
        return holder(out) or "another run starting at the same moment"
    finally:
        mine.unlink(missing_ok=True)


def release(out: Path) -> None:
    try:
        if json.loads((out / LOCK).read_text()).get("pid") == os.getpid():
            (out / LOCK).unlink()
    except (OSError, ValueError):
        pass
