"""Training throughput (images/s) of our training step against the two reference pipelines.

Pipelines, all with the same model, image size, batch size, thread count, optimizer (Adam, lr 1e-4), loss
(cross-entropy) and precision:
  ours      uint8 batch from the tensor store (cifar_tl.data.make_loader; on a GPU the store lives in GPU
            memory, as in train.py) -> TrainTransform (one grid_sample: shift/zoom/flip + resize, normalise,
            channels_last) -> model (channels_last; on a GPU its forward + backward replay as CUDA graphs,
            train.py's default there) -> loss -> step
  ours_eager  (GPU only, in the default set there) ours without the CUDA graphs
  timm      timm.data create_dataset (image folder of the JPEGs) + create_loader (timm's create_transform
            inside) with train.py's defaults (RandomResizedCrop, random interpolation, flip, colour jitter
            0.4, prefetcher normalising on the device) -> plain train step
  timm_cl   the same with train.py's --channels-last (model and input in channels_last)
  hf        the transformers image-classification example: datasets Dataset.with_transform with torchvision
            per-image RandomResizedCrop/flip/ToTensor/Normalize, torch DataLoader with its collate_fn

Each pipeline gets its own copy of the model and optimizer. Per (model, size): `--repeats` rounds; in each
round every pipeline (in a rotated order) starts a fresh loader iterator, runs `--warmup` untimed steps
(loader start-up; twice as many in the first round, for first-call costs) and `--steps` timed steps. The
median of the rounds is reported, and ratios of ours to each reference. `--data-only` times the data paths
without training. `--epoch-images N` also times one full epoch of N images per pipeline (the GPU "time per
CIFAR epoch at 224 px" figure; `--repeats 0` runs it alone).

  python bench/train_throughput.py --skip baseline_cnn_bn@128 baseline_cnn_bn@224   # CPU matrix (~10 CPU-min)
  python bench/train_throughput.py --models baseline_cnn_bn --sizes 32 --steps 1 --repeats 1   # smoke, < 1 min
  python bench/train_throughput.py --device cuda --workers 14 --batch-sizes 32:256,64:256,128:256,224:128 \
      --steps 8 --warmup 2 --repeats 2                                   # GPU (see bench/gpu_suite.sh)
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
from contextlib import nullcontext

import benchlib
import torch
import torch.nn.functional as F

PIPELINES = ("ours", "ours_eager", "timm", "timm_cl", "hf")
DEFAULT_BATCH = {32: 64, 64: 32, 128: 32, 224: 16}  # small enough for a 2-core CPU's budget
DEFAULT_STEPS = {32: 2, 64: 1, 128: 1, 224: 1}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--dataset", default=benchlib.default_dataset(), help="Hub-style parquet folder (train-*.parquet)"
    )
    p.add_argument(
        "--models", nargs="+", default=["baseline_cnn_bn", "efficientnet_b0", "tf_efficientnet_lite0"]
    )
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 128, 224], help="model input sizes (px)")
    p.add_argument(
        "--skip",
        nargs="+",
        default=[],
        metavar="MODEL@SIZE",
        help="model/size pairs to leave out, e.g. baseline_cnn_bn@224",
    )
    p.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=None,
                   help="default: all; ours_eager only on a GPU")
    p.add_argument(
        "--batch-sizes",
        default=",".join(f"{k}:{v}" for k, v in DEFAULT_BATCH.items()),
        help="SIZE:BATCH,... (sizes not listed use 32)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per round (default by size: "
        + ", ".join(f"{k}px {v}" for k, v in DEFAULT_STEPS.items())
        + ")",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per round (absorb loader start-up)")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="alternating rounds per (model, size); 0 skips the matrix (--epoch-images alone)",
    )
    p.add_argument("--images", type=int, default=4096, help="images in each pipeline's training set")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the training process")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="DataLoader workers of the reference pipelines (ours needs none)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: what train.py picks per model (bf16 on CUDA; on a CPU bf16 only with native bf16 and no "
        "depthwise convolutions, else fp32), for every pipeline",
    )
    p.add_argument(
        "--data-only",
        action="store_true",
        help="time each pipeline's data path alone (loader + transform, no training step)",
    )
    p.add_argument(
        "--epoch-images",
        type=int,
        default=0,
        help="also time one full epoch over this many images per pipeline (e.g. 50000)",
    )
    p.add_argument("--epoch-size", type=int, default=224, help="input size for --epoch-images")
    p.add_argument("--epoch-model", default="efficientnet_b0")
    p.add_argument("--out", default=None, help="result folder (default $OUT or bench/results)")
    p.add_argument("--name", default=None, help="result file name (default train_throughput_<device>)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------- pipelines


class Pipeline:
    """A model + optimizer + a way to start a loader iterator yielding (input, target) ready for the model."""

    def __init__(self, name, model, loader, prepare, device, graphed=False):
        self.name, self.model, self.loader, self.prepare, self.device = name, model, loader, prepare, device
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        self.graph_pending = graphed  # captured on the first training batch (untimed warm-up)
        self.capture_error = None
        self.epochs_started = 0

    def batches(self):
        while True:  # endless: a new epoch starts when the loader runs out
            self.epochs_started += 1
            for batch in self.loader:
                yield self.prepare(batch)


def build_pipelines(args, names, model_name, size, batch_size, store, folder, hf_ds, device):
    from cifar_tl.augment import TrainTransform
    from cifar_tl.data import make_loader, on_device
    from cifar_tl.models import create_model, data_config

    base = create_model(model_name, pretrained=False, num_classes=10).to(device)
    dcfg = data_config(base, size)
    mean, std = dcfg["mean"], dcfg["std"]
    out = []
    for name in names:
        model = copy.deepcopy(base).train()
        if name in ("ours", "ours_eager", "timm_cl"):
            model = model.to(memory_format=torch.channels_last)
        if name.startswith("ours"):
            tf = TrainTransform(size, mean, std)  # the engine's defaults: augment basic, channels_last
            loader = make_loader(on_device(store, device), batch_size, shuffle=True, drop_last=True)
            prepare = lambda b, tf=tf: (
                tf(b["image"].to(device, non_blocking=True)),
                b["fine"].to(device, non_blocking=True),
            )
        elif name.startswith("timm"):
            loader = timm_loader(folder, size, batch_size, mean, std, args.workers, device)
            cl = name == "timm_cl"
            prepare = lambda b, cl=cl: (
                b[0].contiguous(memory_format=torch.channels_last) if cl else b[0],
                b[1],
            )
        else:
            loader = hf_loader(hf_ds, size, batch_size, mean, std, args.workers, device)
            prepare = lambda b: (
                b["pixel_values"].to(device, non_blocking=True),
                b["labels"].to(device, non_blocking=True),
            )
        out.append(Pipeline(name, model, loader, prepare, device, graphed=name == "ours" and device.type == "cuda"))
    return out


def timm_loader(folder, size, batch_size, mean, std, workers, device):
    """timm train.py's data path with its default augmentation flags."""
    from timm.data import create_dataset, create_loader

    dataset = create_dataset("", root=str(folder), split="train", is_training=True)
    # persistent_workers=False: an abandoned round's workers stop at once instead of decoding their queued
    # batches while the next pipeline is timed (in training they only differ at epoch starts)
    return create_loader(
        dataset,
        input_size=(3, size, size),
        batch_size=batch_size,
        is_training=True,
        scale=(0.08, 1.0),
        ratio=(3 / 4, 4 / 3),
        hflip=0.5,
        color_jitter=0.4,
        interpolation="random",
        mean=mean,
        std=std,
        num_workers=workers,
        device=device,
        use_prefetcher=True,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def hf_loader(ds, size, batch_size, mean, std, workers, device):
    """transformers' examples/pytorch/image-classification/run_image_classification.py, as Trainer runs it."""
    from torchvision.transforms import Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, ToTensor

    train_tf = Compose([RandomResizedCrop(size), RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)])

    def train_transforms(example_batch):
        example_batch["pixel_values"] = [train_tf(img.convert("RGB")) for img in example_batch["img"]]
        return example_batch

    def collate_fn(examples):
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples]),
        }

    return torch.utils.data.DataLoader(
        ds.with_transform(train_transforms),
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate_fn,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )


