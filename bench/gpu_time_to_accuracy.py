"""GPU time to accuracy, side by side in one device call: our presets through train.py against airbench94.py
(unchanged) and timm's train.py, on the same GPU, the same CIFAR-10 images and the same Lite0 weights.

  bash bench/gpu_time_to_accuracy.sh                # on a lent GPU (see its header: the exact `run` arguments)
  SMOKE=1 bash bench/gpu_time_to_accuracy.sh        # rehearsal on a CPU: a few hundred images, 1-2 epochs

Parts (--parts; each has a time limit, a slow or failing part is recorded and the others go on):
  tests       CUDA only: the CUDA-graph tests the transfer preset leans on (a graphed step equals the eager one,
              one graph per training size), tests/test_speed_paths.py
  prepare     untimed: airbench's cached tensors and timm's image folder written from the parquet, our decoded
              store warmed (so no timed run pays the one-off decode)
  fast_cnn    configs/gpu_fast_cnn.yaml through train.py, one process per seed (5); per seed metrics.json's
              airbench-style `timed_seconds` (training + the 6-view TTA test pass; excluded: process start,
              imports, data loading, model building and whitening fit, CUDA-graph capture with cuDNN's tuning,
              checkpoints, the plain test pass, report and export) and the whole process's wall time
  airbench94  airbench94.py unchanged in a folder holding its cifar10/train.pt, test.pt; as many of its 25 runs as
              fit the part's limit (its first run pays its warm-up: reported apart); its own timer (whitening +
              training + TTA pass)
  transfer    configs/gpu_transfer.yaml (Lite0) through train.py: wall time from process start to metrics.json
              (its first write after the test evaluation) and to exit
  timm        timm's train.py fine-tuning the same Lite0 weights on the same JPEGs; its per-epoch test accuracy
              (summary.csv, polled as it grows) gives its time to each accuracy; killed at the part's limit
  cnn96       configs/gpu_cnn_96.yaml, one seed (the stretch), when at least MIN_OPTIONAL seconds of the budget
              are left
  b0          (not by default) the transfer preset with efficientnet_b0, where its ImageNet weights are
              reachable (Hub cache or build/gpu/weights/efficientnet_b0*.safetensors); else recorded as skipped
Writes OUT/gpu_time_to_accuracy.json (every part, the ratios, the targets) after each part, and
OUT/gpu_time_to_accuracy.log (each command and the tail of its output). OUT: $OUT, else bench/results.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
import prepare_gpu_run

ROOT = benchlib.REPO
BUILD = ROOT / "build" / "gpu"
PARTS = ("tests", "prepare", "fast_cnn", "airbench94", "transfer", "timm", "cnn96")
OPTIONAL = ("cnn96", "b0")  # run only while at least MIN_OPTIONAL seconds of the budget are left
MIN_OPTIONAL = 60
# seconds per part; the whole call keeps --budget (560 s: one 10-minute device call with the wheel install)
LIMITS = {"tests": 45, "prepare": 60, "fast_cnn": 130, "airbench94": 45, "transfer": 150, "timm": 200, "b0": 150, "cnn96": 90}
SEEDS = (0, 1, 2, 3, 4)
TARGETS = {"fast_cnn": {"tta_top1": 0.94, "timed_seconds": 3.0}, "transfer": {"top1": 0.975, "wall_seconds": 180}}
MARKS = (0.95, 0.96, 0.97, 0.975, 0.98)
SMOKE = {  # tiny sizes for a CPU rehearsal: the same commands, a few hundred images
    "images": (400, 200), "seeds": (0, 1),
    "fast_cnn": ["--epochs", "1", "--batch-size", "100", "--eval-batch-size", "200", "--max-train-samples", "200"],
    "transfer": ["--epochs", "2", "--image-size", "48", "--progressive-resize", "32", "--batch-size", "50",
                 "--eval-batch-size", "100", "--time-limit-minutes", "none", "--max-train-samples", "200"],
    "cnn96": ["--epochs", "1", "--batch-size", "100", "--eval-batch-size", "200", "--max-train-samples", "200"],
}


@dataclass
class Context:
    args: argparse.Namespace
    out: Path
    work: Path
    dataset: str
    smoke: bool
    cuda: bool
    end: float = float("inf")  # the budget's end
    log: list[str] = field(default_factory=list)

    def deadline(self, part: str) -> float:
        return min(self.end, time.time() + (self.args.part_limit or LIMITS[part] * (4 if self.smoke else 1)))

    def python(self) -> str:
        return sys.executable


# --------------------------------------------------------------------------------------------- running commands


def run_logged(ctx: Context, name: str, cmd: list[str], deadline: float, cwd: Path = ROOT, poll=None) -> dict:
    """Run `cmd` to its end or to `deadline` (then its whole process group is killed), calling `poll()` every
    0.2 s; returns the exit code, wall seconds, start time and the timestamped output lines."""
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.time(), line.rstrip()) for line in proc.stdout),
                              daemon=True)
    reader.start()
    timed_out = False
    while proc.poll() is None:
        if poll is not None:
            poll()
        if time.time() > deadline:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    reader.join(timeout=5)
    if poll is not None:
        poll()
    wall = time.time() - started
    ctx.log += [f"== {name} (rc {proc.returncode}, {wall:.1f} s{', killed at its limit' if timed_out else ''}): "
                + " ".join(cmd), *[line for _, line in lines[-60:]]]
    return {"command": " ".join(cmd), "returncode": proc.returncode, "wall_seconds": round(wall, 2),
            "timed_out": timed_out, "started": started, "lines": lines}


def train_py(ctx: Context, name: str, config: str, out_dir: Path, deadline: float, extra: list[str]) -> dict:
    """One train.py process with a preset; its metrics, its curve and its wall times."""
    cmd = [ctx.python(), "train.py", "--config", config, "--dataset", ctx.dataset, "--output-dir", str(out_dir),
           *extra]
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run, never a leftover's metrics
    run = run_logged(ctx, name, cmd, deadline)
    row = {k: run[k] for k in ("command", "returncode", "wall_seconds", "timed_out")}
    metrics_file = out_dir / "metrics.json"
    if run["returncode"] != 0 or not metrics_file.is_file():
        return {**row, "error": "\n".join(line for _, line in run["lines"][-15:])}
    metrics = json.loads(metrics_file.read_text())
    history = [json.loads(line) for line in (out_dir / "history.jsonl").read_text().splitlines() if line]
    keep = ("top1", "top5", "train_seconds", "test_seconds", "tta_test_seconds", "timed_seconds", "epochs_run",
            "train_images_per_second", "mixed_precision", "image_size", "stopped")
    return {**row, **{k: metrics.get(k) for k in keep}, "tta_top1": metrics.get("tta", {}).get("top1"),
            "seconds_to_metrics": round(metrics_file.stat().st_mtime - run["started"], 2),
            "curve": [{"epoch": h["epoch"], "seconds": round(h["timestamp"] - run["started"], 2),
                       "train_seconds": round(h["seconds"], 3), "train_top1": h["train_top1"],
                       **({"val_top1": h["val_top1"]} if "val_top1" in h else {})} for h in history]}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


# --------------------------------------------------------------------------------------------- the parts


def reference_data(ctx: Context) -> dict:
    """airbench's tensors and timm's image folder under WORK/data (written once per call, untimed)."""
    if (ctx.work / "data" / "COMPLETE").is_file():
        return {}
    limit = SMOKE["images"][0] if ctx.smoke else None
    row = prepare_gpu_run.expand(Path(ctx.dataset), ctx.work / "data", limit, 1 if ctx.smoke else None)
    (ctx.work / "data" / "COMPLETE").write_text(ctx.dataset)
    return row


def part_prepare(ctx: Context) -> dict:
    """Untimed: the reference pipelines' data, and our decoded store (the first seed would pay it otherwise)."""
    row = reference_data(ctx) if {"airbench94", "timm"} & set(ctx.args.parts) else {}
    started = time.time()
    from cifar_tl.data import load_raw

    load_raw(ctx.dataset)
    row["store_seconds"] = round(time.time() - started, 1)
    return row


