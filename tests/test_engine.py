"""The training engine end to end on small fixtures: outputs, learning, resume (also after kill -9),
early stopping, transfer modes, divergence, and a real 2-process (gloo) run."""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from cifar_tl import engine, probe, processes
from cifar_tl.checkpoints import ResumeError
from cifar_tl.config import ConfigError, parse_args
from cifar_tl.engine import TrainingError, train
from cifar_tl.inference import Predictor
from cifar_tl.integrity import seal

ROOT = Path(__file__).resolve().parents[1]
CNN = ["--model", "baseline_cnn_bn", "--no-pretrained", "--batch-size", "32", "--eval-batch-size", "64",
       "--lr", "3e-3", "--early-stopping-patience", "0"]


def run(dataset, out, *extra):
    return train(parse_args(["--dataset", str(dataset), "--output-dir", str(out), *CNN, *extra]))


def history(out):
    return [json.loads(line) for line in (Path(out) / "history.jsonl").read_text().splitlines()]


def test_time_budget_counts_from_the_process_start(easy10_parquet, tmp_path):
    """train.py hands its process start to the engine, so the imports before the run count against
    --time-limit-minutes: a run whose process began a minute ago has no time left for a second epoch."""
    from cifar_tl.cli import main

    assert main(["--dataset", str(easy10_parquet), "--output-dir", str(tmp_path), *CNN, "--epochs", "3",
                 "--time-limit-minutes", "0.5"], started=time.time() - 60) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and metrics["stopped"] == "time limit 0.5 min"


def test_a_spent_budget_still_ends_on_a_whole_optimiser_step(easy10_parquet, tmp_path):
    """A budget spent during an accumulation stopped the run after one micro-batch of the four a step needs: no
    optimiser step, a chance-level model reported as trained. It now stops at the step's end."""
    from cifar_tl.cli import main

    assert main(["--dataset", str(easy10_parquet), "--output-dir", str(tmp_path), *CNN, "--batch-size", "32",
                 "--grad-accum-steps", "4", "--epochs", "3", "--time-limit-minutes", "0.5"],
                started=time.time() - 60) == 0
    assert [h["train_images"] for h in history(tmp_path)] == [4 * 32]  # one whole step (it was 32)


def test_time_budget_foresees_the_test_pass_before_the_first_epoch(easy10_parquet, tmp_path, monkeypatch):
    """A validation pass before epoch 1 foretells the final passes, so a budget they fill stops training at once
    instead of after a whole first epoch (a 1.5-minute cpu_fast_cnn run had taken 138 s)."""
    from cifar_tl.optim import Budget

    foresee = Budget.foresee_final_passes
    monkeypatch.setattr(Budget, "foresee_final_passes",  # every pass foretells 55 s: more than the budget leaves
                        lambda self, *args: (foresee(self, *args), setattr(self, "final_passes_seconds", 55.0)))
    metrics = run(easy10_parquet, tmp_path, "--epochs", "3", "--val-fraction", "0.2", "--time-limit-minutes", "1")
    assert metrics["epochs_run"] == 1 and metrics["stopped"] == "time limit 1.0 min"
    seen = metrics["train_images_per_second"] * metrics["train_seconds"]
    assert seen == pytest.approx(32)  # one step of 32 images, not the epoch's 128
    probe = train(parse_args(["--dataset", str(easy10_parquet), "--output-dir", str(tmp_path / "probe"), "--model",
                              "test_efficientnet", "--no-pretrained", "--linear-probe", "--probe-stages", "1",
                              "--image-size", "32", "--batch-size", "32", "--epochs", "3", "--val-fraction", "0.2",
                              "--time-limit-minutes", "1"]))
    assert probe["epochs_run"] == 1 and history(tmp_path / "probe")[0]["train_images"] == 32  # the probe alike
    assert probe["stopped"] == "time limit 1.0 min"


