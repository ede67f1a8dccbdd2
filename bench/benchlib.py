"""Shared helpers for the bench/ scripts: machine description, result files, timing, benchmark data.

The benchmark data is the Hub-style parquet CIFAR-10 (JPEG bytes) in `../shared/datasets/cifar10-jpeg`, or
any folder given with `--dataset`. Each pipeline reads it the way it would in real use: ours through the
uint8 tensor store of `cifar_tl.data`, timm from an image folder of the original JPEG files, the transformers
example through `datasets`.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_DATASET = REPO.parent / "shared" / "datasets" / "cifar10-jpeg"
BENCH_CACHE = Path(os.environ.get("CIFAR_TL_CACHE", Path.home() / ".cache" / "cifar_tl")) / "bench"


def default_dataset() -> str:
    """`../shared/datasets/cifar10-jpeg`, or `build/cifar10-jpeg` (a copy carried to a GPU machine)."""
    carried = REPO / "build" / "cifar10-jpeg"
    return str(DEFAULT_DATASET if DEFAULT_DATASET.is_dir() or not carried.is_dir() else carried)


def machine(device: str = "cpu") -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": _git_commit(),
        "load_average": list(os.getloadavg()),
        "libraries": _versions(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("timm", "torchvision", "datasets", "transformers", "onnxruntime", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _git_commit() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=False,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def write_result(name: str, payload: dict, out_dir: str | None = None, quiet: bool = False) -> Path:
    """Write `payload` (plus the load average at the end) as JSON to out_dir ($OUT, else bench/results)."""
    folder = Path(out_dir or os.environ.get("OUT") or RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    payload["machine"]["load_average_end"] = list(os.getloadavg())
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
    if not quiet:
        print(f"wrote {path}")
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GpuUtilisation:
    """Mean GPU utilisation (nvidia-smi's percent of time a kernel ran) over a with-block, in `.mean`,
    sampled by a thread every 0.2 s; None on a CPU or without nvidia-smi. GPU 0 as nvidia-smi numbers it."""

    QUERY = ["nvidia-smi", "--id=0", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]

    def __init__(self, device: torch.device):
        self.device, self.mean, self.samples = device, None, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self.stop.wait(0.2):
            try:
                out = subprocess.run(self.QUERY, capture_output=True, text=True, timeout=5, check=False).stdout.strip()
            except OSError:  # no nvidia-smi
                return
            except subprocess.SubprocessError:  # a slow answer on a busy host: skip this sample
                continue
            if out.isdigit():
                self.samples.append(float(out))

    def __enter__(self):
        if self.device.type == "cuda":
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.thread.is_alive():
            self.stop.set()
            self.thread.join()
            self.mean = statistics.mean(self.samples) if self.samples else None
        return False


def now(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def ratios(images_per_second: dict) -> dict:
    """ours / each other pipeline, from {pipeline: images/s}."""
    ips = images_per_second
    return {f"ours/{k}": ips["ours"] / v for k, v in ips.items() if k != "ours" and "ours" in ips}


def threads(n: int) -> None:
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)  # inherited by subprocesses


# --------------------------------------------------------------------------------------------- data


def train_parquet(dataset: str) -> list[Path]:
    files = sorted(Path(dataset).rglob("train-*.parquet"))
    if not files:
        raise SystemExit(
            f"--dataset {dataset}: no train-*.parquet files (expected a Hub-style parquet folder)"
        )
    return files


def columns(dataset: str) -> tuple[str, str]:
    """The image and label columns of the parquet source, picked as train.py picks them (CIFAR-10: `img`,
    `label`; CIFAR-100: `img`, `fine_label`)."""
    import pyarrow.parquet as pq

    from cifar_tl.data import IMAGE_COLUMNS, LABEL_COLUMNS

    names = pq.ParquetFile(train_parquet(dataset)[0]).schema_arrow.names
    image = next((c for c in IMAGE_COLUMNS if c in names), None)
    label = next((c for c in LABEL_COLUMNS if c in names), None)
    if image is None or label is None:
        raise SystemExit(f"--dataset {dataset}: expected an image column ({', '.join(IMAGE_COLUMNS)}) and a "
                         f"label column ({', '.join(LABEL_COLUMNS)}); found {', '.join(names)}")
    return image, label


def image_folder(dataset: str, n: int) -> Path:
    """The first `n` training images of the parquet source as `ROOT/train/<class>/<row>.jpg`, written with
    their original encoded bytes (so timm decodes real JPEGs), built once and reused."""
    import pyarrow.parquet as pq
    from PIL import Image

    root = BENCH_CACHE / f"imagefolder-{Path(dataset).resolve().name}-{n}"
    done = root / "COMPLETE"
    if done.is_file():
        return root
    written = 0
    image, label = columns(dataset)
    for file in train_parquet(dataset):
        table = pq.read_table(file, columns=[image, label])
        for row in table.slice(0, n - written).to_pylist():
            data = row[image]["bytes"]
            ext = (Image.open(io.BytesIO(data)).format or "png").lower().replace("jpeg", "jpg")
            folder = root / "train" / f"class_{row[label]:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{written:06d}.{ext}").write_bytes(data)
            written += 1
        if written >= n:
            break
    if written < n:
        raise SystemExit(f"--dataset {dataset}: only {written} training images, {n} asked for")
    done.write_text(str(n))
    return root