def part_fast_cnn(ctx: Context, config: str = "configs/gpu_fast_cnn.yaml", part: str = "fast_cnn",
                  seeds: tuple[int, ...] = SEEDS) -> dict:
    deadline = ctx.deadline(part)
    runs = {}
    for seed in (SMOKE["seeds"] if ctx.smoke else seeds)[:ctx.args.seeds]:
        extra = ["--seed", str(seed), *(SMOKE[part] if ctx.smoke else [])]
        runs[seed] = train_py(ctx, f"{part} seed {seed}", config, ctx.work / part / f"seed{seed}", deadline, extra)
        if "error" in runs[seed]:
            break
    done = [r for r in runs.values() if "error" not in r]
    row = {"config": config, "runs": runs}
    if done:
        row["tta_top1"] = spread([r["tta_top1"] for r in done])
        row["top1"] = spread([r["top1"] for r in done])
        for key in ("timed_seconds", "train_seconds", "tta_test_seconds", "wall_seconds"):
            row[key] = spread([r[key] for r in done])
    return row


def part_airbench94(ctx: Context) -> dict:
    script = BUILD / "reference" / "airbench94.py"
    if not script.is_file():
        return {"skipped": f"{script} absent: python bench/prepare_gpu_run.py writes it"}
    if not ctx.cuda:
        return {"skipped": "airbench94.py needs CUDA"}
    reference_data(ctx)
    run = run_logged(ctx, "airbench94", [ctx.python(), str(script)], ctx.deadline("airbench94"),
                     cwd=ctx.work / "data" / "airbench")
    finals = airbench_runs([line for _, line in run["lines"]])
    row = {"command": run["command"], "wall_seconds": run["wall_seconds"], "runs": finals,
           "note": "run 0 pays airbench94's warm-up (its warm-up run is commented out); the spread excludes it"}
    later = finals[1:] or finals
    if later:
        row["tta_val_acc"] = spread([f["tta_val_acc"] for f in later])
        row["seconds"] = spread([f["seconds"] for f in later])
    return row


