"""`python -m cifar_tl.export --checkpoint CKPT --output-dir DIR`: (re)export a model folder from a finished run.

CKPT is
  * a run's output dir (RUN/model/ is copied, with a fresh card and the run's plots),
  * a model folder (config.json + model.safetensors),
  * RUN/checkpoints/best.safetensors (the evaluated best weights, config from RUN/model/), or
  * RUN/checkpoints/epoch-NNNN (the Accelerate checkpoint of the last epoch; test metrics kept only when N is the
    best epoch).
Labels, preprocessing and the training config always come from the run's model/config.json; the folder is
written by `model_folder.write_model_folder`."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .console import FlagParser, one_line_errors
from .files import WriteError
from .integrity import DamagedFileError, manifest_problems


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
        problems = manifest_problems(path, state.get("files") or {})  # checkpoints written with a manifest
        if problems:
            raise DamagedFileError(f"--checkpoint {path}: {'; '.join(problems)}; export another epoch")
        return Checkpoint(path / "model.safetensors", run / "model", run, epoch=int(state["epoch"]))
    raise FileNotFoundError(f"--checkpoint {path}: expected a run's output dir, a model folder, "
                            "RUN/checkpoints/best.safetensors or RUN/checkpoints/epoch-NNNN")


def not_a_model_folder(out: Path) -> str | None:
    """Why writing a model folder at `out` would cost files that are not a model folder's (its weights, config,
    card, confusion.json and plots are replaced), or None: `out` is absent, empty or a model folder."""
    if not out.exists():
        return None
    if not out.is_dir():
        return "a file, not a folder"
    if not any(out.iterdir()):
        return None
    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if isinstance(config, dict) and "architecture" in config:
        return None
    return "a folder that is not a model folder (no model config.json), whose files the export would mix with or replace"


def export_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike,
                      repo_id: str | None = None) -> Path:
    from .model_folder import load_model, write_model_folder  # torch and timm: not for --help

    refused = not_a_model_folder(Path(output_dir))
    if refused:
        raise ValueError(f"--output-dir {output_dir}: {refused}; choose a new or empty folder, or a model folder "
                         "to rewrite")
    source = resolve_checkpoint(checkpoint)
    if not (source.model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no {source.model_dir}/config.json; the run must "
                                "have finished once (it writes the labels and preprocessing there)")
    model, config = load_model(source.model_dir, source.weights)
    extra = config.setdefault("cifar_tl", {})
    evaluated = source.epoch is None or source.epoch == (extra.get("metrics") or {}).get("best_epoch")
    if not evaluated:
        extra["metrics"] = {}  # the test metrics belong to the best epoch, not to these weights
    confusion_path = source.model_dir / "confusion.json"
    confusion = json.loads(confusion_path.read_text()) if evaluated and confusion_path.is_file() else None
    return write_model_folder(output_dir, model, config, confusion=confusion, run_dir=source.run_dir,
                              repo_id=repo_id)


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(prog="python -m cifar_tl.export", description="Export a model folder "
                        "(model.safetensors, config.json, README.md) from a training run.")
    parser.add_argument("--checkpoint", required=True, help="run output dir, model folder, "
                        "RUN/checkpoints/best.safetensors or RUN/checkpoints/epoch-NNNN")
    parser.add_argument("--output-dir", required=True, help="folder to write: new, empty, or a model folder "
                        "(the source model folder included) to rewrite")
    parser.add_argument("--hub-model-id", help="user/name the card's loading snippets should use")
    args = parser.parse_args(argv)
    if args.hub_model_id is not None:
        from .hub import is_hub_id

        if not is_hub_id(args.hub_model_id):  # it would be written into the card's loading snippets
            parser.error(f"--hub-model-id {args.hub_model_id!r}: not a Hub id user/name")

    def run() -> None:
        print(f"exported {export_checkpoint(args.checkpoint, args.output_dir, args.hub_model_id)}")

    return one_line_errors(run, FileNotFoundError, ValueError, WriteError)


if __name__ == "__main__":
    sys.exit(main())
