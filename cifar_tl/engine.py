"""The training run, read top to bottom:

    train(cfg):  accelerator -> data -> model -> fit (or the cached-feature probe) -> test evaluation on the
                 restored best weights -> metrics, report and model folder -> push
    fit:         set up (loaders, optimiser, schedule, resume, CUDA graphs) -> per epoch: train_one_epoch ->
                 validate -> end_of_epoch (schedule, early stopping, checkpoint, history, tracking) -> best weights

Accelerate runs it on CPU, one GPU, several GPUs or nodes; `batch_size` is the global batch, split across
processes, so results do not depend on the process count. All state that outlives a step lives in one
`Training` object."""
from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator, AutocastKwargs, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import cuda_graphs, probe, tracking
from .augment import TrainTransform, eval_transform, progressive_size, size_multiple
from .checkpoints import Checkpoints, TrainState, epochs_shrink, existing_run, resumable
from .config import RESUME_KEEPS, ConfigError, TrainConfig, save_yaml
from .data import DatasetBundle, load_bundle, make_loader, on_device
from .ema import ModelEma
from .evaluation import collect_logits, evaluate_split
from .files import WriteError, atomic_write_text, not_a_folder, read_jsonl, write_errors
from .lookahead import Lookahead
from .metrics import confusion_matrix
from .model_folder import folder_config, write_model_folder
from .models import check_model, create_model, data_config, default_input_size, set_backbone_trainable
from .optim import Budget, EarlyStopping, build_optimizer, build_scheduler, reported_lr
from .precision import choose as choose_precision
from .processes import hold, holder, main_first, release, shared_clock
from .sources import MAX_STORE_SIZE, Sizing
from .summary import write_summary
from .tta import tta_views


class TrainingError(RuntimeError):
    """The run cannot go on (diverged, out of memory); the message says what to do."""


def train(cfg: TrainConfig, started: float | None = None) -> dict:
    # --time-limit-minutes counts from `started` (train.py: the process start), else from here: imports, data,
    # model and feature extraction included
    started = time.time() if started is None else started
    cfg.validate()  # resolves the model-aware defaults of a config built in code
    out = Path(cfg.output_dir)
    cfg.mixed_precision, cfg.origin["mixed_precision"] = choose_precision(
        cfg.mixed_precision, "mixed_precision" in cfg.explicit, cfg.model)
    accelerator = make_accelerator(cfg, out)
    for flag, value in (("--batch-size", cfg.batch_size), ("--eval-batch-size", cfg.eval_batch_size)):
        if value % accelerator.num_processes:  # each process takes its share of every batch (split_batches)
            raise ConfigError(f"{flag} {value} (global) must divide by the {accelerator.num_processes} processes")
    if cfg.push_to_hub:
        from .hub import check_push_access
        check_push_access(cfg.hub_model_id)  # fail now, not after hours of training
    check_output_dir(cfg, out)
    check_model(cfg.model, cfg.pretrained, cfg.weights)  # a wrong name or missing weights: now, not after the data
    set_seed(cfg.seed)
    torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its fastest kernels once
    try:
        return run_training(cfg, accelerator, out, started)
    finally:
        release(out)  # the main process's hold on the folder (`run_training` takes it once the folder exists)


