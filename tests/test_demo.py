"""The Gradio demo: the batched event function, the page text, a live server queried with gradio_client
(one image, then concurrent requests that must be batched and routed back correctly) and one real headless
Chromium session (screenshot in tests/artifacts/)."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from test_predict import write_image_zoo

from cifar_tl import demo as demo_module
from cifar_tl.demo import (
    DELETE_CACHE,
    EXAMPLES_ROOT,
    MAX_SESSIONS,
    NO_IMAGE,
    build_demo,
    confusion_highlights,
    make_classifier,
    model_card,
    parse_args,
    save_preview,
    sweep_previews,
)
from cifar_tl.inference import Predictor, open_image

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="module")
def zoo(cifar100_arrays, tmp_path_factory) -> dict[str, Path]:
    return write_image_zoo(cifar100_arrays["test"][0], tmp_path_factory.mktemp("demo_zoo"))


@pytest.fixture(scope="module")
def example_pngs() -> list[Path]:
    """The committed gallery: 20 real CIFAR-100 test images named <index>_<true class>.png."""
    paths = sorted((EXAMPLES_ROOT / "cifar100").glob("*.png"))
    assert len(paths) == 20 and all(Image.open(p).size == (32, 32) for p in paths)
    return paths


@pytest.mark.parametrize("fixture", ["cnn_model_dir", "timm_model_dir"])
def test_classify_answers_good_inputs_and_explains_bad_ones(fixture, request, zoo, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(zoo["ok_rgb.png"].parent))  # the zoo as gradio's uploads
    predictor = Predictor.from_dir(request.getfixturevalue(fixture), "cpu")
    classify = make_classifier(predictor, top_k=5)
    names = sorted(zoo)
    with ThreadPoolExecutor(len(names) + 1) as pool:  # side by side, as gradio runs them
        answers = list(pool.map(classify, [{"path": str(zoo[n])} for n in names] + [None]))
    for name, (f, c, preview, msg) in zip(names + ["none"], answers):
        if name.startswith("ok_"):
            assert len(f) == 5 and len(c) == 1 and msg == "", name
            assert Image.open(preview).size == (128, 128), name  # 32x32 thumbnail shown 4x, pixels kept
        else:
            assert f is None and c is None and preview is None, name
            assert msg == NO_IMAGE if name == "none" else msg.startswith("⚠️ Could not use this file"), name
    expected = predictor.predict([open_image(zoo["ok_rgb.png"])])[0]
    got = answers[names.index("ok_rgb.png")][0]
    assert max(got, key=got.get) == expected["fine"][0]["label"]


def test_an_expired_upload_is_named_as_such(cnn_model_dir, zoo, tmp_path, monkeypatch):
    """gradio deletes uploads after 15 minutes while the page still shows the image: "not an image file" sent
    the user looking for a fault in a good photo."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    gone = tmp_path / "upload.png"
    shutil.copy(zoo["ok_rgb.png"], gone)
    classify = make_classifier(Predictor.from_dir(cnn_model_dir, "cpu"))
    gone.unlink()
    *_, message = classify({"path": str(gone)})
    assert "no longer on the server" in message and "upload the image again" in message


def test_only_uploads_are_read(cnn_model_dir, zoo, tmp_path, monkeypatch):
    """The event skips gradio's preprocessing, so an API call may name any path of the server: a private image
    was classified and its thumbnail served back, and a FIFO held a decoding slot for good."""
    uploads = tmp_path / "uploads"
    (uploads / "abc").mkdir(parents=True)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    classify = make_classifier(Predictor.from_dir(cnn_model_dir, "cpu"))
    shutil.copy(zoo["ok_rgb.png"], uploads / "abc" / "cat.png")
    assert classify({"path": str(uploads / "abc" / "cat.png")})[3] == ""
    private = tmp_path / "private.png"
    shutil.copy(zoo["ok_rgb.png"], private)
    (uploads / "abc" / "link.png").symlink_to(private)
    os.mkfifo(tmp_path / "fifo")
    for path in (private, uploads / "abc" / "link.png", uploads / ".." / "private.png", tmp_path / "fifo",
                 Path("/etc/passwd")):
        fine, coarse, preview, message = classify({"path": str(path)})
        assert (fine, coarse, preview) == (None, None, None) and "not uploaded to this demo" in message, path