def airbench_runs(lines: list[str]) -> list[dict]:
    """The finished runs in airbench94.py's printed table (| run | epoch | train_loss | train_acc | val_acc |
    tta_val_acc | total_time_seconds |): each run's `eval` row."""
    finals = []
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1] == "eval":
            finals.append({"tta_val_acc": float(cells[5]), "seconds": float(cells[6])})
    return finals


def lite0_weights() -> list[str]:
    file = BUILD / "weights" / prepare_gpu_run.LITE0_FILE
    return ["--weights", str(file)] if file.is_file() else []


def part_transfer(ctx: Context, part: str = "transfer") -> dict:
    extra = [*(SMOKE["transfer"] if ctx.smoke else [])]
    if part == "b0":
        weights = b0_weights()
        if weights is None:
            return {"skipped": "efficientnet_b0's ImageNet weights are not reachable here (no Hub, no cache, no "
                               "build/gpu/weights/efficientnet_b0*.safetensors)"}
        extra += ["--model", "efficientnet_b0", *weights]
    else:
        extra += lite0_weights()
    row = train_py(ctx, part, "configs/gpu_transfer.yaml", ctx.work / part, ctx.deadline(part), extra)
    if "error" not in row:
        top1 = row["tta_top1"] or row["top1"]
        row["seconds_to"] = {f"{m:g}": row["seconds_to_metrics"] if top1 >= m else None for m in MARKS}
    return row


def b0_weights() -> list[str] | None:
    files = sorted((BUILD / "weights").glob("efficientnet_b0*.safetensors"))
    if files:
        return ["--weights", str(files[0])]
    try:
        import timm

        timm.create_model("efficientnet_b0", pretrained=True)  # the Hub cache (HF_HUB_OFFLINE=1)
        return []
    except Exception:
        return None


