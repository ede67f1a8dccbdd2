"""Model card, export CLI, push (against a fake Hub on loopback), Hub-id loading and the Space folder."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gradio
import numpy as np
import pytest
from cifar100_meta import COARSE_NAMES, FINE_NAMES, FINE_TO_COARSE
from conftest import hold_elsewhere
from fakehub import SHA, FakeHub, hub_env, run_python
from huggingface_hub import ModelCard, SpaceCard
from PIL import Image
from safetensors.torch import load_file, save_file

import cifar_tl
from cifar_tl import export, hub
from cifar_tl.card import render_card
from cifar_tl.config import TrainConfig
from cifar_tl.loading import ModelLoadError
from cifar_tl.model_folder import folder_config, load_model, read_config, write_model_folder

PLACEHOLDERS = re.compile(r"\{\{|\}\}|\{%|%\}|TODO|More Information Needed|\bNone\b|\bnan\b")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
METRICS = {"top1": 0.8123, "top5": 0.9567, "coarse_top1": 0.8891, "loss": 0.71, "ece": 0.041, "n": 400,
           "best_epoch": 3, "epochs_run": 5, "train_seconds": 312.0, "stopped": "completed all epochs"}


@pytest.fixture
def run_dir(timm_model_dir, tmp_path) -> Path:
    """A finished run as the engine leaves it: metrics.json, eval_details.json, model/ (saved with a real
    training config and metrics), checkpoints/{best.safetensors, epoch-0005/} and the report's plots."""
    run = tmp_path / "run-b0"
    (run / "plots").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(METRICS))
    per_super = {name: 0.5 + i / 100 for i, name in enumerate(COARSE_NAMES)}
    (run / "eval_details.json").write_text(json.dumps({"plain": {**METRICS, "per_superclass": per_super}}))
    Image.new("RGB", (8, 8), "red").save(run / "plots" / "confusion.png")
    model, _ = load_model(timm_model_dir)
    train_config = TrainConfig(model="test_efficientnet", output_dir=str(run), image_size=64).validate().to_dict()
    config = folder_config(model, image_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD, data_size=32,
                           fine_names=FINE_NAMES, coarse_names=COARSE_NAMES, fine_to_coarse=FINE_TO_COARSE,
                           train_config=train_config, metrics=METRICS, dataset_fingerprint="f00d")
    write_model_folder(run / "model", model, config)
    epoch = run / "checkpoints" / "epoch-0005"
    epoch.mkdir(parents=True)
    state = load_file(str(run / "model" / "model.safetensors"))
    save_file(state, str(run / "checkpoints" / "best.safetensors"))
    save_file({f"module.{k}": v for k, v in state.items()}, str(epoch / "model.safetensors"))  # as under DDP
    (epoch / "trainer_state.json").write_text(json.dumps({"epoch": 5}))
    return run


# --------------------------------------------------------------------------------------------- card + export


def test_training_folder_has_card_and_plots(run_dir):
    model = run_dir / "model"
    assert {"model.safetensors", "config.json", "README.md", "plots"} <= {p.name for p in model.iterdir()}
    card = ModelCard.load(model / "README.md")
    assert card.data.base_model == "timm/test_efficientnet.r160_in1k" and "plots/confusion.png" in card.text
    assert not PLACEHOLDERS.search(str(card))
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in model.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~umask  # safetensors alone made 0600


