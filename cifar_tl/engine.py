"""The training loop, read top to bottom: data -> model -> optimiser -> epochs (train, validate, early stop,
checkpoint) -> restore best -> test metrics -> model folder. Accelerate runs it on CPU, one GPU, several
GPUs or nodes; `batch_size` is the global batch, split across processes, so results do not depend on the
process count."""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator, AutocastKwargs, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import cuda_graphs, probe
from .augment import TrainTransform, eval_transform
from .config import ConfigError, TrainConfig
from .data import load_bundle, make_loader, on_device
from .evaluation import collect_logits, compute_metrics, confusion_matrix
from .export import model_config, save_model_dir, save_weights
from .files import atomic_write_text
from .lookahead import Lookahead
from .models import cpu_bf16_pays, create_model, data_config, set_backbone_trainable

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (diverged, out of memory, mismatched resume); the message says what to do."""


def mixed_precision(requested: str, model: str, cuda: bool | None = None) -> str:
    """Accelerate's `mixed_precision` for a run; `auto`: bf16 (fp16 without bf16) on a GPU, and on a CPU bf16
    only where it pays for this model (`models.cpu_bf16_pays`)."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() if cuda is None else cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_bf16_pays(model) else "no"


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # no weight decay on biases and norm weights (1-d tensors), as timm and most recipes do
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr * cfg.bias_lr_scale}]
    fused = {"fused": True}  # one kernel for all parameters: 3-4x faster optimizer steps (bench/profile_step.py)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **fused)
    return torch.optim.Adam(groups, lr=cfg.lr, **fused)


