"""Profile our training step (tensor store -> TrainTransform -> model -> loss -> backward -> Adam) with
torch.profiler: the share of each phase and the operators that dominate.

  python bench/profile_step.py                                    # efficientnet_b0 at 32 and 224 px
  python bench/profile_step.py --model baseline_cnn_bn --sizes 32 --steps 1   # quick (< 30 s)
  python bench/profile_step.py --device cuda --batch-size 256 --steps 10

For a whole-process view (Python included), py-spy works too:
  py-spy record --native -o bench/results/train_step.svg -- python bench/train_throughput.py --models
  efficientnet_b0 --sizes 32 --pipelines ours --repeats 2
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from contextlib import contextmanager

import benchlib
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

PHASES = ("data", "transform", "forward", "backward", "optimizer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--dataset", default=benchlib.default_dataset())
    p.add_argument("--model", default="efficientnet_b0")
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 224])
    p.add_argument(
        "--batch-size", type=int, default=None, help="default: 128 at <= 64 px, 64 at 128, 32 above"
    )
    p.add_argument("--steps", type=int, default=2, help="profiled steps (after one warm-up step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--top", type=int, default=15, help="operators listed per size")
    p.add_argument("--out", default=None, help="result folder (default $OUT or bench/results)")
    return p.parse_args(argv)


def profile_size(args, store, size: int) -> dict:
    from cifar_tl.augment import TrainTransform
    from cifar_tl.data import make_loader
    from cifar_tl.models import create_model, data_config

    device = torch.device(args.device)
    bs = args.batch_size or (128 if size <= 64 else 64 if size <= 128 else 32)
    model = create_model(args.model, pretrained=False, num_classes=10).to(device).train()
    model = model.to(memory_format=torch.channels_last)
    dcfg = data_config(model, size)
    tf = TrainTransform(size, dcfg["mean"], dcfg["std"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = iter(make_loader(store, bs, shuffle=True, drop_last=True))

    @contextmanager
    def phase(name):  # on a GPU each phase waits for its kernels, so its time is the GPU's work
        with record_function(name):
            yield
            benchlib.sync(device)

    def step():
        with phase("data"):
            batch = next(batches)
            images, y = batch["image"].to(device), batch["fine"].to(device)
        with phase("transform"):
            x = tf(images)
        with phase("forward"):
            loss = F.cross_entropy(model(x).float(), y)
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages()
    phase_ms = defaultdict(float)
    for e in events:
        if e.key in PHASES:
            phase_ms[e.key] += e.cpu_time_total / 1000 / args.steps
    total = sum(phase_ms.values())
    ops = sorted(
        (e for e in events if e.key not in PHASES and not e.key.startswith("ProfilerStep")),
        key=lambda e: e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total,
        reverse=True,
    )[: args.top]
    top = [
        {
            "op": e.key,
            "calls_per_step": e.count / args.steps,
            "self_ms_per_step": (e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total)
            / 1000
            / args.steps,
        }
        for e in ops
    ]
    print(
        f"\n{args.model} {size}px batch {bs}: {total:.0f} ms/step ({bs / total * 1000:.1f} img/s under the "
        "profiler)"
    )
    for k in PHASES:
        print(f"  {k:10s} {phase_ms[k]:9.1f} ms  {100 * phase_ms[k] / total:5.1f} %")
    print(f"  top operators by self {'GPU' if device.type == 'cuda' else 'CPU'} time:")
    for t in top:
        print(f"    {t['self_ms_per_step']:9.1f} ms  x{t['calls_per_step']:<5.0f} {t['op']}")
    return {
        "size": size,
        "batch_size": bs,
        "ms_per_step": total,
        "phases_ms": {k: phase_ms[k] for k in PHASES},
        "top_ops": top,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    benchlib.threads(args.threads)
    from cifar_tl.data import load_raw

    store = load_raw(args.dataset, splits=("train", "test")).splits["train"]
    results = [profile_size(args, store, s) for s in args.sizes]
    payload = {
        "benchmark": "profile_step",
        "machine": benchlib.machine(args.device),
        "settings": {
            "model": args.model,
            "steps": args.steps,
            "threads": args.threads,
            "device": args.device,
        },
        "results": results,
    }
    benchlib.write_result(f"profile_step_{torch.device(args.device).type}", payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
