"""Demo soak: `app.py` under sustained load from concurrent clients, with a mix of normal photos, huge files and
broken files; counts answers and errors, tracks latency per time window and the server's memory over time.

    python bench/demo_soak.py [--model DIR] [--clients 16] [--duration 300] [--window 30]
    python bench/demo_soak.py --duration 20 --clients 4 --window 5        # a short check, ~40 s in all

The server is `app.py --model DIR` in a fresh process on a free 127.0.0.1 port (without `--model`: an
untrained `--arch` folder, built in a temp dir: latency and memory do not depend on the weights). Each client
speaks the page's protocol on its own keep-alive connection (benchlib.HttpClient: upload, join the queue, read
the event stream; then fetch the preview image, as the page does) and sends one request after the other, each
input drawn at random with the weights below:

- photos (expected: a prediction): 4 of the gallery's 32 px CIFAR-100 PNGs and synthetic photos from 64 px to
  2000 px, PNG and JPEG (up to 7.8 MB). Every upload is distinct, as real users' photos are: the small ones get
  a few new pixels each time (so their thumbnails differ too), the large ones a few random bytes after the image
  data. `--inputs` picks a subset by name;
- huge (expected: a clean refusal): a file 1.5x the app's `--max-file-size` (30 MB at the default 20mb:
  refused by gradio at upload, HTTP 413 with its message) and PNGs whose header claims 100 Mpx and 400 Mpx
  (over the app's ~89 Mpx `--max-pixels`; refused by the app with a message);
- broken (expected: a message from the app): a truncated JPEG, random bytes named .png, an empty file.

`--sessions request` (the default) opens a new gradio session for every request, as that many first-time
visitors would; `--sessions client` keeps one per client. Every input is sent once before the soak
(`first_pass` in the JSON: what each one got back). During the soak a
correct answer is the expected one; anything else is an error, by kind: `server_error` (the event failed:
gradio's `success: false`), `timeout` (no answer within `--timeout`), `connection_error`, `upload_error` (an
HTTP error other than the size refusal), `unexpected_answer` (e.g. a prediction for a broken file),
`preview_error` (the preview of a prediction could not be fetched).

Reported: requests and errors by kind and input; p50/p95 latency (upload to result; the preview fetch is not
timed) per `--window` seconds, for all requests and for the photos alone; the server's resident memory (RSS
of the process and its children, from /proc), threads, open files and the bytes in its temp folders (uploads,
gradio's cache, the previews), sampled every `--sample-seconds`, at start, over time and at the end; and the
memory slope after `--warmup` (least squares of RSS against requests answered, in MB per 1,000 requests), and
the same over the second half of that span (an allocator still filling its arenas levels off; a leak does not).
The load generator (one thread per client, in this process) shares the machine with the server, and so does
anything else running: the load average is recorded at each sample.

Results: bench/results/demo_soak.json (`--out`, `--name`).
"""
from __future__ import annotations

import argparse
import fnmatch
import io
import math
import os
import random
import re
import shlex
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import benchlib
from benchlib import EXAMPLES, AppError, HttpClient, UploadRefused, percentiles, start_app, stop_app

benchlib.offline()
sys.path.insert(0, str(benchlib.REPO))

import numpy as np
from PIL import Image

CORRECT = ("prediction", "message", "upload_refused")
ERRORS = ("server_error", "timeout", "connection_error", "upload_error", "unexpected_answer", "preview_error")


# --------------------------------------------------------------------------------------------- inputs