def run_training(cfg: TrainConfig, accelerator: Accelerator, out: Path, started: float) -> dict:
    """Data, model, training (or the cached-feature probe), test evaluation, outputs and push."""
    bundle = load_data(cfg, accelerator)
    model, (size, mean, std) = build_model(cfg, bundle)
    # only now does the run exist: a run that fails on its data or model leaves no folder behind
    if accelerator.is_main_process:
        with write_errors(out):
            out.mkdir(parents=True, exist_ok=True)
            busy = hold(out)  # until the run ends: another --resume or run here is refused meanwhile
        if busy:  # started at the same moment as this one: both passed check_output_dir
            raise ConfigError(in_use(out, busy))
        if cfg.overwrite_output_dir and not cfg.resume:  # what resume and the results would read of the old run
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            for name in ("history.jsonl", "metrics.json", "eval_details.json"):
                (out / name).unlink(missing_ok=True)
        if not cfg.resume:  # a resume writes it once the checkpoint has agreed (`resume`, after the probe)
            save_yaml(cfg, out / "config.yaml")
        accelerator.print(write_summary(model, size, out / "model_summary.txt"))  # Keras-style: one forward pass
    accelerator.print("choices: " + "; ".join(f"{k}: {v}" for k, v in choice_summary(cfg).items()))
    if cfg.linear_probe and not (cfg.pretrained or cfg.weights):  # allowed (the tests do it), rarely meant
        accelerator.print(f"note: --linear-probe on randomly initialised {cfg.model} (no ImageNet weights, no "
                          "--weights): the frozen part computes random features")
    eval_tf = partial(eval_transform, size=size, mean=mean, std=std, channels_last=cfg.channels_last)
    if cfg.linear_probe:  # the probe already has the test logits, from its cached features
        summary, precomputed = probe.run(cfg, accelerator, model, bundle, eval_tf, out, Budget(
            cfg.time_limit_minutes, started))
        if cfg.resume and accelerator.is_main_process:
            save_yaml(cfg, out / "config.yaml")
    else:
        summary = fit(cfg, accelerator, model, bundle, eval_tf, out,
                      Budget(cfg.time_limit_minutes, started, agree=shared_clock(accelerator)))
        model, precomputed = accelerator.unwrap_model(model), None

    # ---- final test evaluation on the restored best weights
    results, logits = evaluate_split(model, bundle.test, bundle, eval_tf, accelerator,
                                     batch_size=cfg.eval_batch_size, tta=cfg.tta and cfg.tta_level,
                                     precomputed=precomputed)
    metrics = {**scalars(results["plain"]), **summary, **timed_seconds(summary, results, cfg.tta),
               "model": cfg.model, "image_size": size, "dataset": cfg.dataset,
               "dataset_fingerprint": bundle.fingerprint, "num_processes": accelerator.num_processes,
               "mixed_precision": accelerator.mixed_precision, "pretrained": cfg.pretrained,
               "choices": choice_summary(cfg)}
    if cfg.tta:
        metrics["tta"] = scalars(results["tta"])
        metrics["tta"]["level"] = 1 if cfg.linear_probe else cfg.tta_level  # the probe caches mirror views only
    if accelerator.is_main_process:
        try:
            write_outputs(cfg, out, model, bundle, (size, mean, std), metrics, results, logits)
        except WriteError as err:  # a full disk at the very end: the training itself is kept
            kept = ("the training is complete and checkpointed: make room, then rerun with --resume to write the "
                    "results")
            raise WriteError(err.path, err.reason, "; ".join(filter(None, [err.advice, kept]))) from None
        accelerator.print(f"test: top1 {metrics['top1']:.4f}"
                          + (f" top5 {metrics['top5']:.4f}" if "top5" in metrics else "")
                          + (f" coarse_top1 {metrics['coarse_top1']:.4f}" if "coarse_top1" in metrics else "")
                          + (f" | with TTA top1 {metrics['tta']['top1']:.4f}" if cfg.tta else "")
                          + f" | best epoch {metrics['best_epoch']} of {metrics['epochs_run']}, "
                          f"{metrics['train_seconds']:.0f}s -> {out / 'model'}")
    tracking.log_end_of_run(accelerator, cfg, out, metrics, bundle.test,
                            (bundle.fine_names, bundle.coarse_names, bundle.fine_to_coarse), logits)
    if cfg.push_to_hub and accelerator.is_main_process:
        from .hub import push_finished_run
        url = push_finished_run(out / "model", cfg.hub_model_id, cfg.hub_private)
        accelerator.print(f"pushed to the Hub: {url}")
    accelerator.wait_for_everyone()
    tracking.finish(accelerator)  # also tears down the process group: nothing collective after this
    return metrics


def check_output_dir(cfg: TrainConfig, out: Path) -> None:
    """A new run may not silently replace one: its checkpoints, history and results would be lost."""
    blocked = not_a_folder(out)  # checked before the data is read
    if blocked:
        raise ConfigError(f"--output-dir {out}: {blocked}")
    busy = holder(out)
    if busy:  # e.g. the processes of a launcher killed with kill -9 go on training
        raise ConfigError(in_use(out, busy))
    refused = resumable(out, cfg.linear_probe) if cfg.resume else None
    if refused:  # it would start over, replacing the run
        raise ConfigError(refused)
    held = None if cfg.resume or cfg.overwrite_output_dir else existing_run(out)
    if held:
        raise ConfigError(f"--output-dir {out} holds a run ({held}): continue it with --resume, start it again "
                          "with --overwrite-output-dir, or choose another --output-dir")


