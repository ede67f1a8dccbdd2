"""The ONNX Runtime backend: `export_onnx` writes one graph from uint8 thumbnails [B, 3, data_size, data_size]
to fine-class logits (the eval transform, resize + normalise, is traced into it from `augment.eval_transform`;
the batch axis is dynamic; config.json rides along in the metadata, so the file alone is a complete predictor),
and `OnnxPredictor` runs it. Thumbnails, labels, top-k and superclasses are Predictor's own code, so both
backends see identical pixels."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from .augment import eval_transform
from .data import cache_dir
from .files import atomic_path
from .inference import Predictor
from .integrity import seal, seal_problem

log = logging.getLogger(__name__)
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


def _providers() -> list[str]:
    """CUDA when this onnxruntime build has it, else CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


@dataclass
class OnnxPredictor(Predictor):
    """`model` is an onnxruntime session of the export_onnx graph (uint8 thumbnails in, logits out)."""

    model: ort.InferenceSession
    onnx_path: Path | None = None

    def __post_init__(self):
        self._read_config()

    @classmethod
    def from_file(cls, path: str | os.PathLike, model_dir: Path | None = None,
                  threads: int | None = None) -> OnnxPredictor:
        """Load an exported .onnx file; its config.json comes from the file's metadata."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: onnxruntime's default, one per core
        session = ort.InferenceSession(str(path), options, providers=_providers())
        meta = session.get_modelmeta().custom_metadata_map
        if CONFIG_KEY not in meta:
            raise ValueError(f"{path}: no '{CONFIG_KEY}' metadata; export it with python -m cifar_tl.export_onnx")
        return cls(session, json.loads(meta[CONFIG_KEY]), torch.device("cpu"), model_dir, Path(path))

    @classmethod
    def from_predictor(cls, predictor: Predictor, threads: int | None = None) -> OnnxPredictor:
        """The ONNX twin of a PyTorch Predictor, exported once per distinct weights+config into the cache."""
        path = cache_dir() / "onnx" / f"{_fingerprint(predictor)}.onnx"
        damage = seal_problem(path)
        if damage:  # exported again, never used: a flipped byte in a weight still loads and answers wrongly
            log.warning("exporting %s to ONNX again: the cached %s is damaged (%s)",
                        predictor.model_dir or "the model", path, damage)
        if damage or not path.is_file():
            export_onnx(predictor, path)
            seal(path)
        return cls.from_file(path, predictor.model_dir, threads)

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        images = np.ascontiguousarray(batch.numpy(), dtype=np.uint8)
        return torch.from_numpy(self.model.run([OUTPUT_NAME], {INPUT_NAME: images})[0])

    def logits(self, batch: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> fine-class logits (float32, on CPU)."""
        out = self._run(batch)
        if tta:  # flipping before the (symmetric) resize equals Predictor's flip after it
            out = (out + self._run(torch.flip(batch, dims=[3]))) / 2
        return out


class SessionModule(torch.nn.Module):
    """An OnnxPredictor's session as a module (uint8 thumbnails in, logits out), for code written for torch
    models: evaluation runs it with the identity as its transform."""

    def __init__(self, predictor: OnnxPredictor):
        super().__init__()
        self.predictor = predictor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predictor.logits(images.cpu())


def _fingerprint(predictor: Predictor) -> str:
    digest = hashlib.sha256(json.dumps(predictor.config, sort_keys=True).encode())
    digest.update(torch.__version__.encode())  # a newer exporter may write a different graph
    for name, tensor in sorted(predictor.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]