@dataclass
class Input:
    name: str  # the file name uploaded
    kind: str  # photo | huge | broken
    expect: str  # prediction | message | upload_refused
    weight: float
    data: bytes
    image: Image.Image | None = None  # small photos: re-encoded with new pixels per request

    def payload(self, rng: random.Random) -> bytes:
        """The bytes of one upload: distinct every time for photos, the same file otherwise."""
        if self.kind != "photo":
            return self.data
        if self.image is not None:
            img = self.image.copy()
            x, y = rng.randrange(img.width), rng.randrange(img.height)
            img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + max(2, img.width // 8),
                                                                      y + max(2, img.height // 8)))
            return encode(img, self.name)
        return self.data + rng.randbytes(16)  # after the image's end marker: ignored by decoders


def encode(img: Image.Image, name: str) -> bytes:
    buf = io.BytesIO()
    if name.endswith(".jpg"):
        img.save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def synthetic_photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour gradients, a few soft blobs and sensor-like noise: compresses like a photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    xx, yy = xx / width, yy / height
    img = np.stack([80 + 120 * xx, 60 + 140 * yy, 200 - 120 * (xx + yy) / 2], axis=-1)
    for _ in range(4):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.25)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - blob) + rng.uniform(0, 255, 3) * blob
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with a few bytes of data: a decompression bomb as far
    as the header goes."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


PHOTO_SIZES = [(64, 64, "jpg"), (224, 224, "png"), (640, 480, "jpg"), (1024, 768, "png"), (1280, 960, "jpg"),
               (2000, 1500, "jpg"), (2000, 2000, "png")]
SMALL = 256  # photos up to this side get new pixels per request (cheap to re-encode); larger: new trailing bytes


