"""`train.py` / `cifar-tl-train`: parse the config, run the engine, turn known failures into one clear line."""
from __future__ import annotations

import logging
import os
import sys

from .config import ConfigError, parse_args
from .data import DataError
from .hub import HubError
from .models import WeightsError


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "huggingface_hub", "datasets", "filelock", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .engine import TrainingError, train

    try:
        cfg = parse_args(argv)
        train(cfg)
    except (ConfigError, DataError, WeightsError, TrainingError, HubError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun with --resume to continue from the last completed epoch", file=sys.stderr)
        return 130
    return 0