def test_batcher_batches_waiting_requests_and_routes_answers_back():
    calls, release = [], threading.Event()

    def predict(items):
        calls.append(list(items))
        release.wait(5)  # the first call holds the model while the others queue up behind it
        return [{"x": item} for item in items]

    batcher = demo_module.Batcher(predict, max_batch_size=4)
    with ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(batcher, i) for i in range(9)]
        while sum(map(len, calls)) < 1 or batcher._waiting.qsize() < 8:
            time.sleep(0.01)
        release.set()
        assert [f.result()["x"] for f in futures] == list(range(9))
    assert sorted(map(len, calls)) == [1, 4, 4]  # the first alone, then the waiting ones in batches of 4

    def broken(items):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):  # a failing model answers, never hangs
        demo_module.Batcher(broken)(0)


def test_model_card_and_confusion_highlights(cnn_model_dir, tmp_path, caplog):
    predictor = Predictor.from_dir(cnn_model_dir, "cpu")
    card = model_card(predictor)
    assert "`baseline_cnn_bn`" in card and "top-1 1.0%" in card and "superclass 5.0%" in card
    assert confusion_highlights(predictor) is None  # no eval extras: the section is left out

    folder = shutil.copytree(cnn_model_dir, tmp_path / "model")
    labels = ["apple", "pear", "orange"]
    (folder / "confusion.json").write_text(json.dumps({"labels": labels, "matrix": [[8, 2, 0], [5, 5, 0],
                                                                                     [0, 0, 10]]}))
    text = confusion_highlights(Predictor.from_dir(folder, "cpu"))  # the folder alone, as pushed to the Hub
    assert "pear → apple: 50% (5 images)" in text and "apple → pear: 20%" in text
    assert "Hardest classes** (test accuracy): pear 50%, apple 80%, orange 100%" in text

    (folder / "confusion.json").unlink()  # an older run's folder: the run's eval_details.json beside it
    (tmp_path / "eval_details.json").write_text(json.dumps({"plain": {"per_class": {"apple": 0.7, "pear": 0.4,
                                                                                    "orange": 1.0}}}))
    text = confusion_highlights(Predictor.from_dir(folder, "cpu"))
    assert "Most confused" not in text and "Hardest classes** (test accuracy): pear 40%, apple 70%" in text

    # an edited or damaged file (it travels with the weights to the Hub) leaves the panel out, not the demo
    for bad in ({"labels": labels[:2], "matrix": [[8, 2, 0], [5, 5, 0], [0, 0, 10]]},
                {"labels": labels, "matrix": [[1, 2], [3]]}, {"matrix": "x"}):
        (folder / "confusion.json").write_text(json.dumps(bad))
        with caplog.at_level(logging.WARNING, logger="cifar_tl.demo"):
            assert confusion_highlights(Predictor.from_dir(folder, "cpu")) is None
        assert "confusion.json is not a" in caplog.text
    (folder / "confusion.json").unlink()
    (tmp_path / "eval_details.json").write_text(json.dumps({"plain": {"per_class": ["apple"]}}))
    assert confusion_highlights(Predictor.from_dir(folder, "cpu")) is None


def test_title_and_gallery_follow_the_models_classes(cnn_model_dir, tmp_path):
    """A CIFAR-100 model gets CIFAR-100's gallery and title, a CIFAR-10 one CIFAR-10's; a model with other classes
    gets neither (a gallery of classes it cannot name would mislead), unless --examples names a folder."""
    from types import SimpleNamespace

    from cifar_tl.card import CIFAR10_NAMES
    from cifar_tl.demo import dataset_title, default_examples

    def page(demo):
        parts = {c.get("props", {}).get("elem_id"): c.get("props", {}) for c in demo.config["components"]}
        return demo.config["title"], (parts.get("examples") or {}).get("label")

    title, gallery = page(build_demo(Predictor.from_dir(cnn_model_dir, "cpu")))
    assert title == "CIFAR-100 image classifier" and gallery.startswith("CIFAR-100 test images; true classes")
    cifar10 = SimpleNamespace(fine_names=list(reversed(CIFAR10_NAMES)))
    assert dataset_title(cifar10) == "CIFAR-10 image classifier"
    assert default_examples(cifar10) == EXAMPLES_ROOT / "cifar10"
    assert len(list((EXAMPLES_ROOT / "cifar10").glob("*.png"))) == 20
    model = shutil.copytree(cnn_model_dir, tmp_path / "renamed")
    config = json.loads((model / "config.json").read_text())
    config["label_names"] = ["big_apple" if n == "apple" else n for n in config["label_names"]]
    (model / "config.json").write_text(json.dumps(config))
    renamed = Predictor.from_dir(model, "cpu")
    assert page(build_demo(renamed)) == ("Image classifier", None)
    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy(EXAMPLES_ROOT / "cifar100" / "15_lion.png", mine / "1_lion.png")
    assert page(build_demo(renamed, examples_dir=mine))[1] == "Examples; true classes in order: lion"


