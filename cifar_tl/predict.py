"""`python -m cifar_tl.predict --model DIR_OR_HUB_ID PATHS_OR_FOLDERS... [--top-k 5] [--output preds.jsonl]`

Batch prediction: one JSON line per readable image, {"path", "fine": [{"label", "score"}, ...top-k],
"coarse": {"label", "score"} | null}, to --output or stdout. Folders are searched recursively for image files;
unreadable files are reported on stderr and skipped. On a CPU the model runs on ONNX Runtime (`--backend auto`;
`--backend torch` for PyTorch), with the same preprocessing."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .console import FlagParser, error_line
from .model_flags import MAX_PIXELS, add_model_args

if TYPE_CHECKING:  # torch takes seconds to import: --help and a bad flag answer without it
    import numpy as np

    from .inference import Predictor


def collect_files(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Named files as given, folders searched recursively for image suffixes; returns (files, missing)."""
    files, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():  # sources imports torch: only a folder needs it, a mistyped path does not
            from .sources import IMAGE_SUFFIXES

            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
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


def _write(results, out) -> tuple[int, int]:
    """JSON lines of the predictions, the skipped images named on stderr; (predicted, skipped)."""
    from tqdm import tqdm

    done = skipped = 0
    for path, result in results:
        if isinstance(result, str):
            skipped += 1
            tqdm.write(f"skipped {path}: {result}", file=sys.stderr)  # keeps the progress bar intact
        else:
            done += 1
            out.write(json.dumps({"path": str(path), **result}) + "\n")
    return done, skipped


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(prog="python -m cifar_tl.predict", description=__doc__.split("\n\n")[1],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="PATH_OR_FOLDER", help="image files and/or folders")
    add_model_args(parser)
    parser.add_argument("--top-k", type=int, default=5, help="fine classes per image (default: %(default)s)")
    parser.add_argument("--output", type=Path, help="write JSON lines here instead of stdout")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1")

    files, missing = collect_files(args.inputs)
    for item in missing:
        print(f"skipped {item}: no such file or folder", file=sys.stderr)
    if not files:
        return error_line("no image files found in the given paths")
    if args.output and not args.output.parent.is_dir():  # before the model loads
        return error_line(f"--output {args.output}: no folder {args.output.parent}")
    from .loading import ModelLoadError, load_predictor

    try:
        predictor = load_predictor(args.model, args.backend, args.device, args.threads)
    except ModelLoadError as err:
        return error_line(err)

    from .files import WriteError, atomic_path

    results = predict_files(predictor, files, top_k=args.top_k, batch_size=args.batch_size,
                            max_pixels=args.max_pixels, tta=args.tta, progress=not args.no_progress)
    if args.output is None:
        done, skipped = _write(results, sys.stdout)
    else:
        try:  # written whole or not at all: a full disk leaves the earlier file as it was
            with atomic_path(args.output) as tmp, tmp.open("w") as out:
                done, skipped = _write(results, out)
        except WriteError as err:
            return error_line(err)
    print(f"predicted {done} image(s), skipped {skipped + len(missing)}"
          + (f" -> {args.output}" if args.output else ""), file=sys.stderr)
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