def build_inputs(max_file_bytes: int, weights: dict[str, float], seed: int = 0) -> list[Input]:
    """The mix: `weights` = share of requests per kind (photo, huge, broken), split evenly within a kind.
    Photos larger than `max_file_bytes` are left out."""
    rng = random.Random(seed)
    photos = [Input(f"cifar_{p.name}", "photo", "prediction", 0, b"", Image.open(p).convert("RGB"))
              for p in EXAMPLES[:4]]
    for i, (w, h, fmt) in enumerate(PHOTO_SIZES):
        img = synthetic_photo(w, h, seed + i)
        name = f"photo_{w}x{h}.{fmt}"
        photos.append(Input(name, "photo", "prediction", 0, encode(img, name), img if max(w, h) <= SMALL else None))
    truncated = encode(synthetic_photo(640, 480, seed + 99), "x.jpg")
    huge = [Input(f"huge_{max_file_bytes * 3 // 2 / 2**20:.0f}mib.jpg", "huge", "upload_refused", 0,
                  b"\xff\xd8\xff\xe0" + rng.randbytes(max_file_bytes * 3 // 2 - 4)),
            Input("header_10000x10000.png", "huge", "message", 0, png_header_only(10_000, 10_000)),
            Input("header_20000x20000.png", "huge", "message", 0, png_header_only(20_000, 20_000))]
    broken = [Input("truncated.jpg", "broken", "message", 0, truncated[: len(truncated) // 2]),
              Input("random_bytes.png", "broken", "message", 0, rng.randbytes(50_000)),
              Input("empty.png", "broken", "message", 0, b"")]
    # a photo over the upload limit (a small --max-file-size) is a huge file, not a photo: left out
    inputs = [i for i in photos if len(i.data) <= max_file_bytes] + huge + broken
    for kind in ("photo", "huge", "broken"):
        group = [i for i in inputs if i.kind == kind]
        for i in group:
            i.weight = weights[kind] / len(group)
    return inputs


def parse_size(text: str) -> int:
    """gradio's size syntax: '20mb' -> bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(b|kb|mb|gb)", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 20mb or 500kb")
    return int(float(match[1]) * 1024 ** ("b", "kb", "mb", "gb").index(match[2]))


# --------------------------------------------------------------------------------------------- requests


def answer(output: list) -> tuple[str, str]:
    """(outcome, message) of the demo's output data [fine, coarse, preview, message]."""
    fine, _, _, message = output
    message = message or ""
    if fine and fine.get("confidences") and not message:
        return "prediction", ""
    if message.startswith("⚠️"):
        return "message", message
    return "unexpected_answer", f"fine={fine!r} message={message!r}"


def request(client: HttpClient, item: Input, data: bytes, timeout: float) -> tuple[str, str, float]:
    """One request: (outcome, detail, seconds from upload to result)."""
    import httpx

    start = time.perf_counter()
    try:
        output = client.call(Path(item.name), deadline=start + timeout, data=data)
        seconds = time.perf_counter() - start
        outcome, detail = answer(output)
        if outcome == "prediction":
            try:
                client.download(output[2])
            except (httpx.HTTPError, KeyError, TypeError) as err:
                return "preview_error", f"{type(err).__name__}: {err}", seconds
    except UploadRefused as err:
        seconds = time.perf_counter() - start
        outcome = "upload_refused" if err.status == 413 else "upload_error"
        detail = f"HTTP {err.status}: {err.detail}"
    except (TimeoutError, httpx.TimeoutException) as err:
        return "timeout", f"{type(err).__name__}: {err}", time.perf_counter() - start
    except AppError as err:
        return "server_error", str(err)[:300], time.perf_counter() - start
    except httpx.HTTPError as err:
        return "connection_error", f"{type(err).__name__}: {err}", time.perf_counter() - start
    if outcome in CORRECT and outcome != item.expect:
        return "unexpected_answer", f"expected {item.expect}, got {outcome}: {detail}"[:300], seconds
    return outcome, detail, seconds


class Sampler(threading.Thread):
    """Samples the server every `every` seconds: RSS (with children), threads, open files, the bytes in each
    of `folders` ({name: path}: `<name>_mb`), the load average."""

    def __init__(self, pid: int, folders: dict[str, Path], every: float, origin: float, answered):
        super().__init__(daemon=True)
        self.pid, self.folders, self.every, self.origin, self.answered = pid, folders, every, origin, answered
        self.samples: list[dict] = []
        self.halt = threading.Event()

    def sample(self) -> dict:
        stats = benchlib.process_stats(self.pid)
        row = {"t_s": round(time.perf_counter() - self.origin, 2), "requests": self.answered(), **stats,
               **{f"{name}_mb": benchlib.folder_mb(folder) for name, folder in self.folders.items()},
               "load_1min": round(os.getloadavg()[0], 2)}
        self.samples.append(row)
        return row

    def run(self) -> None:
        while not self.halt.wait(self.every):
            try:
                self.sample()
            except OSError:  # the server exited: the soak reports it
                return


def slope(samples: list[dict], key: str) -> dict:
    """Least-squares slope of `key` against requests answered, per 1,000 requests, with r²."""
    xs = [s["requests"] for s in samples]
    ys = [s[key] for s in samples]
    if len(samples) < 3 or len(set(xs)) < 2:
        return {"per_1000_requests": None, "r2": None, "samples": len(samples)}
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    syy = sum((y - my) ** 2 for y in ys)
    b = sxy / sxx
    return {"per_1000_requests": round(b * 1000, 3), "r2": round(sxy * sxy / (sxx * syy), 3) if syy else None,
            "samples": len(samples)}


# --------------------------------------------------------------------------------------------- soak


def summarise_window(rows: list[dict], start: float, end: float, samples: list[dict]) -> dict:
    ok = [r["seconds"] for r in rows if r["outcome"] in CORRECT]
    photos = [r["seconds"] for r in rows if r["kind"] == "photo" and r["outcome"] == "prediction"]
    errors = Counter(r["outcome"] for r in rows if r["outcome"] not in CORRECT)
    at_end = [s for s in samples if s["t_s"] <= end]
    last = at_end[-1] if at_end else None
    return {"start_s": round(start, 1), "end_s": round(end, 1), "requests": len(rows),
            "requests_per_s": round(len(rows) / (end - start), 2) if end > start else None,
            "errors": sum(errors.values()), "errors_by_kind": dict(errors),
            "p50_ms": percentiles(ok)["p50_ms"], "p95_ms": percentiles(ok)["p95_ms"],
            "photo_p50_ms": percentiles(photos)["p50_ms"], "photo_p95_ms": percentiles(photos)["p95_ms"],
            "rss_mb": last["rss_mb"] if last else None, "uploads_mb": last["uploads_mb"] if last else None,
            "load_1min": last["load_1min"] if last else None}


def soak(url: str, proc: subprocess.Popen, inputs: list[Input], args, folders: dict[str, Path]) -> dict:
    """The first pass over every input, then `args.clients` clients for `args.duration` seconds (or until the
    server exits) while the sampler watches the server."""
    records: list[dict] = []
    lock = threading.Lock()

    # every input once, one at a time: what each kind of file gets back (also a warm-up)
    client = HttpClient(url, timeout=args.timeout)
    first_pass = {}
    for item in inputs:
        outcome, detail, seconds = request(client, item, item.payload(random.Random(0)), args.timeout)
        first_pass[item.name] = {"kind": item.kind, "expect": item.expect, "outcome": outcome,
                                 "detail": detail, "ms": round(seconds * 1000, 1)}
    client.close()

    origin = time.perf_counter()
    end = origin + args.duration
    sampler = Sampler(proc.pid, folders, args.sample_seconds, origin, lambda: len(records))
    start_stats = sampler.sample()
    sampler.start()
    weights = [i.weight for i in inputs]

    def run_client(c: int) -> None:
        rng = random.Random(args.seed * 1000 + c)
        http = HttpClient(url, timeout=args.timeout, one_session=args.sessions == "client")
        try:
            while time.perf_counter() < end and proc.poll() is None:
                item = rng.choices(inputs, weights)[0]
                data = item.payload(rng)
                t = time.perf_counter() - origin
                outcome, detail, seconds = request(http, item, data, args.timeout)
                with lock:
                    records.append({"client": c, "input": item.name, "kind": item.kind, "outcome": outcome,
                                    "detail": detail, "t_s": t, "done_s": time.perf_counter() - origin,
                                    "seconds": seconds})
        finally:
            http.close()

    threads = [threading.Thread(target=run_client, args=(c,), daemon=True) for c in range(args.clients)]
    for t in threads:
        t.start()
    printed = 0
    while any(t.is_alive() for t in threads):
        time.sleep(min(1.0, args.window / 4))
        elapsed = time.perf_counter() - origin
        while (printed + 1) * args.window <= elapsed and (printed + 1) * args.window <= args.duration + 1e-9:
            lo, hi = printed * args.window, (printed + 1) * args.window
            with lock:
                rows = [r for r in records if lo <= r["done_s"] < hi]
            w = summarise_window(rows, lo, hi, sampler.samples)
            print(f"{hi:6.0f} s: {w['requests']:5d} requests, {w['errors']} errors, p50 {w['p50_ms']} ms, "
                  f"p95 {w['p95_ms']} ms, RSS {w['rss_mb']} MB, uploads {w['uploads_mb']} MB, load {w['load_1min']}",
                  flush=True)
            printed += 1
    load_end = time.perf_counter() - origin
    sampler.halt.set()
    sampler.join()
    if proc.poll() is None:
        under_load = sampler.sample()  # right after the last answer
        time.sleep(args.settle)
        settled = sampler.sample()  # after the server had `--settle` seconds of quiet
    else:  # it died: the last sample is all there is (server.alive_at_end says so)
        under_load = settled = sampler.samples[-1]
    samples = sampler.samples

    # windows over the whole soak; the last one ends with the last answer (requests in flight at the deadline):
    # a remainder under half a window joins the window before it
    windows, n = [], max(1, math.floor(load_end / args.window))
    if load_end - n * args.window >= args.window / 2:
        n += 1
    for i in range(n):
        lo, hi = i * args.window, (i + 1) * args.window if i < n - 1 else load_end
        windows.append(summarise_window([r for r in records if lo <= r["done_s"] and (r["done_s"] < hi or i == n - 1)],
                                        lo, hi, samples))

    warmup = args.warmup if args.warmup is not None else min(60.0, args.duration / 5)
    steady = [s for s in samples if warmup <= s["t_s"] <= load_end]
    outcomes = Counter(r["outcome"] for r in records)
    by_input = {}
    for item in inputs:
        rows = [r for r in records if r["input"] == item.name]
        by_input[item.name] = {"kind": item.kind, "expect": item.expect, "n": len(rows),
                               **dict(Counter(r["outcome"] for r in rows))}
    error_examples = [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
                      for r in records if r["outcome"] not in CORRECT][:20]
    at_warmup = steady[0] if steady else None
    rss = [s["rss_mb"] for s in samples]
    return {
        "first_pass": first_pass,
        "requests": {"total": len(records), "correct": sum(outcomes[o] for o in CORRECT),
                     "errors": sum(v for k, v in outcomes.items() if k not in CORRECT),
                     "by_outcome": dict(outcomes),
                     "errors_by_kind": {k: outcomes.get(k, 0) for k in ERRORS},
                     "by_input": by_input, "requests_per_s": round(len(records) / load_end, 2)},
        "error_examples": error_examples,
        "latency": {"all": percentiles([r["seconds"] for r in records if r["outcome"] in CORRECT]),
                    "photos": percentiles([r["seconds"] for r in records if r["outcome"] == "prediction"]),
                    **{kind: percentiles([r["seconds"] for r in records
                                          if r["kind"] == kind and r["outcome"] in CORRECT])
                       for kind in ("huge", "broken")}},
        "windows": windows,
        "memory": {
            "rss_mb_start": start_stats["rss_mb"],
            "rss_mb_after_warmup": at_warmup["rss_mb"] if at_warmup else None,
            "rss_mb_end_of_load": under_load["rss_mb"], "rss_mb_end": settled["rss_mb"], "rss_mb_max": max(rss),
            "warmup_s": warmup, "warmup_requests": at_warmup["requests"] if at_warmup else None,
            "growth_after_warmup_mb": round(under_load["rss_mb"] - at_warmup["rss_mb"], 1) if at_warmup else None,
            "rss_slope_mb": slope(steady, "rss_mb"),
            # levelling off (allocator arenas and gradio's bounded caches filling) or still climbing?
            "rss_slope_mb_second_half": slope([s for s in steady if s["t_s"] >= (warmup + load_end) / 2], "rss_mb"),
            "uploads_slope_mb": slope(steady, "uploads_mb"),
            "tmp_slope_mb": slope(steady, "tmp_mb"),
            "threads": {"start": start_stats["threads"], "end": settled["threads"],
                        "max": max(s["threads"] for s in samples)},
            "open_files": {"start": start_stats["open_files"], "end": settled["open_files"],
                           "max": max(s["open_files"] or 0 for s in samples)},
            "uploads_mb": {"start": start_stats["uploads_mb"], "end": settled["uploads_mb"]},
            "tmp_mb": {"start": start_stats["tmp_mb"], "end": settled["tmp_mb"]},
            "samples": samples,
        },
        "soak_seconds": round(load_end, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder, Hub id or .onnx (default: an untrained --arch)")
    p.add_argument("--arch", default="baseline_cnn_bn", help="the untrained model built when --model is not given")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"])
    p.add_argument("--threads", type=int, default=None, help="the app's --threads (default: its own)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default: 16)")
    p.add_argument("--duration", type=float, default=300, help="seconds of load (default: 300)")
    p.add_argument("--window", type=float, default=30, help="latency window in seconds (default: 30)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds left out of the memory slope (default: a fifth of --duration, at most 60)")
    p.add_argument("--sample-seconds", type=float, default=2, help="memory sampling period (default: 2)")
    p.add_argument("--settle", type=float, default=3, help="quiet seconds before the final memory sample")
    p.add_argument("--timeout", type=float, default=60, help="a request without an answer by then is an error")
    p.add_argument("--max-file-size", type=parse_size, default=parse_size("20mb"),
                   help="the app's upload limit, passed on (default: 20mb); the huge file is 1.5x this")
    p.add_argument("--mix", default="photo=0.8,huge=0.08,broken=0.12",
                   help="share of requests per kind (default: %(default)s)")
    p.add_argument("--inputs", nargs="+", default=["*"], metavar="PATTERN",
                   help="send only the inputs whose names match these fnmatch patterns (default: all; the "
                        "names are listed in the result's settings.inputs), e.g. 'photo_2000*' 'cifar_*'")
    p.add_argument("--sessions", choices=["request", "client"], default="request",
                   help="a new gradio session per request (a new visitor each time: the default) or one per "
                        "client (one page sending request after request)")
    p.add_argument("--app-args", default="", help="more arguments for app.py, e.g. '--max-sessions 100'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="result folder (default $OUT or bench/results)")
    p.add_argument("--name", default="demo_soak", help="result file name (default: demo_soak)")
    args = p.parse_args(argv)
    mix = {k: float(v) for k, v in (part.split("=") for part in args.mix.split(","))}
    if set(mix) != {"photo", "huge", "broken"}:
        p.error("--mix needs photo=, huge= and broken= shares")

    import gradio

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed soak still stops its server
    inputs = [i for i in build_inputs(args.max_file_size, mix, args.seed)
              if any(fnmatch.fnmatchcase(i.name, pattern) for pattern in args.inputs)]
    if not inputs or not sum(i.weight for i in inputs):
        p.error("--inputs/--mix leave nothing to send")
    machine = benchlib.machine()
    with tempfile.TemporaryDirectory(prefix="demo_soak_") as tmp:
        tmp = Path(tmp)
        model = args.model or str(benchlib.demo_model_dir(args.arch, tmp / "model"))
        # the server's disk: gradio's uploads and cached outputs, and its other temp files (the previews)
        folders = {"uploads": tmp / "gradio", "tmp": tmp / "tmp"}
        for f in folders.values():
            f.mkdir()
        log = tmp / "app.log"
        proc, url, cold = start_app(model, log, backend=args.backend, threads=args.threads,
                                    extra_args=["--max-file-size", f"{args.max_file_size}b",
                                                *shlex.split(args.app_args)],
                                    env={"GRADIO_TEMP_DIR": str(folders["uploads"]), "TMPDIR": str(folders["tmp"])})
        try:
            cpu = benchlib.cpu_seconds(proc.pid)
            result = soak(url, proc, inputs, args, folders)
            cpu = benchlib.cpu_seconds(proc.pid) - cpu
            alive = proc.poll() is None
        finally:
            stop_app(proc)
        text = log.read_text(errors="replace")
    tracebacks = text.count("Traceback (most recent call last)")
    payload = {
        "benchmark": "demo_soak",
        "what": __doc__.split("\n\n")[0],
        "machine": {**machine, "gradio": gradio.__version__},
        "settings": {"model": args.model or f"untrained {args.arch}", "backend": args.backend,
                     "threads": args.threads, "clients": args.clients, "duration_s": args.duration,
                     "window_s": args.window, "sample_s": args.sample_seconds, "timeout_s": args.timeout,
                     "max_file_size_bytes": args.max_file_size, "mix": mix, "input_patterns": args.inputs,
                     "sessions": args.sessions, "app_args": args.app_args,
                     "seed": args.seed,
                     "inputs": [{"name": i.name, "kind": i.kind, "expect": i.expect, "weight": round(i.weight, 4),
                                 "bytes": len(i.payload(random.Random(0)))} for i in inputs]},
        "server": {"cold_start_s": round(cold, 2), "cpu_s_during_soak": round(cpu, 1),
                   "alive_at_end": alive, "log_tracebacks": tracebacks,
                   "log_tail": text.splitlines()[-30:] if tracebacks else []},
        **result,
    }
    path = benchlib.write_result(args.name, payload, args.out)
    req, mem = payload["requests"], payload["memory"]
    print(f"{req['total']} requests ({req['requests_per_s']}/s), {req['errors']} errors {req['errors_by_kind']}; "
          f"photos p50 {payload['latency']['photos']['p50_ms']} ms p95 {payload['latency']['photos']['p95_ms']} ms; "
          f"RSS {mem['rss_mb_start']} -> {mem['rss_mb_end']} MB (max {mem['rss_mb_max']}), slope after warm-up "
          f"{mem['rss_slope_mb']['per_1000_requests']} MB / 1,000 requests; {tracebacks} tracebacks in the log "
          f"({path.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