def test_time_budget_keeps_room_for_the_test_pass_without_a_validation_split(easy10_parquet, tmp_path, monkeypatch):
    """With --val-fraction 0 there is no validation pass to time, so the budget kept no room for the test pass and
    a run ended past its limit by that pass: a pass over a few training images (4 eval batches) times it instead.
    The history holds no val figures (it held the training ones under val_ names), and the plot no val curve."""
    from cifar_tl.optim import Budget

    timed = []
    foresee = Budget.foresee_final_passes
    monkeypatch.setattr(Budget, "foresee_final_passes",  # every pass foretells 55 s: more than the budget leaves
                        lambda self, *args: (timed.append(args[1:]), foresee(self, *args),
                                             setattr(self, "final_passes_seconds", 55.0)))
    metrics = run(easy10_parquet, tmp_path, "--epochs", "3", "--val-fraction", "0", "--time-limit-minutes", "1")
    assert metrics["epochs_run"] == 1 and metrics["stopped"] == "time limit 1.0 min"
    assert metrics["train_images_per_second"] * metrics["train_seconds"] == pytest.approx(32)  # one step
    assert timed and all(images == (4 * 64, metrics["n"]) for images in timed)  # 4 x --eval-batch-size, the test
    (row,) = history(tmp_path)
    assert "val_loss" not in row and "val_top1" not in row and metrics["best_val_loss"] is None
    assert "no validation split" in (tmp_path / "report.md").read_text()
    timed.clear()  # the probe alike: 4 eval batches of training maps are timed, not the whole training split
    probe = train(parse_args(["--dataset", str(easy10_parquet), "--output-dir", str(tmp_path / "probe"), "--model",
                              "test_efficientnet", "--no-pretrained", "--linear-probe", "--probe-stages", "1",
                              "--image-size", "32", "--batch-size", "32", "--eval-batch-size", "16", "--epochs", "3",
                              "--val-fraction", "0", "--time-limit-minutes", "1"]))
    assert probe["epochs_run"] == 1 and timed and all(images == (4 * 16, probe["n"]) for images in timed)
    (row,) = history(tmp_path / "probe")
    assert row["train_images"] == 32 and "val_loss" not in row and probe["best_val_loss"] is None
    assert row["images_per_second"] == pytest.approx(32 / row["seconds"])  # the engine's history keys


def test_outputs_and_model_folder(cifar100_parquet, tmp_path):
    metrics = run(cifar100_parquet, tmp_path, "--epochs", "2", "--val-fraction", "0.25", "--tta")
    for key in ("top1", "top5", "coarse_top1", "best_epoch", "epochs_run", "train_seconds",
                "train_images_per_second", "loss", "ece", "n"):
        assert key in metrics, key
    assert metrics["epochs_run"] == 2 and metrics["n"] == 200 and "tta" in metrics
    assert metrics["mixed_precision"] in ("no", "bf16")  # auto on a CPU: bf16 only with native support
    assert json.loads((tmp_path / "metrics.json").read_text())["top1"] == metrics["top1"]
    rows = history(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "train_top1", "val_loss", "val_top1", "lr", "seconds", "images_per_second"} <= set(rows[0])
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["architecture"] == "baseline_cnn_bn" and len(config["label_names"]) == 100
    assert len(config["cifar_tl"]["coarse_names"]) == 20 and len(config["cifar_tl"]["fine_to_coarse"]) == 100
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    data = config["cifar_tl"]["data"]  # what the card describes: this fixture, not CIFAR-100
    assert (data["kind"], data["train"], data["val"], data["test"], data["source_sizes"]) == (
        "parquet", 300, 100, 200, {"train": 400, "test": 200})
    card = (tmp_path / "model" / "README.md").read_text()
    assert "300 training images, 100 validation images" in card and "uoft-cs/cifar100" not in card
    assert "| Parameters | 1,173,796: 1,172,004 trainable, 1,792 non-trainable" in card
    assert "Total params: 1,172,004" in (tmp_path / "model_summary.txt").read_text()
    assert (tmp_path / "checkpoints" / "best.safetensors").is_file()
    assert (tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text()).is_dir()
    pred = Predictor.from_dir(tmp_path / "model")
    assert pred.predict([torch.zeros(32, 32, 3, dtype=torch.uint8).numpy()])[0]["coarse"]["label"]


def test_learns_and_restores_best_weights(easy10_parquet, tmp_path):
    metrics = run(easy10_parquet, tmp_path, "--epochs", "6", "--scheduler", "cosine", "--val-fraction", "0.2")
    assert metrics["top1"] > 0.7, metrics
    assert metrics["coarse_top1"] >= metrics["top1"]
    best = load_file(str(tmp_path / "checkpoints" / "best.safetensors"))
    exported = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert all(torch.equal(best[k], exported[k]) for k in best)


def test_early_stopping(easy10_parquet, tmp_path):
    # lr so small that val loss barely moves; min improvement still counts, so force stagnation with lr ~ 0
    metrics = run(easy10_parquet, tmp_path, "--epochs", "8", "--lr", "1e-12", "--early-stopping-patience", "2",
                  "--optimizer", "sgd", "--augment", "none", "--drop-rate", "0")
    assert metrics["epochs_run"] < 8 and metrics["stopped"].startswith("early stopping")


def test_resume_with_more_epochs_continues_the_run(easy10_parquet, tmp_path):
    run(easy10_parquet, tmp_path, "--epochs", "1")
    metrics = run(easy10_parquet, tmp_path, "--epochs", "3", "--resume")
    assert [r["epoch"] for r in history(tmp_path)] == [1, 2, 3]
    assert metrics["epochs_run"] == 3


