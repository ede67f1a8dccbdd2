"""Typed training configuration: dataclass defaults <- YAML file (--config) <- command-line flags."""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .console import FlagParser, did_you_mean


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag and what to do."""


CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("adam", "adamw", "sgd", "muon"),
    "scheduler": ("plateau", "cosine", "linear", "none"),
    "augment": ("none", "basic", "crop", "randaugment"),
    "mixed_precision": ("auto", "no", "fp16", "bf16"),
    "report_to": ("none", "wandb", "tensorboard", "all"),
    "wandb_log_model": ("all", "best", "end", "none"),
    "head_init": ("zero", "timm"),
}


# Model-aware defaults. A network that starts from ImageNet weights gets the reference transfer recipe (the
# study's); one trained from scratch gets a recipe that learns fast from scratch. On 5,000 real CIFAR-10 images,
# 2 epochs (2,000 test images): baseline_cnn_bn 49.9 % with it against 40.9 % with the transfer recipe, the
# study's baseline_cnn (no BatchNorm, a slow learner by design) 29.1 % against 28.2 %.
# Every option falls back one by one: a flag replaces only itself. The optimiser options are named apart for the
# log ("your --lr; the rest scratch defaults").
OPTIMISER_OPTIONS = ("optimizer", "lr", "momentum", "weight_decay", "scheduler", "warmup_epochs", "min_lr",
                     "label_smoothing", "bias_lr_scale")
RECIPES: dict[str, dict] = {
    "transfer": {"optimizer": "adam", "lr": 1e-4, "momentum": 0.9, "weight_decay": 0.0, "scheduler": "plateau",
                 "warmup_epochs": 0.0, "min_lr": 1e-6, "label_smoothing": 0.0, "bias_lr_scale": 1.0,
                 "batch_size": 64, "augment": "basic", "shift": 0.125, "early_stopping_patience": 10},
    "scratch": {"optimizer": "adamw", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.05, "scheduler": "cosine",
                "warmup_epochs": 0.3, "min_lr": 1e-6, "label_smoothing": 0.1, "bias_lr_scale": 1.0,
                "batch_size": 64, "augment": "crop", "shift": 0.0625, "early_stopping_patience": 0},
}

# options of full training that the cached-feature probe (--linear-probe) does not use, with their "off" value
PROBE_IGNORES: dict[str, object] = {
    "mixup": 0.0, "cutmix": 0.0, "cutout": 0, "alternating_flip": False, "lookahead": False, "layer_decay": None,
    "grad_accum_steps": 1, "max_grad_norm": None, "whiten_bias_epochs": 0.0, "unfreeze_after": 0, "bn_eval": False,
    "tta_level": 1, "progressive_resize": None,  # features are cached at one size
}


@dataclass
class TrainConfig:
    # data
    dataset: str = field(default="uoft-cs/cifar100", metadata={"help": "Hub id, parquet/save_to_disk dir, "
                         "cifar-100-python or cifar-10-batches-py dir or .tar.gz, or an image folder"})
    image_column: str | None = field(default=None, metadata={"help": "image column (default: img or image)"})
    label_column: str | None = field(default=None, metadata={"help": "fine label column (default: fine_label or "
                                                                                "label)"})
    coarse_label_column: str | None = field(default=None, metadata={"help": "coarse label column "
                                            "(default: coarse_label if present)"})
    train_split: str = field(default="train", metadata={"help": "the split to train on (a validation share is drawn "
                             "from it: --val-fraction)"})
    test_split: str = field(default="test", metadata={"help": "the split the final test metrics are measured on"})
    val_fraction: float = field(default=0.1, metadata={"help": "stratified validation share of the train split"})
    test_fraction: float = field(default=0.1, metadata={"help": "a source with a train split alone (a folder of "
                                 "class folders): this stratified share of its train split, drawn the same way "
                                 "in every run and in evaluate, is the test split; 0: an error instead"})
    max_train_samples: int | None = field(default=None, metadata={"help": "train on a stratified subsample of "
                                                                                 "this many images (default: all)"})
    data_cache: bool = field(default=True, metadata={"help": "cache the decoded uint8 tensor store on disk"})
    store_size: int | None = field(default=None, metadata={"help": "decode every image to SIZE x SIZE (short side "
                                   "resized, centre crop); default: the source's own size when all its images "
                                   "share one square size, else the model's input size capped at 256"})
    # model
    model: str = field(default="efficientnet_b0", metadata={"help": "baseline_cnn (the study's CNN), "
                       "baseline_cnn_bn[_small|_wide], fast_cnn[_wide|_96] or any timm model name"})
    pretrained: bool | None = field(default=None, metadata={"help": "start from ImageNet weights; default auto: "
                                    "yes where the model has them (timm models), from scratch where it has none "
                                    "(our CNNs); --pretrained on a model without weights is an error"})
    weights: str | None = field(default=None, metadata={"help": "initial weights file (.safetensors or .pth)"})
    image_size: int | None = field(default=None, metadata={"help": "model input size (default: the model's own)"})
    drop_rate: float = field(default=0.2, metadata={"help": "dropout before the classifier"})
    drop_path_rate: float = field(default=0.0, metadata={"help": "stochastic depth for timm models: each residual "
                                  "block is skipped at random in training, at a rate growing with depth up to "
                                  "RATE (timm's drop_path_rate; 0.1-0.2 is usual for fine-tuning); 0 = off"})
    # optimisation (None: a model-aware default, see RECIPES)
    batch_size: int | None = field(default=None, metadata={"help": "training images per batch, over all processes "
                                   "(an optimiser step takes GRAD_ACCUM_STEPS batches)"})
    eval_batch_size: int = field(default=256, metadata={"help": "images per batch in validation and testing"})
    epochs: int = field(default=15, metadata={"help": "training epochs (fewer with early stopping or "
                        "--time-limit-minutes)"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate"})
    weight_decay: float | None = field(default=None, metadata={"help": "weight decay"})
    momentum: float | None = field(default=None, metadata={"help": "momentum of --optimizer sgd and of muon's SGD part"})
    optimizer: str | None = field(default=None, metadata={"help": "muon = Muon (orthogonalised momentum) for the "
                                  "conv filters and Nesterov SGD (--lr, --momentum, --weight-decay) for the rest, as "
                                  "airbench94_muon"})
    muon_lr: float = field(default=0.24, metadata={"help": "--optimizer muon: the filters' learning rate (Muon's "
                           "update has a fixed size: independent of the batch size and loss scale)"})
    muon_momentum: float = field(default=0.6, metadata={"help": "--optimizer muon: the filters' Nesterov momentum"})
    scheduler: str | None = field(default=None, metadata={"help": "plateau (on val loss), cosine or linear decay "
                                  "to --min-lr after --warmup-epochs, or none"})
    warmup_epochs: float | None = field(default=None, metadata={"help": "linear LR warmup, in epochs"})
    plateau_factor: float = field(default=0.5, metadata={"help": "--scheduler plateau: the LR is multiplied by "
                                  "this"})
    plateau_patience: int = field(default=5, metadata={"help": "--scheduler plateau: after this many epochs "
                                  "without val-loss improvement"})
    min_lr: float | None = field(default=None, metadata={"help": "the LR the schedule ends at (plateau: its floor)"})
    early_stopping_patience: int | None = field(default=None, metadata={"help": "epochs without val-loss "
                                                "improvement before stopping (0 disables); best weights are "
                                                "restored"})
    bias_lr_scale: float | None = field(default=None, metadata={"help": "LR multiplier for biases and norm "
                                        "parameters (airbench trains BatchNorm biases 64x faster)"})
    lookahead: bool = field(default=False, metadata={"help": "airbench's lookahead: every 5 steps pull the "
                            "weights to their moving average, which tightens as training ends"})
    ema_decay: float = field(default=0.0, metadata={"help": "keep an exponential moving average of the weights "
                             "(per step, warmed up as min(DECAY, (1+t)/(10+t))); validation, the best checkpoint, "
                             "the test evaluation and the exported model use it; 0 = off"})
    layer_decay: float | None = field(default=None, metadata={"help": "layer-wise LR decay (timm's "
                                      "param_groups_layer_decay): layer i of n trains at lr * DECAY^(n-1-i), the "
                                      "head at lr; e.g. 0.8 for fine-tuning (not with --optimizer muon)"})
    whiten_bias_epochs: float = field(default=0.0, metadata={"help": "fast_cnn: train the whitening stem's bias "
                                      "only for the first N epochs, then freeze it (airbench: 3); 0 = always"})
    label_smoothing: float | None = field(default=None, metadata={"help": "label smoothing of the loss"})
    augment: str | None = field(default=None, metadata={"help": "basic = random shift/zoom/flip resampled to "
                                "the input size; crop = whole-pixel shifts of a reflect-padded image + flip"})
    shift: float | None = field(default=None, metadata={"help": "max random translation, fraction of the image"})
    zoom: float = field(default=0.1, metadata={"help": "max random zoom in/out, fraction"})
    progressive_resize: int | None = field(default=None, metadata={"help": "train the first epochs at START px "
                                           "and grow linearly to --image-size by the last one (multiples of 8 up "
                                           "to 64 px, of 32 above; validation and test at --image-size; one CUDA "
                                           "graph per size); with --time-limit-minutes the size follows the clock"})
    resize_full_at: float = field(default=1.0, metadata={"help": "with --progressive-resize and "
                                  "--time-limit-minutes: the share of the training time after which epochs start "
                                  "at the full --image-size"})
    alternating_flip: bool = field(default=False, metadata={"help": "with --augment crop: each image is mirrored "
                                   "in every other epoch (a fixed random half in odd epochs, the rest in even ones) "
                                   "instead of at random (airbench's derandomised flip)"})
    cutout: int = field(default=0, metadata={"help": "with --augment crop: blank a random SIZE x SIZE square of "
                        "each training image (airbench96: 12 px); 0 = off"})
    mixup: float = field(default=0.0, metadata={"help": "mixup alpha (0 disables)"})
    cutmix: float = field(default=0.0, metadata={"help": "cutmix alpha (0 disables)"})
    grad_accum_steps: int = field(default=1, metadata={"help": "batches whose gradients are summed into one "
                                  "optimiser step"})
    max_grad_norm: float | None = field(default=None, metadata={"help": "clip the gradient norm to this; "
                                        "default: no clipping"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto = bf16/fp16 on GPU; on CPU bf16 where "
                                 "the CPU has native bf16 and the model no depthwise convolutions, else fp32"})
    channels_last: bool = field(default=True, metadata={"help": "channels-last memory format (faster convolutions "
                                "on GPUs and most CPUs)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (minutes of compiling first)"})
    cuda_graphs: bool = field(default=True, metadata={"help": "on one GPU, replay the training forward+backward "
                              "as CUDA graphs (small images are otherwise bound by kernel-launch overhead)"})
    time_limit_minutes: float | None = field(default=None, metadata={"help": "a wall-clock budget for the whole "
                                             "run, counted from its start (data, model and a probe's feature "
                                             "extraction included): training stops in time for the test "
                                             "evaluation (its time predicted from validation's) to end within it; "
                                             "a cosine or linear schedule anneals to the budget"})
    # transfer learning
    head_init: str | None = field(default=None, metadata={"help": "the new classifier's initial weights: zero "
                                  "(the default with pretrained weights or --weights: the pretrained features get "
                                  "no random gradients while the head starts; BiT's init) or timm (the "
                                  "architecture's own random init; the default from scratch)"})
    freeze_backbone: bool = field(default=False, metadata={"help": "train the classifier head only"})
    unfreeze_after: int = field(default=0, metadata={"help": "staged schedule: head only for N epochs, "
                                "then the whole network"})
    bn_eval: bool = field(default=False, metadata={"help": "keep BatchNorm statistics frozen while fine-tuning"})
    linear_probe: bool = field(default=False, metadata={"help": "train a linear head on cached frozen features"})
    probe_stages: int = field(default=0, metadata={"help": "with --linear-probe: also train the backbone's last "
                              "N stages, on cached feature maps of the frozen ones (EfficientNet family)"})
    # evaluation
    tta: bool = field(default=False, metadata={"help": "also report test metrics with test-time augmentation"})
    tta_level: int = field(default=1, metadata={"help": "--tta views: 1 = image + mirror image; 2 = also both "
                           "shifted by 1 px (6 views, airbench's)"})
    # run
    seed: int = field(default=42, metadata={"help": "seeds the split, initialisation, augmentation and order"})
    output_dir: str = field(default="runs/latest", metadata={"help": "where checkpoints, metrics, the report, "
                            "the plots and the exported model folder go"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "start again in an --output-dir that "
                                                                 "holds a run, deleting its checkpoints and results "
                                                                 "(without it such a folder is refused)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUTPUT_DIR/checkpoints (the newest "
                         "checkpoint that verifies)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "complete checkpoints kept; --resume falls back to "
                                  "an older one when the newest is damaged"})
    report_to: str = field(default="none", metadata={"help": "experiment tracking (W&B: `wandb login` first, or "
                           "WANDB_MODE=offline)"})
    wandb_log_model: str = field(default="best", metadata={"help": "W&B model artifacts (model-<run id>, with "
                                 "the epoch's metrics, the run config and the dataset fingerprint): all = every "
                                 "epoch's weights (the reference study's run), best = each improving epoch's, "
                                 "end = the best weights once after training, none. Default: best"})
    project_name: str = field(default="cifar-tl", metadata={"help": "the W&B / TensorBoard project"})
    push_to_hub: bool = field(default=False, metadata={"help": "push the exported model folder to the Hub after "
                              "the run (the access is checked before training)"})
    hub_model_id: str | None = field(default=None, metadata={"help": "with --push-to-hub: the Hub repo id "
                                     "(USER/NAME)"})
    hub_private: bool = field(default=False, metadata={"help": "with --push-to-hub: create the repo private"})

    def resolve(self, explicit: set[str] | None = None) -> TrainConfig:
        """Fill the model-aware defaults (`pretrained` auto, the recipe) for the options not in `explicit` (what
        the user set; by default the options that differ from their dataclass default). `self.origin` records
        where the choices came from, for the log and metrics.json. Idempotent."""
        if getattr(self, "origin", None) is not None:
            return self
        if explicit is None:
            explicit = {f.name for f in fields(self) if getattr(self, f.name) != f.default}
        from .models import has_pretrained_weights  # timm's registry: only once a config is resolved

        origin = {"pretrained": "--pretrained" if self.pretrained else "--no-pretrained"}
        if self.pretrained is None:
            self.pretrained = has_pretrained_weights(self.model)
            origin["pretrained"] = "auto: " + ("the model has ImageNet weights" if self.pretrained
                                               else "the model has no pretrained weights")
        recipe = "transfer" if self.pretrained or self.weights else "scratch"
        if self.head_init is None:
            self.head_init = "zero" if recipe == "transfer" else "timm"
            origin["head_init"] = f"auto: {'pretrained weights' if recipe == 'transfer' else 'from scratch'}"
        else:
            origin["head_init"] = f"--head-init {self.head_init}"
        # each option not set comes from the model's recipe: a new --lr keeps the rest of it (schedule, decay...)
        optimiser_set = sorted(explicit & set(OPTIMISER_OPTIONS))
        origin["recipe"] = (f"{recipe} defaults" if not optimiser_set else "your settings"
                            if len(optimiser_set) == len(OPTIMISER_OPTIONS) else
                            f"your {', '.join('--' + _flag(n) for n in optimiser_set)}; the rest {recipe} defaults")
        for name, value in RECIPES[recipe].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.origin, self.explicit = origin, frozenset(explicit)
        return self

    def validate(self) -> TrainConfig:
        self.resolve()
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{_flag(name)} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{_flag(name)} must be in [0, 1); got {getattr(self, name)}")
        for name in ("batch_size", "eval_batch_size", "epochs", "grad_accum_steps", "keep_checkpoints",
                     "plateau_patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)} must be >= 1; got {getattr(self, name)}")
        if self.bias_lr_scale <= 0:
            raise ConfigError(f"--bias-lr-scale must be positive; got {self.bias_lr_scale}")
        self._validate_ranges()
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive; got {self.lr}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError(f"--max-train-samples must be >= 1; got {self.max_train_samples}")
        for name in ("image_size", "store_size"):
            if getattr(self, name) is not None and getattr(self, name) < 8:
                raise ConfigError(f"--{_flag(name)} must be >= 8 pixels; got {getattr(self, name)}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"--drop-path-rate must be in [0, 1); got {self.drop_path_rate}")
        # a dropout of 2, a shift of 3 images or a zoom of 500 % failed inside torch, or trained on noise
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"--drop-rate must be in [0, 1); got {self.drop_rate}")
        if not 0.0 <= self.shift <= 0.5:
            raise ConfigError(f"--shift is a fraction of the image, in [0, 0.5]; got {self.shift}")
        if not 0.0 <= self.zoom < 1.0:
            raise ConfigError(f"--zoom is a fraction, in [0, 1); got {self.zoom}")
        if self.min_lr > self.lr:  # the "decay" would raise the learning rate to it
            if "min_lr" in self.explicit:
                raise ConfigError(f"--min-lr {self.min_lr} must not exceed --lr {self.lr}")
            self.min_lr = self.lr  # the recipe's floor under a tiny --lr: the schedule stays flat
        from .architectures import is_own  # timm's registry, as in resolve()

        if self.drop_path_rate and is_own(self.model):
            raise ConfigError(f"--drop-path-rate: {self.model} has no residual blocks to drop (stochastic depth "
                              "is for timm models such as the EfficientNets); leave it at 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"--label-smoothing must be in [0, 1); got {self.label_smoothing}")
        if self.tta_level not in (1, 2):
            raise ConfigError(f"--tta-level must be 1 (mirror) or 2 (mirror + 1 px shifts); got {self.tta_level}")
        if self.alternating_flip and self.augment != "crop":
            raise ConfigError(f"--alternating-flip needs --augment crop; got --augment {self.augment}")
        if self.cutout < 0 or (self.cutout and self.augment != "crop"):
            raise ConfigError(f"--cutout {self.cutout} must be >= 0 and needs --augment crop; got --augment "
                              f"{self.augment}")
        if self.whiten_bias_epochs < 0:
            raise ConfigError(f"--whiten-bias-epochs must be >= 0; got {self.whiten_bias_epochs}")
        if self.muon_lr <= 0:
            raise ConfigError(f"--muon-lr must be positive; got {self.muon_lr}")
        self._validate_transfer_options()
        if not self.dataset.strip():  # an unset $DATA: the current folder would be read as an image folder
            raise ConfigError("--dataset is empty: give a Hub id or a local path")
        if self.train_split == self.test_split:
            raise ConfigError(f"--train-split and --test-split are both {self.train_split!r}: the test metrics would "
                              "be measured on training images")
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("--push-to-hub needs --hub-model-id user/name")
        if self.probe_stages < 0 or (self.probe_stages and not self.linear_probe):
            raise ConfigError(f"--probe-stages {self.probe_stages} needs --linear-probe and must be >= 0")
        if self.linear_probe and self.freeze_backbone:
            raise ConfigError("--linear-probe already freezes the backbone; drop --freeze-backbone")
        return self

    def _validate_ranges(self) -> None:
        """Values that would run but mean nothing: a negative patience stopped after one epoch, a negative time
        limit after one batch."""
        if self.resume and self.overwrite_output_dir:
            raise ConfigError("--resume continues the run in --output-dir and --overwrite-output-dir starts it "
                              "again: give one of them")
        if self.time_limit_minutes is not None and self.time_limit_minutes <= 0:
            raise ConfigError(f"--time-limit-minutes must be positive; got {self.time_limit_minutes}")
        if not 0.0 < self.plateau_factor < 1.0:
            raise ConfigError(f"--plateau-factor must be in (0, 1); got {self.plateau_factor}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"--max-grad-norm must be positive; got {self.max_grad_norm}")
        for name in ("early_stopping_patience", "warmup_epochs", "min_lr", "weight_decay", "momentum", "shift",
                     "zoom", "mixup", "cutmix", "unfreeze_after"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{_flag(name)} must be >= 0; got {value}")
        for name in ("momentum", "muon_momentum"):
            if getattr(self, name) is not None and getattr(self, name) >= 1:
                raise ConfigError(f"--{_flag(name)} must be below 1; got {getattr(self, name)}")

    def _validate_transfer_options(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"--ema-decay must be in [0, 1) (0 = off); got {self.ema_decay}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"--layer-decay must be in (0, 1]; got {self.layer_decay}")
        if self.layer_decay is not None and self.optimizer == "muon":
            raise ConfigError("--layer-decay needs --optimizer sgd, adam or adamw (Muon sizes its own updates)")
        if self.progressive_resize is not None and not 8 <= self.progressive_resize <= self.training_side():
            raise ConfigError(f"--progressive-resize {self.progressive_resize} must be between 8 and the training "
                              f"size, {self._side_named()}")
        if self.progressive_resize is not None and not 0.0 < self.resize_full_at <= 1.0:
            raise ConfigError(f"--resize-full-at must be in (0, 1]; got {self.resize_full_at}")
        if self.cutout and self.cutout >= (self.progressive_resize or self.training_side()):
            smallest = (f"--progressive-resize {self.progressive_resize} px, the size training starts at" if
                        self.progressive_resize else self._side_named())
            raise ConfigError(f"--cutout {self.cutout} would blank the whole image: it must be smaller than "
                              f"{smallest}")
        kept = [f"--{_flag(name)}" for name in ("freeze_backbone", "unfreeze_after", "bn_eval") if getattr(self, name)]
        if kept and not (self.pretrained or self.weights):  # they keep learned parts fixed: random ones here
            raise ConfigError(f"{', '.join(kept)} keep{'s' if len(kept) == 1 else ''} pretrained parts of the network "
                              f"fixed, but {self.model} trains from scratch here (random weights); give --weights FILE "
                              "(or --pretrained, for a model with ImageNet weights), or drop " + ("it" if len(kept) == 1 else "them"))
        if self.linear_probe:  # options the cached-feature probe has no use for: an error, not silently dropped
            ignored = [f"--{_flag(name)}" for name, off in PROBE_IGNORES.items() if getattr(self, name) != off]
            if ignored:
                raise ConfigError(f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply to "
                                  "--linear-probe (it trains on cached features with AdamW, mirrored maps as its "
                                  "only augmentation and flip TTA); drop "
                                  + ("it" if len(ignored) == 1 else "them") + " or train without --linear-probe")

    def training_side(self) -> int:
        """The side of the images the model trains and is tested on: --image-size, else the model's own."""
        from .models import default_input_size  # timm's registry, as in resolve()

        return self.image_size or default_input_size(self.model)

    def _side_named(self) -> str:
        return (f"--image-size {self.image_size} px" if self.image_size else
                f"{self.training_side()} px ({self.model}'s own; set another with --image-size)")

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


