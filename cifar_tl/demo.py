"""Gradio demo over one Predictor: `python app.py --model DIR_OR_HUB_ID`, or `cifar_tl.demo.main([...])`
from a Hugging Face Space's app.py.

The model loads once at start. Requests go through gradio's queue and run side by side, each decoding its own
upload; only the model step is batched (`Batcher`): while one batch runs, the next requests' thumbnails gather,
so 16 concurrent users cost about one batched forward pass, not 16. One bad upload (a damaged file, a malformed
API call, a dead URL) fails only its own request.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import logging
import os
import queue
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .console import FlagParser, error_line
from .model_flags import MAX_PIXELS, add_model_args, check_pixel_limit, default_model, onnx_conflict

if TYPE_CHECKING:  # gradio and torch take seconds to import: `app.py --help` and a bad flag answer without them
    import gradio as gr

    from .inference import Predictor

log = logging.getLogger(__name__)
EXAMPLES_ROOT = Path(__file__).resolve().parent / "examples"  # package data: a gallery per dataset
EXAMPLE_SETS = {"cifar100": "CIFAR-100", "cifar10": "CIFAR-10"}  # folder -> the dataset its images come from
DELETE_CACHE = (300, 900)  # gradio's (sweep every N s, delete files older than M s)
PREVIEW_SIDE = 128  # the thumbnail preview is upscaled with nearest neighbour so its pixels stay visible
# gradio copies each returned preview into its own cache (swept by delete_cache) as the batch ends, so ours are
# needed for seconds: files not written or reused for this long are deleted, checked at most once a minute
PREVIEW_MAX_AGE_S = 600
NO_IMAGE = "Upload an image, take a webcam photo or paste one from the clipboard."
# gradio keeps a copy of the page's component config per visitor session (~25 KB of Python objects for this page),
# dropping the oldest only past this many: at its default of 10000 a server with steady traffic grows by ~0.25 GB
# before it levels off. The page holds no gr.State, so a dropped session loses nothing.
MAX_SESSIONS = 1000


# --------------------------------------------------------------------------------------------- page text


def model_card(predictor: Predictor) -> str:
    """Architecture, resolution, data and test accuracy from config.json, as one Markdown paragraph."""
    extra = predictor.config.get("cifar_tl", {})
    metrics = extra.get("metrics") or {}
    dataset = metrics.get("dataset") or (extra.get("train_config") or {}).get("dataset")
    lines = [f"**Model**: `{predictor.config['architecture']}`, {len(predictor.fine_names)} classes"
             + (f" in {len(predictor.coarse_names)} superclasses" if predictor.has_coarse else "")
             + f", input {predictor.image_size}×{predictor.image_size} px"
             + (f" upscaled from {predictor.data_size}×{predictor.data_size}."
                if predictor.image_size != predictor.data_size else ".")]
    if dataset:
        lines.append(f"**Data**: `{public_name(dataset)}`" + (f", evaluated on {metrics['n']} held-out test images."
                                                               if "n" in metrics else "."))
    scores = [f"top-1 {metrics['top1']:.1%}" if "top1" in metrics else "",
              f"top-5 {metrics['top5']:.1%}" if "top5" in metrics else "",
              f"superclass {metrics['coarse_top1']:.1%}" if "coarse_top1" in metrics else ""]
    if any(scores):
        lines.append("**Test accuracy**: " + ", ".join(s for s in scores if s) + ".")
    return "  \n".join(lines)


def public_name(source: str) -> str:
    """A Hub id as it is; a local path by its last part: the trainer's folders mean nothing to a visitor."""
    local = source.startswith(("/", ".", "~")) or source.count("/") > 1  # a Hub id is user/name
    return Path(source).name if local else source


