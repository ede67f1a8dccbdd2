"""Scaling: how one epoch of train.py grows with the training-set size and with 1 vs 2 processes.

Runs `train.py --model MODEL --no-pretrained --epochs 1 --max-train-samples N` (`--model`, default baseline_cnn_bn)
for each fraction of `--full` images, with 1 process (`python train.py`) and with 2 CPU processes
(`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_cpu_threads_per_process T`),
and reads the epoch's `seconds` (the training loop alone, no evaluation) from history.jsonl. The thread budget
(`--threads`) is split between the processes, so both settings use the same cores.

train.py always evaluates the whole test split after training; `--test-rows` (default 500) points it at a
copy of the dataset whose train split is the original file (a symlink) and whose test split is cut to that
many rows, which saves CPU without touching the measured epoch. `--test-rows 0` uses the dataset as is.

  python bench/scaling.py --batch-size 64   # CPU: 10 / 50 / 100 % of the train split, 1 and 2 processes
  python bench/scaling.py --full 800 --fractions 0.5 1 --processes 1   # quick (about 1 min)
  python bench/scaling.py --device cuda --processes 1  # GPU: fractions of the whole train split
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--dataset", default=benchlib.default_dataset())
    p.add_argument(
        "--full",
        type=int,
        default=0,
        help="images that count as 100 %% (0: the whole train split after the validation split)",
    )
    p.add_argument("--model", default="baseline_cnn_bn")
    p.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.5, 1.0])
    p.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    p.add_argument("--threads", type=int, default=2, help="CPU threads in total, split between processes")
    p.add_argument(
        "--batch-size", type=int, default=128, help="global batch (train.py splits it across processes)"
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.02, help="train.py --val-fraction (small: less eval)"
    )
    p.add_argument(
        "--test-rows", type=int, default=500, help="cut the test split to this many rows (0: keep)"
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None, help="result folder (default $OUT or bench/results)")
    p.add_argument("--name", default=None, help="result file name (default scaling_<device>)")
    return p.parse_args(argv)


def trimmed_dataset(dataset: str, test_rows: int) -> str:
    """A Hub-style folder: the original train parquet (symlinked) + the first `test_rows` test rows."""
    import pyarrow.parquet as pq

    src = Path(dataset).resolve()
    root = benchlib.BENCH_CACHE / f"{src.name}-test{test_rows}"
    if (root / "COMPLETE").is_file():
        return str(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for file in benchlib.train_parquet(dataset):
        link = root / "data" / file.name
        if not link.exists():
            link.symlink_to(file.resolve())
    test = sorted(src.rglob("test-*.parquet"))
    if not test:
        raise SystemExit(f"--dataset {dataset}: no test-*.parquet file")
    pq.write_table(
        pq.read_table(test[0]).slice(0, test_rows), root / "data" / test[0].name
    )  # keeps HF metadata
    (root / "COMPLETE").write_text(str(test_rows))
    return str(root)


def run_train(args, dataset: str, samples: int, processes: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="scaling-"))
    flags = [
        "--dataset",
        dataset,
        "--model",
        args.model,
        "--no-pretrained",
        "--epochs",
        "1",
        "--batch-size",
        str(args.batch_size),
        "--val-fraction",
        str(args.val_fraction),
        "--max-train-samples",
        str(samples),
        "--output-dir",
        str(out),
        "--report-to",
        "none",
    ]
    env = dict(os.environ)
    if processes == 1:
        env["OMP_NUM_THREADS"] = str(args.threads)
        cmd = [sys.executable, "train.py", *flags]
    else:
        env.pop("OMP_NUM_THREADS", None)
        if args.device == "cpu":
            env["ACCELERATE_USE_CPU"] = "true"
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--num_cpu_threads_per_process",
            str(max(1, args.threads // processes)),
            "train.py",
            *flags,
        ]
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=benchlib.REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"train.py failed ({proc.returncode}): {' '.join(cmd)}")
    record = json.loads((out / "history.jsonl").read_text().splitlines()[0])
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "processes": processes,
        "max_train_samples": samples,
        "epoch_seconds": record["seconds"],
        "images_per_second": record["images_per_second"],
        "train_images": round(record["images_per_second"] * record["seconds"]),
        "wall_seconds": wall,
        "num_processes_reported": metrics["num_processes"],
        "mixed_precision": metrics.get("mixed_precision"),
        "command": " ".join(cmd),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    dataset = trimmed_dataset(args.dataset, args.test_rows) if args.test_rows else args.dataset
    full = args.full or full_train_size(dataset, args.val_fraction)
    machine = benchlib.machine(args.device)  # before the runs: its load average is the machine's, not ours
    results = []
    for processes in args.processes:
        for fraction in args.fractions:
            row = run_train(args, dataset, round(full * fraction), processes)
            row["fraction"] = fraction
            results.append(row)
            print(
                f"{processes} process(es) {fraction:5.0%} ({row['train_images']} images): epoch "
                f"{row['epoch_seconds']:7.1f} s, {row['images_per_second']:7.1f} img/s "
                f"(run {row['wall_seconds']:.0f} s wall with start-up and evaluation)",
                flush=True,
            )
    payload = {
        "benchmark": "scaling",
        "machine": machine,
        "settings": {
            "dataset": args.dataset,
            "model": args.model,
            "full": full,
            "threads": args.threads,
            "batch_size": args.batch_size,
            "val_fraction": args.val_fraction,
            "test_rows": args.test_rows,
            "device": args.device,
        },
        "results": results,
    }
    benchlib.write_result(args.name or f"scaling_{args.device}", payload, args.out)
    return 0


def full_train_size(dataset: str, val_fraction: float) -> int:
    import pyarrow.parquet as pq

    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in benchlib.train_parquet(dataset))
    return rows - round(rows * val_fraction)


if __name__ == "__main__":
    sys.exit(main())
