"""The model folder, the one thing that goes to the Hub: this module is its only writer and its reader.

    model.safetensors   the weights (safetensors only, never pickle)
    config.json         timm's Hub config (`save_config_for_hf`): architecture, num_classes, label_names,
                        model_args, pretrained_cfg (input_size, mean, std, interpolation=bilinear, crop_pct=1)
                        + "cifar_tl": {format_version, data_size, coarse_names, fine_to_coarse, train_config,
                        metrics, dataset_fingerprint, data (source, kind, split sizes), parameters (total /
                        trainable / non_trainable, counted as Keras does), library_name, base_model,
                        weights_source (ImageNet weights from an offline package, not the Hub),
                        files: {"model.safetensors": {size, sha256}}}
    README.md           the model card (`card.render_card`); README.md.sha256 beside it records the card as
                        written, so a push re-renders it only when nobody has edited it (not uploaded)
    confusion.json      the test confusion matrix the demo shows ({"labels", "matrix"}, rows = true class)
    plots/*.png         the run's evaluation plots, embedded in the card

The folder is written whole into a temporary sibling and then moved into place (`files.atomic_folder`): a
write that fails leaves the previous folder as it was. Loading checks model.safetensors against the size and
sha256 config.json records (and, for folders without them, its own header) before torch reads it.

Format 2 renamed our BatchNorm CNN: `baseline_cnn` is now the study's CNN and format-1 folders' `baseline_cnn*`
are `baseline_cnn_bn*`; `load_model` maps them (`LEGACY_ARCHITECTURES`), the only place that knows the old names.

`num_classes` stays out of `model_args` (transformers' timm wrapper passes it twice otherwise). The same
folder loads with `cifar_tl.from_pretrained`, `timm.create_model("local-dir:DIR", pretrained=True)` and
`transformers.pipeline("image-classification", model=DIR)` (our own CNNs in timm once `cifar_tl.architectures`
is imported)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models._hub import save_config_for_hf
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from .architectures import is_own
from .card import render_card
from .files import atomic_folder, atomic_path, atomic_write_text
from .integrity import check_weights, manifest, seal
from .models import create_model
from .summary import parameter_counts

FORMAT_VERSION = 2  # 2: baseline_cnn is the study's CNN (format 1's baseline_cnn* are baseline_cnn_bn*); data,
# parameters, files
LEGACY_ARCHITECTURES = {1: {"baseline_cnn": "baseline_cnn_bn", "baseline_cnn_small": "baseline_cnn_bn_small",
                            "baseline_cnn_wide": "baseline_cnn_bn_wide"}}
WEIGHTS = "model.safetensors"
UNSAFE_MODEL_ARGS = {"num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                     "weights", "cache_dir"}
UMASK = os.umask(0o022)  # the process's umask (read by setting it, so set back at once)
os.umask(UMASK)


def save_weights(model: torch.nn.Module | dict[str, torch.Tensor], path: Path) -> None:
    """A model's weights (or a state dict, e.g. a weight average's) as safetensors, written atomically (tmp +
    rename), contiguous CPU tensors."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o666 & ~UMASK)  # safetensors 0.8 creates 0600: readable like the folder's other files


