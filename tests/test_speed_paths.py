"""The training step's speed paths: device-resident data, cached normalisation constants, CUDA graphs, the CPU
bf16 choice, small-map depthwise convolutions as matrix products. The CUDA tests run wherever a GPU is (bench/gpu_suite.sh runs them on a lent one); the rest run
everywhere."""
import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn

from cifar_tl import cuda_graphs, depthwise
from cifar_tl.augment import TrainTransform, eval_transform
from cifar_tl.config import parse_args
from cifar_tl.data import Split, make_loader, on_device
from cifar_tl.engine import train
from cifar_tl.models import create_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def split(n=40):
    return Split(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8), torch.arange(n) % 10,
                 torch.arange(n) % 2)


def test_cpu_split_stays_where_it_is():
    s = split()
    assert on_device(s, torch.device("cpu")) is s
    assert s.nbytes == 40 * 3 * 8 * 8 + 2 * 40 * 8


def test_normalisation_constants_are_made_once():
    from cifar_tl import augment

    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    tf = TrainTransform(8, [0.5, 0.4, 0.3], (0.2, 0.2, 0.2), augment="none")
    first = tf(images)
    stats = augment._stats((0.5, 0.4, 0.3), (0.2, 0.2, 0.2), torch.device("cpu"), torch.float32)
    misses = augment._stats.cache_info().misses
    assert torch.equal(tf(images), first)  # the train transform (a list) and eval (a tuple) share them
    torch.testing.assert_close(first, eval_transform(images, 8, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)))
    assert augment._stats.cache_info().misses == misses
    assert augment._stats((0.5, 0.4, 0.3), (0.2, 0.2, 0.2), torch.device("cpu"), torch.float32) is stats


def test_graph_blockers_name_each_reason():
    assert cuda_graphs.graph_blockers(num_processes=1, compile=False, grad_accum_steps=1, frozen_parts=False) == []
    reasons = cuda_graphs.graph_blockers(num_processes=2, compile=True, grad_accum_steps=4, frozen_parts=True)
    assert len(reasons) == 4 and "--compile" in reasons and any("--grad-accum-steps" in r for r in reasons)
    assert parse_args(["--no-cuda-graphs"]).cuda_graphs is False and parse_args([]).cuda_graphs is True


@cuda
def test_device_resident_batches_match_host_batches():
    s = split()
    dev = on_device(s, torch.device("cuda"))
    assert dev.images.is_cuda and dev.fine.is_cuda and dev.coarse.is_cuda
    for a, b in zip(make_loader(s, 16, shuffle=True, seed=3), make_loader(dev, 16, shuffle=True, seed=3)):
        assert all(b[k].is_cuda and torch.equal(a[k], b[k].cpu()) for k in a)


def train_alike(eager, graphed, shapes, lr: float, tolerance: float) -> None:
    """SGD steps on the same random batches (one per shape) for both models, then the same weights."""
    dev = torch.device("cuda")
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in (eager, graphed)]
    for shape in shapes:
        xb = torch.randn(*shape, device=dev).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (shape[0],), device=dev)
        for model, opt in zip((eager, graphed), opts):
            F.cross_entropy(model(xb), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=tolerance, atol=tolerance, msg=name)


@cuda
@pytest.mark.parametrize("arch", ["baseline_cnn_bn_small", "efficientnet_b0"])
def test_graphed_step_matches_eager(arch, monkeypatch):
    # TF32 convolutions (cuDNN's default) let the two models drift by ~1e-3 in 3 steps, hiding real mismatches
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    eager = create_model(arch, num_classes=10, drop_rate=0.0).to(dev).to(memory_format=torch.channels_last)
    if arch.startswith("efficientnet"):  # stochastic depth would draw different masks in the two models
        for m in eager.modules():
            if hasattr(m, "drop_path") and hasattr(m.drop_path, "drop_prob"):
                m.drop_path.drop_prob = 0.0
    eager.train()
    graphed = copy.deepcopy(eager)
    x = torch.randn(8, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in graphed.state_dict().items()}
    cuda_graphs.capture(graphed, torch.randn_like(x))
    assert all(torch.equal(before[k], v) for k, v in graphed.state_dict().items())  # weights, BN statistics
    assert all(p.grad is None for p in graphed.parameters())
    # real steps: the graph must follow the weights as they change
    train_alike(eager, graphed, [x.shape] * 3, lr=0.1, tolerance=1e-3)
    eager.load_state_dict(graphed.state_dict())  # same weights: the eval check compares the forwards alone
    eager.eval(), graphed.eval()
    x5 = torch.randn(5, 3, 32, 32, device=dev)  # eval mode runs the ordinary forward, any batch size
    torch.testing.assert_close(eager(x5), graphed(x5), rtol=1e-3, atol=1e-4)


