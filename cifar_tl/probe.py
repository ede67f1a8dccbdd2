"""Frozen-backbone fast paths: the frozen part of the network runs over the data once, its outputs are cached
on disk, and only the rest trains, on the cached tensors.

* `--linear-probe`: pooled features -> the classifier head, trained in seconds.
* `--linear-probe --probe-stages N` (EfficientNet-family models): the feature maps below the backbone's last N
  stages -> those stages, the head conv and the classifier. The only augmentation: half of each batch's maps are
  mirrored left-right (cheaper than extracting the mirror images, and as accurate; BENCHMARKS.md).

On a CPU the frozen part runs in ONNX Runtime (EfficientNet-Lite0 at 224 px: 178 img/s against 28 img/s in
PyTorch eager on 2 cores), on a GPU in PyTorch. The cache key covers model, weights, image size, stages,
dataset fingerprint and split, so a second run with the same key never touches the frozen part."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import depthwise
from .checkpoints import PROBE_CHECKPOINTS, epochs_shrink, recipe_change
from .config import RESUME_KEEPS, ConfigError
from .data import cache_dir, make_loader
from .ema import ModelEma
from .files import WriteError, atomic_path, atomic_write_text
from .integrity import is_sealed, move_sealed, seal, seal_problem
from .optim import Budget, EarlyStopping, warmup_cosine

EFFICIENTNET_PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")


class _Extractor(nn.Module):
    """uint8 images -> the frozen part's output: the pooled features, or the maps below the last N stages."""

    def __init__(self, model: nn.Module, transform, stages: int):
        super().__init__()
        self.model, self.transform, self.stages = model, transform, stages

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.transform(images, channels_last=False)
        m = self.model
        if self.stages == 0:
            return m.forward_head(m.forward_features(x), pre_logits=True)
        return m.blocks[:len(m.blocks) - self.stages](m.bn1(m.conv_stem(x)))


class _Top(nn.Module):
    """The trainable rest: the last N stages, the head conv and the classifier of the same model object, so
    training it trains the model that is exported."""

    def __init__(self, model: nn.Module, stages: int):
        super().__init__()
        self.model, self.first = model, len(model.blocks) - stages

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.forward_head(m.bn2(m.conv_head(m.blocks[self.first:](maps))))


def trainable_top(cfg, model: nn.Module) -> nn.Module:
    if cfg.probe_stages == 0:
        return nn.Sequential(nn.Dropout(cfg.drop_rate), model.get_classifier())
    missing = [p for p in EFFICIENTNET_PARTS if not hasattr(model, p)]
    if missing:
        raise ConfigError(f"--probe-stages needs an EfficientNet-family model (conv_stem, blocks, conv_head); "
                          f"{cfg.model} has no {', '.join(missing)}. Use --probe-stages 0 or --freeze-backbone")
    if not 0 < cfg.probe_stages <= len(model.blocks):
        raise ConfigError(f"--probe-stages must be between 0 and {len(model.blocks)} for {cfg.model}; "
                          f"got {cfg.probe_stages}")
    return _Top(model, cfg.probe_stages)


def feature_key(cfg, bundle, image_size: int) -> str:
    weights = "random"
    if cfg.weights:
        st = os.stat(cfg.weights)
        weights = f"{os.path.abspath(cfg.weights)}:{st.st_size}:{st.st_mtime_ns}"
    elif cfg.pretrained:
        weights = "pretrained"
    parts = [cfg.model, weights, image_size, bundle.fingerprint, cfg.seed, cfg.val_fraction,
             cfg.max_train_samples, cfg.probe_stages]
    if bundle.test_held_out:  # the test split is a share of the train split: its size moves every split
        parts.append(bundle.test_held_out)
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:20]


