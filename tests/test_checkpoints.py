"""Damage after the write and failures during it: checkpoints verified against their manifest on --resume (a
damaged newest one falls back to the previous), the best weights of the epoch actually resumed, writes that
fail partway (monkeypatched, and a real full tmpfs where the machine allows a mount), and damaged model
folders refused in one line by every loader."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cifar_tl import cli
from cifar_tl.checkpoints import Checkpoints, ResumeError, TrainState
from cifar_tl.config import parse_args
from cifar_tl.engine import train
from cifar_tl.files import WriteError, write_failure
from cifar_tl.integrity import manifest, safetensors_problem, sha256_json
from cifar_tl.loading import ModelLoadError, load_predictor
from cifar_tl.model_folder import load_model, write_model_folder
from cifar_tl.optim import EarlyStopping

ROOT = Path(__file__).resolve().parents[1]

CNN = ["--model", "baseline_cnn_bn_small", "--no-pretrained", "--batch-size", "32", "--eval-batch-size", "64",
       "--lr", "3e-3", "--early-stopping-patience", "0", "--mixed-precision", "no", "--max-train-samples", "100"]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def remove(path: Path) -> None:
    path.unlink()


# --------------------------------------------------------------------------------------------- Checkpoints alone


class Tiny:
    """A prepared model, optimiser and registered schedule, trained a step per epoch and checkpointed as the
    engine does; `weights[epoch]` is what the model held when that epoch's checkpoint was written."""

    def __init__(self, root: Path, keep: int = 2):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        getattr(AcceleratorState, "_reset_state", lambda: None)()
        self.accelerator = Accelerator(cpu=True, mixed_precision="no")
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 3)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 0.5 ** step)
        self.checkpoints = Checkpoints(root, keep, {"schedule": self.scheduler})
        self.state = self.new_state()
        self.weights: dict[int, dict] = {}

    @staticmethod
    def new_state() -> TrainState:
        return TrainState("tiny", ["a", "b", "c"], EarlyStopping(0))

    def train(self, val_losses: list[float]) -> None:
        for loss in val_losses:
            epoch = self.state.epoch + 1
            self.model(torch.randn(4, 8)).square().mean().backward()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
            improved = self.state.early.update(epoch, loss)
            self.state.epoch = epoch
            self.checkpoints.save(self.accelerator, self.state, best=self.model if improved else None)
            self.weights[epoch] = {k: v.clone() for k, v in self.model.state_dict().items()}

    def resume(self) -> Path | None:
        with torch.no_grad():
            for p in self.model.parameters():
                p.zero_()
        self.state = self.new_state()
        return self.checkpoints.resume(self.accelerator, self.state)

    def folder(self, epoch: int) -> Path:
        return self.checkpoints.root / f"epoch-{epoch:04d}"


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("name", "damage", "says"), [
    ("model.safetensors", truncate, "model.safetensors is truncated"),
    ("optimizer.bin", truncate, "optimizer.bin is truncated"),
    ("model.safetensors", flip_byte, "model.safetensors is altered"),
    ("random_states_0.pkl", remove, "random_states_0.pkl is missing"),
    ("trainer_state.json", flip_byte, "trainer_state.json is"),
    ("trainer_state.json", lambda path: shutil.rmtree(path.parent), "its folder is missing"),  # the pointer's
])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys, name, damage, says):
    run = Tiny(tmp_path)
    run.train([3.0, 2.0, 1.0])
    assert [p.name for p in run.checkpoints.folders()] == ["epoch-0003", "epoch-0002"]  # keep 2
    damage(run.folder(3) / name)
    assert run.resume() == run.folder(2)
    assert run.state.epoch == 2 and run.state.early.best_epoch == 2 and run.state.early.best_loss == 2.0
    assert same(run.model.state_dict(), run.weights[2])
    assert run.scheduler.last_epoch == 2  # the schedule of epoch 2, not 3
    line = [x for x in capsys.readouterr().out.splitlines() if "damaged" in x]
    assert len(line) == 1 and "epoch-0003 is damaged" in line[0] and says in line[0], line


