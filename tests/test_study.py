"""The reference study reproduced as it was run: its CNN layer for layer with a hand-counted size, the Keras-style
summary and parameter counts, folders written before `baseline_cnn` became the study's CNN, the model card's
account of the data a run used, the W&B artifact policy, and the independent transformers + evaluate
cross-check of a folder's recorded accuracy."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from cifar100_meta import COARSE_NAMES, FINE_NAMES, FINE_TO_COARSE
from conftest import build_model_dir

from cifar_tl import export
from cifar_tl.card import data_context
from cifar_tl.evaluate import main as evaluate_main
from cifar_tl.inference import Predictor
from cifar_tl.model_folder import FORMAT_VERSION, load_model
from cifar_tl.models import WeightsError, create_model, data_config, set_backbone_trainable
from cifar_tl.summary import model_summary, parameter_counts
from cifar_tl.tracking import logs_epoch

KERAS = {"_Conv2D": "Conv2D", "MaxPool2d": "MaxPool2D", "Dropout": "Dropout", "_Flatten": "Flatten",
         "_Dense": "Dense", "Linear": "Dense"}


def keras_stack(i: int) -> list[tuple[str, str]]:
    """Stack i's layers as Keras names them: conv2d_{2i}, conv2d_{2i+1}, max_pooling2d_{i}, dropout_{i}."""
    suffix = lambda n: f"_{n}" if n else ""
    return [(f"conv2d{suffix(2 * i)}", "Conv2D"), (f"conv2d{suffix(2 * i + 1)}", "Conv2D"),
            (f"max_pooling2d{suffix(i)}", "MaxPool2D"), (f"dropout{suffix(i)}", "Dropout")]


def test_study_cnn_is_the_studys_network():
    """3 stacks of Conv2D-Conv2D-MaxPool2D(2, 2)-Dropout, same padding, ReLU, no BatchNorm, Flatten, two hidden
    Dense + Dropout and the 100-way Dense: the study's "9-layer" CNN (6 convolutions + 3 dense layers)."""
    model = create_model("baseline_cnn", num_classes=100, drop_rate=0.5).eval()
    layers = [*model.features.named_children(), ("flatten", model.flatten), *model.head.named_children(),
              ("dense_2", model.classifier)]
    assert [(name, KERAS[type(m).__name__]) for name, m in layers] == [
        *keras_stack(0), *keras_stack(1), *keras_stack(2), ("flatten", "Flatten"), ("dense", "Dense"), ("dropout_3", "Dropout"),
        ("dense_1", "Dense"), ("dropout_4", "Dropout"), ("dense_2", "Dense")]
    convs = [m for _, m in layers if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.stride == (1, 1) for c in convs)  # "same"
    assert all(m.kernel_size == 2 and m.stride == 2 for _, m in layers if isinstance(m, torch.nn.MaxPool2d))
    assert [m.p for _, m in layers if isinstance(m, torch.nn.Dropout)] == [0.2, 0.3, 0.4, 0.5, 0.5]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(convs) + sum(isinstance(m, torch.nn.Linear) for _, m in layers) == 9
    # by hand: conv = 3*3*c_in*c_out + c_out, dense = n_in*n_out + n_out; 32 -> 16 -> 8 -> 4 px, Flatten 4*4*128
    by_hand = ((3 * 3 * 3 * 32 + 32) + (3 * 3 * 32 * 32 + 32) + (3 * 3 * 32 * 64 + 64) + (3 * 3 * 64 * 64 + 64)
               + (3 * 3 * 64 * 128 + 128) + (3 * 3 * 128 * 128 + 128)
               + (4 * 4 * 128 * 512 + 512) + (512 * 256 + 256) + (256 * 100 + 100))
    assert by_hand == 1_493_124
    assert sum(p.numel() for p in model.parameters()) == by_hand
    assert parameter_counts(model) == {"total": 1_493_124, "trainable": 1_493_124, "non_trainable": 0}
    x = torch.randn(2, 3, 32, 32)
    assert (model.features.conv2d(x) >= 0).all() and model(x).shape == (2, 100)  # ReLU in the conv; logits out
    feature_map = torch.arange(128 * 16.0).reshape(1, 128, 4, 4)  # Keras flattens (h, w, c)
    assert torch.equal(model.flatten(feature_map)[0, :3], feature_map[0, :3, 0, 0])
    assert model.pretrained_cfg["fixed_input_size"] and data_config(model)["image_size"] == 32
    with pytest.raises(WeightsError, match="input size is fixed"):
        data_config(model, 64)


