"""One split's metrics: `evaluate_split` (the engine's test evaluation and `python -m cifar_tl.evaluate`) over
`collect_logits` (every process's share gathered, each image once; with TTA one pass yields the plain and the
TTA logits), and the CLI's run (`evaluate`: metrics.json, report.md, plots; `via_transformers`: the
cross-check)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from functools import partial
from pathlib import Path

import torch

from .augment import eval_transform
from .crosscheck import crosscheck
from .data import DatasetBundle, load_bundle, make_loader
from .files import atomic_write_text, not_a_folder
from .loading import backend_of, load_predictor, model_folder
from .metrics import EvaluationError, align_labels, compute_metrics, load_label_map
from .model_flags import onnx_conflict
from .processes import main_first
from .report import write_report
from .sources import MissingSplitError, Sizing, Split
from .tta import multiview_logits

log = logging.getLogger(__name__)


@torch.no_grad()
def collect_logits(model, loader, transform, accelerator, tta: bool | int = False) -> dict[str, torch.Tensor]:
    """Run `model` over `loader` on every process; gather_for_metrics drops the sampler's padding, so the
    result holds each sample exactly once, in order. `tta`: True or 1 averages each image with its mirror
    image, 2 adds 1 px shifts (airbench's 6 views; `tta.tta_views`). With `tta` the same pass also returns the
    image's own logits (`plain_logits`: the first view) and `plain_seconds`, the share of the pass that
    computed them (transform and that view's forward; a plain pass of its own would repeat that work)."""
    model.eval()
    outs: dict[str, list[torch.Tensor]] = {}
    plain_seconds = 0.0
    for batch in loader:
        started = time.perf_counter()
        x = transform(batch["image"])
        with accelerator.autocast():
            plain = model(x).float()
        tensors = {"logits": plain}
        if tta:
            if plain.device.type == "cuda":  # the kernels run asynchronously: wait for the first view's
                torch.cuda.synchronize(plain.device)
            plain_seconds += time.perf_counter() - started
            with accelerator.autocast():
                tensors = {"logits": multiview_logits(model, x, int(tta), first=plain), "plain_logits": plain}
        tensors.update({k: batch[k] for k in ("fine", "coarse") if k in batch})
        for key, value in accelerator.gather_for_metrics(tensors).items():
            outs.setdefault(key, []).append(value.cpu())
    out = {k: torch.cat(v) for k, v in outs.items()}
    if tta:
        out["plain_seconds"] = plain_seconds
    return out


def split_passes(model, loader, transform, accelerator, tta: bool | int,
                 precomputed: dict[bool, dict] | None) -> dict[bool, dict]:
    """{False: the plain pass, True: the TTA pass (with `tta`)}, each {"logits", "fine", ["coarse",] "seconds"}:
    those `precomputed` holds, the others from one pass over `loader` (a TTA pass yields the plain logits too)."""
    passes = dict(precomputed or {})
    if all(flip in passes for flip in ([False, True] if tta else [False])):
        return passes
    started = time.perf_counter()  # collect_logits copies each batch's logits to the host: no sync needed
    gathered = collect_logits(model, loader, transform, accelerator, tta=int(tta))
    gathered["seconds"] = time.perf_counter() - started
    labels = {k: gathered[k] for k in ("fine", "coarse") if k in gathered}
    computed = {True: gathered, False: {"logits": gathered.pop("plain_logits"), **labels,
                                        "seconds": gathered.pop("plain_seconds")}} if tta else {False: gathered}
    return {**computed, **passes}


def evaluate_split(model, split: Split, bundle: DatasetBundle, transform, accelerator, *, batch_size: int,
                   tta: bool | int = False, columns: list[int] | None = None,
                   precomputed: dict[bool, dict] | None = None) -> tuple[dict[str, dict], torch.Tensor]:
    """Metrics of `model` on `split` (labels and names from `bundle`): {"plain": ..., "tta": ... (flip TTA)}
    and the plain logits in the split's order. `columns` picks and orders the model outputs that predict the
    dataset's classes (`metrics.align_labels`); `precomputed` holds logits already computed per TTA setting
    (the linear probe's, from cached features). `tta`: the TTA level of the "tta" results (True = 1, mirror).
    Each result's `seconds` is its pass's time (model, views, gathering; metrics not included); with `tta`
    one pass computes both, and the plain result's `seconds` is its share (`collect_logits`)."""
    loader = accelerator.prepare(make_loader(split, batch_size, shuffle=False))
    passes = split_passes(model, loader, transform, accelerator, tta, precomputed)
    results, plain = {}, None
    for flip in [False, True] if tta else [False]:
        gathered = passes[flip]
        if not torch.equal(gathered["fine"].cpu(), split.fine.cpu()):  # every image exactly once, in order
            raise RuntimeError(f"gathered {len(gathered['fine'])} labels that differ from the split's {len(split)}")
        logits = gathered["logits"] if columns is None else gathered["logits"][:, columns]
        results["tta" if flip else "plain"] = compute_metrics(
            logits, split.fine, coarse=split.coarse, fine_names=bundle.fine_names,
            coarse_names=bundle.coarse_names, fine_to_coarse=bundle.fine_to_coarse)
        results["tta" if flip else "plain"]["seconds"] = gathered["seconds"]
        plain = logits if not flip else plain
    return results, plain


# --------------------------------------------------------------------------------------------- the CLI's run


def find_history(args: argparse.Namespace) -> Path | None:
    if args.history:
        if not Path(args.history).is_file():
            raise EvaluationError(f"--history {args.history}: file not found")
        return Path(args.history)
    model = Path(args.model).expanduser()
    return next((p for p in (model / "history.jsonl", model.parent / "history.jsonl") if p.is_file()), None)


def load_split(args: argparse.Namespace, trained: dict, data_size: int, accelerator) -> tuple[DatasetBundle, Split]:
    """The dataset split as the model's training run split it (by default its validation share and seed; on the
    run's own dataset also its columns, split names and train subset), its images stored at the model's data
    size when their sizes vary."""
    same = trained.get("dataset") == args.dataset  # a run's columns and split names mean nothing elsewhere

    def given(name: str, default, anywhere: bool = False):
        """The flag, else the training run's value (`anywhere`: on any dataset, else on its own), else `default`."""
        value = getattr(args, name)
        if value is None and (same or anywhere):
            value = trained.get(name)
        return default if value is None else value

    train_split, test_split = given("train_split", "train"), given("test_split", "test")
    load = partial(load_bundle, args.dataset, image_column=given("image_column", None),
                   label_column=given("label_column", None), coarse_label_column=given("coarse_label_column", None),
                   test_split=test_split, val_fraction=given("val_fraction", 0.1, anywhere=True),
                   test_fraction=given("test_fraction", 0.1, anywhere=True), seed=given("seed", 42, anywhere=True),
                   max_train_samples=trained.get("max_train_samples") if same else None, partial_coarse=True,
                   sizing=Sizing(trained.get("store_size"), data_size))

    def load_either() -> DatasetBundle:
        try:
            return load(train_split=train_split)
        except MissingSplitError as err:  # a test-only source: its test split is all a test evaluation needs
            if args.split != "test" or err.split != train_split:
                raise
            log.info("%s has no %r split (it has %s): evaluating its %r split alone", args.dataset,
                     train_split, ", ".join(err.have), test_split)
            return load(train_split=None)

    bundle = main_first(accelerator, load_either)  # one process decodes and caches, the others read its cache
    data = getattr(bundle, args.split)
    if len(data) == 0:
        hint = " (val comes from --val-fraction of the train split)" if args.split == "val" else ""
        raise EvaluationError(f"--split {args.split} of --dataset {args.dataset} is empty{hint}")
    return bundle, data


def complete_coarse(bundle: DatasetBundle, predictor, columns: list[int]) -> None:
    """A small labelled sample (CIFAR-100's first 20 test images) leaves most fine classes unseen, so the map
    its rows give is partial: the model's own map completes it when both name the same superclasses and agree
    on every class the sample shows. Otherwise superclass metrics are off, as in training."""
    seen = bundle.fine_to_coarse
    if seen is None or -1 not in seen:
        return
    if predictor.has_coarse and predictor.coarse_names == bundle.coarse_names:
        model_map = [predictor.fine_to_coarse[c] for c in columns]  # in the dataset's class order
        if all(s in (-1, m) for s, m in zip(seen, model_map)):
            bundle.fine_to_coarse = model_map
            log.info("%s: the superclasses of the %d fine classes it does not show come from the model's map",
                     bundle.source, seen.count(-1))
            return
    bundle.drop_partial_coarse()


def evaluate(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator

    if args.batch_size < 1:
        raise EvaluationError(f"--batch-size must be >= 1; got {args.batch_size}")
    refused = onnx_conflict(args.model, args.backend, None)
    blocked = not_a_folder(args.output_dir)  # before the evaluation, not after it
    if refused or blocked:
        raise EvaluationError(refused or f"--output-dir {args.output_dir}: {blocked}")
    label_map = load_label_map(args.label_map) if args.label_map else None
    history = find_history(args)
    accelerator = Accelerator()
    backend = "torch" if args.backend == "auto" and accelerator.num_processes > 1 else args.backend
    predictor = load_predictor(args.model, backend, device=accelerator.device)
    backend = backend_of(predictor)  # as resolved (.onnx: onnx; auto: torch when the export failed)
    extra = predictor.config.get("cifar_tl", {})
    bundle, data = load_split(args, extra.get("train_config") or {}, predictor.data_size, accelerator)
    columns = align_labels(predictor.fine_names, bundle.fine_names, label_map)
    complete_coarse(bundle, predictor, columns)
    if backend == "onnx":  # the graph holds the eval transform: it takes uint8 thumbnails at the model's data size
        from .onnx_backend import SessionModule

        model, transform = SessionModule(predictor), (lambda images: images)
        if data.images.shape[-1] != predictor.data_size:  # a source of one other square size keeps its own
            transform = partial(fit_thumbnails, predictor)
    else:
        model, transform = predictor.model, partial(eval_transform, size=predictor.image_size,
                                                    mean=predictor.mean, std=predictor.std,
                                                    channels_last=predictor.channels_last)
    results, plain_logits = evaluate_split(model, data, bundle, transform, accelerator,
                                           batch_size=args.batch_size, tta=args.tta, columns=columns)
    info = {"model": args.model, "dataset": args.dataset, "dataset_fingerprint": bundle.fingerprint,
            "split": args.split, "backend": backend,
            **({"label_map": args.label_map} if label_map is not None else {})}
    metrics = {**info, **results["plain"], **({"tta": results["tta"]} if args.tta else {})}
    if accelerator.is_main_process:
        report_info = {"model": args.model, "architecture": predictor.config["architecture"],
                       "dataset": args.dataset, "dataset fingerprint": bundle.fingerprint,
                       "split": f"{args.split} ({len(data)} images)", "backend": backend,
                       **({"label map": args.label_map} if label_map is not None else {})}
        write_outputs(Path(args.output_dir), metrics, results, plain_logits, bundle, args.split, report_info,
                      history, extra.get("metrics", {}).get("best_epoch"))
        accelerator.print(summary_line(args.split, results) + f" -> {Path(args.output_dir) / 'report.md'}")
    accelerator.wait_for_everyone()
    return metrics


def fit_thumbnails(predictor, images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, S, S] at another size -> the model's data size, as predict and the demo fit any image."""
    return predictor.preprocess(images.permute(0, 2, 3, 1).numpy())


def write_outputs(out: Path, metrics: dict, results: dict, logits: torch.Tensor, bundle: DatasetBundle,
                  split: str, info: dict, history: Path | None, best_epoch: int | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_report(out, results=results, logits=logits, bundle=bundle, split=split, info=info, history=history,
                 best_epoch=best_epoch)


def summary_line(split: str, results: dict) -> str:
    plain = results["plain"]
    return (f"{split}: top1 {plain['top1']:.4f}" + (f" top5 {plain['top5']:.4f}" if "top5" in plain else "")
            + (f" coarse_top1 {plain['coarse_top1']:.4f}" if "coarse_top1" in plain else "")
            + f" ece {plain['ece']:.4f}"
            + (f" | tta top1 {results['tta']['top1']:.4f}" if "tta" in results else ""))


def via_transformers(args: argparse.Namespace) -> int:
    """`--via transformers`: OUT/crosscheck.json and one line; 1 when the pipeline disagrees with the record."""
    from accelerate import Accelerator

    folder = model_folder(args.model)
    extra = json.loads((folder / "config.json").read_text()).get("cifar_tl") or {}
    bundle, _ = load_split(args, extra.get("train_config") or {}, extra.get("data_size") or 32, Accelerator(cpu=True))
    result = crosscheck(args.model, folder, bundle, args.split, batch_size=args.batch_size,
                        device="cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "crosscheck.json", json.dumps(result, indent=2) + "\n")
    print(result["message"], file=sys.stdout if result["agrees"] is not False else sys.stderr)
    return 1 if result["agrees"] is False else 0