def test_uploads_do_not_outlive_their_use(cnn_model_dir):
    """gradio deletes uploads and cached outputs 15 minutes after they were made, checked every 5 minutes: a day
    of them (the old setting) fills a busy Space's disk (bench/demo_soak.py: ~0.7 GB per 1,000 requests)."""
    demo = build_demo(Predictor.from_dir(cnn_model_dir, "cpu"))
    assert demo.delete_cache == DELETE_CACHE and DELETE_CACHE[1] <= 15 * 60 and DELETE_CACHE[0] <= 5 * 60


def test_cli_defaults_leave_host_and_port_to_gradio():
    args = parse_args(["--model", "some/model"])
    assert args.host is None and args.port is None and args.backend == "auto"  # onnx on a CPU
    assert args.max_sessions == MAX_SESSIONS < 10000  # gradio's own default holds ~0.25 GB of session copies


def test_main_bounds_the_sessions_gradio_keeps(cnn_model_dir, monkeypatch):
    """Every visitor session holds a copy of the page's config until gradio drops the oldest (bench/demo_soak.py
    measured the growth): main passes the bound on."""
    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw))
    assert demo_module.main(["--model", str(cnn_model_dir), "--max-sessions", "7"]) == 0
    assert launched["state_session_capacity"] == 7 and launched["max_file_size"] == "20mb"


