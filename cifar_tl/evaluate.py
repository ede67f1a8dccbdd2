"""`python -m cifar_tl.evaluate --model DIR_OR_HUB_ID --dataset D --split test --output-dir OUT [--tta]`

Writes OUT/metrics.json, OUT/report.md and OUT/plots/*.png for one split. Also runs under
`accelerate launch -m cifar_tl.evaluate ...`: every process evaluates a shard and each image counts once."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from functools import partial
from pathlib import Path

import torch

from .augment import eval_transform
from .data import DataError, load_bundle, make_loader
from .evaluation import EvaluationError, align_labels, collect_logits, compute_metrics, load_label_map
from .files import atomic_write_text
from .inference import Predictor
from .report import write_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cifar_tl.evaluate", description="Evaluate a model folder or "
                                "Hub model on a dataset split: metrics.json, report.md and plots.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (config.json + model.safetensors) or Hub id")
    p.add_argument("--dataset", required=True, help="Hub id, parquet/save_to_disk dir, cifar-100-python dir "
                   "or .tar.gz, or an image folder (as train.py)")
    p.add_argument("--split", default="test", choices=("test", "val", "train"),
                   help="val/train are the training run's stratified split of the source's train split")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--tta", action="store_true", help="also report horizontal-flip test-time augmentation")
    p.add_argument("--label-map", help="JSON file {\"dataset class name\": \"model class name\"} for a model "
                   "whose class names differ from the dataset's")
    p.add_argument("--history", help="history.jsonl for the training curves (default: next to a local model "
                   "folder or its parent, as train.py writes it)")
    p.add_argument("--batch-size", type=int, default=256, help="images per process and step")
    p.add_argument("--val-fraction", type=float, help="default: the model's training value, else 0.1")
    p.add_argument("--seed", type=int, help="split seed; default: the model's training value, else 42")
    for flag in ("image-column", "label-column", "coarse-label-column"):
        p.add_argument(f"--{flag}", help="as in train.py")
    p.add_argument("--train-split", default="train", help="the source's train split name")
    p.add_argument("--test-split", default="test", help="the source's test split name")
    return p


def load_predictor(model: str, device: torch.device) -> Predictor:
    """A local folder loads with Predictor.from_dir; anything else that looks like a Hub id from the Hub."""
    path = Path(model).expanduser()
    if not path.is_dir() and (path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise EvaluationError(f"--model {model}: no such model folder, and not a Hub id (user/name)")
    try:
        if path.is_dir():
            return Predictor.from_dir(path, device=device)
        from .hub import from_pretrained  # Hub access only when asked for

        return from_pretrained(model, device=device)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise EvaluationError(f"--model {model}: cannot be loaded ({type(err).__name__}: {err})") from None


def find_history(args: argparse.Namespace) -> Path | None:
    if args.history:
        if not Path(args.history).is_file():
            raise EvaluationError(f"--history {args.history}: file not found")
        return Path(args.history)
    model = Path(args.model).expanduser()
    return next((p for p in (model / "history.jsonl", model.parent / "history.jsonl") if p.is_file()), None)


def evaluate(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator

    if args.batch_size < 1:
        raise EvaluationError(f"--batch-size must be >= 1; got {args.batch_size}")
    label_map = load_label_map(args.label_map) if args.label_map else None
    history = find_history(args)
    accelerator = Accelerator()
    predictor = load_predictor(args.model, accelerator.device)
    extra = predictor.config.get("cifar_tl", {})
    trained = extra.get("train_config") or {}
    val_fraction = args.val_fraction if args.val_fraction is not None else trained.get("val_fraction", 0.1)
    seed = args.seed if args.seed is not None else trained.get("seed", 42)
    with accelerator.main_process_first():  # one process decodes and caches, the others read the cache
        bundle = load_bundle(args.dataset, image_column=args.image_column, label_column=args.label_column,
                             coarse_label_column=args.coarse_label_column, train_split=args.train_split,
                             test_split=args.test_split, val_fraction=val_fraction, seed=seed)
    data = getattr(bundle, args.split)
    if len(data) == 0:
        hint = " (val comes from --val-fraction of the train split)" if args.split == "val" else ""
        raise EvaluationError(f"--split {args.split} of --dataset {args.dataset} is empty{hint}")
    columns = align_labels(predictor.fine_names, bundle.fine_names, label_map)

    transform = partial(eval_transform, size=predictor.image_size, mean=predictor.mean, std=predictor.std,
                        channels_last=predictor.channels_last)
    loader = accelerator.prepare(make_loader(data, args.batch_size, shuffle=False))
    results, plain_logits = {}, None
    for tta in [False, True] if args.tta else [False]:
        gathered = collect_logits(predictor.model, loader, transform, accelerator, tta=tta)
        if not torch.equal(gathered["fine"], data.fine):  # every image exactly once, in order
            raise RuntimeError(f"gathered {len(gathered['fine'])} labels that differ from the {len(data)} of "
                               f"the {args.split} split")
        logits = gathered["logits"][:, columns]
        if not tta:
            plain_logits = logits
        results["tta" if tta else "plain"] = compute_metrics(
            logits, data.fine, coarse=data.coarse, fine_names=bundle.fine_names,
            coarse_names=bundle.coarse_names, fine_to_coarse=bundle.fine_to_coarse)

    info = {"model": args.model, "dataset": args.dataset, "dataset_fingerprint": bundle.fingerprint,
            "split": args.split, **({"label_map": args.label_map} if label_map is not None else {})}
    metrics = {**info, **results["plain"], **({"tta": results["tta"]} if args.tta else {})}
    if accelerator.is_main_process:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        report_info = {"model": args.model, "architecture": predictor.config["architecture"],
                       "dataset": args.dataset, "dataset fingerprint": bundle.fingerprint,
                       "split": f"{args.split} ({len(data)} images)"}
        if label_map is not None:
            report_info["label map"] = args.label_map
        write_report(out, results=results, logits=plain_logits, bundle=bundle, split=args.split,
                     info=report_info, history=history, best_epoch=extra.get("metrics", {}).get("best_epoch"))
        plain = results["plain"]
        accelerator.print(f"{args.split}: top1 {plain['top1']:.4f} top5 {plain['top5']:.4f}"
                          + (f" coarse_top1 {plain['coarse_top1']:.4f}" if "coarse_top1" in plain else "")
                          + f" ece {plain['ece']:.4f}"
                          + (f" | tta top1 {results['tta']['top1']:.4f}" if args.tta else "")
                          + f" -> {out / 'report.md'}")
    accelerator.wait_for_everyone()
    return metrics


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "huggingface_hub", "datasets", "filelock", "accelerate", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        evaluate(args)
    except (EvaluationError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
