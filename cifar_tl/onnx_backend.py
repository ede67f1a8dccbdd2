"""onnxruntime backend: a Predictor whose logits come from the graph `export_onnx` writes. Thumbnails, labels,
top-k and superclasses are Predictor's own code, so both backends see identical pixels."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from .data import cache_dir
from .export_onnx import CONFIG_KEY, INPUT_NAME, OUTPUT_NAME, export_onnx
from .inference import Predictor


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
        if not path.is_file():
            export_onnx(predictor, path)
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


def _fingerprint(predictor: Predictor) -> str:
    digest = hashlib.sha256(json.dumps(predictor.config, sort_keys=True).encode())
    digest.update(torch.__version__.encode())  # a newer exporter may write a different graph
    for name, tensor in sorted(predictor.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]
