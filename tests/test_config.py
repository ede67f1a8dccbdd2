import subprocess
import sys
from pathlib import Path

import pytest

from cifar_tl.config import ConfigError, TrainConfig, parse_args

PRESETS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


def test_defaults_match_reference_transfer_run():
    cfg = parse_args([])
    assert (cfg.dataset, cfg.model, cfg.pretrained) == ("uoft-cs/cifar100", "efficientnet_b0", True)
    assert (cfg.optimizer, cfg.lr, cfg.scheduler, cfg.plateau_factor, cfg.min_lr) == ("adam", 1e-4, "plateau", 0.5, 1e-6)


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model: baseline_cnn\nlr: 1e-3\nepochs: 7\npretrained: false\nmax_train_samples: 100\n")
    cfg = parse_args(["--config", str(path), "--epochs", "9", "--max-train-samples", "none"])
    assert cfg.model == "baseline_cnn" and cfg.lr == pytest.approx(1e-3)  # YAML's "1e-3" string coerced
    assert cfg.epochs == 9 and cfg.max_train_samples is None and cfg.pretrained is False


def test_boolean_flags():
    assert parse_args(["--no-pretrained"]).pretrained is False
    assert parse_args(["--linear-probe"]).linear_probe is True


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_parse(preset):
    cfg = parse_args(["--config", str(preset)])
    assert isinstance(cfg, TrainConfig)