@cuda
def test_one_graph_per_training_size_matches_eager(monkeypatch):
    """Progressive resizing's graphs: Lite0 captured at two sizes trains like the eager model at each."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    eager = create_model("tf_efficientnet_lite0", num_classes=10, drop_rate=0.0).to(dev)
    eager = eager.to(memory_format=torch.channels_last).train()
    graphed = copy.deepcopy(eager)
    shapes = [(8, 3, 64, 64), (8, 3, 96, 96)]
    cuda_graphs.capture_shapes(graphed, [torch.randn(*s, device=dev).contiguous(
        memory_format=torch.channels_last) for s in shapes])
    # back to the first size, then one never captured (the eager forward)
    train_alike(eager, graphed, [*shapes, shapes[0], (8, 3, 80, 80)], lr=0.05, tolerance=2e-3)


@cuda
def test_engine_trains_with_graphs_and_device_data(easy10_parquet, tmp_path, monkeypatch):
    captured = []
    real_capture = cuda_graphs.capture
    monkeypatch.setattr(cuda_graphs, "capture", lambda model, batch, *a: captured.append(batch.shape)
                        or real_capture(model, batch, *a))
    args = ["--dataset", str(easy10_parquet), "--model", "baseline_cnn_bn", "--no-pretrained", "--batch-size", "32",
            "--lr", "3e-3", "--epochs", "6", "--scheduler", "cosine", "--val-fraction", "0.2",
            "--early-stopping-patience", "0"]
    metrics = train(parse_args([*args, "--output-dir", str(tmp_path / "graphs")]))
    assert captured == [(32, 3, 32, 32)] and metrics["top1"] > 0.7, metrics
    train(parse_args([*args, "--epochs", "1", "--no-cuda-graphs", "--output-dir", str(tmp_path / "eager")]))
    assert len(captured) == 1


def test_auto_precision_on_cpu_follows_the_hardware_and_the_model(monkeypatch):
    from cifar_tl.models import cpu_bf16_pays
    from cifar_tl.precision import mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        assert cpu_bf16_pays("fast_cnn") is native and cpu_bf16_pays("baseline_cnn") is native
        assert cpu_bf16_pays("efficientnet_b0") is False  # depthwise convolutions: slower in bf16
        assert mixed_precision("auto", "baseline_cnn_bn") == ("bf16" if native else "no")
        assert mixed_precision("auto", "tf_efficientnet_lite0") == "no"
    assert mixed_precision("no", "baseline_cnn_bn") == "no"


def test_tracing_does_not_leave_its_tensors_in_the_constants_cache():
    """torch.export (ONNX export, the probe) runs the same transform: what it traces must not be cached."""
    from cifar_tl import augment

    augment._stats.cache_clear()

    class Pre(torch.nn.Module):
        def forward(self, images):
            return eval_transform(images, 8, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5))

    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    torch.export.export(Pre(), (images,))
    assert augment._stats.cache_info().currsize == 0
    out = eval_transform(images, 8, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5))
    torch.testing.assert_close(out, (images.float() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / 0.5)


@pytest.mark.parametrize("conv, hw", [
    (nn.Conv2d(12, 12, 5, padding=2, groups=12, bias=False), (4, 4)),   # Lite0's last stages: 5x5 on 4x4
    (Conv2dSame(12, 12, 5, stride=2, groups=12, bias=False), (8, 8)),   # TF 'same' padding, strided: 8x8 -> 4x4
    (nn.Conv2d(12, 12, 3, padding=1, stride=2, groups=12), (5, 7)),     # odd, non-square, with a bias
])
def test_depthwise_matmul_matches_the_convolution_forward_and_backward(conv, hw):
    x = torch.randn(3, 12, *hw, requires_grad=True)
    params = [x, *conv.parameters()]
    expected = conv(x)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, params, grad)
    fast = depthwise.DepthwiseMatmul(conv, hw)
    got = fast(x)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
    for g, e in zip(torch.autograd.grad(got, params, grad), expected_grads):
        assert torch.allclose(g, e, atol=1e-4)  # the kernel's gradient arrives in the conv's own parameter
    assert torch.equal(fast(torch.ones(1, 12, 9, 9)), conv(torch.ones(1, 12, 9, 9)))  # another size: the conv


def test_as_matmul_swaps_small_map_depthwise_convs_and_restores_them():
    model = create_model("test_efficientnet", num_classes=10)
    keys, sample = list(model.state_dict()), torch.randn(2, 3, 32, 32)
    reference = model.eval()(sample)
    model.train()
    stats = model.bn1.running_mean.clone()
    dws = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    with depthwise.as_matmul(model, sample, max_pixels=4) as swapped:  # its depthwise maps: 4x4, then 2x2
        assert torch.equal(model.bn1.running_mean, stats) and model.training  # the sizing pass changed nothing
        now = {n for n, m in model.named_modules() if isinstance(m, depthwise.DepthwiseMatmul)}
        assert swapped == len(now) == 1 < len(dws)  # the larger map stays a convolution
        assert list(model.state_dict()) == keys  # checkpoints and the optimiser see the same parameters
        assert torch.allclose(model.eval()(sample), reference, atol=1e-5)
    assert {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1} == dws
