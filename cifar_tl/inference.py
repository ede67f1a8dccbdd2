"""One Predictor (preprocessing + model + label names) serves evaluation, the predict CLI, the demo and Hub
loading, so every path sees the same pixels the model was trained on."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .augment import eval_transform
from .data import decode_image
from .export import load_model_dir


def coarse_probs(fine_probs: torch.Tensor, fine_to_coarse, num_coarse: int) -> torch.Tensor:
    """Superclass probabilities = fine probabilities summed per superclass (consistent by construction)."""
    index = torch.as_tensor(fine_to_coarse, device=fine_probs.device)
    out = torch.zeros(fine_probs.shape[0], num_coarse, device=fine_probs.device, dtype=fine_probs.dtype)
    return out.index_add_(1, index, fine_probs)


@dataclass
class Predictor:
    model: torch.nn.Module
    config: dict
    device: torch.device = torch.device("cpu")

    def __post_init__(self):
        self.model = self.model.to(self.device).eval()
        extra = self.config.get("cifar_tl", {})
        cfg = self.config["pretrained_cfg"]
        self.image_size = int(cfg["input_size"][-1])
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.data_size = int(extra.get("data_size") or self.image_size)
        self.fine_names: list[str] = list(self.config["label_names"])
        self.coarse_names: list[str] | None = extra.get("coarse_names")
        self.fine_to_coarse: list[int] | None = extra.get("fine_to_coarse")
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str | torch.device | None = None) -> Predictor:
        model, config = load_model_dir(model_dir)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model, config, device)

    @property
    def has_coarse(self) -> bool:
        return self.coarse_names is not None and self.fine_to_coarse is not None

    def to_thumbnail(self, image) -> np.ndarray:
        """Any input image -> uint8 RGB [data_size, data_size, 3]: the resolution the model was trained at."""
        arr = decode_image(image)
        if arr.shape[:2] != (self.data_size, self.data_size):
            arr = np.asarray(Image.fromarray(arr).resize((self.data_size, self.data_size), Image.BICUBIC,
                                                         reducing_gap=None))
        return arr

    def preprocess(self, images) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.to_thumbnail(im) for im in images])).permute(0, 3, 1, 2)

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> fine-class logits (float32, on CPU)."""
        x = eval_transform(batch.to(self.device), self.image_size, self.mean, self.std, self.channels_last)
        out = self.model(x).float()
        if tta:
            out = (out + self.model(torch.flip(x, dims=[3])).float()) / 2
        return out.cpu()

    def predict_proba(self, images, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        probs = self.logits(self.preprocess(images), tta).softmax(-1)
        coarse = coarse_probs(probs, self.fine_to_coarse, len(self.coarse_names)) if self.has_coarse else None
        return probs, coarse

    def predict(self, images, top_k: int = 5, tta: bool = False) -> list[dict]:
        """[{"fine": [{"label", "score"}, ...top_k], "coarse": {"label", "score"} | None}, ...]"""
        probs, coarse = self.predict_proba(images, tta)
        k = min(top_k, probs.shape[1])
        results = []
        for i, (scores, idx) in enumerate(zip(*probs.topk(k, dim=1))):
            item = {"fine": [{"label": self.fine_names[j], "score": float(s)} for s, j in zip(scores, idx)],
                    "coarse": None}
            if coarse is not None:
                c = int(coarse[i].argmax())
                item["coarse"] = {"label": self.coarse_names[c], "score": float(coarse[i, c])}
            results.append(item)
        return results