def test_mismatched_resume_is_refused(easy10_parquet, tmp_path):
    run(easy10_parquet, tmp_path, "--epochs", "1")
    with pytest.raises(ResumeError, match="--model baseline_cnn_bn, not test_efficientnet"):
        train(parse_args(["--dataset", str(easy10_parquet), "--output-dir", str(tmp_path), "--model",
                          "test_efficientnet", "--no-pretrained", "--resume", "--epochs", "2"]))
    # the same classes but another split (validation and early stopping would change mid-run) or other images
    with pytest.raises(ResumeError, match="split its data with --seed 42, not 1; resume with --seed 42"):
        run(easy10_parquet, tmp_path, "--epochs", "2", "--resume", "--seed", "1")
    with pytest.raises(ResumeError, match="split its data with --val-fraction 0.1, not 0.2"):
        run(easy10_parquet, tmp_path, "--epochs", "2", "--resume", "--val-fraction", "0.2")
    other = shutil.copytree(easy10_parquet, tmp_path.parent / f"{tmp_path.name}_other")
    path = min(other.rglob("*.parquet"))  # one image fewer: the same classes, other data
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows - 1), path)
    with pytest.raises(ResumeError, match="was trained on other data"):
        run(other, tmp_path, "--epochs", "2", "--resume")
    assert run(easy10_parquet, tmp_path, "--epochs", "2", "--resume")["epochs_run"] == 2