def timm_command(ctx: Context, out_dir: Path) -> list[str]:
    """timm's train.py on the same images and weights. timm publishes no fine-tune recipe: its docs say to fine-
    tune with `--pretrained` and `--num-classes` (hfdocs/source/models/efficientnet.mdx, "How do I finetune this
    model?"), and name `--amp`, `--channels-last`, `-j` and `--pin-mem` for speed (hfdocs/source/
    training_script.mdx, train.py's help). Everything else is our preset's recipe in timm's own flags (its own
    progressive resizing, `--train-img-sizes ... --train-size-schedule progressive`; layer decay; EMA with
    warm-up; our zero-initialised head as `--head-init-scale 0`), with the crop and colour settings that fit
    whole, upscaled CIFAR images: the ratio then compares the pipelines, not two recipes."""
    sizes, epochs, batch = (["32", "48"], "2", "50") if ctx.smoke else (["128", "160", "192", "224"], "14", "256")
    weights = BUILD / "weights" / prepare_gpu_run.LITE0_FILE
    cmd = [ctx.python(), str(BUILD / "reference" / "timm_train.py"), "--data-dir",
           str(ctx.work / "data" / "imagefolder"), "--train-split", "train", "--val-split", "test",
           "--model", "tf_efficientnet_lite0", "--pretrained", "--pretrained-path", str(weights), "--num-classes", "10",
           "--img-size", sizes[-1], "--train-img-sizes", *sizes, "--train-size-schedule", "progressive",
           "-b", batch, "-vb", "500", "--epochs", epochs, "--opt", "sgd", "--momentum", "0.9", "--lr", "0.05",
           "--weight-decay", "5e-5", "--layer-decay", "0.8", "--sched", "cosine", "--warmup-epochs", "1",
           "--smoothing", "0.1", "--mixup", "0.1", "--drop", "0.2", "--model-ema", "--model-ema-decay", "0.998",
           "--model-ema-warmup", "--head-init-scale", "0", "--crop-pct", "1.0", "--scale", "0.64", "1.0",
           "--ratio", "0.9", "1.1", "--color-jitter", "0", "--train-interpolation", "bilinear", "--interpolation", "bilinear",
           "--sched-on-updates", "--channels-last", "--output", str(out_dir), "--experiment", "timm",
           "--checkpoint-hist", "1",
           "--log-interval", "50", "--seed", "42"]
    if ctx.smoke:
        return [*cmd, "--device", "cuda" if ctx.cuda else "cpu", "-j", "0"]
    return [*cmd, "--amp", "--amp-dtype", "bfloat16", "--pin-mem", "-j", str(max(1, (os.cpu_count() or 4) - 2))]


def part_timm(ctx: Context) -> dict:
    if not (BUILD / "reference" / "timm_train.py").is_file():
        return {"skipped": "build/gpu/reference/timm_train.py absent: python bench/prepare_gpu_run.py writes it"}
    reference_data(ctx)
    out_dir = ctx.work / "timm"
    shutil.rmtree(out_dir, ignore_errors=True)  # timm would write to timm-1/ beside an old timm/
    summary = out_dir / "timm" / "summary.csv"
    seen: dict[int, float] = {}  # epoch -> when its summary.csv row appeared (seconds since the start)
    started = time.time()

    def poll() -> None:
        if summary.is_file():
            for row in csv.DictReader(summary.read_text().splitlines()):
                seen.setdefault(int(row["epoch"]), round(time.time() - started, 2))

    run = run_logged(ctx, "timm", timm_command(ctx, out_dir), ctx.deadline("timm"), poll=poll)
    rows = list(csv.DictReader(summary.read_text().splitlines())) if summary.is_file() else []
    curve = [{"epoch": int(r["epoch"]) + 1, "seconds": seen.get(int(r["epoch"])),
              "eval_top1": float(r["eval_top1"]) / 100, "train_loss": float(r["train_loss"])} for r in rows]
    row = {k: run[k] for k in ("command", "returncode", "wall_seconds", "timed_out")}
    row["curve"] = curve
    row["seconds_to"] = {f"{m:g}": next((c["seconds"] for c in curve if c["eval_top1"] >= m), None) for m in MARKS}
    if run["returncode"] != 0 and not run["timed_out"]:
        row["error"] = "\n".join(line for _, line in run["lines"][-15:])
    return row


