"""The model folder format: `model.safetensors` + `config.json` in timm's Hub layout plus our extras.

    {"architecture", "num_classes", "num_features", "global_pool", "model_args", "label_names",
     "pretrained_cfg": {input_size, interpolation, mean, std, crop_pct, crop_mode, num_classes, ...},
     "cifar_tl": {data_size, coarse_names, fine_to_coarse, train_config, metrics, dataset_fingerprint}}

`num_classes` stays out of `model_args` (transformers' timm wrapper passes it twice otherwise). The same
folder loads with `cifar_tl.from_pretrained`, `timm.create_model("local-dir:DIR", pretrained=True)` and
`transformers.pipeline("image-classification", model=DIR)`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .models import create_model

FORMAT_VERSION = 1


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """safetensors, written atomically (tmp + rename), contiguous CPU tensors."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def model_config(model: torch.nn.Module, *, architecture: str, image_size: int, mean, std, data_size: int,
                 fine_names: list[str], coarse_names: list[str] | None, fine_to_coarse: list[int] | None,
                 train_config: dict | None = None, metrics: dict | None = None,
                 dataset_fingerprint: str | None = None) -> dict:
    base = dict(getattr(model, "pretrained_cfg", {}) or {})
    pretrained_cfg = {
        "architecture": architecture,
        "input_size": [3, image_size, image_size],
        "interpolation": "bilinear",  # what training used to upscale (augment.eval_transform)
        "mean": list(mean), "std": list(std),
        "crop_pct": 1.0, "crop_mode": "center",
        "num_classes": len(fine_names),
        "first_conv": base.get("first_conv"), "classifier": base.get("classifier"),
        "fixed_input_size": False,
    }
    model_args = {k: v for k, v in (getattr(model, "model_args", None) or {}).items() if k != "num_classes"}
    return {
        "architecture": architecture,
        "num_classes": len(fine_names),
        "num_features": int(model.num_features),
        "global_pool": "avg",
        "model_args": model_args,
        "label_names": list(fine_names),
        "pretrained_cfg": pretrained_cfg,
        "cifar_tl": {
            "format_version": FORMAT_VERSION,
            "data_size": data_size,
            "coarse_names": coarse_names,
            "fine_to_coarse": fine_to_coarse,
            "dataset_fingerprint": dataset_fingerprint,
            "train_config": train_config or {},
            "metrics": metrics or {},
        },
    }


def save_model_dir(model: torch.nn.Module, config: dict, out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "model.safetensors")
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    return out


def read_config(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a cifar-tl model folder)")
    config = json.loads(path.read_text())
    for key in ("architecture", "label_names", "pretrained_cfg"):
        if key not in config:
            raise ValueError(f"{path}: missing '{key}'")
    return config


def load_model_dir(model_dir: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from config.json and load model.safetensors (never pickle)."""
    config = read_config(model_dir)
    weights = Path(model_dir) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{model_dir}: no model.safetensors")
    model = create_model(config["architecture"], pretrained=False, num_classes=len(config["label_names"]),
                         **config.get("model_args", {}))
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), config
