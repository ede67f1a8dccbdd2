"""`train.py` / `cifar-tl-train`: parse the config, run the engine, turn known failures into one clear line."""
from __future__ import annotations

import os
import sys
import time

from .checkpoints import ResumeError
from .config import ConfigError, parse_args
from .console import one_line_errors, setup_logging
from .files import WriteError
from .hub import HubError
from .models import WeightsError
from .sources import DataError


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """`started`: when the process began (train.py passes it), else now; --time-limit-minutes counts from it."""
    started = time.time() if started is None else started
    setup_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .engine import TrainingError, train

    def run() -> None:
        train(parse_args(argv), started=started)

    try:
        return one_line_errors(run, ConfigError, DataError, WeightsError, TrainingError, ResumeError, HubError,
                               WriteError)
    except KeyboardInterrupt:
        print("interrupted: rerun with --resume to continue from the last completed epoch", file=sys.stderr)
        return 130
