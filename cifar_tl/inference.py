"""One Predictor (preprocessing + model + label names) serves evaluation, the predict CLI, the demo and Hub
loading, so every path sees the same pixels the model was trained on. `loading.load_predictor` builds it from
a folder, a Hub id or an .onnx file (`onnx_backend.OnnxPredictor` shares everything but the forward pass)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .augment import eval_transform
from .data import coarse_probs
from .model_flags import MAX_PIXELS
from .model_folder import load_model
from .sources import decode_image, fit_square


class ImageError(ValueError):
    """An input cannot be used as an image; the message is written for the person who supplied it."""


def open_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image file, refusing non-images, damaged files and images over `max_pixels`
    (checked from the header, before any pixel is decoded)."""
    limit = f"the {max_pixels / 1e6:.3g}-megapixel limit"
    try:
        img = Image.open(path)
    except Image.DecompressionBombError:  # Pillow's own check, at twice its limit
        raise ImageError(f"the image is far over {limit}; please send a smaller image") from None
    except FileNotFoundError:
        raise ImageError("no such file (it was removed or renamed)") from None
    except PermissionError:
        raise ImageError("the file cannot be read (permission denied)") from None
    except IsADirectoryError:
        raise ImageError("a folder, not an image file") from None
    except (OSError, ValueError, SyntaxError):  # UnidentifiedImageError is an OSError
        raise ImageError("not an image file (or a format Pillow cannot read)") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(f"{width}x{height} pixels is over {limit}; please send a smaller image")
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # corrupt data surfaces only while decoding
        raise ImageError(f"the image data is damaged or truncated ({err})") from None
    return img


def as_uint8_image(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """An image array as Pillow takes it, uint8 [H, W(, C)]: channels first ([3, H, W], as torchvision and our
    tensors hold them) are moved last, and floats are read as [0, 1] (or [0, 255] when larger values occur)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(f"an array of shape {tuple(array.shape)} is no image: give [H, W, 3] (or [3, H, W], or "
                         "[H, W] grey)")
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "fiu" or not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise ImageError(f"an image array of {array.dtype} must hold values in [0, 1] or [0, 255]")
    scale = 255 if array.dtype.kind == "f" and array.max() <= 1 else 1
    return np.rint(array.astype(np.float64) * scale).astype(np.uint8)


@dataclass
class Predictor:
    model: torch.nn.Module
    config: dict
    device: torch.device = torch.device("cpu")
    model_dir: Path | None = None  # the folder it was loaded from: the demo reads eval extras there

    def __post_init__(self):
        self.model = self.model.to(self.device).eval()
        self._read_config()
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def _read_config(self) -> None:
        """Preprocessing and label settings from config.json (shared with backends that hold no torch model)."""
        extra = self.config.get("cifar_tl", {})
        cfg = self.config["pretrained_cfg"]
        self.image_size = int(cfg["input_size"][-1])
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.data_size = int(extra.get("data_size") or self.image_size)
        self.fine_names: list[str] = list(self.config["label_names"])
        self.coarse_names: list[str] | None = extra.get("coarse_names")
        self.fine_to_coarse: list[int] | None = extra.get("fine_to_coarse")

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str | torch.device | None = None) -> Predictor:
        model, config = load_model(model_dir)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model, config, device, Path(model_dir))

    @property
    def has_coarse(self) -> bool:
        return self.coarse_names is not None and self.fine_to_coarse is not None

    def to_thumbnail(self, image) -> np.ndarray:
        """Any input image (PIL, array, encoded bytes or a file path) -> uint8 RGB [data_size, data_size, 3]: the
        resolution the model was trained at, resized on its short side and centre-cropped exactly as the
        training store was (`sources.fit_square`)."""
        if isinstance(image, (str, os.PathLike)):
            image = open_image(image)
        elif isinstance(image, (np.ndarray, torch.Tensor)):
            image = as_uint8_image(image)
        try:
            arr = decode_image(image, shrink_to=self.data_size)
        except (OSError, ValueError, TypeError) as err:  # exotic modes Pillow cannot convert to RGB
            raise ImageError(f"cannot convert this image to RGB ({err})") from None
        return fit_square(arr, self.data_size)

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
        """[{"fine": [{"label", "score"}, ...top_k], "coarse": {"label", "score"} | None}, ...], one per image."""
        images = list(images)
        if not images:
            return []
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
