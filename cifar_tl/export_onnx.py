"""`python -m cifar_tl.export_onnx --model DIR_OR_HUB_ID --output model.onnx`

One ONNX graph from uint8 thumbnails [B, 3, data_size, data_size] to fine-class logits [B, num_classes]: the
eval transform (resize to the input size + normalise) is traced into the graph from `augment.eval_transform`,
the batch axis is dynamic, and the model's config.json rides along in the metadata, so the file alone is a
complete predictor (`cifar_tl.onnx_backend.OnnxPredictor`)."""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import onnx
import torch

from .augment import eval_transform
from .files import atomic_path
from .inference import Predictor

CONFIG_KEY = "cifar_tl_config"  # metadata_props key holding config.json
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ThumbnailClassifier(torch.nn.Module):
    """Predictor.logits as one module: uint8 thumbnails in, logits out."""

    def __init__(self, predictor: Predictor):
        super().__init__()
        self.model = copy.deepcopy(predictor.model).cpu().eval()  # the live predictor keeps its device
        self.size, self.mean, self.std = predictor.image_size, predictor.mean, predictor.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(eval_transform(images, self.size, self.mean, self.std, channels_last=False))


def save_onnx(module: torch.nn.Module, example: torch.Tensor, output: str | os.PathLike,
              metadata: dict[str, str] | None = None, **names) -> Path:
    """Export `module` with a dynamic batch axis (torch.onnx's dynamo exporter) to one self-contained file,
    written atomically. `names`: the exporter's input_names / output_names."""
    program = torch.onnx.export(module.eval(), (example,), dynamo=True, verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
    proto = program.model_proto
    if metadata:
        onnx.helper.set_model_props(proto, metadata)
    with atomic_path(output) as tmp:
        onnx.save(proto, str(tmp))  # weights embedded, no external-data file
    return Path(output)


def export_onnx(predictor: Predictor, output: str | os.PathLike) -> Path:
    """Write `predictor` as an ONNX file with a dynamic batch axis."""
    example = torch.zeros(2, 3, predictor.data_size, predictor.data_size, dtype=torch.uint8)
    return save_onnx(ThumbnailClassifier(predictor), example, output, {CONFIG_KEY: json.dumps(predictor.config)},
                     input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifar_tl.export_onnx", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder or Hugging Face Hub id")
    parser.add_argument("--output", required=True, type=Path, help="where to write the .onnx file")
    args = parser.parse_args(argv)
    from .predict import ModelLoadError, load_predictor

    try:
        predictor = load_predictor(args.model, device="cpu")
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    path = export_onnx(predictor, args.output)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): input '{INPUT_NAME}' uint8 "
          f"[batch, 3, {predictor.data_size}, {predictor.data_size}], output '{OUTPUT_NAME}' "
          f"[batch, {len(predictor.fine_names)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
