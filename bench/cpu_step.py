"""Forward + backward images/s on a CPU for two choices the CPU presets make, on random inputs, alternating the
variants over `--rounds` rounds (the median is reported):

  batch     `fast_cnn` at 32 px, channels_last, one step over B images for each B in `--batch-sizes`:
            cpu_fast_cnn's 2000-image step runs as micro-batches of 250 (`--grad-accum-steps 8`), whose feature
            maps fit a CPU's caches.
  depthwise the probe's trainable top (Lite0's last 2 stages + head on 112x8x8 maps, batch 128, NCHW) with
            its depthwise convs as convolutions and as per-channel matrix products (`cifar_tl.depthwise`).

  python bench/cpu_step.py                                # ~3 min on 2 cores
  python bench/cpu_step.py --images 256 --rounds 1 --batch-sizes 128 64   # smoke
"""
from __future__ import annotations

import argparse
import time
import types

import benchlib
import torch
import torch.nn.functional as F

from cifar_tl import depthwise
from cifar_tl.models import create_model
from cifar_tl.probe import trainable_top


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[2000, 1000, 500, 250, 125])
    p.add_argument("--images", type=int, default=4000, help="images timed per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="result folder (default $OUT or bench/results)")
    return p.parse_args(argv)


def images_per_second(model: torch.nn.Module, x: torch.Tensor, images: int) -> float:
    y = torch.randint(0, 10, (len(x),))

    def step():
        F.cross_entropy(model(x), y).backward()

    step()  # first-call costs (oneDNN primitives) stay out of the timing
    start, seen = time.perf_counter(), 0
    while seen < images:
        step()
        seen += len(x)
    return seen / (time.perf_counter() - start)


def main(argv=None) -> dict:
    args = parse_args(argv)
    benchlib.threads(args.threads)
    torch.manual_seed(0)
    cnn = create_model("fast_cnn", pretrained=False, num_classes=10).to(memory_format=torch.channels_last).train()
    lite0 = create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
    top = trainable_top(types.SimpleNamespace(probe_stages=2, drop_rate=0.2), lite0).train()
    maps = torch.randn(128, 112, 8, 8)
    batch = {b: [] for b in args.batch_sizes}
    dw = {"convolution": [], "matmul": []}
    for _ in range(args.rounds):
        for b in args.batch_sizes:
            x = torch.randn(b, 3, 32, 32).contiguous(memory_format=torch.channels_last)
            batch[b].append(images_per_second(cnn, x, args.images))
        dw["convolution"].append(images_per_second(top, maps, args.images // 4))
        with depthwise.as_matmul(top, maps[:2]):
            dw["matmul"].append(images_per_second(top, maps, args.images // 4))
    result = {
        "machine": benchlib.machine(),
        "fast_cnn_32px_by_batch": {str(b): benchlib.median(v) for b, v in batch.items()},
        "probe_top_lite0_2_stages": {k: benchlib.median(v) for k, v in dw.items()},
        "rounds": {"batch": {str(b): v for b, v in batch.items()}, "depthwise": dw},
    }
    for b, v in result["fast_cnn_32px_by_batch"].items():
        print(f"fast_cnn 32 px, batch {b:>5}: {v:7.0f} img/s")
    for k, v in result["probe_top_lite0_2_stages"].items():
        print(f"probe top, depthwise as {k:<11}: {v:7.0f} img/s")
    benchlib.write_result("cpu_step", result, args.out)
    return result


if __name__ == "__main__":
    main()