def test_resume_after_kill_9(easy10_parquet, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataset", str(easy10_parquet), "--output-dir", str(tmp_path),
           *CNN, "--epochs", "200"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    pointer = tmp_path / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and not (pointer.is_file() and pointer.read_text() >= "epoch-0002"):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = int(pointer.read_text().split("-")[1])
    assert done >= 2
    metrics = run(easy10_parquet, tmp_path, "--epochs", str(done + 1), "--resume")
    assert [r["epoch"] for r in history(tmp_path)] == list(range(1, done + 2))
    assert metrics["epochs_run"] == done + 1


def test_diverging_loss_stops_with_a_message(easy10_parquet, tmp_path):
    with pytest.raises(TrainingError, match="loss became (nan|inf)"):
        run(easy10_parquet, tmp_path, "--epochs", "3", "--optimizer", "sgd", "--lr", "1e12")


def test_freeze_backbone_trains_only_the_head(easy10_parquet, tmp_path):
    from cifar_tl.models import create_model
    torch.manual_seed(0)
    init = create_model("baseline_cnn_bn", num_classes=10).state_dict()
    save_file(init, str(tmp_path / "init.safetensors"))
    run(easy10_parquet, tmp_path / "run", "--epochs", "1", "--freeze-backbone", "--weights",
        str(tmp_path / "init.safetensors"))
    trained = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert torch.equal(trained["features.0.weight"], init["features.0.weight"])
    assert torch.equal(trained["features.1.running_mean"], init["features.1.running_mean"])  # BN kept frozen
    assert not torch.equal(trained["classifier.weight"], init["classifier.weight"])


def test_staged_unfreezing(easy10_parquet, tmp_path):
    from cifar_tl.models import create_model

    save_file(create_model("baseline_cnn_bn", num_classes=10).state_dict(), str(tmp_path / "init.safetensors"))
    metrics = run(easy10_parquet, tmp_path / "run", "--epochs", "2", "--unfreeze-after", "1", "--bn-eval",
                  "--weights", str(tmp_path / "init.safetensors"))
    assert metrics["epochs_run"] == 2


def test_drop_path_rate_reaches_the_residual_blocks():
    """--drop-path-rate: stochastic depth in training (rates growing with depth), none in evaluation; a timm
    model without it gets a one-line error."""
    from types import SimpleNamespace

    from timm.layers import DropPath

    from cifar_tl.config import ConfigError
    from cifar_tl.engine import build_model

    argv = ["--model", "test_efficientnet", "--no-pretrained", "--image-size", "32", "--drop-path-rate", "0.2"]
    model, _ = build_model(parse_args(argv), SimpleNamespace(num_classes=10))
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert rates == sorted(rates) and 0 < rates[0] < rates[-1] <= 0.2
    x = torch.randn(8, 3, 32, 32)
    torch.manual_seed(0)
    model.train()
    assert not torch.allclose(model(x), model(x))  # blocks skipped at random
    model.eval()
    assert torch.equal(model(x), model(x))
    with pytest.raises(ConfigError, match="--drop-path-rate: vgg11 has no stochastic depth"):
        build_model(parse_args(["--model", "vgg11", "--no-pretrained", "--drop-path-rate", "0.1"]),
                    SimpleNamespace(num_classes=10))


def test_linear_probe_caches_features(easy10_parquet, tmp_path, monkeypatch, capsys):
    args = ["--model", "test_efficientnet", "--no-pretrained", "--linear-probe", "--image-size", "32",
            "--epochs", "30", "--lr", "1e-2", "--batch-size", "64"]
    first = train(parse_args(["--dataset", str(easy10_parquet), "--output-dir", str(tmp_path / "a"), *args]))
    assert "note: --linear-probe on randomly initialised test_efficientnet" in capsys.readouterr().out
    extract = probe.extract
    monkeypatch.setattr(probe, "extract", lambda *a, **k: pytest.fail("backbone ran again"))
    second = train(parse_args(["--dataset", str(easy10_parquet), "--output-dir", str(tmp_path / "b"), *args]))
    assert first["top1"] == pytest.approx(second["top1"])
    assert first["top1"] > 0.3
    Predictor.from_dir(tmp_path / "b" / "model")
    # zeroed bytes inside the cached test features still load: they gave chance-level test results silently
    monkeypatch.setattr(probe, "extract", extract)
    from cifar_tl.data import cache_dir
    cached = max((cache_dir() / "features").glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    with open(cached, "r+b") as f:
        f.seek(cached.stat().st_size - 4096)
        f.write(bytes(4096))
    third = train(parse_args(["--dataset", str(easy10_parquet), "--output-dir", str(tmp_path / "c"), *args]))
    assert "extracting again: the cached features are damaged" in capsys.readouterr().out
    assert third["top1"] == pytest.approx(first["top1"])  # extracted again, not used


def test_probe_stages_train_the_last_stages_on_cached_maps(easy10_parquet, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from cifar_tl.data import cache_dir
    from cifar_tl.models import create_model

    model = create_model("test_efficientnet", num_classes=10)
    start, last = model.state_dict(), f"blocks.{len(model.blocks) - 1}."
    save_file(start, str(tmp_path / "start.safetensors"))
    args = ["--model", "test_efficientnet", "--weights", str(tmp_path / "start.safetensors"), "--linear-probe",
            "--probe-stages", "1", "--image-size", "32", "--epochs", "8", "--lr", "3e-3", "--batch-size", "32", "--tta",
            "--val-fraction", "0.2", "--early-stopping-patience", "0"]
    first = train(parse_args(["--dataset", str(easy10_parquet), "--output-dir", str(tmp_path / "a"), *args]))
    assert first["top1"] > 0.5 and "tta" in first and first["epochs_run"] == 8
    seen = sum(json.loads(line)["train_images"] for line in (tmp_path / "a" / "history.jsonl").read_text().splitlines())
    assert first["train_images_per_second"] == pytest.approx(seen / first["train_seconds"])
    # the test pass over the cached features is timed (it was 0: the logits came precomputed); TTA = both views
    assert 0 < first["test_seconds"] < first["tta_test_seconds"]
    assert first["timed_seconds"] == pytest.approx(first["train_seconds"] + first["tta_test_seconds"])
    assert list((cache_dir() / "onnx").glob("probe-*.onnx"))  # on CPU the frozen part ran in ONNX Runtime
    caches = [load_file(str(p)) for p in (cache_dir() / "features").glob("*.safetensors")]
    maps = [c for c in caches if c["train"].ndim == 4]  # maps, not pooled features (other tests cache those)
    assert maps and not any("train_flip" in c for c in maps)  # training mirrors the maps: no second pass
    assert all(p.suffix in (".onnx", ".sha256") for p in (cache_dir() / "onnx").iterdir())  # no leftovers
    trained = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    frozen = [k for k in start if k.startswith(("conv_stem", "bn1", "blocks.")) and not k.startswith(last)]
    assert frozen and [k for k in frozen if not torch.equal(trained[k], start[k])] == []
    assert not torch.equal(trained[last + "0.conv_pw.weight"], start[last + "0.conv_pw.weight"])
    monkeypatch.setattr(probe, "extract", lambda *a, **k: pytest.fail("backbone ran again"))
    second = train(parse_args(["--dataset", str(easy10_parquet), "--output-dir", str(tmp_path / "b"), *args]))
    assert second["top1"] == pytest.approx(first["top1"])
    with pytest.raises(Exception, match="EfficientNet-family"):
        train(parse_args(["--dataset", str(easy10_parquet), "--output-dir", str(tmp_path / "c"), *CNN,
                          "--linear-probe", "--probe-stages", "1"]))


def test_probe_epoch_mirrors_half_of_the_cached_maps():
    """With --probe-stages the augmentation is a left-right mirror of the cached maps, per map at random."""
    import types

    from cifar_tl.optim import Budget

    maps = torch.arange(64 * 2 * 4 * 4, dtype=torch.float32).view(64, 2, 4, 4)  # no map is its own mirror
    seen = []

    class Top(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2, 3))

        def forward(self, x):
            if self.training:
                seen.append(x.clone())
            return x.mean((2, 3)) @ self.w

    cfg = types.SimpleNamespace(batch_size=16, eval_batch_size=32, epochs=1, probe_stages=1, label_smoothing=0.0)
    top = Top()
    opt = torch.optim.SGD(top.parameters(), lr=0.0)
    bundle = types.SimpleNamespace(train=types.SimpleNamespace(fine=torch.zeros(64, dtype=torch.long)))
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), is_local_main_process=False, print=print)
    probe._epoch(cfg, accelerator, top, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
                 {"train": maps, "test": maps}, bundle, torch.Generator().manual_seed(0), 1, Budget(None))
    rows = torch.cat(seen)
    plain = [any(torch.equal(r, m) for m in maps) for r in rows]
    mirrored = [any(torch.equal(r, m.flip(-1)) for m in maps) for r in rows]
    assert len(rows) == 64 and all(p != f for p, f in zip(plain, mirrored))  # each map once, as is or mirrored
    assert 16 <= sum(mirrored) <= 48


