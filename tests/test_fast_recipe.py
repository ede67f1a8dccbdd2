"""The airbench pieces of the fast CPU recipe, each alone: Muon (Newton-Schulz orthogonalisation, the
SGD half, the parameter split), multi-view TTA, alternating flips, the linear schedule, the whitening-bias
freeze; and all of them together through the engine."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cifar_tl.augment import TrainTransform, alternating_flip_mask
from cifar_tl.config import ConfigError, TrainConfig, parse_args
from cifar_tl.engine import train
from cifar_tl.models import create_model
from cifar_tl.muon import Muon, newton_schulz, param_groups
from cifar_tl.optim import build_scheduler
from cifar_tl.tta import multiview_logits, tta_views

# ---------------------------------------------------------------------------------------------- Muon

@pytest.mark.parametrize("shape", [(32, 288), (288, 32)])
def test_newton_schulz_is_close_to_the_polar_factor(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x = newton_schulz(g, steps=5)
    assert x.shape == g.shape
    sv = torch.linalg.svdvals(x)
    assert sv.min() > 0.5 and sv.max() < 1.5, sv  # every direction about the same size (g's span 3x)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh  # the exact orthogonalisation U V^T
    assert F.cosine_similarity(x.flatten(), polar.flatten(), dim=0) > 0.95
    assert newton_schulz(3 * g, steps=5).allclose(x, atol=1e-5)  # blind to the gradient's scale
    with pytest.raises(ValueError, match="2-D"):
        newton_schulz(torch.randn(3))


def test_muon_groups_split_filters_biases_and_head():
    model = create_model("fast_cnn", num_classes=10)
    groups = param_groups(model, muon_lr=0.2, muon_momentum=0.6, lr=1.0, bias_lr=16.0, momentum=0.85,
                          weight_decay=1e-3)
    filters, biases, head = (g["params"] for g in groups)
    assert all(p.ndim == 4 for p in filters) and len(filters) == 6  # the stem's fixed filters are left out
    assert not any(p is model.features[0].weight for p in filters)
    assert any(p is model.whitening_bias for p in biases) and all(p.ndim == 1 for p in biases)
    assert head == [model.get_classifier().weight]
    assert groups[0]["muon"] and groups[1]["lr"] == 16.0
    # both SGD groups lose the same share of their weights per step, as in airbench
    assert groups[1]["lr"] * groups[1]["weight_decay"] == pytest.approx(groups[2]["lr"] * groups[2]["weight_decay"])
    opt = Muon(groups)
    assert not opt.param_groups[1]["muon"] and opt.param_groups[2]["momentum"] == 0.85


def test_muon_sgd_groups_match_torch_nesterov_sgd():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    ours, ref = torch.nn.Parameter(a.clone()), torch.nn.Parameter(a.clone())
    opt = Muon([dict(params=[ours], lr=0.1, momentum=0.85, weight_decay=0.01)])
    sgd = torch.optim.SGD([ref], lr=0.1, momentum=0.85, weight_decay=0.01, nesterov=True)
    for _ in range(3):
        for p, o in ((ours, opt), (ref, sgd)):
            p.grad = b * p.detach()
            o.step()
    assert torch.allclose(ours, ref, atol=1e-6)


def test_muon_step_normalises_filters_and_reduces_a_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long()  # learnable from the first channel
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    head = torch.nn.Linear(8, 2)
    with torch.no_grad():
        conv.weight.mul_(10)  # far from the norm Muon keeps
    opt = Muon([dict(params=[conv.weight], lr=0.05, momentum=0.6, muon=True),
                dict(params=list(head.parameters()), lr=0.5, momentum=0.85)])

    def loss_fn():
        return F.cross_entropy(head(F.relu(conv(x)).mean((2, 3))), y)

    first = loss_fn().item()
    loss_fn().backward()
    opt.step()
    # the filter was rescaled to norm sqrt(out) = sqrt(8), then moved by lr * (~orthogonal update)
    assert abs(conv.weight.norm().item() - math.sqrt(8)) < 0.05 * 3 * math.sqrt(8)
    for _ in range(30):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 0.6 * first
    with pytest.raises(ValueError, match="not biases"):
        Muon([dict(params=[head.bias], muon=True)])


# ---------------------------------------------------------------------------------------------- TTA

def test_tta_views_and_weights():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    assert [w for w, _ in tta_views(x, 0)] == [1.0]
    one = tta_views(x, 1)
    assert [w for w, _ in one] == [0.5, 0.5] and torch.equal(one[1][1], x.flip(-1))
    six = tta_views(x, 2)
    assert len(six) == 6 and sum(w for w, _ in six) == pytest.approx(1.0)
    assert [w for w, _ in six] == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    down_right, up_left = six[2][1], six[4][1]
    assert torch.equal(down_right[..., 1:, 1:], x[..., :-1, :-1])  # content moved by one pixel
    assert torch.equal(up_left[..., :-1, :-1], x[..., 1:, 1:])
    assert torch.equal(six[3][1], down_right.flip(-1))
    assert all(v.shape == x.shape for _, v in six)
    with pytest.raises(ValueError):
        tta_views(x, 3)


def test_multiview_logits_average_the_views():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5)).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        model(x)
        expected = sum(w * model(v) for w, v in tta_views(x, 2))
        assert torch.allclose(multiview_logits(model, x, 2), expected, atol=1e-6)
        assert torch.allclose(multiview_logits(model, x, 0), model(x))
        assert torch.allclose(multiview_logits(model, x, 2, first=model(x)), expected, atol=1e-6)  # reused
        # a model that ignores the image's layout sees six identical views: TTA changes nothing
        pooled = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2))
        const = torch.ones(2, 3, 8, 8) * torch.randn(2, 3, 1, 1)
        assert torch.allclose(multiview_logits(pooled, const, 2), pooled(const), atol=1e-6)


# ---------------------------------------------------------------------------------------------- training pieces

def test_alternating_flip_mirrors_each_image_every_other_epoch():
    images = torch.randint(0, 256, (400, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    odd, even = alternating_flip_mask(images, 1), alternating_flip_mask(images, 2)
    assert torch.equal(odd, ~even) and torch.equal(odd, alternating_flip_mask(images, 3))
    assert 150 < int(odd.sum()) < 250  # a fair coin per image
    assert torch.equal(alternating_flip_mask(images[:10], 1), odd[:10])  # fixed per image, whatever the batch
    tf = TrainTransform(8, (0.5,) * 3, (0.25,) * 3, augment="crop", shift=0.0, alternating_flip=True,
                        channels_last=False)
    tf.set_epoch(1)
    a = tf(images[:16])
    tf.set_epoch(2)
    assert torch.equal(tf(images[:16]), a.flip(-1))  # no shift: consecutive epochs are exact mirror images


def test_linear_schedule_and_new_options_validate():
    cfg = TrainConfig(scheduler="linear", lr=1.0, min_lr=0.1, epochs=2).validate()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(cfg, opt, steps_per_epoch=5)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1.0) and lrs[5] == pytest.approx(0.55) and lrs[10] == pytest.approx(0.1)
    assert all(a > b for a, b in itertools.pairwise(lrs))
    for bad in (["--tta-level", "3"], ["--whiten-bias-epochs", "-1"], ["--muon-lr", "0"],
                ["--alternating-flip", "--augment", "basic"]):
        with pytest.raises(ConfigError):
            parse_args(bad)


def test_muon_recipe_trains_freezes_the_whitening_bias_and_resumes(easy10_parquet, tmp_path):
    """fast_cnn with Muon, the linear schedule, alternating flips, the whitening bias trained in epoch 1 only
    and 6-view TTA, through the engine; a resumed run keeps the bias where epoch 1 left it."""
    args = ["--dataset", str(easy10_parquet), "--output-dir", str(tmp_path), "--model", "fast_cnn",
            "--no-pretrained", "--batch-size", "32", "--eval-batch-size", "100", "--optimizer", "muon",
            "--muon-lr", "0.24", "--lr", "0.1", "--bias-lr-scale", "16", "--weight-decay", "6e-4",
            "--momentum", "0.85", "--scheduler", "linear", "--min-lr", "0", "--whiten-bias-epochs", "1",
            "--augment", "crop", "--shift", "0.0625", "--alternating-flip", "--label-smoothing", "0.2",
            "--val-fraction", "0.2", "--early-stopping-patience", "0", "--drop-rate", "0", "--tta",
            "--tta-level", "2", "--mixed-precision", "no"]
    train(parse_args([*args, "--epochs", "1"]))
    bias_after_1 = load_file(str(tmp_path / "model" / "model.safetensors"))["features.0.bias"]
    assert bias_after_1.abs().sum() > 0  # it trained in epoch 1 (it starts at zero)
    metrics = train(parse_args([*args, "--epochs", "6", "--resume"]))
    assert metrics["epochs_run"] == 6 and metrics["tta"]["level"] == 2
    assert metrics["top1"] > 0.7 and metrics["tta"]["top1"] > 0.7, metrics
    weights = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert torch.equal(weights["features.0.bias"], bias_after_1)  # frozen after epoch 1
    assert torch.equal(weights["features.0.weight"][12:], -weights["features.0.weight"][:12])


def test_processes_with_their_own_clocks_agree_on_one_budget(monkeypatch):
    """Two processes started 3 s apart, with their own estimates of the final passes: on their own clocks one
    stops a step before the other (DDP's next all-reduce then fails) and their LRs differ; agreeing each step on
    the latest clock and the largest reserve, both read the same progress and stop together."""
    from cifar_tl import optim

    now = [1000.0]
    monkeypatch.setattr(optim.time, "time", lambda: now[0])
    budgets = [optim.Budget(1, start=900.0 + 3 * rank) for rank in range(2)]
    budgets[0].final_passes_seconds, budgets[1].final_passes_seconds = 5.0, 7.0
    now[0] = 945.5  # past rank 0's end (900 + 60 - 5 - 10), not rank 1's (903 + 60 - 7 - 10)
    assert budgets[0].expired() and not budgets[1].expired()
    assert budgets[0].progress() != budgets[1].progress()

    def agree(elapsed, reserve):  # what processes.shared_clock's all-reduce (max) returns on every process
        clocks = [(now[0] - b.start, b.final_passes_seconds) for b in budgets]
        return max(c[0] for c in clocks), max(c[1] for c in clocks)

    shared = [optim.Budget(1, start=b.start, agree=agree) for b in budgets]
    for mine, theirs in zip(shared, budgets, strict=True):
        mine.final_passes_seconds = theirs.final_passes_seconds
        mine.sync()
    now[0] += 5  # between two steps the clock is not read again: every process keeps the agreed reading
    assert shared[0].expired() and shared[1].expired()
    assert shared[0].progress() == shared[1].progress() == 1.0
    now[0] = 930.0
    for budget in shared:
        budget.sync()
    assert not shared[0].expired() and not shared[1].expired()
    assert shared[0].progress() == shared[1].progress() == pytest.approx(30 / (60 - 7 - 10))


def test_time_budget_counts_from_the_start_and_keeps_time_for_the_test(monkeypatch):
    """--time-limit-minutes is the whole run: what the test pass and the export will take is kept free."""
    from cifar_tl import optim

    now = [1000.0]
    monkeypatch.setattr(optim.time, "time", lambda: now[0])
    budget = optim.Budget(10, start=1000.0 - 60)  # the run started a minute ago (data, model, extraction)
    assert budget.progress() == pytest.approx(60 / (600 - budget.AFTER_TRAINING_SECONDS))
    budget.final_passes_seconds = 50.0  # validation measured: the last validation and the test will take ~50 s
    end = 1000.0 - 60 + 600 - 50 - budget.AFTER_TRAINING_SECONDS
    now[0] = end - 1
    assert not budget.expired() and budget.progress() < 1
    now[0] = end + 1
    assert budget.expired() and budget.progress() == 1.0
    assert not optim.Budget(None).expired()
    # validation: 1,000 images in 6 s -> one more validation + 10,000 test images, + 10 % = 72.6 s
    budget.foresee_final_passes(6.0, 1000, 10_000)
    assert budget.final_passes_seconds == pytest.approx(1.1 * (6.0 + 60.0))
    budget.foresee_final_passes(2.0, 1000, 10_000)  # the first pass (one-off start-up costs) stops counting
    assert budget.final_passes_seconds == pytest.approx(24.2)
    budget.foresee_final_passes(3.0, 1000, 10_000)  # then the slowest pass wins
    assert budget.final_passes_seconds == pytest.approx(36.3)
    budget.foresee_final_passes(1.0, 1000, 10_000)  # a fast pass does not shrink it
    assert budget.final_passes_seconds == pytest.approx(36.3)
