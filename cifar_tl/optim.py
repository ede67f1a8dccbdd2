"""Optimiser, learning-rate schedule and early stopping: the pieces the training loop (`engine`) and the
cached-feature probe (`probe`) share."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from . import muon
from .config import TrainConfig


def param_groups(cfg: TrainConfig, model: torch.nn.Module) -> list[dict]:
    """No weight decay on biases and norm weights (1-d tensors), as timm and most recipes do; those train at
    lr * bias_lr_scale. With --layer-decay, timm's `param_groups_layer_decay` also splits them by depth (its
    `group_matcher`: stem, each block, head): layer i of n trains at lr * layer_decay^(n-1-i), so a fine-tune
    moves the generic early filters least."""
    if cfg.layer_decay is None:
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        return [{"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr * cfg.bias_lr_scale}]
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
    for group in groups:  # torch's optimisers ignore timm's lr_scale (timm's own schedulers apply it): set lr
        biases = all(p.ndim <= 1 for p in group["params"])
        group["lr"] = cfg.lr * group["lr_scale"] * (cfg.bias_lr_scale if biases else 1.0)
    return groups


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(cfg, model)
    if cfg.optimizer == "muon":  # Muon for the conv filters, Nesterov SGD for the rest (muon.py)
        return muon.Muon(muon.param_groups(model, muon_lr=cfg.muon_lr, muon_momentum=cfg.muon_momentum, lr=cfg.lr,
                                           bias_lr=cfg.lr * cfg.bias_lr_scale, momentum=cfg.momentum,
                                           weight_decay=cfg.weight_decay))
    fused = {"fused": True}  # one kernel for all parameters: 3-4x faster optimizer steps (bench/profile_step.py)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **fused)
    return torch.optim.Adam(groups, lr=cfg.lr, **fused)


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float, decay: str = "cosine",
                  time_progress: Callable[[], float] | None = None) -> Callable[[int], float]:
    """LR factor per optimiser step: linear warm-up, then a cosine (or with `decay="linear"` a straight line,
    airbench94_muon's) from 1 down to `floor`, or constant 1 with `decay="none"`. With `time_progress` (share of
    a time budget used, in [0, 1]) the decay follows the clock when that is ahead of the step count, so the LR
    has annealed when the budget runs out."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "none":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if time_progress is not None:
            progress = max(progress, time_progress())
        progress = min(1.0, progress)
        if decay == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def reported_lr(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> float:
    """--lr as the schedule has scaled it now: the LR history.jsonl and the trackers show. The first group is
    not it: it trains at a scaled LR under --layer-decay (the stem's) and with Muon (the filters')."""
    group = next((g for g in optimizer.param_groups if math.isclose(g.get("initial_lr", -1.0), cfg.lr)), None)
    return cfg.lr * group["lr"] / group["initial_lr"] if group else optimizer.param_groups[0]["lr"]


def build_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int, time_progress=None):
    """Plateau (stepped per epoch on val loss) or per-step warm-up + cosine / linear decay (`none`: warm-up, then
    constant)."""
    for group in optimizer.param_groups:  # as LambdaLR does: each group's unscheduled LR, for reported_lr
        group.setdefault("initial_lr", group["lr"])
    if cfg.scheduler == "plateau":  # Keras' semantics, the study's: the LR is cut once `patience` epochs in a row
        # failed to beat the best val loss by 1e-4 (absolute); torch's counts patience + 1, with a relative margin
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience - 1, threshold=1e-4,
            threshold_mode="abs", min_lr=cfg.min_lr)
    factor = warmup_cosine(max(1, cfg.epochs * steps_per_epoch), int(cfg.warmup_epochs * steps_per_epoch),
                           cfg.min_lr / cfg.lr, decay=cfg.scheduler, time_progress=time_progress)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Budget:
    """`--time-limit-minutes`, counted from the start of the run (`start`: train.py passes its process start, so
    imports, decoding, model building and a probe's feature extraction count). Training stops early enough to
    leave the time the passes after it are expected to take (`final_passes_seconds`: the cut epoch's validation
    and the final test pass, set from how fast validation ran) and the report and export after them, so the whole
    run keeps the budget on a fast or a slow machine alike. `progress` is the share of the training time used
    (the LR schedule follows it)."""

    AFTER_TRAINING_SECONDS = 10.0  # report, plots and model folder
    TIMING_BATCHES = 4  # without a validation split, this many eval batches of training data are timed instead

    def __init__(self, minutes: float | None, start: float | None = None,
                 agree: Callable[[float, float], tuple[float, float]] | None = None):
        self.seconds = 60 * minutes if minutes else None
        self.start = time.time() if start is None else start
        self.final_passes_seconds = 0.0
        self._rates: list[float] = []  # seconds per image of each validation pass
        self._agree = agree  # several processes: one clock for all (`processes.shared_clock`)
        self._agreed: tuple[float, float] | None = None

    def foresee_final_passes(self, val_seconds: float, val_images: int, test_images: int) -> None:
        """Set `final_passes_seconds` from a validation pass that took `val_seconds` for `val_images`: one more
        validation and the test pass, at the slowest rate so far, plus a tenth for what the test pass adds
        (shifted TTA views, metrics). The last pass alone foretold 23-47 % too little on a 2-core AVX2 CPU, and
        runs overshot their budget by 5-14 s; without the last validation the probe still ran 8 s over. The first
        pass stops counting once there is a second: it carries one-off costs (oneDNN primitives, cuDNN tuning for
        the full size after progressive resizing's small epochs), which ended a 10-minute run 26 s early."""
        self._rates.append(val_seconds / max(1, val_images))
        rate = max(self._rates[1:] or self._rates)
        self.final_passes_seconds = 1.1 * rate * (val_images + test_images)

    def sync(self) -> None:
        """Several processes: read the clock once for all of them (a collective, at the same step on each), so
        they stop at the same step and follow one LR schedule. Without `agree` the clock is read live."""
        if self._agree is not None and self.seconds:
            self._agreed = self._agree(time.time() - self.start, self.final_passes_seconds)

    def _clock(self) -> tuple[float, float]:
        """Seconds elapsed, and those the training leaves for the passes and the export after it."""
        elapsed, reserve = self._agreed or (time.time() - self.start, self.final_passes_seconds)
        return elapsed, reserve + self.AFTER_TRAINING_SECONDS

    def progress(self) -> float:
        elapsed, reserve = self._clock()
        return min(1.0, elapsed / max(1.0, self.seconds - reserve))

    def expired(self) -> bool:
        if self.seconds is None:
            return False
        elapsed, reserve = self._clock()
        return elapsed > self.seconds - reserve

    def used(self) -> float:
        """Seconds of the budget used so far (0 without one): a checkpoint records it."""
        return time.time() - self.start if self.seconds else 0.0

    def continue_from(self, used: float) -> None:
        """A resumed run's budget: its earlier processes used `used` seconds of it (a spent one trains no more)."""
        self.start -= used


