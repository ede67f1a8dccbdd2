"""How the command-line entry points talk to a person: library logging kept quiet, and the errors that mean
"bad input" printed as one line (`error: ...`, exit code 2), never as a traceback."""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable

NOISY_LOGGERS = ("httpx", "huggingface_hub", "datasets", "filelock", "accelerate", "matplotlib", "onnx_ir",
                 "onnxscript")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def one_line_errors(body: Callable[[], int | None], *errors: type[BaseException]) -> int:
    """Run a command's body; any of `errors` becomes `error: <message>` on stderr and exit code 2."""
    try:
        return body() or 0
    except errors as err:
        return error_line(err)


def error_line(err: BaseException | str) -> int:
    """A command's known failure as one line on stderr; its exit code."""
    print(f"error: {err}", file=sys.stderr)
    return 2
