"""airbench94_muon's own file and our GPU CNN preset, the same computation on a CPU, on the same CIFAR-10:
what `configs/gpu_fast_cnn.yaml` can reach on these images before a GPU is lent to time it.

  python bench/airbench_on_cpu.py                  # both, one after the other (~52 + ~71 min on 2 AVX2 cores)
  python bench/airbench_on_cpu.py --parts airbench # airbench94_muon.py only

`airbench`: KellerJordan/cifar10-airbench's airbench94_muon.py at the pinned commit (from the git mirror that the
`fetch` tool makes, checked by sha256), with the few edits a CPU needs and nothing else (EDITS: the device, fp32
instead of fp16, no torch.compile, a wall-clock timer instead of CUDA events, one seeded run instead of a
warm-up and 200 runs), run in a folder holding its cifar10/{train,test}.pt written from our parquet.
`ours`: `python train.py --config configs/gpu_fast_cnn.yaml --mixed-precision no` on the same parquet, run and
read as bench/time_to_accuracy.py runs presets. The JSON (bench/results/airbench_on_cpu.json) keeps airbench's test
accuracy per epoch and our training accuracy per epoch (the preset, as airbench, keeps no validation split).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
import prepare_gpu_run
import time_to_accuracy

REPO, COMMIT, PATH = "KellerJordan/cifar10-airbench", "f1c599c4af24aca803e3e65a6a7e52a502e09d0e", "airbench94_muon.py"
SHA256 = "704e29251a5207d8aed8a35adf13f772ff386b90a712aaddc2a28854385b536e"
# (what airbench94_muon.py says, what a CPU run needs instead): each must occur exactly once
EDITS = [
    ("@torch.compile\ndef zeropower", "def zeropower"),
    ('map_location=torch.device("cuda")', 'map_location=torch.device("cpu")'),
    ("self.images = (self.images.half() / 255)", "self.images = (self.images.float() / 255)"),
    ("                mod.half()", "                mod.float()"),
    (", nesterov=True, fused=True)", ", nesterov=True)"),
    ("""    starter = torch.cuda.Event(enable_timing=True)
    ender = torch.cuda.Event(enable_timing=True)
    time_seconds = 0.0
    def start_timer():
        starter.record()
    def stop_timer():
        ender.record()
        torch.cuda.synchronize()
        nonlocal time_seconds
        time_seconds += 1e-3 * starter.elapsed_time(ender)""",
     """    import time
    time_seconds = 0.0
    t0 = [0.0]
    def start_timer():
        t0[0] = time.time()
    def stop_timer():
        nonlocal time_seconds
        time_seconds += time.time() - t0[0]"""),
    ("""    model = CifarNet().cuda().to(memory_format=torch.channels_last)
    model.compile(mode="max-autotune")""",
     """    torch.manual_seed(int(os.environ.get("SEED", "0")))
    model = CifarNet().to(memory_format=torch.channels_last)"""),
    ("""    main("warmup", model)
    accs = torch.tensor([main(run, model) for run in range(200)])""",
     """    accs = torch.tensor([main(run, model) for run in range(1)])"""),
]


def patched(source: str) -> str:
    """airbench94_muon.py with EDITS applied; an edit whose text is not there exactly once stops the run."""
    for old, new in EDITS:
        if source.count(old) != 1:
            raise SystemExit(f"airbench94_muon.py: the text to edit occurs {source.count(old)} times, not once: "
                             f"{old.splitlines()[0]!r}")
        source = source.replace(old, new)
    return source


def airbench_table(lines: list[str]) -> dict:
    """airbench94_muon's printed table (| run | epoch | train_acc | val_acc | tta_val_acc | time_seconds |): the
    test accuracy after each epoch, and the final TTA row."""
    out: dict = {"epochs": []}
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or cells[1] in ("epoch", ""):
            continue
        if cells[1] == "eval":
            out["tta_top1"], out["timed_seconds"] = float(cells[4]), float(cells[5])
        elif cells[1].isdigit():
            out["epochs"].append({"epoch": int(cells[1]) + 1, "train_top1_last_batch": float(cells[2]),
                                  "test_top1": float(cells[3]), "seconds": float(cells[5])})
    if out["epochs"]:
        out["test_top1"] = out["epochs"][-1]["test_top1"]
    return out


def run_airbench(args: argparse.Namespace, work: Path) -> dict:
    script = work / "airbench94_muon_cpu.py"
    source = prepare_gpu_run.reference_bytes(Path(args.mirror), REPO, COMMIT, PATH, SHA256).decode()
    script.write_text(patched(source))
    if not (work / "cifar10" / "test.pt").is_file():
        prepare_gpu_run.airbench_tensors(Path(args.dataset), work, workers=1)
    cmd = [sys.executable, "-u", script.name]
    started = time.time()
    proc = subprocess.run(cmd, cwd=work, env={**os.environ, "SEED": str(args.seed)}, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"airbench94_muon_cpu.py failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return {"command": f"SEED={args.seed} python -u {script}", "source": f"https://github.com/{REPO}/blob/{COMMIT}/{PATH}",
            "edits": len(EDITS), "wall_seconds": round(time.time() - started, 1),
            **airbench_table(proc.stdout.splitlines())}


def run_ours(args: argparse.Namespace, work: Path) -> dict:
    """The preset through train.py, as bench/time_to_accuracy.py runs presets (its curve: the training split's
    accuracy per epoch, since the preset keeps no validation split)."""
    return time_to_accuracy.run_preset("configs/gpu_fast_cnn.yaml", args.dataset, work / "ours",
                                       ["--mixed-precision", "no", "--seed", str(args.seed)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--parts", nargs="+", choices=("airbench", "ours"), default=["airbench", "ours"])
    parser.add_argument("--dataset", default=benchlib.default_dataset())
    parser.add_argument("--mirror", default="/work/.mirror", help="folder of <owner>+<name>/repo git mirrors")
    parser.add_argument("--work", default="/tmp/airbench_on_cpu", help="scratch folder (data tensors, runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="airbench_on_cpu")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    payload = {"machine": benchlib.machine(), "dataset": args.dataset, "seed": args.seed, "runs": {}}
    for part in args.parts:
        payload["runs"][part] = (run_airbench if part == "airbench" else run_ours)(args, work)
        benchlib.write_result(args.name, payload)


if __name__ == "__main__":
    main()
