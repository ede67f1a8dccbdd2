"""The one way to load a model for inference: a model folder, a Hub id or an exported .onnx file -> a ready
`Predictor` (preprocessing + model + label names) on the torch or the ONNX Runtime backend. The predict,
evaluate and export_onnx CLIs, the demo and `cifar_tl.from_pretrained` all come through `load_predictor`.

From the Hub only safetensors, JSON and Markdown files are downloaded (never pickles, never code); offline
(`HF_HUB_OFFLINE=1`) a Hub id resolves from the local Hub cache."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from huggingface_hub import is_offline_mode, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from .hub import DOWNLOAD_PATTERNS, is_hub_id, model_folder_of
from .inference import Predictor
from .integrity import DamagedFileError
from .model_flags import BACKENDS
from .offline import hub_offline

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message names the source and the cause."""


def model_folder(source: str | Path, named: str | None = None) -> Path:
    """A local model folder as it is (a training run's output folder: its model/), or a Hub repo downloaded (or
    read from the local Hub cache). Errors name the source as `named` says (default: `--model SOURCE`)."""
    named = named or f"--model {source}"
    path = Path(source).expanduser()
    if path.is_dir():
        return model_folder_of(path)
    text = str(source)
    if path.is_file():
        raise ModelLoadError(f"{named}: a file, not a model folder; give the folder that holds config.json "
                             "and model.safetensors, a Hub id user/name, or an exported ONNX file named *.onnx")
    if path.exists() or text.startswith((".", "/", "~")) or not is_hub_id(text):
        raise ModelLoadError(f"{named}: no such model folder, nor a Hub id user/name")
    try:
        with hub_offline():  # no network: the local Hub cache at once, not after the Hub client's retries
            return Path(snapshot_download(text, allow_patterns=DOWNLOAD_PATTERNS))
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE=1)" if is_offline_mode() else ""
        raise ModelLoadError(f"{named}: no such folder, and not in the local Hub cache while the Hub is "
                             f"unreachable{offline}; download it once online or pass a model folder") from None
    except Exception as err:  # repository missing, gated, private without a token, or the Hub failing
        raise ModelLoadError(f"{named}: cannot download from the Hub ({type(err).__name__}: "
                             f"{str(err).splitlines()[0]})") from None


def load_predictor(source: str | Path, backend: str = "torch", device: str | torch.device | None = None,
                   threads: int | None = None, named: str | None = None) -> Predictor:
    """A model folder, a Hub id or an exported .onnx file -> a Predictor on the chosen backend (the device
    defaults to CUDA when present; `threads` caps the CPU threads of either runtime). With "auto", a model the
    ONNX exporter cannot express is served by PyTorch, with a warning. Errors name the source as `named` says
    (default: `--model SOURCE`)."""
    named = named or f"--model {source}"
    if backend not in BACKENDS:
        raise ModelLoadError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    if threads is not None and threads < 1:
        raise ModelLoadError(f"--threads {threads}: must be at least 1")
    try:
        torch.device(device or "cpu")
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"--device {device}: not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    requested, backend = backend, resolve_backend(backend, device)
    if threads:
        torch.set_num_threads(threads)
    onnx_file = str(source).endswith(".onnx")
    folder = None if onnx_file else model_folder(source, named)
    try:
        if onnx_file:
            from .onnx_backend import OnnxPredictor

            return OnnxPredictor.from_file(source, threads=threads)
        predictor = Predictor.from_dir(folder, device=device)
        if backend == "onnx":
            from .onnx_backend import OnnxPredictor  # onnxruntime only when asked for

            try:
                return OnnxPredictor.from_predictor(predictor, threads=threads)
            except Exception as err:  # an op the exporter cannot express: the same answers, more slowly
                if requested == "onnx":
                    raise
                logger.warning("--backend auto: ONNX export of %s failed (%s: %s); serving with PyTorch", source,
                               type(err).__name__, (str(err).splitlines() or [""])[0][:160])
        return predictor
    except DamagedFileError as err:  # truncated, altered: the message names the file and what is wrong
        raise ModelLoadError(f"{named}: {err}") from None
    except Exception as err:  # missing files, bad configs, weights that do not fit: one clear line
        raise ModelLoadError(f"{named}: cannot be loaded ({type(err).__name__}: {err})") from None


def backend_of(predictor: Predictor) -> str:
    """The backend a loaded predictor runs on: "torch" or "onnx"."""
    return "torch" if isinstance(predictor.model, torch.nn.Module) else "onnx"


def resolve_backend(backend: str, device: str | torch.device | None = None) -> str:
    """"auto" -> onnx on a CPU, where ONNX Runtime is the fastest backend measured (2-8x eager PyTorch for the
    EfficientNets: BENCHMARKS.md "Inference"), torch on a GPU; other choices unchanged."""
    if backend != "auto":
        return backend
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return "onnx" if device.type == "cpu" else "torch"