def test_export_run_dir_writes_folder_and_card(run_dir, tmp_path):
    out = tmp_path / "export"
    assert export.main(["--checkpoint", str(run_dir), "--output-dir", str(out)]) == 0
    assert {"model.safetensors", "config.json", "README.md", "plots"} <= {p.name for p in out.iterdir()}
    assert (out / "plots" / "confusion.png").is_file()

    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.license == "apache-2.0" and data.library_name == "timm"
    assert data.pipeline_tag == "image-classification" and data.datasets == ["uoft-cs/cifar100"]
    assert data.base_model == "timm/test_efficientnet.r160_in1k" and data.metrics == ["accuracy"]
    assert {"image-classification", "timm", "transformers"} <= set(data.tags)
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results == {"accuracy": 81.23, "top_5_accuracy": 95.67, "superclass_accuracy": 88.91}
    assert {r.dataset_type for r in data.eval_results} == {"uoft-cs/cifar100"}
    assert all(r.dataset_split == "test" for r in data.eval_results)

    text = card.text
    assert not PLACEHOLDERS.search(str(card)), PLACEHOLDERS.search(str(card))
    for expected in ("## Intended use", "## Training data", "## Training procedure", "## Results",
                     "## Limitations", "## How to load it", "## Citation", "| Top-1 accuracy | 81.23 % |",
                     ("it is right for 88.91 % of the images against 81.23 % for the\n  fine class, so about 41 % of "
                      "the fine-label mistakes still land in the true superclass"), "global batch\n64, at most",
                     "| `lr` | 0.0001 |", "![Confusion](plots/confusion.png)", "Krizhevsky", "Tan, Mingxing",
                     f'timm.create_model("local-dir:{out}"', 'pipeline("image-classification"',
                     "aquatic_mammals (50.0 %)", "The best epoch was 3 of 5"):
        assert expected in text, expected


def test_export_checkpoint_forms(run_dir, tmp_path):
    best = export.export_checkpoint(run_dir / "checkpoints" / "best.safetensors", tmp_path / "best")
    assert read_config(best)["cifar_tl"]["metrics"]["top1"] == METRICS["top1"]

    epoch = export.export_checkpoint(run_dir / "checkpoints" / "epoch-0005", tmp_path / "epoch",
                                     repo_id="me/cifar-b0")
    assert read_config(epoch)["cifar_tl"]["metrics"] == {}  # epoch 5 is not the evaluated best epoch
    card = ModelCard.load(epoch / "README.md")
    assert not card.data.eval_results and "No test metrics are recorded" in card.text
    assert not (epoch / "plots").exists() and "weakest" not in card.text  # they are the best epoch's
    assert "summing the probabilities of its fine classes." in card.text
    assert 'from_pretrained("me/cifar-b0")' in card.text and not PLACEHOLDERS.search(str(card))
    keys = [load_file(str(folder / "model.safetensors")).keys() for folder in (epoch, best)]
    assert keys[0] == keys[1]  # the DDP "module." prefix is gone


def test_card_states_the_recipe_as_it_trained(timm_model_dir):
    """cpu_quick: Muon for the filters and SGD for the rest, 4 micro-batches a step, crops without zoom."""
    from cifar_tl.config import load_yaml

    config = read_config(timm_model_dir)
    config["cifar_tl"]["train_config"] = TrainConfig(**load_yaml("configs/cpu_quick.yaml")).resolve().validate(
    ).to_dict()
    text = render_card(config, model_dir=timm_model_dir).text
    assert "global batch\n1000 (4 accumulated micro-batches of 250)," in text
    assert "Muon for the convolution filters (learning rate 0.12, momentum 0.7) and Nesterov SGD" in text
    assert "reflect-padded, and\nalternating horizontal flips)." in text and "zoom up to" not in text