# --------------------------------------------------------------------------------------------- timing


def case_precision(requested: str, device, model_name: str) -> str:
    """`auto`: what train.py picks for this model on this device (bf16 on a GPU; on a CPU bf16 only where it
    pays)."""
    if requested != "auto":
        return requested
    from cifar_tl.precision import mixed_precision

    # the bench has no fp16 (GradScaler) step: a GPU without bf16 runs fp32
    return "bf16" if mixed_precision("auto", model_name, cuda=device.type == "cuda") == "bf16" else "fp32"


def autocast(device, precision):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def train_step(pipe: Pipeline, x, y, precision: str) -> None:
    if pipe.graph_pending:
        from cifar_tl.cuda_graphs import capture

        pipe.graph_pending = False
        try:
            capture(pipe.model, x, torch.bfloat16 if precision == "bf16" else None)
        except RuntimeError as err:  # keep the rest of the matrix; the row records it
            pipe.capture_error = str(err)
            print(f"!! {pipe.name}: CUDA graph capture failed, timed without graphs: {err}", flush=True)
    with autocast(pipe.device, precision):
        logits = pipe.model(x)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    pipe.optimizer.step()
    pipe.optimizer.zero_grad(set_to_none=True)


def run_round(
    pipe: Pipeline, warmup: int, steps: int, batch_size: int, precision: str, data_only: bool = False
) -> float:
    """A fresh loader iterator, `warmup` untimed steps, then images/s over `steps` timed steps (0 steps: warm
    up only). `data_only`: batches are produced (loader + transform, on the device) but not trained on."""
    it = pipe.batches()

    def step(x, y):
        if not data_only:
            train_step(pipe, x, y, precision)

    for _ in range(warmup):
        step(*next(it))
    epoch, t0 = pipe.epochs_started, benchlib.now(pipe.device)
    for _ in range(steps):
        step(*next(it))
    seconds = benchlib.now(pipe.device) - t0
    it.close()
    if pipe.epochs_started != epoch:  # a loader restart (worker start-up) would be timed as training
        raise RuntimeError(f"{pipe.name}: the timed steps ran past the end of the {len(pipe.loader)}-batch "
                           "loader; raise --images")
    return steps * batch_size / seconds


