"""Fixtures built in the tests: a small CIFAR-100-shaped dataset with the real 100 fine / 20 coarse names and
mapping, written in the Hub parquet layout and the official cifar-100-python pickle layout (dir and .tar.gz),
plus small model folders. No network, no shared datasets."""
from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# pytest-xdist workers (`-n`) share the cores: each takes its share of threads (inherited by the processes the
# tests start), since every worker running torch on all cores slows them all
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

from cifar100_meta import COARSE_NAMES, FINE_NAMES, FINE_TO_COARSE


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep the tensor/feature caches of the tests, and W&B's artifact staging, cache and settings (offline runs
    copy every artifact file there), away from the user's ~/.cache and ~/.local/share."""
    os.environ["CIFAR_TL_CACHE"] = str(tmp_path_factory.mktemp("cifar_tl_cache"))
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        os.environ[name] = str(tmp_path_factory.mktemp(name.lower()))


def make_arrays(n_per_class: int, seed: int, num_classes: int = 100):
    """Learnable synthetic images: each class has its own mean colour and stripe pattern, plus noise."""
    rng = np.random.default_rng(seed)
    fine = np.repeat(np.arange(num_classes), n_per_class)
    rng.shuffle(fine)
    base = np.random.default_rng(0).integers(30, 225, size=(num_classes, 3))
    yy, xx = np.mgrid[0:32, 0:32]
    images = np.empty((len(fine), 32, 32, 3), dtype=np.uint8)
    for i, c in enumerate(fine):
        stripes = ((xx * (1 + c % 5) + yy * (c // 5 % 4)) % 8 < 4)[..., None] * 40
        noise = rng.normal(0, 12, size=(32, 32, 3))
        images[i] = np.clip(base[c] + stripes + noise, 0, 255).astype(np.uint8)
    coarse = np.asarray(FINE_TO_COARSE)[fine]
    return images, fine.astype(np.int64), coarse.astype(np.int64)


SPLITS = {"train": (4, 1), "test": (2, 2)}  # split -> (images per class, seed)


@pytest.fixture(scope="session")
def cifar100_arrays():
    return {split: make_arrays(n, seed) for split, (n, seed) in SPLITS.items()}


def write_parquet(arrays: dict, root: Path, fine_names=FINE_NAMES, coarse_names=COARSE_NAMES) -> Path:
    import datasets
    from PIL import Image

    features = {"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=fine_names)}
    if coarse_names:
        features["coarse_label"] = datasets.ClassLabel(names=coarse_names)
    features = datasets.Features(features)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, (images, fine, coarse) in arrays.items():
        rows = {"img": [], "fine_label": fine.tolist()}
        if coarse_names:
            rows["coarse_label"] = coarse.tolist()
        for im in images:
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PNG")
            rows["img"].append({"bytes": buf.getvalue(), "path": None})
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def write_pickle_dir(arrays: dict, root: Path, as_bytes: bool = False) -> Path:
    """The official layout; `as_bytes`: keys and names as bytes, as a Python 3 copy of a bytes-mode load has them."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)

    def text(value):
        return value.encode() if as_bytes else value

    for split, (images, fine, coarse) in arrays.items():
        d = {"filenames": [f"{i}.png" for i in range(len(fine))], "batch_label": split,
             "fine_labels": fine.tolist(), "coarse_labels": coarse.tolist(),
             "data": images.transpose(0, 3, 1, 2).reshape(len(fine), -1)}
        (folder / split).write_bytes(pickle.dumps({text(k): v for k, v in d.items()}))
    meta = {"fine_label_names": [text(n) for n in FINE_NAMES], "coarse_label_names": [text(n) for n in COARSE_NAMES]}
    (folder / "meta").write_bytes(pickle.dumps({text(k): v for k, v in meta.items()}))
    return folder


@pytest.fixture(scope="session")
def cifar100_parquet(cifar100_arrays, tmp_path_factory) -> Path:
    return write_parquet(cifar100_arrays, tmp_path_factory.mktemp("parquet"))


@pytest.fixture(scope="session")
def easy10_parquet(tmp_path_factory) -> Path:
    """10 learnable classes (30 train / 10 test images each) with 2 superclasses: training must learn it."""
    arrays = {}
    for split, (n, seed) in {"train": (30, 5), "test": (10, 6)}.items():
        images, fine, _ = make_arrays(n, seed, num_classes=10)
        arrays[split] = (images, fine, fine % 2)
    return write_parquet(arrays, tmp_path_factory.mktemp("easy10"), [f"class_{i}" for i in range(10)],
                         ["even", "odd"])


@pytest.fixture(scope="session")
def cifar100_pickle(cifar100_arrays, tmp_path_factory) -> Path:
    return write_pickle_dir(cifar100_arrays, tmp_path_factory.mktemp("pickle"))


@pytest.fixture(scope="session")
def cifar100_tar(cifar100_pickle, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tar") / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(cifar100_pickle, arcname="cifar-100-python")
    return path


def build_model_dir(arch: str, out: Path, image_size: int | None = None, seed: int = 0) -> Path:
    """An untrained model folder in the export format, with the real CIFAR-100 names and mapping."""
    import torch

    from cifar_tl.model_folder import folder_config, write_model_folder
    from cifar_tl.models import create_model, data_config

    torch.manual_seed(seed)
    model = create_model(arch, pretrained=False, num_classes=100).eval()
    dc = data_config(model, image_size)
    cfg = folder_config(model, image_size=dc["image_size"], mean=dc["mean"], std=dc["std"], data_size=32,
                        fine_names=FINE_NAMES, coarse_names=COARSE_NAMES,
                        fine_to_coarse=FINE_TO_COARSE, metrics={"top1": 0.01, "top5": 0.05, "coarse_top1": 0.05})
    return write_model_folder(out, model, cfg)


@pytest.fixture(scope="session")
def cnn_model_dir(tmp_path_factory) -> Path:
    """baseline_cnn_bn model folder (32 px input)."""
    return build_model_dir("baseline_cnn_bn", tmp_path_factory.mktemp("cnn_model"))


@pytest.fixture(scope="session")
def study_cnn_model_dir(tmp_path_factory) -> Path:
    """baseline_cnn (the reference study's CNN: Flatten + Dense head, fixed 32 px input) model folder."""
    return build_model_dir("baseline_cnn", tmp_path_factory.mktemp("study_cnn_model"))


@pytest.fixture(scope="session")
def fast_cnn_model_dir(tmp_path_factory) -> Path:
    """fast_cnn model folder (32 px input)."""
    return build_model_dir("fast_cnn", tmp_path_factory.mktemp("fast_cnn_model"))


@pytest.fixture(scope="session")
def timm_model_dir(tmp_path_factory) -> Path:
    """A tiny timm EfficientNet (timm's `test_efficientnet`) model folder at 64 px input."""
    return build_model_dir("test_efficientnet", tmp_path_factory.mktemp("timm_model"), image_size=64)


def make_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], revision: str = "0" * 40) -> Path:
    """A Hugging Face Hub cache folder laid out as huggingface_hub lays it out (models--org--name/refs/main ->
    snapshots/<commit>/<files>), as a login node leaves it for compute nodes that run with HF_HUB_OFFLINE=1."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return cache


@pytest.fixture(scope="session")
def timm_weights_cache(tmp_path_factory) -> Path:
    """A local Hub cache holding timm's `test_efficientnet` ImageNet weights (random here: what matters is the
    path they are loaded through), for HF_HUB_CACHE."""
    import json

    import timm
    import torch
    from safetensors.torch import save

    torch.manual_seed(1)
    model = timm.create_model("test_efficientnet", num_classes=1000)
    hub_id = timm.models.get_pretrained_cfg("test_efficientnet").hf_hub_id
    files = {"model.safetensors": save({k: v.contiguous() for k, v in model.state_dict().items()}),
             "config.json": json.dumps({"architecture": "test_efficientnet", "num_classes": 1000}).encode()}
    return make_hub_cache(tmp_path_factory.mktemp("hub_cache"), hub_id, files)


def hold_elsewhere(folder: Path, started: str = "x"):
    """Another live run's hold on `folder`, as `processes.hold` takes it (an flock on run.lock and its record),
    in a process of the standard library alone; kill it to end the run."""
    import subprocess
    import sys

    script = ("import fcntl, json, os, socket, sys, time\n"
              "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
              "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
              "os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), 'started': sys.argv[2]})"
              ".encode())\n"
              "print('held', flush=True)\n"
              "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(folder / "run.lock"), started],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc
