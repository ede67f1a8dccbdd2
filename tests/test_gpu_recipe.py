"""The pieces of the GPU time-to-accuracy recipes, each alone on the CPU: the weight average (EMA), layer-wise LR
decay, progressive resizing's schedule, one CUDA graph per training size (its dispatch), airbench96's cutout and
network, airbench-style timing; and the transfer pieces together through the engine, resumed."""
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from cifar_tl import cuda_graphs
from cifar_tl.augment import TrainTransform, eval_transform, progressive_size, random_cutout
from cifar_tl.config import ConfigError, TrainConfig, parse_args
from cifar_tl.ema import ModelEma
from cifar_tl.engine import sizes_to_come, train, training_size
from cifar_tl.models import create_model
from cifar_tl.optim import Budget, EarlyStopping, build_optimizer, build_scheduler, param_groups, reported_lr

# ---------------------------------------------------------------------------------------------- EMA


def small_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.LazyLinear(2))


def test_ema_averages_every_float_entry_with_a_warm_up():
    torch.manual_seed(0)
    model = small_net()
    model(torch.randn(2, 3, 5, 5))  # materialise the lazy layer
    ema = ModelEma(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): the start is forgotten fast
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(2.0)
    ema.update()
    avg = ema.averaged_state()
    for key in ("0.weight", "3.bias", "1.running_mean"):
        expected = 0.1 * start[key] + 0.9 * model.state_dict()[key]
        assert torch.allclose(avg[key], expected, atol=1e-6), key
    assert avg["1.num_batches_tracked"].dtype == torch.int64  # copied, not averaged
    for _ in range(200):
        ema.update()
    assert ema.current_decay() == 0.9  # the cap once (1 + t) / (10 + t) passes it
    with pytest.raises(ValueError):
        ModelEma(model, 1.0)


def test_ema_applied_swaps_in_place_and_back_and_round_trips():
    model = small_net()
    model(torch.randn(2, 3, 5, 5))
    ema = ModelEma(model, decay=0.5)
    weight = model[0].weight  # the same tensor object before, during and after: graphs and optimiser keep it
    trained = weight.detach().clone()
    with torch.no_grad():
        ema.average["0.weight"].fill_(3.0)
    with ema.applied():
        assert model[0].weight is weight and torch.equal(weight, torch.full_like(weight, 3.0))
    assert torch.equal(weight, trained)
    ema.updates = 7
    other = ModelEma(model, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 7 and torch.equal(other.average["0.weight"], ema.average["0.weight"])
    with pytest.raises(ValueError, match="another model"):
        other.load_state_dict({"updates": 0, "decay": 0.5, "average": {"x": torch.zeros(1)}})


# ---------------------------------------------------------------------------------------------- layer decay


def test_layer_decay_scales_lr_by_depth_with_timms_groups():
    model = create_model("tf_efficientnet_lite0", num_classes=10)
    cfg = TrainConfig(model="tf_efficientnet_lite0", pretrained=False, optimizer="sgd", lr=0.1, layer_decay=0.5,
                      bias_lr_scale=2.0, weight_decay=1e-4).validate()
    groups = param_groups(cfg, model)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert len(by_param) == sum(1 for _ in model.parameters())  # every parameter in exactly one group
    stem, head = by_param[id(model.conv_stem.weight)], by_param[id(model.classifier.weight)]
    assert head["lr"] == pytest.approx(0.1) and head["weight_decay"] == 1e-4
    assert stem["lr"] == pytest.approx(0.1 * stem["lr_scale"]) and stem["lr_scale"] < 0.5 ** 10
    assert by_param[id(model.classifier.bias)]["lr"] == pytest.approx(0.2)  # biases: bias_lr_scale, no decay
    assert by_param[id(model.classifier.bias)]["weight_decay"] == 0.0
    deeper = [by_param[id(model.blocks[i][0].conv_dw.weight)]["lr"] for i in range(7)]
    assert deeper == sorted(deeper)  # later blocks learn faster
    opt = build_optimizer(cfg, model)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]
    for bad in (["--layer-decay", "0"], ["--layer-decay", "1.5"], ["--layer-decay", "0.8", "--optimizer", "muon"]):
        with pytest.raises(ConfigError):
            parse_args(bad)


