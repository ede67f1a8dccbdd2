"""The model folder format: `model.safetensors` + `config.json` in timm's Hub layout plus our extras.

    {"architecture", "num_classes", "num_features", "global_pool", "model_args", "label_names",
     "pretrained_cfg": {input_size, interpolation, mean, std, crop_pct, crop_mode, num_classes, ...},
     "cifar_tl": {data_size, coarse_names, fine_to_coarse, train_config, metrics, dataset_fingerprint,
                  library_name ("timm", or "pytorch" for cifar-tl's own CNNs),
                  base_model (the timm Hub weights training started from, or null)}}

`num_classes` stays out of `model_args` (transformers' timm wrapper passes it twice otherwise). The same
folder loads with `cifar_tl.from_pretrained`, `timm.create_model("local-dir:DIR", pretrained=True)` and
`transformers.pipeline("image-classification", model=DIR)`; README.md is its model card (`cifar_tl.card`).

`python -m cifar_tl.export --checkpoint CKPT --output-dir DIR` (re)exports a folder from a finished run.
CKPT is
  * a run's output dir (RUN/model/ is copied, with a fresh card and the run's plots),
  * a model folder (config.json + model.safetensors),
  * RUN/checkpoints/best.safetensors (the evaluated best weights, config from RUN/model/), or
  * RUN/checkpoints/epoch-NNNN (the Accelerate checkpoint of the last epoch; test metrics kept only when N is the best epoch).
Labels, preprocessing and the training config always come from the run's model/config.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from .card import write_card
from .files import atomic_path, atomic_write_text
from .models import create_model

FORMAT_VERSION = 1


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """safetensors, written atomically (tmp + rename), contiguous CPU tensors."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


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
            "library_name": "timm" if timm.is_model(architecture) else "pytorch",
            "base_model": base_model(architecture, train_config or {}),
        },
    }


def base_model(architecture: str, train_config: dict) -> str | None:
    """The Hub id of the ImageNet weights a run started from: timm's default tag for the architecture, which
    is what `create_model(pretrained=True)` loads (the offline Lite0 package ports the same TF weights)."""
    if not timm.is_model(architecture) or not train_config.get("pretrained") or train_config.get("weights"):
        return None
    cfg = timm.models.get_pretrained_cfg(architecture)
    return cfg.hf_hub_id if cfg is not None else None


def save_model_dir(model: torch.nn.Module, config: dict, out_dir: str | os.PathLike, *,
                   repo_id: str | None = None, run_dir: Path | None = None) -> Path:
    """Weights, config.json and the model card (with the run's plots; `run_dir` defaults to the parent folder
    when it holds a run's metrics.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "model.safetensors")
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    write_card(out, config, repo_id=repo_id, run_dir=run_dir)
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


def load_model_dir(model_dir: str | os.PathLike, weights: Path | None = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from config.json and load model.safetensors, or another safetensors file of the same
    model (never pickle)."""
    config = read_config(model_dir)
    weights = weights or Path(model_dir) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights.parent}: no {weights.name}")
    model = create_model(config["architecture"], pretrained=False, num_classes=len(config["label_names"]),
                         **config.get("model_args", {}))
    state = load_file(str(weights))
    for prefix in ("module.", "_orig_mod."):  # DDP- and torch.compile-wrapped checkpoints
        consume_prefix_in_state_dict_if_present(state, prefix)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:])[:300]
        raise ValueError(f"{weights} does not fit the {config['architecture']} described by "
                         f"{Path(model_dir) / 'config.json'}: {detail}") from None
    return model.eval(), config


# --------------------------------------------------------------------------------------------- export CLI


@dataclass
class Checkpoint:
    weights: Path
    model_dir: Path  # the folder whose config.json describes the weights
    run_dir: Path | None
    epoch: int | None = None  # an intermediate epoch; None = the evaluated best weights


def resolve_checkpoint(checkpoint: str | os.PathLike) -> Checkpoint:
    path = Path(checkpoint)
    if (path / "model" / "config.json").is_file():
        return Checkpoint(path / "model" / "model.safetensors", path / "model", path)
    if (path / "config.json").is_file():
        run = path.parent if (path.parent / "metrics.json").is_file() else None
        return Checkpoint(path / "model.safetensors", path, run)
    run = path.parent.parent
    if path.is_file() and path.name == "best.safetensors":
        return Checkpoint(path, run / "model", run)
    if (path / "trainer_state.json").is_file():
        state = json.loads((path / "trainer_state.json").read_text())
        return Checkpoint(path / "model.safetensors", run / "model", run, epoch=int(state["epoch"]))
    raise FileNotFoundError(f"--checkpoint {path}: expected a run's output dir, a model folder, "
                            "RUN/checkpoints/best.safetensors or RUN/checkpoints/epoch-NNNN")


def export_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike,
                      repo_id: str | None = None) -> Path:
    source = resolve_checkpoint(checkpoint)
    if not (source.model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no {source.model_dir}/config.json; the run must "
                                "have finished once (it writes the labels and preprocessing there)")
    model, config = load_model_dir(source.model_dir, source.weights)
    extra = config.setdefault("cifar_tl", {})
    if source.epoch is not None and source.epoch != (extra.get("metrics") or {}).get("best_epoch"):
        extra["metrics"] = {}  # the test metrics belong to the best epoch, not to these weights
    return save_model_dir(model, config, output_dir, repo_id=repo_id, run_dir=source.run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifar_tl.export", description="Export a model folder "
                                     "(model.safetensors, config.json, README.md) from a training run.")
    parser.add_argument("--checkpoint", required=True, help="run output dir, model folder, "
                        "RUN/checkpoints/best.safetensors or RUN/checkpoints/epoch-NNNN")
    parser.add_argument("--output-dir", required=True, help="folder to write (may be the source folder)")
    parser.add_argument("--hub-model-id", help="user/name the card's loading snippets should use")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.output_dir, args.hub_model_id)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
