"""Resumable training state: `RUN/checkpoints/epoch-NNNN/` folders (Accelerate's full state + trainer_state.json)
behind a `latest` pointer that is replaced atomically only after the folder is complete, so a kill -9 at any
moment leaves a usable checkpoint. The best epoch's weights live in `checkpoints/best.safetensors`."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator

from .files import atomic_write_text
from .optim import EarlyStopping


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed by this run; the message says why and what to do."""


@dataclass
class TrainState:
    """What a checkpoint records besides Accelerate's state (trainer_state.json)."""

    model: str
    fine_names: list[str]
    early: EarlyStopping
    epoch: int = 0
    train_seconds: float = 0.0
    images_seen: int = 0
    stopped: str | None = None

    def to_json(self) -> dict:
        early = self.early
        return {"epoch": self.epoch, "best_val_loss": early.best_loss, "best_epoch": early.best_epoch,
                "bad_epochs": early.bad_epochs, "train_seconds": self.train_seconds,
                "images_seen": self.images_seen, "model": self.model, "fine_names": self.fine_names,
                "stopped": self.stopped}

    def load_json(self, saved: dict) -> None:
        self.early.load_state_dict({"best_loss": saved["best_val_loss"], "best_epoch": saved["best_epoch"],
                                    "bad_epochs": saved["bad_epochs"]})
        self.epoch, self.train_seconds = saved["epoch"], saved["train_seconds"]
        self.images_seen, self.stopped = saved["images_seen"], None

    def summary(self) -> dict:
        """The run summary metrics.json carries."""
        return {"best_epoch": self.early.best_epoch, "epochs_run": self.epoch,
                "best_val_loss": self.early.best_loss, "train_seconds": self.train_seconds,
                "train_images_per_second": self.images_seen / max(self.train_seconds, 1e-9),
                "stopped": self.stopped or "completed all epochs"}


class Checkpoints:
    def __init__(self, root: Path):
        self.root = root
        self.pointer = root / "latest"
        self.best = root / "best.safetensors"

    def latest(self) -> Path | None:
        if not self.pointer.is_file():
            return None
        path = self.root / self.pointer.read_text().strip()
        return path if (path / "trainer_state.json").is_file() else None

    def save(self, accelerator: Accelerator, state: TrainState) -> Path:
        path = self.root / f"epoch-{state.epoch:04d}"
        accelerator.save_state(str(path))
        if accelerator.is_main_process:
            atomic_write_text(path / "trainer_state.json", json.dumps(state.to_json(), indent=1))
            atomic_write_text(self.pointer, path.name)
            for old in self.root.glob("epoch-*"):  # keep only the last complete one
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return path

    def resume(self, accelerator: Accelerator, state: TrainState) -> Path | None:
        """Load the newest checkpoint into the prepared objects and `state`; None when there is none."""
        last = self.latest()
        if last is None:
            return None
        saved = json.loads((last / "trainer_state.json").read_text())
        if saved["model"] != state.model:
            raise ResumeError(f"--resume: {last} was trained with --model {saved['model']}, not {state.model}; "
                              "use another --output-dir to start a new run")
        if saved["fine_names"] != state.fine_names:
            raise ResumeError(f"--resume: {last} has {len(saved['fine_names'])} classes that differ from this "
                              f"dataset's {len(state.fine_names)}; use another --output-dir")
        accelerator.load_state(str(last))
        state.load_json(saved)
        return last

