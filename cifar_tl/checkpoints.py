"""Resumable training state: the last `keep` epochs as `RUN/checkpoints/epoch-NNNN/` folders behind a `latest`
pointer, each able to carry the run on alone, and `checkpoints/best.safetensors`, the best epoch's weights.

An epoch folder holds Accelerate's full state (model.safetensors, optimizer.bin, random_states_N.pkl, ...), the
state of the run's other objects (`schedule.pt`, with --ema-decay `ema.pt`), its own copy of
best.safetensors as of that epoch and, written last, trainer_state.json: the epoch, the early-stopping state and
the manifest `files: {name: {size, sha256}}` of everything else, plus the `checksum` of its own content. Every
file is read back with torch.load(weights_only=True) or safetensors: a checkpoint is data, and the manifest only
catches damage, not a file someone replaced (with its manifest) to run code on --resume.

Saving: every process writes its part into `.epoch-NNNN.partial/`; the main process adds the rest, renames
the folder into place, replaces the pointer atomically and removes all but the newest `keep` folders. A
kill -9 at any moment leaves the earlier folders and the pointer as they were; a write that fails (disk full,
permission, quota) removes the partial folder and raises WriteError, one line naming the path and the reason.

Resuming walks the folders newest -> oldest and loads the first whose files match its manifest; each damaged
one is named in one line and skipped. The best weights and early-stopping state come from the loaded epoch,
so a fallback from epoch k to j forgets everything after j."""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from .files import (
    WRITE_ERRORS,
    WriteError,
    atomic_copy,
    atomic_write_text,
    relocated,
    write_failure,
)
from .integrity import manifest, manifest_problems, sha256_json
from .model_folder import save_weights
from .optim import EarlyStopping
from .processes import any_process

BEST = "best.safetensors"
STATE = "trainer_state.json"
PROBE_CHECKPOINTS = ("probe-last.pt", "probe-prev.pt")  # the cached-feature probe's, newest first
FOLDER = re.compile(r"epoch-(\d+)")


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
    stopped: str | None = None  # why training ended early (early stopping, the time limit): a resume keeps it
    data: dict = field(default_factory=dict)  # the data and how it was split: a resume must see the same
    recipe: dict = field(default_factory=dict)  # config.RESUME_KEEPS: a resume must train with the same
    budget_seconds: float = 0.0  # of --time-limit-minutes, used by the end of the epoch: a resume goes on from it
    history: list[dict] = field(default_factory=list)  # history.jsonl's records up to here: a resume rewrites it

    def to_json(self) -> dict:
        early = self.early
        return {"epoch": self.epoch, "best_val_loss": early.best_val_loss, "best_epoch": early.best_epoch,
                "bad_epochs": early.bad_epochs, "train_seconds": self.train_seconds,
                "images_seen": self.images_seen, "model": self.model, "fine_names": self.fine_names,
                "stopped": self.stopped, "data": self.data, "recipe": self.recipe,
                "budget_seconds": self.budget_seconds, "history": self.history}

    def load_json(self, saved: dict) -> None:
        self.early.load_state_dict({"best_loss": saved["best_val_loss"], "best_epoch": saved["best_epoch"],
                                    "bad_epochs": saved["bad_epochs"]})
        self.epoch, self.train_seconds = saved["epoch"], saved["train_seconds"]
        self.images_seen, self.stopped = saved["images_seen"], saved.get("stopped")
        self.budget_seconds = saved.get("budget_seconds", 0.0)
        self.history = saved.get("history", [])  # none in checkpoints written before it was kept here

    def summary(self) -> dict:
        """The run summary metrics.json carries."""
        return {"best_epoch": self.early.best_epoch, "epochs_run": self.epoch,
                "best_val_loss": self.early.best_val_loss, "train_seconds": self.train_seconds,
                "train_images_per_second": self.images_seen / max(self.train_seconds, 1e-9),
                "stopped": self.stopped or "completed all epochs"}