def in_use(out: Path, busy: str) -> str:
    return f"--output-dir {out} is in use by a run still going ({busy}): wait for it or stop it, or choose another " \
           "--output-dir"


def scalars(result: dict) -> dict:
    """An evaluated split's headline numbers (not its per-class tables, nor the pass's time: `timed_seconds`)."""
    return {k: v for k, v in result.items() if not isinstance(v, dict) and k != "seconds"}


def timed_seconds(summary: dict, results: dict, tta: bool) -> dict[str, float]:
    """The final test pass's time (`test_seconds`; with --tta the TTA pass's, `tta_test_seconds`, of which
    `test_seconds` is then the plain view's share: one pass gives both) and airbench's measure of a run,
    `timed_seconds`: training (`train_seconds`: the epochs' training loops, without per-epoch validation,
    checkpoints, data loading, model building or CUDA-graph capture and cuDNN's tuning in it) plus the final
    test pass that is reported (the TTA one when on)."""
    plain = results["plain"].get("seconds", 0.0)
    timed = {"test_seconds": plain}
    if tta:
        timed["tta_test_seconds"] = results["tta"].get("seconds", 0.0)
    timed["timed_seconds"] = summary["train_seconds"] + (timed["tta_test_seconds"] if tta else plain)
    return timed


def choice_summary(cfg: TrainConfig) -> dict[str, str]:
    """What the run resolved and who chose it: initial weights, optimiser recipe, precision."""
    weights = (f"file {cfg.weights}" if cfg.weights else "ImageNet" if cfg.pretrained else "from scratch")
    return {"weights": f"{weights} ({cfg.origin['pretrained']}), head init {cfg.head_init} "
                       f"({cfg.origin['head_init']})",
            "recipe": f"{cfg.optimizer} lr {cfg.lr:g}, {cfg.scheduler} ({cfg.origin['recipe']})",
            "mixed_precision": f"{cfg.mixed_precision} ({cfg.origin['mixed_precision']})"}


def make_accelerator(cfg: TrainConfig, out: Path) -> Accelerator:
    # Accelerate fixes the precision process-wide; a later train() in the same process may need another one
    # (auto picks per model on CPUs). The process group (PartialState) is left alone. Private API: skipped if
    # a future Accelerate drops it (only a second train() with another precision would then fail).
    getattr(AcceleratorState, "_reset_state", lambda: None)()
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=tracking.trackers(cfg),
        project_dir=str(out),
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True),
        # autocast's weight cache cannot live inside a CUDA graph (and each weight is cast once per step anyway)
        kwargs_handlers=[DistributedDataParallelKwargs(
            find_unused_parameters=staged(cfg) or cfg.whiten_bias_epochs > 0),
                         AutocastKwargs(cache_enabled=False)],
        dynamo_backend="inductor" if cfg.compile else None,
    )


def staged(cfg: TrainConfig) -> bool:
    """`--unfreeze-after N`: the head alone for N epochs, then the whole network."""
    return cfg.unfreeze_after > 0 and not cfg.freeze_backbone


def load_data(cfg: TrainConfig, accelerator: Accelerator) -> DatasetBundle:
    size = min(cfg.image_size or default_input_size(cfg.model), MAX_STORE_SIZE)
    bundle = main_first(accelerator, partial(  # one process decodes and caches, the others read its cache
        load_bundle, cfg.dataset, image_column=cfg.image_column, label_column=cfg.label_column,
        coarse_label_column=cfg.coarse_label_column, train_split=cfg.train_split, test_split=cfg.test_split,
        val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, max_train_samples=cfg.max_train_samples,
        seed=cfg.seed, cache=cfg.data_cache, sizing=Sizing(cfg.store_size, size)))
    if bundle.num_classes < 2:  # nothing to learn; torchmetrics would fail only after the training
        raise ConfigError(f"--dataset {cfg.dataset}: one class ({bundle.fine_names[0]!r}); a classifier needs at "
                          "least two")
    accelerator.print(f"data: {bundle.source} train {len(bundle.train)} / val {len(bundle.val)} / test "
                      f"{len(bundle.test)}, {bundle.num_classes} classes"
                      f"{f', {len(bundle.coarse_names)} superclasses' if bundle.has_coarse else ''}, "
                      f"{bundle.image_size}px, fingerprint {bundle.fingerprint}")
    return bundle


