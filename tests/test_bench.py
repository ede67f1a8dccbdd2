"""The benchmark scripts run end to end on a tiny fixture and write the JSON that BENCHMARKS.md is built from:
a smoke test against rot, not a measurement (real runs: BENCHMARKS.md "Reproduce")."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str) -> str:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def run_bench(script: str, *args: str, out: Path) -> dict:
    """A script that writes one JSON file into `--out`: its content."""
    run_script(script, *args, "--out", str(out))
    files = list(out.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_train_throughput_times_every_pipeline_on_the_same_model(easy10_parquet, tmp_path):
    # the fixture has CIFAR-100's columns (img, fine_label, coarse_label): every pipeline must find them
    res = run_bench("train_throughput.py", "--dataset", str(easy10_parquet), "--models", "baseline_cnn_bn_small",
                    "--sizes", "32", "--batch-sizes", "32:16", "--steps", "1", "--warmup", "1", "--repeats", "1",
                    "--pipelines", "ours", "timm", "hf", "--workers", "0", "--images", "64", out=tmp_path)
    assert not res.get("errors")
    (row,) = res["results"]
    ips = row["images_per_second"]
    assert set(ips) == {"ours", "timm", "hf"} and min(ips.values()) > 0
    assert row["ratios"]["ours/timm"] == pytest.approx(ips["ours"] / ips["timm"])
    assert row["precision"] in ("fp32", "bf16")


def test_cpu_precision_times_fp32_and_bf16(tmp_path):
    res = run_bench("cpu_precision.py", "--cases", "baseline_cnn_bn_small@32:8", "--steps", "1", "--repeats", "1",
                    out=tmp_path)
    (row,) = res["results"]
    assert set(row["images_per_second"]) == {"fp32", "bf16"} and min(row["images_per_second"].values()) > 0


def test_inference_compares_backends(tmp_path):
    res = run_bench("inference.py", "--cases", "baseline_cnn_bn_small@32", "--batch-sizes", "4", "--backends",
                    "eager", "channels_last", "onnxruntime", "--repeats", "1", "--min-seconds", "0.01",
                    "--device", "cpu", out=tmp_path)
    (row,) = res["results"]
    assert set(row["images_per_second"]) == {"eager", "channels_last", "onnxruntime"}
    assert row["prepare_seconds"]["onnxruntime"] > 0


def test_scaling_reads_epoch_times_from_train_py(easy10_parquet, tmp_path):
    res = run_bench("scaling.py", "--dataset", str(easy10_parquet), "--model", "baseline_cnn_bn_small",
                    "--fractions", "0.5", "1", "--processes", "1", "--batch-size", "32", "--test-rows", "20",
                    "--val-fraction", "0.1", out=tmp_path)
    rows = res["results"]
    assert [r["fraction"] for r in rows] == [0.5, 1]
    assert rows[1]["max_train_samples"] == 2 * rows[0]["max_train_samples"] == 270
    assert all(r["epoch_seconds"] > 0 and r["mixed_precision"] in ("bf16", "no") for r in rows)


def test_profile_step_splits_the_step_into_phases(easy10_parquet, tmp_path):
    res = run_bench("profile_step.py", "--dataset", str(easy10_parquet), "--model", "baseline_cnn_bn_small",
                    "--sizes", "32", "--batch-size", "16", "--steps", "1", "--device", "cpu", out=tmp_path)
    (row,) = res["results"]
    assert set(row["phases_ms"]) == {"data", "transform", "forward", "backward", "optimizer"}
    assert sum(row["phases_ms"].values()) == pytest.approx(row["ms_per_step"], rel=0.01)
    assert row["top_ops"] and all(op["self_ms_per_step"] >= 0 for op in row["top_ops"])


def test_cpu_step_times_micro_batches_and_depthwise_as_matmul(tmp_path):
    res = run_bench("cpu_step.py", "--batch-sizes", "32", "16", "--images", "64", "--rounds", "1", out=tmp_path)
    assert set(res["fast_cnn_32px_by_batch"]) == {"32", "16"} and all(v > 0 for v in res["fast_cnn_32px_by_batch"].values())
    assert set(res["probe_top_lite0_2_stages"]) == {"convolution", "matmul"}
    assert all(v > 0 for v in res["probe_top_lite0_2_stages"].values())
    floor = res["floor"]
    assert floor["matmul_peak_gflops"] > 0
    gflop = {k: r["gflop_per_image"] for k, r in floor["fast_cnn"].items()}
    # fast_cnn's convolutions at 32 px: ~0.07 GFLOP forward, x3 with the backward pass; fewer pixels, fewer FLOPs
    assert 0.1 < gflop["32"] < 0.3 and gflop["32"] > gflop["24px_batch_32"] > gflop["16px_batch_32"]
    assert all(r["gflops"] == pytest.approx(r["img_s"] * r["gflop_per_image"]) for r in floor["fast_cnn"].values())


def test_time_to_accuracy_runs_a_preset_as_a_user_would(easy10_parquet, tmp_path):
    out = tmp_path / "tta.json"
    run_script("time_to_accuracy.py", str(ROOT / "configs" / "cpu_fast_cnn.yaml"), "--dataset", str(easy10_parquet),
               "--runs-dir", str(tmp_path / "runs"), "--output", str(out), "--name", "smoke", "--", "--epochs", "2",
               "--time-limit-minutes", "none", "--warmup-epochs", "0", "--batch-size", "64",
               "--eval-batch-size", "100", "--no-tta")
    run = json.loads(out.read_text())["runs"]["smoke"]
    assert run["epochs_run"] == 2 and [c["epoch"] for c in run["curve"]] == [1, 2]
    assert 0 <= run["test_top1"] <= 1 and run["val_top1_by"]["5min"] is not None
    tables = run_script("tables.py", str(out))
    row = next(line for line in tables.splitlines() if line.startswith("| smoke |"))
    assert f"{100 * run['test_top1']:.2f} %" in row and f"{run['wall_minutes']:.2f} min" in row


def test_gpu_time_to_accuracy_rehearses_our_parts_on_a_cpu(easy10_parquet, tmp_path):
    """bench/gpu_time_to_accuracy.py's own parts at its SMOKE sizes: the gpu_fast_cnn preset (one seed) and the
    gpu_transfer preset (Lite0, 2 epochs, progressive 32 -> 48 px) through train.py, their timing and the summary.
    The reference scripts (airbench94.py, timm's train.py) are not in CI: `SMOKE=1 bash
    bench/gpu_time_to_accuracy.sh` rehearses them where bench/prepare_gpu_run.py has fetched them."""
    out = tmp_path / "out"
    run_script("gpu_time_to_accuracy.py", "--smoke", "--parts", "prepare", "fast_cnn", "transfer", "--seeds", "1",
               "--dataset", str(easy10_parquet), "--work", str(tmp_path / "work"), "--out", str(out))
    res = json.loads((out / "gpu_time_to_accuracy.json").read_text())
    parts = res["parts"]
    (cnn,) = parts["fast_cnn"]["runs"].values()
    assert cnn["returncode"] == 0 and cnn["epochs_run"] == 1 and 0 <= cnn["tta_top1"] <= 1
    assert cnn["timed_seconds"] == pytest.approx(cnn["train_seconds"] + cnn["tta_test_seconds"])
    transfer = parts["transfer"]
    assert transfer["epochs_run"] == 2 and transfer["image_size"] == 48 and len(transfer["curve"]) == 2
    assert 0 < transfer["seconds_to_metrics"] <= transfer["wall_seconds"]
    summary = res["summary"]
    assert summary["fast_cnn"]["tta_top1_spread"]["n"] == 1 and summary["transfer"]["met"] is False
    assert "== transfer (rc 0" in (out / "gpu_time_to_accuracy.log").read_text()


def test_airbench_table_is_read_run_by_run():
    """airbench94.py's printed table (as its print_training_details writes it): one result per finished run."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from gpu_time_to_accuracy import airbench_runs
    finally:
        sys.path.remove(str(ROOT / "bench"))
    table = """|  run     |  epoch  |  train_loss  |  train_acc  |  val_acc  |  tta_val_acc  |  total_time_seconds  |
|       0  |      0  |      0.5000  |     0.8000  |   0.9000  |               |              1.5000  |
|          |   eval  |      0.5000  |     0.8000  |   0.9000  |       0.9401  |              3.8312  |
|       1  |      0  |      0.5000  |     0.8000  |   0.9000  |               |              1.4000  |"""
    assert airbench_runs(table.splitlines()) == [{"tta_val_acc": 0.9401, "seconds": 3.8312}]


def test_demo_latency_queries_the_app_over_http(tmp_path):
    """app.py as a fresh server process, queried the way the page's JavaScript and gradio_client do."""
    out = tmp_path / "demo.json"
    run_script("demo_latency.py", "--models", "baseline_cnn_bn", "--backends", "torch", "--requests", "3",
               "--clients", "2", "--per-client", "1", "--out", str(out))
    (row,) = json.loads(out.read_text())["results"]
    assert row["app_single_image"]["n"] == row["gradio_client_single_image"]["n"] == 3
    assert row["cold_start_to_first_prediction_s"] > 0 and row["app_throughput_2_clients_img_per_s"] > 0


def test_demo_soak_answers_every_kind_of_input_and_tracks_memory(cnn_model_dir, tmp_path):
    """A few seconds of the soak: app.py on 127.0.0.1 under 3 clients sending photos, huge and broken files."""
    res = run_bench("demo_soak.py", "--model", str(cnn_model_dir), "--clients", "3", "--duration", "6",
                    "--window", "2", "--warmup", "2", "--sample-seconds", "0.5", "--settle", "0.5",
                    "--max-file-size", "1mb", out=tmp_path)
    assert res["benchmark"] == "demo_soak" and len(res["machine"]["load_average"]) == 3
    # every input once: photos predicted; broken files and over-limit headers get the app's message; the
    # over-size upload is refused by gradio with its own
    first = res["first_pass"]
    assert {v["kind"] for v in first.values()} == {"photo", "huge", "broken"}
    for name, answer in first.items():
        assert answer["outcome"] == answer["expect"], (name, answer)
        if answer["expect"] == "message":
            assert answer["detail"].startswith("⚠️ Could not use this file"), (name, answer)
    assert "megapixel limit" in first["header_10000x10000.png"]["detail"]
    assert "HTTP 413" in next(v["detail"] for v in first.values() if v["expect"] == "upload_refused")
    # the soak itself: answers counted per input, no errors, latency per window, memory sampled
    req = res["requests"]
    assert req["total"] > 0 and req["errors"] == 0 and req["correct"] == req["total"], res["error_examples"]
    assert set(req["errors_by_kind"]) >= {"server_error", "timeout", "unexpected_answer"}
    for name, row in req["by_input"].items():
        assert row["n"] == row.get(row["expect"], 0), (name, row)
    assert len(res["windows"]) >= 2 and sum(w["requests"] for w in res["windows"]) == req["total"]
    assert all({"p50_ms", "p95_ms", "photo_p95_ms", "rss_mb", "errors"} <= set(w) for w in res["windows"])
    mem = res["memory"]
    assert mem["rss_mb_start"] > 0 and mem["rss_mb_end"] > 0 and len(mem["samples"]) >= 5
    assert {"per_1000_requests", "r2"} <= set(mem["rss_slope_mb"]) and mem["open_files"]["end"] > 0
    assert res["server"]["alive_at_end"] and res["server"]["log_tracebacks"] == 0


def test_airbench_on_cpu_edits_only_what_a_cpu_needs_and_reads_its_curve():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import airbench_on_cpu as abc
    finally:
        sys.path.remove(str(ROOT / "bench"))
    # a stand-in for airbench94_muon.py: every edited passage once, between lines that must stay as they are
    source = "\n# kept\n".join(old for old, _ in abc.EDITS) + "\nprint('rest')\n"
    out = abc.patched(source)
    assert "cuda" not in out and ".half()" not in out and "compile" not in out and "fused" not in out
    assert out.count("# kept") == len(abc.EDITS) - 1 and out.endswith("print('rest')\n")
    with pytest.raises(SystemExit, match="occurs 0 times"):
        abc.patched(source.replace("mod.half()", "mod.bfloat16()"))
    with pytest.raises(SystemExit, match="occurs 2 times"):
        abc.patched(source + abc.EDITS[0][0])
    # airbench94_muon's print_training_details: | run | epoch | train_acc | val_acc | tta_val_acc | time_seconds |
    table = """|  run     |  epoch  |  train_acc  |  val_acc  |  tta_val_acc  |  time_seconds  |
|       0  |      0  |     0.5000  |   0.6000  |               |      300.0000  |
|          |      1  |     0.7000  |   0.8000  |               |      600.0000  |
|          |   eval  |             |           |       0.9100  |      700.0000  |"""
    curve = abc.airbench_table(table.splitlines())
    assert curve["test_top1"] == 0.8 and curve["tta_top1"] == 0.91 and curve["timed_seconds"] == 700.0
    assert [e["epoch"] for e in curve["epochs"]] == [1, 2] and curve["epochs"][0]["test_top1"] == 0.6


def test_tables_render_every_committed_result(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import tables
    finally:
        sys.path.remove(str(ROOT / "bench"))
    files = sorted((ROOT / "bench" / "results").glob("*.json"))
    renderable = [f for f in files if json.loads(f.read_text()).get("benchmark") in tables.RENDER]
    assert len(renderable) >= 20
    assert tables.main([str(f) for f in renderable]) == 0
    out = capsys.readouterr().out
    assert out.count("\n### ") + out.startswith("### ") == len(renderable) and "| model |" in out
    assert "| cpu_quick_seed1 | " in out  # the time-to-accuracy runs too