def test_best_weights_are_those_of_the_epoch_resumed(tmp_path):
    """best.safetensors at the top belongs to epoch 3 here; resuming epoch 2 must bring back epoch 2's best
    (the epoch itself, or an earlier one when it did not improve)."""
    run = Tiny(tmp_path / "improving", keep=3)
    run.train([3.0, 2.0, 1.0])
    assert same(load_file(str(run.checkpoints.best)), run.weights[3])
    truncate(run.folder(3) / "optimizer.bin")
    run.resume()
    assert same(load_file(str(run.checkpoints.best)), run.weights[2])

    run = Tiny(tmp_path / "stalled", keep=3)
    run.train([1.0, 2.0, 3.0, 0.5])  # epoch 1 is the best until epoch 4
    truncate(run.folder(4) / "model.safetensors")
    run.resume()
    assert run.state.epoch == 3 and run.state.early.best_epoch == 1 and run.state.early.bad_epochs == 2
    assert same(load_file(str(run.checkpoints.best)), run.weights[1])
    run.train([0.9])  # epoch 4 again: it improves, its folder replaces the damaged one
    assert [p.name for p in run.checkpoints.folders()] == ["epoch-0004", "epoch-0003", "epoch-0002"]
    assert run.checkpoints.verify(run.folder(4))[1] == []


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path):
    run = Tiny(tmp_path)
    run.train([3.0, 2.0])
    truncate(run.folder(2) / "model.safetensors")
    remove(run.folder(1) / "optimizer.bin")
    with pytest.raises(ResumeError) as err:
        run.resume()
    message = str(err.value)
    assert "\n" not in message and f"no usable checkpoint in {run.checkpoints.root}" in message
    assert "epoch-0002: model.safetensors is truncated" in message and "epoch-0001: optimizer.bin is missing" in message


def vouch_for(folder: Path) -> None:
    """Rewrite the folder's manifest and checksum to match the files as they are now."""
    saved = json.loads((folder / "trainer_state.json").read_text())
    del saved["checksum"]
    saved["files"] = manifest(folder, skip=("trainer_state.json",))
    (folder / "trainer_state.json").write_text(json.dumps({**saved, "checksum": sha256_json(saved)}))


class _RunsCode:
    """Unpickling it runs code (here: creates a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_replaced_state_file_is_refused_not_run(tmp_path):
    """The manifest catches damage, not a file replaced together with its manifest: the schedule's state (a
    pickle) must be read as data (weights_only), so a replaced one is refused in one line and runs nothing."""
    run = Tiny(tmp_path / "run")
    run.train([3.0, 2.0])
    folder, marker = run.folder(2), tmp_path / "ran"
    torch.save({"lr_lambdas": [None], "payload": _RunsCode(marker)}, folder / "schedule.pt")
    vouch_for(folder)
    assert run.checkpoints.verify(folder)[1] == []  # the manifest vouches for it
    with pytest.raises(ResumeError) as err:
        run.resume()
    assert not marker.exists()
    assert f"{folder} cannot be loaded into this run (UnpicklingError" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_checkpoint_of_the_pickling_format_is_refused_in_one_line(tmp_path):
    run = Tiny(tmp_path / "run")
    run.train([3.0])
    (run.folder(1) / "schedule.pt").rename(run.folder(1) / "custom_checkpoint_0.pkl")  # as Accelerate named it
    vouch_for(run.folder(1))
    with pytest.raises(ResumeError, match="written by an older cifar-tl, whose schedule state this version does "
                                          "not unpickle"):
        run.resume()


def failing_writer(fail_on: str):
    """Accelerate's file writer, except that `fail_on` gets a first part of its bytes and then a full disk."""
    import accelerate.checkpointing

    real = accelerate.checkpointing.save

    def save(obj, f, *args, **kwargs):
        if Path(f).name == fail_on:
            Path(f).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real(obj, f, *args, **kwargs)

    return save


def test_a_write_failing_partway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import accelerate.checkpointing

    run = Tiny(tmp_path)
    run.train([3.0, 2.0])
    before = {p.name: p.read_bytes() for p in run.folder(2).iterdir()}
    monkeypatch.setattr(accelerate.checkpointing, "save", failing_writer("optimizer.bin"))
    with pytest.raises(WriteError) as err:
        run.train([1.0])
    assert str(err.value) == (f"cannot write {run.folder(3)}/optimizer.bin: No space left on device; "
                              f"{run.folder(2)} is intact: make room (or fix the permission) and rerun with --resume")
    assert sorted(p.name for p in run.checkpoints.root.iterdir()) == ["best.safetensors", "epoch-0001",
                                                                       "epoch-0002", "latest"]  # no partial folder
    assert run.checkpoints.latest() == run.folder(2)
    assert {p.name: p.read_bytes() for p in run.folder(2).iterdir()} == before
    monkeypatch.undo()
    assert run.resume() == run.folder(2) and same(run.model.state_dict(), run.weights[2])
    assert same(load_file(str(run.checkpoints.best)), run.weights[2])
    run.train([1.0])
    assert run.checkpoints.latest() == run.folder(3)


