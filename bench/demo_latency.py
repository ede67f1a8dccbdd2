"""Demo latency: cold start to first prediction, single-image latency (p50/p95) and throughput with concurrent
clients, PyTorch vs ONNX, for the baseline CNN (32 px) and an EfficientNet at its own input size.

    python bench/demo_latency.py [--models baseline_cnn_bn efficientnet_b0] [--requests 40] [--clients 16]

Untrained model folders (random weights: latency does not depend on them) are built in a temp dir; each
configuration runs `app.py` as a fresh process on 127.0.0.1 and is queried over HTTP (below). The server's CPU
time per sequential request is read from /proc: it depends less than wall-clock times on what else runs on the
box. "model" latencies are the same work in-process without the server (open the file, thumbnail, predict), to
separate model time from gradio's.

Two clients measure the app: "app" latency comes from a client that speaks gradio's HTTP protocol the way the
page's JavaScript does (upload the file, join the queue, read the result from the event stream: three requests
on one keep-alive connection), which is the latency a user sees; "gradio_client" is the Python client, whose
own threads and polling add ~100 ms per call on this machine (it also downloads the preview image), reported
beside it. Throughput runs the HTTP client from 16 threads.

Results: bench/results/demo_latency.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import benchlib
from benchlib import EXAMPLES, HttpClient, cpu_seconds, percentiles, start_app, stop_app

benchlib.offline()
ROOT = benchlib.REPO
sys.path.insert(0, str(ROOT))

import torch

DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice: one per physical core


def http_latency(url: str, n: int) -> list[float]:
    client = HttpClient(url)
    times = []
    for i in range(n):
        t = time.perf_counter()
        client.classify(EXAMPLES[i % len(EXAMPLES)])  # asserts that a real top-k came back
        times.append(time.perf_counter() - t)
    client.close()
    return times


def app_latency(url: str, n: int) -> list[float]:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    times = []
    for i in range(n):
        t = time.perf_counter()
        client.predict(handle_file(str(EXAMPLES[i % len(EXAMPLES)])), api_name="/classify")
        times.append(time.perf_counter() - t)
    client.close()
    return times


def app_throughput(url: str, clients: int, per_client: int) -> float:
    pool_clients = [HttpClient(url) for _ in range(clients)]  # connecting is not serving

    def worker(c: int) -> None:
        for i in range(per_client):
            pool_clients[c].classify(EXAMPLES[(c + i) % len(EXAMPLES)])

    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    elapsed = time.perf_counter() - t
    for client in pool_clients:
        client.close()
    return clients * per_client / elapsed


def model_latency(model: str, backend: str, threads: int | None, n: int) -> list[float]:
    from cifar_tl.inference import open_image
    from cifar_tl.loading import load_predictor

    torch.set_num_threads(DEFAULT_THREADS)  # undo an earlier configuration's cap
    predictor = load_predictor(model, backend, threads=threads)
    for path in EXAMPLES[:3]:  # warm-up: first calls allocate and pick kernels
        predictor.predict([open_image(path)])
    times = []
    for i in range(n):
        t = time.perf_counter()
        predictor.predict([open_image(EXAMPLES[i % len(EXAMPLES)])])
        times.append(time.perf_counter() - t)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["baseline_cnn_bn", "efficientnet_b0"])
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    parser.add_argument("--threads", nargs="+", default=["default"],
                        help="model CPU threads to compare: 'default' (one per core) and/or numbers")
    parser.add_argument("--requests", type=int, default=40, help="sequential single-image requests")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=4, help="requests per concurrent client")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "demo_latency.json")
    args = parser.parse_args()

    import gradio
    import onnxruntime

    from cifar_tl.inference import Predictor
    from cifar_tl.onnx_backend import export_onnx

    thread_counts = [None if t == "default" else int(t) for t in args.threads]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for arch in args.models:
            model_dir = benchlib.demo_model_dir(arch, tmp / arch)
            onnx_path = tmp / f"{arch}.onnx"
            predictor = Predictor.from_dir(model_dir, "cpu")
            t = time.perf_counter()
            export_onnx(predictor, onnx_path)
            export_s = time.perf_counter() - t
            for backend, threads in itertools.product(args.backends, thread_counts):
                # ONNX runs from the exported file, so its cold start is loading, not exporting
                model = str(onnx_path) if backend == "onnx" else str(model_dir)
                proc, url, cold = start_app(model, tmp / f"{arch}-{backend}-{threads}.log", backend=backend,
                                            threads=threads)
                try:
                    http_latency(url, 3)  # warm-up
                    cpu = cpu_seconds(proc.pid)
                    single = http_latency(url, args.requests)
                    cpu = (cpu_seconds(proc.pid) - cpu) / args.requests
                    python_client = app_latency(url, args.requests)
                    throughput = app_throughput(url, args.clients, args.per_client)
                finally:
                    stop_app(proc)
                row = {"model": arch, "backend": backend, "threads": threads or DEFAULT_THREADS,
                       "input_size": predictor.image_size,
                       "cold_start_to_first_prediction_s": round(cold, 2),
                       "app_single_image": percentiles(single),
                       "gradio_client_single_image": percentiles(python_client),
                       "app_server_cpu_ms_per_request": round(cpu * 1000, 1),
                       "model_only_single_image": percentiles(model_latency(model, backend, threads,
                                                                            args.requests)),
                       f"app_throughput_{args.clients}_clients_img_per_s": round(throughput, 1)}
                if backend == "onnx":
                    row["onnx_export_s"] = round(export_s, 1)
                results.append(row)
                print(json.dumps(row), flush=True)

    report = {
        "what": __doc__.split("\n\n")[0],
        "machine": {"cpus": os.cpu_count(), "cpu": benchlib.machine()["cpu"],
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "load_average_at_end": os.getloadavg()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnxruntime": onnxruntime.__version__, "gradio": gradio.__version__},
        "settings": {"requests": args.requests, "clients": args.clients, "per_client": args.per_client,
                     "threads": args.threads,
                     "max_batch_size": 16, "concurrency_limit": 1},
        "results": results,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    benchlib.write_json(args.out, report, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