# ---------------------------------------------------------------------------------------------- progressive resizing


def per_epoch(epochs: int, start: int, end: int, multiple: int = 32) -> list[int]:
    return [progressive_size(i / (epochs - 1) if epochs > 1 else 1.0, start, end, multiple) for i in range(epochs)]


def test_progressive_size_grows_in_multiples_to_the_final_size():
    assert per_epoch(8, 128, 224) == [128, 128, 160, 160, 192, 192, 224, 224]
    assert per_epoch(14, 128, 224) == [128] * 3 + [160] * 4 + [192] * 4 + [224] * 3
    assert per_epoch(1, 128, 224) == [224]
    assert per_epoch(3, 32, 64, multiple=16) == [32, 48, 64]
    assert per_epoch(4, 100, 130) == [100, 100, 128, 130]  # clamped to [start, end], ends at end
    assert progressive_size(-0.5, 16, 32, 8) == 16 and progressive_size(1.5, 16, 32, 8) == 32
    for epochs in range(2, 30):
        sizes = per_epoch(epochs, 96, 256)
        assert sizes[0] == 96 and sizes[-1] == 256 and sizes == sorted(sizes) and len(sizes) == epochs
    with pytest.raises(ValueError):
        progressive_size(0.5, 256, 224)


def test_progressive_size_follows_the_epochs_or_the_time_budget():
    """A fixed-length run grows with its epochs; under a time budget the size follows the clock (the epoch count
    is unknown) and is full from --resize-full-at of the training time on, whatever the epoch cap."""
    def run_at(args: list[str], elapsed_share: float = 0.0, epochs_done: int = 0):
        cfg = parse_args(["--image-size", "32", "--progressive-resize", "16", *args])
        budget = Budget(cfg.time_limit_minutes)
        if budget.seconds:  # pretend that share of the training time has passed
            budget.start -= elapsed_share * (budget.seconds - Budget.AFTER_TRAINING_SECONDS)
        return SimpleNamespace(cfg=cfg, budget=budget, state=SimpleNamespace(epoch=epochs_done),
                               eval_tf=partial(eval_transform, size=32, mean=(0.5,) * 3, std=(0.5,) * 3))

    fixed = run_at(["--epochs", "5"])
    assert [training_size(fixed, e) for e in range(1, 6)] == [16, 16, 24, 32, 32]  # 16 20 24 28 32, half to even
    assert training_size(fixed, 7) == 32  # a resumed run past its schedule stays at full size
    assert sizes_to_come(fixed) == [16, 24, 32] and sizes_to_come(run_at(["--epochs", "5"], 0, 4)) == [32]
    budgeted = ["--epochs", "20", "--time-limit-minutes", "10", "--resize-full-at", "0.5"]
    assert training_size(run_at(budgeted, 0.0), 1) == 16
    assert training_size(run_at(budgeted, 0.2), 3) == 24  # 40 % of the way to full size: 22.4 -> 24
    assert training_size(run_at(budgeted, 0.5), 4) == 32  # epoch 4 of 20, but half the time is gone
    assert training_size(run_at(budgeted, 0.9), 6) == 32
    assert training_size(run_at(["--epochs", "20", "--time-limit-minutes", "10"], 0.3), 3) == 24  # full at the end
    assert training_size(run_at(["--epochs", "3"]), 2) == 24
    assert training_size(SimpleNamespace(cfg=TrainConfig(), eval_tf=fixed.eval_tf), 1) == 32  # no resizing
    with pytest.raises(ConfigError, match="--resize-full-at"):
        parse_args(["--image-size", "32", "--progressive-resize", "16", "--resize-full-at", "0"])