def test_probe_resumes_from_its_last_epoch(easy10_parquet, tmp_path):
    args = ["--dataset", str(easy10_parquet), "--output-dir", str(tmp_path), "--model", "test_efficientnet",
            "--no-pretrained", "--linear-probe", "--image-size", "32", "--lr", "1e-2", "--batch-size", "64",
            "--early-stopping-patience", "0"]
    train(parse_args([*args, "--epochs", "3"]))
    first = history(tmp_path)
    assert (tmp_path / "checkpoints" / "probe-last.pt").is_file()
    metrics = train(parse_args([*args, "--epochs", "5", "--resume"]))
    rows = history(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5] and metrics["epochs_run"] == 5
    assert rows[:3] == first  # the finished epochs were kept, not retrained
    with pytest.raises(Exception, match="other features"):
        train(parse_args([*args, "--epochs", "6", "--resume", "--image-size", "40"]))
    config = (tmp_path / "config.yaml").read_text()  # a new lr passed, and config.yaml said so
    with pytest.raises(ConfigError, match="probe-last.pt was trained with --lr 0.01, not 0.05; resume with"):
        train(parse_args([*args, "--epochs", "6", "--resume", "--lr", "0.05"]))
    with pytest.raises(ConfigError, match="--epochs may only grow"):
        train(parse_args([*args, "--epochs", "4", "--resume"]))
    assert (tmp_path / "config.yaml").read_text() == config
    # a damaged newest checkpoint costs one epoch, not the run: the one before it is kept, and sealed too
    ckpt, previous = tmp_path / "checkpoints" / "probe-last.pt", tmp_path / "checkpoints" / "probe-prev.pt"
    assert torch.load(previous, weights_only=True)["state"]["epoch"] == 4
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 1  # a flipped byte in a weight loads without a word; its seal tells
    ckpt.write_bytes(bytes(data))
    metrics = train(parse_args([*args, "--epochs", "6", "--resume"]))
    assert [r["epoch"] for r in history(tmp_path)] == [1, 2, 3, 4, 5, 6] and metrics["epochs_run"] == 6
    for path in (ckpt, previous):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a deep zip-reader traceback before
    with pytest.raises(ConfigError, match=rf"--resume: no usable probe checkpoint in {ckpt.parent} \(probe-last.pt: "
                                          r".*probe-prev.pt: .*--overwrite-output-dir"):
        train(parse_args([*args, "--epochs", "7", "--resume"]))


def test_a_resumed_probe_goes_on_with_what_is_left_of_its_budget(easy10_parquet, tmp_path):
    """A time-limited probe whose budget was spent by its first process (here: a checkpoint saying so, as after
    a crash in the final test pass) trains no further epoch on --resume; it is evaluated and exported."""
    args = ["--dataset", str(easy10_parquet), "--output-dir", str(tmp_path), "--model", "test_efficientnet",
            "--no-pretrained", "--linear-probe", "--image-size", "32", "--batch-size", "64",
            "--early-stopping-patience", "0", "--time-limit-minutes", "5"]
    train(parse_args([*args, "--epochs", "2"]))
    ckpt = tmp_path / "checkpoints" / "probe-last.pt"
    saved = torch.load(ckpt, weights_only=True)
    assert 0 < saved["state"]["budget_seconds"] < 300
    saved["state"]["budget_seconds"] = 300.0  # all of its 5 minutes
    torch.save(saved, ckpt)
    seal(ckpt)  # as the probe seals what it saves
    metrics = train(parse_args([*args, "--epochs", "4", "--resume"]))
    assert [r["epoch"] for r in history(tmp_path)] == [1, 2] and metrics["stopped"] == "time limit 5.0 min"