def run_epoch(pipe: Pipeline, precision: str) -> dict:
    """One pass over the pipeline's whole loader, start-up included (and the GPU's mean utilisation)."""
    with benchlib.GpuUtilisation(pipe.device) as util:
        t0 = benchlib.now(pipe.device)
        images = 0
        for batch in pipe.loader:
            x, y = pipe.prepare(batch)
            train_step(pipe, x, y, precision)
            images += len(y)
        seconds = benchlib.now(pipe.device) - t0
    return {"seconds": seconds, "images": images, "images_per_second": images / seconds,
            "gpu_utilisation_percent": util.mean, "gpu_utilisation_samples": len(util.samples)}


# --------------------------------------------------------------------------------------------- main


def load_sources(args, names, n_images):
    """The same first `n_images` training images, in each pipeline's own storage."""
    store = folder = hf_ds = None
    if any(n.startswith("ours") for n in names):
        from cifar_tl.data import load_raw

        train = load_raw(args.dataset, splits=("train", "test")).splits[
            "train"
        ]  # train.py's store (same cache)
        store = train.subset(torch.arange(min(n_images, len(train))))
    if any(n.startswith("timm") for n in names):
        folder = benchlib.image_folder(args.dataset, n_images)
    if "hf" in names:
        import datasets

        datasets.logging.set_verbosity_error()
        image, label = benchlib.columns(args.dataset)  # the example's --image_column_name / --label_column_name
        hf_ds = datasets.load_dataset(args.dataset, split="train").select(range(n_images))
        hf_ds = hf_ds.rename_columns({k: v for k, v in {image: "img", label: "label"}.items() if k != v})
    return store, folder, hf_ds