def test_train_transform_follows_the_size_schedule():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    tf = TrainTransform(64, (0.5,) * 3, (0.25,) * 3, augment="basic")
    sides = []
    for epoch, size in zip((1, 2, 3, 4), (32, 48, 64, None), strict=True):  # None: keeps the last size
        tf.set_epoch(epoch, size)
        sides.append(tf(images).shape[-1])
    assert sides == [32, 48, 64, 64]
    with pytest.raises(ConfigError):
        parse_args(["--image-size", "32", "--progressive-resize", "64"])
    assert parse_args(["--progressive-resize", "16"]).training_side() == 224  # up to the model's own size


def test_one_graph_per_shape_dispatches_by_input_shape(monkeypatch):
    """The dispatch of `capture_shapes`, with the capture itself (CUDA only: tests/test_speed_paths.py) faked."""
    model = torch.nn.Linear(4, 2)
    plain = model.forward

    def fake_capture(m, batch, autocast_dtype=None):
        shape = tuple(batch.shape)
        m.forward = lambda x: ("graph", shape)

    monkeypatch.setattr(cuda_graphs, "capture", fake_capture)
    cuda_graphs.capture_shapes(model, [torch.zeros(3, 4), torch.zeros(5, 4)])
    model.train()
    assert model(torch.zeros(3, 4)) == ("graph", (3, 4)) and model(torch.zeros(5, 4)) == ("graph", (5, 4))
    assert model(torch.zeros(2, 4)).shape == (2, 2)  # another shape: the plain forward
    model.eval()
    assert model(torch.zeros(3, 4)).shape == (3, 2)  # eval mode never replays a training graph

    def failing(m, batch, autocast_dtype=None):
        m.forward = lambda x: "half-captured"
        raise RuntimeError("op not capturable")

    other = torch.nn.Linear(4, 2)
    monkeypatch.setattr(cuda_graphs, "capture", failing)
    with pytest.raises(RuntimeError):
        cuda_graphs.capture_shapes(other, [torch.zeros(3, 4)])
    assert other(torch.zeros(3, 4)).shape == (3, 2)  # the forward it had
    assert plain is not None


# ---------------------------------------------------------------------------------------------- airbench96's pieces


def test_cutout_blanks_one_square_inside_each_image():
    x = torch.ones(64, 3, 16, 16)
    out = random_cutout(x, 5, generator=torch.Generator().manual_seed(0))
    blank = out[:, 0] == 0
    assert torch.equal(blank.sum((1, 2)), torch.full((64,), 25))  # a whole 5 x 5 square, never clipped
    assert torch.equal(blank, (out == 0).all(1))  # all channels alike
    rows, cols = blank.any(2), blank.any(1)
    assert torch.equal(rows.sum(1), torch.full((64,), 5)) and torch.equal(cols.sum(1), torch.full((64,), 5))
    assert len({tuple(r.nonzero().flatten().tolist()) for r in rows}) > 5  # placed at random
    tf = TrainTransform(16, (0.5,) * 3, (0.25,) * 3, augment="crop", shift=0.0, cutout=4, channels_last=False)
    assert ((tf(torch.full((8, 3, 16, 16), 200, dtype=torch.uint8)) == 0).all(1).sum((1, 2)) == 16).all()
    for bad in (["--cutout", "4", "--augment", "basic"], ["--cutout", "-1"]):
        with pytest.raises(ConfigError):
            parse_args(bad)


def test_fast_cnn_96_is_airbench96s_network():
    model = create_model("fast_cnn_96", num_classes=10)
    assert model.num_features == 512 and model.model_args["depth"] == 3
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 10  # the whitening stem + 3 per stack (airbench96: "10 conv layers")
    pair = model.features[6]
    with torch.no_grad():  # the residual connection: a zeroed body passes its input through
        for m in pair.body:
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
        pair.eval()
        x = torch.randn(2, 128, 8, 8)
        assert torch.allclose(pair(x), x + pair.body(x)) and torch.allclose(pair(x), x, atol=1e-5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert "depth" not in create_model("fast_cnn_wide", num_classes=10).model_args  # old folders unchanged


# ---------------------------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("flags", [["--model", "test_efficientnet", "--layer-decay", "0.5"],
                                   ["--model", "fast_cnn", "--optimizer", "muon"],
                                   ["--model", "baseline_cnn_bn_small", "--scheduler", "plateau"]])