def build_model(cfg: TrainConfig, bundle: DatasetBundle) -> tuple[torch.nn.Module, tuple[int, tuple, tuple]]:
    """The model with its input size and normalisation; fast_cnn's whitening stem is fitted to the data, and
    the parameters the run never trains are frozen (`freeze_untrained`)."""
    try:
        model = create_model(cfg.model, pretrained=cfg.pretrained, num_classes=bundle.num_classes,
                             weights=cfg.weights, drop_rate=cfg.drop_rate, head_init=cfg.head_init,
                             **({"drop_path_rate": cfg.drop_path_rate} if cfg.drop_path_rate else {}))
    except TypeError as err:  # a timm architecture without stochastic depth rejects the keyword
        if "drop_path_rate" not in str(err):
            raise
        raise ConfigError(f"--drop-path-rate: {cfg.model} has no stochastic depth; leave it at 0") from None
    freeze_untrained(cfg, model)
    dcfg = data_config(model, cfg.image_size)
    size, mean, std = dcfg["image_size"], dcfg["mean"], dcfg["std"]
    if hasattr(model, "init_whitening") and not cfg.weights:
        model.init_whitening(eval_transform(bundle.train.images[:5000], size, mean, std, channels_last=False))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, (size, mean, std)


def freeze_untrained(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """requires_grad=False on what the run never trains (a frozen backbone, the linear probe's frozen part), set
    before `prepare` so DDP never sees it; the summary and the model card count it as non-trainable."""
    if cfg.freeze_backbone or cfg.linear_probe:
        set_backbone_trainable(model, False)
    if cfg.linear_probe:
        for p in probe.trainable_top(cfg, model).parameters():
            p.requires_grad_(True)


def write_outputs(cfg: TrainConfig, out: Path, model, bundle: DatasetBundle, preprocessing: tuple, metrics: dict,
                  results: dict, logits: torch.Tensor) -> None:
    """metrics.json, eval_details.json, report.md with its plots, and the model folder."""
    from .report import write_report  # pandas + matplotlib only once the run is done

    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(out / "eval_details.json", json.dumps(results, indent=1) + "\n")
    write_report(out, results=results, logits=logits, bundle=bundle, split="test",
                 history=out / "history.jsonl", best_epoch=metrics["best_epoch"],
                 info={"model": cfg.model, "dataset": cfg.dataset, "dataset fingerprint": bundle.fingerprint,
                       "split": f"test ({len(bundle.test)} images)",
                       "best epoch": f"{metrics['best_epoch']} of {metrics['epochs_run']}",
                       "stopped": metrics["stopped"]})
    size, mean, std = preprocessing
    config = folder_config(model, image_size=size, mean=mean, std=std, data_size=bundle.image_size,
                           fine_names=bundle.fine_names, coarse_names=bundle.coarse_names,
                           fine_to_coarse=bundle.fine_to_coarse, train_config=cfg.to_dict(), metrics=metrics,
                           dataset_fingerprint=bundle.fingerprint, data=bundle.describe())
    # the demo's "where this model struggles" reads the test confusion counts from the model folder
    matrix = confusion_matrix(logits, bundle.test.fine, bundle.num_classes)
    write_model_folder(out / "model", model, config,
                       confusion={"labels": bundle.fine_names, "matrix": matrix.tolist()})


# --------------------------------------------------------------------------------------------- the epoch loop


@dataclass
class Training:
    """Everything one training run holds between steps."""

    cfg: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by Accelerate (DDP-wrapped under several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    train_tf: TrainTransform
    eval_tf: partial
    criterion: torch.nn.Module
    mixup: object | None  # timm.data.Mixup
    lookahead: Lookahead | None
    ema: ModelEma | None
    budget: Budget
    steps_per_epoch: int
    checkpoints: Checkpoints
    state: TrainState
    history_path: Path
    has_val: bool

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)


@dataclass
class EpochStats:
    loss: float
    top1: float
    images: int
    seconds: float


def fit(cfg: TrainConfig, accelerator: Accelerator, model: torch.nn.Module, bundle: DatasetBundle, eval_tf: partial,
        out: Path, budget: Budget) -> dict:
    """Epoch loop with early stopping, LR scheduling and resumable checkpoints; leaves the best weights in
    `model` and returns the run summary."""
    run = setup(cfg, accelerator, model, bundle, eval_tf, out, budget)
    # the test pass's forwards: one per view with TTA (its first view is the plain pass's), else one
    test_views = len(bundle.test) * (len(tta_views(torch.zeros(1, 3, 4, 4), cfg.tta_level)) if cfg.tta else 1)
    if run.state.stopped:  # a resumed run that had stopped stays stopped: it only gets its evaluation and export
        accelerator.print(f"--resume: the run had stopped at epoch {run.state.epoch} ({run.state.stopped}); "
                          "evaluating and exporting it")
    elif budget.seconds:  # foretell the final passes before epoch 1 as well: a budget shorter than an epoch
        validate(run, test_views)  # would otherwise go to it whole and the test pass run past it
    last = run.state.epoch if run.state.stopped else cfg.epochs
    for epoch in range(run.state.epoch + 1, last + 1):
        stats = train_one_epoch(run, epoch)
        if run.has_val:
            end_of_epoch(run, epoch, stats, *validate(run, test_views))
        else:  # nothing to validate on (a budget still times a pass)
            if budget.seconds:
                validate(run, test_views)
            end_of_epoch(run, epoch, stats)
        if run.state.stopped:
            accelerator.print(run.state.stopped)
            break
    accelerator.wait_for_everyone()
    if run.checkpoints.best.is_file():  # restore the best epoch's weights (Keras restore_best_weights)
        from safetensors.torch import load_file
        run.unwrapped.load_state_dict(load_file(str(run.checkpoints.best)))
    return run.state.summary()


def setup(cfg: TrainConfig, accelerator: Accelerator, model: torch.nn.Module, bundle: DatasetBundle,
          eval_tf: partial, out: Path, budget: Budget) -> Training:
    """Loaders, optimiser, schedule, augmentation and state, resumed from the last checkpoint with --resume;
    the step captured as CUDA graphs where it can be; trackers started."""
    # on a GPU with room for them, the uint8 images live there: batches never cross PCIe or wait for the host
    train_loader = make_loader(on_device(bundle.train, accelerator.device), cfg.batch_size, shuffle=True,
                               seed=cfg.seed, drop_last=len(bundle.train) > cfg.batch_size)
    # without a validation split a time budget times its passes on a few training images instead: it must still
    # keep room for the test pass, which otherwise started when the budget ran out
    val = bundle.val if len(bundle.val) or not budget.seconds else bundle.train.subset(
        torch.arange(min(len(bundle.train), Budget.TIMING_BATCHES * cfg.eval_batch_size)))
    val_loader = make_loader(on_device(val, accelerator.device), cfg.eval_batch_size, shuffle=False)
    optimizer = build_optimizer(cfg, model)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch, budget.progress if budget.seconds else None)
    size, mean, std = eval_tf.keywords["size"], eval_tf.keywords["mean"], eval_tf.keywords["std"]
    mixup = make_mixup(cfg, bundle.num_classes)
    ema = ModelEma(accelerator.unwrap_model(model), cfg.ema_decay) if cfg.ema_decay else None
    run = Training(
        cfg, accelerator, model, optimizer, scheduler, train_loader, val_loader,
        TrainTransform(size, mean, std, augment=cfg.augment, shift=cfg.shift, zoom=cfg.zoom,
                       channels_last=cfg.channels_last, alternating_flip=cfg.alternating_flip,
                       cutout=cfg.cutout), eval_tf,
        torch.nn.CrossEntropyLoss(label_smoothing=0.0 if mixup else cfg.label_smoothing),
        mixup, Lookahead(accelerator.unwrap_model(model)) if cfg.lookahead else None, ema,
        budget, steps_per_epoch, Checkpoints(out / "checkpoints", cfg.keep_checkpoints,
                                                     {"schedule": scheduler, **({"ema": ema} if ema else {})}),
        TrainState(cfg.model, bundle.fine_names, EarlyStopping(cfg.early_stopping_patience),
                   data={"fingerprint": bundle.fingerprint, "seed": cfg.seed, "val_fraction": cfg.val_fraction,
                         "test_fraction": bundle.test_held_out, "max_train_samples": cfg.max_train_samples},
                   recipe={key: getattr(cfg, key) for key in RESUME_KEEPS}),
        out / "history.jsonl", len(bundle.val) > 0)
    resume(run)
    if cfg.cuda_graphs and accelerator.device.type == "cuda":  # one graph per training size still to come
        capture_graphs(run, min(cfg.batch_size, len(bundle.train)), sizes_to_come(run))
    tracking.start(accelerator, cfg, out, bundle.fingerprint, resumed=read_jsonl(run.history_path))
    return run