def test_write_errors_name_the_reason():
    from safetensors import SafetensorError

    assert str(write_failure("/x/m.safetensors", SafetensorError("I/O error: No space left on device (os error 28)"))
               ) == "cannot write /x/m.safetensors: No space left on device"
    assert str(write_failure("/x", PermissionError(errno.EACCES, "denied", "/x/y"))) == \
        "cannot write /x/y: Permission denied"
    assert str(write_failure("/x", OSError(errno.EDQUOT, "quota"))) == f"cannot write /x: {os.strerror(errno.EDQUOT)}"


# --------------------------------------------------------------------------------------------- the engine


def run_args(dataset, out, *extra) -> list[str]:
    return ["--dataset", str(dataset), "--output-dir", str(out), *CNN, *extra]


def history_epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_epochs(easy10_parquet, tmp_path_factory) -> Path:
    """A finished 2-epoch run (checkpoints epoch-0001 and epoch-0002), copied by each test that damages it."""
    out = tmp_path_factory.mktemp("two_epochs") / "run"
    train(parse_args(run_args(easy10_parquet, out, "--epochs", "2")))
    return out


def test_resume_after_truncated_weights_continues_from_the_previous_epoch(two_epochs, easy10_parquet, tmp_path,
                                                                          capsys):
    out = shutil.copytree(two_epochs, tmp_path / "run")
    truncate(out / "checkpoints" / "epoch-0002" / "model.safetensors")
    first = json.loads((out / "history.jsonl").read_text().splitlines()[0])
    (out / "history.jsonl").write_bytes(os.urandom(300))  # damaged too: the checkpoint keeps its own record
    metrics = train(parse_args(run_args(easy10_parquet, out, "--epochs", "3", "--resume")))
    assert json.loads((out / "history.jsonl").read_text().splitlines()[0]) == first
    printed = capsys.readouterr().out
    assert "epoch-0002 is damaged (model.safetensors is truncated" in printed
    assert "resumed from" in printed and "epoch-0001 (epoch 1" in printed
    assert history_epochs(out) == [1, 2, 3] and metrics["epochs_run"] == 3  # epoch 2 retrained, not kept twice
    checkpoints = Checkpoints(out / "checkpoints")
    assert [p.name for p in checkpoints.folders()] == ["epoch-0003", "epoch-0002"]
    assert all(checkpoints.verify(p)[1] == [] for p in checkpoints.folders())