def _runner(extractor: nn.Module, accelerator, key: str, data_size: int):
    """images -> outputs: ONNX Runtime on CPU (several times faster than eager PyTorch for EfficientNets),
    PyTorch on an accelerator or when the export fails."""
    extractor.eval()
    if accelerator.device.type == "cpu":
        try:
            import onnxruntime as ort

            from .onnx_backend import save_onnx

            path = cache_dir() / "onnx" / f"probe-{key}.onnx"
            damage = seal_problem(path)
            if damage:
                accelerator.print(f"linear probe: exporting the frozen part again: the cached {path} is damaged "
                                  f"({damage})")
            if damage or not path.is_file():
                for name in ("onnx_ir", "onnxscript"):  # the exporter's per-pass INFO chatter
                    logging.getLogger(name).setLevel(logging.WARNING)
                save_onnx(extractor, torch.zeros(2, 3, data_size, data_size, dtype=torch.uint8), path)
                seal(path)
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            return lambda images: torch.from_numpy(session.run(None, {name: images.contiguous().numpy()})[0])
        except Exception as err:  # an op the exporter cannot express: same numbers, just slower
            accelerator.print(f"linear probe: ONNX export failed ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:120]}); extracting with PyTorch")
    extractor.to(accelerator.device)

    def run(images):
        with accelerator.autocast():
            return extractor(images.to(accelerator.device)).float()
    return run


@torch.no_grad()
def extract(runner, split, accelerator, batch_size: int, desc: str, flip: bool = False) -> torch.Tensor:
    loader = accelerator.prepare(make_loader(split, batch_size, shuffle=False))
    outputs = []
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        images = batch["image"].cpu()
        out = runner(images.flip(-1) if flip else images).to(accelerator.device)
        outputs.append(accelerator.gather_for_metrics(out).cpu().half())
    return torch.cat(outputs)


def cached_features(cfg, accelerator, model, bundle, transform, key: str) -> dict[str, torch.Tensor]:
    """train / val / test outputs of the frozen part (+ test_flip with --tta),
    stored in half precision (half the disk); a fresh run rounds the same way, so cached == fresh."""
    path = cache_dir() / "features" / f"{key}.safetensors"
    damage = seal_problem(path)
    if path.is_file() and not damage:
        accelerator.print(f"linear probe: cached features {path}")
        return load_file(str(path))
    if damage:  # extracted again, never used: a flipped byte still loads, and the test results were wrong
        accelerator.print(f"linear probe: extracting again: the cached features are damaged ({damage})")
    model.eval()
    t0 = time.time()
    runner = _runner(_Extractor(model, transform, cfg.probe_stages), accelerator, key, bundle.image_size)
    jobs = [(name, name, False) for name in ("train", "val", "test") if len(getattr(bundle, name))]
    jobs += [("test_flip", "test", True)] if cfg.tta else []
    feats = {name: extract(runner, getattr(bundle, split), accelerator, cfg.eval_batch_size,
                           f"features {name}", flip) for name, split, flip in jobs}
    accelerator.print(f"linear probe: extracted {sum(len(v) for v in feats.values())} images' features in "
                      f"{time.time() - t0:.0f}s -> {path}")
    if accelerator.is_main_process:
        try:
            with atomic_path(path) as tmp:
                save_file({k: v.contiguous() for k, v in feats.items()}, str(tmp))
            seal(path)
        except WriteError as err:  # a cache: the run goes on with the features in memory
            accelerator.print(f"linear probe: {err}; the features are not cached (CIFAR_TL_CACHE moves the cache)")
    return feats


def _logits(top, feats: torch.Tensor, device, batch_size: int) -> torch.Tensor:
    top.eval()
    with torch.no_grad():
        out = torch.cat([top(_batch(feats[i:i + batch_size], device)).float().cpu()
                         for i in range(0, len(feats), batch_size)])
    top.train()
    return out


def _batch(feats: torch.Tensor, device) -> torch.Tensor:
    x = feats.to(device).float()
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 and x.device.type != "cpu" else x