@dataclass
class EarlyStopping:
    """Tracks the best validation loss (the epoch whose weights are kept) and stops after `patience` epochs
    without improvement (0: never stops). `state_dict()` is plain data, for checkpoints."""

    patience: int
    best_loss: float = float("inf")
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, epoch: int, loss: float | None) -> bool:
        """Record an epoch's validation loss; True when it is the best so far. None: there is no validation split,
        so nothing to select on: the epoch counts as the best (the run keeps the last epoch's weights) and the run
        never stops early."""
        if loss is None or loss < self.best_loss:
            self.best_epoch, self.bad_epochs = epoch, 0
            if loss is not None:
                self.best_loss = loss
            return True
        self.bad_epochs += 1
        return False

    @property
    def stopped(self) -> str | None:
        """Why the run stopped early (the summary's `stopped`), or None."""
        return f"early stopping: no val-loss improvement for {self.bad_epochs} epochs" if self.should_stop else None

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {**asdict(self), "best_loss": self.best_val_loss}

    @property
    def best_val_loss(self) -> float | None:
        """The best validation loss, None without a validation split."""
        return self.best_loss if math.isfinite(self.best_loss) else None

    def load_state_dict(self, state: dict) -> None:
        best = state["best_loss"]  # None: no validation split (JSON has no infinity)
        self.best_loss = float("inf") if best is None else best
        self.best_epoch, self.bad_epochs = state["best_epoch"], state["bad_epochs"]
