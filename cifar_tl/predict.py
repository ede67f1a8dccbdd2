"""`python -m cifar_tl.predict --model DIR_OR_HUB_ID PATHS_OR_FOLDERS... [--top-k 5] [--output preds.jsonl]`

Batch prediction: one record per readable image, {"path", "fine": [{"label", "score"}, ...top-k],
"coarse": {"label", "score"} | null}, as JSON lines to stdout or --output (a .json file gets one JSON array,
a .csv file one row per image). Folders are searched recursively for image files; unreadable files are
reported on stderr and skipped. On a CPU the model runs on ONNX Runtime (`--backend auto`; `--backend torch`
for PyTorch), with the same preprocessing."""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .console import FlagParser, error_line
from .model_flags import MAX_PIXELS, add_model_args, check_pixel_limit, onnx_conflict

if TYPE_CHECKING:  # torch takes seconds to import: --help and a bad flag answer without it
    import numpy as np

    from .inference import Predictor


def collect_files(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Named files as given, folders searched recursively for image suffixes, each file once however often it
    is named; returns (files, missing: named paths that do not exist and links in the folders that lead
    nowhere)."""
    files, missing, seen = [], [], set()

    def add(path: Path) -> None:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            files.append(path)

    for item in inputs:
        path = Path(item)
        if path.is_dir():  # sources imports torch: only a folder needs it, a mistyped path does not
            from .sources import IMAGE_SUFFIXES

            for p in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
                if p.is_file():
                    add(p)
                elif p.is_symlink() and not p.exists():
                    missing.append(f"{p} (a link to {os.readlink(p)})")
        elif path.is_file():
            add(path)
        else:
            missing.append(item)
    return files, missing


def predict_files(predictor: Predictor, files: list[Path], *, top_k: int = 5, batch_size: int = 64,
                  max_pixels: int = MAX_PIXELS, tta: bool = False, progress: bool = True
                  ) -> Iterator[tuple[Path, dict | str]]:
    """Yield (path, prediction) for each file in order, or (path, reason) for a file that is not a usable
    image. Files are decoded to thumbnails one at a time, so a batch never holds full-size images."""
    from tqdm import tqdm

    from .inference import ImageError, open_image

    batch: list[tuple[Path, np.ndarray]] = []
    with tqdm(total=len(files), unit="img", disable=not progress, file=sys.stderr) as bar:
        for i, path in enumerate(files):
            try:
                batch.append((path, predictor.to_thumbnail(open_image(path, max_pixels))))
            except ImageError as err:
                yield path, str(err)
                bar.update()
            if batch and (len(batch) == batch_size or i == len(files) - 1):
                preds = predictor.predict([thumb for _, thumb in batch], top_k=top_k, tta=tta)
                yield from ((p, pred) for (p, _), pred in zip(batch, preds))
                bar.update(len(batch))
                batch = []


def _write(results, out, fmt: str = "jsonl") -> tuple[int, int]:
    """The predictions as JSON lines, one JSON array ("json") or CSV rows ("csv"), the skipped images named on
    stderr; (predicted, skipped)."""
    from tqdm import tqdm

    done = skipped = 0
    rows = None
    for path, result in results:
        if isinstance(result, str):
            skipped += 1
            tqdm.write(f"skipped {path}: {result}", file=sys.stderr)  # keeps the progress bar intact
            continue
        record = {"path": str(path), **result}
        if fmt == "csv":
            if rows is None:
                rows = csv.writer(out)
                rows.writerow(["path", *(f"{key}_{i}" for i in range(1, len(result["fine"]) + 1)
                                         for key in ("label", "score")), "coarse_label", "coarse_score"])
            coarse = result["coarse"] or {}
            rows.writerow([record["path"], *(v for c in result["fine"] for v in (c["label"], f"{c['score']:.6g}")),
                           coarse.get("label", ""), f"{coarse['score']:.6g}" if coarse else ""])
        elif fmt == "json":
            out.write(("[\n" if not done else ",\n") + json.dumps(record))
        else:
            out.write(json.dumps(record) + "\n")
        done += 1
    if fmt == "json":
        out.write("\n]\n" if done else "[]\n")
    return done, skipped


class NothingPredicted(Exception):
    """No image could be read: the --output file is not replaced by an empty one."""


def output_format(path: Path | None) -> str:
    """"csv" for a .csv file, "json" for .json, JSON lines otherwise (stdout, .jsonl, anything else)."""
    suffix = path.suffix.lower() if path else ""
    return {".csv": "csv", ".json": "json"}.get(suffix, "jsonl")


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(prog="python -m cifar_tl.predict", description=__doc__.split("\n\n")[1],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="PATH_OR_FOLDER", help="image files and/or folders")
    add_model_args(parser)
    parser.add_argument("--top-k", type=int, default=5, help="fine classes per image (default: %(default)s)")
    parser.add_argument("--output", type=Path, help="write here instead of stdout: JSON lines, or one JSON array "
                        "for a .json file, CSV for a .csv file")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model call (default: %(default)s)")
    parser.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1")
    check_pixel_limit(parser, args.max_pixels)
    conflict = onnx_conflict(args.model, args.backend, args.device)
    if conflict:
        return error_line(conflict)

    if args.output and not args.output.parent.is_dir():  # before the model loads
        return error_line(f"--output {args.output}: no folder {args.output.parent}")
    if args.output and args.output.is_dir():
        return error_line(f"--output {args.output}: a folder; name the file to write, e.g. "
                          f"{args.output / 'preds.jsonl'}")
    files, missing = collect_files(args.inputs)
    for item in missing:
        print(f"skipped {item}: no such file or folder", file=sys.stderr)
    if not files:
        return error_line("no image files found in the given paths")
    if args.output:  # e.g. `--output *.jpg`: the first photo would have become the predictions file
        from .sources import IMAGE_SUFFIXES

        named = args.output.resolve() in {f.resolve() for f in files}
        if named or args.output.suffix.lower() in IMAGE_SUFFIXES:
            return error_line(f"--output {args.output}: {'one of the images to predict' if named else 'an image file'}"
                              ", which the predictions would replace; name a .jsonl, .json or .csv file")
    from .loading import ModelLoadError, load_predictor

    try:
        predictor = load_predictor(args.model, args.backend, args.device, args.threads)
    except ModelLoadError as err:
        return error_line(err)

    from .files import WriteError, atomic_path

    results = predict_files(predictor, files, top_k=args.top_k, batch_size=args.batch_size,
                            max_pixels=args.max_pixels, tta=args.tta, progress=not args.no_progress)
    fmt = output_format(args.output)
    if args.output is None:
        try:
            done, skipped = _write(results, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            return 0
    else:
        target = args.output.resolve() if args.output.is_symlink() else args.output  # a link's target gets them
        try:
            if args.output.exists() and not args.output.is_file():  # a FIFO, /dev/stdout: a stream to write
                with args.output.open("w", newline="") as out:
                    done, skipped = _write(results, out, fmt)
            else:  # written whole or not at all: a full disk, or no image read, leaves the earlier file as it was
                with atomic_path(target) as tmp, tmp.open("w", newline="") as out:
                    done, skipped = _write(results, out, fmt)
                    if not done:
                        raise NothingPredicted
        except WriteError as err:
            return error_line(err)
        except NothingPredicted:
            print(f"predicted no image, skipped {skipped + len(missing)}; {args.output} is left as it was",
                  file=sys.stderr)
            return 1
    print(f"predicted {done} image(s), skipped {skipped + len(missing)}"
          + (f" -> {args.output}" if args.output else ""), file=sys.stderr)
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