def run(cfg, accelerator, model, bundle, transform, out: Path, budget: Budget) -> tuple[dict, dict]:
    """Train the trainable part on cached features within `budget` (the extraction counts: it runs first);
    returns (summary, {tta: test logits/labels})."""
    top = trainable_top(cfg, model)  # checks the model before the (long) extraction
    key = feature_key(cfg, bundle, transform.keywords["size"])
    feats = cached_features(cfg, accelerator, model, bundle, transform, key)
    on_cpu = accelerator.device.type == "cpu"
    # on a CPU the top trains in NCHW with its small-map depthwise convs as matrix products (`depthwise`): 1.65x
    top.to(accelerator.device, memory_format=torch.contiguous_format if on_cpu else torch.channels_last).float()
    with depthwise.as_matmul(top, _batch(feats["train"][:2], accelerator.device)) if on_cpu else nullcontext():
        summary = _fit(cfg, accelerator, top, feats, bundle, out, budget, key)
        return summary, _test_logits(top, feats, bundle, accelerator.device, cfg.eval_batch_size)


def _fit(cfg, accelerator, top, feats: dict, bundle, out: Path, budget: Budget, key: str) -> dict:
    """AdamW with warm-up + cosine over the cached features (with --ema-decay, validated, kept and tested as
    the weight average), from the last checkpoint with --resume, each epoch checkpointed; the best weights
    restored; returns the run's summary."""
    top.train()
    for p in top.parameters():
        p.requires_grad_(True)
    if (cfg.optimizer, cfg.scheduler) != ("adamw", "cosine"):
        accelerator.print(f"linear probe: trains with AdamW and warm-up + cosine; --optimizer {cfg.optimizer} and "
                          f"--scheduler {cfg.scheduler} apply to full training only")
    optimizer = torch.optim.AdamW(top.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(feats["train"]) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch), cfg.min_lr / cfg.lr,
        time_progress=budget.progress if budget.seconds else None))
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout masks must not depend on whether features came from the cache
    state = {"epoch": 0, "early": EarlyStopping(cfg.early_stopping_patience), "best_state": None, "history": [],
             "ema": ModelEma(top, cfg.ema_decay) if cfg.ema_decay else None}
    ckpts = [out / "checkpoints" / name for name in PROBE_CHECKPOINTS]  # the newest, and the one before it
    recipe = {name: getattr(cfg, name) for name in RESUME_KEEPS}  # what a resume must train with, as full training
    if cfg.resume and any(path.is_file() for path in ckpts):
        resumed = _resume(ckpts, key, top, optimizer, scheduler, gen, state, recipe, cfg.epochs, accelerator)
        accelerator.print(f"resumed the probe from {resumed} (epoch {state['epoch']})")
        budget.continue_from(state.get("budget_seconds", 0.0))
    if budget.seconds:  # foretell the final passes before epoch 1 too: a short budget would go to a whole epoch
        _validate(top, feats, bundle, accelerator.device, cfg.eval_batch_size, budget)
    history = state["history"]
    t0 = time.time() - (history[-1]["elapsed_seconds"] if history else 0)
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if state["early"].should_stop or (budget.expired() and history):
            break
        record = _epoch(cfg, accelerator, top, optimizer, scheduler, feats, bundle, gen, epoch, budget, state["ema"])
        seconds = time.time() - t0
        epoch_seconds = seconds - (history[-1]["elapsed_seconds"] if history else 0)
        history.append({**record, "seconds": epoch_seconds,
                        "images_per_second": record["train_images"] / max(epoch_seconds, 1e-9),
                        "elapsed_seconds": seconds, "timestamp": time.time()})
        if state["early"].update(epoch, record.get("val_loss")):
            weights = state["ema"].averaged_state() if state["ema"] else top.state_dict()
            state["best_state"] = {k: v.detach().clone().cpu() for k, v in weights.items()}
        state["epoch"] = epoch
        state["budget_seconds"] = budget.used()
        if accelerator.is_main_process:  # a crash loses at most the epoch in progress
            _save(ckpts, key, top, optimizer, scheduler, gen, state, recipe)
            atomic_write_text(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    early = state["early"]
    top.load_state_dict(state["best_state"])
    seconds = time.time() - t0
    best = ("no val split: the last epoch's weights" if early.best_val_loss is None else
            f"best val loss {early.best_loss:.4f} at epoch {early.best_epoch} "
            f"(val acc {history[early.best_epoch - 1]['val_top1']:.4f})")
    accelerator.print(f"linear probe: {best}, {seconds:.1f}s")
    cut = budget.expired() and (len(history) < cfg.epochs or history[-1]["train_images"] < len(feats["train"]))
    return {"best_epoch": early.best_epoch, "epochs_run": len(history), "best_val_loss": early.best_val_loss,
            "train_seconds": seconds,  # images seen: an epoch the budget cut short counts for what it ran
            "train_images_per_second": sum(h["train_images"] for h in history) / seconds,
            "stopped": early.stopped or (f"time limit {cfg.time_limit_minutes} min" if cut else
                                         "completed all epochs")}


def _epoch(cfg, accelerator, top, optimizer, scheduler, feats, bundle, gen, epoch: int, budget: Budget,
           ema: ModelEma | None = None) -> dict:
    """One epoch over the cached training features (with --probe-stages, each map or its mirror image, at random),
    then validation (of the weight average with `ema`); cut short when the time budget runs out."""
    device = accelerator.device
    x_train, y_train = feats["train"], bundle.train.fine
    perm = torch.randperm(len(x_train), generator=gen)
    flips = torch.rand(len(x_train), generator=gen) < 0.5
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(range(0, len(perm), cfg.batch_size), desc=f"probe epoch {epoch}/{cfg.epochs}", leave=False,
               disable=not accelerator.is_local_main_process or cfg.probe_stages == 0)
    for i in bar:
        idx = perm[i:i + cfg.batch_size]
        x = x_train[idx]
        if cfg.probe_stages:  # mirror the maps, not the images: one extraction pass fewer, as accurate here
            x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(-1), x)
        y = y_train[idx].to(device)
        logits = top(_batch(x, device))
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        correct += int((logits.argmax(-1) == y).sum())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update()
        total_loss += loss.item() * len(idx)
        seen += len(idx)
        if budget.expired():
            break
    with ema.applied() if ema is not None else nullcontext():
        val_logits, y_val = _validate(top, feats, bundle, device, cfg.eval_batch_size, budget)
    record = {"epoch": epoch, "train_loss": total_loss / seen, "train_top1": correct / seen}
    if "val" in feats:  # no validation split: no val figures, as in the engine
        record.update(val_loss=F.cross_entropy(val_logits, y_val).item(),
                      val_top1=(val_logits.argmax(-1) == y_val).float().mean().item())
    if cfg.probe_stages:
        checked = (f"val loss {record['val_loss']:.4f} acc {record['val_top1']:.4f}" if "val" in feats else
                   "no val split")
        accelerator.print(f"probe epoch {epoch}: train loss {total_loss / seen:.4f} acc {correct / seen:.4f} | "
                          f"{checked}")
    # the LR the epoch ended at (the top's one group trains at --lr); images: fewer when the budget cut it short
    return {**record, "lr": optimizer.param_groups[0]["lr"], "train_images": seen}