def serving_line(source: str, why: str) -> str:
    """What the page says it serves: a Hub id, or a folder relative to where the demo runs (on a Space: `model`)."""
    path = Path(source).expanduser().resolve()
    if path.exists() and path.is_relative_to(Path.cwd()):
        source = str(path.relative_to(Path.cwd()))
    return f"`{source}` ({why})"


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def confusion_highlights(predictor: Predictor, n: int = 5) -> str | None:
    """The model's weak spots from its evaluation, or None when the folder carries none: the most confused pairs
    and the hardest and easiest classes from the `confusion.json` in the model folder ({"labels": [...],
    "matrix": [[count]]}, rows = true class; it goes to the Hub with the weights), or for folders without one
    the per-class accuracies of the training run's `eval_details.json` next to it."""
    parts, per_class = [], None
    folder = predictor.model_dir
    confusion = _load_json(folder / "confusion.json") if folder else None
    if isinstance(confusion, dict) and "matrix" in confusion:
        labels = confusion.get("labels") or predictor.fine_names
        try:
            matrix = np.asarray(confusion["matrix"], dtype=np.float64)
        except (TypeError, ValueError):  # ragged rows, text
            matrix = None
        if matrix is None or matrix.shape != (len(labels), len(labels)):  # an edited file must not stop the demo
            log.warning("%s is not a %d x %d matrix of counts with its labels: the demo shows no weak spots",
                        folder / "confusion.json", len(labels), len(labels))
            return None
        off = matrix.copy()
        np.fill_diagonal(off, 0)
        rows = matrix.sum(1, keepdims=True).clip(min=1)
        pairs = [(t, p) for t, p in (divmod(int(i), off.shape[1]) for i in np.argsort(off, axis=None)[::-1][:n])
                 if off[t, p] > 0]
        if pairs:
            parts.append("**Most confused pairs** (true → predicted: share of the true class's test images):\n"
                         + "\n".join(f"- {labels[t]} → {labels[p]}: {off[t, p] / rows[t, 0]:.0%} "
                                     f"({int(off[t, p])} images)" for t, p in pairs))
        per_class = {labels[i]: matrix[i, i] / matrix[i].sum() for i in range(len(labels)) if matrix[i].sum()}
    elif folder:
        details = _load_json(folder / "eval_details.json") or _load_json(folder.parent / "eval_details.json")
        per_class = ((details if isinstance(details, dict) else {}).get("plain") or {}).get("per_class")
        if not isinstance(per_class, dict) or not all(isinstance(v, (int, float)) for v in per_class.values()):
            per_class = None
    if per_class:
        ranked = sorted(per_class.items(), key=lambda kv: kv[1])
        parts.append("**Hardest classes** (test accuracy): "
                     + ", ".join(f"{name} {acc:.0%}" for name, acc in ranked[:n])
                     + "  \n**Easiest**: " + ", ".join(f"{name} {acc:.0%}" for name, acc in ranked[::-1][:n]))
    return "\n\n".join(parts) or None


def example_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


def default_examples(predictor: Predictor) -> Path | None:
    """The packaged gallery whose true classes the model can all predict (CIFAR-100's for a CIFAR-100 model,
    CIFAR-10's for a CIFAR-10 one); None for other classes: a gallery the model cannot name would mislead."""
    for name in EXAMPLE_SETS:
        files = example_files(EXAMPLES_ROOT / name)
        if files and {example_label(f) for f in files} <= set(predictor.fine_names):
            return EXAMPLES_ROOT / name
    return None


def dataset_title(predictor: Predictor) -> str:
    """"CIFAR-100 image classifier" for a model with exactly CIFAR-100's classes (CIFAR-10 likewise), else
    "Image classifier"."""
    from .card import CIFAR10_NAMES, CIFAR100_FINE

    names = sorted(predictor.fine_names)
    known = {"CIFAR-100": CIFAR100_FINE, "CIFAR-10": CIFAR10_NAMES}
    return next((f"{title} image classifier" for title, classes in known.items() if names == sorted(classes)),
                "Image classifier")


def example_label(path: Path) -> str:
    """`07_butterfly.png` -> `butterfly` (the true class, in the file name)."""
    return path.stem.split("_", 1)[-1]


# --------------------------------------------------------------------------------------------- app


_previews_lock = threading.Lock()  # a sweep never deletes a preview being handed over


