"""Typed training configuration: dataclass defaults <- YAML file (--config) <- command-line flags."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag and what to do."""


CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("adam", "adamw", "sgd"),
    "scheduler": ("plateau", "cosine", "none"),
    "augment": ("none", "basic", "crop", "randaugment"),
    "mixed_precision": ("auto", "no", "fp16", "bf16"),
    "report_to": ("none", "wandb", "tensorboard", "all"),
    "wandb_log_model": ("all", "best", "end", "none"),
}


@dataclass
class TrainConfig:
    # data
    dataset: str = field(default="uoft-cs/cifar100", metadata={"help": "Hub id, parquet/save_to_disk dir, "
                         "cifar-100-python dir or .tar.gz, or an image folder"})
    image_column: str | None = field(default=None, metadata={"help": "image column (default: img or image)"})
    label_column: str | None = field(default=None, metadata={"help": "fine label column (fine_label or label)"})
    coarse_label_column: str | None = field(default=None, metadata={"help": "coarse label column "
                                            "(default: coarse_label if present)"})
    train_split: str = "train"
    test_split: str = "test"
    val_fraction: float = field(default=0.1, metadata={"help": "stratified validation share of the train split"})
    max_train_samples: int | None = field(default=None, metadata={"help": "stratified subsample of train"})
    data_cache: bool = field(default=True, metadata={"help": "cache the decoded uint8 tensor store on disk"})
    # model
    model: str = field(default="efficientnet_b0", metadata={"help": "baseline_cnn[_small|_wide], "
                       "fast_cnn[_wide] or any timm model name"})
    pretrained: bool = True
    weights: str | None = field(default=None, metadata={"help": "initial weights file (.safetensors or .pth)"})
    image_size: int | None = field(default=None, metadata={"help": "model input size (default: the model's own)"})
    drop_rate: float = 0.2
    # optimisation
    batch_size: int = 64
    eval_batch_size: int = 256
    epochs: int = 15
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    optimizer: str = "adam"
    scheduler: str = "plateau"
    warmup_epochs: float = 0.0
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    min_lr: float = 1e-6
    early_stopping_patience: int = field(default=10, metadata={"help": "epochs without val-loss improvement "
                                         "before stopping (0 disables); best weights are restored"})
    bias_lr_scale: float = field(default=1.0, metadata={"help": "LR multiplier for biases and norm parameters "
                                 "(airbench trains BatchNorm biases 64x faster)"})
    lookahead: bool = field(default=False, metadata={"help": "airbench's lookahead: every 5 steps pull the "
                            "weights to their moving average, which tightens as training ends"})
    label_smoothing: float = 0.0
    augment: str = field(default="basic", metadata={"help": "basic = random shift/zoom/flip resampled to the "
                         "input size; crop = whole-pixel shifts of a reflect-padded image + flip"})
    shift: float = field(default=0.125, metadata={"help": "max random translation, fraction of the image"})
    zoom: float = field(default=0.1, metadata={"help": "max random zoom in/out, fraction"})
    mixup: float = field(default=0.0, metadata={"help": "mixup alpha (0 disables)"})
    cutmix: float = field(default=0.0, metadata={"help": "cutmix alpha (0 disables)"})
    grad_accum_steps: int = 1
    max_grad_norm: float | None = None
    mixed_precision: str = field(default="auto", metadata={"help": "auto = bf16/fp16 on GPU; on CPU bf16 where "
                                 "the CPU has native bf16 and the model no depthwise convolutions, else fp32"})
    channels_last: bool = True
    compile: bool = False
    cuda_graphs: bool = field(default=True, metadata={"help": "on one GPU, replay the training forward+backward "
                              "as CUDA graphs (small images are otherwise bound by kernel-launch overhead)"})
    time_limit_minutes: float | None = field(default=None, metadata={"help": "stop training after this many "
                                             "minutes (the run still evaluates and exports); a cosine schedule "
                                             "then anneals to this budget"})
    # transfer learning
    freeze_backbone: bool = field(default=False, metadata={"help": "train the classifier head only"})
    unfreeze_after: int = field(default=0, metadata={"help": "staged schedule: head only for N epochs, "
                                "then the whole network"})
    bn_eval: bool = field(default=False, metadata={"help": "keep BatchNorm statistics frozen while fine-tuning"})
    linear_probe: bool = field(default=False, metadata={"help": "train a linear head on cached frozen features"})
    probe_stages: int = field(default=0, metadata={"help": "with --linear-probe: also train the backbone's last "
                              "N stages, on cached feature maps of the frozen ones (EfficientNet family)"})
    # evaluation
    tta: bool = field(default=False, metadata={"help": "also report horizontal-flip TTA test metrics"})
    # run
    seed: int = 42
    output_dir: str = "runs/latest"
    resume: bool = field(default=False, metadata={"help": "continue from OUTPUT_DIR/checkpoints"})
    report_to: str = "none"
    wandb_log_model: str = field(default="best", metadata={"help": "W&B model artifacts (model-<run id>, with "
                                 "the epoch's metrics, the run config and the dataset fingerprint): all = every "
                                 "epoch's weights (the reference study's run), best = each improving epoch's, "
                                 "end = the best weights once after training, none. Default: best"})
    project_name: str = "cifar-tl"
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False

    def validate(self) -> TrainConfig:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{_flag(name)} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1); got {self.val_fraction}")
        for name in ("batch_size", "eval_batch_size", "epochs", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)} must be >= 1; got {getattr(self, name)}")
        if self.bias_lr_scale <= 0:
            raise ConfigError(f"--bias-lr-scale must be positive; got {self.bias_lr_scale}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive; got {self.lr}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError(f"--max-train-samples must be >= 1; got {self.max_train_samples}")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"--image-size must be >= 8 pixels; got {self.image_size}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"--label-smoothing must be in [0, 1); got {self.label_smoothing}")
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("--push-to-hub needs --hub-model-id user/name")
        if self.probe_stages < 0 or (self.probe_stages and not self.linear_probe):
            raise ConfigError(f"--probe-stages {self.probe_stages} needs --linear-probe and must be >= 0")
        if self.linear_probe and self.freeze_backbone:
            raise ConfigError("--linear-probe already freezes the backbone; drop --freeze-backbone")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _base_type(tp) -> type:
    """`int | None` -> int; the type argparse should convert a flag's text to."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _optional(text: str, convert):
    return None if text.lower() in ("none", "null") else convert(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train an image classifier (baseline CNN or timm transfer learning) with Accelerate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file of TrainConfig fields; flags given here override it")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        tp = hints[f.name]
        base = _base_type(tp)
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata.get("help", " ")}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            nullable = base is not tp
            kwargs["type"] = (lambda s, b=base: _optional(s, b)) if nullable else base
            kwargs["metavar"] = f.name.upper()
            if f.name in CHOICES:  # the metavar hides argparse's own list of choices: name them in the help
                kwargs["choices"] = CHOICES[f.name]
                kwargs["help"] = f"{kwargs['help'].strip()} (one of: {', '.join(CHOICES[f.name])})".lstrip()
        parser.add_argument(f"--{_flag(f.name)}", **kwargs)
    return parser


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value")
    known = {f.name for f in fields(TrainConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    hints = typing.get_type_hints(TrainConfig)
    for key, value in data.items():
        base = _base_type(hints[key])
        if value is None or isinstance(value, base) or (base is float and isinstance(value, int)):
            continue
        try:  # YAML reads 1e-4 (no dot) as a string
            data[key] = base(value) if base is not bool else None
            assert data[key] is not None
        except (TypeError, ValueError, AssertionError):
            raise ConfigError(f"--config {path}: {key} must be {base.__name__}; got {value!r}") from None
    return data


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config", None)
    values = load_yaml(config_path) if config_path else {}
    values.update(args)  # flags override the file
    try:
        cfg = TrainConfig(**values)
    except TypeError as err:
        raise ConfigError(f"bad configuration: {err}") from None
    return cfg.validate()