def test_each_demo_answers_examples_with_its_own_model(cnn_model_dir, tmp_path, monkeypatch):
    """gradio keys its lazy example cache by component number in the working folder's .gradio/: a demo of
    another model started there before (or alongside) served that model's answers for the examples (two
    processes; here two demos numbered alike)."""
    from conftest import build_model_dir

    other = build_model_dir("baseline_cnn_bn", tmp_path / "other", seed=1)
    monkeypatch.chdir(tmp_path)
    launch, answers = gr.Blocks.launch, []

    def launch_click_close(self, **kw):  # serve, click the first example, stop
        launch(self, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
        try:
            client = Client(self.local_url, verbose=False)
            answers.append(client.predict(0, api_name="/load_example")[0]["label"])
            client.close()
        finally:
            self.close()

    monkeypatch.setattr(gr.Blocks, "launch", launch_click_close)
    expected = []
    for model in (cnn_model_dir, other):
        monkeypatch.setattr(gr.context.Context, "id", 0)  # numbered as a fresh process numbers them
        assert demo_module.main(["--model", str(model), "--backend", "torch"]) == 0
        first = demo_module.example_files(EXAMPLES_ROOT / "cifar100")[0]  # the one clicked
        expected.append(Predictor.from_dir(model, "cpu").predict([open_image(first)])[0]["fine"][0]["label"])
    assert answers == expected and expected[0] != expected[1]
    assert not (tmp_path / ".gradio" / "cached_examples").exists() and "GRADIO_EXAMPLES_CACHE" not in os.environ


def test_stale_previews_are_swept_and_reused_ones_kept(tmp_path):
    """One preview file per distinct thumbnail: a long-running demo must not keep them forever."""
    thumbs = [np.full((128, 128, 3), v, np.uint8) for v in (10, 20, 30)]
    old, reused, fresh = (Path(save_preview(t, tmp_path)) for t in thumbs)
    hour_ago = time.time() - 3600
    for path in (old, reused):
        os.utime(path, (hour_ago, hour_ago))
    assert save_preview(thumbs[1], tmp_path) == str(reused)  # the same content again: same file, refreshed
    assert sweep_previews(tmp_path, max_age=600) == 1
    assert not old.exists() and reused.exists() and fresh.exists()
    assert Image.open(save_preview(thumbs[0], tmp_path)).size == (128, 128)  # swept content is written anew


def test_a_full_temp_disk_costs_the_preview_not_the_answers(tmp_path, monkeypatch):
    """A preview the disk cannot hold failed every request of the batch (their predictions were made) and left
    a partial file the sweep never removed."""
    real_write = Path.write_bytes

    def full(self, data):
        real_write(self, data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    assert save_preview(np.zeros((128, 128, 3), np.uint8), tmp_path) is None
    assert not list(tmp_path.iterdir())
    monkeypatch.undo()
    (tmp_path / ".abc.png.123").write_bytes(b"left by a crash")
    os.utime(tmp_path / ".abc.png.123", (0, 0))
    assert sweep_previews(tmp_path, max_age=600) == 1


# --------------------------------------------------------------------------------------------- live server


@pytest.fixture(scope="module")
def server(cnn_model_dir, tmp_path_factory):
    """The app on 127.0.0.1, with a recording of the batch sizes the model actually ran."""
    cache = tmp_path_factory.mktemp("gradio")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_EXAMPLES_CACHE", str(cache / "examples"))
        mp.setenv("GRADIO_TEMP_DIR", str(cache / "tmp"))
        predictor = Predictor.from_dir(cnn_model_dir, "cpu")
        batches: list[int] = []
        lock = threading.Lock()
        predict = predictor.predict

        def recording_predict(images, **kw):
            with lock:
                batches.append(len(images))
            time.sleep(0.3)  # hold the model so that concurrent requests queue up behind it
            return predict(images, **kw)

        predictor.predict = recording_predict
        demo = build_demo(predictor)
        demo.queue().launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True,
                            max_file_size="1mb")
        try:
            yield {"url": demo.local_url, "predict": predict, "batches": batches, "cache": cache}
        finally:
            demo.close()


def _scores(label_value: dict) -> dict[str, float]:
    return {c["label"]: c["confidence"] for c in label_value["confidences"]}


def test_client_single_image(server, example_pngs):
    client = Client(server["url"], verbose=False)
    fine, coarse, preview, message = client.predict(handle_file(str(example_pngs[0])), api_name="/classify")
    expected = server["predict"]([open_image(example_pngs[0])])[0]
    assert message == "" and fine["label"] == expected["fine"][0]["label"]
    assert _scores(fine) == pytest.approx({c["label"]: c["score"] for c in expected["fine"]}, abs=1e-5)
    assert coarse["label"] == expected["coarse"]["label"]
    assert Image.open(preview).size == (128, 128)
    # lazy example caching: nothing is computed before someone clicks an example
    assert not any((server["cache"] / "examples").rglob("*.csv"))


def test_client_concurrent_requests_are_batched_and_routed_back(server, example_pngs):
    server["batches"].clear()
    client = Client(server["url"], verbose=False)
    images = example_pngs[:8] * 2  # identical images in flight together must not clash in gradio's cache
    with ThreadPoolExecutor(len(images)) as pool:
        results = list(pool.map(lambda p: client.predict(handle_file(str(p)), api_name="/classify"), images))
    expected = server["predict"]([open_image(p) for p in images])
    for (fine, _, preview, _), exp in zip(results, expected):
        assert _scores(fine) == pytest.approx({c["label"]: c["score"] for c in exp["fine"]}, abs=1e-4)
        assert Image.open(preview).size == (128, 128)
    assert sum(server["batches"]) == len(images) and max(server["batches"]) > 1


def test_a_malformed_request_fails_alone(server, example_pngs):
    """Requests that gradio cannot even hand to the app (a path it did not receive, a URL that does not
    resolve, not a file at all) used to fail every request batched with them, with no message."""
    import httpx

    base = server["url"].rstrip("/") + "/gradio_api"
    with example_pngs[0].open("rb") as f:
        uploaded = httpx.post(f"{base}/upload", files={"files": f}, timeout=30).json()[0]
    good = {"path": uploaded, "meta": {"_type": "gradio.FileData"}}
    bad = [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, "not a file",  # refused by gradio
           {"path": "https://example.invalid/cat.png", "url": "https://example.invalid/cat.png",
            "meta": {"_type": "gradio.FileData"}}]
    payloads = [good] * 8 + [bad[0]] + [good] * 8 + [bad[1]] + [good] * 8 + [bad[2]]  # queued together
    events = [httpx.post(f"{base}/call/classify", json={"data": [p]}, timeout=30).json()["event_id"]
              for p in payloads]
    with ThreadPoolExecutor(len(events)) as pool:
        streams = list(pool.map(lambda e: httpx.get(f"{base}/call/classify/{e}", timeout=60).text, events))
    expected = server["predict"]([open_image(example_pngs[0])])[0]["fine"][0]["label"]
    for payload, stream in zip(payloads, streams):
        if payload is good:
            assert "event: complete" in stream and json.dumps(expected) in stream, stream[:300]
        else:
            assert "event: error" in stream
    # a bare path (no FileData type) reaches the app, which reads only what gradio received
    event = httpx.post(f"{base}/call/classify", json={"data": [{"path": str(example_pngs[0])}]}, timeout=30)
    stream = httpx.get(f"{base}/call/classify/{event.json()['event_id']}", timeout=60).text
    assert "event: complete" in stream and "not uploaded to this demo" in stream and expected not in stream


def test_demo_flags_are_checked_before_the_model_loads(capsys):
    for argv, flag in ((["--max-file-size", "abc"], "--max-file-size"), (["--max-batch-size", "0"], "--max-batch-size"),
                       (["--queue-size", "0"], "--queue-size"), (["--max-pixels", "0"], "--max-pixels"),
                       (["--port", "70000"], "--port must be 0-65535")):
        with pytest.raises(SystemExit) as exit_:
            parse_args(["--model", "no/such-model", *argv])
        assert exit_.value.code == 2 and flag in capsys.readouterr().err
    assert parse_args(["--model", "x/y", "--max-file-size", "5 MB"]).max_file_size == "5 mb"


def test_a_busy_port_is_one_line(cnn_model_dir, monkeypatch, capsys):
    import socket

    with socket.socket() as listener:  # found before the model loads
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert demo_module.main(["--model", str(cnn_model_dir / "missing"), "--port", str(port)]) == 2
        assert capsys.readouterr().err == f"error: cannot serve on 127.0.0.1:{port}: the port is in use; choose " \
                                          "another with --port\n"

    def taken(self, **kw):
        raise OSError("Cannot find empty port in range: 7861-7861")

    monkeypatch.setattr(gr.Blocks, "launch", taken)
    assert demo_module.main(["--model", str(cnn_model_dir), "--backend", "torch", "--port", "7861"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot serve on 127.0.0.1:7861" in err and "--port" in err and "Traceback" not in err


def test_client_bad_uploads_get_a_message(server, zoo):
    client = Client(server["url"], verbose=False)
    *_, message = client.predict(handle_file(str(zoo["bad_not_an_image.png"])), api_name="/classify")
    assert message.startswith("⚠️ Could not use this file: not an image file")
    big = zoo["ok_rgb.png"].parent / "too_big.bin"
    big.write_bytes(os.urandom(2_000_000))  # over the 1 MB max_file_size: refused at upload
    with pytest.raises(Exception, match="(?i)size|413|large"):
        client.predict(handle_file(str(big)), api_name="/classify")


# --------------------------------------------------------------------------------------------- browser


def _chrome():
    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("needs Debian chromium and chromium-driver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(flag)
    return options, Service(driver)


@pytest.mark.browser
def test_browser_upload_shows_the_label(server, example_pngs, zoo, tmp_path):
    options, service = _chrome()
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options.add_argument(f"--user-data-dir={tmp_path / 'chrome-profile'}")
    expected = server["predict"]([open_image(example_pngs[7])])[0]
    browser = webdriver.Chrome(options=options, service=service)
    try:
        browser.get(server["url"])
        wait = WebDriverWait(browser, 60)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#input-image input[type=file]")))
        upload.send_keys(str(example_pngs[7]))  # 07_butterfly.png
        top = expected["fine"][0]["label"]
        wait.until(ec.text_to_be_present_in_element((By.ID, "fine"), top))
        wait.until(ec.text_to_be_present_in_element((By.ID, "coarse"), expected["coarse"]["label"]))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#thumbnail img")))
        page = browser.find_element(By.TAG_NAME, "body").text
        assert "32×32 thumbnail" in page and "Test accuracy" in page
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "demo.png"))
        # an example click runs the model once and caches its outputs (lazy caching)
        browser.find_element(By.CSS_SELECTOR, "#examples button").click()
        wait.until(lambda _: any((server["cache"] / "examples").rglob("*.csv")))
        # a file that is not an image: a message in the page, no traceback
        browser.get(server["url"])
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#input-image input[type=file]")))
        upload.send_keys(str(zoo["bad_not_an_image.png"]))
        wait.until(ec.text_to_be_present_in_element((By.ID, "message"), "Could not use this file"))
        browser.save_screenshot(str(ARTIFACTS / "demo_bad_upload.png"))
    finally:
        browser.quit()
    assert np.asarray(Image.open(ARTIFACTS / "demo.png")).std() > 0  # not a blank page
