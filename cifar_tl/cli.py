"""`train.py` / `cifar-tl-train`: parse the config, run the engine, turn known failures into one clear line."""
from __future__ import annotations

import os
import signal
import sys
import time

from .config import ConfigError, parse_args
from .console import error_line, first_process, one_line_errors, setup_logging


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """`started`: when the process began (train.py passes it), else now; --time-limit-minutes counts from it."""
    started = time.time() if started is None else started
    setup_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:  # before the imports below (torch, timm, datasets: ~15 s on a slow CPU), so --help and a misspelt
        cfg = parse_args(argv)  # option in the flags or the --config file answer at once
    except ConfigError as err:
        return error_line(err)
    from .checkpoints import ResumeError
    from .engine import TrainingError, train
    from .files import WriteError
    from .hub import HubError
    from .models import WeightsError
    from .sources import DataError

    def run() -> None:
        train(cfg, started=started)

    # SIGTERM (a scheduler's or a container's stop) ends the run as Ctrl-C does, with the same message
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    try:
        return one_line_errors(run, ConfigError, DataError, WeightsError, TrainingError, ResumeError, HubError,
                               WriteError)
    except KeyboardInterrupt:
        if first_process():
            print("interrupted: rerun with --resume to continue from the last completed epoch", file=sys.stderr)
        return 130
    except RuntimeError as err:  # a peer of a multi-process run died (killed, out of memory): its output says why
        if not lost_peer(err):
            raise
        return error_line("another process of this run stopped (its own output says why); the completed epochs' "
                          "checkpoints are kept: rerun with --resume to continue")


def lost_peer(err: RuntimeError) -> bool:
    """Whether `err` is a collective call failing because another process of the run is gone (gloo: "Connection
    reset by peer"; NCCL and the others: a DistBackendError)."""
    import torch.distributed as dist

    return isinstance(err, dist.DistBackendError) or any(
        text in str(err) for text in ("Connection reset by peer", "Connection closed by peer"))