def test_history_lr_is_the_scheduled_lr_not_the_first_groups(flags):
    """history.jsonl's lr is --lr as scheduled: the first group trains at the stem's LR under --layer-decay and
    at Muon's under --optimizer muon, and was what history showed."""
    cfg = parse_args([*flags, "--no-pretrained", "--lr", "0.01", "--min-lr", "0", "--epochs", "2",
                      "--warmup-epochs", "0", "--plateau-patience", "1", "--plateau-factor", "0.5"])
    model = create_model(cfg.model, num_classes=10)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=2)
    assert optimizer.param_groups[0]["lr"] != 0.01 or cfg.scheduler == "plateau"
    assert reported_lr(cfg, optimizer) == pytest.approx(0.01)
    if cfg.scheduler == "plateau":
        scheduler.step(1.0)
        scheduler.step(2.0)  # no improvement for --plateau-patience epochs: halved
    else:
        for _ in range(2):
            optimizer.step()
            scheduler.step()  # half-way through the cosine: half the LR
    assert reported_lr(cfg, optimizer) == pytest.approx(0.005)


def test_no_validation_split_keeps_the_last_epoch():
    early = EarlyStopping(patience=1)
    assert early.update(1, None) and early.update(2, None)  # None: no validation loss
    assert early.best_epoch == 2 and not early.should_stop and early.stopped is None
    assert early.best_val_loss is None and early.state_dict()["best_loss"] is None  # JSON has no infinity
    early.update(3, 0.5)
    assert not early.update(4, 0.9) and early.stopped == "early stopping: no val-loss improvement for 1 epochs"


def test_engine_trains_with_ema_layer_decay_and_progressive_resizing_and_resumes(easy10_parquet, tmp_path):
    """The transfer recipe's pieces through train.py's engine on a small CNN (the CPU has no CUDA graphs): the
    exported weights are the weight average, a run without a validation split keeps its last epoch, metrics
    carry airbench's timing, and a resumed run continues the same average."""
    args = ["--dataset", str(easy10_parquet), "--output-dir", str(tmp_path), "--model", "baseline_cnn_bn_small",
            "--no-pretrained", "--image-size", "32", "--progressive-resize", "16", "--batch-size", "32",
            "--eval-batch-size", "100", "--optimizer", "sgd", "--lr", "0.05", "--layer-decay", "0.7",
            "--ema-decay", "0.9", "--val-fraction", "0", "--scheduler", "cosine", "--warmup-epochs", "0",
            "--early-stopping-patience", "1", "--tta", "--mixed-precision", "no", "--augment", "basic"]
    first = train(parse_args([*args, "--epochs", "2"]))  # epoch 1 at 16 px, epoch 2 at 32 px
    metrics = train(parse_args([*args, "--epochs", "3", "--resume"]))
    assert metrics["epochs_run"] == 3 and metrics["best_epoch"] == 3  # nothing held out: the last epoch's weights
    assert metrics["top1"] > 0.3, metrics
    for m in (first, metrics):
        assert m["test_seconds"] > 0 and m["tta_test_seconds"] > 0
        assert m["timed_seconds"] == pytest.approx(m["train_seconds"] + m["tta_test_seconds"])
    from safetensors.torch import load_file
    exported = load_file(str(tmp_path / "model" / "model.safetensors"))
    last = tmp_path / "checkpoints" / "epoch-0003"
    saved = torch.load(last / "ema.pt", weights_only=True)
    before = torch.load(tmp_path / "checkpoints" / "epoch-0002" / "ema.pt", weights_only=True)
    assert saved["updates"] * 2 == before["updates"] * 3 > 0  # the resumed run went on with the same average
    for key, value in saved["average"].items():
        assert torch.allclose(exported[key].float(), value, atol=1e-6), key
    trained = load_file(str(last / "model.safetensors"))  # the checkpoint keeps the training weights
    assert not torch.equal(trained["classifier.weight"], exported["classifier.weight"])
