"""Forward + backward images/s on a CPU for two choices the CPU presets make, on random inputs, alternating the
variants over `--rounds` rounds (the median is reported):

  batch     `fast_cnn` at 32 px, channels_last, one step over B images for each B in `--batch-sizes`:
            cpu_fast_cnn's 2000-image step runs as micro-batches of 250 (`--grad-accum-steps 8`), whose feature
            maps fit a CPU's caches.
  depthwise the probe's trainable top (Lite0's last 2 stages + head on 112x8x8 maps, batch 128, NCHW) with
            its depthwise convs as convolutions and as per-channel matrix products (`cifar_tl.depthwise`).
  floor     how close each variant runs to this CPU's floor: its convolution and matmul FLOPs per image
            (forward + backward) times images/s, against the best GFLOP/s of a large
            fp32 matrix product (what the cores can do); `fast_cnn` also at 24 and 16 px (progressive resizing).

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
from torch.utils.flop_counter import FlopCounterMode

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


def gflop_per_image(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Convolution and matmul FLOPs of a training step per image: 3x the forward pass's (the backward pass
    computes the input and the weight gradients, each as costly as the forward). The forward is counted and
    scaled because torch's counter ignores `groups` in convolution_backward: 45x too high for depthwise convs."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return 3 * counter.get_total_flops() / len(x) / 1e9


def matmul_gflops(n: int = 1536, repeats: int = 20) -> float:
    """The cores' fp32 ceiling as PyTorch reaches it: the best of `repeats` n x n matrix products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


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
    sizes = {24: [], 16: []}
    b_small = min(args.batch_sizes, key=lambda b: abs(b - 250))  # the preset's micro-batch
    peak = []
    for _ in range(args.rounds):
        for b in args.batch_sizes:
            x = torch.randn(b, 3, 32, 32).contiguous(memory_format=torch.channels_last)
            batch[b].append(images_per_second(cnn, x, args.images))
        for px, rates in sizes.items():
            x = torch.randn(b_small, 3, px, px).contiguous(memory_format=torch.channels_last)
            rates.append(images_per_second(cnn, x, args.images))
        dw["convolution"].append(images_per_second(top, maps, args.images // 4))
        with depthwise.as_matmul(top, maps[:2]):
            dw["matmul"].append(images_per_second(top, maps, args.images // 4))
        peak.append(matmul_gflops())
    cnn_gflop = {px: gflop_per_image(cnn, torch.randn(2, 3, px, px).contiguous(memory_format=torch.channels_last))
                 for px in (32, 24, 16)}
    top_gflop = gflop_per_image(top, maps[:2])
    ceiling = max(peak)

    def floor(img_s: float, gflop: float) -> dict:
        return {"img_s": img_s, "gflop_per_image": gflop, "gflops": img_s * gflop,
                "share_of_matmul_peak": img_s * gflop / ceiling}

    fast_cnn = {str(b): floor(benchlib.median(v), cnn_gflop[32]) for b, v in batch.items()}
    fast_cnn.update({f"{px}px_batch_{b_small}": floor(benchlib.median(v), cnn_gflop[px]) for px, v in sizes.items()})
    probe_top = {k: floor(benchlib.median(v), top_gflop) for k, v in dw.items()}
    result = {
        "machine": benchlib.machine(),
        "fast_cnn_32px_by_batch": {str(b): fast_cnn[str(b)]["img_s"] for b in batch},
        "probe_top_lite0_2_stages": {k: r["img_s"] for k, r in probe_top.items()},
        "floor": {"matmul_peak_gflops": ceiling, "fast_cnn": fast_cnn, "probe_top": probe_top},
        "rounds": {"batch": {str(b): v for b, v in batch.items()}, "depthwise": dw,
                   "sizes": {str(px): v for px, v in sizes.items()}, "matmul_gflops": peak},
    }
    print(f"fp32 matrix product ({torch.get_num_threads()} threads): {ceiling:.0f} GFLOP/s")
    for name, rows in (("fast_cnn", fast_cnn), ("probe top", probe_top)):
        for k, r in rows.items():
            print(f"{name} {k:>16}: {r['img_s']:7.0f} img/s x {r['gflop_per_image']:.3f} GFLOP"
                  f" = {r['gflops']:5.0f} GFLOP/s ({r['share_of_matmul_peak']:.0%} of the matmul peak)")
    benchlib.write_result("cpu_step", result, args.out)
    return result


if __name__ == "__main__":
    main()
