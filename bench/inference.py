"""Inference throughput (images/s) at batch 1 and 256: PyTorch eager (NCHW), channels_last, torch.compile
and ONNX Runtime, on normalised float input at the model's size.

Backends are timed alternately within one process (rotated order, `--repeats` rounds, median). torch.compile
compiles for minutes on a CPU, so by default it runs only for the cases at 32 px there (`--compile-cases`);
its compile time (first call, per batch size) is reported. ONNX Runtime runs the torch.onnx (dynamo) export
with a dynamic batch axis, on CPUExecutionProvider with `--threads` intra-op threads (CUDAExecutionProvider
when the device is cuda and onnxruntime-gpu is installed; otherwise it is skipped on cuda).

  python bench/inference.py      # CPU defaults (15+ min: compiling each EfficientNet takes minutes)
  python bench/inference.py --cases baseline_cnn_bn@32 --backends eager onnxruntime --repeats 1   # < 30 s
  python bench/inference.py --device cuda --compile-cases efficientnet_b0@224
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import numpy as np
import torch

BACKENDS = ("eager", "channels_last", "compile", "onnxruntime")
DEFAULT_CASES = [
    "baseline_cnn_bn@32",
    "efficientnet_b0@32",
    "efficientnet_b0@224",
    "tf_efficientnet_lite0@32",
    "tf_efficientnet_lite0@224",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="MODEL@SIZE, e.g. efficientnet_b0@224")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 256])
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument(
        "--compile-cases",
        nargs="+",
        default=None,
        metavar="MODEL@SIZE",
        help="cases torch.compile runs for (default: those at 32 px on CPU, all on CUDA)",
    )
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds (median reported)")
    p.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help="each timed measurement runs batches until this long (at least one batch)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="result folder (default $OUT or bench/results)")
    p.add_argument("--name", default=None, help="result file name (default inference_<device type>)")
    return p.parse_args(argv)


def make_runner(
    backend: str, model: torch.nn.Module, size: int, batch: int, device: torch.device, threads: int
):
    """Returns (run(x) callable, input tensor, seconds spent preparing: compile or export + session)."""
    x = torch.randn(batch, 3, size, size, device=device)
    t0 = time.perf_counter()
    if backend == "eager":
        return model, x, 0.0
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    if backend == "channels_last":
        return cl_model, x_cl, 0.0
    if backend == "compile":
        compiled = torch.compile(cl_model, dynamic=False)
        with torch.inference_mode():
            compiled(x_cl)  # the first call compiles
        benchlib.sync(device)
        return compiled, x_cl, time.perf_counter() - t0
    return onnx_runner(model, x, device, threads, t0)


def onnx_runner(model, x, device, threads, t0):
    import onnxruntime as ort

    providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    if providers[0] not in ort.get_available_providers():
        return None, None, 0.0
    path = Path(tempfile.mkdtemp()) / "model.onnx"
    torch.onnx.export(
        copy.deepcopy(model).cpu(),
        (x[:2].cpu(),),
        str(path),
        dynamo=True,
        verbose=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("b")}},
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=providers)
    # Bind the input where it already lives and keep the output there, as the torch backends do: a plain
    # session.run would add a host-to-GPU and a GPU-to-host copy to every CUDA run.
    binding = session.io_binding()
    binding.bind_input("x", device.type, device.index or 0, np.float32, tuple(x.shape), x.data_ptr())
    binding.bind_output("logits", device.type, device.index or 0)

    def run(_x):  # _x: the bound tensor itself, which the caller keeps alive while ORT reads its memory
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    run(x)
    prepare_seconds = time.perf_counter() - t0
    with torch.inference_mode():  # a wrongly bound buffer would still time fine: check the logits once
        expected = model(x).float().cpu().numpy()
    if not np.allclose(binding.copy_outputs_to_cpu()[0], expected, rtol=1e-3, atol=1e-3):
        raise SystemExit("onnxruntime: logits differ from the PyTorch model's; the export or binding is wrong")
    return run, x, prepare_seconds


def measure(run, x, batch: int, device: torch.device, min_seconds: float) -> float:
    with torch.inference_mode():
        run(x)  # warm-up
        n, t0 = 0, benchlib.now(device)
        while True:
            run(x)
            n += 1
            elapsed = benchlib.now(device) - t0
            if elapsed >= min_seconds:
                return n * batch / elapsed


def main(argv=None) -> int:
    args = parse_args(argv)
    benchlib.threads(args.threads)
    device = torch.device(args.device)
    compile_cases = args.compile_cases or [c for c in args.cases if device.type != "cpu" or c.endswith("@32")]
    from cifar_tl.models import create_model

    payload = {
        "benchmark": "inference",
        "machine": benchlib.machine(args.device),
        "settings": {
            "device": args.device,
            "threads": args.threads,
            "repeats": args.repeats,
            "min_seconds": args.min_seconds,
            "compile_cases": compile_cases,
            "precision": "fp32",
            "num_classes": 100,
        },
        "results": [],
    }
    name = args.name or f"inference_{device.type}"
    for case in args.cases:
        model_name, size = case.rsplit("@", 1)
        size = int(size)
        model = create_model(model_name, pretrained=False, num_classes=100).to(device).eval()
        for batch in args.batch_sizes:
            backends = [b for b in args.backends if b != "compile" or case in compile_cases]
            runners, prep = {}, {}
            for b in backends:
                run, x, seconds = make_runner(b, model, size, batch, device, args.threads)
                if run is None:
                    print(f"  {b}: no {device.type} provider, skipped")
                    continue
                runners[b] = (run, x)
                if seconds:
                    prep[b] = seconds
            rounds = {b: [] for b in runners}
            order = list(runners)
            for r in range(args.repeats):
                for b in order[r % len(order) :] + order[: r % len(order)]:
                    rounds[b].append(measure(*runners[b], batch, device, args.min_seconds))
            medians = {b: benchlib.median(v) for b, v in rounds.items()}
            payload["results"].append(
                {
                    "model": model_name,
                    "size": size,
                    "batch_size": batch,
                    "images_per_second": medians,
                    "rounds": rounds,
                    "prepare_seconds": prep,
                }
            )
            print(
                f"{model_name:22s} {size:4d}px batch {batch:3d} | "
                + " ".join(f"{b} {v:8.1f}" for b, v in medians.items())
                + " img/s"
                + ("" if not prep else " | prepare " + " ".join(f"{b} {s:.0f}s" for b, s in prep.items())),
                flush=True,
            )
            benchlib.write_result(name, payload, args.out, quiet=True)  # partial results survive a timeout
    benchlib.write_result(name, payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