class Checkpoints:
    def __init__(self, root: Path, keep: int = 2, objects: Mapping[str, object] | None = None):
        """`objects`: what else each checkpoint carries, as `NAME.pt`, by their `state_dict` / `load_state_dict`
        (the LR schedule, the EMA). Not Accelerate's register_for_checkpointing: it unpickles them with
        weights_only=False."""
        self.root, self.keep, self.objects = root, keep, dict(objects or {})
        self.pointer = root / "latest"
        self.best = root / BEST

    def folders(self) -> list[Path]:
        """The epoch folders, newest first."""
        found = [p for p in self.root.glob("epoch-*") if p.is_dir() and FOLDER.fullmatch(p.name)]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)

    def latest(self) -> Path | None:
        """The folder the pointer names (the newest one saved), if it is there."""
        named = self._named()
        return self.root / named if FOLDER.fullmatch(named) and (self.root / named / STATE).is_file() else None

    def _named(self) -> str:
        """What the pointer says ("" when it is missing, not a file or unreadable: damage falls back)."""
        try:
            return self.pointer.read_bytes().decode("utf-8", "replace").strip()
        except OSError:
            return ""

    # ------------------------------------------------------------------------------------------ saving

    def save(self, accelerator: Accelerator, state: TrainState, best: torch.nn.Module | dict | None = None,
             first: Callable[[], None] | None = None) -> Path:
        """Write epoch `state.epoch`'s folder (and `best`'s weights as best.safetensors when the epoch improved;
        `first` is the main process's own write before that) and publish it. Every process must call it: two
        small collectives make them agree on a failure, so none waits forever for one that stopped."""
        final = self.root / f"epoch-{state.epoch:04d}"
        partial = self.root / f".{final.name}.partial"
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
        accelerator.wait_for_everyone()
        error = _attempt(lambda: self._write(accelerator, partial, best, first), partial, self._size_hint())
        if not any_process(accelerator, error is not None) and accelerator.is_main_process:
            error = _attempt(lambda: self._publish(partial, final, state), partial)
        if any_process(accelerator, error is not None):
            if accelerator.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            last = self.latest()
            advice = (f"{last} is intact" if last else "no earlier checkpoint") + (
                ": make room (or fix the permission) and rerun with --resume")
            if error is None:
                raise WriteError(final, "a write failed on another process (its message names it)", advice)
            raise relocated(error, partial, final, advice)
        return final

    def _write(self, accelerator: Accelerator, partial: Path, best: torch.nn.Module | dict | None,
               first: Callable[[], None] | None) -> None:
        if first is not None and accelerator.is_main_process:
            first()
        accelerator.save_state(str(partial))
        if accelerator.is_main_process:
            for name, obj in self.objects.items():
                torch.save(obj.state_dict(), partial / f"{name}.pt")
            if best is not None:
                save_weights(best, self.best)

    def _publish(self, partial: Path, final: Path, state: TrainState) -> None:
        """Main process: best weights, manifest and trainer_state.json into the complete partial folder, then
        rename, pointer, and pruning to the newest `keep`."""
        if self.best.is_file():  # a copy of its own: damage to one file never reaches two checkpoints
            shutil.copyfile(self.best, partial / BEST)
        saved = {**state.to_json(), "files": manifest(partial)}
        atomic_write_text(partial / STATE, json.dumps({**saved, "checksum": sha256_json(saved)}, indent=1))
        for stale in self.folders():  # damaged or abandoned folders of this epoch or later (after a fallback)
            if int(stale.name.split("-")[1]) >= state.epoch:
                shutil.rmtree(stale)
        partial.rename(final)
        if self.pointer.is_dir():  # damage: a folder in the pointer's place would fail every save
            shutil.rmtree(self.pointer)
        try:
            atomic_write_text(self.pointer, final.name)
        except WriteError:
            shutil.rmtree(final, ignore_errors=True)
            raise
        for old in [*self.folders()[self.keep:], *self.root.glob(".epoch-*.partial")]:
            shutil.rmtree(old, ignore_errors=True)

    def _size_hint(self) -> int:
        """Bytes the newest checkpoint takes: about what the next one needs."""
        newest = self.folders()[:1]
        return sum(p.stat().st_size for folder in newest for p in folder.rglob("*") if p.is_file())

    # ------------------------------------------------------------------------------------------ resuming

    def verify(self, folder: Path) -> tuple[dict | None, list[str]]:
        """trainer_state.json of `folder` and what is wrong with the folder (empty: nothing found). Folders
        written before manifests existed have nothing to check against."""
        path = folder / STATE
        if not path.is_file():
            return None, [f"{STATE} is missing"]
        try:
            saved = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            return None, [f"{STATE} is unreadable"]
        if not isinstance(saved, dict) or ("checksum" in saved and sha256_json(
                {k: v for k, v in saved.items() if k != "checksum"}) != saved["checksum"]):
            return None, [f"{STATE} is altered (its checksum does not match its content)"]
        return saved, manifest_problems(folder, saved.get("files") or {})

    def resume(self, accelerator: Accelerator, state: TrainState) -> Path | None:
        """Load the newest usable checkpoint into the prepared objects and `state`; None when there is none.
        The main process chooses, every process loads the same folder."""
        choice = [self._choose(state) if accelerator.is_main_process else None]
        name, saved, notes, error = broadcast_object_list(choice)[0]
        for note in notes:
            accelerator.print(note)
        if error:
            raise ResumeError(error)
        if name is None:
            return None
        folder = self.root / name
        try:
            accelerator.load_state(str(folder))
            for name, obj in self.objects.items():
                obj.load_state_dict(torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True))
        except Exception as err:  # verified files that still do not load: another optimiser, schedule, ...
            raise ResumeError(f"--resume: {folder} cannot be loaded into this run ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); use another --output-dir") from None
        if accelerator.is_main_process:
            self._restore_best(folder, saved)
        accelerator.wait_for_everyone()
        state.load_json(saved)
        return folder

    def _choose(self, state: TrainState) -> tuple[str | None, dict | None, list[str], str | None]:
        """(folder name, its trainer state, lines to print, error): the newest folder that verifies."""
        damaged, folders = [], self.folders()
        named = self._named()
        if FOLDER.fullmatch(named) and (not folders or int(named.split("-")[1]) > int(folders[0].name.split("-")[1])):
            damaged.append((self.root / named, "its folder is missing"))  # the newest, deleted
        for folder in folders:
            saved, problems = self.verify(folder)
            if problems:
                damaged.append((folder, "; ".join(problems)))
                continue
            notes = [f"--resume: {bad} is damaged ({why}); falling back to the previous checkpoint"
                     for bad, why in damaged]
            if "files" not in saved:
                notes.append(f"--resume: {folder} has no checksums (written by an older cifar-tl): not verified")
            return folder.name, saved, notes, mismatch(folder, saved, state)
        if not damaged:
            return None, None, [], None
        what = " | ".join(f"{folder.name}: {why}" for folder, why in damaged)
        return None, None, [], (f"--resume: no usable checkpoint in {self.root} ({what}); start the run again "
                                "with --overwrite-output-dir, or choose another --output-dir")

    def _restore_best(self, folder: Path, saved: dict) -> None:
        """The best weights as of the resumed epoch: a fallback must not keep those of a later, lost epoch."""
        if (folder / BEST).is_file():
            atomic_copy(folder / BEST, self.best)
        elif "files" in saved:  # no epoch had improved yet by then
            self.best.unlink(missing_ok=True)


