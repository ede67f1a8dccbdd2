"""fp32 against bf16 autocast for a CPU training step, per model and size: the measurement behind
`--mixed-precision auto` on CPUs (`cifar_tl.models.cpu_bf16_pays`); with `--compile`, also both under
torch.compile (inductor), as `train.py --compile` would run them.

Each case builds the model once (channels_last, as the engine trains it), then alternates the variants' rounds
(`--repeats` each, `--steps` timed steps after one untimed step) of forward, cross-entropy, backward and a
fused SGD step on random input, and reports the median images/s of each and the ratios to fp32.

  python bench/cpu_precision.py                                   # the default cases, ~3 min on 2 cores
  python bench/cpu_precision.py --cases fast_cnn@32:512 baseline_cnn_bn@64:32 --compile --name cpu_compile
  python bench/cpu_precision.py --cases fast_cnn@32:256 --steps 2 --repeats 1   # smoke
"""
from __future__ import annotations

import argparse
import sys
import time

import benchlib
import torch
import torch.nn.functional as F

DEFAULT_CASES = ["fast_cnn@32:256", "baseline_cnn_bn_small@32:128", "baseline_cnn_bn@32:64", "baseline_cnn_bn@64:32",
                 "efficientnet_b0@32:64", "efficientnet_b0@128:32", "tf_efficientnet_lite0@128:32"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, metavar="MODEL@SIZE:BATCH")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--repeats", type=int, default=3, help="rounds per precision, alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time fp32 and bf16 under torch.compile")
    p.add_argument("--out", default=None, help="result folder (default $OUT or bench/results)")
    p.add_argument("--name", default="cpu_precision", help="result file name")
    return p.parse_args(argv)


def rate(model, opt, x, y, bf16: bool, steps: int) -> float:
    """images/s of `steps` training steps, after one untimed step (first-call costs, or compiling)."""
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(x) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    from cifar_tl.models import cpu_bf16_pays, create_model

    args = parse_args(argv)
    benchlib.threads(args.threads)
    payload = {"benchmark": "cpu_precision", "machine": benchlib.machine("cpu"),
               "native_bf16": {n: getattr(torch.cpu, n, lambda: None)()
                               for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")},
               "settings": {"steps": args.steps, "repeats": args.repeats, "threads": args.threads,
                            "optimizer": "SGD fused, momentum 0.9", "layout": "channels_last",
                            "compile": args.compile},
               "results": []}
    for case in args.cases:
        name, rest = case.split("@")
        size, batch = map(int, rest.split(":"))
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, drop_rate=0.0).to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,))
        variants = {"fp32": (model, False), "bf16": (model, True)}
        compile_seconds = {}
        if args.compile:  # compiled once per precision here, so the timed rounds hold no compiling
            # a fresh dynamo cache per case: without it, tf_efficientnet_lite0 compiled after efficientnet_b0 (the
            # same timm classes) had not finished in 25 minutes here; alone it takes 2
            torch._dynamo.reset()
            compiled = torch.compile(model)
            for key, bf16 in (("fp32_compile", False), ("bf16_compile", True)):
                t0 = time.perf_counter()
                rate(compiled, opt, x, y, bf16, 1)
                compile_seconds[key] = round(time.perf_counter() - t0, 1)
                variants[key] = (compiled, bf16)
        rounds = {key: [] for key in variants}
        order = list(variants)
        for r in range(args.repeats):  # a rotated order each round, so no variant always runs first
            for key in order[r % len(order):] + order[:r % len(order)]:
                m, bf16 = variants[key]
                rounds[key].append(rate(m, opt, x, y, bf16, args.steps))
        med = {k: benchlib.median(v) for k, v in rounds.items()}
        row = {"model": name, "size": size, "batch_size": batch, "images_per_second": med, "rounds": rounds,
               "bf16/fp32": med["bf16"] / med["fp32"], "auto_picks_bf16": cpu_bf16_pays(name)}
        if args.compile:
            row["compile_seconds"] = compile_seconds
            row.update({f"{k}/fp32": med[k] / med["fp32"] for k in compile_seconds})
        payload["results"].append(row)
        print(f"{name:22s} {size:4d}px bs {batch:3d} | " + " ".join(f"{k} {v:7.1f}" for k, v in med.items())
              + f" img/s | bf16/fp32 {row['bf16/fp32']:.2f}x | auto: "
              f"{'bf16' if row['auto_picks_bf16'] else 'fp32'}", flush=True)
        benchlib.write_result(args.name, payload, args.out, quiet=True)
    benchlib.write_result(args.name, payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