def test_probe_keeps_tests_and_exports_the_weight_average_with_ema_decay(easy10_parquet, tmp_path):
    """--ema-decay in the cached partial fine-tune: an average updated after every step, validated, exported and
    checkpointed (a --resume continues it); a resume that changes the setting is refused in one line."""
    from cifar_tl.config import ConfigError

    args = ["--dataset", str(easy10_parquet), "--output-dir", str(tmp_path), "--model", "test_efficientnet",
            "--no-pretrained", "--linear-probe", "--probe-stages", "1", "--image-size", "32", "--lr", "3e-3",
            "--batch-size", "32", "--val-fraction", "0", "--ema-decay", "0.9"]  # no val split: the last epoch is kept
    train(parse_args([*args, "--epochs", "2"]))
    ckpt = torch.load(tmp_path / "checkpoints" / "probe-last.pt", weights_only=True)
    ema = ckpt["state"]["ema"]
    steps = -(-history(tmp_path)[0]["train_images"] // 32)  # optimiser steps per epoch
    assert ema["updates"] == 2 * steps
    exported = load_file(str(tmp_path / "model" / "model.safetensors"))
    prefix = "model."  # the probe's top holds the whole model; the export is the model itself
    trained = {k[len(prefix):]: v for k, v in ckpt["top"].items()}
    last = [k for k in ema["average"] if ".conv_pw.weight" in k and k[len(prefix):] in exported]
    assert last and all(torch.equal(exported[k[len(prefix):]], ema["average"][k]) for k in last)
    assert any(not torch.equal(exported[k[len(prefix):]], trained[k[len(prefix):]]) for k in last)  # not the raw
    train(parse_args([*args, "--epochs", "3", "--resume"]))
    resumed = torch.load(tmp_path / "checkpoints" / "probe-last.pt", weights_only=True)
    assert resumed["state"]["ema"]["updates"] == 3 * steps  # the average went on from where it was
    with pytest.raises(ConfigError, match="with --ema-decay"):
        train(parse_args([*args[:-2], "--epochs", "4", "--resume"]))


def test_onnx_feature_extraction_matches_pytorch():
    from functools import partial

    from accelerate import Accelerator

    from cifar_tl.augment import eval_transform
    from cifar_tl.models import create_model

    model = create_model("test_efficientnet", num_classes=10).eval()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    for stages in (0, 2):
        extractor = probe._Extractor(model, partial(eval_transform, size=48, mean=(0.5,) * 3, std=(0.5,) * 3),
                                     stages)
        fast = probe._runner(extractor, Accelerator(cpu=True), f"test-{stages}", 32)(images)
        with torch.no_grad():
            assert torch.allclose(fast, extractor(images), atol=1e-4)


def test_cli_reports_bad_input_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--dataset", str(tmp_path / "nope"),
                          "--model", "baseline_cnn_bn", "--no-pretrained"], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2
    assert "error: --dataset" in res.stderr and "Traceback" not in res.stderr


def test_two_process_gloo_run_matches_one_process(easy10_parquet, tmp_path):
    """`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2` with the same global batch."""
    common = [str(ROOT / "train.py"), "--dataset", str(easy10_parquet), *CNN, "--epochs", "3",
              "--augment", "none", "--val-fraction", "0.2", "--mixed-precision", "no"]  # fp32 on any CPU
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    two = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
                          *common, "--output-dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *common, "--output-dir", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert one.returncode == 0, one.stderr[-3000:]
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["num_processes"] == 2 and m1["num_processes"] == 1
    assert m1["n"] == m2["n"] == 100  # exact evaluation: no sampler padding counted
    assert abs(m1["top1"] - m2["top1"]) < 0.1 and abs(m1["loss"] - m2["loss"]) < 0.3
    h1, h2 = history(tmp_path / "one"), history(tmp_path / "two")
    assert len(h1) == len(h2) == 3