def mismatch(folder: Path, saved: dict, state: TrainState) -> str | None:
    """Why this run may not continue `folder` (another model, class list, dataset or split), or None."""
    if saved["model"] != state.model:
        return (f"--resume: {folder} was trained with --model {saved['model']}, not {state.model}; "
                "use another --output-dir to start a new run")
    if any(folder.glob("custom_checkpoint_*.pkl")):  # before 2026-12-03: pickles only Accelerate would load
        return (f"--resume: {folder} was written by an older cifar-tl, whose schedule state this version does not "
                "unpickle (it could run code); finish that run with the version that started it, or use another "
                "--output-dir")
    if saved["fine_names"] != state.fine_names:
        return (f"--resume: {folder} has {len(saved['fine_names'])} classes that differ from this "
                f"dataset's {len(state.fine_names)}; use another --output-dir")
    changed = recipe_change(folder, saved.get("recipe") or {}, state.recipe, folder.parent.parent / "config.yaml")
    if changed:
        return changed
    for key, value in (saved.get("data") or {}).items():  # checkpoints written before it recorded none
        now = state.data.get(key)
        if key == "fingerprint" and now != value:
            return (f"--resume: {folder} was trained on other data (dataset fingerprint {value}, this run's "
                    f"{now}); use another --output-dir")
        if now != value:  # another split: validation, early stopping and the test would change mid-run
            flag = f"--{key.replace('_', '-')}"
            return (f"--resume: {folder} split its data with {flag} {value}, not {now}; resume with {flag} "
                    f"{value}, or use another --output-dir")
    return None


