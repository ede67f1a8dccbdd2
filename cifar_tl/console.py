"""How the command-line entry points talk to a person: library logging kept quiet, and the errors that mean
"bad input" printed as one line (`error: ...`, exit code 2), never as a traceback, and a misspelt option
answered with the nearest real one."""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from collections.abc import Callable, Iterator

NOISY_LOGGERS = ("httpx", "huggingface_hub", "datasets", "filelock", "accelerate", "matplotlib", "onnx_ir",
                 "onnxscript")


def first_process() -> bool:
    """Whether this is the run's first process (or its only one): the others of `accelerate launch
    --num_processes N` stay quiet, so a message or an error shows once, not N times."""
    return os.environ.get("RANK", "0") in ("", "0")


def setup_logging() -> None:
    level = logging.INFO if first_process() else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def one_line_errors(body: Callable[[], int | None], *errors: type[BaseException]) -> int:
    """Run a command's body; any of `errors` becomes `error: <message>` on stderr and exit code 2."""
    try:
        return body() or 0
    except errors as err:
        return error_line(err)


def error_line(err: BaseException | str) -> int:
    """A command's known failure as one line on stderr (from the first process only); its exit code."""
    if first_process():
        print(f"error: {err}", file=sys.stderr)
    return 2


class FlagParser(argparse.ArgumentParser):
    """argparse that names the nearest real option for a misspelt one: `--prot` -> "did you mean --port?", and
    takes no abbreviations (`--epoch 3` worked on the command line while a config file's `epoch` was refused)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if not first_process():  # the first process prints the usage and the error
            self.exit(2)
        usage = self.format_usage()
        if usage.count("\n") > 8:  # train.py's: a screenful of options above the one line that matters
            usage = f"usage: {self.prog} [options]  ({self.prog} --help lists them)\n"
        self.exit(2, f"{usage}{self.prog}: error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}"
                       + did_you_mean(unknown[0].split("=")[0], list(_options(self))))
        return namespace


def did_you_mean(word: str, known: list[str]) -> str:
    """The nearest known names (those tied for nearest, in order, up to 3: efficientnet_bo is as near to _b8 as
    to _b0)."""
    close = difflib.get_close_matches(word, known, n=50)
    if not close:
        return ""
    top = difflib.SequenceMatcher(None, word, close[0]).ratio()
    best = sorted({c for c in close if difflib.SequenceMatcher(None, word, c).ratio() == top})[:3]
    return f" (did you mean {' or '.join(best)}?)"


def _options(parser: argparse.ArgumentParser) -> Iterator[str]:
    """Every option string of a parser and its subcommands (`--no-X` of boolean flags included)."""
    for action in parser._actions:
        yield from action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _options(sub)