def make_mixup(cfg: TrainConfig, num_classes: int):
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=num_classes)


def resume(run: Training) -> None:
    """With --resume, continue from the last checkpoint; history.jsonl keeps the epochs it knows about."""
    last = run.checkpoints.resume(run.accelerator, run.state) if run.cfg.resume else None
    if last is not None:
        early = run.state.early
        shrunk = epochs_shrink(last, run.state.epoch, run.cfg.epochs)
        if shrunk:  # config.yaml would say fewer epochs than the run has
            raise ConfigError(shrunk)
        best = ("no val split" if early.best_val_loss is None else
                f"best val loss {early.best_loss:.4f} at epoch {early.best_epoch}")
        run.accelerator.print(f"resumed from {last} (epoch {run.state.epoch}, {best})")
    elif run.cfg.resume:
        run.accelerator.print(f"--resume: no checkpoint in {run.checkpoints.root}; starting from scratch")
    if last is not None:
        run.budget.continue_from(run.state.budget_seconds)
    if run.cfg.resume and run.accelerator.is_main_process:  # the settings the checkpoint accepted
        save_yaml(run.cfg, run.history_path.parent / "config.yaml")
    # the checkpoint's epochs (a fallback cuts later ones), from its own record; checkpoints written before it
    # kept one leave history.jsonl's lines
    history = run.state.history or [h for h in read_jsonl(run.history_path) if h["epoch"] <= run.state.epoch]
    run.state.history = history
    if run.accelerator.is_main_process:
        atomic_write_text(run.history_path, "".join(json.dumps(h) + "\n" for h in history))