def _converter(base: type, nullable: bool):
    """A flag's type: `base` (a float must be finite), or None for "none" / "null" where the option may be
    unset; named as `base` is, for argparse's "invalid float value: 'abc'"."""
    def convert(text: str):
        if nullable and text.lower() in ("none", "null"):
            return None
        value = base(text)
        if base is float and not math.isfinite(value):
            raise ValueError(text)
        return value

    convert.__name__ = base.__name__
    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        description="Train an image classifier (baseline CNN or timm transfer learning) with Accelerate.",
        epilog="Model-aware defaults: --pretrained is auto (ImageNet weights where the model has them), and the "
               "recipe options not set by flag or in a --config file (--optimizer, --lr, --momentum, --weight-decay, "
               "--scheduler, --warmup-epochs, --min-lr, --label-smoothing, --bias-lr-scale, --batch-size, "
               "--augment, --shift, --early-stopping-patience) come from the from-scratch recipe for a model "
               "trained from scratch, from the transfer recipe for a pretrained one (each option's help names both "
               "values); null in a --config file means the same as leaving the option out. The resolved configuration is written to "
               "OUTPUT_DIR/config.yaml; --config OUTPUT_DIR/config.yaml --output-dir NEW_DIR reproduces the run.",
    )
    parser.add_argument("--config", help="YAML file of TrainConfig fields; flags given here override it")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        tp = hints[f.name]
        base = _base_type(tp)
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS}
        text, notes = f.metadata.get("help", ""), []
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            nullable = base is not tp and f.name not in CHOICES  # "none" is a choice of augment and scheduler
            kwargs["type"] = _converter(base, nullable)
            kwargs["metavar"] = f.name.upper()
            if f.name in CHOICES:  # the metavar hides argparse's own list of choices: name them in the help
                kwargs["choices"] = CHOICES[f.name]
                notes.append(f"one of: {', '.join(CHOICES[f.name])}")
        # flags default to SUPPRESS (so a --config file's values stand): the help names each field's default
        if f.name in RECIPES["scratch"]:
            transfer, scratch = RECIPES["transfer"][f.name], RECIPES["scratch"][f.name]
            notes.append(f"model-aware default: {transfer} with pretrained weights, {scratch} from scratch"
                         if transfer != scratch else f"default: {transfer}")
        elif f.default is not None and "default" not in text.lower():
            notes.append(f"default: {('on' if f.default else 'off') if base is bool else f.default}")
        kwargs["help"] = " ".join([text, *(f"({note})" for note in notes)]).strip() or " "
        parser.add_argument(f"--{_flag(f.name)}", **kwargs)
    return parser


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {path}: a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (UnicodeDecodeError, OSError) as err:
        raise ConfigError(f"--config {path}: cannot be read as text ({err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"--config {path}: not valid YAML{where} ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value")
    known = {f.name for f in fields(TrainConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) {', '.join(unknown)}"
                          + did_you_mean(unknown[0], sorted(known)))
    hints = typing.get_type_hints(TrainConfig)
    for key, value in data.items():
        base = _base_type(hints[key])
        if value is None and base is hints[key]:  # only options that may be unset take null
            raise ConfigError(f"--config {path}: {key} cannot be null; give it "
                              f"{'an integer' if base is int else 'a ' + base.__name__} or leave it out")
        if value is None or base is str and isinstance(value, str):
            continue
        try:  # YAML reads 1e-4 (no dot) as a string; yes/on are booleans only where a boolean is meant
            if base is bool:
                assert isinstance(value, bool)
            else:
                assert not isinstance(value, bool)
                if base is int and isinstance(value, float):  # 3.0 is 3; 2.7 epochs is a mistake
                    assert value.is_integer()
                    value = int(value)
                data[key] = _converter(base, False)(str(value))
        except (TypeError, ValueError, AssertionError):
            raise ConfigError(f"--config {path}: {key} must be {'an integer' if base is int else base.__name__}"
                              f"{' (finite)' if base is float else ''}; got {value!r}") from None
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
    # null in a file (or `--lr none`) asks for the default, as leaving the option out does
    return cfg.resolve(explicit={k for k, v in values.items() if v is not None}).validate()


# what a --resume must train with as the run did: the recipe (the epoch count may grow: `--resume --epochs N`)
RESUME_KEEPS = ("pretrained", "weights", "image_size", "drop_rate", "drop_path_rate", "batch_size", "lr",
                "weight_decay", "momentum", "optimizer", "muon_lr", "muon_momentum", "scheduler", "warmup_epochs",
                "plateau_factor", "plateau_patience", "min_lr", "early_stopping_patience", "bias_lr_scale",
                "lookahead", "ema_decay", "layer_decay", "whiten_bias_epochs", "label_smoothing", "augment", "shift",
                "zoom", "progressive_resize", "resize_full_at", "alternating_flip", "cutout", "mixup", "cutmix",
                "grad_accum_steps", "max_grad_norm", "mixed_precision", "time_limit_minutes", "head_init",
                "freeze_backbone", "unfreeze_after", "bn_eval", "linear_probe", "probe_stages", "store_size")


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    """The fully resolved configuration, as `--config` reads it: `--config PATH` reproduces the run."""
    from .files import atomic_write_text

    values = {k: v for k, v in cfg.to_dict().items() if k not in ("resume", "overwrite_output_dir")}
    atomic_write_text(path, "# written by cifar-tl: the resolved configuration of this run; reproduce it with\n"
                      f"# python train.py --config {path} --output-dir NEW_DIR (or continue it: --resume)\n"
                      + yaml.safe_dump(values, sort_keys=False))