def recipe_change(checkpoint: Path, saved: dict, now: dict, config: Path) -> str | None:
    """Why a resume from `checkpoint` may not go on: the options of `config.RESUME_KEEPS` that differ from the
    ones it was trained with (`saved`; keys a checkpoint predates are not compared), or None."""
    changed = [(key, value, now[key]) for key, value in saved.items() if key in now and now[key] != value]
    if not changed:
        return None
    flags = ", ".join(f"--{key.replace('_', '-')} {value}, not {new}" for key, value, new in changed)
    return (f"--resume: {checkpoint} was trained with {flags}; resume with the run's own settings (python train.py "
            f"--config {config} --resume), or use another --output-dir")


def epochs_shrink(checkpoint: Path, trained: int, epochs: int) -> str | None:
    """Why `--resume --epochs epochs` may not go on from a checkpoint of `trained` epochs (the count may only
    grow: config.yaml would describe fewer epochs than the run has), or None."""
    if trained <= epochs:
        return None
    return (f"--resume --epochs {epochs}: {checkpoint} has trained {trained} epochs already; --epochs may only "
            f"grow (leave it at {trained} or more)")


def resumable(out: Path, probe: bool) -> str | None:
    """Why `--resume` cannot continue the run in `out`, or None: it holds results (a finished run, or
    checkpoints) but no checkpoint of this kind of run (a --linear-probe run keeps checkpoints/probe-*.pt, full
    training checkpoints/epoch-N/). A run cut short before its first checkpoint holds no results and starts
    over."""
    probe_found = any((out / "checkpoints" / name).is_file() for name in PROBE_CHECKPOINTS)
    full_found = bool(Checkpoints(out / "checkpoints").folders())
    this_kind, other_kind = (probe_found, full_found) if probe else (full_found, probe_found)
    # history.jsonl alone is no result: its line for epoch 1 is written just before that epoch's checkpoint
    if this_kind or not (other_kind or (out / "metrics.json").is_file()):
        return None
    kind = "--linear-probe" if probe else "full-training"
    return (f"--resume: {out} holds a run ({existing_run(out)}) but no {kind} checkpoint to continue (was it "
            f"trained {'without' if probe else 'with'} --linear-probe?); resume it with its own settings (python "
            f"train.py --config {out / 'config.yaml'} --resume), start it again with --overwrite-output-dir, or choose "
            "another --output-dir")


def existing_run(out: Path) -> str | None:
    """What of a run `out` holds (its checkpoints, its results), or None: a new run there would overwrite it."""
    folders = Checkpoints(out / "checkpoints").folders()
    if folders:
        return f"checkpoints up to {folders[0].name}"
    found = [name for name in (*(f"checkpoints/{n}" for n in PROBE_CHECKPOINTS), "metrics.json", "history.jsonl")
             if (out / name).is_file()]
    return ", ".join(found) or None


def _attempt(write, path: Path, needed: int = 0) -> WriteError | None:
    """Run `write`; its write error (torch.save reports a full disk as a RuntimeError) as a WriteError."""
    try:
        write()
    except WriteError as err:
        return err
    except (*WRITE_ERRORS, RuntimeError) as err:
        return write_failure(path, err, needed)
    return None
