"""Shared helpers for the bench/ scripts: machine description, result files, timing, benchmark data, and the
demo server (start app.py, query it the way the page does, read its CPU time and memory from /proc).

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
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_DATASET = REPO.parent / "shared" / "datasets" / "cifar10-jpeg"
BENCH_CACHE = Path(os.environ.get("CIFAR_TL_CACHE", Path.home() / ".cache" / "cifar_tl")) / "bench"
EXAMPLES = sorted((REPO / "cifar_tl" / "examples" / "cifar100").glob("*.png"))  # the demo's gallery: 20 real 32 px images
# no outbound calls from the demo, gradio_client or the Hub libraries
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
               "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1"}


def offline() -> None:
    """Set OFFLINE_ENV (where not set already) for this process and the ones it starts; call it before
    importing gradio."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


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
    write_json(path, payload, indent=1)
    if not quiet:
        print(f"wrote {path}")
    return path


def write_json(path: Path, payload: dict, indent: int = 1) -> None:
    """Atomically: a reader (or a run killed mid-write) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=indent) + "\n")
    os.replace(tmp, path)


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

    from cifar_tl.sources import IMAGE_COLUMNS, LABEL_COLUMNS

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


# --------------------------------------------------------------------------------------------- demo server

def demo_model_dir(arch: str, out: Path) -> Path:
    """An untrained model folder (100 classes, 20 superclasses) at the model's own input size (32 px for our
    CNNs) for the demo: latency and memory do not depend on the weights."""
    from cifar_tl.model_folder import folder_config, write_model_folder
    from cifar_tl.models import create_model, data_config

    model = create_model(arch, pretrained=False, num_classes=100).eval()
    dc = data_config(model)
    names = [f"class_{i}" for i in range(100)]
    cfg = folder_config(model, image_size=dc["image_size"], mean=dc["mean"], std=dc["std"], data_size=32,
                        fine_names=names, coarse_names=[f"super_{i}" for i in range(20)],
                        fine_to_coarse=[i % 20 for i in range(100)])
    return write_model_folder(out, model, cfg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(seconds: list[float]) -> dict:
    """p50/p95/max in ms of a list of seconds (None for an empty list)."""
    if not seconds:
        return {"p50_ms": None, "p95_ms": None, "max_ms": None, "n": 0}
    ms = sorted(s * 1000 for s in seconds)
    return {"p50_ms": round(statistics.median(ms), 1), "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 1),
            "max_ms": round(ms[-1], 1), "n": len(ms)}


def start_app(model: str, log: Path, *, backend: str = "torch", threads: int | None = None,
              extra_args: list[str] | tuple = (), env: dict | None = None,
              timeout: float = 300) -> tuple[subprocess.Popen, str, float]:
    """Spawn `app.py --model MODEL` on a free 127.0.0.1 port (cwd: the log's folder, where gradio puts its
    `.gradio/`); wait until it answers a prediction through gradio_client. Returns (process, url, seconds from
    spawn to the first prediction received). The process is killed if it never answers."""
    import httpx
    from gradio_client import Client, handle_file

    port = free_port()
    start = time.perf_counter()
    command = [sys.executable, str(REPO / "app.py"), "--model", model, "--backend", backend, "--host",
               "127.0.0.1", "--port", str(port), *(["--threads", str(threads)] if threads else []), *extra_args]
    proc = subprocess.Popen(command, cwd=log.parent, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}/"
    try:
        while proc.poll() is None and time.perf_counter() - start < timeout:
            try:
                client = Client(url, verbose=False)
                client.predict(handle_file(str(EXAMPLES[0])), api_name="/classify")
                client.close()
                return proc, url, time.perf_counter() - start
            except (httpx.HTTPError, ValueError):  # not listening, or not serving its config, yet
                time.sleep(0.25)
        raise RuntimeError(f"app.py did not answer (exit code {proc.poll()}); see {log}")
    except BaseException:
        proc.kill()  # never leave a server behind
        raise


def stop_app(proc: subprocess.Popen, timeout: float = 30) -> None:
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux): what a request costs, whatever else loads the box."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """`pid` and all its live descendants (Linux, from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, IndexError, ValueError):  # exited meanwhile
                continue
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def process_stats(pid: int) -> dict:
    """Resident memory (MB) of a process and its descendants, and the main process's thread and open-file
    counts: what a leak shows up in."""
    rss_kb, procs = 0, 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss_kb += int(line.split()[1])
                    procs += 1
        except OSError:
            continue
    threads = int(_stat_fields(pid)[17])
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = None
    return {"rss_mb": round(rss_kb / 1024, 1), "processes": procs, "threads": threads, "open_files": fds}


def folder_mb(path: Path) -> float:
    """Bytes of the files under `path`, in MB (files vanishing meanwhile are skipped)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return round(total / 2**20, 2)


class UploadRefused(Exception):
    """The server refused the upload itself (HTTP 4xx/5xx from /upload): `.status`, `.detail`."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"upload refused: HTTP {status}: {detail}")
        self.status, self.detail = status, detail


class AppError(RuntimeError):
    """The event failed on the server (gradio's `success: false`) or its stream ended without a result."""


class HttpClient:
    """The browser's protocol: POST the file to /upload, POST /queue/join, read /queue/data (server-sent
    events) until the event completes. One keep-alive connection per client; each request opens a new gradio
    session (a new visitor) unless `one_session` (one page that sends request after request)."""

    def __init__(self, url: str, timeout: float = 60, one_session: bool = False):
        import httpx

        self.session = uuid.uuid4().hex if one_session else None
        self.http = httpx.Client(timeout=timeout)
        self.url, self.api = url, url + "gradio_api/"
        config = self.http.get(url + "config").json()
        self.fn_index = next(i for i, d in enumerate(config["dependencies"]) if d.get("api_name") == "classify")

    def call(self, path: Path, deadline: float | None = None, data: bytes | None = None) -> list:
        """The event's output data ([fine, coarse, preview, message] for the demo) for the file at `path`, or
        for `data` uploaded under path's name. Raises UploadRefused, AppError, TimeoutError (no result by
        `deadline`, a perf_counter time) or httpx errors."""
        if data is None:
            data = path.read_bytes()
        response = self.http.post(self.api + "upload", files={"files": (path.name, data)})
        if response.status_code >= 400:
            raise UploadRefused(response.status_code, response.text[:300])
        uploaded = response.json()[0]
        session = self.session or uuid.uuid4().hex
        self.http.post(self.api + "queue/join", json={
            "data": [{"path": uploaded, "meta": {"_type": "gradio.FileData"}}], "fn_index": self.fn_index,
            "session_hash": session, "event_data": None, "trigger_id": None}).raise_for_status()
        with self.http.stream("GET", self.api + "queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:") and '"process_completed"' in line:
                    event = json.loads(line[5:])
                    if not event.get("success", True):
                        raise AppError(f"app error: {event.get('output') or event}")
                    return event["output"]["data"]
                if deadline is not None and time.perf_counter() > deadline:
                    raise TimeoutError("no result before the deadline")
        raise AppError("event stream ended without a result")

    def classify(self, path: Path) -> dict:
        """The top-k label of one image (asserts that a real top-k came back)."""
        label = self.call(path)[0]
        assert label and label["confidences"], label
        return label

    def download(self, file_data: dict) -> bytes:
        """An output file (e.g. the preview image), as the page fetches it."""
        response = self.http.get(file_data["url"])
        response.raise_for_status()
        return response.content

    def close(self) -> None:
        self.http.close()