def test_resume_with_every_checkpoint_damaged_exits_2_in_one_line(two_epochs, easy10_parquet, tmp_path, capsys):
    out = shutil.copytree(two_epochs, tmp_path / "run")
    flip_byte(out / "checkpoints" / "epoch-0002" / "optimizer.bin")
    remove(out / "checkpoints" / "epoch-0001" / "model.safetensors")
    assert cli.main(run_args(easy10_parquet, out, "--epochs", "3", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: --resume: no usable checkpoint in {out / 'checkpoints'} (epoch-0002: "
                              "optimizer.bin is altered"), err
    assert "epoch-0001: model.safetensors is missing" in err[-1] and "Traceback" not in "\n".join(err)
    assert err[-1].endswith("start the run again with --overwrite-output-dir, or choose another --output-dir")


def test_a_run_cut_short_before_its_first_checkpoint_resumes_from_scratch(tmp_path):
    """Epoch 1's history line is written just before its checkpoint: a kill between the two leaves a history
    line and no checkpoint, and the --resume the interrupted run advised starts the run (nothing to continue).
    A folder whose checkpoints are of the other kind (a --linear-probe run), or a finished run, is refused."""
    from cifar_tl.checkpoints import resumable

    out = tmp_path / "run"
    out.mkdir()
    (out / "history.jsonl").write_text(json.dumps({"epoch": 1, "val_loss": 1.0}) + "\n")
    assert resumable(out, probe=False) is None and resumable(out, probe=True) is None
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "probe-prev.pt").write_bytes(b"x")
    assert resumable(out, probe=True) is None
    assert "no full-training checkpoint to continue" in resumable(out, probe=False)
    (out / "checkpoints" / "probe-prev.pt").unlink()
    (out / "metrics.json").write_text("{}")
    assert "no full-training checkpoint to continue" in resumable(out, probe=False)


def test_failed_checkpoint_write_stops_in_one_line_and_resume_continues(two_epochs, easy10_parquet, tmp_path,
                                                                         capsys, monkeypatch):
    import accelerate.checkpointing

    out = shutil.copytree(two_epochs, tmp_path / "run")
    monkeypatch.setattr(accelerate.checkpointing, "save", failing_writer("model.safetensors"))
    assert cli.main(run_args(easy10_parquet, out, "--epochs", "3", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: cannot write {out}/checkpoints/epoch-0003/model.safetensors: No space left on device; "
                   f"{out}/checkpoints/epoch-0002 is intact: make room (or fix the permission) and rerun with --resume")
    assert (out / "checkpoints" / "latest").read_text() == "epoch-0002"
    assert not list((out / "checkpoints").glob(".*"))
    monkeypatch.undo()
    metrics = train(parse_args(run_args(easy10_parquet, out, "--epochs", "3", "--resume")))
    assert history_epochs(out) == [1, 2, 3] and metrics["epochs_run"] == 3


def test_export_refuses_a_damaged_checkpoint(two_epochs, tmp_path, capsys):
    from cifar_tl import export

    out = shutil.copytree(two_epochs, tmp_path / "run")
    truncate(out / "checkpoints" / "epoch-0002" / "model.safetensors")
    assert export.main(["--checkpoint", str(out / "checkpoints" / "epoch-0002"), "--output-dir",
                        str(tmp_path / "exported")]) == 2
    assert "epoch-0002: model.safetensors is truncated" in capsys.readouterr().err
    assert export.main(["--checkpoint", str(out / "checkpoints" / "epoch-0001"), "--output-dir",
                        str(tmp_path / "exported")]) == 0
    load_model(tmp_path / "exported")


def _mount_tmpfs(folder: Path, size: int) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=False,
                          capture_output=True).returncode == 0


def test_real_full_disk_during_a_checkpoint(two_epochs, easy10_parquet, tmp_path):
    """The run's folder on a tmpfs with room for what it holds plus a little: epoch 3's checkpoint does not fit.
    Needs root and mount (skipped elsewhere; the monkeypatched tests above always run)."""
    used = sum(p.stat().st_size for p in two_epochs.rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _mount_tmpfs(disk, used + 1_500_000):
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = shutil.copytree(two_epochs, disk / "run")
        with pytest.raises(WriteError, match=f"cannot write {out}/checkpoints/epoch-0003.*No space left on device"):
            train(parse_args(run_args(easy10_parquet, out, "--epochs", "3", "--resume")))
        assert (out / "checkpoints" / "latest").read_text() == "epoch-0002"
        assert not list((out / "checkpoints").glob(".*"))
        subprocess.run(["mount", "-o", f"remount,size={used * 3}", str(disk)], check=True)  # space freed
        assert train(parse_args(run_args(easy10_parquet, out, "--epochs", "3", "--resume")))["epochs_run"] == 3
        assert history_epochs(out) == [1, 2, 3]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# --------------------------------------------------------------------------------------------- model folders


@pytest.fixture
def model_copy(cnn_model_dir, tmp_path) -> Path:
    return shutil.copytree(cnn_model_dir, tmp_path / "model")


@pytest.mark.parametrize(("damage", "says"), [(truncate, "model.safetensors is truncated"),
                                              (flip_byte, "model.safetensors is altered")])
def test_damaged_model_folder_is_one_line_for_every_loader(model_copy, tmp_path, capsys, damage, says,
                                                           easy10_parquet):
    from cifar_tl import evaluate, predict

    damage(model_copy / "model.safetensors")
    with pytest.raises(ModelLoadError, match=f"--model {model_copy}: {model_copy}: {says}"):
        load_predictor(model_copy)
    image = tmp_path / "x.png"
    from PIL import Image
    Image.new("RGB", (32, 32)).save(image)
    assert predict.main(["--model", str(model_copy), str(image), "--no-progress"]) == 2
    assert evaluate.main(["--model", str(model_copy), "--dataset", str(easy10_parquet),
                          "--output-dir", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 2 and all(says in x for x in lines) and "Traceback" not in err


def test_demo_refuses_a_damaged_model_in_one_line(model_copy, capsys):
    from cifar_tl import demo

    truncate(model_copy / "model.safetensors")
    assert demo.main(["--model", str(model_copy)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --model {model_copy}: {model_copy}: model.safetensors is "
                                              "truncated")


def test_folder_without_checksum_is_checked_by_its_header(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    del config["cifar_tl"]["files"]  # as written before checksums were recorded
    (model_copy / "config.json").write_text(json.dumps(config))
    load_model(model_copy)
    flip_byte(model_copy / "model.safetensors")  # undetectable without a checksum: loads
    truncate(model_copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors is truncated \(\d+"):
        load_model(model_copy)
    (model_copy / "short.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{}")
    assert safetensors_problem(model_copy / "short.safetensors") == "short.safetensors is truncated (10 bytes, not " \
        "even its header)"


def test_model_folder_write_failing_partway_leaves_the_old_folder(model_copy, monkeypatch):
    from cifar_tl import model_folder

    model, config = load_model(model_copy)
    before = {p.relative_to(model_copy): p.read_bytes() for p in model_copy.rglob("*") if p.is_file()}

    def full_disk(state, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(model_folder, "save_file", full_disk)
    with torch.no_grad():
        model.get_classifier().weight.mul_(2)
    with pytest.raises(WriteError, match=f"cannot write {model_copy}/model.safetensors: No space left on device; "
                                         f"{model_copy} is unchanged"):
        write_model_folder(model_copy, model, config)
    assert {p.relative_to(model_copy): p.read_bytes() for p in model_copy.rglob("*") if p.is_file()} == before
    assert [p.name for p in model_copy.parent.iterdir()] == ["model"]  # no partial sibling left
    monkeypatch.undo()
    write_model_folder(model_copy, model, config)  # re-export records the new weights' checksum
    reloaded, saved = load_model(model_copy)
    assert torch.equal(reloaded.get_classifier().weight, model.get_classifier().weight)
    assert saved["cifar_tl"]["files"]["model.safetensors"]["sha256"] != config["cifar_tl"]["files"][
        "model.safetensors"]["sha256"]


def test_a_full_cache_disk_costs_speed_not_the_run(easy10_parquet, tmp_path, monkeypatch, caplog, capsys):
    """The decoded-image store and the probe's cached features are caches, not outputs: when the cache disk is
    full the run says so and goes on with them in memory, leaving no partial file behind."""
    from cifar_tl import data as data_mod
    from cifar_tl import probe

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(data_mod, "save_file", full_disk)
    monkeypatch.setattr(probe, "save_file", full_disk)
    monkeypatch.setenv("CIFAR_TL_CACHE", str(tmp_path / "cache"))  # nothing cached yet: not by earlier probe tests
    dataset = shutil.copytree(easy10_parquet, tmp_path / "data")
    metrics = train(parse_args(["--dataset", str(dataset), "--output-dir", str(tmp_path / "run"), "--model",
                                "test_efficientnet", "--no-pretrained", "--linear-probe", "--image-size", "32",
                                "--epochs", "2", "--batch-size", "64"]))
    assert metrics["epochs_run"] == 2 and (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert "No space left on device; the decoded images stay in memory" in caplog.text
    assert "No space left on device; the features are not cached" in capsys.readouterr().out
    cache = data_mod.cache_dir()
    assert not [p for p in (cache / "stores").glob(".*tmp*")] and not [p for p in cache.rglob("*.tmp*")]


# --------------------------------------------------------------------------------------------- a run's folder


def test_a_new_run_in_a_folder_holding_one_is_refused_before_the_data(two_epochs, easy10_parquet, tmp_path, capsys,
                                                                       monkeypatch):
    from cifar_tl import engine

    out = shutil.copytree(two_epochs, tmp_path / "run")
    before = (out / "history.jsonl").read_text()
    monkeypatch.setattr(engine, "load_data", lambda *a: pytest.fail("the data was read"))
    assert cli.main(run_args(easy10_parquet, out, "--epochs", "2")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --output-dir {out} holds a run (checkpoints up to epoch-0002): continue it with --resume, start "
        "it again with --overwrite-output-dir, or choose another --output-dir")
    assert (out / "history.jsonl").read_text() == before and (out / "checkpoints" / "epoch-0002").is_dir()
    blocker = out / "history.jsonl"
    assert cli.main(run_args(easy10_parquet, blocker / "sub", "--epochs", "1")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --output-dir {blocker / 'sub'}: {blocker} is a file, not a folder")
    monkeypatch.undo()
    one = tmp_path / "one" / "cat"  # a dataset of one class: refused before training, no folder left behind
    one.mkdir(parents=True)
    for i in range(20):
        Image.new("RGB", (32, 32), (i, 0, 0)).save(one / f"{i}.png")
    assert cli.main(run_args(one.parent, tmp_path / "one_run", "--epochs", "1")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --dataset {one.parent}: one class ('cat'); a classifier needs at least two")
    assert not (tmp_path / "one_run").exists()
    metrics = train(parse_args(run_args(easy10_parquet, out, "--epochs", "1", "--overwrite-output-dir")))
    assert metrics["epochs_run"] == 1 and history_epochs(out) == [1]
    assert [p.name for p in Checkpoints(out / "checkpoints").folders()] == ["epoch-0001"]  # the old run's are gone
    assert "overwrite_output_dir" not in (out / "config.yaml").read_text()


def test_resume_keeps_a_stopped_run_stopped(two_epochs, easy10_parquet, tmp_path, capsys):
    """Early stopping (or the time limit) ended the run at epoch 2 and something failed after it: --resume
    finishes its evaluation and export, it does not train on."""
    out = shutil.copytree(two_epochs, tmp_path / "run")
    state = out / "checkpoints" / "epoch-0002" / "trainer_state.json"
    saved = json.loads(state.read_text())
    saved["stopped"] = "early stopping: no val-loss improvement for 1 epochs"
    state.write_text(json.dumps(saved))
    vouch_for(state.parent)
    metrics = train(parse_args(run_args(easy10_parquet, out, "--epochs", "4", "--resume")))
    assert "the run had stopped at epoch 2 (early stopping" in capsys.readouterr().out
    assert history_epochs(out) == [1, 2] and metrics["epochs_run"] == 2
    assert metrics["stopped"].startswith("early stopping")


def test_resume_with_another_recipe_is_refused_and_records_nothing(two_epochs, easy10_parquet, tmp_path, capsys):
    out = shutil.copytree(two_epochs, tmp_path / "run")
    config = (out / "config.yaml").read_text()
    assert cli.main(run_args(easy10_parquet, out, "--epochs", "3", "--resume", "--lr", "0.5")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --resume: {out / 'checkpoints' / 'epoch-0002'} was trained with --lr 0.003, not "
                          "0.5; resume with the run's own settings"), err
    assert (out / "config.yaml").read_text() == config and history_epochs(out) == [1, 2]


def test_resume_never_starts_a_finished_run_over(two_epochs, easy10_parquet, tmp_path, capsys):
    """`--resume --linear-probe` on a full-training run (or the reverse) found no checkpoint of its kind, said
    "starting from scratch" and replaced the run's history, metrics and model; `--resume --epochs 1` on a
    2-epoch run rewrote config.yaml to a recipe the run did not have."""
    out = shutil.copytree(two_epochs, tmp_path / "run")
    before = {name: (out / name).read_bytes() for name in ("config.yaml", "history.jsonl", "metrics.json")}
    assert cli.main(run_args(easy10_parquet, out, "--epochs", "2", "--resume", "--linear-probe")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --resume: {out} holds a run (checkpoints up to epoch-0002) but no "
                          "--linear-probe checkpoint to continue"), err
    assert cli.main(run_args(easy10_parquet, out, "--epochs", "1", "--resume")) == 2
    assert "--epochs may only grow (leave it at 2 or more)" in capsys.readouterr().err
    assert before == {name: (out / name).read_bytes() for name in before}
    empty = tmp_path / "crashed-in-epoch-1"  # no results yet: a resume starts it, as a crash before epoch 1 ends
    empty.mkdir()
    assert train(parse_args(run_args(easy10_parquet, empty, "--epochs", "1", "--resume")))["epochs_run"] == 1


def test_a_full_disk_at_the_final_outputs_says_the_training_is_kept(two_epochs, easy10_parquet, tmp_path, capsys,
                                                                     monkeypatch):
    """The disk fills while the results are written: one line that says the training is complete and how to get
    the results (--resume), which then writes them; a model folder's partial copy left by a killed writer (its
    process gone) is cleared by the next write."""
    from cifar_tl import engine

    out = shutil.copytree(two_epochs, tmp_path / "run")
    shutil.rmtree(out / "model")
    (out / "metrics.json").unlink()
    (out / ".model.partial999999999").mkdir()  # no such process

    def full(cfg, out, *args):
        raise WriteError(out / "metrics.json", os.strerror(errno.ENOSPC))

    monkeypatch.setattr(engine, "write_outputs", full)
    assert cli.main(run_args(easy10_parquet, out, "--epochs", "2", "--resume")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: cannot write {out / 'metrics.json'}: No space left on device; the training is complete and "
        "checkpointed: make room, then rerun with --resume to write the results")
    monkeypatch.undo()
    assert train(parse_args(run_args(easy10_parquet, out, "--epochs", "2", "--resume")))["epochs_run"] == 2
    assert (out / "metrics.json").is_file() and (out / "model" / "model.safetensors").is_file()
    assert not list(out.glob(".model.partial*"))


def test_resume_continues_the_wandb_run_with_every_epoch(easy10_parquet, tmp_path, monkeypatch):
    """A run killed with kill -9 and resumed became two unrelated W&B runs, and (offline) the first one's file was
    empty: epochs 1-4 were nowhere. The resumed run keeps the id and logs again what history.jsonl holds."""
    from wandb_offline import read_offline_run

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(parse_args(run_args(easy10_parquet, out, "--epochs", "1", "--report-to", "wandb")))
    train(parse_args(run_args(easy10_parquet, out, "--epochs", "2", "--report-to", "wandb", "--resume")))
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    first, resumed = (read_offline_run(r) for r in runs)
    assert first["run"]["id"] == resumed["run"]["id"] == (out / "wandb_run_id").read_text().strip()
    assert [row["train/epoch"] for row in resumed["history"] if "train/epoch" in row] == [1, 2]


def test_a_time_limited_checkpoint_records_the_budget_it_used(easy10_parquet, tmp_path):
    out = tmp_path / "run"
    train(parse_args(run_args(easy10_parquet, out, "--epochs", "1", "--time-limit-minutes", "30")))
    saved = json.loads((out / "checkpoints" / "epoch-0001" / "trainer_state.json").read_text())
    assert 0 < saved["budget_seconds"] < 300 and saved["recipe"]["time_limit_minutes"] == 30


def test_damaged_caches_are_rebuilt_not_used(cifar100_parquet, tmp_path, monkeypatch, caplog):
    """A flipped byte in the decoded-image store or in a cached ONNX export still loads: the store gave wrong
    labels and the ONNX graph wrong answers without a word. Each cache file is sealed with its sha256; a damaged
    one is decoded or exported again."""
    from conftest import build_model_dir

    from cifar_tl import data as data_mod
    from cifar_tl.loading import load_predictor

    monkeypatch.setenv("CIFAR_TL_CACHE", str(tmp_path / "cache"))
    fresh = data_mod.load_raw(str(cifar100_parquet))
    store = next((tmp_path / "cache" / "stores").glob("*.safetensors"))
    assert (store.parent / (store.name + ".sha256")).is_file()
    with open(store, "r+b") as f:  # the tail: the last split's labels
        f.seek(store.stat().st_size - 64)
        f.write(bytes(64))
    with caplog.at_level("WARNING"):
        again = data_mod.load_raw(str(cifar100_parquet))
    assert "ignoring damaged data cache" in caplog.text and "is altered or truncated" in caplog.text
    for name, split in fresh.splits.items():
        assert torch.equal(again.splits[name].fine, split.fine)
        assert torch.equal(again.splits[name].images, split.images)

    folder = build_model_dir("baseline_cnn_bn_small", tmp_path / "model")
    image = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    want = load_predictor(folder, backend="onnx").logits(image)
    graph = next((tmp_path / "cache" / "onnx").glob("*.onnx"))
    raw = bytearray(graph.read_bytes())
    raw[-5000:-1000] = bytes(4000)  # inside the weights: the file still loads
    graph.write_bytes(bytes(raw))
    caplog.clear()
    with caplog.at_level("WARNING"):
        got = load_predictor(folder, backend="onnx").logits(image)
    assert "exporting" in caplog.text and "is damaged" in caplog.text
    assert torch.allclose(got, want)


@pytest.mark.parametrize("damage", ["garbage", "folder"])
def test_a_damaged_pointer_neither_stops_resume_nor_later_saves(two_epochs, easy10_parquet, tmp_path, damage):
    """A flipped byte in `checkpoints/latest` ended resume in a UnicodeDecodeError; a folder in its place let the
    run train an epoch and then refused every save with "no earlier checkpoint"."""
    out = shutil.copytree(two_epochs, tmp_path / "run")
    pointer = out / "checkpoints" / "latest"
    pointer.unlink()
    if damage == "garbage":
        pointer.write_bytes(b"epoch-\xd2003")
    else:
        pointer.mkdir()
    metrics = train(parse_args(run_args(easy10_parquet, out, "--epochs", "3", "--resume")))
    assert history_epochs(out) == [1, 2, 3] and metrics["epochs_run"] == 3
    assert pointer.read_text() == "epoch-0003"


def test_damaged_history_and_plots_on_a_full_disk_are_one_line(tmp_path, monkeypatch):
    """history.jsonl with a torn line and non-UTF-8 bytes is read past them (resume, report, tracking); a plot
    the disk cannot hold is a WriteError naming it, with no torn PNG left."""
    from matplotlib.figure import Figure

    from cifar_tl import plots
    from cifar_tl.files import read_jsonl

    history = tmp_path / "history.jsonl"
    history.write_bytes(b'{"epoch": 1}\n\xff\xfe garbage\n{"epoch": 2}\n{"epoch": 3, "lo')
    assert read_jsonl(history) == [{"epoch": 1}, {"epoch": 2}]

    def full(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG torn")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(WriteError, match=r"cannot write .*plots/curves.png: No space left on device"):
        plots._save(Figure(), tmp_path / "plots" / "curves.png")
    assert not list((tmp_path / "plots").iterdir())


def test_predict_output_on_a_full_disk_keeps_the_earlier_file(cnn_model_dir, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from cifar_tl import predict

    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    output = tmp_path / "preds.jsonl"
    output.write_text("earlier\n")

    def full(results, out, fmt="jsonl"):
        out.write("half a line")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(predict, "_write", full)
    assert predict.main(["--model", str(cnn_model_dir), str(tmp_path / "a.png"), "--output", str(output),
                         "--backend", "torch", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (f"error: cannot write {output}: No space left on "
                                                                "device")
    assert output.read_text() == "earlier\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a.png",
                                                                                                "preds.jsonl"]


def test_sigterm_stops_like_ctrl_c(easy10_parquet, tmp_path):
    """A scheduler's or a container's stop (SIGTERM) ended the run without a word: now the Ctrl-C message and
    exit code, and --resume continues from the last finished epoch."""
    cmd = [sys.executable, str(ROOT / "train.py"), *run_args(easy10_parquet, tmp_path, "--epochs", "200")]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    pointer = tmp_path / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and not pointer.is_file():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted: rerun with --resume" in err and "Traceback" not in err
    done = int(pointer.read_text().split("-")[1])
    metrics = train(parse_args(run_args(easy10_parquet, tmp_path, "--epochs", str(done + 1), "--resume")))
    assert metrics["epochs_run"] == done + 1


@pytest.mark.parametrize("failure", [
    RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection reset by peer"),
    torch.distributed.DistBackendError("NCCL communicator was aborted"),
])
def test_a_lost_peer_process_is_one_line(easy10_parquet, tmp_path, capsys, monkeypatch, failure):
    """One process of a multi-process run killed: the survivors' collective calls fail deep in gloo or NCCL, and
    printed that traceback; now one line saying where to look and that --resume continues. Other runtime errors
    keep their traceback (they are bugs to report)."""
    from cifar_tl import engine

    def lost(cfg, started=None):
        raise failure

    monkeypatch.setattr(engine, "train", lost)
    assert cli.main(run_args(easy10_parquet, tmp_path, "--epochs", "1")) == 2
    assert capsys.readouterr().err.strip() == (
        "error: another process of this run stopped (its own output says why); the completed epochs' checkpoints "
        "are kept: rerun with --resume to continue")
    monkeypatch.setattr(engine, "train", lambda cfg, started=None: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(run_args(easy10_parquet, tmp_path, "--epochs", "1"))