def test_reference_presets_reproduce_the_study():
    cnn = parse_args(["--config", "configs/baseline_cnn.yaml"])
    assert (cnn.model, cnn.epochs) == ("baseline_cnn", 50)
    b0 = parse_args(["--config", "configs/efficientnet_b0.yaml"])
    assert (b0.image_size, b0.lr, b0.batch_size, b0.epochs, b0.early_stopping_patience) == (224, 1e-4, 8, 15, 10)
    assert (b0.plateau_factor, b0.plateau_patience, b0.min_lr) == (0.5, 5, 1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "-1"], "--lr"),
    (["--push-to-hub"], "--hub-model-id"),
    (["--probe-stages", "2"], "--probe-stages 2 needs --linear-probe"),
    (["--bias-lr-scale", "0"], "--bias-lr-scale"),
    (["--linear-probe", "--mixup", "0.2"], "^--mixup does not apply to --linear-probe"),
    (["--linear-probe", "--probe-stages", "2", "--layer-decay", "0.8", "--tta-level", "2"],
     "^--layer-decay, --tta-level do not apply to --linear-probe"),
    (["--drop-path-rate", "1"], "--drop-path-rate must be in"),
    (["--model", "fast_cnn", "--drop-path-rate", "0.1"], "--drop-path-rate: fast_cnn has no residual blocks"),
    (["--linear-probe", "--image-size", "32", "--progressive-resize", "16"],
     "^--progressive-resize does not apply to --linear-probe"),
    # values that ran but meant nothing: -1 patience stopped after one epoch, a -1 minute budget after one batch
    (["--early-stopping-patience", "-1"], "^--early-stopping-patience must be >= 0; got -1"),
    (["--time-limit-minutes", "-1"], "^--time-limit-minutes must be positive"),
    (["--plateau-factor", "1.5"], "^--plateau-factor must be in \\(0, 1\\)"),
    (["--zoom", "-0.1"], "^--zoom must be >= 0"),
    (["--zoom", "5"], "^--zoom is a fraction, in \\[0, 1\\); got 5"),
    (["--drop-rate", "2"], "^--drop-rate must be in \\[0, 1\\); got 2"),
    (["--shift", "3"], "^--shift is a fraction of the image, in \\[0, 0.5\\]; got 3"),
    (["--lr", "0.001", "--min-lr", "0.05"], "^--min-lr 0.05 must not exceed --lr 0.001"),
    (["--momentum", "1.2"], "^--momentum must be below 1"),
    (["--resume", "--overwrite-output-dir"], "give one of them"),
    (["--dataset", ""], "^--dataset is empty"),  # it trained on the current folder
    (["--test-split", "train"], "^--train-split and --test-split are both 'train'"),
    # a cutout as large as the image trained on blank images; the size named is the model's own without --image-size
    (["--model", "fast_cnn", "--cutout", "32"], r"^--cutout 32 would blank the whole image: .* 32 px \(fast_cnn's own"),
    (["--model", "fast_cnn", "--progressive-resize", "16", "--cutout", "16"], "smaller than --progressive-resize 16"),
    (["--model", "test_efficientnet", "--progressive-resize", "200"],  # it said "got --image-size None"
     r"^--progressive-resize 200 must be between 8 and the training size, 160 px \(test_efficientnet's own"),
    # head-only training and frozen BatchNorm on random weights trained nothing useful
    (["--model", "baseline_cnn_bn", "--freeze-backbone"], "^--freeze-backbone keeps pretrained parts .* from scratch"),
    (["--model", "test_efficientnet", "--no-pretrained", "--unfreeze-after", "1", "--bn-eval"],
     "^--unfreeze-after, --bn-eval keep pretrained parts"),
])
def test_bad_values_name_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_bad_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 3\n")
    with pytest.raises(ConfigError, match="unknown option.*learning_rate"):
        parse_args(["--config", str(bad)])
    for text, says in (("epochs: many", "epochs must be an integer; got 'many'"),
                       ("epochs: 2.7", "epochs must be an integer; got 2.7"),  # not silently 2
                       ("batch_size: on", "batch_size must be an integer; got True"),
                       ("lr: .nan", "lr must be float (finite); got nan"),
                       (": bad", "not valid YAML at line 1, column 1 (expected <block end>, but found ':')")):
        bad.write_text(text + "\n")
        with pytest.raises(ConfigError) as err:
            parse_args(["--config", str(bad)])
        assert str(err.value) == f"--config {bad}: {says}"
    for key in ("epochs", "zoom", "tta", "model", "seed"):  # null only where an option may be unset
        bad.write_text(f"{key}: null\n")
        with pytest.raises(ConfigError, match=f"^--config {bad}: {key} cannot be null; give it"):
            parse_args(["--config", str(bad)])
    bad.write_text("lr: null\nimage_size: null\n")  # unset: the model's defaults
    assert parse_args(["--config", str(bad)]).lr is not None
    bad.write_text("epochs: 3.0\nlr: 1e-4\n")  # YAML reads 1e-4 as a string
    assert (parse_args(["--config", str(bad)]).epochs, parse_args(["--config", str(bad)]).lr) == (3, 1e-4)
    with pytest.raises(ConfigError, match="file not found"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_flags_are_not_abbreviated(capsys):
    """`--epoch 3` trained 3 epochs while a config file's `epoch: 3` was refused."""
    with pytest.raises(SystemExit):
        parse_args(["--epoch", "3"])
    assert "unrecognized arguments: --epoch 3 (did you mean --epochs?)" in capsys.readouterr().err


def test_names_tied_for_nearest_are_all_offered():
    from cifar_tl.console import did_you_mean

    names = [f"efficientnet_b{i}" for i in range(9)] + ["resnet18"]
    assert did_you_mean("efficientnet_bo", names) == " (did you mean efficientnet_b0 or efficientnet_b1 or " \
                                                     "efficientnet_b2?)"  # one letter from each: b0 first
    assert did_you_mean("efficentnet_b0", names) == " (did you mean efficientnet_b0?)"
    assert did_you_mean("--privte", ["--private", "--private"]) == " (did you mean --private?)"  # subcommands repeat


def test_a_bad_number_flag_names_its_type(capsys):
    for value in ("abc", "nan"):
        with pytest.raises(SystemExit):
            parse_args(["--lr", value])
        assert f"argument --lr: invalid float value: '{value}'" in capsys.readouterr().err
    assert parse_args(["--lr", "3e-3", "--weight-decay", "none"]).lr == 3e-3


def test_invalid_choice_exits():
    with pytest.raises(SystemExit):
        parse_args(["--optimizer", "lion"])


def test_misspelt_options_get_a_suggestion(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--optimzer", "sgd"])
    assert "unrecognized arguments: --optimzer sgd (did you mean --optimizer?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a misspelt --no-X is not pointed at its opposite
        parse_args(["--no-pretraned"])
    assert "(did you mean --no-pretrained?)" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimzer: sgd\n")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) optimzer \(did you mean optimizer\?\)"):
        parse_args(["--config", str(bad)])


def test_train_answers_help_and_bad_options_before_loading_torch(tmp_path):
    """`train.py --help` or a misspelt option must not wait ~15 s for torch, timm and datasets to import."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimzer: sgd\n")
    code = ("import sys\nfrom cifar_tl.cli import main\n"
            "for argv in (['--help'], ['--optimzer', 'sgd']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            f"assert main(['--config', {str(bad)!r}]) == 2\n"
            "print(sorted(m for m in ('torch', 'timm', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "did you mean optimizer?" in out.stderr


def test_a_binary_or_folder_config_is_one_line(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"\x00\x01\xff\xfe")
    with pytest.raises(ConfigError, match="cannot be read as text"):
        parse_args(["--config", str(tmp_path / "c.yaml")])
    with pytest.raises(ConfigError, match="a folder, not a YAML file"):
        parse_args(["--config", str(tmp_path)])


def test_plateau_cuts_the_lr_as_keras_does():
    """The study's ReduceLROnPlateau(patience=5): Keras cuts the LR after 5 epochs in a row without a better
    val loss (by min_delta 1e-4, absolute); torch's own scheduler waited a sixth."""
    import torch

    from cifar_tl.optim import build_scheduler

    cfg = TrainConfig(scheduler="plateau", plateau_patience=2, lr=0.1, min_lr=1e-6).resolve().validate()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=1)
    lrs = []
    for loss in (1.0, 0.99995, 1.2):  # the second is not better by 1e-4: two bad epochs
        scheduler.step(loss)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == [0.1, 0.1, 0.05]
    with pytest.raises(ConfigError, match="--plateau-patience must be >= 1"):
        TrainConfig(plateau_patience=0).resolve().validate()