def test_export_bad_checkpoint_is_one_clear_error(run_dir, tmp_path, capsys):
    assert export.main(["--checkpoint", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "expected a run's output dir" in capsys.readouterr().err
    state = load_file(str(run_dir / "checkpoints" / "best.safetensors"))
    save_file({k: v for k, v in state.items() if "classifier" not in k},
              str(run_dir / "checkpoints" / "best.safetensors"))
    assert export.main(["--checkpoint", str(run_dir / "checkpoints" / "best.safetensors"),
                        "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit the test_efficientnet" in err and "classifier" in err


def test_export_checks_the_hub_id_it_writes_into_the_card(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export.main(["--checkpoint", str(run_dir), "--output-dir", str(tmp_path / "o"), "--hub-model-id", "bad id!!"])
    assert exit_.value.code == 2 and "--hub-model-id 'bad id!!': not a Hub id user/name" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_export_never_mixes_a_model_folder_into_other_files(run_dir, tmp_path, capsys):
    """An existing folder that was not a model folder lost its plots/ (and its README.md) to the export: a
    project folder, or the run's own folder."""
    project = tmp_path / "myproject"
    (project / "plots").mkdir(parents=True)
    (project / "plots" / "thesis_fig1.pdf").write_text("data")
    (project / "README.md").write_text("mine")
    for out in (project, run_dir):
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        assert export.main(["--checkpoint", str(run_dir), "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --output-dir {out}: a folder that is not a model folder") and err.count("\n") == 1
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (project / "README.md").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert export.main(["--checkpoint", str(run_dir), "--output-dir", str(tmp_path / "empty")]) == 0
    assert export.main(["--checkpoint", str(run_dir), "--output-dir", str(tmp_path / "empty")]) == 0  # rewritten


def test_fixture_folders_carry_a_card(cnn_model_dir, timm_model_dir):
    for folder in (cnn_model_dir, timm_model_dir):
        card = ModelCard.load(folder / "README.md")
        assert card.data.pipeline_tag == "image-classification" and not PLACEHOLDERS.search(str(card))
        # a fixture is no Hub dataset: no model-index (its folder name would read as a Hub dataset id there)
        assert not card.data.eval_results and "| Top-1 accuracy | 1.00 % |" in card.text


def test_model_index_names_the_label_column_and_the_tta_views(run_dir):
    """A 20-class `--label-column coarse_label` run read as a fine-label CIFAR-100 result, and airbench's 6-view
    TTA was called flip TTA."""
    config = read_config(run_dir / "model")
    config["cifar_tl"]["train_config"]["label_column"] = "coarse_label"
    config["cifar_tl"]["metrics"]["tta"] = {"top1": 0.8345, "level": 2}
    card = render_card(config, model_dir=run_dir / "model")
    (result, *_) = card.data.eval_results
    assert result.dataset_name == "CIFAR-100 (coarse_label)" and result.dataset_args == {"label_column": "coarse_label"}
    assert "| Top-1 accuracy with 6-view TTA (mirror + 1 px shifts) | 83.45 % |" in card.text


def test_reexport_in_place_drops_the_earlier_evaluation(run_dir):
    """Another epoch exported into the model folder kept the best epoch's confusion.json and plots, and a push
    then showed them under weights they were not made with."""
    model = run_dir / "model"
    (model / "confusion.json").write_text(json.dumps({"labels": FINE_NAMES, "matrix": []}))
    assert (model / "plots" / "confusion.png").is_file()
    assert export.main(["--checkpoint", str(run_dir / "checkpoints" / "epoch-0005"), "--output-dir", str(model)]) == 0
    assert not (model / "confusion.json").exists() and not (model / "plots").exists()
    assert "plots/" not in (model / "README.md").read_text()


def test_push_refuses_what_would_not_load(timm_model_dir, cnn_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(timm_model_dir, folder)
    config = read_config(folder)
    config["cifar_tl"].pop("files")  # as the loader's advice says, for weights replaced on purpose
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(cnn_model_dir / "model.safetensors", folder / "model.safetensors")  # another network's weights
    with pytest.raises(ValueError, match="cannot be loaded, so it is not pushed .*does not fit the test_efficientnet"):
        hub.check_pushable(folder, hub.read_model_folder(folder))
    config["cifar_tl"]["format_version"] = 1
    with pytest.raises(ValueError, match="model-folder format 1.*python -m cifar_tl.export --checkpoint"):
        hub.check_pushable(folder, config)
    (folder / "config.json").write_text('{"architecture": ')
    with pytest.raises(ValueError, match=f"{folder / 'config.json'} is not valid JSON"):
        hub.read_model_folder(folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only pickled weights"):
        hub.read_model_folder(folder)
    run = tmp_path / "run"
    shutil.copytree(timm_model_dir, run / "model")
    assert hub.model_folder_of(run) == run / "model"  # a run's folder pushes its model/, as loaders take it
    other = hold_elsewhere(run)
    try:
        with pytest.raises(ValueError, match=f"is still going \\(process {other.pid} on "):
            hub.check_pushable(run / "model", read_config(run / "model"))
    finally:
        other.kill()
        other.wait()
    hub.check_pushable(run / "model", read_config(run / "model"))  # the run has ended: its lock holds nothing


def test_a_finished_runs_failed_push_says_the_run_is_kept(timm_model_dir):
    with pytest.raises(hub.HubError) as err:
        hub.push_finished_run(timm_model_dir, "me/cifar")  # HF_HUB_OFFLINE=1 in the tests
    assert str(err.value).startswith(f"the run finished (its model folder {timm_model_dir} is complete)")
    assert f"push it with `python -m cifar_tl.hub push {timm_model_dir} me/cifar`" in str(err.value)


def test_a_plain_timm_export_loads(tmp_path):
    """timm's save_for_hf records num_classes in model_args: from_pretrained passed it twice (TypeError)."""
    import timm
    from timm.models._hub import save_for_hf

    model = timm.create_model("test_efficientnet", num_classes=3)
    save_for_hf(model, tmp_path, model_config={"label_names": ["a", "b", "c"]}, model_args={"num_classes": 3},
                safe_serialization=True)
    assert cifar_tl.from_pretrained(str(tmp_path)).fine_names == ["a", "b", "c"]


# --------------------------------------------------------------------------------------------- push checks


def test_push_access_fails_fast_and_clearly(monkeypatch, tmp_path):
    with pytest.raises(hub.HubError, match="not a Hub id user/name"):
        hub.check_push_access("no-namespace")
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE=1"):
        hub.check_push_access("me/cifar")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(hub.HubError, match="no Hugging Face token"):
        hub.check_push_access("me/cifar")


def test_train_with_push_fails_before_any_training(cifar100_parquet, tmp_path):
    from cifar_tl.engine import train

    out = tmp_path / "run"
    cfg = TrainConfig(dataset=str(cifar100_parquet), model="baseline_cnn", pretrained=False, epochs=1,
                      output_dir=str(out), push_to_hub=True, hub_model_id="me/cifar").validate()
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE"):
        train(cfg)
    assert not out.exists()


def test_push_uploads_the_folder_as_one_commit(run_dir, tmp_path):
    model = run_dir / "model"
    (model / "optimizer.bin").write_bytes(b"pickle")  # never uploaded: not in the allow-list
    with FakeHub() as server:
        proc = run_python("-m", "cifar_tl.hub", "push", str(model), "lab/cifar-b0", "--private",
                          env=hub_env(server, tmp_path / "hf"))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"{server.url}/lab/cifar-b0/commit/{SHA}"
        posts = server.paths("POST")
        assert "/api/whoami-v2" in server.paths("GET")
        assert posts == ["/api/repos/create", "/api/validate-yaml", "/api/models/lab/cifar-b0/preupload/main",
                         "/api/models/lab/cifar-b0/commit/main"]  # one commit
        sent = {path: body for method, path, body in server.requests if method == "POST"}

    assert json.loads(sent["/api/repos/create"]) == {"name": "cifar-b0", "organization": "lab",
                                                     "visibility": "private"}
    commit = [json.loads(line) for line in sent["/api/models/lab/cifar-b0/commit/main"].splitlines()]
    assert commit[0]["value"]["summary"] == "cifar-tl run run-b0: test_efficientnet, test top-1 0.8123"
    files = server.repos["lab/cifar-b0"]
    assert set(files) == {"model.safetensors", "config.json", "README.md", "plots/confusion.png"}
    for name in ("model.safetensors", "config.json", "README.md"):
        assert files[name] == (model / name).read_bytes()
    readme = files["README.md"].decode()
    assert 'timm.create_model("hf-hub:lab/cifar-b0"' in readme and "# cifar-b0" in readme
    assert json.loads(sent["/api/validate-yaml"])["content"] == readme


def test_push_without_access_fails_before_upload(timm_model_dir, tmp_path):
    with FakeHub() as server:
        proc = run_python("-m", "cifar_tl.hub", "push", str(timm_model_dir), "other/cifar",
                          env=hub_env(server, tmp_path / "hf"))
        assert proc.returncode == 2 and proc.stderr.startswith("error: repo_id other/cifar: the token")
        assert server.paths("POST") == []


def test_push_refuses_damaged_weights(timm_model_dir, tmp_path):
    model = shutil.copytree(timm_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with FakeHub() as server:
        proc = run_python("-m", "cifar_tl.hub", "push", str(model), "me/cifar", env=hub_env(server, tmp_path / "hf"))
        assert server.requests == []  # checked before anything is asked of the Hub
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"error: {model}: model.safetensors is truncated (1,000 of" in proc.stderr


def test_a_failed_push_leaves_the_folder_as_it_was(timm_model_dir, tmp_path):
    model = shutil.copytree(timm_model_dir, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    with FakeHub() as server:
        server.failing.add("commit")
        proc = run_python("-m", "cifar_tl.hub", "push", str(model), "me/fails", env=hub_env(server, tmp_path / "hf"))
    assert proc.returncode == 2 and "push to me/fails failed" in proc.stderr and "is intact" in proc.stderr
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before  # the card too


def test_a_hand_edited_card_is_pushed_as_written(run_dir, tmp_path):
    model = run_dir / "model"
    with (model / "README.md").open("a") as card:
        card.write("\n## Notes from the author\n\nTrained on a Tuesday.\n")
    with FakeHub() as server:
        proc = run_python("-m", "cifar_tl.hub", "push", str(run_dir), "lab/cifar-b0",
                          env=hub_env(server, tmp_path / "hf"))
        assert proc.returncode == 0, proc.stderr
        readme = server.repos["lab/cifar-b0"]["README.md"].decode()
    assert "Trained on a Tuesday." in readme and "Trained on a Tuesday." in (model / "README.md").read_text()
    assert "was edited after cifar-tl wrote it: pushed as it is" in proc.stderr


def test_push_errors_name_the_push_command_not_train_flags(timm_model_dir, tmp_path, capsys):
    assert hub.main(["push", str(timm_model_dir), "cifar100-b0"]) == 2
    assert capsys.readouterr().err.strip() == "error: repo_id 'cifar100-b0': not a Hub id user/name"
    assert hub.main(["push", str(timm_model_dir), "me/cifar"]) == 2  # HF_HUB_OFFLINE=1 in the tests
    assert capsys.readouterr().err.strip() == "error: cannot push to the Hub with HF_HUB_OFFLINE=1: unset it"


def test_from_pretrained_hub_id_downloads_only_safe_files(timm_model_dir, tmp_path, monkeypatch):
    files = {p.name: p.read_bytes() for p in timm_model_dir.iterdir() if p.is_file()}
    files |= {"pytorch_model.bin": b"not a pickle you want", "modeling_evil.py": b"raise SystemExit"}
    with FakeHub({"me/cifar": files}) as server:
        # in-process twin of hub_env: what HF_ENDPOINT / HF_HUB_OFFLINE=0 / HF_HUB_CACHE set at import time
        resolve = server.url + "/{repo_id}/resolve/{revision}/{filename}"
        for name, value in {"ENDPOINT": server.url, "HUGGINGFACE_CO_URL_TEMPLATE": resolve,
                            "HF_HUB_OFFLINE": False, "HF_HUB_CACHE": str(tmp_path)}.items():
            monkeypatch.setattr(f"huggingface_hub.constants.{name}", value)
        predictor = cifar_tl.from_pretrained("me/cifar")
        fetched = {path.rsplit("/", 1)[-1] for path in server.paths("GET") if "/resolve/" in path}
    assert fetched == {"model.safetensors", "config.json", "README.md"}
    assert predictor.fine_names == FINE_NAMES and predictor.predict([np.zeros((32, 32, 3), np.uint8)])


def test_from_pretrained_offline_hub_id_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not in the local Hub cache"):
        cifar_tl.from_pretrained("me/never-downloaded")
    with pytest.raises(ModelLoadError, match="no such model folder"):
        cifar_tl.from_pretrained(str(tmp_path / "missing" / "deeper" / "model"))


def test_a_run_folder_loads_its_model_and_a_file_is_told_apart(run_dir, tmp_path):
    assert cifar_tl.from_pretrained(str(run_dir)).fine_names == FINE_NAMES  # RUN/ means RUN/model/
    with pytest.raises(ModelLoadError, match="a file, not a model folder; .* an exported ONNX file named"):
        cifar_tl.from_pretrained(str(run_dir / "metrics.json"))


# --------------------------------------------------------------------------------------------- Space


def test_space_folder_for_a_hub_model(tmp_path):
    space = hub.build_space(tmp_path / "space", "me/cifar-b0")
    card = SpaceCard.load(space / "README.md")
    assert card.data.sdk == "gradio" and card.data.sdk_version == gradio.__version__
    assert card.data.app_file == "app.py" and card.data.models == ["me/cifar-b0"] and card.data.license
    assert card.data.title and not PLACEHOLDERS.search(str(card))
    app = (space / "app.py").read_text()
    compile(app, "app.py", "exec")
    # auto: ONNX Runtime on a CPU, PyTorch where the export fails (an explicit onnx left the Space dead) or on a GPU
    assert 'MODEL = "me/cifar-b0"' in app and 'main(["--model", MODEL, "--backend", "auto"])' in app
    # the pins are this Python's versions (numpy 2.4 needs 3.11): a Space on its default Python failed to build
    assert card.data.python_version == f"{sys.version_info.major}.{sys.version_info.minor}"
    lines = (space / "requirements.txt").read_text().splitlines()
    pins = [line for line in lines if line and not line.startswith(("#", "--"))]
    assert all(re.fullmatch(r"[\w.-]+==[\w.]+", pin) for pin in pins), pins  # no local labels such as +cu130
    assert any(r.startswith("torch==") for r in pins) and not any("gradio" in r for r in pins)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines  # not PyPI's CUDA wheel on a CPU
    assert (space / "cifar_tl" / "demo.py").is_file() and not list(space.rglob("__pycache__"))


def test_space_push_creates_the_space_in_one_commit(tmp_path):
    """... and leaves out what running the Space folder locally left in it (gradio's caches, flags)."""
    space = tmp_path / "space"
    for left in (".gradio/cached_examples/12/log.csv", "flagged/log.csv"):
        (space / left).parent.mkdir(parents=True)
        (space / left).write_text("another model's answers")
    with FakeHub() as server:
        proc = run_python("-m", "cifar_tl.hub", "space", str(space), "--model", "lab/cifar-b0", "--space",
                          "me/cifar-demo", "--push", env=hub_env(server, tmp_path / "hf"))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"{server.url}/spaces/me/cifar-demo"
        commits = [p for p in server.paths("POST") if p.endswith("/commit/main")]
    assert commits == ["/api/spaces/me/cifar-demo/commit/main"]  # one commit, to a Space repo
    (created,) = server.created
    assert created["type"] == "space" and created["sdk"] == "gradio" and created["name"] == "cifar-demo"
    files = server.spaces["me/cifar-demo"]
    assert {"README.md", "app.py", "requirements.txt", "cifar_tl/demo.py",
            "cifar_tl/examples/cifar100/00_mountain.png"} <= set(files)
    assert b'MODEL = "lab/cifar-b0"' in files["app.py"] and b'"--backend", "auto"' in files["app.py"]
    assert not any("__pycache__" in name or "log.csv" in name for name in files)
    assert SpaceCard(files["README.md"].decode()).data.models == ["lab/cifar-b0"]


def test_space_push_checks_access_before_building(tmp_path):
    with FakeHub() as server:
        proc = run_python("-m", "cifar_tl.hub", "space", "--model", "lab/cifar-b0", "--space", "other/demo",
                          "--push", env=hub_env(server, tmp_path / "hf"))
        assert proc.returncode == 2 and proc.stderr.startswith("error: --space other/demo: the token")
        assert server.paths("POST") == []
    bad = run_python("-m", "cifar_tl.hub", "space", "--model", "lab/cifar-b0", "--push", env=dict(os.environ))
    assert bad.returncode == 2 and "--push needs --space" in bad.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # starts the real app: gradio, torch and timm imports in a fresh process
def test_space_takes_a_run_folder_and_names_a_mistyped_one(run_dir, tmp_path, capsys, monkeypatch):
    """A run's folder was "not a model folder" (every other command takes it) after the package was copied; a
    mistyped local folder with one slash became the Space's Hub model; a Space built where the package lies
    copied it onto itself."""
    space = hub.build_space(tmp_path / "space", str(run_dir))
    assert (space / "model" / "model.safetensors").is_file() and (space / "model" / "config.json").is_file()
    monkeypatch.chdir(run_dir.parent)
    typo = f"{run_dir.name}/modle"
    assert hub.main(["space", str(tmp_path / "typo"), "--model", typo]) == 2
    assert capsys.readouterr().err.startswith(f"error: --model {typo}: no such folder, though {run_dir.name}/ is here")
    assert not (tmp_path / "typo").exists()
    assert hub.main(["space", str(hub.PACKAGE_DIR.parent), "--model", "me/cifar"]) == 2
    assert "the folder this cifar_tl package is in" in capsys.readouterr().err


def test_space_with_bundled_model_runs_locally(timm_model_dir, tmp_path):
    space = hub.build_space(tmp_path / "space", str(timm_model_dir))
    assert (space / "model" / "model.safetensors").is_file()
    assert SpaceCard.load(space / "README.md").data.models is None  # weights bundled, no model repo
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1", "PYTHONPATH": ""}
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=space, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as response:
                    config = json.loads(response.read())
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, "app.py did not serve within 90 s"
                time.sleep(0.5)
        assert any(d.get("api_name") == "classify" for d in config["dependencies"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    imported = subprocess.run([sys.executable, "-c", "import cifar_tl; print(cifar_tl.__file__)"], cwd=space,
                              env=env, capture_output=True, text=True, check=True).stdout
    assert Path(imported.strip()).is_relative_to(space)  # the Space runs its own copy of the package


def test_card_says_only_what_its_numbers_support(timm_model_dir, cnn_model_dir):
    """An unsure model whose summed superclass top-1 is under its fine top-1 implies no share of mistakes (the
    card said "about 0 %"); a model that upsamples its 32 px images does not get the same probabilities in
    cifar-tl, timm and transformers (each resizes its own way), one that does not, does."""
    config = read_config(timm_model_dir)  # 64 px input from 32 px data
    config["cifar_tl"]["metrics"] = {"top1": 0.41, "coarse_top1": 0.195, "n": 200}
    text = render_card(config, model_dir=timm_model_dir).text
    assert "fine-label mistakes" not in text and "summing the probabilities of its fine classes." in text
    assert "same probabilities" not in text and "upsamples them to 64 px in its own way" in text
    config["cifar_tl"]["metrics"] = {"top1": 0.5, "coarse_top1": 0.6, "n": 200}
    assert "about 20 % of the fine-label mistakes" in render_card(config, model_dir=timm_model_dir).text
    assert "same probabilities" in render_card(read_config(cnn_model_dir), model_dir=cnn_model_dir).text


def test_a_damaged_config_is_named_when_loading(cnn_model_dir, tmp_path):
    """A config.json that is no JSON, or lacks input_size, said only `JSONDecodeError: Extra data` / `KeyError`."""
    from cifar_tl.loading import load_predictor

    folder = shutil.copytree(cnn_model_dir, tmp_path / "m")
    config = read_config(folder)
    for text, problem in (('{"architecture": 1} }', "is not valid JSON"), ("[]", "expected a JSON object"),
                          (json.dumps({**config, "pretrained_cfg": {}}), "pretrained_cfg has no input_size")):
        (folder / "config.json").write_text(text)
        with pytest.raises(ModelLoadError, match=re.escape(f"{folder / 'config.json'}") + ".*" + re.escape(problem)):
            load_predictor(folder)
