"""ONNX export (dynamic batch, config in the metadata) and the onnxruntime backend agree with PyTorch."""
from __future__ import annotations

import onnx
import pytest
import torch

from cifar_tl.export_onnx import main
from cifar_tl.inference import Predictor
from cifar_tl.loading import load_predictor
from cifar_tl.onnx_backend import CONFIG_KEY, OnnxPredictor


@pytest.mark.parametrize("fixture", ["cnn_model_dir", "study_cnn_model_dir", "fast_cnn_model_dir", "timm_model_dir"])
def test_onnx_logits_match_pytorch(fixture, request, cifar100_arrays):
    model_dir = request.getfixturevalue(fixture)
    torch_pred = Predictor.from_dir(model_dir, "cpu")
    onnx_pred = load_predictor(str(model_dir), backend="onnx")
    assert isinstance(onnx_pred, OnnxPredictor) and onnx_pred.model_dir == model_dir
    images = list(cifar100_arrays["test"][0][:7])
    for batch in (images[:1], images):  # the batch axis is dynamic
        x = torch_pred.preprocess(batch)
        torch.testing.assert_close(onnx_pred.logits(x), torch_pred.logits(x), atol=1e-4, rtol=0)
        torch.testing.assert_close(onnx_pred.logits(x, tta=True), torch_pred.logits(x, tta=True), atol=1e-4,
                                   rtol=0)
    assert [p["fine"][0]["label"] for p in onnx_pred.predict(images)] == \
        [p["fine"][0]["label"] for p in torch_pred.predict(images)]


def test_backend_export_is_cached_and_threads_apply(cnn_model_dir):
    first = load_predictor(str(cnn_model_dir), backend="onnx").onnx_path
    mtime = first.stat().st_mtime_ns
    default_threads = torch.get_num_threads()
    try:
        again = load_predictor(str(cnn_model_dir), backend="onnx", threads=1)
        assert again.model.get_session_options().intra_op_num_threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(default_threads)
    assert again.onnx_path == first and first.stat().st_mtime_ns == mtime


def test_auto_backend_is_onnx_on_a_cpu_and_falls_back_to_torch(cnn_model_dir, monkeypatch, caplog):
    """The demo's and predict's default: ONNX Runtime on a CPU; a model the exporter cannot express is served by
    PyTorch with a warning under auto, and is an error only when onnx was asked for by name."""
    from cifar_tl.loading import ModelLoadError, backend_of

    assert backend_of(load_predictor(str(cnn_model_dir), backend="auto", device="cpu")) == "onnx"
    assert backend_of(load_predictor(str(cnn_model_dir), backend="torch", device="cpu")) == "torch"

    def fail(*args, **kwargs):
        raise RuntimeError("an op the exporter cannot express")

    monkeypatch.setattr(OnnxPredictor, "from_predictor", fail)
    with caplog.at_level("WARNING", logger="cifar_tl.loading"):
        fallback = load_predictor(str(cnn_model_dir), backend="auto", device="cpu")
    assert backend_of(fallback) == "torch" and "serving with PyTorch" in caplog.text
    with pytest.raises(ModelLoadError, match="cannot express"):
        load_predictor(str(cnn_model_dir), backend="onnx", device="cpu")


def test_export_cli_writes_a_self_contained_file(cnn_model_dir, cifar100_arrays, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["--model", str(cnn_model_dir), "--output", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    assert CONFIG_KEY in {p.key for p in proto.metadata_props}
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    # the file alone is a predictor: labels and superclasses come from its metadata
    alone = load_predictor(str(out))
    result = alone.predict(list(cifar100_arrays["test"][0][:2]))
    assert len(result) == 2 and result[0]["coarse"] is not None


def test_export_cli_reports_a_bad_model(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing"), "--output", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model ") and "no such model folder" in err and err.count("\n") == 1


def test_export_cli_reports_an_unwritable_output_in_one_line(cnn_model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["--model", str(cnn_model_dir), "--output", str(blocker / "m.onnx")]) == 2
    assert capsys.readouterr().err == f"error: --output {blocker / 'm.onnx'}: no folder {blocker}\n"  # a file
    assert main(["--model", str(cnn_model_dir), "--output", str(tmp_path / "typo" / "m.onnx")]) == 2
    assert not (tmp_path / "typo").exists()  # a mistyped folder is not created


def test_export_cli_refuses_an_onnx_model(tmp_path, capsys):
    """An .onnx --model went as far as a TypeError traceback (its session cannot be copied)."""
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(tmp_path / "cnn.onnx"), "--output", str(tmp_path / "again.onnx")])
    assert exit_.value.code == 2
    assert "--model " in (err := capsys.readouterr().err) and "already an ONNX file" in err