def part_tests(ctx: Context) -> dict:
    if not ctx.cuda:
        return {"skipped": "CUDA tests"}
    # -o addopts=: one process (the device's pytest has no pytest-xdist, which the project's addopts use)
    cmd = [ctx.python(), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "tests/test_speed_paths.py", "-k", "graphed_step or one_graph_per_training_size"]
    run = run_logged(ctx, "tests", cmd, ctx.deadline("tests"))
    return {k: run[k] for k in ("command", "returncode", "wall_seconds", "timed_out")} | {
        "result": run["lines"][-1][1] if run["lines"] else None,
        **({"error": "\n".join(line for _, line in run["lines"][-20:])} if run["returncode"] else {})}


def part_cnn96(ctx: Context) -> dict:
    return part_fast_cnn(ctx, "configs/gpu_cnn_96.yaml", "cnn96", seeds=(0,))


# --------------------------------------------------------------------------------------------- summary


def ratio(ours: float | None, theirs: float | None) -> float | None:
    return round(ours / theirs, 3) if ours and theirs else None


def summarize(results: dict) -> dict:
    """The ratios the issue asks for, measured in this one call, and whether each target is met."""
    out: dict = {}
    cnn, air = results.get("fast_cnn", {}), results.get("airbench94", {})
    if "tta_top1" in cnn:
        t = TARGETS["fast_cnn"]
        out["fast_cnn"] = {"tta_top1_mean": cnn["tta_top1"]["mean"], "tta_top1_spread": cnn["tta_top1"],
                           "timed_seconds_mean": cnn["timed_seconds"]["mean"], "wall_seconds_mean":
                           cnn["wall_seconds"]["mean"], "target": t,
                           "met": cnn["tta_top1"]["mean"] >= t["tta_top1"]
                           and cnn["timed_seconds"]["mean"] <= t["timed_seconds"]}
    if "seconds" in air:
        out["airbench94"] = {"tta_val_acc_mean": air["tta_val_acc"]["mean"], "seconds_mean": air["seconds"]["mean"]}
        if "fast_cnn" in out:  # both at their own recipes' end; the 94 % is each one's mean accuracy
            out["fast_cnn_over_airbench94_seconds"] = ratio(out["fast_cnn"]["timed_seconds_mean"],
                                                            air["seconds"]["mean"])
    ours, timm = results.get("transfer", {}), results.get("timm", {})
    if "seconds_to" in ours:
        t = TARGETS["transfer"]
        top1 = ours["tta_top1"] or ours["top1"]
        out["transfer"] = {"top1": top1, "seconds_to_metrics": ours["seconds_to_metrics"],
                           "wall_seconds": ours["wall_seconds"], "target": t,
                           "met": top1 >= t["top1"] and ours["wall_seconds"] <= t["wall_seconds"]}
    if "seconds_to" in ours and "seconds_to" in timm:
        out["transfer_over_timm_seconds_to"] = {
            m: ratio(ours["seconds_to"][m], timm["seconds_to"][m]) if timm["seconds_to"][m] else
            (f"<= {ratio(ours['seconds_to'][m], timm['wall_seconds'])} (timm did not reach it in "
             f"{timm['wall_seconds']:.0f} s)" if ours["seconds_to"][m] else None) for m in ours["seconds_to"]}
    return out


# --------------------------------------------------------------------------------------------- main

PART_FUNCTIONS = {"tests": part_tests, "prepare": part_prepare, "fast_cnn": part_fast_cnn, "airbench94": part_airbench94,
                  "transfer": part_transfer, "timm": part_timm, "b0": lambda ctx: part_transfer(ctx, "b0"),
                  "cnn96": part_cnn96}