def _validate(top, feats: dict, bundle, device, batch_size: int, budget: Budget) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation logits and labels; with no validation split, those of a few training maps
    (`Budget.TIMING_BATCHES` batches), only to time the pass (the whole training split, run each epoch before,
    took ~5 of cpu_fast_transfer's 15 minutes at ~175 maps/s on a loaded 2-core CPU). The pass's time foretells
    the last validation and the test pass (the test features and, with --tta, their mirror, which run the same
    way) to the time budget, which keeps room for them."""
    n = Budget.TIMING_BATCHES * batch_size
    x_val, y_val = ((feats["val"], bundle.val.fine) if "val" in feats else (feats["train"][:n], bundle.train.fine[:n]))
    started = time.time()
    logits = _logits(top, x_val, device, batch_size)
    budget.foresee_final_passes(time.time() - started, len(x_val), len(feats["test"]) + len(feats.get("test_flip", ())))
    return logits, y_val


def _save(paths: list[Path], key: str, top, optimizer, scheduler, gen, state: dict, recipe: dict) -> None:
    """The newest checkpoint to paths[0], sealed (a flipped byte still loads, and would train on silently); the
    one before it moves to paths[1], the fallback when the newest turns out damaged."""
    last, previous = paths
    if last.is_file() and not seal_problem(last):
        move_sealed(last, previous)
    with atomic_path(last) as tmp:
        torch.save({"key": key, "recipe": recipe, "top": top.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "state": {**state, "early": state["early"].state_dict(),
                              "ema": state["ema"].state_dict() if state["ema"] else None}}, tmp)
    seal(last)


def _load(path: Path) -> tuple[dict | None, str | None]:
    """A probe checkpoint, or why it cannot be used (its seal differs, or torch.load fails on it); a checkpoint
    with no seal (written before they were sealed) is loaded as it is."""
    damage = seal_problem(path) if is_sealed(path) else None
    if damage:
        return None, damage
    try:
        return torch.load(path, map_location="cpu", weights_only=True), None
    except Exception as err:  # truncated, altered: torch.load's own errors are zip and unpickler internals
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"


def _resume(paths: list[Path], key: str, top, optimizer, scheduler, gen, state: dict, recipe: dict, epochs: int,
            accelerator) -> Path:
    """Load the newest usable checkpoint of `paths` into the probe's objects; returns its path."""
    problems = []
    for path in (p for p in paths if p.is_file()):
        saved, damage = _load(path)
        if saved is not None:
            break
        problems.append(f"{path.name}: {damage}")
        accelerator.print(f"--resume: {path} is damaged ({damage}); trying the checkpoint before it")
    else:
        raise ConfigError(f"--resume: no usable probe checkpoint in {paths[0].parent} ({' | '.join(problems)}); "
                          "start the probe again with --overwrite-output-dir")
    if not isinstance(saved, dict) or saved.get("key") != key:
        raise ConfigError(f"--resume: {path} was trained on other features (model, weights, size, stages or "
                          "data differ); use another --output-dir")
    changed = recipe_change(path, saved.get("recipe") or {}, recipe, path.parent.parent / "config.yaml")
    if changed:  # config.yaml would describe a recipe the probe was not trained with
        raise ConfigError(changed)
    shrunk = epochs_shrink(path, saved["state"]["epoch"], epochs)
    if shrunk:
        raise ConfigError(shrunk)
    ema, saved_ema = state["ema"], saved["state"].get("ema")  # none in checkpoints before --ema-decay
    if (ema is None) != (saved_ema is None):
        raise ConfigError(f"--resume: {path} was trained {'without' if ema else 'with'} --ema-decay; resume with "
                          f"the same setting or use another --output-dir")
    top.load_state_dict(saved["top"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    gen.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    state.update(saved["state"], early=state["early"], ema=ema)
    for h in state["history"]:  # checkpoints before the engine's name for it
        h.setdefault("train_images", h.pop("images", 0))
    state["early"].load_state_dict(saved["state"]["early"])
    if ema is not None:
        ema.load_state_dict(saved_ema)
    return path


def _test_logits(top, feats: dict, bundle, device, batch_size: int) -> dict[bool, dict]:
    """{tta: {"logits", "fine", "coarse", "seconds"}} for the test split, flip TTA from the cached mirrored test
    images; `seconds`: the pass over the cached test features (their extraction ran with the others, up front)."""
    labels = {"fine": bundle.test.fine, **({"coarse": bundle.test.coarse} if bundle.test.coarse is not None else {})}
    started = time.perf_counter()
    tests = {False: {"logits": _logits(top, feats["test"], device, batch_size), **labels}}
    tests[False]["seconds"] = plain = time.perf_counter() - started
    if "test_flip" in feats:  # the TTA pass's time counts both views, as a TTA pass over images would
        started = time.perf_counter()
        flipped = _logits(top, feats["test_flip"], device, batch_size)
        tests[True] = {"logits": (tests[False]["logits"] + flipped) / 2, **labels,
                       "seconds": plain + time.perf_counter() - started}
    return tests
