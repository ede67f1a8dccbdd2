"""Evaluate a model on one split from the command line (the work is `evaluation.evaluate`):

    python -m cifar_tl.evaluate --model DIR_OR_HUB_ID --dataset D --split test --output-dir OUT [--tta]

which writes OUT/metrics.json, OUT/report.md and OUT/plots/*.png. The CLI also runs under
`accelerate launch -m cifar_tl.evaluate ...`: every process evaluates a shard and each image counts once.

`--via transformers` instead checks the folder independently (`crosscheck`): loaded by the transformers
pipeline, scored by 🤗 evaluate, compared with its recorded test accuracy; OUT/crosscheck.json, exit code 1 when
they disagree."""
from __future__ import annotations

import argparse
import sys

from .console import FlagParser, one_line_errors, setup_logging
from .model_flags import BACKENDS


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(prog="python -m cifar_tl.evaluate", description="Evaluate a model folder or "
                   "Hub model on a dataset split: metrics.json, report.md and plots.",
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="a model folder (config.json + model.safetensors), a run folder, "
                   "an exported .onnx file or a Hub id")
    p.add_argument("--dataset", required=True, help="Hub id, parquet/save_to_disk dir, CIFAR python pickles "
                   "(dir or .tar.gz), or an image folder (as train.py)")
    p.add_argument("--split", default="test", choices=("test", "val", "train"),
                   help="val/train are the training run's stratified split of the source's train split")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--tta", action="store_true", help="also report horizontal-flip test-time augmentation")
    p.add_argument("--label-map", help="JSON file {\"dataset class name\": \"model class name\"} for a model "
                   "whose class names differ from the dataset's")
    p.add_argument("--history", help="history.jsonl for the training curves (default: next to a local model "
                   "folder or its parent, as train.py writes it)")
    p.add_argument("--batch-size", type=int, default=256, help="images per process and step")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="auto = onnx on a CPU (the model exported "
                   "once to the cache and run on ONNX Runtime: 4x PyTorch per pass for Lite0 at 128 px), torch on a GPU "
                   "or with several processes")
    p.add_argument("--val-fraction", type=float, help="default: the model's training value, else 0.1")
    p.add_argument("--test-fraction", type=float, help="a source with no test split: the share of its train split "
                   "held out as the test split, as train.py holds it out; default: the model's training value, else "
                   "0.1 (--test-split train evaluates all of it)")
    p.add_argument("--seed", type=int, help="split seed; default: the model's training value, else 42")
    for flag in ("image-column", "label-column", "coarse-label-column"):
        p.add_argument(f"--{flag}", help="as in train.py; default: the model's training value on its own dataset")
    p.add_argument("--train-split", help="the source's train split name; default: the model's training value on "
                   "its own dataset, else train")
    p.add_argument("--test-split", help="the source's test split name; default: the model's training value on "
                   "its own dataset, else test")
    p.add_argument("--via", choices=("cifar-tl", "transformers"), default="cifar-tl",
                   help="transformers: an independent check of the folder's recorded test accuracy through the "
                   "transformers image-classification pipeline and 🤗 evaluate (timm architectures; needs "
                   "pip install \"cifar-tl[crosscheck]\"); exit code 1 when they disagree")
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    # torch, datasets and torchmetrics take seconds to import: --help and a mistyped flag answer without them
    from .crosscheck import CrosscheckError
    from .evaluation import evaluate, via_transformers
    from .files import WriteError
    from .loading import ModelLoadError
    from .metrics import EvaluationError
    from .sources import DataError

    def run() -> int:
        if args.via == "transformers":
            return via_transformers(args)
        evaluate(args)
        return 0

    return one_line_errors(run, EvaluationError, DataError, ModelLoadError, WriteError, CrosscheckError)


if __name__ == "__main__":
    sys.exit(main())
