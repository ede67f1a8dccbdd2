"""Linear probe: run the frozen backbone over the data once, cache the pooled features on disk, then train
the classifier head on them in seconds. A second run with the same key never touches the backbone."""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import cache_dir, make_loader
from .export import atomic_write_text


def feature_key(cfg, bundle, image_size: int) -> str:
    weights = "random"
    if cfg.weights:
        st = os.stat(cfg.weights)
        weights = f"{os.path.abspath(cfg.weights)}:{st.st_size}:{st.st_mtime_ns}"
    elif cfg.pretrained:
        weights = "pretrained"
    parts = [cfg.model, weights, image_size, bundle.fingerprint, cfg.seed, cfg.val_fraction,
             cfg.max_train_samples]
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:20]


@torch.no_grad()
def extract(model, split, transform, accelerator, batch_size: int, desc: str) -> torch.Tensor:
    loader = accelerator.prepare(make_loader(split, batch_size, shuffle=False))
    feats = []
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        with accelerator.autocast():
            f = model.forward_head(model.forward_features(transform(batch["image"])), pre_logits=True)
        feats.append(accelerator.gather_for_metrics(f.float()).cpu())
    return torch.cat(feats)


def cached_features(cfg, accelerator, model, bundle, transform, image_size: int) -> dict[str, torch.Tensor]:
    path = cache_dir() / "features" / f"{feature_key(cfg, bundle, image_size)}.safetensors"
    if path.is_file():
        accelerator.print(f"linear probe: cached features {path}")
        return {k: v.float() for k, v in load_file(str(path)).items()}
    model.eval().to(accelerator.device)
    t0 = time.time()
    # stored in half precision (2x less disk); round here too so a cached run is identical to a fresh one
    feats = {name: extract(model, getattr(bundle, name), transform, accelerator, cfg.eval_batch_size,
                           f"features {name}").half() for name in ("train", "val", "test") if len(getattr(bundle, name))}
    accelerator.print(f"linear probe: extracted features in {time.time() - t0:.0f}s -> {path}")
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in feats.items()}, str(tmp))
        os.replace(tmp, path)
    return {k: v.float() for k, v in feats.items()}


def run(cfg, accelerator, model, bundle, transform, out: Path) -> tuple[dict, dict]:
    """Train `model`'s classifier on cached features; returns (summary, test logits/labels)."""
    image_size = transform.keywords["size"]
    feats = cached_features(cfg, accelerator, model, bundle, transform, image_size)
    device = accelerator.device
    head = model.get_classifier()
    head.to(device).float()
    x_train, y_train = feats["train"].to(device), bundle.train.fine.to(device)
    x_val = feats.get("val", feats["train"]).to(device)
    y_val = (bundle.val if "val" in feats else bundle.train).fine.to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(1, s / total))))
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout masks must not depend on whether features came from the cache
    best = {"loss": float("inf"), "epoch": 0, "state": None}
    history, bad, t0 = [], 0, time.time()
    for epoch in range(1, cfg.epochs + 1):
        perm = torch.randperm(len(x_train), generator=gen).to(device)
        total_loss, correct = 0.0, 0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            logits = head(F.dropout(x_train[idx], cfg.drop_rate))
            loss = F.cross_entropy(logits, y_train[idx], label_smoothing=cfg.label_smoothing)
            correct += int((logits.argmax(-1) == y_train[idx]).sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(idx)
        with torch.no_grad():
            val_logits = head(x_val)
            val_loss = F.cross_entropy(val_logits, y_val).item()
            val_acc = (val_logits.argmax(-1) == y_val).float().mean().item()
        history.append({"epoch": epoch, "train_loss": total_loss / len(perm), "train_top1": correct / len(perm),
                        "val_loss": val_loss,
                        "val_top1": val_acc, "lr": optimizer.param_groups[0]["lr"],
                        "elapsed_seconds": time.time() - t0, "timestamp": time.time()})
        if val_loss < best["loss"]:
            best = {"loss": val_loss, "epoch": epoch, "state": {k: v.clone() for k, v in head.state_dict().items()}}
            bad = 0
        else:
            bad += 1
            if cfg.early_stopping_patience and bad >= cfg.early_stopping_patience:
                break
    head.load_state_dict(best["state"])
    if accelerator.is_main_process:
        atomic_write_text(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    accelerator.print(f"linear probe: best val loss {best['loss']:.4f} at epoch {best['epoch']} "
                      f"(val acc {history[best['epoch'] - 1]['val_top1']:.4f}), {time.time() - t0:.1f}s")
    with torch.no_grad():
        test = {"logits": head(feats["test"].to(device)).cpu(), "fine": bundle.test.fine}
    if bundle.test.coarse is not None:
        test["coarse"] = bundle.test.coarse
    summary = {"best_epoch": best["epoch"], "epochs_run": len(history), "best_val_loss": best["loss"],
               "train_seconds": time.time() - t0, "train_images_per_second": None, "stopped": "linear probe"}
    return summary, test