def save_preview(thumb: np.ndarray, folder: Path) -> str | None:
    """Write a preview PNG once per distinct content, atomically, and return its path (None when the disk
    cannot take it: the prediction still shows). Gradio rewrites array outputs in place, so a concurrent download
    of an identical preview could read a truncated file; files handed over as paths it copies atomically and
    reuses."""
    buf = io.BytesIO()
    Image.fromarray(thumb).save(buf, format="PNG")
    data = buf.getvalue()
    path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    with _previews_lock:
        if path.exists():
            os.utime(path)  # in use again: out of the next sweep's reach
        else:
            tmp = path.with_name(f".{path.name}.{threading.get_ident()}")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, path)
            except OSError as err:  # a full temp disk failed the whole batch of requests
                tmp.unlink(missing_ok=True)
                log.warning("no preview: cannot write %s (%s)", path, err.strerror or err)
                return None
    return str(path)


def sweep_previews(folder: Path, max_age: float = PREVIEW_MAX_AGE_S) -> int:
    """Delete the previews in `folder` not written or reused for `max_age` seconds; return how many. Without
    this a long-running demo keeps one file per distinct image it ever saw."""
    cutoff, removed = time.time() - max_age, 0
    with _previews_lock:
        for path in [*folder.glob("*.png"), *folder.glob(".*.png.*")]:  # and what a crashed write left
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
    return removed