def training_size(run: Training, epoch: int) -> int:
    """The epoch's training side. With progressive resizing it grows with the share of the run done when the
    epoch starts: of its epochs (the last epoch at full size) or, under a time budget, of the budget, the full
    size from --resize-full-at of it on, so the last epochs train at the tested size however many fit."""
    if not run.cfg.progressive_resize:
        return run.eval_tf.keywords["size"]
    fraction = _epochs_share(run.cfg, epoch - 1)
    if run.budget.seconds:
        fraction = max(fraction, run.budget.progress() / run.cfg.resize_full_at)
    return _progressive_size(run, fraction)


def sizes_to_come(run: Training) -> list[int]:
    """The training sizes the rest of the run can use (one CUDA graph each): from the next epoch's size up, every
    step of the growth (sizes only grow, one multiple at a time) to the final size."""
    final = run.eval_tf.keywords["size"]
    if not run.cfg.progressive_resize:
        return [final]
    first, step = _progressive_size(run, _epochs_share(run.cfg, run.state.epoch)), size_multiple(final)
    return sorted({first, final, *range(-(-first // step) * step, final, step)})


def _epochs_share(cfg: TrainConfig, epochs_done: int) -> float:
    return epochs_done / (cfg.epochs - 1) if cfg.epochs > 1 else 1.0


def _progressive_size(run: Training, fraction: float) -> int:
    final = run.eval_tf.keywords["size"]
    return progressive_size(fraction, run.cfg.progressive_resize, final, size_multiple(final))


def capture_graphs(run: Training, batch_size: int, sizes: list[int]) -> None:
    """Replay the training forward + backward as CUDA graphs where the settings allow it, one graph per training
    image size (progressive resizing has several)."""
    cfg, accelerator = run.cfg, run.accelerator
    blockers = cuda_graphs.graph_blockers(num_processes=accelerator.num_processes, compile=cfg.compile,
                                          grad_accum_steps=cfg.grad_accum_steps,
                                          frozen_parts=staged(cfg) or cfg.freeze_backbone or cfg.bn_eval)
    if blockers:
        accelerator.print(f"CUDA graphs off: {'; '.join(blockers)}")
        return
    # every training batch has one of these shapes: the last partial one is dropped
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    samples = [torch.randn(batch_size, 3, s, s, device=accelerator.device).contiguous(memory_format=memory_format)
               for s in sizes]
    run.model.train()
    try:
        cuda_graphs.capture_shapes(run.model, samples)
        if len(sizes) > 1:
            accelerator.print(f"CUDA graphs: one per training size ({', '.join(map(str, sizes))} px)")
    except RuntimeError as err:  # the step still works, only slower
        accelerator.print(f"CUDA graphs off: capture failed ({err}); --no-cuda-graphs skips the attempt")


def train_one_epoch(run: Training, epoch: int) -> EpochStats:
    cfg, accelerator = run.cfg, run.accelerator
    set_train_mode(run, epoch)
    run.train_loader.set_epoch(epoch)
    run.budget.sync()  # the size below follows the budget's clock: one reading for all processes
    run.train_tf.set_epoch(epoch, training_size(run, epoch))
    t0 = time.time()
    # running sums stay on the device: reading them every step would wait for the GPU
    loss_sum = torch.zeros((), device=accelerator.device)
    correct = torch.zeros((), device=accelerator.device)
    seen, shown = 0, t0
    bar = tqdm(run.train_loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, dynamic_ncols=True,
               disable=not accelerator.is_local_main_process)
    try:
        for step, batch in enumerate(bar):
            loss, logits, y = train_step(run, batch, epoch, step)
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(-1) == y).sum()
            seen += len(y)
            if step % 25 == 0 or time.time() - shown > 1.0:  # a GPU sync: every 25 steps, sooner on slow steps
                check_finite(run, loss.item(), f"at epoch {epoch}, step {step}")
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}",  # the epoch's mean so far, as its summary
                                lr=f"{reported_lr(run.cfg, run.optimizer):.2e}")
                shown = time.time()
            # the budget ends a run between optimiser steps: an accumulation it cut short took no step at all
            if accelerator.sync_gradients:
                run.budget.sync()
                if run.budget.expired():
                    run.state.stopped = f"time limit {cfg.time_limit_minutes} min"
                    break
    except torch.OutOfMemoryError:
        raise TrainingError(f"out of memory at --batch-size {cfg.batch_size}, --image-size "
                            f"{run.eval_tf.keywords['size']}: halve --batch-size and set --grad-accum-steps 2 to "
                            "keep the same effective batch") from None
    totals = accelerator.reduce(torch.stack([loss_sum, correct, torch.tensor(float(seen), device=correct.device)]),
                                "sum")  # global sums over processes
    stats = EpochStats((totals[0] / totals[2]).item(), (totals[1] / totals[2]).item(), int(totals[2].item()),
                       time.time() - t0)
    check_finite(run, stats.loss, f"in epoch {epoch}")
    if run.lookahead is not None:
        run.lookahead.finish_epoch()
    return stats


def set_train_mode(run: Training, epoch: int) -> None:
    """Train mode, with the frozen parts of the transfer modes frozen (and their BatchNorm in eval mode)."""
    cfg, unwrapped = run.cfg, run.unwrapped
    if staged(cfg):
        set_backbone_trainable(unwrapped, epoch > cfg.unfreeze_after)
    run.model.train()
    if cfg.bn_eval or cfg.freeze_backbone or (staged(cfg) and epoch <= cfg.unfreeze_after):
        set_bn_eval(unwrapped, backbone_only_frozen=not cfg.bn_eval)


def train_step(run: Training, batch: dict, epoch: int, step: int):
    """One optimiser step (or one accumulation micro-step): returns the loss, logits and labels."""
    cfg, accelerator = run.cfg, run.accelerator
    with accelerator.accumulate(run.model):
        # fast_cnn's whitening bias trains for the first whiten_bias_epochs only; once frozen, backward also skips
        # the input gradient of the first conv block (its largest feature maps): ~7 % off a CPU step
        stem_bias = getattr(run.unwrapped, "whitening_bias", None) if cfg.whiten_bias_epochs else None
        if stem_bias is not None:  # before the forward pass, so autograd leaves it out
            stem_bias.requires_grad_(epoch - 1 + step / len(run.train_loader) < cfg.whiten_bias_epochs)
        x, y = run.train_tf(batch["image"]), batch["fine"]
        target = y
        if run.mixup is not None and len(y) % 2 == 0:
            x, target = run.mixup(x, y)
        logits = run.model(x)
        loss = (torch.sum(-target * logits.float().log_softmax(-1), -1).mean() if target.ndim == 2
                else run.criterion(logits.float(), target))
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.max_grad_norm:
            accelerator.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm)
        run.optimizer.step()
        if accelerator.sync_gradients and cfg.scheduler != "plateau":
            run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if run.ema is not None and accelerator.sync_gradients:
            run.ema.update()
        if run.lookahead is not None and accelerator.sync_gradients:
            done = (epoch - 1) * run.steps_per_epoch + (step + 1) // cfg.grad_accum_steps
            progress = done / (cfg.epochs * run.steps_per_epoch)
            run.lookahead.step(done, max(progress, run.budget.progress()) if run.budget.seconds else progress)
    return loss, logits, y