def test_summary_and_keras_style_counts():
    model = create_model("baseline_cnn", num_classes=100)
    text = model_summary(model, 32)
    assert "conv2d_5" in text and "dense_1" in text and "Total params: 1,493,124" in text
    assert "(millions)" in text and "Units." not in text
    bn = create_model("baseline_cnn_bn", num_classes=100)
    stats = 2 * 2 * (64 + 128 + 256)  # running mean + var of the BatchNorm after each of the 6 convs
    assert parameter_counts(bn) == {"total": 1_172_004 + stats, "trainable": 1_172_004, "non_trainable": stats}
    set_backbone_trainable(bn, False)
    assert parameter_counts(bn)["trainable"] == 256 * 100 + 100  # frozen parameters count as non-trainable


def test_folder_of_the_previous_format_still_loads(tmp_path):
    """Format 1 called our BatchNorm CNN `baseline_cnn` (`_small`, `_wide`): such folders load as baseline_cnn_bn*,
    and a re-export writes them in the current format."""
    for old, new in (("baseline_cnn", "baseline_cnn_bn"), ("baseline_cnn_small", "baseline_cnn_bn_small")):
        folder = build_model_dir(new, tmp_path / old)
        config = json.loads((folder / "config.json").read_text())
        config["architecture"] = old  # exactly what format 1 wrote: same model_args {widths, drop_rate, batchnorm}
        config["cifar_tl"]["format_version"] = 1
        for key in ("data", "parameters"):
            del config["cifar_tl"][key]
        assert config["model_args"]["batchnorm"] is True
        (folder / "config.json").write_text(json.dumps(config))
        model, loaded = load_model(folder)
        assert loaded["architecture"] == new and loaded["cifar_tl"]["format_version"] == FORMAT_VERSION
        reference = create_model(new, num_classes=100)
        reference.load_state_dict(model.state_dict())
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(model(x), reference.eval()(x))
        assert Predictor.from_dir(folder).model.model_args["batchnorm"] is True
        again = export.export_checkpoint(folder, tmp_path / f"{old}-v2")
        assert json.loads((again / "config.json").read_text())["architecture"] == new
    import timm

    with pytest.raises(ValueError, match="baseline_cnn_bn"):  # timm alone: the old name now means the study's CNN
        timm.create_model(f"local-dir:{tmp_path / 'baseline_cnn'}", pretrained=True)


# --------------------------------------------------------------------------------------------- model card data

CIFAR100_EXTRA = {"coarse_names": COARSE_NAMES, "fine_to_coarse": FINE_TO_COARSE}
TRAIN = {"val_fraction": 0.1, "max_train_samples": None}


def data(source, kind, train, val, test, sizes=(50_000, 10_000)):
    return {"source": source, "kind": kind, "fingerprint": "0123abcd", "train": train, "val": val, "test": test,
            "source_sizes": {"train": sizes[0], "test": sizes[1]}, "num_classes": 100, "num_coarse": 20}


