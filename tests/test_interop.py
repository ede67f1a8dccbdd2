"""One exported folder, three loaders: cifar-tl's `from_pretrained`, `timm.create_model("local-dir:...")` and
the transformers image-classification pipeline, all offline, agreeing on the same 32x32 images."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from cifar100_meta import FINE_NAMES
from PIL import Image, ImageOps

import cifar_tl
from cifar_tl.augment import eval_transform
from cifar_tl.model_folder import read_config, write_model_folder

N_IMAGES = 8


@pytest.fixture(scope="module")
def sharp_timm_dir(timm_model_dir, cifar100_arrays, tmp_path_factory):
    """The timm fixture folder with its classifier rescaled so the logits spread by ~4: an untrained head
    gives near-uniform probabilities, on which "same top-1" would prove nothing about the preprocessing."""
    out = tmp_path_factory.mktemp("sharp_timm")
    shutil.copytree(timm_model_dir, out, dirs_exist_ok=True)
    predictor = cifar_tl.from_pretrained(str(out))
    spread = predictor.logits(predictor.preprocess(list(cifar100_arrays["test"][0][:32]))).std()
    model = predictor.model.cpu()
    with torch.no_grad():
        model.classifier.weight *= 4.0 / spread
        model.classifier.bias.zero_()
    write_model_folder(out, model, predictor.config)  # the writer records the new weights' checksum
    return out


def test_config_is_timm_hub_format(timm_model_dir):
    config = read_config(timm_model_dir)
    assert config["architecture"] == "test_efficientnet" and config["num_classes"] == 100
    assert "num_classes" not in config["model_args"]  # transformers' wrapper would pass it twice
    assert config["label_names"] == FINE_NAMES and config["num_features"] > 0
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 64, 64] and cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 1.0
    assert len(cfg["mean"]) == len(cfg["std"]) == 3
    assert {"coarse_names", "fine_to_coarse", "train_config", "metrics"} <= config["cifar_tl"].keys()


def test_three_loaders_agree(sharp_timm_dir, cifar100_arrays):
    from transformers import pipeline

    images = [Image.fromarray(a) for a in cifar100_arrays["test"][0][:N_IMAGES]]
    ours = cifar_tl.from_pretrained(str(sharp_timm_dir)).predict_proba(images)[0]

    model = timm.create_model(f"local-dir:{sharp_timm_dir}", pretrained=True).eval()
    data_config = timm.data.resolve_data_config({}, model=model)
    pixels = torch.stack([timm.data.create_transform(**data_config)(im) for im in images])
    with torch.no_grad():
        theirs = model(pixels).softmax(-1)
    # Same geometry, size and normalisation as training: the pixels differ only by PIL rounding its resized
    # image to uint8 (at most one level), which is why the probabilities below are close but not equal.
    std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
    batch = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
    ours_pixels = eval_transform(batch, 64, data_config["mean"], data_config["std"], channels_last=False)
    assert ((pixels - ours_pixels) * std).abs().max() <= 1.01 / 255

    classifier = pipeline("image-classification", model=str(sharp_timm_dir))
    outputs = classifier(images, top_k=len(FINE_NAMES))
    assert classifier.model.config.id2label[12] == FINE_NAMES[12]  # real names, not LABEL_12
    scores = [{o["label"]: o["score"] for o in out} for out in outputs]
    piped = torch.tensor([[s[name] for name in FINE_NAMES] for s in scores])

    assert ours.max(1).values.min() > 5 / len(FINE_NAMES)  # confident enough for top-1 to mean something
    for probs in (theirs, piped):
        assert torch.equal(probs.argmax(1), ours.argmax(1))
        torch.testing.assert_close(probs, ours, atol=0.02, rtol=0)
    assert [out[0]["label"] for out in outputs] == [FINE_NAMES[i] for i in ours.argmax(1)]


def test_baseline_cnn_loads_through_cifar_tl_and_registered_timm(cnn_model_dir, cifar100_arrays):
    predictor = cifar_tl.from_pretrained(str(cnn_model_dir))
    out = predictor.predict(list(cifar100_arrays["test"][0][:2]), top_k=3)
    assert out[0]["fine"][0]["label"] in FINE_NAMES and out[0]["coarse"]["label"]
    # cifar_tl.architectures (imported by cifar_tl's loading) registered baseline_cnn: timm's own loader builds it
    model = timm.create_model(f"local-dir:{cnn_model_dir}", pretrained=True).eval()
    batch = predictor.preprocess(list(cifar100_arrays["test"][0][:4]))
    x = eval_transform(batch, predictor.image_size, predictor.mean, predictor.std, channels_last=False)
    with torch.no_grad():
        torch.testing.assert_close(model(x), predictor.model(x))
    # timm alone does not know it, and the card says so: no pipeline snippet, the registering import instead
    plain_timm = f"import timm; timm.create_model('local-dir:{cnn_model_dir}', pretrained=True)"
    proc = subprocess.run([sys.executable, "-c", plain_timm], check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "baseline_cnn" in proc.stderr
    card = (cnn_model_dir / "README.md").read_text()
    assert "library_name: pytorch" in card and "pipeline(" not in card
    assert "import cifar_tl.architectures" in card and f"local-dir:{cnn_model_dir}" in card


def test_any_image_size_matches_a_32px_thumbnail(timm_model_dir):
    """Larger inputs go through the same 32x32 thumbnail the card tells timm/transformers users to make."""
    predictor = cifar_tl.from_pretrained(str(timm_model_dir))
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 80, 3), dtype=np.uint8))
    small = ImageOps.fit(big, (32, 32), Image.BICUBIC)  # short side to 32, centre crop: as the store
    torch.testing.assert_close(predictor.predict_proba([big])[0], predictor.predict_proba([small])[0])