def main(argv=None) -> int:
    args = parse_args(argv)
    benchlib.threads(args.threads)
    device = torch.device(args.device)
    if args.pipelines is None:
        args.pipelines = [p for p in PIPELINES if p != "ours_eager" or device.type == "cuda"]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as timm train.py does; process-wide, so for every pipeline
    batch_sizes = {int(k): int(v) for k, v in (kv.split(":") for kv in args.batch_sizes.split(","))}
    cases = (
        [(m, s) for m in args.models for s in args.sizes if f"{m}@{s}" not in args.skip]
        if args.repeats
        else []
    )
    # the most batches one round draws (the first round warms up twice as long), plus one for a dropped
    # partial batch: no round's timed steps may restart a loader (its workers' start-up would count)
    need = [
        batch_sizes.get(s, 32) * (2 * args.warmup + (args.steps or DEFAULT_STEPS.get(s, 2)) + 1) for _, s in cases
    ]
    n_images = max([args.images, *need])
    if cases:
        store, folder, hf_ds = load_sources(args, args.pipelines, n_images)

    payload = {
        "benchmark": "train_throughput",
        "machine": benchlib.machine(args.device),
        "settings": {
            "device": args.device,
            "precision": args.precision,
            "threads": args.threads,
            "workers": args.workers,
            "warmup": args.warmup,
            "images": n_images,
            "data_only": args.data_only,
            "dataset": args.dataset,
            "optimizer": "Adam lr 1e-4",
            "loss": "cross_entropy",
        },
        "results": [],
        "epoch": None,
    }
    name = args.name or f"train_throughput_{device.type}"
    pipes = []
    for model_name, size in cases:
        # the last case's graphed model sits in a reference cycle (its forward closes over it): free its CUDA
        # graphs now, or a forked loader worker's garbage collector tries to and the worker dies of a CUDA error
        del pipes
        gc.collect()
        bs = batch_sizes.get(size, 32)
        steps = args.steps or DEFAULT_STEPS.get(size, 2)
        precision = case_precision(args.precision, device, model_name)
        pipes = build_pipelines(args, args.pipelines, model_name, size, bs, store, folder, hf_ds, device)
        rounds = {p.name: [] for p in pipes}
        try:
            for r in range(args.repeats):
                warmup = args.warmup * (2 if r == 0 else 1)  # a pipeline's first round also pays first-call costs
                for pipe in pipes[r % len(pipes) :] + pipes[: r % len(pipes)]:
                    rounds[pipe.name].append(run_round(pipe, warmup, steps, bs, precision, args.data_only))
        except RuntimeError as err:  # e.g. a reference loader's worker died: keep the rest of the matrix
            print(f"!! {model_name}@{size}: {err}", flush=True)
            payload.setdefault("errors", []).append({"model": model_name, "size": size, "error": str(err)})
            benchlib.write_result(name, payload, args.out, quiet=True)
            continue
        medians = {k: benchlib.median(v) for k, v in rounds.items()}
        row = {
            "model": model_name,
            "size": size,
            "batch_size": bs,
            "steps": steps,
            "repeats": args.repeats,
            "precision": precision,
            "images_per_second": medians,
            "rounds": rounds,
            "ratios": benchlib.ratios(medians),
        }
        row.update({f"{p.name}_graph_capture_error": p.capture_error for p in pipes if p.capture_error})
        payload["results"].append(row)
        print(
            f"{model_name:22s} {size:4d}px bs {bs:3d} | "
            + " ".join(f"{k} {v:8.1f}" for k, v in medians.items())
            + " img/s | "
            + " ".join(f"{k} {v:.2f}x" for k, v in row["ratios"].items()),
            flush=True,
        )
        benchlib.write_result(name, payload, args.out, quiet=True)  # partial results survive a timeout

    if args.epoch_images:
        pipes = []
        gc.collect()  # as above
        store, folder, hf_ds = load_sources(args, args.pipelines, args.epoch_images)
        bs = batch_sizes.get(args.epoch_size, 32)
        pipes = build_pipelines(
            args, args.pipelines, args.epoch_model, args.epoch_size, bs, store, folder, hf_ds, device
        )
        precision = case_precision(args.precision, device, args.epoch_model)
        epoch = payload["epoch"] = {
            "model": args.epoch_model,
            "size": args.epoch_size,
            "batch_size": bs,
            "precision": precision,
            "images": args.epoch_images,
            "pipelines": {},
        }
        for pipe in pipes:
            run_round(pipe, 2, 0, bs, precision)
            epoch["pipelines"][pipe.name] = run_epoch(pipe, precision)
            print(
                f"epoch {args.epoch_model} {args.epoch_size}px {args.epoch_images} images: {pipe.name} "
                f"{epoch['pipelines'][pipe.name]['seconds']:.1f} s",
                flush=True,
            )
            secs = {k: v["seconds"] for k, v in epoch["pipelines"].items()}
            epoch["ratios"] = {
                f"{k}/ours": v / secs["ours"] for k, v in secs.items() if k != "ours" and "ours" in secs
            }
            benchlib.write_result(name, payload, args.out, quiet=True)
    benchlib.write_result(name, payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
