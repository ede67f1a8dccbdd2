"""Time to accuracy on real data: run train.py with a preset, as a user would, and report accuracy against
wall-clock minutes (process start to exit: imports, data, training, evaluation, export all count).

  python bench/time_to_accuracy.py configs/cpu_fast_cnn.yaml configs/cpu_fast_transfer.yaml
  python bench/time_to_accuracy.py --output /tmp/wide.json configs/cpu_fast_cnn.yaml -- --model fast_cnn_wide
  python bench/time_to_accuracy.py --name cpu_fast_cnn_fp32 configs/cpu_fast_cnn.yaml -- --mixed-precision no

Writes bench/results/time_to_accuracy.json: per preset the total wall time, the test top-1 at the end, and the
validation top-1 after each epoch with the minutes elapsed since the process started (the curve), from which
the accuracy reached by 5, 10 and 15 minutes is read.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKS = (5, 10, 15)


def run_preset(preset: str, dataset: str, out_dir: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", preset, "--dataset", dataset,
           "--output-dir", str(out_dir), *extra]
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run: train.py refuses a folder holding one
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{preset} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    history = [json.loads(line) for line in (out_dir / "history.jsonl").read_text().splitlines() if line]
    # minutes since the process started, at the end of each epoch (history records a wall-clock timestamp)
    curve = [{"epoch": h["epoch"], "minutes": round((h["timestamp"] - t0) / 60, 2),
              **({"val_top1": round(h["val_top1"], 4)} if "val_top1" in h else {})} for h in history]  # val split
    at = {f"{m}min": max([c["val_top1"] for c in curve if c["minutes"] <= m and "val_top1" in c], default=None)
          for m in MARKS}
    return {"command": " ".join(["python", "train.py", *cmd[2:]]), "wall_minutes": round(wall / 60, 2),
            "train_minutes": round(metrics["train_seconds"] / 60, 2), "load_average_after": os.getloadavg()[0],
            "mixed_precision": metrics.get("mixed_precision"), "seed": metrics.get("seed", _seed(out_dir)),
            "test_top1": metrics["top1"], "test_top5": metrics.get("top5"), "tta_top1": metrics.get("tta", {}).get("top1"),
            "tta_level": metrics.get("tta", {}).get("level"),
            "epochs_run": metrics["epochs_run"], "train_images_per_second": metrics["train_images_per_second"],
            "val_top1_by": at, "curve": curve}


def _seed(out_dir: Path) -> int | None:
    import yaml

    path = out_dir / "config.yaml"
    return yaml.safe_load(path.read_text()).get("seed") if path.is_file() else None


def cpu_model() -> str:
    """lscpu's model name and whether the CPU has native bf16 (it decides `--mixed-precision auto`)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    return f"{name or platform.machine()} ({'with' if 'avx512_bf16' in flags or 'amx_bf16' in flags else 'no'} native bf16)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("presets", nargs="+")
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"))
    parser.add_argument("--runs-dir", default="/tmp/tta_runs")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "time_to_accuracy.json"))
    parser.add_argument("--name", default=None,
                        help="the run's key in the results (default: the preset's file name; one preset only)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # flags after -- go to train.py as they are
    args, extra = parser.parse_args(argv[:cut]), argv[cut + 1:]
    if args.name and len(args.presets) > 1:
        parser.error("--name names one run: give one preset")
    import torch

    from cifar_tl.files import atomic_write_text

    env = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M"), "load_average_before": os.getloadavg()[0]}
    results = {"benchmark": "time_to_accuracy", "machine": env, "runs": {}}
    out_path = Path(args.output)
    if out_path.is_file():  # keep earlier presets' results
        results["runs"] = json.loads(out_path.read_text()).get("runs", {})
    for preset in args.presets:
        name = args.name or Path(preset).stem
        r = run_preset(preset, args.dataset, Path(args.runs_dir) / name, extra)
        r["machine"] = env
        results["runs"][name] = r
        print(json.dumps({name: {k: r[k] for k in ("wall_minutes", "test_top1", "tta_top1", "val_top1_by")}}))
        atomic_write_text(out_path, json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
