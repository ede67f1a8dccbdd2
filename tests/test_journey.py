"""The README's first-hour journey, run verbatim: train with defaults -> evaluate -> push to the Hub -> deploy the
Space -> load the pushed model with cifar-tl, timm and transformers; then the pushed Space's app.py starts from
the pushed model repo and answers a gradio_client request. The Hub is a fake on 127.0.0.1 (tests/fakehub.py);
timm's ImageNet weights for the model come from it too."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from fakehub import FakeHub, hub_env

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def journey_commands() -> list[str]:
    """The README's journey block: every line after the `export` line that sets its variables."""
    block = re.search(r"<!-- journey -->\s*```bash\n(.*?)```\s*<!-- /journey -->", README.read_text(), re.DOTALL)
    assert block, "README.md lost its <!-- journey --> block"
    lines = [line for line in block[1].splitlines() if line.strip()]
    assert lines[0].startswith("export DATA=")
    return lines[1:]


def hub_weights(model: str) -> dict[str, dict[str, bytes]]:
    """A timm Hub repo of `model`'s ImageNet weights (random values: what matters is the path they travel)."""
    import timm
    import torch
    from safetensors.torch import save

    torch.manual_seed(0)
    net = timm.create_model(model, num_classes=1000)
    repo = timm.models.get_pretrained_cfg(model).hf_hub_id
    return {repo: {"model.safetensors": save({k: v.contiguous() for k, v in net.state_dict().items()}),
                   "config.json": json.dumps({"architecture": model, "num_classes": 1000}).encode()}}


@pytest.mark.timeout(900)
def test_readme_journey_end_to_end(cifar100_parquet, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "train.py", work)
    image = ROOT / "cifar_tl" / "examples" / "cifar100" / "15_lion.png"
    with FakeHub(hub_weights("test_efficientnet")) as server:
        env = hub_env(server, tmp_path / "hf")
        env.update(DATA=str(cifar100_parquet), MODEL="test_efficientnet", ME="me", IMAGE=str(image),
                   CIFAR_TL_CACHE=str(tmp_path / "cache"),  # `python` is this interpreter, as in an activated venv
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
        outputs = []
        for command in journey_commands():
            proc = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True,
                                  timeout=600, check=False)
            assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            outputs.append(proc.stdout)
        metrics = json.loads((work / "runs" / "first" / "metrics.json").read_text())
        assert metrics["pretrained"] is True and "auto" in metrics["choices"]["weights"]  # from the (fake) Hub
        evaluated = json.loads((work / "runs" / "first" / "eval" / "metrics.json").read_text())
        assert evaluated["n"] == metrics["n"] == 200
        assert set(server.repos["me/cifar-first"]) >= {"model.safetensors", "config.json", "README.md"}
        assert "app.py" in server.spaces["me/cifar-first-demo"]
        labels = json.loads((work / "runs" / "first" / "model" / "config.json").read_text())["label_names"]
        assert all(any(name in out for name in labels) for out in outputs[-3:])  # three loaders, real labels
        answer = ask_the_space(server, env, tmp_path / "space", image)
    assert answer["label"] in labels and len(answer["confidences"]) == 5


def ask_the_space(server: FakeHub, env: dict, folder: Path, image: Path) -> dict:
    """Start the pushed Space's app.py (it downloads the pushed model from the Hub) and classify one image."""
    from gradio_client import Client, handle_file

    for name, data in server.spaces["me/cifar-first-demo"].items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    port = free_port()
    env = {**env, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1", "PYTHONPATH": ""}
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_serving(proc, f"http://127.0.0.1:{port}/config")
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        fine, _coarse, _preview, message = client.predict(handle_file(str(image)), api_name="/classify")
        assert message == ""
        return fine
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_until_serving(proc: subprocess.Popen, url: str, limit: float = 180) -> None:
    deadline = time.time() + limit
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, f"the Space did not serve within {limit:.0f} s"
            time.sleep(0.5)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