def _launch_two(args: list[str], port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    return subprocess.run([accelerate, "launch", "-q", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                           str(ROOT / "train.py"), *args], env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def test_two_processes_stop_together_at_the_time_limit(easy10_parquet, tmp_path):
    """Each process read its own clock: under load one left the epoch while the other waited in DDP's
    all-reduce, and the run died in gloo (`Received data size doesn't match expected size`; not reproducible on
    demand: the agreement itself is `test_processes_with_their_own_clocks_agree_on_one_budget`). The shared
    clock's all-reduce runs every step here, and the run ends at its limit."""
    res = _launch_two(["--dataset", str(easy10_parquet), *CNN, "--batch-size", "4", "--eval-batch-size", "50",
                       "--epochs", "200", "--augment", "none", "--val-fraction", "0.2", "--time-limit-minutes", "0.4",
                       "--output-dir", str(tmp_path / "run")], 29541)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["stopped"].startswith("time limit") and metrics["num_processes"] == 2
    assert not (tmp_path / "run" / "run.lock").exists()  # released when the run ended


def test_two_processes_report_bad_input_once(tmp_path):
    """A dataset the first process cannot read: one error line, and the second process exits quietly instead of
    failing in the barrier it waited at; a flag both processes refuse is also printed once."""
    res = _launch_two(["--dataset", str(tmp_path / "nope"), "--model", "baseline_cnn", "--no-pretrained",
                       "--output-dir", str(tmp_path / "run")], 29542)
    assert res.returncode != 0 and res.stderr.count("error: --dataset") == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "[rank1]" not in res.stderr
    res = _launch_two(["--dataset", str(tmp_path / "nope"), "--model", "baseline_cnn", "--no-pretrained",
                       "--eval-batch-size", "15"], 29543)
    assert res.stderr.count("error: --eval-batch-size 15 (global) must divide by the 2 processes") == 1


def test_a_folder_in_use_by_a_live_run_is_refused(easy10_parquet, tmp_path, monkeypatch):
    """The processes of a launcher killed with kill -9 train on: a --resume beside them would write the same
    checkpoints. A run holds its folder (an flock on run.lock) while it goes on; a lock whose process has ended
    holds nothing, even when its process number has been given to another process since."""
    from conftest import hold_elsewhere

    out = tmp_path / "run"
    args = ["--dataset", str(easy10_parquet), "--output-dir", str(out), *CNN, "--epochs", "1"]
    train(parse_args(args))
    other = hold_elsewhere(out)
    try:
        with pytest.raises(ConfigError, match=rf"in use by a run still going \(process {other.pid} on "
                                              rf"{socket.gethostname()}, started x\)"):
            train(parse_args([*args, "--resume", "--epochs", "2"]))
        # two runs started at the same moment both pass the early check; the one that comes second to the lock
        # (taken once the data is read) is refused there
        monkeypatch.setattr(engine, "holder", lambda out: None)
        with pytest.raises(ConfigError, match=rf"in use by a run still going \(process {other.pid} on "):
            train(parse_args([*args, "--resume", "--epochs", "2"]))
        assert json.loads((out / "run.lock").read_text())["pid"] == other.pid  # the other run's lock is kept
        monkeypatch.undo()
    finally:
        other.kill()
        other.wait()
    # its record names a live process (a reused number: pytest's parent here), but no process holds the lock
    (out / "run.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "x"}))
    assert train(parse_args([*args, "--resume", "--epochs", "2"]))["epochs_run"] == 2
    assert not (out / "run.lock").exists()


def test_without_flock_a_lock_is_judged_by_its_process(easy10_parquet, tmp_path, monkeypatch):
    """On a filesystem without flock (some network mounts) the lock falls back to its record: created
    exclusively, and held while its process is alive."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "run"
    args = ["--dataset", str(easy10_parquet), "--output-dir", str(out), *CNN, "--epochs", "1"]
    train(parse_args(args))
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "run.lock").write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname(), "started": "x"}))
        with pytest.raises(ConfigError, match=rf"in use by a run still going \(process {alive.pid}, started x; "
                                              r"delete .*run.lock if no run is going there\)"):
            train(parse_args([*args, "--resume", "--epochs", "2"]))
        monkeypatch.setattr(engine, "holder", lambda out: None)
        with pytest.raises(ConfigError, match=rf"in use by a run still going \(process {alive.pid}, started x"):
            train(parse_args([*args, "--resume", "--epochs", "2"]))
        monkeypatch.setattr(engine, "holder", processes.holder)
    finally:
        alive.kill()
        alive.wait()
    assert train(parse_args([*args, "--resume", "--epochs", "2"]))["epochs_run"] == 2  # the lock's process is gone
    assert not (out / "run.lock").exists()


def test_tracking_offline_and_gradient_accumulation(easy10_parquet, tmp_path, monkeypatch):
    """--report-to all with the study's CNN and --wandb-log-model all: TensorBoard event files, and an offline W&B
    run (read back from its run file) with one model artifact per epoch carrying the epoch's metrics under the
    study's names, the run config and the dataset fingerprint, and the end-of-run media; gradient accumulation
    runs through the same loop."""
    from wandb_offline import load_logged_table, read_offline_run

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))  # offline artifact files are staged there
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    metrics = train(parse_args(["--dataset", str(easy10_parquet), "--output-dir", str(out), "--model", "baseline_cnn",
                                "--no-pretrained", "--batch-size", "32", "--epochs", "2", "--report-to", "all",
                                "--wandb-log-model", "all", "--grad-accum-steps", "2", "--project-name", "ctl-test"]))
    assert metrics["epochs_run"] == 2
    assert list(out.rglob("events.out.tfevents.*")), "no TensorBoard events"
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    got = read_offline_run(run_dir)  # complete: train() ends with wandb.teardown()
    assert got["exit_code"] == 0 and got["config"]["dataset_fingerprint"] == metrics["dataset_fingerprint"]
    models = [a for a in got["artifacts"] if a["type"] == "model"]
    assert [a["metadata"]["epoch"] for a in models] == [1, 2]  # every epoch, improving or not
    rows = history(out)
    for artifact, row in zip(models, rows):
        meta = artifact["metadata"]
        assert artifact["name"] == f"model-{got['run']['id']}" and f"epoch_{row['epoch']}" in artifact["aliases"]
        assert (meta["loss"], meta["accuracy"], meta["val_loss"], meta["val_accuracy"]) == pytest.approx(
            (row["train_loss"], row["train_top1"], row["val_loss"], row["val_top1"]))
        assert meta["history_step"] == row["epoch"] and meta["dataset_fingerprint"] == metrics["dataset_fingerprint"]
        assert meta["run_config"]["model"] == "baseline_cnn" and meta["run_config"]["wandb_log_model"] == "all"
        assert artifact["files"]["model.safetensors"]["exists"]
    best = models[metrics["best_epoch"] - 1]["files"]["model.safetensors"]["local_path"]
    exported = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(v, exported[k]) for k, v in load_file(best).items())  # that epoch's weights
    assert {"curves/loss_table", "curves/accuracy_table", "test/confusion_matrix_table", "test/predictions",
            "plots/predictions", "plots/reliability", "plots/top_confusions"} <= set(got["media"])
    table = load_logged_table(got, "test/predictions")
    assert table["columns"][:6] == ["index", "image", "true_fine", "pred_fine", "true_coarse", "pred_coarse"]
    assert len(table["data"]) == 100 and Path(table["data"][0][1]["local_path"]).is_file()
    assert sum(r[2] for r in load_logged_table(got, "test/confusion_matrix_table")["data"]) == metrics["n"]


def test_fast_cnn_recipe_learns(easy10_parquet, tmp_path):
    """The cpu_fast_cnn recipe's pieces together: whitened stem, crop augmentation, BN-bias LR scale, lookahead."""
    metrics = train(parse_args([
        "--dataset", str(easy10_parquet), "--output-dir", str(tmp_path), "--model", "fast_cnn", "--no-pretrained",
        "--batch-size", "32", "--eval-batch-size", "64", "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.85",
        "--bias-lr-scale", "64", "--weight-decay", "1e-3", "--scheduler", "cosine", "--lookahead", "--augment",
        "crop", "--shift", "0.0625", "--label-smoothing", "0.2", "--epochs", "5", "--val-fraction", "0.2",
        "--early-stopping-patience", "0", "--drop-rate", "0"]))
    assert metrics["top1"] > 0.7, metrics
    stem = load_file(str(tmp_path / "model" / "model.safetensors"))["features.0.weight"]
    assert torch.equal(stem[12:], -stem[:12])  # fitted to the data, and never trained
    assert Predictor.from_dir(tmp_path / "model").model.model_args["widths"] == [32, 128, 128]


def test_lookahead_pulls_weights_to_their_average():
    from cifar_tl.lookahead import Lookahead

    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    la = Lookahead(model, every=5, start=0.3)
    la.step(5, 0.2)  # before `start`: nothing happens
    assert la.average is None
    la.step(5, 0.5)  # first call after `start` takes the snapshot
    with torch.no_grad():
        model.weight.fill_(1.0)
    la.step(7, 0.5)  # not a multiple of `every`
    assert torch.equal(model.weight, torch.ones(1, 2))
    la.step(10, 1.0)
    rho = 0.95 ** 5
    assert torch.allclose(model.weight, torch.full((1, 2), 1 - rho))  # average moved by (1 - rho), copied back
    with torch.no_grad():
        model.weight.fill_(3.0)
    la.finish_epoch()
    assert torch.allclose(model.weight, torch.full((1, 2), 1 - rho))
