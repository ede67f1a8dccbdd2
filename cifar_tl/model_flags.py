"""The flags that choose and run a model (shared by `app.py` and the predict CLI) and the model served when none
is named. Nothing here imports torch, gradio or the Hub client, so `--help` and a bad flag answer at once."""
from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

from PIL import Image

BACKENDS = ("auto", "torch", "onnx")
MODEL_ENV = "CIFAR_TL_MODEL"
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # ~89 MP: PIL's own decompression-bomb threshold


def default_model(runs: str | Path = "runs") -> tuple[str | None, str]:
    """What to serve when no --model is given: $CIFAR_TL_MODEL (a folder or a Hub id), else the newest finished
    run under `runs/` (its model folder beside metrics.json). Returns (source or None, why / what to do)."""
    if os.environ.get(MODEL_ENV):
        return os.environ[MODEL_ENV], f"${MODEL_ENV}"
    finished = [run / "model" for run in Path(runs).glob("*") if (run / "metrics.json").is_file()
                and (run / "model" / "config.json").is_file() and (run / "model" / "model.safetensors").is_file()]
    if finished:
        newest = max(finished, key=lambda folder: (folder.parent / "metrics.json").stat().st_mtime)
        return str(newest), f"the newest finished run under {runs}/"
    return None, (f"no model to serve: no finished run under {runs}/ and no ${MODEL_ENV}. Train one with "
                  f"`python train.py --dataset PATH_OR_HUB_ID --output-dir {runs}/NAME`, or pass --model "
                  "DIR_OR_HUB_ID")


def add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The flags that choose and run a model, shared by the predict CLI and the demo."""
    parser.add_argument("--model", required=required, help="model folder, Hugging Face Hub id or exported .onnx file"
                        + ("" if required else f" (default: ${MODEL_ENV}, else the newest finished run under runs/)"))
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto: onnx on a CPU (exported once to the cache, then run on ONNX Runtime: EfficientNet-B0 "
                        "at 224 px answers the demo in 27 ms p50 against PyTorch's 54 ms; PyTorch when the export "
                        "fails), torch on a GPU; or torch / onnx")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the model (default: the runtime's, one per core); on a CPU shared "
                             "with other busy processes 1 can be several times faster")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help="refuse images with more pixels than this (default: %(default)s)")


def check_pixel_limit(parser: argparse.ArgumentParser, max_pixels: int) -> None:
    """Validate --max-pixels and make it Pillow's own limit in this process: Pillow refuses images over twice its
    limit before ours is checked, and warns on the log about those over it, which ours refuses anyway."""
    if max_pixels < 1:
        parser.error(f"--max-pixels must be at least 1; got {max_pixels}")
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def onnx_conflict(model: str | None, backend: str, device: str | None) -> str | None:
    """Why --backend / --device cannot apply to an exported .onnx model (it runs on ONNX Runtime on the CPU), or
    None; silently ignored, they left the user believing PyTorch or the GPU served."""
    if not (model or "").endswith(".onnx"):
        return None
    flag = "--backend torch" if backend == "torch" else (f"--device {device}" if device and not
                                                          device.startswith("cpu") else None)
    return (f"--model {model}: an exported ONNX file runs on ONNX Runtime on the CPU, so {flag} cannot apply; "
            "give the model folder it was exported from to use PyTorch or a GPU") if flag else None