def build_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int, time_progress=None):
    """Plateau (stepped per epoch on val loss) or per-step warm-up + cosine. With a time budget the cosine
    follows the clock (`time_progress()` in [0, 1]), so the LR has annealed when the budget runs out."""
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.plateau_factor,
                                                          patience=cfg.plateau_patience, min_lr=cfg.min_lr)
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "none":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if time_progress is not None:
            progress = max(progress, time_progress())
        progress = min(1.0, progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_bn_eval(model: torch.nn.Module, backbone_only_frozen: bool) -> None:
    """BatchNorm layers whose weights do not train keep their ImageNet statistics."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (
                not backbone_only_frozen or not any(p.requires_grad for p in m.parameters())):
            m.eval()


class Checkpoints:
    """`checkpoints/epoch-NNNN/` (full Accelerate state + trainer_state.json) and a `latest` pointer that is
    replaced atomically only after the folder is complete, so a kill -9 at any moment leaves a usable
    checkpoint. Best weights live in `checkpoints/best.safetensors`."""

    def __init__(self, root: Path):
        self.root = root
        self.pointer = root / "latest"

    def latest(self) -> Path | None:
        if not self.pointer.is_file():
            return None
        path = self.root / self.pointer.read_text().strip()
        return path if (path / "trainer_state.json").is_file() else None

    def save(self, accelerator: Accelerator, state: dict) -> Path:
        path = self.root / f"epoch-{state['epoch']:04d}"
        accelerator.save_state(str(path))
        if accelerator.is_main_process:
            atomic_write_text(path / "trainer_state.json", json.dumps(state, indent=1))
            atomic_write_text(self.pointer, path.name)
            for old in self.root.glob("epoch-*"):  # keep only the last complete one
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return path


def _check_resume(state: dict, cfg: TrainConfig, num_classes: int, fine_names: list[str], where: Path):
    if state["model"] != cfg.model:
        raise TrainingError(f"--resume: {where} was trained with --model {state['model']}, not {cfg.model}; "
                            "use another --output-dir to start a new run")
    if state["fine_names"] != fine_names:
        raise TrainingError(f"--resume: {where} has {len(state['fine_names'])} classes that differ from this "
                            f"dataset's {num_classes}; use another --output-dir")


def train(cfg: TrainConfig) -> dict:
    out = Path(cfg.output_dir)
    staged = cfg.unfreeze_after > 0 and not cfg.freeze_backbone
    # Accelerate fixes the precision process-wide; a later train() in the same process may need another one
    # (auto picks per model on CPUs). The process group (PartialState) is left alone. Private API: skipped if
    # a future Accelerate drops it (only a second train() with another precision would then fail).
    getattr(AcceleratorState, "_reset_state", lambda: None)()
    accelerator = Accelerator(
        mixed_precision=mixed_precision(cfg.mixed_precision, cfg.model),
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=None if cfg.report_to == "none" else ["wandb", "tensorboard"] if cfg.report_to == "all"
        else [cfg.report_to],
        project_dir=str(out),
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True),
        # autocast's weight cache cannot live inside a CUDA graph (and each weight is cast once per step anyway)
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=staged),
                         AutocastKwargs(cache_enabled=False)],
        dynamo_backend="inductor" if cfg.compile else None,
    )
    main = accelerator.is_main_process
    if cfg.batch_size % accelerator.num_processes:
        raise ConfigError(f"--batch-size {cfg.batch_size} (global) must divide by the {accelerator.num_processes}"
                          " processes")
    if cfg.push_to_hub:
        from .hub import check_push_access
        check_push_access(cfg.hub_model_id)  # fail now, not after hours of training
    set_seed(cfg.seed)
    torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its fastest kernels once
    out.mkdir(parents=True, exist_ok=True)

    # ---- data and model
    with accelerator.main_process_first():  # one process decodes and caches, the others read the cache
        bundle = load_bundle(cfg.dataset, image_column=cfg.image_column, label_column=cfg.label_column,
                             coarse_label_column=cfg.coarse_label_column, train_split=cfg.train_split,
                             test_split=cfg.test_split, val_fraction=cfg.val_fraction,
                             max_train_samples=cfg.max_train_samples, seed=cfg.seed, cache=cfg.data_cache)
    accelerator.print(f"data: {bundle.source} train {len(bundle.train)} / val {len(bundle.val)} / test "
                      f"{len(bundle.test)}, {bundle.num_classes} classes"
                      f"{f', {len(bundle.coarse_names)} superclasses' if bundle.has_coarse else ''}, "
                      f"{bundle.image_size}px, fingerprint {bundle.fingerprint}")
    model = create_model(cfg.model, pretrained=cfg.pretrained, num_classes=bundle.num_classes,
                         weights=cfg.weights, drop_rate=cfg.drop_rate)
    dcfg = data_config(model, cfg.image_size)
    size, mean, std = dcfg["image_size"], dcfg["mean"], dcfg["std"]
    evaluate_tf = partial(eval_transform, size=size, mean=mean, std=std, channels_last=cfg.channels_last)
    if hasattr(model, "init_whitening") and not cfg.weights:  # fast_cnn: a stem fitted to the data
        model.init_whitening(evaluate_tf(bundle.train.images[:5000], channels_last=False))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    export_meta = dict(architecture=cfg.model, image_size=size, mean=mean, std=std, data_size=bundle.image_size,
                       fine_names=bundle.fine_names, coarse_names=bundle.coarse_names,
                       fine_to_coarse=bundle.fine_to_coarse, train_config=cfg.to_dict(),
                       dataset_fingerprint=bundle.fingerprint)
    if cfg.linear_probe:  # the probe already has the test logits, from its cached features
        summary, probe_logits = probe.run(cfg, accelerator, model, bundle, evaluate_tf, out)
    else:
        summary = _fit(cfg, accelerator, model, bundle, evaluate_tf, size, mean, std, staged, out)
        model = accelerator.unwrap_model(model)
        probe_logits = {}
    test_loader = accelerator.prepare(make_loader(bundle.test, cfg.eval_batch_size, shuffle=False))

    # ---- final test evaluation on the restored best weights
    results = {}
    for tta in ([False, True] if cfg.tta else [False]):
        gathered = probe_logits.get(tta) or collect_logits(model, test_loader, evaluate_tf, accelerator, tta=tta)
        m = compute_metrics(gathered["logits"], gathered["fine"], coarse=gathered.get("coarse"),
                            fine_names=bundle.fine_names, coarse_names=bundle.coarse_names,
                            fine_to_coarse=bundle.fine_to_coarse)
        results["tta" if tta else "plain"] = m
        if not tta:
            plain = gathered
    metrics = {**{k: v for k, v in results["plain"].items() if not isinstance(v, dict)}, **summary,
               "model": cfg.model, "image_size": size, "dataset": cfg.dataset,
               "dataset_fingerprint": bundle.fingerprint, "num_processes": accelerator.num_processes,
               "mixed_precision": accelerator.mixed_precision}
    if cfg.tta:
        metrics["tta"] = {k: v for k, v in results["tta"].items() if not isinstance(v, dict)}
    if main:
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        atomic_write_text(out / "eval_details.json", json.dumps(results, indent=1) + "\n")
        from .report import write_report  # pandas + matplotlib only once the run is done

        write_report(out, results=results, logits=plain["logits"], bundle=bundle, split="test",
                     history=out / "history.jsonl", best_epoch=metrics["best_epoch"],
                     info={"model": cfg.model, "dataset": cfg.dataset, "dataset fingerprint": bundle.fingerprint,
                           "split": f"test ({len(bundle.test)} images)",
                           "best epoch": f"{metrics['best_epoch']} of {metrics['epochs_run']}",
                           "stopped": metrics["stopped"]})
        save_model_dir(model, model_config(model, **export_meta, metrics=metrics), out / "model")
        # the demo's "where this model struggles" reads the test confusion counts from the model folder
        matrix = confusion_matrix(plain["logits"], plain["fine"], bundle.num_classes)
        atomic_write_text(out / "model" / "confusion.json",
                          json.dumps({"labels": bundle.fine_names, "matrix": matrix.tolist()}) + "\n")
        accelerator.print(f"test: top1 {metrics['top1']:.4f} top5 {metrics['top5']:.4f}"
                          + (f" coarse_top1 {metrics['coarse_top1']:.4f}" if "coarse_top1" in metrics else "")
                          + f" | best epoch {metrics['best_epoch']} of {metrics['epochs_run']}, "
                          f"{metrics['train_seconds']:.0f}s -> {out / 'model'}")
    accelerator.log({f"test/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    if cfg.push_to_hub and main:
        from .hub import push_model_dir
        push_model_dir(out / "model", cfg.hub_model_id, private=cfg.hub_private,
                       message=f"cifar-tl run {out.name}: top1 {metrics['top1']:.4f}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also tears down the process group: nothing collective after this
    return metrics


def _fit(cfg, accelerator, model, bundle, evaluate_tf, size, mean, std, staged, out):
    """Epoch loop with early stopping, LR scheduling and resumable checkpoints; leaves the best weights in
    `model` and returns the run summary."""
    main = accelerator.is_main_process
    if cfg.freeze_backbone:
        set_backbone_trainable(model, False)  # before prepare: DDP never sees the frozen weights
    # on a GPU with room for them, the uint8 images live there: batches never cross PCIe or wait for the host
    train_loader = make_loader(on_device(bundle.train, accelerator.device), cfg.batch_size, shuffle=True,
                               seed=cfg.seed, drop_last=len(bundle.train) > cfg.batch_size)
    val_loader = make_loader(on_device(bundle.val, accelerator.device), cfg.eval_batch_size, shuffle=False)
    optimizer = build_optimizer(cfg, model)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    budget = 60 * cfg.time_limit_minutes if cfg.time_limit_minutes else None
    clock = {"start": time.time()}
    time_progress = (lambda: (time.time() - clock["start"]) / budget) if budget else None
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch, time_progress)
    lookahead = Lookahead(accelerator.unwrap_model(model)) if cfg.lookahead else None
    accelerator.register_for_checkpointing(scheduler)
    train_tf = TrainTransform(size, mean, std, augment=cfg.augment, shift=cfg.shift, zoom=cfg.zoom,
                              channels_last=cfg.channels_last)
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                      num_classes=bundle.num_classes)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.0 if mixup else cfg.label_smoothing)

    ckpt = Checkpoints(out / "checkpoints")
    history_path = out / "history.jsonl"
    state = {"epoch": 0, "best_val_loss": float("inf"), "best_epoch": 0, "bad_epochs": 0, "train_seconds": 0.0,
             "images_seen": 0, "model": cfg.model, "fine_names": bundle.fine_names, "stopped": None}
    if cfg.resume and (last := ckpt.latest()) is not None:
        saved = json.loads((last / "trainer_state.json").read_text())
        _check_resume(saved, cfg, bundle.num_classes, bundle.fine_names, last)
        accelerator.load_state(str(last))
        state.update(saved, stopped=None)
        accelerator.print(f"resumed from {last} (epoch {state['epoch']}, best val loss "
                          f"{state['best_val_loss']:.4f} at epoch {state['best_epoch']})")
    elif cfg.resume:
        accelerator.print(f"--resume: no checkpoint in {ckpt.root}; starting from scratch")
    if cfg.cuda_graphs and accelerator.device.type == "cuda":
        blockers = cuda_graphs.graph_blockers(num_processes=accelerator.num_processes, compile=cfg.compile,
                                              grad_accum_steps=cfg.grad_accum_steps,
                                              frozen_parts=staged or cfg.freeze_backbone or cfg.bn_eval)
        if blockers:
            accelerator.print(f"CUDA graphs off: {'; '.join(blockers)}")
        else:  # every training batch has this shape: the last partial one is dropped
            sample = torch.randn(min(cfg.batch_size, len(bundle.train)), 3, size, size, device=accelerator.device)
            model.train()
            try:
                cuda_graphs.capture(model, sample.contiguous(memory_format=torch.channels_last)
                                    if cfg.channels_last else sample)
            except RuntimeError as err:  # the step still works, only slower
                accelerator.print(f"CUDA graphs off: capture failed ({err}); --no-cuda-graphs skips the attempt")
    history = []
    if history_path.is_file() and state["epoch"] > 0:  # keep the epochs the checkpoint knows about
        history = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
        history = [h for h in history if h["epoch"] <= state["epoch"]]
    if main:
        atomic_write_text(history_path, "".join(json.dumps(h) + "\n" for h in history))
    if cfg.report_to != "none":
        accelerator.init_trackers(cfg.project_name, config=cfg.to_dict(),
                                  init_kwargs={"wandb": {"dir": str(out), "name": out.name}})
    best_path = ckpt.root / "best.safetensors"
    clock["start"] = time.time()
    deadline = clock["start"] + budget if budget else None

    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        unwrapped = accelerator.unwrap_model(model)
        if staged:
            set_backbone_trainable(unwrapped, epoch > cfg.unfreeze_after)
        model.train()
        if cfg.bn_eval or cfg.freeze_backbone or (staged and epoch <= cfg.unfreeze_after):
            set_bn_eval(unwrapped, backbone_only_frozen=not cfg.bn_eval)
        train_loader.set_epoch(epoch)
        t0 = time.time()
        loss_sum = torch.zeros((), device=accelerator.device)
        correct = torch.zeros((), device=accelerator.device)
        seen = 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{cfg.epochs}", disable=not accelerator.is_local_main_process,
                   leave=False, dynamic_ncols=True)
        try:
            for step, batch in enumerate(bar):
                with accelerator.accumulate(model):
                    x, y = train_tf(batch["image"]), batch["fine"]
                    target = y
                    if mixup is not None and len(y) % 2 == 0:
                        x, target = mixup(x, y)
                    logits = model(x)
                    loss = (torch.sum(-target * logits.float().log_softmax(-1), -1).mean() if target.ndim == 2
                            else criterion(logits.float(), target))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients and cfg.scheduler != "plateau":
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if lookahead is not None and accelerator.sync_gradients:
                        done = (epoch - 1) * steps_per_epoch + (step + 1) // cfg.grad_accum_steps
                        progress = done / (cfg.epochs * steps_per_epoch)
                        lookahead.step(done, max(progress, time_progress()) if budget else progress)
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(-1) == y).sum()
                seen += len(y)
                if step % 25 == 0:
                    value = loss.item()
                    if not math.isfinite(value):
                        raise TrainingError(
                            f"loss became {value} at epoch {epoch}, step {step}; the last good checkpoint is "
                            f"{ckpt.latest() or 'none (first epoch)'}. Lower --lr, set --max-grad-norm 1.0, or "
                            "use --mixed-precision no")
                    bar.set_postfix(loss=f"{value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
                if deadline and time.time() > deadline:
                    state["stopped"] = f"time limit {cfg.time_limit_minutes} min"
                    break
        except torch.OutOfMemoryError:
            raise TrainingError(f"out of memory at --batch-size {cfg.batch_size}, --image-size {size}: halve "
                                "--batch-size and set --grad-accum-steps 2 to keep the same effective batch") from None
        # ---- epoch summary: global sums over processes
        totals = accelerator.reduce(torch.stack([loss_sum, correct,
                                                 torch.tensor(float(seen), device=accelerator.device)]), "sum")
        train_loss, train_acc = (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()
        if not math.isfinite(train_loss):
            raise TrainingError(f"loss became {train_loss} in epoch {epoch}; the last good checkpoint is "
                                f"{ckpt.latest() or 'none'}. Lower --lr or set --max-grad-norm 1.0")
        seconds = time.time() - t0
        if lookahead is not None:
            lookahead.finish_epoch()
        val = collect_logits(model, val_loader, evaluate_tf, accelerator) if len(bundle.val) else None
        val_loss = torch.nn.functional.cross_entropy(val["logits"], val["fine"]).item() if val else train_loss
        val_acc = (val["logits"].argmax(-1) == val["fine"]).float().mean().item() if val else train_acc
        state["train_seconds"] += seconds
        state["images_seen"] += int(totals[2].item())
        record = {"epoch": epoch, "train_loss": train_loss, "train_top1": train_acc, "val_loss": val_loss,
                  "val_top1": val_acc, "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
                  "images_per_second": totals[2].item() / seconds, "elapsed_seconds": state["train_seconds"],
                  "timestamp": time.time()}
        if cfg.scheduler == "plateau":
            scheduler.step(val_loss)
        # ---- early stopping on validation loss, restoring the best weights at the end
        improved = val_loss < state["best_val_loss"]
        if improved:
            state.update(best_val_loss=val_loss, best_epoch=epoch, bad_epochs=0)
            if main:
                best_path.parent.mkdir(parents=True, exist_ok=True)
                save_weights(accelerator.unwrap_model(model), best_path)
        else:
            state["bad_epochs"] += 1
        if cfg.early_stopping_patience and state["bad_epochs"] >= cfg.early_stopping_patience:
            state["stopped"] = f"early stopping: no val-loss improvement for {state['bad_epochs']} epochs"
        state["epoch"] = epoch
        ckpt.save(accelerator, state)
        if main:
            with history_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        accelerator.log({f"train/{k}": v for k, v in record.items()}, step=epoch)
        _log_artifact(accelerator, cfg, best_path if improved else None, record)
        accelerator.print(f"epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.4f} | val loss "
                          f"{val_loss:.4f} acc {val_acc:.4f} | {record['images_per_second']:.0f} img/s"
                          f"{' *' if improved else ''}")
        if state["stopped"]:
            accelerator.print(state["stopped"])
            break

    accelerator.wait_for_everyone()
    if best_path.is_file():  # restore the best epoch's weights (Keras restore_best_weights)
        from safetensors.torch import load_file
        accelerator.unwrap_model(model).load_state_dict(load_file(str(best_path)))
    summary = {"best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
               "best_val_loss": state["best_val_loss"], "train_seconds": state["train_seconds"],
               "train_images_per_second": state["images_seen"] / max(state["train_seconds"], 1e-9),
               "stopped": state["stopped"] or "completed all epochs"}
    return summary


def _log_artifact(accelerator, cfg, weights: Path | None, record: dict) -> None:
    """With wandb, version the best weights as a model artifact carrying the epoch's metrics (as the
    reference study's run did)."""
    if weights is None or cfg.report_to not in ("wandb", "all") or not accelerator.is_main_process:
        return
    import wandb

    run = accelerator.get_tracker("wandb", unwrap=True)
    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=record)
    artifact.add_file(str(weights), name="model.safetensors")
    run.log_artifact(artifact, aliases=[f"epoch_{record['epoch']}", "best"])