class Batcher:
    """Thumbnails from concurrent requests -> one model call per batch. gradio's own batching (`batch=True`)
    moves every request's upload into its cache before the function runs and fails all of them when one cannot
    be moved (a malformed API call, a dead URL), so requests run on their own and share only the model step:
    `workers` threads each take whatever thumbnails are waiting, up to `max_batch_size`, as one batch."""

    def __init__(self, predict: Callable[[list[np.ndarray]], list[dict]], max_batch_size: int = 16,
                 workers: int = 1):
        self.predict, self.max_batch_size = predict, max_batch_size
        self._waiting: queue.SimpleQueue[tuple[np.ndarray, Future]] = queue.SimpleQueue()
        for i in range(workers):
            threading.Thread(target=self._serve, name=f"cifar_tl-batches-{i}", daemon=True).start()

    def __call__(self, thumb: np.ndarray) -> dict:
        done: Future = Future()
        self._waiting.put((thumb, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            jobs = [self._waiting.get()]
            while len(jobs) < self.max_batch_size:
                try:
                    jobs.append(self._waiting.get_nowait())
                except queue.Empty:
                    break
            try:
                results = self.predict([thumb for thumb, _ in jobs])
            except Exception as err:  # the model failed: every request of the batch hears why
                for _, done in jobs:
                    done.set_exception(err)
            else:
                for (_, done), result in zip(jobs, results):
                    done.set_result(result)


def uploaded(path: Path) -> bool:
    """Whether `path` lies in gradio's upload folder, where uploads and the cached examples are (symlinks
    followed): the event skips gradio's preprocessing, which would refuse any other file of the server."""
    from gradio.utils import get_upload_folder

    return path.resolve().is_relative_to(Path(get_upload_folder()).resolve())


def make_classifier(predictor: Predictor, top_k: int = 5, max_pixels: int = MAX_PIXELS, max_batch_size: int = 16,
                    workers: int = 1) -> Callable[[dict | None], tuple]:
    """The event function: one upload (a gradio FileData dict, unprocessed) -> top-k fine classes, superclass,
    thumbnail preview (a PNG path), message. Decoding runs in the request's own thread, at most one per CPU core
    at a time (a decode of a large image holds it for seconds and a few hundred MB), the model step batched."""
    from .inference import ImageError, open_image

    scale = max(1, PREVIEW_SIDE // predictor.data_size)
    previews_dir = tempfile.TemporaryDirectory(prefix="cifar_tl_previews_")  # removed when the app exits
    next_sweep = [time.monotonic() + 60]
    decoding = threading.BoundedSemaphore(os.cpu_count() or 1)
    batcher = Batcher(lambda thumbs: predictor.predict(thumbs, top_k=top_k), max_batch_size, workers)

    def classify(upload: dict | None) -> tuple:
        if time.monotonic() >= next_sweep[0]:
            next_sweep[0] = time.monotonic() + 60
            sweep_previews(Path(previews_dir.name))
        if not upload or not upload.get("path"):
            return None, None, None, NO_IMAGE
        if not uploaded(Path(upload["path"])):  # an API call may name any path: gradio checks only typed FileData
            return None, None, None, "⚠️ This file was not uploaded to this demo: please upload an image."
        if not Path(upload["path"]).exists():  # gradio deletes uploads after 15 minutes; the page still shows it
            return None, None, None, ("⚠️ This upload is no longer on the server (uploads are kept for "
                                      f"{DELETE_CACHE[1] // 60} minutes): please upload the image again.")
        try:
            with decoding:
                thumb = predictor.to_thumbnail(open_image(upload["path"], max_pixels))
        except ImageError as err:
            return None, None, None, f"⚠️ Could not use this file: {err}."
        pred = batcher(thumb)
        fine = {c["label"]: c["score"] for c in pred["fine"]}
        coarse = {pred["coarse"]["label"]: pred["coarse"]["score"]} if pred["coarse"] else None
        preview = save_preview(thumb.repeat(scale, 0).repeat(scale, 1), Path(previews_dir.name))
        return fine, coarse, preview, ""

    return classify


def build_demo(predictor: Predictor, *, examples_dir: Path | None = None, top_k: int = 5,
               max_pixels: int = MAX_PIXELS, max_batch_size: int = 16, concurrency_limit: int = 1,
               serving: str | None = None) -> gr.Blocks:
    import gradio as gr

    size = f"{predictor.data_size}×{predictor.data_size}"
    classify = make_classifier(predictor, top_k, max_pixels, max_batch_size, concurrency_limit)
    # delete_cache: uploads are needed only while their request runs, so every 5 minutes files over 15 minutes
    # old go (bench/demo_soak.py: ~0.7 GB of uploads per 1,000 requests; kept a day, a busy Space fills its disk)
    title = dataset_title(predictor)
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(f"# {title}\n" + model_card(predictor)
                    + (f"  \n**Serving**: {serving}." if serving else ""), elem_id="model-card")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Your image", type="filepath", image_mode=None, height=300,
                                 sources=["upload", "webcam", "clipboard"], elem_id="input-image")
                button = gr.Button("Classify", variant="primary", elem_id="classify")
                small = " (CIFAR's resolution), so small details vanish" if predictor.data_size <= 32 else ""
                gr.Markdown(f"The model sees a **{size} thumbnail** of your image{small}: centred single objects "
                            "work best. Preview of what it sees:")
                preview = gr.Image(label=f"What the model sees ({size})", interactive=False,
                                   height=PREVIEW_SIDE + 48, elem_id="thumbnail")
            with gr.Column():
                message = gr.Markdown(label="Message", elem_id="message")
                fine = gr.Label(label=f"Top-{top_k} classes", num_top_classes=top_k, elem_id="fine")
                coarse = gr.Label(label="Superclass (the most probable group: its classes' summed probability)",
                                  num_top_classes=1, visible=predictor.has_coarse,
                                  elem_id="coarse")
        outputs = [fine, coarse, preview, message]
        # as many requests in flight as the model's batches can take; each decodes its own upload
        gr.on([button.click, image.input], classify, inputs=image, outputs=outputs, api_name="classify",
              concurrency_limit=max_batch_size * concurrency_limit, preprocess=False)
        examples_dir = examples_dir or default_examples(predictor)
        files = example_files(examples_dir) if examples_dir else []
        if files:
            packaged = examples_dir.parent == EXAMPLES_ROOT and examples_dir.name in EXAMPLE_SETS
            gr.Examples([[str(f)] for f in files], inputs=image, outputs=outputs, fn=classify,
                        preprocess=False, cache_examples=True, cache_mode="lazy", examples_per_page=len(files),
                        label=(f"{EXAMPLE_SETS[examples_dir.name]} test images" if packaged else "Examples")
                              + "; true classes in order: " + ", ".join(example_label(f) for f in files),
                        elem_id="examples")
        highlights = confusion_highlights(predictor)
        if highlights:
            with gr.Accordion("Where this model struggles", open=False):
                gr.Markdown(highlights)
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = FlagParser(prog="app.py", description="Gradio demo of a cifar-tl model.")
    add_model_args(parser, required=False)
    parser.add_argument("--host", default=None, help="default: $GRADIO_SERVER_NAME or 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT or 7860")
    parser.add_argument("--examples", type=Path, help="folder of example PNGs named <id>_<true class>.png (default: "
                        "the packaged CIFAR-100 or CIFAR-10 test images when the model has those classes)")
    parser.add_argument("--max-file-size", default="20mb", type=file_size,
                        help="largest upload gradio accepts: a number of bytes with b, kb, mb or gb (default: 20mb)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="images per model call (default: 16)")
    parser.add_argument("--concurrency-limit", type=int, default=1, help="model calls run at once (default: 1)")
    parser.add_argument("--queue-size", type=int, default=256,
                        help="requests waiting before new ones are refused (default: %(default)s)")
    parser.add_argument("--max-sessions", type=int, default=MAX_SESSIONS,
                        help="visitor sessions gradio keeps in memory, oldest dropped first (default: %(default)s; "
                             "gradio's own 10000 hold ~0.25 GB for this page)")
    args = parser.parse_args(argv)
    for flag in ("max_batch_size", "concurrency_limit", "queue_size", "max_sessions"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1; got {getattr(args, flag)}")
    check_pixel_limit(parser, args.max_pixels)
    if args.port is not None and not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0-65535; got {args.port}")
    return args


def file_size(text: str) -> str:
    """`--max-file-size` as gradio reads it (digits, then b / kb / mb / gb / tb, binary multiples), checked here:
    gradio itself fails with a traceback only once the model has loaded."""
    if not re.fullmatch(r"\d+\s*(b|kb|mb|gb|tb)", text.strip(), re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write it as 20mb, 500kb or 1gb")
    return text.strip().lower()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.examples and not example_files(args.examples):
        return error_line(f"--examples {args.examples}: no .png files there (name them <id>_<true class>.png)")
    source, why = (args.model, "--model") if args.model else default_model()
    if source is None:
        return error_line(why)
    conflict = onnx_conflict(source, args.backend, args.device)
    if conflict:
        return error_line(conflict)
    if args.port and port_taken(args.host or "127.0.0.1", args.port):  # before seconds of model loading
        return error_line(f"cannot serve on {args.host or '127.0.0.1'}:{args.port}: the port is in use; choose "
                          "another with --port")
    print(f"serving {source} ({why})", flush=True)
    from .loading import ModelLoadError, backend_of, load_predictor

    try:
        named = None if args.model else f"{why} ({source})"  # e.g. $CIFAR_TL_MODEL, which no flag set
        predictor = load_predictor(source, args.backend, args.device, args.threads, named=named)
    except ModelLoadError as err:
        return error_line(err)
    print(f"backend: {backend_of(predictor)} (--backend {args.backend})", flush=True)
    with examples_cache():
        demo = build_demo(predictor, examples_dir=args.examples, max_pixels=args.max_pixels,
                          max_batch_size=args.max_batch_size, concurrency_limit=args.concurrency_limit,
                          serving=serving_line(source, why))
        try:
            demo.queue(max_size=args.queue_size).launch(server_name=args.host, server_port=args.port,
                                                        max_file_size=args.max_file_size,
                                                        state_session_capacity=args.max_sessions)
        except OSError as err:  # the port is taken, or the host is not this machine's
            return error_line(f"cannot serve on {args.host or '127.0.0.1'}:{args.port or 7860} ({err}); "
                              "choose another with --port / --host")
    return 0


def port_taken(host: str, port: int) -> bool:
    """Whether another process listens on host:port (a failed bind for any other reason is gradio's to report)."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            return err.errno == errno.EADDRINUSE
    return False


@contextmanager
def examples_cache() -> Iterator[Path]:
    """A fresh folder for gradio's example cache while the demo serves, removed after (under
    $GRADIO_EXAMPLES_CACHE when set). gradio keys that cache by the component's number, not by the model, in the
    working folder's .gradio/: a demo of another model, earlier or alongside, would answer for this one."""
    root = os.environ.get("GRADIO_EXAMPLES_CACHE")
    if root:
        Path(root).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cifar_tl-examples-", dir=root) as folder:
        os.environ["GRADIO_EXAMPLES_CACHE"] = folder  # read again when gradio serves a cached file
        try:
            yield Path(folder)
        finally:
            if root is None:
                os.environ.pop("GRADIO_EXAMPLES_CACHE", None)
            else:
                os.environ["GRADIO_EXAMPLES_CACHE"] = root