def test_card_names_the_hub_dataset_only_when_the_run_used_it():
    fixture = data_context({**CIFAR100_EXTRA, "data": data("/tmp/fixture", "parquet", 360, 40, 200, (400, 200))},
                           TRAIN, FINE_NAMES)  # 100 classes in 20 superclasses, but 600 images
    assert fixture["dataset_id"] is None and not fixture["is_cifar"]
    assert "360 training images, 40 validation images" in fixture["data_used"]
    assert "and 200 test images" in fixture["data_used"] and "`0123abcd`" in fixture["data_used"]
    assert "not a dataset published on the Hub" in fixture["data_used"]
    assert "50,000" not in fixture["dataset_description"] + fixture["data_used"]

    hub_subset = data_context({**CIFAR100_EXTRA, "data": data("uoft-cs/cifar100", "hub", 5_000, 5_000, 10_000)},
                              {**TRAIN, "max_train_samples": 5_000}, FINE_NAMES)
    assert hub_subset["dataset_id"] == "uoft-cs/cifar100" and hub_subset["is_cifar"]
    assert "a subset of `uoft-cs/cifar100` from the Hugging Face Hub" in hub_subset["data_used"]
    assert "5,000 training images (a stratified subsample: `--max-train-samples 5000`)" in hub_subset["data_used"]
    assert "of its 50,000 training images" in hub_subset["data_used"] and "10,000 test" in hub_subset["data_used"]

    local_copy = data_context({**CIFAR100_EXTRA, "data": data("/d/cifar-100-python.tar.gz", "cifar-tar", 45_000,
                                                              5_000, 10_000)}, TRAIN, FINE_NAMES)
    assert local_copy["dataset_id"] == "uoft-cs/cifar100" and "subset" not in local_copy["data_used"]
    assert "a local copy of CIFAR-100 (a local cifar-100-python archive" in local_copy["data_used"]

    relabelled = data_context({**CIFAR100_EXTRA, "fine_to_coarse": FINE_TO_COARSE[1:] + FINE_TO_COARSE[:1],
                               "data": data("/d/other", "parquet", 45_000, 5_000, 10_000)}, TRAIN, FINE_NAMES)
    assert relabelled["dataset_id"] is None  # same sizes and names, other superclasses: not CIFAR-100

    format1 = data_context({**CIFAR100_EXTRA, "dataset_fingerprint": "f00d"}, {**TRAIN, "dataset": "/d/fixture"},
                           FINE_NAMES)
    assert format1["dataset_id"] is None and "`/d/fixture`" in format1["data_used"]


@pytest.mark.parametrize(("mode", "improved", "logged"), [("all", False, True), ("best", True, True),
                                                            ("best", False, False), ("end", True, False),
                                                            ("none", True, False)])
def test_wandb_log_model_modes(mode, improved, logged):
    assert logs_epoch(mode, improved) is logged


# --------------------------------------------------------------------------------------------- cross-check


@pytest.fixture(scope="module")
def fp32_timm_run(easy10_parquet, tmp_path_factory):
    """A timm model trained and evaluated in fp32 at the data's own 32 px: its records must be matched exactly."""
    from cifar_tl.config import parse_args
    from cifar_tl.engine import train

    out = tmp_path_factory.mktemp("fp32_run")
    train(parse_args(["--dataset", str(easy10_parquet), "--output-dir", str(out), "--model", "test_efficientnet",
                      "--no-pretrained", "--image-size", "32", "--epochs", "2", "--batch-size", "32", "--lr", "3e-3",
                      "--val-fraction", "0.2", "--mixed-precision", "no"]))
    return out


def crosscheck(model, dataset, out):
    return evaluate_main(["--model", str(model), "--dataset", str(dataset), "--via", "transformers",
                          "--output-dir", str(out)])


def test_crosscheck_agrees_to_the_last_image(fp32_timm_run, easy10_parquet, tmp_path, capsys):
    pytest.importorskip("evaluate")
    assert crosscheck(fp32_timm_run / "model", easy10_parquet, tmp_path / "ok") == 0
    result = json.loads((tmp_path / "ok" / "crosscheck.json").read_text())
    recorded = json.loads((fp32_timm_run / "metrics.json").read_text())
    assert result["agrees"] and result["n"] == recorded["n"] == 100
    assert result["correct"] == round(recorded["top1"] * 100) and result["confusion_cells_differ"] == 0
    assert "to the last image" in capsys.readouterr().out

    tampered = tmp_path / "tampered"
    shutil.copytree(fp32_timm_run / "model", tampered)
    config = json.loads((tampered / "config.json").read_text())
    metrics = config["cifar_tl"]["metrics"]
    metrics["top1"], metrics["mixed_precision"] = metrics["top1"] + 0.01, "bf16"
    (tampered / "config.json").write_text(json.dumps(config))
    assert crosscheck(tampered, easy10_parquet, tmp_path / "bad") == 1
    err = capsys.readouterr().err
    assert "DISAGREES" in err and "(-1 correct images)" in err and "bf16 autocast" in err


def test_crosscheck_refuses_what_it_cannot_check(cnn_model_dir, timm_model_dir, easy10_parquet, cifar100_parquet,
                                                 tmp_path, capsys, monkeypatch):
    assert crosscheck(cnn_model_dir, cifar100_parquet, tmp_path) == 2
    assert "cifar-tl's own architecture" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "evaluate", None)  # the extra is not installed
    assert crosscheck(timm_model_dir, cifar100_parquet, tmp_path) == 2
    assert 'pip install "cifar-tl[crosscheck]"' in capsys.readouterr().err