def gpu_description() -> tuple[bool, str | None]:
    """Whether a CUDA GPU is visible, and nvidia-smi's line for it (CUDA itself is not initialised here: the
    prepare part forks workers)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return False, None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False, None
    return smi.returncode == 0 and bool(smi.stdout.strip()), smi.stdout.strip() or None


def print_summary(payload: dict) -> None:
    for part, row in payload["parts"].items():
        keys = [k for k in ("skipped", "error", "tta_top1", "top1", "timed_seconds", "tta_val_acc", "seconds",
                            "seconds_to", "wall_seconds", "part_seconds") if k in row]
        short = {k: (row[k]["mean"] if isinstance(row[k], dict) and "mean" in row[k] else row[k]) for k in keys}
        print(f"{part:>11}: " + json.dumps(short)[:400])
    print("summary: " + json.dumps(payload["summary"], indent=1))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PART_FUNCTIONS))
    parser.add_argument("--dataset", default=None, help="Hub-style parquet CIFAR-10 (default: build/gpu/"
                        "cifar10-jpeg, else ../shared/datasets/cifar10-jpeg)")
    parser.add_argument("--work", default="/tmp/gtta", help="scratch folder (runs, expanded data)")
    parser.add_argument("--out", default=None, help="result folder (default: $OUT, else bench/results; with "
                        "--smoke WORK/out)")
    parser.add_argument("--smoke", action="store_true", default=os.environ.get("SMOKE") == "1",
                        help="rehearsal: a few hundred images, 1-2 epochs (default: $SMOKE == 1)")
    parser.add_argument("--part-limit", type=float, default=None, help="seconds for every part (default: each "
                        "part's own limit, x4 with --smoke)")
    parser.add_argument("--seeds", type=int, default=None, help="at most this many seeds per part (default: "
                        "fast_cnn's 5, 2 with --smoke)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole script: no part runs "
                        f"past it, and {', '.join(OPTIONAL)} only with {MIN_OPTIONAL} s left (default: 560 on a GPU, "
                        "none with --smoke)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    benchlib.offline()
    work = Path(args.work)
    dataset = args.dataset or str(BUILD / "cifar10-jpeg" if (BUILD / "cifar10-jpeg").is_dir() else
                                  benchlib.DEFAULT_DATASET)
    if args.smoke:  # the same commands on a slice of the data
        dataset = str(prepare_gpu_run.subset_parquet(Path(dataset), work / "smoke-data", *SMOKE["images"]))
    out = Path(args.out or os.environ.get("OUT") or (work / "out" if args.smoke else benchlib.RESULTS))
    cuda, gpu = gpu_description()
    budget = args.budget or (None if args.smoke else 560)
    ctx = Context(args, out, work, dataset, args.smoke, cuda, end=time.time() + budget if budget else float("inf"))
    payload = {"benchmark": "gpu_time_to_accuracy", "machine": {**benchlib.machine("cpu"), "gpu": gpu},
               "smoke": args.smoke, "dataset": dataset, "limits": LIMITS, "targets": TARGETS, "parts": {},
               "summary": {}}
    for part in args.parts:
        started = time.time()
        try:
            left = ctx.end - started
            row = ({"skipped": f"{left:.0f} s of the budget left"} if left < (MIN_OPTIONAL if part in OPTIONAL else 1)
                   else PART_FUNCTIONS[part](ctx))
        except Exception as err:  # a broken part is a result too; the others still run
            row = {"error": f"{type(err).__name__}: {err}"}
        row["part_seconds"] = round(time.time() - started, 1)
        payload["parts"][part] = row
        payload["summary"] = summarize(payload["parts"])
        benchlib.write_result("gpu_time_to_accuracy", payload, str(out), quiet=True)
        (out / "gpu_time_to_accuracy.log").write_text("\n".join(ctx.log) + "\n")
        print(f"== {part}: {row['part_seconds']} s", flush=True)
    print_summary(payload)
    return int(any("error" in row for row in payload["parts"].values()))


if __name__ == "__main__":
    sys.exit(main())
