"""Gather the history.jsonl + metrics.json of several train.py runs into one JSON (name -> curve + test)."""
import argparse
import json
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("runs", help="folder whose sub-folders are train.py output dirs")
parser.add_argument("--output", required=True)
args = parser.parse_args()
result = {}
for run in sorted(Path(args.runs).iterdir()):
    hist, metrics = run / "history.jsonl", run / "metrics.json"
    if not metrics.is_file():
        continue
    m = json.loads(metrics.read_text())
    result[run.name] = {
        "test_top1": m["top1"], "epochs_run": m["epochs_run"], "train_seconds": m["train_seconds"],
        "train_images_per_second": m.get("train_images_per_second"),
        "val_top1_per_epoch": [round(json.loads(l).get("val_top1", float("nan")), 4)  # nan: no val split
                               for l in hist.read_text().splitlines() if l],
        "config": {k: m.get(k) for k in ("model", "image_size")},
    }
Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
for name, r in result.items():
    print(f"{name:24s} test {r['test_top1']:.4f}  val/epoch {r['val_top1_per_epoch']}  {r['train_seconds']:.0f}s")