def folder_config(model: torch.nn.Module, *, image_size: int, mean, std, data_size: int, fine_names: list[str],
                  coarse_names: list[str] | None, fine_to_coarse: list[int] | None,
                  train_config: dict | None = None, metrics: dict | None = None,
                  dataset_fingerprint: str | None = None, data: dict | None = None) -> dict:
    """config.json for `model` as trained: timm's own Hub config with the preprocessing training used
    (bilinear resize of the whole image, no crop) and our extras under "cifar_tl". `data` describes the data
    the run used (`DatasetBundle.describe`); the parameter counts are taken from `model` as it trained (its
    frozen parameters are non-trainable)."""
    architecture = model.pretrained_cfg["architecture"]
    extras = {
        "format_version": FORMAT_VERSION, "data_size": data_size, "coarse_names": coarse_names,
        "fine_to_coarse": fine_to_coarse, "dataset_fingerprint": dataset_fingerprint, "data": data,
        "parameters": parameter_counts(model), "train_config": train_config or {}, "metrics": metrics or {},
        "library_name": "pytorch" if is_own(architecture) else "timm",
        "base_model": base_model(architecture, train_config or {}, getattr(model, "weights_source", None)),
        "weights_source": getattr(model, "weights_source", None),  # ImageNet weights from elsewhere than the Hub
    }
    data_config = {"input_size": (3, image_size, image_size), "mean": tuple(mean), "std": tuple(std),
                   "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}
    with tempfile.TemporaryDirectory() as tmp:
        save_config_for_hf(model, f"{tmp}/config.json", model_args=getattr(model, "model_args", None),
                           model_config={"label_names": list(fine_names), "cifar_tl": extras},
                           data_config=data_config)
        config = json.loads(Path(tmp, "config.json").read_text())
    config.setdefault("model_args", {}).pop("num_classes", None)
    return config


def base_model(architecture: str, train_config: dict, weights_source: str | None = None) -> str | None:
    """The Hub id of the ImageNet weights a run started from: timm's default tag for the architecture, which
    is what `create_model(pretrained=True)` loads; None when they came from elsewhere (a --weights file, an
    offline package: `weights_source`), which the card then names instead."""
    if (not timm.is_model(architecture) or not train_config.get("pretrained") or train_config.get("weights")
            or weights_source):
        return None
    cfg = timm.models.get_pretrained_cfg(architecture)
    return cfg.hf_hub_id if cfg is not None else None


def write_model_folder(out_dir: str | os.PathLike, model: torch.nn.Module, config: dict, *,
                       confusion: dict | None = None, run_dir: Path | None = None,
                       repo_id: str | None = None) -> Path:
    """Weights, config.json (recording the weights' size and sha256), confusion.json (when given), the run's
    plots and the model card; all or nothing (a write that fails raises `files.WriteError`)."""
    out = Path(out_dir)
    run_dir = run_dir if run_dir is not None else run_dir_of(out)
    with atomic_folder(out) as tmp:
        save_weights(model, tmp / WEIGHTS)
        files = manifest(tmp)  # the weights: all there is yet
        config = {**config, "cifar_tl": {**config.get("cifar_tl", {}), "files": files}}
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        if confusion is not None:
            atomic_write_text(tmp / "confusion.json", json.dumps(confusion) + "\n")
        write_card(tmp, config, repo_id=repo_id, run_dir=run_dir, location=out)
        written = {entry.name for entry in tmp.iterdir()}
    # rewritten in place (a re-export of another epoch): the previous weights' evaluation must not stay behind
    if "confusion.json" not in written:
        (out / "confusion.json").unlink(missing_ok=True)
    if "plots" not in written:
        shutil.rmtree(out / "plots", ignore_errors=True)
    return out


def write_card(model_dir: str | Path, config: dict, *, repo_id: str | None = None,
               run_dir: Path | None = None, location: Path | None = None) -> Path:
    """Copy the run's evaluation plots (PNG) into the folder, when its metrics are of these weights, and write
    README.md. `repo_id` names the Hub repo in the loading snippets; without it they load the folder by its path
    (`location`, when the folder is written elsewhere first). `run_dir` defaults to the folder's parent when
    that is a training run."""
    model_dir = Path(model_dir)
    run_dir = run_dir if run_dir is not None else run_dir_of(model_dir)
    if not (config.get("cifar_tl") or {}).get("metrics"):  # the run's plots and results are of other weights
        run_dir = None
    if run_dir is not None and run_dir.resolve() != model_dir.resolve():
        for png in sorted(run_dir.glob("plots/*.png")):  # report.py's; other PNGs in the run folder are not its
            (model_dir / "plots").mkdir(exist_ok=True)
            # not copyfile: its sendfile path names the source when the destination's disk is full
            (model_dir / "plots" / png.name).write_bytes(png.read_bytes())
    card = render_card(config, model_dir=model_dir, repo_id=repo_id, run_dir=run_dir, location=location)
    path = model_dir / "README.md"
    with atomic_path(path) as tmp:
        card.save(tmp)
    seal(path)  # a push re-renders the card only while it is as written here: a user's edits are kept
    return path


def run_dir_of(model_dir: Path) -> Path | None:
    """The training run a model folder sits in (engine layout: RUN/model next to RUN/metrics.json), if any."""
    parent = model_dir.resolve().parent
    return parent if (parent / "metrics.json").is_file() else None


# --------------------------------------------------------------------------------------------- reading


def read_config(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a cifar-tl model folder)")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):  # a ValueError as the others: what loaders catch to name the folder
        raise ValueError(f"{path}: expected a JSON object")  # noqa: TRY004
    for key in ("architecture", "label_names", "pretrained_cfg"):
        if key not in config:
            raise ValueError(f"{path}: missing '{key}'")
    if not isinstance(config["pretrained_cfg"], dict) or "input_size" not in config["pretrained_cfg"]:
        raise ValueError(f"{path}: pretrained_cfg has no input_size")
    return config


def upgrade_config(config: dict) -> dict:
    """A config.json of an older format as the current format writes it: architectures renamed since
    (`LEGACY_ARCHITECTURES`, e.g. format 1's `baseline_cnn` is `baseline_cnn_bn`). Folders without the cifar_tl
    block (plain timm exports) are left as they are."""
    extra = config.get("cifar_tl")
    version = extra.get("format_version", 1) if isinstance(extra, dict) else FORMAT_VERSION
    if version >= FORMAT_VERSION:
        return config
    config = {**config, "cifar_tl": {**extra, "format_version": FORMAT_VERSION}}
    for old in range(version, FORMAT_VERSION):
        config["architecture"] = LEGACY_ARCHITECTURES.get(old, {}).get(config["architecture"],
                                                                       config["architecture"])
    return config


def load_model(model_dir: str | os.PathLike, weights: Path | None = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from config.json and load model.safetensors, or another safetensors file of the same
    model (never pickle). Folders of an older format load as they were written (`upgrade_config`); the config
    returned is the upgraded one, so a re-export writes the current format."""
    config = upgrade_config(read_config(model_dir))
    own = Path(model_dir) / WEIGHTS
    weights = weights or own
    if not weights.is_file():
        raise FileNotFoundError(f"{weights.parent}: no {weights.name}")
    recorded = ((config.get("cifar_tl") or {}).get("files") or {}).get(WEIGHTS)
    check_weights(weights, recorded if weights.resolve() == own.resolve() else None)
    # model_args are the architecture's own; timm's exports also record num_classes there, and a config.json
    # from elsewhere must not make create_model fetch or unpickle anything
    args = {k: v for k, v in (config.get("model_args") or {}).items() if k not in UNSAFE_MODEL_ARGS}
    model = create_model(config["architecture"], pretrained=False, num_classes=len(config["label_names"]), **args)
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