def check_finite(run: Training, value: float, where: str) -> None:
    if not math.isfinite(value):
        raise TrainingError(f"loss became {value} {where}; the last good checkpoint is "
                            f"{run.checkpoints.latest() or 'none (first epoch)'}. Lower --lr, set --max-grad-norm "
                            "1.0, or use --mixed-precision no")


def validate(run: Training, test_views: int) -> tuple[float, float]:
    """Validation loss and top-1 (of the weight average with --ema-decay). The pass's time foretells the last
    validation and the test pass (`test_views` images) to the time budget, which keeps room for them."""
    started = time.time()
    with run.ema.applied() if run.ema is not None else nullcontext():
        val = collect_logits(run.model, run.val_loader, run.eval_tf, run.accelerator)
    run.budget.foresee_final_passes(time.time() - started, len(val["fine"]), test_views)
    loss = torch.nn.functional.cross_entropy(val["logits"], val["fine"]).item()
    return loss, (val["logits"].argmax(-1) == val["fine"]).float().mean().item()


def end_of_epoch(run: Training, epoch: int, stats: EpochStats, val_loss: float | None = None,
                 val_top1: float | None = None) -> None:
    """LR schedule, early stopping (the best weights saved), checkpoint, history.jsonl, trackers, log line. No
    `val_loss`: the run has no validation split (its history has no val_ figures, the plateau schedule follows
    the training loss, and the last epoch's weights are kept)."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    state.train_seconds += stats.seconds
    state.images_seen += stats.images
    record = {"epoch": epoch, "train_loss": stats.loss, "train_top1": stats.top1,
              **({"val_loss": val_loss, "val_top1": val_top1} if val_loss is not None else {}),
              "lr": reported_lr(cfg, run.optimizer), "seconds": stats.seconds,
              "train_images": stats.images,  # fewer in an epoch the time budget cut short
              "images_per_second": stats.images / stats.seconds, "elapsed_seconds": state.train_seconds,
              "timestamp": time.time()}
    if cfg.scheduler == "plateau":
        run.scheduler.step(stats.loss if val_loss is None else val_loss)
    improved = state.early.update(epoch, val_loss)
    state.stopped = state.stopped or state.early.stopped  # the time limit may have stopped it already
    state.epoch = epoch
    state.budget_seconds = run.budget.used()
    state.history.append(record)  # the checkpoint keeps the history too: a resume rewrites history.jsonl from it
    # the history line goes first: a resume cuts it when the checkpoint never came
    weights = run.ema.averaged_state() if run.ema is not None else run.unwrapped  # what is evaluated and exported
    run.checkpoints.save(accelerator, state, best=weights if improved else None,
                         first=partial(append_line, run.history_path, json.dumps(record)))
    accelerator.log({f"train/{k}": v for k, v in record.items()}, step=epoch)
    tracking.log_epoch(accelerator, cfg, weights, record, improved)
    checked = "no val split" if val_loss is None else f"val loss {val_loss:.4f} acc {val_top1:.4f}"
    accelerator.print(f"epoch {epoch}: train loss {stats.loss:.4f} acc {stats.top1:.4f} | {checked} | "
                      f"{record['images_per_second']:.0f} img/s{' *' if improved else ''}")


def append_line(path: Path, line: str) -> None:
    with write_errors(path), path.open("a") as f:
        f.write(line + "\n")


def set_bn_eval(model: torch.nn.Module, backbone_only_frozen: bool) -> None:
    """BatchNorm layers whose weights do not train keep their ImageNet statistics."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (
                not backbone_only_frozen or not any(p.requires_grad for p in m.parameters())):
            m.eval()
